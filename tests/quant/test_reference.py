"""The integer reference model: properties of every operation, round trips, edges and bounds."""

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from quant import formats as F
from quant import reference as R

SETTINGS = settings(max_examples=150, deadline=None)


def _exact_round_half_away(n: int, d: int) -> int:
    f = Fraction(n, d)
    mag = int(abs(f) + Fraction(1, 2))  # floor(|f| + 1/2)
    return mag if f >= 0 else -mag


# --- rounding primitives ----------------------------------------------------------------------------
@SETTINGS
@given(st.integers(-(1 << 40), 1 << 40), st.integers(1, 1 << 20))
def test_round_div_is_exact_half_away_from_zero(n, d):
    assert int(R.round_div(n, d)) == _exact_round_half_away(n, d)


@SETTINGS
@given(st.integers(-(1 << 50), 1 << 50), st.integers(0, 40))
def test_shift_round_is_half_up(x, s):
    expect = (Fraction(x, 1 << s) + Fraction(1, 2)).__floor__()
    assert int(R.shift_round(x, s)) == expect


def test_round_div_ties():
    assert R.round_div([5, -5, 3, -3, 1, -1], 2).tolist() == [3, -3, 2, -2, 1, -1]
    with pytest.raises(R.FormatError):
        R.round_div(1, 0)


# --- fixed point ---------------------------------------------------------------------------------------
def test_to_fx_exact_and_saturating():
    x = np.array([0.5, -1.25, 1e-9, 40000.0, -40000.0], np.float32)
    fx = R.to_fx(x)
    assert fx.tolist() == [32768, -81920, 0, F.FX.max, F.FX.min]
    assert np.array_equal(R.from_fx(fx[:2]), x[:2].astype(np.float64))


# --- activation quantizer ---------------------------------------------------------------------------
fx_rows = hnp.arrays(np.int64, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40),
                     elements=st.integers(F.FX.min + 1, F.FX.max))


@SETTINGS
@given(fx_rows)
def test_activation_quantizer_error_and_range(x):
    a, amax = R.quantize_activations(x)
    assert a.dtype == np.int8 and np.all(np.abs(a.astype(int)) <= F.ACT_QMAX)
    assert np.array_equal(amax, np.abs(x).max(axis=1))
    for t in range(x.shape[0]):
        if amax[t] == 0:
            assert not a[t].any()
            continue
        # |a - 127 x / amax| <= 1/2, exactly
        err = [abs(Fraction(int(a[t, i])) - Fraction(127 * int(x[t, i]), int(amax[t]))) for i in range(x.shape[1])]
        assert max(err) <= Fraction(1, 2)
        assert 127 in np.abs(a[t].astype(int))  # the largest element maps to full scale


@SETTINGS
@given(fx_rows)
def test_activation_quantizer_is_odd_symmetric(x):
    a, amax = R.quantize_activations(x)
    an, amaxn = R.quantize_activations(-x)
    assert np.array_equal(an, -a) and np.array_equal(amaxn, amax)


def test_activation_quantizer_edges():
    a, amax = R.quantize_activations(np.zeros((2, 5), np.int64))
    assert not a.any() and not amax.any()
    a, _ = R.quantize_activations(np.array([[F.FX.max, F.FX.min + 1, 0, 1]]))
    assert a.tolist() == [[127, -127, 0, 0]]
    with pytest.raises(R.FormatError, match="outside"):
        R.quantize_activations(np.array([[1 << 40]]))
    with pytest.raises(R.FormatError, match="integer"):
        R.quantize_activations(np.ones((1, 3)))


# --- KV quantizer -------------------------------------------------------------------------------------
@SETTINGS
@given(hnp.arrays(np.int64, st.tuples(st.integers(1, 12), st.integers(1, 64)),
                  elements=st.integers(-(1 << 24), 1 << 24)))
def test_kv_quantizer_error_at_most_half_step(x):
    codes, zero, rng = R.quantize_kv(x)
    assert codes.max() <= 15 and zero.max() <= 15
    for t in range(x.shape[0]):
        r = int(rng[t])
        for i in range(x.shape[1]):
            if r == 0:
                assert codes[t, i] == 0 and x[t, i] == 0
                continue
            deq = Fraction((int(codes[t, i]) - int(zero[t])) * r, 15)
            assert abs(deq - int(x[t, i])) <= Fraction(r, 30)


def test_kv_zero_is_exact():
    x = np.array([[0, 1000, -300, 0, 77]], np.int64)
    codes, zero, rng = R.quantize_kv(x)
    assert codes[0, 0] == zero[0] and codes[0, 3] == zero[0]  # zero dequantizes to exactly zero
    assert np.array_equal(R.dequantize_kv(codes, zero, rng)[0, [0, 3]], [0.0, 0.0])


