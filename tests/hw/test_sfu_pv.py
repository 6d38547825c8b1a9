"""PV_WEIGHTS and PV_OUT units: equal to reference.pv_weights / pv_output on random and edge operands
(e at 0 and 2**16, ranges 0 .. 2**32-1, wmax 0, ties of the rounding, the softmax's real outputs, 4096
keys; accumulators at +-(2**24-1), wmax and esum from 0/1 to their 62-bit limits, both FX rails of
the saturation, shifts from -21 to 93), nothing outside the destinations written (whole spad
compared against sentinels), cycles equal to the behavioural model."""

import itertools

import numpy as np
import pytest

from hw.isa import Instr, Op
from hw.sfu.pv import PvOut, PvWeights
from quant import reference as R
from sfu_check import check_unit as _run, sentinel_spad as _spad

E1 = 1 << 16
RMAX = 2**32 - 1


def _weights_case(unit_rows, v_range, sp_words=4096, seed=0):
    rng = np.random.default_rng(seed)
    e = np.asarray(unit_rows, np.int64)
    t, n = e.shape
    sp = _spad(sp_words, rng)
    a, b = 5, 5 + e.size
    d = b + n
    ea, fa = d + e.size, d + e.size + t
    sp[a:a + e.size], sp[b:b + n] = e.ravel(), v_range
    pa, wmax, esum = R.pv_weights(e, np.asarray(v_range, np.int64))
    ins = Instr(op=Op.PV_WEIGHTS, a=a, b=b, d=d, e=ea, f=fa, m=t, n=n)
    return _run(PvWeights, ins, sp, {d: pa, ea: wmax, fa: esum})


def test_pv_weights_edges():
    rng = np.random.default_rng(1)
    n = 24
    r = rng.integers(0, RMAX + 1, n)
    r[:4] = [0, 1, RMAX, RMAX - 1]
    rows = [np.zeros(n, np.int64), np.full(n, E1), np.full(n, 1), rng.integers(0, E1 + 1, n),
            rng.choice([0, 1, E1 - 1, E1], n)]
    tie = np.zeros(n, np.int64)
    tie[4], tie[5], tie[6] = 254, 1, 3       # with r = 1 there: 127/254 = 0.5 rounds away to 1
    r[4:7] = 1
    rows.append(tie)
    _weights_case(np.stack(rows), r, seed=2)
    _weights_case(np.stack(rows), np.zeros(n, np.int64), seed=3)          # every range 0: wmax 0
    _weights_case(np.full((3, n), E1), np.full(n, RMAX), seed=4)          # the largest products


def test_pv_weights_from_the_softmax_4096_keys():
    """Operands as the decoder makes them: e = softmax_exp of random logits, ranges from quantize_kv;
    T = 2 query rows over 4096 keys (max_keys), then 6 rows over 300."""
    rng = np.random.default_rng(5)
    for t, n, words in ((2, 4096, 32768), (6, 300, 4096)):
        z = rng.integers(-2**22, 2**22, (t, n))
        e = R.softmax_exp(z)
        _, _, vr = R.quantize_kv(rng.integers(-2**31, 2**31, (n, 64)))
        _weights_case(e, vr, sp_words=words, seed=t)


def test_pv_weights_degenerate_shapes():
    rng = np.random.default_rng(6)
    sp = _spad(256, rng)
    pa, wmax, esum = R.pv_weights(np.zeros((3, 0), np.int64), np.zeros(0, np.int64))
    _run(PvWeights, Instr(op=Op.PV_WEIGHTS, a=0, b=0, d=10, e=20, f=30, m=3, n=0), sp, {20: wmax, 30: esum})
    assert _run(PvWeights, Instr(op=Op.PV_WEIGHTS, a=0, b=0, d=10, e=20, f=30, m=0, n=5), sp, {}) == 1


