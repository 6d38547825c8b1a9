"""Perplexity and greedy generation, for a float checkpoint or an accllm artifact."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .data import eval_windows
from .errors import QuantError
from .loading import load_model


@torch.no_grad()
def perplexity(model, tokenizer, text: str | Path | None, seq_len: int = 512, max_tokens: int | None = None,
               progress: bool = True) -> dict:
    """Perplexity of ``model`` (a quant.model.LlamaLM, numerics as set) over non-overlapping windows.
    ``tokens`` counts the predicted tokens (each window predicts all but its first)."""
    from tqdm import tqdm

    wins, info = eval_windows(tokenizer, text, seq_len, max_tokens)
    nll, count = 0.0, 0
    for w in tqdm(wins, desc="eval", unit="window", disable=not progress):
        logits = model(w[None])[0]
        nll += float(torch.nn.functional.cross_entropy(logits[:-1].to(torch.float64), w[1:], reduction="sum"))
        count += w.numel() - 1
    return {"perplexity": math.exp(nll / count), "tokens": count, "seq_len": seq_len,
            "integer_path": bool(model.numerics.integer_path)}


def _set_integer_path(model, integer_path: bool | None, where: str) -> bool:
    """The integer route (the whole decoder in integers) by default whenever the model can run it; asked
    for explicitly on a model that cannot, a clear error says what is float."""
    why = model.integer_unready() if hasattr(model, "integer_unready") else "not an accllm model"
    if not model.quantized:
        why = "this model has no quantized linear layers"
    if integer_path is None:
        integer_path = why is None
    if integer_path and why:
        raise QuantError(f"{where}: cannot evaluate on the integer path: {why}. Evaluate it with --float-path")
    model.numerics.integer_path = bool(integer_path)
    return bool(integer_path)


def evaluate(model_or_artifact: str, text: str | Path | None, seq_len: int = 512, max_tokens: int | None = None,
             device: str = "cpu", integer_path: bool | None = None, progress: bool = True) -> dict:
    """-> {"perplexity": float, "tokens": int, "seq_len": int, "integer_path": bool}.
    ``integer_path`` defaults to True for an artifact with quantized layers (W×A8), else False."""
    if device != "cpu":
        raise QuantError(f"--device {device}: evaluation runs on cpu only so far")
    model, tok = load_model(model_or_artifact, device)
    _set_integer_path(model, integer_path, str(model_or_artifact))
    return perplexity(model, tok, text, seq_len, max_tokens, progress)


@torch.no_grad()
def generate_ids(model, prompt_ids: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
    """Greedy decoding through the KV cache (a fixed ring of S + W slots under Λ attention)."""
    cache = model.new_cache()
    logits = None
    for n, tid in enumerate(prompt_ids):
        logits = model.step(int(tid), n, cache)
    out: list[int] = []
    n = len(prompt_ids)
    for _ in range(max_new_tokens):
        nxt = int(torch.argmax(logits))
        if eos is not None and nxt == eos:
            break
        out.append(nxt)
        logits = model.step(nxt, n, cache)
        n += 1
    return out


def generate(model_or_artifact: str, prompt: str, max_new_tokens: int = 32, device: str = "cpu") -> str:
    """Greedy continuation of ``prompt`` (the new text only, without the prompt)."""
    if device != "cpu":
        raise QuantError(f"--device {device}: generation runs on cpu only so far")
    if max_new_tokens < 0:
        raise QuantError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    model, tok = load_model(model_or_artifact, device)
    _set_integer_path(model, None, str(model_or_artifact))
    ids = tok(prompt, add_special_tokens=True)["input_ids"]
    if not ids:
        raise QuantError("--prompt is empty after tokenization; give some text")
    new = generate_ids(model, ids, max_new_tokens, tok.eos_token_id)
    return tok.decode(new, skip_special_tokens=True)
