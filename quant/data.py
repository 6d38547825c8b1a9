"""Text -> token windows for calibration and evaluation. No network: the defaults are the
public-domain excerpts shipped in ``quant/data/``."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from .errors import QuantError

DATA = Path(__file__).resolve().parent / "data"
DEFAULT_CALIB = DATA / "calib-sense-and-sensibility.txt"
DEFAULT_EVAL = DATA / "eval-pride-and-prejudice.txt"


def read_text(path: str | Path | None, *, kind: str) -> tuple[str, str]:
    """-> (text, where). ``kind`` is 'calibration' or 'evaluation' (chooses the default)."""
    if path is None or str(path) == "":
        path = DEFAULT_CALIB if kind == "calibration" else DEFAULT_EVAL
    p = Path(path).expanduser()
    if not p.is_file():
        raise QuantError(f"{kind} text {p}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise QuantError(f"{kind} text {p}: not UTF-8 text ({e})") from e
    if not text.strip():
        raise QuantError(f"{kind} text {p}: the file is empty")
    return text, str(p)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D LongTensor of ids (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long, device="cpu")


def calibration_windows(tokenizer, text_path: str | Path | None, n: int, seq_len: int, seed: int = 0
                        ) -> tuple[torch.Tensor, dict]:
    """``n`` disjoint windows of ``seq_len`` tokens chosen at random (numpy Generator(seed)) among the
    text's consecutive chunks. -> (ids (n, seq_len), info). Deterministic for (text, n, seq_len, seed)."""
    if n < 1 or seq_len < 2:
        raise QuantError(f"calibration needs --calib-samples >= 1 and --seq-len >= 2 (got {n}, {seq_len})")
    text, where = read_text(text_path, kind="calibration")
    ids = tokenize(tokenizer, text)
    chunks = ids.numel() // seq_len
    if chunks < n:
        raise QuantError(
            f"calibration text {where} has {ids.numel()} tokens: too short for {n} samples of {seq_len} "
            f"tokens (needs {n * seq_len}). Give a longer --calib-text, or fewer --calib-samples or a "
            f"shorter --seq-len (at most {chunks} samples of {seq_len})")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(chunks, size=n, replace=False))
    win = ids[: chunks * seq_len].view(chunks, seq_len)[torch.from_numpy(pick)]
    return win.contiguous(), {"text": where, "tokens_in_text": int(ids.numel()), "samples": n,
                              "seq_len": seq_len, "seed": seed, "windows": pick.tolist()}


def eval_windows(tokenizer, text_path: str | Path | None, seq_len: int, max_tokens: int | None = None
                 ) -> tuple[list[torch.Tensor], dict]:
    """Consecutive non-overlapping windows of ``seq_len`` tokens over the first ``max_tokens`` tokens
    (None or 0: the whole text; the last window may be shorter, kept if it has >= 2 tokens). Each window
    predicts its tokens 1..len-1. A text with fewer than ``max_tokens`` tokens, or fewer than one window
    of ``seq_len``, is refused (QuantError naming the text, both counts and what to change): a result on
    fewer tokens or a shorter context than asked would be mistaken for the one asked for.
    -> (windows, {"text", "sha256", "tokens_in_text", "tokens"})."""
    if seq_len < 2:
        raise QuantError(f"--seq-len must be >= 2, got {seq_len}")
    if max_tokens is not None and max_tokens != 0 and max_tokens < seq_len:
        raise QuantError(f"--max-tokens {max_tokens} is less than one window of --seq-len {seq_len}: the context "
                         f"asked for would never be evaluated. Give --max-tokens >= {seq_len} (0 = the whole text) "
                         f"or a shorter --seq-len")
    text, where = read_text(text_path, kind="evaluation")
    ids = tokenize(tokenizer, text)
    n_text = int(ids.numel())
    if max_tokens:
        if n_text < max_tokens:
            raise QuantError(f"evaluation text {where} has {n_text} tokens: too short for --max-tokens {max_tokens}. "
                             f"Give a longer --text, or --max-tokens {n_text} or less (0 = the whole text)")
        ids = ids[:max_tokens]
    if ids.numel() < seq_len:
        raise QuantError(f"evaluation text {where} has {n_text} tokens: too short for one window of --seq-len "
                         f"{seq_len}. Give a longer --text or a --seq-len of at most {n_text}")
    wins = [ids[i: i + seq_len] for i in range(0, ids.numel(), seq_len)]
    wins = [w for w in wins if w.numel() >= 2]
    return wins, {"text": where, "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
                  "tokens_in_text": n_text, "tokens": int(ids.numel())}
