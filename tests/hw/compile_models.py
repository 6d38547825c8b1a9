"""Tiny quantized Llama artifacts for the compiler and machine tests (built once per session, the way
tests/quant/test_integer.py builds its integer artifacts: make_tiny_llama + quantize_model with rtn, the
lm_head as a W4 linear), and the golden per-step traces the compiled program's traces are held to."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "quant"))  # tiny_llama

from quant import golden as G  # noqa: E402
from quant import reference as R  # noqa: E402


def build_artifact(folder: Path, recipe: str = "rtn-w2a8kv4") -> Path:
    from tiny_llama import make_tiny_llama

    from accllm.config import load_recipe
    from quant.pipeline import quantize_model
    from quant.recipe import QuantizeWeights

    make_tiny_llama(folder / "m", tie=True, n_kv=2)
    rec = load_recipe(recipe)
    qw = rec.get(QuantizeWeights)
    qw.method, qw.clip_search = "rtn", False
    qw.overrides = {**qw.overrides, "lm_head": 4}
    quantize_model(str(folder / "m"), rec, folder / "a", calib_samples=4, seq_len=64, progress=False)
    return folder / "a"


def integer_model(art: Path, sinks: int, window: int | None):
    """(torch model on its integer path, golden Spec) for a Λ setting (window None: full attention)."""
    from quant.artifact import load_artifact

    model, _ = load_artifact(art)
    if model.embed_q is None:
        model.embed_q = R.quantize_embedding(model.embed_tokens.detach().numpy())
    model.numerics.sinks, model.numerics.window = sinks, window
    model.numerics.integer_path = True
    return model, model.integer_spec()


#: greedy tokens and every step's golden trace under the compiler's step prefixes
golden_traces = G.generate_traced


def prompt_ids(n: int, seed: int = 1, vocab: int = 300) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, vocab, n)]
