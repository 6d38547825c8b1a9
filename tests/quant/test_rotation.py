"""The residual-stream rotation (and the V/O head rotation) folded into the weights (quant/rotation.py): the
float model computes the same logits after it (and a rotation on the wrong side, a norm left unfolded or a
head block unrotated does not: planted below), the rotated-then-quantized artifact runs bit-exact on the
integer path (golden numpy == torch twin, one-token steps == the prompt batch), and an order or a shape the
rotation cannot run is refused by name with nothing written."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from accllm.config import ConfigError, from_data, load_recipe
from quant import rotation as ROT
from quant.artifact import load_artifact
from quant.errors import QuantError
from quant.loading import WeightStore, load_config
from quant.model import LlamaLM
from quant.pipeline import quantize_model
from quant.recipe import QuantizeWeights, Recipe, Rotate
from test_integer import assert_integer_route_exact
from tiny_llama import make_tiny_llama

IDS = torch.from_numpy(np.random.default_rng(3).integers(0, 300, (2, 40)))
TOL = 1e-4  # of the logits' largest magnitude: float32 weights rotated in float64, float32 forward


def _tiny(folder, **kw):
    """A tiny Llama whose norms have weights far from 1 (some negative), so that folding them matters."""
    model = make_tiny_llama(folder, **kw)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.6 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module", params=[dict(tie=True, n_kv=2), dict(tie=False, n_kv=1, seed=1)],
                ids=["tied-gqa2", "untied-gqa1"])
def tiny(request, tmp_path_factory):
    return _tiny(tmp_path_factory.mktemp("rot"), **request.param)


def _gap(src, kind="hadamard", vo=True, residual=True) -> float:
    """max |logits(rotated) − logits(float)| over max |logits(float)|, both models in float."""
    cfg = load_config(src)
    store = WeightStore(src, cfg)
    want = LlamaLM.from_store(cfg, store).eval()(IDS)
    got = LlamaLM.from_store(cfg, ROT.rotated_store(store, cfg, kind, 0, vo, residual)).eval()(IDS)
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 64, 72, 576, 1024])
def test_hadamard_matrices(n):
    h = ROT.hadamard(n).astype(np.int64)
    assert set(np.unique(h)) <= {-1, 1}
    assert np.array_equal(h @ h.T, n * np.eye(n, dtype=np.int64))


def test_orders_without_a_construction_are_none_and_named():
    assert ROT.hadamard(6) is None and ROT.hadamard(92) is None
    cfg = SimpleNamespace(hidden_size=92, num_attention_heads=2, head_dim=46)
    probs = ROT.check(cfg, "hadamard", True)
    assert len(probs) == 2 and "order 92 (hidden_size)" in probs[0] and "order 46 (head_dim)" in probs[1]
    assert "kind: orthogonal" in probs[0]
    assert ROT.check(cfg, "orthogonal", True) == []


@pytest.mark.parametrize("kind", ["hadamard", "orthogonal"])
def test_rotations_are_orthogonal_and_seeded(kind):
    q = ROT.orthogonal(64, kind, 0)
    assert torch.allclose(q @ q.T, torch.eye(64, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, ROT.orthogonal(64, kind, 0)) and not torch.equal(q, ROT.orthogonal(64, kind, 1))
    assert (q - torch.eye(64, dtype=torch.float64)).abs().max() > 0.1  # not the identity


@pytest.mark.parametrize("kind,vo", [("hadamard", False), ("hadamard", True), ("orthogonal", True)])
def test_rotated_float_model_gives_the_same_logits(tiny, kind, vo):
    assert _gap(tiny, kind, vo) < TOL
    cfg = load_config(tiny)
    store = WeightStore(tiny, cfg)
    rs = ROT.rotated_store(store, cfg, kind, 0, vo)
    e0, e1 = store.get(ROT.EMBED_W), rs.get(ROT.EMBED_W)
    assert (e1 - e0).abs().max() > 0.1 * e0.abs().max()  # the weights really changed
    assert torch.equal(rs.get("model.norm.weight"), torch.ones_like(store.get("model.norm.weight")))


def test_vo_rotation_alone_keeps_the_logits_and_the_tie(tiny, tmp_path):
    assert _gap(tiny, "hadamard", True, residual=False) < TOL
    cfg = load_config(tiny)
    store = WeightStore(tiny, cfg)
    rs = ROT.rotated_store(store, cfg, "hadamard", 0, True, residual=False)
    assert torch.equal(rs.get(ROT.EMBED_W), store.get(ROT.EMBED_W))
    v = "model.layers.0.self_attn.v_proj.weight"
    assert (rs.get(v) - store.get(v)).abs().max() > 0.1 * store.get(v).abs().max()
    quantize_model(str(tiny), Recipe(name="vo", modifiers=[Rotate(vo=True, residual=False)]), tmp_path / "a",
                   progress=False)
    assert load_config(tmp_path / "a").tie_word_embeddings == cfg.tie_word_embeddings
    with pytest.raises(ConfigError, match="rotate nothing"):
        from_data({"recipe": {"name": "t", "modifiers": [{"rotate": {"vo": False, "residual": False}}]}}, "test")


def test_identity_kind_folds_the_norms_only(tiny, monkeypatch):
    """kind: identity (a diagnostic): the norms' weights folded into the linears, nothing rotated."""
    assert _gap(tiny, "identity", False) < TOL
    cfg = load_config(tiny)
    store = WeightStore(tiny, cfg)
    rs = ROT.rotated_store(store, cfg, "identity", 0, False)
    assert torch.equal(rs.get(ROT.EMBED_W), store.get(ROT.EMBED_W).to(torch.float32))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(rs.get(q), store.get(q) * store.get("model.layers.0.input_layernorm.weight")[None, :])
    assert ROT.check(SimpleNamespace(hidden_size=92, num_attention_heads=2), "identity", False) == []
    monkeypatch.setattr(ROT, "fold_in", lambda w, g, q: w @ q)  # planted: the norm weight not folded
    assert _gap(tiny, "identity", False) > 100 * TOL


