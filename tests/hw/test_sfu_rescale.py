"""RESCALE unit: equals reference.rescale_linear(token_multiplier(amax)) on random and edge operands,
writes nothing outside its destination, and its cycle model is the RTL's count."""

import numpy as np
import pytest

from hw.isa import Instr, Op
from hw.params import AccelParams
from hw.sfu.rescale import Rescale, cycles
from quant import reference as R
from sim.unit_sim import run_unit


def _run(acc, amax, rm, rs, spad_words=1 << 14, seed=0):
    t, n = acc.shape
    a, b, c, g = 3, 3 + t * n + 5, 3 + t * n + 5 + t + 7, 3 + t * n + 5 + t + 7 + n + 2
    d = g + n + 9
    assert d + t * n + 4 <= spad_words
    rng = np.random.default_rng(seed)
    sp = rng.integers(-2**40, 2**40, spad_words)  # sentinels everywhere
    sp[a:a + t * n], sp[b:b + t], sp[c:c + n], sp[g:g + n] = acc.reshape(-1), amax, rm, rs
    ins = Instr(op=Op.RESCALE, a=a, b=b, c=c, g=g, d=d, m=t, n=n)
    out, cyc = run_unit(Rescale(AccelParams(spad_words=spad_words)), ins, sp)
    want = R.rescale_linear(acc, rm, rs, *R.token_multiplier(amax))
    got = out[d:d + t * n].reshape(t, n)
    assert np.array_equal(got, want), np.argwhere(got != want)[:5]
    rest = np.ones(spad_words, bool)
    rest[d:d + t * n] = False
    assert np.array_equal(out[rest], sp[rest]), "a write outside the destination"
    assert cyc == cycles(ins), (cyc, cycles(ins))
    return got


def _shifts_for(te, n, rng):
    """Row shifts keeping every live token's effective shift row_shift - tok_exp in 0..62."""
    lo, hi = int(te.max()), int(te.min()) + 62
    return rng.integers(lo, hi + 1, n)


def test_rescale_edges():
    rng = np.random.default_rng(1)
    # amax: 0 (dead token), 1, the rails 2**31 and 2**32 - 1, a carry case (mantissa rounds to 2**16)
    amax = np.array([0, 1, 2**31, 2**32 - 1, 2**17 - 1, 65535])
    n = 24
    acc = rng.integers(-2**31 + 1, 2**31, (amax.size, n))
    acc[:, 0], acc[:, 1], acc[:, 2] = 2**31 - 1, -(2**31 - 1), 0
    rm = rng.integers(2**15, 2**16, n)
    rm[0], rm[1], rm[3] = 65535, 65535, 0
    _, te = R.token_multiplier(amax)
    live = amax != 0
    rs = rng.integers(int(te[live].max()), int(te[live].min()) + 63, n)
    rs[4] = int(te[live].max())        # the smallest live shift: 0 for the largest exponent (saturates)
    rs[5] = int(te[live].min()) + 62   # the largest: 62
    got = _run(acc, amax, rm, rs)
    assert (got == 2**31 - 1).any() and (got == -2**31).any()  # both rails reached


def test_rescale_dead_token_any_shift():
    """amax = 0: the token multiplier is 0, the shift (clipped to 0..62) is anything, the result 0."""
    acc = np.array([[2**31 - 1, -(2**31 - 1), 5, -7]])
    _run(acc, np.array([0]), np.array([65535, 1, 2**15, 0]), np.array([-40, 99, 62, 0]))


def test_rescale_decoder_sizes():
    """A 1536-row linear (SmolLM2's MLP), two tokens, multipliers from real row scales."""
    rng = np.random.default_rng(2)
    n, t = 1536, 2
    rm, rs = R.linear_row_multipliers(rng.uniform(1e-3, 0.2, n).astype(np.float16))
    amax = np.array([int(3.7 * 65536), int(250.0 * 65536)])
    acc = rng.integers(-2**31 + 1, 2**31, (t, n)) >> rng.integers(0, 20, (t, n))
    _run(acc, amax, rm, rs)


@pytest.mark.parametrize("seed", [3, 4])
def test_rescale_random(seed):
    rng = np.random.default_rng(seed)
    t, n = int(rng.integers(1, 5)), int(rng.integers(1, 40))
    amax = rng.integers(0, 2**32, t) >> rng.integers(0, 32, t)
    acc = rng.integers(-2**31 + 1, 2**31, (t, n)) >> rng.integers(0, 31, (t, n))
    _, te = R.token_multiplier(amax)
    rm = rng.integers(0, 2**16, n)
    _run(acc, amax, rm, _shifts_for(te[amax != 0] if (amax != 0).any() else te, n, rng), seed=seed)


def test_rescale_empty_shapes():
    _run(np.zeros((0, 5), np.int64), np.zeros(0, np.int64), np.ones(5, np.int64), np.zeros(5, np.int64))
    _run(np.zeros((3, 0), np.int64), np.array([1, 2, 3]), np.zeros(0, np.int64), np.zeros(0, np.int64))
