"""Tiny random Llama checkpoints (config + safetensors + a byte-level BPE tokenizer) for tests:
built in milliseconds, offline. Dimensions are multiples of 64 so the built-in recipes (group 64) apply."""

from __future__ import annotations

from pathlib import Path

import torch

from quant.data import DEFAULT_CALIB

_TOKENIZER_CACHE: dict[int, object] = {}


def _tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab not in _TOKENIZER_CACHE:
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        tr = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                 special_tokens=["<s>"], show_progress=False)
        tk.train_from_iterator([DEFAULT_CALIB.read_text(encoding="utf-8")[:20000]], trainer=tr)
        _TOKENIZER_CACHE[vocab] = tk
    return PreTrainedTokenizerFast(tokenizer_object=_TOKENIZER_CACHE[vocab], bos_token="<s>", eos_token="<s>")


def make_tiny_llama(folder: str | Path, *, tie: bool = True, n_kv: int = 2, layers: int = 2, hidden: int = 64,
                    intermediate: int = 128, heads: int = 4, vocab: int = 320, seed: int = 0,
                    max_shard_size: str | None = None, **extra):
    """Save a random LlamaForCausalLM + tokenizer into ``folder``; returns the HF model (eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=n_kv,
                      max_position_embeddings=4096, tie_word_embeddings=tie, rope_theta=10000.0,
                      bos_token_id=0, eos_token_id=0, **extra)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the init's 0.02 so the layers matter to the output
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(folder), **kw)
    _tokenizer(vocab).save_pretrained(str(folder))
    return model