def _out_case(acc, wmax, esum, seed=0, sp_words=4096):
    rng = np.random.default_rng(seed)
    acc = np.asarray(acc, np.int64)
    wmax, esum = np.asarray(wmax, np.int64), np.asarray(esum, np.int64)
    t, n = acc.shape
    sp = _spad(sp_words, rng)
    a, b, c = 7, 7 + acc.size, 7 + acc.size + t
    d = c + t
    sp[a:a + acc.size], sp[b:b + t], sp[c:c + t] = acc.ravel(), wmax, esum
    want = R.pv_output(acc, wmax, esum)
    ins = Instr(op=Op.PV_OUT, a=a, b=b, c=c, d=d, m=t, n=n)
    _run(PvOut, ins, sp, {d: want})
    return want


WMAXES = [0, 1, 2, 127, E1 - 1, E1, E1 + 1, 2**32 - 1, (E1 * RMAX), 2**48 + 12345, 2**62 - 1]
ESUMS = [1, 2, 3, E1, E1 + 1, 4096 * E1, 3_000_000, 5_000_000, 10_000_000, 2**31 + 7, 2**48 // 1905 * 3 // 2, (2**62 - 1) // 1905 - 1, (2**62 - 1) // 1905]


def test_pv_out_every_extreme_pair():
    """Every (wmax, esum) pair of the lists above (shifts -21 .. 93, both saturation rails) against
    accumulators at the rails, 0, +-1 and random ones."""
    rng = np.random.default_rng(7)
    pairs = list(itertools.product(WMAXES, ESUMS))
    n = 12
    acc = rng.integers(-2**24 + 1, 2**24, (len(pairs), n))
    acc[:, :5] = [2**24 - 1, -(2**24 - 1), 0, 1, -1]
    wmax, esum = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    mw, ew = R.mantissa16(wmax)
    _, ee = R.mantissa16(1905 * esum)
    s = 31 + ee - ew
    assert s.min() == -21 and s.max() == 93 and (s == 64).any() and (s == 63).any()
    want = _out_case(acc, wmax, esum, seed=8)
    assert want.max() == 2**31 - 1 and want.min() == -2**31  # both rails reached


def test_pv_out_decoder_operands():
    """The chain as the decoder runs it: softmax -> pv_weights -> pv_product -> pv_output, D = 128
    (max_head_dim) over 40 query rows, and random accumulators over 64-wide rows."""
    rng = np.random.default_rng(9)
    t, keys, dh = 40, 96, 128
    e = R.softmax_exp(rng.integers(-2**21, 2**21, (t, keys)))
    vc, vz, vr = R.quantize_kv(rng.integers(-2**20, 2**20, (keys, dh)))
    pa, wmax, esum = R.pv_weights(e, vr)
    acc = R.pv_product(pa, vc, vz)
    _out_case(acc, wmax, esum, seed=10, sp_words=16384)
    acc = rng.integers(-2**24 + 1, 2**24, (9, 64))
    _out_case(acc, rng.integers(0, 2**48, 9), rng.integers(1, 2**28, 9), seed=11)


def test_pv_out_degenerate_shapes():
    rng = np.random.default_rng(12)
    sp = _spad(256, rng)
    sp[0:3], sp[3:6] = [5, 6, 7], [1, 2, 3]
    assert _run(PvOut, Instr(op=Op.PV_OUT, a=0, b=0, c=3, d=10, m=3, n=0), sp, {}) == 4
    assert _run(PvOut, Instr(op=Op.PV_OUT, a=0, b=0, c=3, d=10, m=0, n=5), sp, {}) == 1


@pytest.mark.parametrize("seed", range(3))
def test_pv_random_shapes(seed):
    rng = np.random.default_rng(200 + seed)
    t, n = int(rng.integers(1, 6)), int(rng.integers(1, 200))
    e = np.where(rng.random((t, n)) < .1, E1, rng.integers(0, E1 + 1, (t, n)))
    r = np.where(rng.random(n) < .1, 0, rng.integers(0, RMAX + 1, n) >> rng.integers(0, 32, n))
    _weights_case(e, r, seed=seed)
    _out_case(rng.integers(-2**24 + 1, 2**24, (t, n)) >> rng.integers(0, 24, (t, 1)),
              rng.integers(0, 2**62, t) >> rng.integers(0, 62, t), rng.integers(1, 2**30, t), seed=seed)
