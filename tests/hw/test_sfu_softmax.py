"""LOGITS and SOFTMAX_EXP units: equal to reference.attention_logits and reference.softmax_exp (every key
visible) on random and edge operands, nothing written outside the destination, cycle models exact."""

import numpy as np
import pytest

from hw.isa import Instr, Op
from hw.params import AccelParams
from hw.sfu.softmax import Logits, SoftmaxExp, logits_cycles, softmax_exp_cycles
from quant import formats as F
from quant import reference as R
from sim.unit_sim import run_unit

SPAD = 1 << 13


def _check_rest(out, sp, lo, hi):
    rest = np.ones(sp.size, bool)
    rest[lo:hi] = False
    assert np.array_equal(out[rest], sp[rest]), f"a write outside the destination {lo}..{hi}"


def _logits(acc, q_amax, k_range, mult, shift, seed=0, spad_words=SPAD):
    t, n = acc.shape
    a = 1
    b = a + t * n + 3
    c = b + t + 2
    d = c + n + 5
    assert d + t * n + 2 <= spad_words
    sp = np.random.default_rng(seed).integers(-2**40, 2**40, spad_words)
    sp[a:a + t * n], sp[b:b + t], sp[c:c + n] = acc.reshape(-1), q_amax, k_range
    ins = Instr(op=Op.LOGITS, a=a, b=b, c=c, d=d, m=t, n=n, k=mult, s=shift)
    out, cyc = run_unit(Logits(AccelParams(spad_words=spad_words)), ins, sp)
    want = R.attention_logits(acc, q_amax, k_range, mult, shift)
    got = out[d:d + t * n].reshape(t, n)
    assert np.array_equal(got, want), np.argwhere(got != want)[:5]
    _check_rest(out, sp, d, d + t * n)
    assert cyc == logits_cycles(ins), (cyc, logits_cycles(ins))
    return got


def _softmax(z, seed=0, spad_words=SPAD):
    t, n = z.shape
    a, d = 2, 2 + t * n + 3
    sp = np.random.default_rng(seed).integers(-2**40, 2**40, spad_words)
    sp[a:a + t * n] = z.reshape(-1)
    ins = Instr(op=Op.SOFTMAX_EXP, a=a, d=d, m=t, n=n)
    out, cyc = run_unit(SoftmaxExp(AccelParams(spad_words=spad_words)), ins, sp)
    got = out[d:d + t * n].reshape(t, n)
    if n:
        want = R.softmax_exp(z)
        assert np.array_equal(got, want), np.argwhere(got != want)[:5]
    _check_rest(out, sp, d, d + t * n)
    assert cyc == softmax_exp_cycles(ins), (cyc, softmax_exp_cycles(ins))
    return got


# ------------------------------------------------------------------------------------------- LOGITS
def test_logits_decoder_operands():
    """SmolLM2's head_dim 64 multiplier, 4 queries against 1000 keys and one against 4096, accumulators up
    to the QK bound."""
    rng = np.random.default_rng(1)
    mult, shift = R.softmax_params(64)
    t, n = 4, 1000
    bound = F.qk_acc_bound(64)
    acc = rng.integers(-bound, bound + 1, (t, n)) >> rng.integers(0, 12, (t, n))
    q_amax = np.array([int(x * 65536) for x in (0.9, 12.0, 300.0, 30000.0)])
    k_range = rng.integers(1, 2**24, n)
    k_range[:3] = [0, 1, 2**32 - 1]
    _logits(acc, q_amax, k_range, mult, shift, spad_words=1 << 14)
    # one query against max_keys = 4096 keys
    n = 4096
    acc = rng.integers(-bound, bound + 1, (1, n))
    _logits(acc, q_amax[2:3], rng.integers(0, 2**32, n), mult, shift, spad_words=1 << 14)


