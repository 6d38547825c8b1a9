"""simulate_model's ``max_cycles`` reaches the RTL's memory model: a whole-model run is stopped by its
cycle budget (SmolLM2 needs far more than run_accelerator's default 50 M; benchmarks/rtl_model.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hw"))

from compile_models import build_artifact, integer_model, prompt_ids  # noqa: E402

from accllm.config import load_hw  # noqa: E402
from quant.artifact import load_artifact  # noqa: E402
from sim.accel_sim import AccelHang  # noqa: E402
from sim.model_check import simulate_model  # noqa: E402


def test_max_cycles_stops_the_rtl(tmp_path):
    cfg = load_hw("ci-small")
    art = build_artifact(tmp_path / "model")
    model, _ = integer_model(art, 2, 6)
    _, tok = load_artifact(art)
    with pytest.raises(AccelHang, match="cycle budget of 3000 cycles exhausted"):
        simulate_model(art, cfg.engine, cfg.accelerator, "amaranth", prompt_ids=prompt_ids(3, seed=1), tokens=2,
                       model=model, tokenizer=tok, build_dir=tmp_path / "sim", progress=False, max_cycles=3000)
