"""EMBED, RMSNORM, SILU_MUL and ARGMAX under Verilator (sim.unit_verilator: the units' generated Verilog
with an HDL-side spad, one build for the four) at the sizes the Amaranth simulator is too slow for:
RMSNORM on 65,536-wide rows (the reference's limit, where the sum of squares reaches 2**62), ARGMAX on
rows of 49,152 logits, SILU_MUL and EMBED on 4 x 8192 / 8 x 4096 tensors. Whole spad compared against
sentinels, cycles equal to each unit's behavioural model."""

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from hw.isa import Instr, Op
from hw.params import AccelParams
from hw.sfu.argmax import Argmax
from hw.sfu.embed import Embed
from hw.sfu.rmsnorm import RmsNorm
from hw.sfu.silu import SiluMul
from quant import reference as R
from sim.unit_verilator import build_units

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hw"))
from sfu_check import check_unit, sentinel_spad  # noqa: E402

# the units' own Verilator harness (its own build): every unit also runs under Verilator through the
# accelerator in the default run (tests/sim/test_accel_sfu_*.py); these extreme sizes: `make test-heavy`
pytestmark = pytest.mark.heavy

DEPTH = 1 << 18
FXMIN, FXMAX = -2**31, 2**31 - 1


@pytest.fixture(scope="module")
def verilated(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.fail("g++ not found: Verilator needs a C++ compiler (apt-get install g++)")
    p = AccelParams(spad_words=DEPTH)
    vu = build_units([Embed(p), RmsNorm(p), SiluMul(p), Argmax(p)], DEPTH,
                     tmp_path_factory.mktemp("sfu_norm_verilator"))
    return vu.run


def test_rmsnorm_65536_wide_under_verilator(verilated):
    """The widest row the reference takes, at the rail (every shifted square 2**46, ss = 2**62, plus the
    largest eps term), then a random row with mixed gamma rails."""
    rng = np.random.default_rng(50)
    n = 1 << 16
    for x, eps in ((np.full((1, n), FXMAX), (1 << 62) - 1), (rng.integers(FXMIN, FXMAX, (1, n), endpoint=True), 0)):
        g = rng.integers(FXMIN, FXMAX, n, endpoint=True)
        g[:2] = [FXMIN, FXMAX]
        sp = sentinel_spad(DEPTH, rng)
        sp[0:n], sp[n:2 * n] = x.ravel(), g
        check_unit(RmsNorm, Instr(op=Op.RMSNORM, a=0, b=n, d=2 * n + 5, m=1, n=n, i0=eps), sp,
                   {2 * n + 5: R.rmsnorm(x, g, eps)}, run=verilated)


def test_argmax_vocabulary_rows_under_verilator(verilated):
    """Four rows of 49,152 logits: random int64, maximum at the very end, ties (first wins), all equal."""
    rng = np.random.default_rng(51)
    v = 49152
    x = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, (4, v), endpoint=True)
    x[1, v - 1] = np.iinfo(np.int64).max
    x[2, [3, 30000, v - 2]] = np.iinfo(np.int64).max
    x[3] = -5
    sp = sentinel_spad(DEPTH, rng)
    sp[0:x.size] = x.ravel()
    check_unit(Argmax, Instr(op=Op.ARGMAX, a=0, d=x.size + 3, m=4, n=v), sp,
               {x.size + 3: R.argmax_first(x)}, run=verilated)


def test_silu_and_embed_large_under_verilator(verilated):
    rng = np.random.default_rng(52)
    t, n = 4, 8192
    scale = rng.choice([2**12, 2**16, 2**20, 2**31], t * n)
    gate = np.clip(rng.normal(0, 1, t * n) * scale, FXMIN, FXMAX).astype(np.int64)
    up = np.clip(rng.normal(0, 1, t * n) * scale[::-1], FXMIN, FXMAX).astype(np.int64)
    gate[:4], up[:4] = [FXMIN, FXMAX, FXMIN, FXMAX], [FXMAX, FXMIN, FXMIN, FXMAX]
    sp = sentinel_spad(DEPTH, rng)
    sp[0:t * n], sp[40000:40000 + t * n] = gate, up
    check_unit(SiluMul, Instr(op=Op.SILU_MUL, a=0, b=40000, d=80000, m=t, n=n), sp,
               {80000: R.silu_mul(gate, up)}, run=verilated)

    t, n = 8, 4096
    w = rng.normal(0, 1, (t, n)) * rng.choice([1e-3, 0.1, 1.0, 30.0], (t, 1))
    w[5] = 0
    codes, s = R.quantize_embedding(w)
    codes = codes.astype(np.int64)
    codes[0, :2] = [-128, 127]
    mult, shift = R.embedding_multipliers(s)
    shift[7] = 64                                  # the reference's int64 wrap
    sp = sentinel_spad(DEPTH, rng)
    sp[7:7 + t * n] = codes.ravel()
    sp[50000:50000 + 2 * t:2], sp[50001:50001 + 2 * t:2] = mult, shift
    check_unit(Embed, Instr(op=Op.EMBED, a=7, b=50000, d=60000, m=t, n=n), sp,
               {60000: R.embed_lookup(np.arange(t), codes, mult, shift)}, run=verilated)