def _wrong_v(w, h, hd):
    return (h[None] @ w.reshape(-1, hd, w.shape[1])).reshape(w.shape)  # H instead of H^T


PLANTS = {  # the bug each check is for: a rotation on the wrong side, a norm weight not folded, ...
    "input linears rotated by Q^T": ("fold_in", lambda w, g, q: (w * g[None, :]) @ q.T),
    "output linears rotated by Q, not Q^T": ("fold_out", lambda w, q: q @ w),
    "norm weight not folded into the linears after it": ("fold_in", lambda w, g, q: w @ q),
    "value heads rotated by H, not H^T": ("rotate_v", _wrong_v),
    "o_proj's head blocks left unrotated": ("rotate_o", lambda w, h, hd: w),
}


@pytest.mark.parametrize("plant", list(PLANTS))
def test_planted_wrong_rotations_change_the_logits(tiny, plant, monkeypatch):
    fn, bad = PLANTS[plant]
    monkeypatch.setattr(ROT, fn, bad)
    assert _gap(tiny, "hadamard", True) > 100 * TOL, f"planted bug ({plant}) went unnoticed"
    if fn in ("rotate_v", "rotate_o"):  # the V/O rotation alone as well
        assert _gap(tiny, "hadamard", True, residual=False) > 100 * TOL, f"planted bug ({plant}) went unnoticed"


def test_rotate_only_artifact_is_the_float_model(tiny, tmp_path):
    """Through the pipeline: the artifact of a recipe that only rotates loads as the same float function,
    with unit norms and its own (untied) lm_head."""
    rec = Recipe(name="rot", modifiers=[Rotate(vo=True)])
    quantize_model(str(tiny), rec, tmp_path / "a", progress=False)
    art, _ = load_artifact(tmp_path / "a")
    cfg = load_config(tiny)
    want = LlamaLM.from_store(cfg, WeightStore(tiny, cfg)).eval()(IDS)
    assert float((art(IDS) - want).abs().max() / want.abs().max()) < TOL
    assert load_config(tmp_path / "a").tie_word_embeddings is False and art.lm_head is not None
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "a" / "model.safetensors"))
    norms = [k for k in stored if k.endswith("norm.weight")]
    assert len(norms) == 2 * cfg.num_hidden_layers + 1
    assert all(torch.equal(stored[k], torch.ones_like(stored[k])) for k in norms)


def test_rotated_quantized_artifact_is_bit_exact_on_the_integer_path(tmp_path):
    src = _tiny(tmp_path / "m", tie=True, n_kv=2)
    rec = load_recipe("w2a8kv4-rot")
    qw = rec.get(QuantizeWeights)
    qw.method, qw.clip_search = "rtn", False  # the arithmetic matters here, not the algorithm
    quantize_model(str(src), rec, tmp_path / "a", calib_samples=4, seq_len=64, progress=False)
    model, _ = load_artifact(tmp_path / "a")
    model.numerics.sinks, model.numerics.window = 3, 9
    model.numerics.integer_path = True
    ids = np.random.default_rng(5).integers(0, 300, 30)
    logits, tl, _, _ = assert_integer_route_exact(model, ids)
    assert np.array_equal(tl.numpy(), logits)


def test_rotate_not_first_is_refused_by_name(tiny, tmp_path):
    mods = [{"quantize_activations": {"bits": 8}}, {"rotate": {}}]
    with pytest.raises(ConfigError, match=r"rotate is listed after quantize_activations.*list rotate first"):
        from_data({"recipe": {"name": "t", "modifiers": mods}}, "test")
    rec = Recipe(name="t", modifiers=[load_recipe("w2a8kv4").modifiers[2], Rotate()])
    with pytest.raises(QuantError, match="list rotate first"):
        quantize_model(str(tiny), rec, tmp_path / "o", progress=False)
    assert not any(tmp_path.iterdir())


def test_a_shape_without_a_hadamard_matrix_is_refused(tmp_path):
    src = make_tiny_llama(tmp_path / "m", hidden=92, heads=2, n_kv=1, intermediate=128) and tmp_path / "m"
    with pytest.raises(QuantError, match=r"rotate cannot run .*order 92 \(hidden_size\).*kind: orthogonal"):
        quantize_model(str(src), Recipe(name="t", modifiers=[Rotate()]), tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
    quantize_model(str(src), Recipe(name="t", modifiers=[Rotate(kind="orthogonal")]), tmp_path / "o2",
                   progress=False)
    assert _gap(src, "orthogonal", False) < TOL


@pytest.mark.slow
def test_rotation_keeps_smollm2_logits():
    """SmolLM2-135M (tied, 30 layers, hidden 576 = 8 · 72, head_dim 64): the rotated float model, V/O
    included, gives the same logits as the float model read from the checkpoint."""
    from quant.loading import resolve_source

    try:
        src = resolve_source("smollm2-135m")
    except QuantError:
        pytest.skip("SmolLM2-135M is not on this machine")
    assert _gap(src, "hadamard", True) < TOL