def test_logits_rails_and_both_shift_directions():
    """Exponent -10 (left shift, saturating at both rails), exponents up to 62, acc at +-(2**19 - 1),
    zero amax and range, mantissa carries (2**17 - 1)."""
    rng = np.random.default_rng(2)
    q_amax = np.array([0, 1, 2**17 - 1, 2**31, 2**32 - 1])
    k_range = np.array([0, 1, 3, 2**17 - 1, 65535, 2**31, 2**32 - 1, 12345])
    acc = rng.integers(-2**19 + 1, 2**19, (q_amax.size, k_range.size))
    acc[:, 0], acc[:, 1], acc[0, :], acc[1, 2] = 2**19 - 1, -(2**19 - 1), -5, 0
    _, eq = R.token_multiplier(q_amax)
    _, er = R.token_multiplier(k_range)
    lo = int(eq.max() + er.max()) - 10   # the smallest shift the reference accepts
    hi = int(eq.min() + er.min()) + 62   # the largest
    for mult, shift in ((65535, lo), (1 << 15, lo + 7), (40000, hi), (65535, (lo + hi) // 2), (0, lo)):
        got = _logits(acc, q_amax, k_range, mult, shift)
        if shift == lo and mult == 65535:
            assert (got == F.SOFTMAX_Z.max).any() and (got == F.SOFTMAX_Z.min).any()


def test_logits_left_shifts_below_the_rails():
    """Exponents -10..-1 on small products, so the left shift shows (not hidden by saturation)."""
    q_amax = np.array([2**32 - 1, 2**31, 2**30 + 12345])
    k_range = np.array([2**32 - 1, 2**31 + 7, 2**29, 3 << 28])
    acc = np.array([[1, -1, 3, -3], [2, 0, -2, 5], [-7, 1, 1, -1]])
    _, eq = R.token_multiplier(q_amax)
    _, er = R.token_multiplier(k_range)
    for mult in (1, 2, 3):
        got = _logits(acc, q_amax, k_range, mult, int(eq.max() + er.max()) - 10)
        assert 0 < np.abs(got).max() < F.SOFTMAX_Z.max


@pytest.mark.parametrize("seed", [3, 4])
def test_logits_random(seed):
    rng = np.random.default_rng(seed)
    t, n = int(rng.integers(1, 6)), int(rng.integers(1, 50))
    acc = rng.integers(-2**19 + 1, 2**19, (t, n)) >> rng.integers(0, 19, (t, n))
    q_amax = rng.integers(0, 2**32, t) >> rng.integers(0, 32, t)
    k_range = rng.integers(0, 2**32, n) >> rng.integers(0, 32, n)
    _, eq = R.token_multiplier(q_amax)
    _, er = R.token_multiplier(k_range)
    shift = int(rng.integers(int(eq.max() + er.max()) - 10, int(eq.min() + er.min()) + 63))
    _logits(acc, q_amax, k_range, int(rng.integers(0, 2**16)), max(shift, 0), seed=seed)


def test_logits_empty():
    _logits(np.zeros((0, 4), np.int64), np.zeros(0, np.int64), np.ones(4, np.int64), 40000, 29)
    _logits(np.zeros((2, 0), np.int64), np.array([5, 6]), np.zeros(0, np.int64), 40000, 29)


# -------------------------------------------------------------------------------------- SOFTMAX_EXP
def test_softmax_exp_edges():
    """Both rails of Q15.16 in one row (d = 2**32 - 1: the shift clamps at 62), all-equal rows, a lone
    key, fractions at the table's carry (d & 0xffff >= 65504 rounds to 1024), every exactly-hit index."""
    zmax = 2**31 - 1
    rows = [
        [zmax, -2**31, 0, zmax - 1, -1, 3, -2**30],
        [-2**31] * 7,
        [7] * 7,
        [1000, 1000 - 65504, 1000 - 65503, 1000 - 65535, 1000 - 65536 * 3 - 65504, 1000 - 31, 1000 - 32],
        [0, -(62 << 16), -(61 << 16) - 65535, -(63 << 16), -(17 << 16) - 31, -(64 << 16), -(65 << 16) - 5],
    ]
    _softmax(np.array(rows))
    _softmax(np.array([[12345]]))
    # every table entry, each hit with and without the rounding bit
    fr = np.arange(1024) * 64
    row = np.concatenate([[0], -fr[1:], -(fr[1:] - 32), -(fr[1:] + 31) - (3 << 16)])
    _softmax(row[None, :])


def test_softmax_exp_max_pass_pairs():
    """The max pass reads pairs: the maximum last in an odd row (port 0 alone) and in an even one
    (port 1), and an odd row followed by a row of larger logits (its first must not count)."""
    _softmax(np.array([[1 << 16, 2 << 16, 3 << 16, 4 << 16, 9 << 16]]))
    _softmax(np.array([[1 << 16, 2 << 16, 3 << 16, 4 << 16, 5 << 16, 9 << 16]]))
    _softmax(np.array([[1 << 16, 2 << 16, 3 << 16, 4 << 16, 5 << 16], [9 << 16, 1, 2, 3, 4]]))
    _softmax(np.array([[-5], [7], [-2**31]]))


def test_softmax_exp_decoder_rows():
    """Rows of 2048 keys (a long window), three queries, realistic logit spreads; one row of 4096."""
    rng = np.random.default_rng(5)
    z = (rng.normal(0, 6, (3, 2048)) * 65536).astype(np.int64)
    _softmax(np.clip(z, -2**31, 2**31 - 1), spad_words=1 << 14)
    z = (rng.normal(0, 20, (1, 4096)) * 65536).astype(np.int64)  # max_keys, and a wide spread
    _softmax(np.clip(z, -2**31, 2**31 - 1), spad_words=1 << 14)


@pytest.mark.parametrize("seed", [6, 7])
def test_softmax_exp_random(seed):
    rng = np.random.default_rng(seed)
    t, n = int(rng.integers(1, 5)), int(rng.integers(1, 60))
    z = rng.integers(-2**31, 2**31, (t, n)) >> rng.integers(0, 31, (t, n))
    _softmax(z, seed=seed)


def test_softmax_exp_empty():
    _softmax(np.zeros((0, 3), np.int64))
    _softmax(np.zeros((3, 0), np.int64))  # the reference refuses a row without keys; nothing written
