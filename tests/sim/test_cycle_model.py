"""The controller's cycle model (``hw.controller_model``, what ``hw.machine`` reports) against the RTL:
whole compiled programs of a tiny Llama (prefill of 6 tokens, then decode steps) under Verilator with a
memory that never stalls, the MARK counters the RTL writes (prefill, each decode step) and its cycle
counter at ``done`` held to the model's — on ``ci-small``, on a larger engine (8 rows x 16 lanes,
mm_tokens 4; also with its weights on the wide port, weight_lanes 2), on ``ci-small`` in
``multiplier_style: dsp`` and on a slice of the ``u280``
engine (its 32 lanes and mm_tokens 4, 4 rows, a tiny Llama with head_dim 32), each at two memory latencies. The test asks for exact agreement (the model is meant to be
the RTL's own rules) and reports the worst relative error; issue 14 asks for 5 %.

One Verilator build per engine (minutes each on a busy machine), cached in build/accel and shared by
the latencies (a run-time argument of the memory model).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from accllm.config import load_hw
from hw import controller_model as CM
from hw.compile import compile_generation
from hw.isa import INSTR_BITS
from hw.machine import run as machine_run
from hw.params import AccelParams
from sim.accel_sim import run_accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hw"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "quant"))
from compile_models import build_artifact, integer_model, prompt_ids  # noqa: E402

pytestmark = pytest.mark.slow
CI = load_hw("ci-small")
U280 = load_hw("u280")

CONFIGS = {
    "ci-small": (CI.engine, CI.accelerator, 64, (8, 40)),
    # multiplier_style dsp (hw/engine_dsp.py): 2:4, QK/PV and the W4 lm_head (FLAG_W4) as two ops per
    # beat (hw.engine_parts.beat_ops), which hw.controller_model charges
    "ci-small-dsp": (dataclasses.replace(CI.engine, multiplier_style="dsp"), CI.accelerator, 64, (8, 40)),
    "8x16-mm4": (dataclasses.replace(CI.engine, pe_rows=8, pe_lanes=16, mm_tokens=4, act_buffer_bytes=16384),
                 CI.accelerator, 64, (8, 40)),
    "u280-slice": (dataclasses.replace(U280.engine, pe_rows=4, max_reduction_len=4096, act_buffer_bytes=16384),
                   AccelParams(mem_word_bits=256, spad_words=16384), 128, (8, 40)),
    # the weights on the wide port (weight_lanes 2: a 3-word weight beat in 2 transfers, the Verilog
    # memory model's RDW_PORT)
    "8x16-mm4-wide2": (dataclasses.replace(CI.engine, pe_rows=8, pe_lanes=16, mm_tokens=4, act_buffer_bytes=16384),
                       dataclasses.replace(CI.accelerator, weight_lanes=2), 64, (8, 40)),
}


def _artifact(folder: Path, hidden: int) -> Path:
    if hidden == 64:
        return build_artifact(folder)
    from tiny_llama import make_tiny_llama

    from accllm.config import load_recipe
    from quant.pipeline import quantize_model
    from quant.recipe import QuantizeWeights

    make_tiny_llama(folder / "m", tie=True, n_kv=2, hidden=hidden, intermediate=2 * hidden, heads=4)
    rec = load_recipe("rtn-w2a8kv4")
    qw = rec.get(QuantizeWeights)
    qw.method, qw.clip_search = "rtn", False
    qw.overrides = {**qw.overrides, "lm_head": 4}
    quantize_model(str(folder / "m"), rec, folder / "a", calib_samples=4, seq_len=64, progress=False)
    return folder / "a"


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    """hidden size -> the golden Spec of a tiny Llama that wide (each built once, when first asked)."""
    cache = {}

    def get(hidden: int):
        if hidden not in cache:
            art = _artifact(tmp_path_factory.mktemp(f"model{hidden}"), hidden)
            cache[hidden] = integer_model(art, 2, 6)[1]
        return cache[hidden]
    return get


def model_counts(compiled, mem: CM.MemTiming) -> tuple[dict, int, object]:
    """The model's MARK counts (as ``Compiled.read_cycles``) and total, from ``hw.machine``'s run."""
    m = machine_run(compiled, mem=mem)
    return compiled.read_cycles(m.mem), m.cycles, m


def worst_error(rtl: dict, model: dict, rtl_total: int, model_total: int) -> float:
    pairs = [(rtl["prefill"], model["prefill"]), (rtl_total, model_total)]
    pairs += list(zip(rtl["per_token"], model["per_token"]))
    return max(abs(m - r) / r for r, m in pairs)


# ci-small runs by default; the other two each need their own Verilator build (about 10 minutes on 2
# busy cores): `make test-heavy`
@pytest.mark.parametrize("name", [n if n == "ci-small" else pytest.param(n, marks=pytest.mark.heavy)
                                  for n in CONFIGS])
def test_whole_programs_match_the_rtl(name, specs):
    engine, accel, hidden, latencies = CONFIGS[name]
    compiled = compile_generation(specs(hidden), engine, accel, prompt_ids(6, seed=3), 3, trace="layers")
    for latency in latencies:
        rtl = run_accelerator(engine, accel, compiled.image, simulator="verilator", stall_profile="none",
                              mem_latency=latency, max_cycles=5_000_000)
        assert rtl.error == 0, rtl.error_name
        got = compiled.read_cycles(rtl.mem)
        want, total, m = model_counts(compiled, CM.MemTiming(latency))
        err = worst_error(got, want, rtl.cycles, total)
        print(f"{name} latency {latency}: RTL prefill {got['prefill']} per token {got['per_token']} "
              f"total {rtl.cycles}; model {want['prefill']} {want['per_token']} {total}; worst {err:.4%}")
        assert err <= 0.05, (name, latency, got, want, rtl.cycles, total)
        assert (got, rtl.cycles) == (want, total), f"{name} latency {latency}: not exact ({err:.4%})"
        # the per-instruction, per-operation and per-layer reports add up to the total
        assert sum(m.instr_cycles) + latency + INSTR_BITS // accel.mem_word_bits == total  # the first fetch
        assert sum(m.op_cycles.values()) == sum(m.layer_cycles.values()) == sum(m.instr_cycles)
        assert m.layer_cycles["prefill/layer0"] > 0 and m.layer_cycles["step1/lm_head"] > 0
