"""QUANT_ACT, QUANT_KV, PV_WEIGHTS and PV_OUT under Verilator (sim.unit_verilator: the units' generated
Verilog with an HDL-side spad, one build for the four): equal to the reference on edge and full-size
operands, whole spad compared against sentinels, cycles equal to each unit's behavioural model."""

import itertools
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from hw.isa import Instr, Op
from hw.params import AccelParams
from hw.sfu.pv import PvOut, PvWeights
from hw.sfu.quantize import QuantAct, QuantKV
from quant import reference as R
from quant.formats import FX
from sim.unit_verilator import build_units

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hw"))
from sfu_check import check_unit, sentinel_spad  # noqa: E402

# the units' own Verilator harness (its own build): every unit also runs under Verilator through the
# accelerator in the default run (tests/sim/test_accel_sfu_*.py); these extreme sizes: `make test-heavy`
pytestmark = pytest.mark.heavy

DEPTH = 32768


@pytest.fixture(scope="module")
def verilated(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.fail("g++ not found: Verilator needs a C++ compiler (apt-get install g++)")
    p = AccelParams(spad_words=DEPTH)
    vu = build_units([QuantAct(p), QuantKV(p), PvWeights(p), PvOut(p)], DEPTH,
                     tmp_path_factory.mktemp("sfu_quant_verilator"))
    return vu.run


def test_quantizers_under_verilator(verilated):
    rng = np.random.default_rng(40)
    n = 4096
    x = rng.integers(FX.min, FX.max + 1, (3, n))
    x[1] = 0                                    # amax 0 / range 0
    x[2, :] = rng.choice([FX.min, FX.max, 0, 1, -1], n)
    sp = sentinel_spad(DEPTH, rng)
    sp[0:x.size] = x.ravel()
    codes, amax = R.quantize_activations(x)
    check_unit(QuantAct, Instr(op=Op.QUANT_ACT, a=0, d=13000, e=30000, m=3, n=n), sp,
               {13000: codes, 30000: amax}, run=verilated)
    x = rng.integers(-2**22, 2**22, (40, 64))
    x[0], x[1, 0], x[1, 1], x[2] = 0, FX.min, FX.max, 12345
    sp = sentinel_spad(DEPTH, rng)
    sp[5:5 + x.size] = x.ravel()
    codes, zero, rr = R.quantize_kv(x)
    check_unit(QuantKV, Instr(op=Op.QUANT_KV, a=5, d=9000, e=20000, f=21000, m=40, n=64), sp,
               {9000: codes, 20000: zero, 21000: rr}, run=verilated)


def test_pv_under_verilator(verilated):
    rng = np.random.default_rng(41)
    t, keys = 3, 4096
    e = R.softmax_exp(rng.integers(-2**22, 2**22, (t, keys)))
    e[2] = rng.choice([0, 1, 1 << 16], keys)
    vr = rng.integers(0, 2**32, keys)
    vr[:3] = [0, 1, 2**32 - 1]
    sp = sentinel_spad(DEPTH, rng)
    sp[0:e.size], sp[13000:13000 + keys] = e.ravel(), vr
    pa, wmax, esum = R.pv_weights(e, vr)
    check_unit(PvWeights, Instr(op=Op.PV_WEIGHTS, a=0, b=13000, d=17500, e=30000, f=30010, m=t, n=keys), sp,
               {17500: pa, 30000: wmax, 30010: esum}, run=verilated)
    wmaxes = [0, 1, 2**16, 2**48 - 2**16, 2**62 - 1]
    esums = [1, 2**16, 5_000_000, 2**28, (2**62 - 1) // 1905]   # shifts -21..93, 64 among them
    pairs = list(itertools.product(wmaxes, esums))
    acc = rng.integers(-2**24 + 1, 2**24, (len(pairs), 128))
    acc[:, :3] = [2**24 - 1, -(2**24 - 1), 0]
    wm, es = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    sp = sentinel_spad(DEPTH, rng)
    sp[0:acc.size], sp[8000:8000 + len(pairs)], sp[8100:8100 + len(pairs)] = acc.ravel(), wm, es
    want = R.pv_output(acc, wm, es)
    check_unit(PvOut, Instr(op=Op.PV_OUT, a=0, b=8000, c=8100, d=10000, m=len(pairs), n=128), sp,
               {10000: want}, run=verilated)


def test_watchdog_stops_a_unit_that_stays_busy(verilated):
    """The testbench's watchdog: a 2*4096+1-cycle QUANT_ACT row against a budget of 100 cycles."""
    from sim.unit_sim import UnitHang

    with pytest.raises(UnitHang, match="QUANT_ACT under Verilator: busy for more than 100 cycles"):
        verilated(Instr(op=Op.QUANT_ACT, a=0, d=9000, e=30000, m=1, n=4096), np.zeros(DEPTH, np.int64),
                  watchdog=100)
