"""Per-layer compression algorithms on tiny random layers with correlated inputs (fast)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from quant import algorithms as A  # noqa: E402
from quant import reference  # noqa: E402
from quant.formats import W_MIN, W_SCALE  # noqa: E402
from quant.qlinear import QuantizedLinear  # noqa: E402
from quant.recipe import Prune, QuantizeWeights  # noqa: E402
from quant.reference import FormatError  # noqa: E402

N, K, T, G = 32, 128, 512, 32
F64 = torch.float64


@pytest.fixture(scope="module")
def layer():
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(T, K, generator=g, dtype=F64)
    mix = torch.randn(K, K, generator=g, dtype=F64) / K**0.5 + torch.eye(K, dtype=F64)
    x = (z @ mix) * torch.exp(torch.randn(K, generator=g, dtype=F64))  # correlated, uneven channels
    w = torch.randn(N, K, generator=g, dtype=F64) * 0.05
    w[3, 17] = 0.6  # an outlier weight, so clipping matters
    return w, x, A.hessian(x)


def cfg(**kw) -> QuantizeWeights:
    base = dict(bits=2, group_size=G, method="gptq", act_order=False, clip_search=False)
    base.update(kw)
    return QuantizeWeights(**base)


def err(w, ql_or_w, x) -> float:
    w_hat = ql_or_w.dequantize() if isinstance(ql_or_w, QuantizedLinear) else ql_or_w
    return A.output_error(w, w_hat, x)


def check_format(ql: QuantizedLinear, bits: int, sparse: bool):
    qmax = (1 << bits) - 1
    assert ql.codes.dtype == np.uint8 and ql.codes.max() <= qmax
    assert ql.scales.shape == ql.mins.shape == (N, K // G)
    assert int(ql.scales.min()) >= W_SCALE.min and int(ql.scales.max()) <= W_SCALE.max
    assert int(ql.mins.min()) >= W_MIN.min and int(ql.mins.max()) <= W_MIN.max
    assert np.array_equal(ql.row_scale.astype(np.float16).astype(np.float64), ql.row_scale)
    ref = reference.dequantize_weights(ql.codes, ql.scales, ql.mins, ql.row_scale, G, ql.mask, bits)
    assert torch.equal(ql.dequantize(), torch.from_numpy(ref).to(torch.float32))
    if sparse:
        assert ql.mask is not None
        assert np.all(ql.mask.reshape(N, -1, 4).sum(-1) == 2)
        assert np.all(ql.codes[~ql.mask] == 0)
        assert np.all(ref[~ql.mask] == 0)
        kept, meta = ql.compressed_24()
        codes2, mask2 = reference.expand_24(kept, meta)
        assert np.array_equal(codes2, ql.codes) and np.array_equal(mask2, ql.mask)
    else:
        assert ql.mask is None


@pytest.mark.parametrize("bits", [2, 4])
def test_rtn_without_clipping_is_the_reference_rtn(layer, bits):
    w, _, _ = layer
    ql = A.rtn(w, cfg(bits=bits, method="rtn"))
    codes, s_hat, m_hat, row_scale = reference.quantize_weights_rtn(w.numpy(), G, bits)
    assert np.array_equal(ql.codes, codes)
    assert np.array_equal(ql.scales.astype(np.int64), s_hat)
    assert np.array_equal(ql.mins.astype(np.int64), m_hat)
    assert np.array_equal(ql.row_scale, row_scale)


@pytest.mark.parametrize("bits", [2, 4])
def test_rtn_with_clipping_emits_nearest_codes(layer, bits):
    w, _, h = layer
    ql = A.rtn(w, cfg(bits=bits, method="rtn", clip_search=True), h_diag=torch.diagonal(h))
    check_format(ql, bits, sparse=False)
    assert np.array_equal(ql.codes, reference.nearest_codes(w.numpy(), ql.row_scale, ql.scales, ql.mins, G, bits))


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_is_valid_and_beats_rtn_on_the_same_grid_settings(layer, bits, clip, act_order):
    w, x, h = layer
    c = cfg(bits=bits, clip_search=clip, act_order=act_order)
    q = A.gptq(w, h, c)
    check_format(q, bits, sparse=False)
    r = A.rtn(w, replace(c, method="rtn"), h_diag=torch.diagonal(h))
    assert err(w, q, x) < err(w, r, x)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_clipping_search_beats_min_max(layer, method):
    w, x, h = layer
    without = A.quantize_linear(w, h, None, cfg(method=method, clip_search=False), None)
    with_clip = A.quantize_linear(w, h, None, cfg(method=method, clip_search=True), None)
    assert err(w, with_clip, x) < 0.8 * err(w, without, x)


@pytest.mark.parametrize("clip", [False, True])
def test_act_order_keeps_original_column_order_and_contiguous_groups(layer, clip):
    # With a diagonal Hessian there is no error to feed forward, so GPTQ must round every weight to
    # the nearest point of its contiguous group's grid: exactly RTN, whatever the processing order.
    w, x, _ = layer
    d = torch.exp(torch.linspace(-2, 2, K, dtype=F64))[torch.randperm(K, generator=torch.Generator().manual_seed(1))]
    h = torch.diag(d)
    c = cfg(clip_search=clip, act_order=True, damp_percent=0.0)
    q = A.gptq(w, h, c)
    r = A.rtn(w, replace(c, method="rtn"), h_diag=d)
    assert np.array_equal(q.codes, r.codes)
    assert np.array_equal(q.scales, r.scales) and np.array_equal(q.mins, r.mins)
    assert np.array_equal(q.row_scale, r.row_scale)
    # and on the correlated layer the act-order result approximates W column by column
    _, _, hc = layer
    qa = A.gptq(w, hc, replace(c, damp_percent=0.01))
    col_err = (qa.dequantize().to(F64) - w).abs().mean(0)
    assert torch.all(col_err < 0.5 * w.abs().mean(0) + 0.05)


def test_dead_inputs_are_handled(layer):
    w, x, _ = layer
    x = x.clone()
    x[:, [5, 40, 41]] = 0.0
    h = A.hessian(x)
    assert torch.all(torch.diagonal(h)[[5, 40, 41]] == 0)
    for act_order in (False, True):
        q = A.gptq(w, h, cfg(clip_search=True, act_order=act_order))
        check_format(q, 2, sparse=False)
        assert err(w, q, x) < err(w, A.rtn(w, cfg(method="rtn", clip_search=True)), x)


def test_sparsegpt_beats_magnitude_pruning(layer):
    w, x, h = layer
    w_p, mask = A.sparsegpt(w, h, Prune())
    mk = mask.numpy()
    assert np.all(mk.reshape(N, -1, 4).sum(-1) == 2)
    assert torch.all(w_p[~mask] == 0)
    mag = w * A.magnitude_24(w)
    assert err(w, w_p, x) < 0.7 * err(w, mag, x)


def test_sparsegpt_joint_quantizes_the_kept_weights(layer):
    w, x, h = layer
    c = cfg(clip_search=True)
    ql, mask = A.sparsegpt(w, h, Prune(), c)
    check_format(ql, 2, sparse=True)
    assert np.array_equal(ql.mask, mask.numpy())
    # better than choosing the mask by magnitude and then rounding the kept weights
    mag = A.rtn(w, replace(c, method="rtn"), mask=A.magnitude_24(w), h_diag=torch.diagonal(h))
    check_format(mag, 2, sparse=True)
    assert err(w, ql, x) < err(w, mag, x)


def test_wanda_scores_weight_times_input_norm(layer):
    w, x, _ = layer
    xn = x.norm(dim=0)
    mask = A.wanda(w, xn, Prune(method="wanda")).numpy()
    score = (w.abs() * xn[None, :]).numpy()
    expect = np.zeros_like(mask)
    for r in range(N):
        for q in range(K // 4):
            top = np.argsort(-score[r, 4 * q : 4 * q + 4], kind="stable")[:2]
            expect[r, 4 * q + top] = True
    assert np.array_equal(mask, expect)
    # the input norms matter: it is not the magnitude mask on this layer
    assert not np.array_equal(mask, A.magnitude_24(w).numpy())


def test_gptq_with_a_fixed_mask_keeps_pruned_zero_and_compensates(layer):
    w, x, h = layer
    mask = A.wanda(w, x.norm(dim=0), Prune(method="wanda"))
    c = cfg(clip_search=True, act_order=True)
    q = A.gptq(w, h, c, mask=mask)
    check_format(q, 2, sparse=True)
    assert np.array_equal(q.mask, mask.numpy())
    r = A.rtn(w, replace(c, method="rtn"), mask=mask, h_diag=torch.diagonal(h))
    assert err(w, q, x) < err(w, r, x)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("prune", [None, "sparsegpt", "wanda"])
def test_dispatcher(layer, method, prune):
    w, x, h = layer
    p = None if prune is None else Prune(method=prune)
    bias = torch.arange(N, dtype=torch.float32)
    ql = A.quantize_linear(w, h, x.norm(dim=0), cfg(method=method, clip_search=True), p, bias=bias)
    check_format(ql, 2, sparse=p is not None)
    assert np.array_equal(ql.bias, bias.numpy())
    assert err(w, ql, x) < 0.5


def test_rtn_needs_no_hessian(layer):
    w, _, _ = layer
    check_format(A.quantize_linear(w, None, None, cfg(method="rtn", clip_search=True)), 2, sparse=False)


def test_bad_inputs_raise_clear_errors(layer):
    w, x, h = layer
    with pytest.raises(FormatError, match="group size 48 does not divide the input dimension 128"):
        A.rtn(w, cfg(group_size=48))
    with pytest.raises(FormatError, match="group size 48"):
        A.gptq(w, h, cfg(group_size=48))
    bad = A.magnitude_24(w).clone()
    bad[2, 8] = ~bad[2, 8]
    with pytest.raises(FormatError, match="row 2, inputs 8..11 keep"):
        A.gptq(w, h, cfg(), mask=bad)
    with pytest.raises(FormatError, match="mask shape"):
        A.rtn(w, cfg(), mask=A.magnitude_24(w)[:, :64])
    with pytest.raises(ValueError, match="Hessian shape"):
        A.gptq(w, h[:64, :64], cfg())
    with pytest.raises(ValueError, match="needs the input Hessian"):
        A.quantize_linear(w, None, None, cfg(method="gptq"))
    with pytest.raises(ValueError, match="x_norm has 64 entries"):
        A.wanda(w, x.norm(dim=0)[:64], Prune(method="wanda"))
    with pytest.raises(ValueError, match="not positive definite"):
        A.gptq(w, torch.zeros(K, K, dtype=F64) - torch.eye(K, dtype=F64), cfg())
    with pytest.raises(FormatError, match="weight bits 3"):
        A.rtn(w, replace(cfg(), bits=3))


def test_quantized_linear_validation(layer):
    w, _, _ = layer
    ok = A.rtn(w, cfg(method="rtn"))
    f = ok.to_numpy()
    base = dict(codes=f["codes"], scales=f["scales"], mins=f["mins"], row_scale=f["row_scale"], group_size=G, bits=2)
    QuantizedLinear(**base)
    with pytest.raises(FormatError, match="weight codes"):
        QuantizedLinear(**{**base, "codes": f["codes"].astype(np.int64) + 4})
    with pytest.raises(FormatError, match="group scales"):
        QuantizedLinear(**{**base, "scales": f["scales"].astype(np.int64) + 256})
    with pytest.raises(FormatError, match="group mins"):
        QuantizedLinear(**{**base, "mins": f["mins"].astype(np.int64) - 200})
    with pytest.raises(FormatError, match="not exactly representable in float16"):
        QuantizedLinear(**{**base, "row_scale": f["row_scale"].astype(np.float64) * (1 + 1e-6)})
    with pytest.raises(FormatError, match="row_scale shape"):
        QuantizedLinear(**{**base, "row_scale": f["row_scale"][:5]})
    mask = A.magnitude_24(w).numpy()
    with pytest.raises(FormatError, match="pruned positions"):
        QuantizedLinear(**{**base, "codes": np.full_like(f["codes"], 1), "mask": mask})
    with pytest.raises(FormatError, match="not exactly 2"):
        QuantizedLinear(**{**base, "codes": np.zeros_like(f["codes"]), "mask": np.ones_like(mask)})
    # torch inputs are accepted and stored as numpy in the storage dtypes
    t = QuantizedLinear(**{k: torch.as_tensor(v.astype(np.int64)) if k in ("codes", "scales", "mins") else v
                           for k, v in base.items()})
    assert t.codes.dtype == np.uint8 and t.scales.dtype == np.uint8 and t.mins.dtype == np.int8
    assert torch.equal(t.dequantize(), ok.dequantize())


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_lazy_block_updates_are_exact(layer, clip, act_order):
    # blocks of 8 columns (groups of 32 span four blocks) must give the one-block result
    w, x, h = layer
    c = cfg(clip_search=clip, act_order=act_order)
    one = A.gptq(w, h, replace(c, block_size=K))
    many = A.gptq(w, h, replace(c, block_size=8))
    assert np.mean(one.codes != many.codes) < 0.005
    assert err(w, many, x) == pytest.approx(err(w, one, x), rel=0.01)
    w_p1, m1 = A.sparsegpt(w, h, Prune(block_size=K))
    w_p8, m8 = A.sparsegpt(w, h, Prune(block_size=8))
    assert torch.equal(m1, m8) and torch.allclose(w_p1, w_p8, atol=1e-5)


@pytest.mark.parametrize("sparse", [False, True])
def test_fake_quant_round_trips_and_exports_what_it_computes(layer, sparse):
    w, x, h = layer
    p = Prune(method="wanda") if sparse else None
    ql = A.quantize_linear(w, h, x.norm(dim=0), cfg(clip_search=True), p, bias=torch.ones(N))
    fq = A.FakeQuantLinear(ql, train_row_scale=True, tune_codes=True)
    assert torch.allclose(fq.weight().double(), ql.dequantize().double(), rtol=1e-6, atol=0)
    back = fq.to_quantized()
    for f in ("codes", "scales", "mins", "row_scale", "mask", "bias"):
        a, b = getattr(back, f), getattr(ql, f)
        assert (a is None and b is None) or np.array_equal(a, b), f
    # gradients reach every parameter through the straight-through rounding
    y = fq(x.float()[:64]).square().sum()
    y.backward()
    for name, prm in fq.named_parameters():
        assert prm.grad is not None and prm.grad.abs().sum() > 0, name
    # move the parameters off the integers: the export is still valid and equals the forward weight
    with torch.no_grad():
        fq.s.add_(torch.linspace(-3.4, 3.4, fq.s.numel()).reshape(fq.s.shape))
        fq.m.sub_(0.7)
        fq.log_row_scale.add_(0.013)
        fq.u.add_(torch.linspace(-0.9, 0.9, fq.u.numel()).reshape(fq.u.shape))
    moved = fq.to_quantized()
    check_format(moved, 2, sparse=sparse)
    assert not np.array_equal(moved.scales, ql.scales) and not np.array_equal(moved.codes, ql.codes)
    assert torch.allclose(moved.dequantize().double(), fq.weight().detach().double(), rtol=1e-6, atol=1e-12)


def test_reconstruct_linear_lowers_the_output_error(layer):
    w, x, h = layer
    ql = A.rtn(w, cfg(method="rtn", clip_search=True), h_diag=torch.diagonal(h))
    y = (x @ w.T).float()
    out = A.reconstruct_linear(ql, x.float(), y, steps=40, lr=0.05)
    check_format(out, 2, sparse=False)
    assert err(w, out, x) < 0.99 * err(w, ql, x)  # measured 0.978x; returns the start if no better


# ---------------------------------------------------------------------------------------------------
# static key smoothing
# ---------------------------------------------------------------------------------------------------
def _heads_scores(x, wq, wk, n_heads, n_kv, d):
    """q·k per query head after RoPE, as quant.model's attention computes them (float64)."""
    from quant.model import rotate

    t = x.shape[0]
    q = (x @ wq.T).view(t, n_heads, d).transpose(0, 1)
    k = (x @ wk.T).view(t, n_kv, d).transpose(0, 1).repeat_interleave(n_heads // n_kv, dim=0)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=F64) / d))
    fr = torch.arange(t, dtype=F64)[:, None] * inv
    emb = torch.cat([fr, fr], -1)
    cos, sin = emb.cos(), emb.sin()
    return rotate(q, cos, sin) @ rotate(k, cos, sin).transpose(-1, -2)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_key_smoothing_fold_leaves_rotated_scores_unchanged_and_flattens_keys(alpha):
    g = torch.Generator().manual_seed(1)
    n_heads, n_kv, d, hid, t = 4, 2, 8, 16, 40
    x = torch.randn(t, hid, generator=g, dtype=F64)
    wq = torch.randn(n_heads * d, hid, generator=g, dtype=F64)
    wk = torch.randn(n_kv * d, hid, generator=g, dtype=F64)
    wk[3] *= 30.0  # an outlier key channel (pair 3 of KV head 0)
    pq, pk = A.PairMax(n_heads, d), A.PairMax(n_kv, d)
    pq(None, None, x @ wq.T)
    pk(None, None, x @ wk.T)
    f = A.key_smoothing_factors(pq.max, pk.max, alpha)
    assert f.shape == (n_kv, d) and torch.equal(f[:, : d // 2], f[:, d // 2:])  # one factor per RoPE pair
    wq2, wk2 = A.fold_key_smoothing(wq, wk, f)
    s0 = _heads_scores(x, wq, wk, n_heads, n_kv, d)
    s1 = _heads_scores(x, wq2, wk2, n_heads, n_kv, d)
    assert torch.allclose(s0, s1, rtol=1e-10, atol=1e-9)
    pk2 = A.PairMax(n_kv, d)
    pk2(None, None, x @ wk2.T)
    if alpha == 1.0:  # every key pair's maximum becomes 1
        assert torch.allclose(pk2.max, torch.ones_like(pk2.max))
    if alpha == 0.0:  # keys divided by 1/q_max: the key outlier stays
        assert float(pk2.max[0].amax() / pk2.max[0].median()) > 5
    else:
        spread = lambda m: float(m[0].amax() / m[0].median())  # noqa: E731
        assert spread(pk2.max) < spread(pk.max) / 3


def test_key_smoothing_refuses_bad_shapes():
    with pytest.raises(ValueError, match="GQA"):
        A.key_smoothing_factors(torch.ones(3, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match="alpha"):
        A.key_smoothing_factors(torch.ones(4, 4), torch.ones(2, 4), 1.5)
    with pytest.raises(ValueError, match="odd"):
        A.PairMax(2, 7)
