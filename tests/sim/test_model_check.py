"""The proof (issue 12): a tiny quantized Llama generates, on the accelerator's Verilog under Verilator,
the same tokens as the numpy golden model, the torch integer path and the machine model — prefill and
decode, past the Λ window — and a difference is named by step, layer, operation and element."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hw"))

from compile_models import build_artifact, integer_model, prompt_ids  # noqa: E402

from accllm.config import load_hw  # noqa: E402
from hw.compile import compile_generation  # noqa: E402
from quant.artifact import load_artifact  # noqa: E402
from sim.accel_sim import run_accelerator  # noqa: E402
from sim.model_check import compare_traces, golden_run, simulate_model  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # one Verilator build of the accelerator (minutes), shared by these tests
CFG = load_hw("ci-small")
BUILD = REPO / "build" / "sim"  # the accelerator's Verilator build is cached here across tests and runs


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return build_artifact(tmp_path_factory.mktemp("model"))


def test_rtl_generates_the_golden_tokens_past_the_window(art):
    model, spec = integer_model(art, 2, 6)
    _, tok = load_artifact(art)
    prompt = prompt_ids(6, seed=3)
    res = simulate_model(art, CFG.engine, CFG.accelerator, "verilator", prompt_ids=prompt, tokens=12,
                         model=model, tokenizer=tok, build_dir=BUILD, progress=False)
    assert res["first_mismatch"] is None, res["first_mismatch"]
    assert res["bit_exact"]
    assert res["tokens_rtl"] == res["tokens_reference"] == res["tokens_torch_integer"] == res["tokens_machine"]
    assert len(res["tokens_rtl"]) == 12 and len(prompt) + 12 > 2 * (2 + 6)  # the ring wraps twice past S + W = 8
    assert res["tokens_rtl"] == golden_run(spec, prompt, 12)[0]
    assert len(res["cycles_per_token"]) == 11 and min(res["cycles_per_token"]) > 0 and res["cycles_prefill"] > 0
    assert res["hbm_bytes_per_token"] > 0


def test_a_difference_on_the_rtl_is_named_by_layer_operation_and_element(art, tmp_path):
    """The RTL runs on an image whose layer-1 down_proj weights were altered after compilation; the
    first traced difference is that layer's down_proj accumulators, found in the RTL's own memory."""
    model, spec = integer_model(art, 2, 6)
    prompt = prompt_ids(3, seed=4)
    compiled = compile_generation(spec, CFG.engine, CFG.accelerator, prompt, 2, trace="all")
    lo, words = compiled.regions["layer1.down_proj.weight"]
    wb = CFG.accelerator.mem_word_bits // 8
    image = compiled.image.copy()
    image[lo * wb:(lo + words) * wb] ^= 0x11  # every code of the layer's weight beats changes
    rtl = run_accelerator(CFG.engine, CFG.accelerator, image, simulator="verilator",
                          run_dir=BUILD / "model" / f"planted-{os.getpid()}")
    assert rtl.error == 0
    _, ref = golden_run(spec, prompt, 2)
    bad = compare_traces(ref, compiled.read_trace(rtl.mem))
    assert bad is not None and bad.startswith("prefill/layer1.mlp.down_proj.acc["), bad
    # the same run on the genuine image is clean
    clean = run_accelerator(CFG.engine, CFG.accelerator, compiled.image, simulator="verilator",
                            run_dir=BUILD / "model" / f"clean-{os.getpid()}")
    assert compare_traces(ref, compiled.read_trace(clean.mem)) is None


def test_cli_simulate_model_json(art):
    exe = Path(sys.executable).parent / "accllm"
    r = subprocess.run([str(exe), "simulate", "model", str(art), "--hw", "ci-small", "--prompt", "It is a truth",
                        "--tokens", "2", "--build-dir", str(BUILD), "--json"],
                       capture_output=True, text=True, timeout=1800, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert {"bit_exact", "tokens_rtl", "tokens_reference", "tokens_torch_integer", "cycles_prefill",
            "cycles_per_token", "hbm_bytes_per_token"} <= set(res)
    assert res["bit_exact"] and res["tokens_rtl"] == res["tokens_reference"] == res["tokens_torch_integer"]
    assert isinstance(res["cycles_per_token"], list) and all(isinstance(c, int) for c in res["cycles_per_token"])


def test_cli_refuses_a_model_the_engine_cannot_run(art, tmp_path):
    hw = tmp_path / "narrow.yaml"
    hw.write_text("engine:\n  pe_rows: 4\n  pe_lanes: 8\n  max_head_dim: 8\n  max_reduction_len: 4096\n")
    exe = Path(sys.executable).parent / "accllm"
    r = subprocess.run([str(exe), "simulate", "model", str(art), "--hw", str(hw), "--prompt", "It is",
                        "--tokens", "1", "--build-dir", str(tmp_path / "b")],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode != 0
    assert "head_dim" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "b" / "model").exists() or not any((tmp_path / "b" / "model").iterdir())


def test_golden_run_matches_prefill_then_decode(art):
    _, spec = integer_model(art, 0, None)
    toks, tr = golden_run(spec, [1, 2, 3], 3)
    assert len(toks) == 3 and "prefill/layer0.out" in tr and "step2/logits" in tr and "step3/logits" not in tr
    assert np.asarray(tr["prefill/layer0.out"]).shape[0] == 3
