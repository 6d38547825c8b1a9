"""The quantized embedding and lm_head in the artifact: recipe fields, storage, loading, the whole-model
size figures of report.json, and recipes the engine cannot run refused before any work."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from accllm.config import ConfigError, from_data, load_recipe
from quant import formats, reference
from quant.artifact import (EMBED, float_parameter_count, load_artifact, pack_linear, unpack_embedding,
                            unpack_linear)
from quant.errors import QuantError
from quant.pipeline import check_recipe, quantize_model
from quant.recipe import QuantizeEmbedding, QuantizeWeights, Recipe
from tiny_llama import make_tiny_llama

pytestmark = pytest.mark.model
CAL = dict(calib_samples=2, seq_len=64, progress=False)


def _read(out):
    with safe_open(str(out / "model.safetensors"), framework="np") as h:
        return {k: h.get_tensor(k) for k in h.keys()}, h.metadata()


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def quantized(request, tmp_path_factory):
    """A tiny random Llama through the built-in w2a8kv4 recipe (lm_head W4, embedding int8)."""
    d = tmp_path_factory.mktemp("src")
    hf = make_tiny_llama(d, tie=request.param, n_kv=2)
    out = tmp_path_factory.mktemp("a") / "w2a8kv4"
    rep = quantize_model(str(d), load_recipe("w2a8kv4"), out, **CAL)
    return hf, out, rep


def test_builtin_w2a8kv4_recipes_quantize_lm_head_and_embedding():
    for name in ("w2a8kv4", "w2a8kv4-recon", "w2a8kv4-sparse24", "w2a8kv4-sparse24-recon", "rtn-w2a8kv4"):
        rec = load_recipe(name)
        assert rec.get(QuantizeWeights).overrides == {"lm_head": 4}, name
        assert rec.get(QuantizeEmbedding) == QuantizeEmbedding(bits=8), name
    assert load_recipe("fp16").get(QuantizeEmbedding) is None


def test_embedding_stored_as_int8_codes_and_row_scales(quantized):
    hf, out, rep = quantized
    t, md = _read(out)
    v, h = hf.config.vocab_size, hf.config.hidden_size
    assert f"{EMBED}.weight" not in t and "lm_head.weight" not in t  # no float copy of either
    assert t[f"{EMBED}.qweight"].dtype == np.int8 and t[f"{EMBED}.qweight"].shape == (v, h)
    assert t[f"{EMBED}.row_scale"].dtype == np.float16 and t[f"{EMBED}.row_scale"].shape == (v,)
    assert json.loads(md["accllm.embedding"]) == {"vocab": v, "hidden": h, "bits": 8}
    # the codes are the reference's quantization of the checkpoint's float table
    codes, rs = reference.quantize_embedding(hf.model.embed_tokens.weight.detach().double().numpy())
    assert np.array_equal(t[f"{EMBED}.qweight"], codes)
    assert np.array_equal(t[f"{EMBED}.row_scale"].astype(np.float64), rs)
    lin = json.loads(md["accllm.linears"])
    assert lin["lm_head"] == {"in": h, "out": v, "bits": 4, "group_size": 64, "sparse": False}
    assert rep["embedding_bits"] == 8 and rep["lm_head_bits"] == 4 and rep["quantized_linears"] == 15


def test_load_gives_dequantized_table_and_integer_fields(quantized):
    hf, out, _ = quantized
    t, md = _read(out)
    model, _ = load_artifact(out)
    codes, rs = model.embed_q
    assert codes.dtype == np.int8 and rs.dtype == np.float64
    assert np.array_equal(codes, t[f"{EMBED}.qweight"])
    assert np.array_equal(rs, t[f"{EMBED}.row_scale"].astype(np.float64))
    want = torch.from_numpy(reference.dequantize_embedding(codes, rs)).to(torch.float32)
    assert torch.equal(model.embed_tokens.data, want)  # the float route looks up the stored table
    # the lm_head is a W4 QLinear whose fields re-pack to exactly the stored bytes
    assert model.lm_head is not None and model.lm_head.q.bits == 4
    again, _ = pack_linear("lm_head", model.lm_head.q)
    for k, v in again.items():
        assert np.array_equal(v, t[k]), k
    with torch.no_grad():
        logits = model(torch.arange(12)[None])
    assert torch.isfinite(logits).all()


def test_report_whole_model_figures(quantized):
    hf, out, rep = quantized
    t, md = _read(out)
    cfg = hf.config
    n_params = sum(p.numel() for p in hf.parameters())  # tied: the shared matrix counted once
    assert rep["float_parameters"] == float_parameter_count(cfg) == n_params
    stored = sum(a.nbytes for a in t.values())
    assert rep["stored_tensor_bytes"] == stored
    assert rep["bits_per_parameter"] == pytest.approx(8 * stored / n_params)
    # bytes per decoded token, recounted from the file: every packed linear (lm_head included), one
    # embedding row (H int8 codes + a float16 scale) and the norm vectors
    lin = json.loads(md["accllm.linears"])
    parts = ("qweight", "meta", "scales", "mins", "row_scale")
    linear_bytes = sum(t[f"{n}.{p}"].nbytes for n in lin for p in parts if f"{n}.{p}" in t)
    norms = sum(a.nbytes for k, a in t.items() if "norm" in k)
    assert rep["bytes_per_token_decode"] == linear_bytes + cfg.hidden_size + 2 + norms
    # KV4: per layer and token, K and V of 2 KV heads of D = 16: 16 codes x 4 bits + 4-bit zero + 32-bit range
    assert rep["kv_bytes_per_token_per_layer"] == 2 * 2 * (16 * 4 + 4 + 32) / 8
    # bits_per_weight counts the quantized linears, lm_head included (4-bit: 4 + 16/64 + 16/K)
    assert rep["quantized_weights"] == sum(m["in"] * m["out"] for m in lin.values())
    assert rep["bits_per_weight"] == pytest.approx(8 * linear_bytes / rep["quantized_weights"])


def test_float_embedding_recipe_keeps_the_float_table(tmp_path):
    make_tiny_llama(tmp_path / "src", tie=True)
    rec = load_recipe("rtn-w2a8kv4")
    rec.modifiers = [m for m in rec.modifiers if not isinstance(m, QuantizeEmbedding)]
    rec.get(QuantizeWeights).overrides = {}
    rep = quantize_model(str(tmp_path / "src"), rec, tmp_path / "o", **CAL)
    t, md = _read(tmp_path / "o")
    assert f"{EMBED}.weight" in t and f"{EMBED}.qweight" not in t and "accllm.embedding" not in md
    model, _ = load_artifact(tmp_path / "o")
    assert model.embed_q is None and model.lm_head is None  # tied float head: the float table
    assert rep["embedding_bits"] is None and rep["lm_head_bits"] is None
    # the tied float head reads the whole float32 table each token, plus one row for the lookup
    v, h = 320, 64
    assert rep["bytes_per_token_decode"] - rep["quantized_weight_bytes"] == v * h * 4 + h * 4 + (2 * 2 + 1) * h * 4


def _recipe(*mods):
    return Recipe(name="bad", modifiers=list(mods))


def test_recipes_the_engine_cannot_run_are_refused_by_name(tmp_path):
    make_tiny_llama(tmp_path / "src", tie=True)
    src = str(tmp_path / "src")
    from quant.loading import load_config
    cfg = load_config(tmp_path / "src")
    cases = [
        (_recipe(QuantizeWeights(), QuantizeEmbedding(bits=4)),
         r"QuantizeEmbedding.bits: 4 bits: the embedding lookup runs \[8\]-bit codes"),
        (_recipe(QuantizeWeights(overrides={"lm_head": 3})),
         r"QuantizeWeights.overrides.lm_head: 3 bits: the engine's weight code lanes run \[2, 4\]"),
        (_recipe(QuantizeWeights(bits=3)), r"QuantizeWeights.bits: 3 bits: .* run \[2, 4\]"),
    ]
    for i, (rec, msg) in enumerate(cases):
        with pytest.raises(QuantError, match=msg):
            check_recipe(cfg, rec, src)
        with pytest.raises(QuantError, match=msg):  # and quantize refuses it before writing anything
            quantize_model(src, rec, tmp_path / f"o{i}", **CAL)
        assert not any(p.name.startswith(f"o{i}") or p.name.startswith(f".o{i}.") for p in tmp_path.iterdir())
    # the YAML route names the key path and the valid choices
    with pytest.raises(ConfigError, match=r"recipe.modifiers\[0\].quantize_embedding.bits: 4 is not one of \[8\]"):
        from_data({"recipe": {"name": "x", "modifiers": [{"quantize_embedding": {"bits": 4}}]}})
    with pytest.raises(ConfigError, match=r"overrides.lm_head: 3 bits"):
        from_data({"recipe": {"name": "x", "modifiers": [{"quantize_weights": {"overrides": {"lm_head": 3}}}]}})


def test_embedding_beyond_the_format_refused_before_any_layer(tmp_path):
    hf = make_tiny_llama(tmp_path / "src", tie=False)
    with torch.no_grad():
        hf.model.embed_tokens.weight[7, 3] = 200.0  # |w| >= 127 needs a row scale >= 1
    hf.save_pretrained(str(tmp_path / "src"))
    rec = load_recipe("rtn-w2a8kv4")
    with pytest.raises(QuantError, match=r"quantize_embedding cannot represent .* embedding row 7"):
        quantize_model(str(tmp_path / "src"), rec, tmp_path / "o", **CAL)
    assert not any(p.name.startswith("o") or p.name.startswith(".o.") for p in tmp_path.iterdir())


def _rewrite(out, tensors=None, metadata=None):
    t, md = _read(out)
    t.update(tensors or {})
    md.update(metadata or {})
    md = {k: v for k, v in md.items() if v is not None}
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in t.items()}, str(out / "model.safetensors"),
              metadata=md)


def test_corrupt_embedding_is_refused_on_load(quantized, tmp_path):
    import shutil

    _, out, _ = quantized
    t, md = _read(out)
    cases = [
        ({}, {"accllm.embedding": None}, "lists no accllm.embedding"),
        ({}, {"accllm.embedding": json.dumps({"vocab": 5, "hidden": 64, "bits": 8})}, "does not match config.json"),
        ({}, {"accllm.embedding": json.dumps({"vocab": t[f"{EMBED}.qweight"].shape[0], "hidden": 64, "bits": 4})},
         "stored at 4 bits"),
        ({f"{EMBED}.row_scale": t[f"{EMBED}.row_scale"].astype(np.float32)}, {}, "do not match the header"),
        ({f"{EMBED}.row_scale": np.zeros_like(t[f"{EMBED}.row_scale"])}, {}, "row scale 0.0 at row 0"),
    ]
    for i, (tens, meta, msg) in enumerate(cases):
        bad = tmp_path / f"bad{i}"
        shutil.copytree(out, bad)
        _rewrite(bad, tens, meta)
        with pytest.raises(QuantError, match=msg):
            load_artifact(bad)


def test_unpack_embedding_names_missing_fields():
    with pytest.raises(QuantError, match="incomplete"):
        unpack_embedding({}, {"vocab": 1, "hidden": 1, "bits": 8})


def test_lm_head_round_trip_at_4_bits():
    rng = np.random.default_rng(0)
    n, k, g = 10, 128, 64
    from quant.qlinear import QuantizedLinear

    q = QuantizedLinear(codes=rng.integers(0, 16, (n, k)), scales=rng.integers(0, 256, (n, k // g)),
                        mins=rng.integers(-128, 128, (n, k // g)), row_scale=np.full(n, 0.5), group_size=g, bits=4)
    tens, meta = pack_linear("lm_head", q)
    assert tens["lm_head.qweight"].shape == (n, k // 2)  # two 4-bit codes per byte
    back = unpack_linear("lm_head", tens, meta)
    assert np.array_equal(back.codes, q.codes) and back.bits == 4
    assert dataclasses.asdict(QuantizeEmbedding()) == {"bits": formats.EMBED_CODE.bits}
