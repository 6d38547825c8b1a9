"""QUANT_ACT and QUANT_KV units: equal to reference.quantize_activations / quantize_kv on random and edge
rows (both Q15.16 rails, zeros, all-equal rows, ties of the rounding, amax 0 / range 0, rows of 4096),
nothing outside the destinations written (the whole spad is compared, every other word a sentinel), and
the cycles busy equal to the behavioural model."""

import numpy as np
import pytest

from hw.isa import Instr, Op
from hw.sfu.quantize import QuantAct, QuantKV
from quant import reference as R
from quant.formats import FX
from sfu_check import check_unit as _run, sentinel_spad as _spad

LO, HI = FX.min, FX.max


def _edge_rows(rng, n):
    rows = [
        np.zeros(n, np.int64),                                  # amax 0 / range 0
        np.full(n, LO), np.full(n, HI),                          # the rails, all equal
        np.full(n, 7),                                          # all equal, positive
        np.full(n, -3),                                         # all equal, negative
        rng.choice([LO, HI, 0, 1, -1], n),                       # rails mixed with tiny values
        rng.integers(LO, HI + 1, n),                             # full range
        rng.integers(-300, 301, n),                             # small: many rounding ties
    ]
    tie = np.zeros(n, np.int64)                                 # 127 * 1 / 254 = 0.5: ties away from 0
    tie[0], tie[1 % n], tie[2 % n] = 254, 1, -1
    rows.append(tie)
    kv = rng.integers(0, 2**20, n)                              # all positive: lo widened to 0
    rows.append(kv)
    rows.append(-kv)                                            # all negative: hi widened to 0
    return np.stack(rows)


def test_quant_act_random_and_edges():
    rng = np.random.default_rng(10)
    x = _edge_rows(rng, 37)
    t, n = x.shape
    sp = _spad(2048, rng)
    sp[100:100 + x.size] = x.ravel()
    ins = Instr(op=Op.QUANT_ACT, a=100, d=700, e=1500, m=t, n=n)
    codes, amax = R.quantize_activations(x)
    _run(QuantAct, ins, sp, {700: codes, 1500: amax})


def test_quant_kv_random_and_edges():
    rng = np.random.default_rng(11)
    x = _edge_rows(rng, 29)
    t, n = x.shape
    sp = _spad(2048, rng)
    sp[50:50 + x.size] = x.ravel()
    ins = Instr(op=Op.QUANT_KV, a=50, d=900, e=1400, f=1600, m=t, n=n)
    codes, zero, rng_ = R.quantize_kv(x)
    _run(QuantKV, ins, sp, {900: codes, 1400: zero, 1600: rng_})


@pytest.mark.parametrize("unit", ["act", "kv"])
def test_quantizers_long_rows(unit):
    """Rows as long as the decoder's: 4096 (act, hidden of a 7B-like model) and T = 2; head_dim 64 rows
    for KV with T = 24, plus a 576-wide pair (SmolLM2's hidden)."""
    rng = np.random.default_rng(12)
    if unit == "act":
        x = rng.integers(LO, HI + 1, (2, 4096))
        x[0, 1234] = LO  # amax 2**31 in the middle of a long row
        x[1] = rng.integers(-2**18, 2**18, 4096)
        sp = _spad(32768, rng)
        sp[0:x.size] = x.ravel()
        ins = Instr(op=Op.QUANT_ACT, a=0, d=8192, e=32760, m=2, n=4096)
        codes, amax = R.quantize_activations(x)
        _run(QuantAct, ins, sp, {8192: codes, 32760: amax})
    else:
        x = rng.integers(-2**22, 2**22, (24, 64))
        x[3] = HI
        x[5, 0], x[5, 1] = LO, HI  # widest range: 2**32 - 1
        sp = _spad(4096, rng)
        sp[0:x.size] = x.ravel()
        ins = Instr(op=Op.QUANT_KV, a=0, d=2000, e=3900, f=3950, m=24, n=64)
        codes, zero, rr = R.quantize_kv(x)
        assert rr.max() == 2**32 - 1
        _run(QuantKV, ins, sp, {2000: codes, 3900: zero, 3950: rr})
        x = rng.integers(LO, HI + 1, (2, 576))
        sp = _spad(4096, rng)
        sp[0:x.size] = x.ravel()
        ins = Instr(op=Op.QUANT_KV, a=0, d=2000, e=3900, f=3950, m=2, n=576)
        codes, zero, rr = R.quantize_kv(x)
        _run(QuantKV, ins, sp, {2000: codes, 3900: zero, 3950: rr})


def test_quant_act_degenerate_shapes():
    """N = 0 (the reference gives amax 0 per row) and T = 0 (nothing written, one cycle)."""
    rng = np.random.default_rng(13)
    sp = _spad(256, rng)
    ins = Instr(op=Op.QUANT_ACT, a=0, d=10, e=20, m=3, n=0)
    _, amax = R.quantize_activations(np.zeros((3, 0), np.int64))
    _run(QuantAct, ins, sp, {20: amax})
    assert _run(QuantAct, Instr(op=Op.QUANT_ACT, a=0, d=10, e=20, m=0, n=8), sp, {}) == 1
    assert _run(QuantKV, Instr(op=Op.QUANT_KV, a=0, d=10, e=20, f=30, m=0, n=8), sp, {}) == 1


def _mixed(rng, shape):
    """Values of every magnitude: each row drawn at its own scale, some rails and zeros sprinkled in."""
    t, n = shape
    scale = 2 ** rng.integers(0, 32, (t, 1))
    x = np.clip(rng.integers(-2**31, 2**31, shape) // (2**31 // scale), LO, HI)
    pick = rng.random(shape)
    x = np.where(pick < .03, LO, np.where(pick < .06, HI, np.where(pick < .1, 0, x)))
    return x.astype(np.int64)


@pytest.mark.parametrize("seed", range(4))
def test_quantizers_random_shapes(seed):
    rng = np.random.default_rng(100 + seed)
    t, n = int(rng.integers(1, 6)), int(rng.integers(1, 300))
    x = _mixed(rng, (t, n))
    sp = _spad(4096, rng)
    sp[3:3 + x.size] = x.ravel()
    codes, amax = R.quantize_activations(x)
    _run(QuantAct, Instr(op=Op.QUANT_ACT, a=3, d=2000, e=4000, m=t, n=n), sp, {2000: codes, 4000: amax})
    codes, zero, rr = R.quantize_kv(x)
    _run(QuantKV, Instr(op=Op.QUANT_KV, a=3, d=2001, e=4000, f=4010, m=t, n=n), sp,
         {2001: codes, 4000: zero, 4010: rr})