def test_kv_all_positive_and_constant_rows():
    codes, zero, rng = R.quantize_kv(np.array([[5, 10, 15], [7, 7, 7], [-4, -4, -4]], np.int64))
    assert zero.tolist()[0] == 0 and codes[0].tolist() == [5, 10, 15]
    assert codes[1].tolist() == [15, 15, 15] and zero[1] == 0
    assert codes[2].tolist() == [0, 0, 0] and zero[2] == 15


# --- weights ------------------------------------------------------------------------------------------
def _rand_weights(rng, n, k, g, bits=2):
    codes = rng.integers(0, 1 << bits, size=(n, k)).astype(np.uint8)
    s = rng.integers(0, 256, size=(n, k // g))
    m = rng.integers(-128, 128, size=(n, k // g))
    return codes, s, m


def _w_int(codes, s, m, g, mask=None):
    w = np.repeat(s, g, axis=1) * codes.astype(np.int64) + np.repeat(m, g, axis=1)
    return w if mask is None else np.where(mask, w, 0)


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 4), st.sampled_from([4, 8, 16, 64]),
       st.integers(1, 4), st.integers(1, 3), st.sampled_from([2, 4]))
def test_linear_equals_integer_weight_matmul(seed, n, g, groups, t, bits):
    rng = np.random.default_rng(seed)
    k = g * groups
    codes, s, m = _rand_weights(rng, n, k, g, bits)
    a = rng.integers(-128, 128, size=(t, k))
    acc = R.w2a8_linear(a, codes, s, m, g, code_bits=bits)
    assert np.array_equal(acc, a @ _w_int(codes, s, m, g).T)
    assert np.abs(acc).max(initial=0) <= F.linear_acc_bound(k, bits)


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 4), st.sampled_from([4, 8, 16, 64]),
       st.integers(1, 4), st.integers(1, 3))
def test_sparse_linear_equals_masked_dense(seed, n, g, groups, t):
    rng = np.random.default_rng(seed)
    k = g * groups
    codes, s, m = _rand_weights(rng, n, k, g)
    mask = R.random_24_mask(rng, n, k)
    a = rng.integers(-128, 128, size=(t, k))
    kept, meta = R.compress_24(codes, mask)
    sparse = R.w2a8_sparse_linear(a, kept, meta, s, m, g)
    assert np.array_equal(sparse, R.w2a8_linear(a, codes, s, m, g, mask=mask))
    assert np.array_equal(sparse, a @ _w_int(codes, s, m, g, mask).T)
    codes2, mask2 = R.expand_24(kept, meta)
    assert np.array_equal(mask2, mask) and np.array_equal(codes2, np.where(mask, codes, 0))


