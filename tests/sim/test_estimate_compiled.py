"""sim.estimate through the compiler: the estimate of a tiny Llama given by its config.json shape and its
recipe alone equals the controller's cycle model of the real compiled program (real weights, whole
program: prefill and decode), the prefill's interpolated chunks stay within 1 % of the whole prefill,
the bytes per token are the program's own traffic, and Llama-2-7B on u280 compiles and says what binds."""

import dataclasses
import sys
from pathlib import Path

import pytest

from accllm.config import load_hw, load_recipe
from hw.compile import compile_generation
from hw.controller_model import program_timeline
from hw.isa import Op
from hw.params import AccelParams
from sim import estimate as E

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hw"))
from compile_models import build_artifact, integer_model, prompt_ids  # noqa: E402

CI = load_hw("ci-small")
ACCEL = AccelParams(mem_word_bits=256, spad_words=8192)


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return build_artifact(tmp_path_factory.mktemp("dense"))


def _shape(art, sinks, window):
    m = E.load_model(str(art / "config.json"))
    fmt = E.ArtifactFormat.from_recipe(load_recipe(str(art / "recipe.yaml")))
    return m, dataclasses.replace(fmt, sinks=sinks if window is not None else 0, window=window,
                                  recipe=f"{fmt.recipe} Λ {sinks}+{window}")


def _real(art, sinks, window, prompt, new_tokens):
    """The real compile (weights) of a ``prompt``-token prompt and ``new_tokens`` tokens, its whole
    timeline by the cycle model, and the MARK values' differences: (prefill, [per decode step])."""
    _, spec = integer_model(art, sinks, window)
    c = compile_generation(spec, CI.engine, ACCEL, prompt_ids(prompt, seed=7), new_tokens, trace="none")
    tl = program_timeline(c.program, CI.engine, ACCEL, E.mem_timing(CI.target, ACCEL))
    mark = [tl.marks[word] for _, word in c.marks]
    return c, tl, mark[1] - mark[0], [b - a for a, b in zip(mark[1:], mark[2:])]


@pytest.mark.parametrize("sinks,window,context", [(2, 6, 5), (2, 6, 30), (0, None, 20)])
def test_estimate_equals_the_cycle_model_of_the_real_compiled_program(art, sinks, window, context):
    """Context 5: the Λ cache not yet full; 30: full and wrapped; full attention at 20."""
    m, fmt = _shape(art, sinks, window)
    r = E.estimate(CI.engine, CI.target, m, fmt, context, accel=ACCEL, hw_name="ci-small")
    # decode at context C: the step after a (C - 1)-token prompt, at position C - 1
    c, tl, _, (per_token,) = _real(art, sinks, window, context - 1, 2)
    dec = r["decode"]
    assert dec["cycles_per_token"] == per_token
    assert r["decode_tokens_per_s"] == pytest.approx(CI.target.clock_mhz * 1e6 / per_token, rel=1e-12)
    (_, first, count), = [s for s in c.steps if s[0] == "step1"]
    assert r["hbm_bytes_per_token"] == c.step_bytes()["step1"]
    assert sum(dec["cycles_by_cause"].values()) == sum(dec["cycles_by_op"].values()) == per_token
    assert dec["cycles_by_op"]["ENGINE"] == sum(tl.cycles[i] for i in range(first, first + count)
                                                if c.program[i].op == Op.ENGINE)
    # the prefill: every chunk timed (prompts of at most three chunks) or interpolated (within 1 %); the
    # whole program's prefill also holds its first MARK
    c, tl, prefill, _ = _real(art, sinks, window, context, 1)
    est = r["prefill"]["cycles"] + tl.cycles[0]
    if r["prefill"]["chunks"] <= 3:
        assert est == prefill
    else:
        assert abs(est - prefill) / prefill < 0.01, (est, prefill)
        assert 2 <= len(r["prefill"]["timed_chunks"]) <= 3 < r["prefill"]["chunks"]
        print(f"prefill {context}: estimate {est}, whole program {prefill}, {est / prefill - 1:+.4%}")


def test_estimate_bytes_are_the_programs_traffic_beside_the_artifacts(art):
    m, fmt = _shape(art, 2, 6)
    r = E.estimate(CI.engine, CI.target, m, fmt, 30, accel=ACCEL, prefill=False)
    b, a = r["bytes_per_token"], r["artifact_bytes_per_token"]
    assert sum(b.values()) == r["hbm_bytes_per_token"]
    # the engine's beats hold the artifact's codes and scales, and more (4-bit code lanes, whole words)
    assert b["weights"] >= a["weights"] and b["lm_head"] >= a["lm_head"]
    assert r["hbm_roofline_tokens_per_s"] == pytest.approx(460e9 / r["hbm_bytes_per_token"])
    assert r["artifact_roofline_tokens_per_s"] == pytest.approx(460e9 / r["artifact_hbm_bytes_per_token"])


def test_estimate_refuses_what_it_cannot_compile(art):
    m, fmt = _shape(art, 2, 6)
    with pytest.raises(E.EstimateError, match="batch 1"):
        E.estimate(CI.engine, CI.target, m, fmt, 30, batch=2, accel=ACCEL)
    with pytest.raises(E.EstimateError, match="give 2 or more"):
        E.estimate(CI.engine, CI.target, m, fmt, 1, accel=ACCEL)
    with pytest.raises(E.EstimateError, match="spad"):
        E.estimate(CI.engine, CI.target, m, fmt, 30, accel=AccelParams(mem_word_bits=256, spad_words=1024))


def test_llama2_7b_on_u280_compiles_and_names_what_binds():
    """The target point's decode step, shape only (no weights): 17,879 instructions, the step's cycles
    from the timeline; with the weights on 16 ports at once (configs/hw/u280.yaml weight_lanes) the
    special-function units bind, not the HBM; on one read port (weight_lanes 1) that port binds."""
    cfg = load_hw("u280")
    m = E.load_model("llama2-7b")
    fmt = E.ArtifactFormat.from_recipe(load_recipe("w2a8kv4-sparse24"))
    r = E.estimate(cfg.engine, cfg.target, m, fmt, 2048, accel=cfg.accelerator, hw_name="u280", prefill=False)
    dec = r["decode"]
    assert dec["visible_keys"] == 512 and dec["spad_words_used"] <= cfg.accelerator.spad_words
    assert r["bound_by"] == "sfu" == max(dec["cycles_by_cause"], key=dec["cycles_by_cause"].get)
    one = dataclasses.replace(cfg.accelerator, mem_ports=1, mem_stripe_words=16, weight_lanes=1)
    r1 = E.estimate(cfg.engine, cfg.target, m, fmt, 2048, accel=one, hw_name="u280", prefill=False)
    assert r1["bound_by"] == "memory_port" and r1["decode"]["cycles_per_token"] > 2 * dec["cycles_per_token"]
    assert r["hbm"]["seconds_per_token"] < dec["step_seconds"]
    assert dec["port_floor_cycles"] <= dec["cycles_per_token"]
    assert set(dec["cycles_by_layer"]) == {f"layer {i}" for i in range(32)} | {"embed", "head", "marks"}
    assert len({v for k, v in dec["cycles_by_layer"].items() if k.startswith("layer")}) == 1  # identical layers
    assert r["artifact_hbm_bytes_per_token"] < r["hbm_bytes_per_token"]