def test_linear_bound_is_tight_and_fits_32_bits_for_llama():
    k, g = 128, 64
    codes = np.full((1, k), 3, np.uint8)
    s = np.full((1, k // g), 255)
    m = np.full((1, k // g), 127)
    acc = R.w2a8_linear(np.full((1, k), -128), codes, s, m, g)
    assert acc[0, 0] == -F.linear_acc_bound(k)
    assert F.signed_bits_for(F.linear_acc_bound(16384)) <= 32  # Llama-2-7B down_proj K = 11008
    assert F.signed_bits_for(F.linear_acc_bound(32768)) > 32


def test_fully_pruned_group_contributes_nothing():
    rng = np.random.default_rng(1)
    codes, s, m = _rand_weights(rng, 3, 128, 64)
    s[:, 0] = 0
    m[:, 0] = 0
    a = rng.integers(-128, 128, size=(2, 128))
    a2 = a.copy()
    a2[:, :64] = rng.integers(-128, 128, size=(2, 64))
    assert np.array_equal(R.w2a8_linear(a, codes, s, m, 64), R.w2a8_linear(a2, codes, s, m, 64))


def test_rtn_grid_round_trip_and_error():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(8, 128))
    codes, s, m, S = R.quantize_weights_rtn(w, 64)
    assert F.W_SCALE.contains(s) and F.W_MIN.contains(m) and F.W_CODE.contains(codes)
    assert np.array_equal(S, S.astype(np.float16).astype(np.float64))  # row scale is float16-exact
    deq = R.dequantize_weights(codes, s, m, S, 64)
    # every weight sits on the grid point of its group nearest to it
    grid = np.stack([R.dequantize_weights(np.full_like(codes, q), s, m, S, 64) for q in range(4)])
    assert np.allclose(np.abs(deq - w), np.abs(grid - w).min(axis=0), rtol=0, atol=1e-12)
    # a second quantization of the dequantized weights on the same grid returns the same codes
    assert np.array_equal(R.nearest_codes(deq, S, s, m, 64), codes)


def test_weight_format_errors_name_the_problem():
    codes = np.zeros((2, 96), np.uint8)
    with pytest.raises(R.FormatError, match="group size 64 does not divide the input dimension 96"):
        R.w2a8_linear(np.zeros((1, 96), int), codes, np.zeros((2, 1), int), np.zeros((2, 1), int), 64)
    with pytest.raises(R.FormatError, match="weight codes"):
        R.w2a8_linear(np.zeros((1, 64), int), np.full((2, 64), 4), np.zeros((2, 1), int), np.zeros((2, 1), int), 64)
    with pytest.raises(R.FormatError, match="group scales"):
        R.w2a8_linear(np.zeros((1, 64), int), np.zeros((2, 64), int), np.full((2, 1), 256), np.zeros((2, 1), int), 64)
    with pytest.raises(R.FormatError, match="activations"):
        R.w2a8_linear(np.full((1, 64), 128), np.zeros((2, 64), int), np.zeros((2, 1), int), np.zeros((2, 1), int), 64)
    with pytest.raises(R.FormatError, match="keep 3 weights, not exactly 2"):
        R.compress_24(np.zeros((1, 8), int), np.array([[1, 1, 1, 0, 1, 1, 0, 0]], bool))
    with pytest.raises(R.FormatError, match="not one of 0..5"):
        R.expand_24(np.zeros((1, 2), int), np.array([[6]]))


def test_sparse_linear_edges():
    """-128/127 activations, extreme codes and scales, every one of the six patterns."""
    k, g = 24, 8
    meta = np.array([[0, 1, 2, 3, 4, 5]])
    kept = np.array([[3, 0, 3, 3, 0, 3, 3, 3, 0, 0, 3, 1]])
    s = np.array([[255, 0, 255]])
    m = np.array([[-128, 127, 127]])
    a = np.array([[-128, 127] * (k // 2), [127] * k])
    codes, mask = R.expand_24(kept, meta)
    assert np.array_equal(R.w2a8_sparse_linear(a, kept, meta, s, m, g), a @ _w_int(codes, s, m, g, mask).T)


# --- attention products ------------------------------------------------------------------------------
@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 3), st.integers(1, 9), st.sampled_from([4, 8, 64]))
def test_qk_pv_match_dequantized_math(seed, tq, tk, d):
    rng = np.random.default_rng(seed)
    q = rng.integers(-128, 128, size=(tq, d))
    kc = rng.integers(0, 16, size=(tk, d))
    kz = rng.integers(0, 16, size=tk)
    vc = rng.integers(0, 16, size=(tk, d))
    vz = rng.integers(0, 16, size=tk)
    p = rng.integers(-128, 128, size=(tq, tk))
    s = R.qk_scores(q, kc, kz)
    o = R.pv_product(p, vc, vz)
    for i in range(tq):
        for j in range(tk):
            assert s[i, j] == sum(int(q[i, c]) * (int(kc[j, c]) - int(kz[j])) for c in range(d))
        for c in range(d):
            assert o[i, c] == sum(int(p[i, j]) * (int(vc[j, c]) - int(vz[j])) for j in range(tk))
    assert np.abs(s).max() <= F.qk_acc_bound(d) and np.abs(o).max() <= F.pv_acc_bound(tk)


def test_qk_pv_bounds_are_tight():
    d = 64
    assert R.qk_scores(np.full((1, d), -128), np.full((1, d), 15), np.zeros(1, int))[0, 0] == -F.qk_acc_bound(d)
    assert R.pv_product(np.full((1, 5), -128), np.zeros((5, 3), int), np.full(5, 15))[0, 0] == F.pv_acc_bound(5)


def test_kv_round_trip_through_attention():
    """Quantized cache + quantized query reproduce float attention scores closely."""
    rng = np.random.default_rng(3)
    qf, kf = rng.normal(size=(2, 64)), rng.normal(size=(10, 64))
    qa, qmax = R.quantize_activations(R.to_fx(qf))
    kc, kz, kr = R.quantize_kv(R.to_fx(kf))
    scores = R.qk_scores(qa, kc, kz) * (qmax[:, None] / 127) * (kr[None, :] / 15) / 2.0**32
    ref = qf @ kf.T
    assert np.abs(scores - ref).max() < 0.1 * np.abs(ref).max()


# --- requantization -----------------------------------------------------------------------------------
@SETTINGS
@given(st.integers(-(1 << 40), 1 << 40), st.integers(1, 65535), st.integers(0, 40))
def test_requantize_matches_exact_rational(acc, mult, shift):
    got = int(R.requantize(acc, mult, shift, F.FX))
    exact = (Fraction(acc * mult, 1 << shift) + Fraction(1, 2)).__floor__()
    assert got == min(max(exact, F.FX.min), F.FX.max)


def test_requantize_saturates_and_rejects():
    assert R.requantize(np.array([10**6, -10**6]), 1, 0, F.ACT).tolist() == [127, -128]
    with pytest.raises(R.FormatError):
        R.requantize(1, 70000, 1, F.ACT)
    with pytest.raises(R.FormatError):
        R.requantize(1, 1, 63, F.ACT)


@SETTINGS
@given(st.floats(1e-12, 6.5e4))
def test_multiplier_for_is_accurate(real):
    mult, shift = R.multiplier_for(real)
    assert 1 << 15 <= mult < 1 << 16 and 0 <= shift <= F.REQ_SHIFT_MAX
    assert abs(mult / 2.0**shift - real) <= real * 2.0**-16


def test_multiplier_for_rejects():
    for bad in (0.0, -1.0, float("inf"), 1e6):
        with pytest.raises(R.FormatError):
            R.multiplier_for(bad)


# --- Λ-shaped attention cache ----------------------------------------------------------------------------
@SETTINGS
@given(st.integers(0, 8), st.integers(1, 16), st.integers(0, 200))
def test_visible_tokens_never_share_a_slot(sinks, window, n):
    vis = R.visible_tokens(n, sinks, window)
    assert len(vis) == min(n + 1, sinks + window)
    slots = R.cache_slot(vis, sinks, window)
    assert len(set(slots.tolist())) == len(vis)
    assert slots.max() < sinks + window
    d = R.attention_distances(n, sinks, window)
    assert d.min() >= 0 and d.max() <= sinks + window - 1
    if n < sinks + window:  # while the context fits, positions are exact
        assert np.array_equal(d, n - vis)
    mask = R.lambda_mask(n + 1, sinks, window)
    assert np.array_equal(np.flatnonzero(mask[n]), vis)


def test_lambda_mask_full_when_window_covers_context():
    assert np.array_equal(R.lambda_mask(10, 4, 10), np.tril(np.ones((10, 10), bool)))


def test_random_24_mask_is_valid_and_uses_every_pattern():
    m = R.random_24_mask(np.random.default_rng(1), 7, 400)
    R.check_24_mask(m)
    kept, meta = R.compress_24(np.zeros((7, 400), np.uint8), m)
    assert set(np.unique(meta)) == set(range(len(F.SPARSE_PATTERNS)))
    with pytest.raises(R.FormatError):
        R.random_24_mask(np.random.default_rng(1), 2, 6)


# --- bad input: each a clear error or a documented saturation (issue 9, item 5) -----------------------
def test_to_fx_refuses_nan_and_saturates_inf():
    with pytest.raises(R.FormatError, match=r"NaN at index \(1, 0\)"):
        R.to_fx(np.array([[1.0], [np.nan]]))
    with pytest.raises(R.FormatError, match="NaN"):
        R.to_fx(float("nan"))
    assert R.to_fx([np.inf, -np.inf]).tolist() == [F.FX.max, F.FX.min]  # saturation, as documented


def test_fit_weight_grid_refuses_what_float16_cannot_hold():
    f16 = float(np.finfo(np.float16).max)  # 65504
    # the largest row scale float16 holds: a step of 255 * 65504 fits exactly, and stays finite
    S, s, m = R.fit_weight_grid(np.array([[0.0]]), np.array([[3 * 255 * f16]]))
    assert S.tolist() == [f16] and s.tolist() == [[255]]
    assert np.all(np.isfinite(R.dequantize_weights(np.full((1, 4), 3), s, m, S, 4)))
    with pytest.raises(R.FormatError, match=r"row 1 needs a row scale of .* above float16's largest 65504"):
        R.fit_weight_grid(np.array([[0.0], [0.0]]), np.array([[1.0], [3 * 255 * f16 * 1.01]]))
    with pytest.raises(R.FormatError, match="above float16's largest"):
        R.fit_weight_grid(np.array([[-128 * f16 * 1.01]]), np.array([[0.0]]))
    with pytest.raises(R.FormatError, match=r"lo = nan at \(row, group\) \(0, 1\) is not finite"):
        R.fit_weight_grid(np.array([[0.0, np.nan]]), np.array([[1.0, 1.0]]))
    with pytest.raises(R.FormatError, match="hi = inf"):
        R.fit_weight_grid(np.array([[0.0]]), np.array([[np.inf]]))
    # an all-zero row: row scale 1.0 (docs/numerics.md), zero scale and min
    S, s, m = R.fit_weight_grid(np.zeros((1, 2)), np.zeros((1, 2)))
    assert S.tolist() == [1.0] and s.tolist() == [[0, 0]] and m.tolist() == [[0, 0]]


def test_compress_expand_24_refuse_codes_out_of_range():
    mask = np.array([[1, 1, 0, 0, 0, 0, 1, 1]], bool)
    for bad in (300, -1, 16):
        codes = np.array([[bad, 0, 0, 0, 0, 0, 0, 1]])
        with pytest.raises(R.FormatError, match=f"value {bad} at index \\(0, 0\\) is outside"):
            R.compress_24(codes, mask)
        with pytest.raises(R.FormatError, match=f"kept codes: value {bad}"):
            R.expand_24(np.array([[bad, 0, 0, 1]]), np.array([[0, 5]]))
    # with the layer's width given, a 2-bit layer's 4 is refused too; 15 is a valid 4-bit code
    with pytest.raises(R.FormatError, match="outside weight code"):
        R.compress_24(np.array([[4, 0, 0, 0, 0, 0, 0, 1]]), mask, 2)
    kept, meta = R.compress_24(np.array([[15, 7, 0, 0, 0, 0, 3, 1]]), mask, 4)
    assert kept.tolist() == [[15, 7, 3, 1]]
    codes, mk = R.expand_24(kept, meta, 4)
    assert codes.tolist() == [[15, 7, 0, 0, 0, 0, 3, 1]] and np.array_equal(mk, mask)
    with pytest.raises(R.FormatError, match="same shape"):
        R.compress_24(np.zeros((1, 4), int), mask)


def test_int_refuses_uint64_beyond_int64():
    big = np.array([1, 1 << 63], np.uint64)
    with pytest.raises(R.FormatError, match=r"accumulator: value 9223372036854775808 at index \(1,\) does not fit int64"):
        R.requantize(big, 1, 0, F.FX)
    with pytest.raises(R.FormatError, match="does not fit int64"):
        R.token_multiplier(np.array([np.iinfo(np.uint64).max], np.uint64))
    ok = np.array([(1 << 63) - 1], np.uint64)  # the largest int64 passes the check unchanged
    assert R._int(ok).tolist() == [(1 << 63) - 1]


def test_requantize_refuses_a_zero_multiplier():
    with pytest.raises(R.FormatError, match="multiplier 0 would zero every output"):
        R.requantize(np.array([[5, 6]]), np.array([1, 0]), np.array([0, 0]), F.FX)


def test_kv_range_reaches_2_to_32_minus_1_and_no_further():
    c, z, r = R.quantize_kv(np.array([[F.FX.min, F.FX.max]]))
    assert r.tolist() == [(1 << 32) - 1] and F.KV_RANGE.contains(r)
    assert np.isfinite(R.dequantize_kv(c, z, r)).all()
    with pytest.raises(R.FormatError, match="kv ranges: value 4294967296"):
        R.dequantize_kv(c, z, np.array([1 << 32]))


def test_activation_amax_reaches_2_to_31():
    a, amax = R.quantize_activations(np.array([[F.FX.min, 0]]))
    assert amax.tolist() == [1 << 31] and F.AMAX.contains(amax) and a.tolist() == [[-127, 0]]


def test_embedding_dequantize_and_lookup_agree():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(40, 24)) * rng.uniform(1e-3, 3.0, size=(40, 1))
    w[5] = 0.0
    codes, S = R.quantize_embedding(w)
    deq = R.dequantize_embedding(codes, S)
    assert np.all(np.abs(deq - w) <= S[:, None] / 2 + 1e-15)  # half a step per row
    assert S[5] == R.EMBED_ZERO_ROW_SCALE == 2.0**-16 and not codes[5].any()  # an all-zero row
    ids = np.arange(40)
    fx = R.embed_lookup(ids, codes, *R.embedding_multipliers(S))
    assert np.all(np.abs(fx - deq * (1 << F.FX_FRAC_BITS)) <= 0.5)  # the same table, rounded to Q15.16
    with pytest.raises(R.FormatError, match="row scale 0.0 at row 1"):
        R.dequantize_embedding(codes[:2], np.array([0.5, 0.0]))
    with pytest.raises(R.FormatError, match="must be"):
        R.dequantize_embedding(codes, S[:3])
