"""The behavioural cycle model (hw/engine_model.py) equals the RTL cycle for cycle: every output beat of
random command streams in Amaranth simulation with no stream stalled lands on the cycle the model
predicts, including streams where a tile of many tokens still drains when the next short command
reaches the output bank (the model's only stall). Planted model bugs fail these tests
(docs/engine.md, "Planted bugs")."""

import dataclasses

import numpy as np
import pytest

from accllm.config import load_hw
from hw import engine_model as M
from hw.engine import Mode
from hw.params import EngineParams
from sim import engine_check as ec
from sim import estimate as E


_command = ec.case_command


def _rtl_beats(p, cases):
    actual, _ = ec.run_amaranth(p, cases, seed=0, stall_probability=0.0, stall_profile="none")
    bad, first = ec.check(cases, actual)
    assert bad == 0, first
    return list(ec.LAST_STAMPS)


def _model_beats(p, cases):
    tl = M.timeline(p, [_command(c) for c in cases], from_reset=True)
    return [b for ct in tl for b in ct.out]


def test_every_beat_on_the_predicted_cycle():
    """ci-small, every mode, random shapes (1..8 weight beats, 1..4 tiles, group sizes, requantized or
    not): each output beat's cycle equals the model's."""
    p = load_hw("ci-small").engine
    cases = ec.make_cases(p, 24, seed=11, max_k_beats=8, max_tiles=4)
    assert {c.mode for c in cases} == set(ec.MODES)
    assert _rtl_beats(p, cases) == _model_beats(p, cases)


def test_long_tiles_then_short_commands_stall_on_the_output_bank():
    """mm_tokens = 32: a tile of 32 tokens then commands of 1 token and 1 beat reach the output bank
    before the 32 beats have left (the pipeline stalls; with 8 tokens the ``stages(p).drain`` = 13
    cycles of the 225 MHz pipeline already cover the drain); the model has the same stall cycles."""
    p = EngineParams(pe_rows=2, pe_lanes=4, mm_tokens=32, acc_bits=32, max_reduction_len=64, max_head_dim=64,
                     max_keys=64, act_buffer_bytes=2048)
    rng = np.random.default_rng(4)
    cases = []
    for tokens, kb, tiles in ((32, 1, 2), (1, 1, 3), (32, 2, 1), (2, 1, 2), (32, 1, 1), (1, 1, 1), (3, 1, 2)):
        cases.append(ec.make_case(p, "dense_mm" if tokens > 1 else "dense_mv", rng, k_beats=kb,
                                  n=tiles * p.pe_rows, tokens=tokens, group_beats=kb))
    tl = M.timeline(p, [_command(c) for c in cases], from_reset=True)
    assert sum(ct.stall_cycles for ct in tl) > 0  # the bank really holds the pipeline in this stream
    assert _rtl_beats(p, cases) == [b for ct in tl for b in ct.out]


def test_u280_lane_width_slice():
    """The u280 lanes and widths with 2 rows: the model is per command, not per configuration."""
    p = dataclasses.replace(load_hw("u280").engine, pe_rows=2)
    cases = ec.make_cases(p, 8, seed=5, max_k_beats=4, max_tiles=3)
    assert _rtl_beats(p, cases) == _model_beats(p, cases)


def test_estimate_uses_the_model():
    """sim.estimate's cycle entry points are the model's (not a copy), with the estimator's error."""
    p = load_hw("u280").engine
    ops = [E.Op("dense", 4, 4096, 11008, 64), E.Op("qk", 4, 128, 512), E.Op("pv", 1, 512, 128)]
    assert E.sequence_cycles(p, ops) == M.sequence_cycles(p, ops)
    assert E.Op is M.Op
    with pytest.raises(E.EstimateError, match="mm_tokens"):
        E.op_cycles(p, E.Op("qk", 5, 128, 512))


@pytest.mark.parametrize("cmd, field", [
    (M.Command(Mode.DENSE, 0, 1, 1, 1), "tokens"),
    (M.Command(Mode.DENSE, 1, 0, 1, 1), "k_beats"),
    (M.Command(Mode.DENSE, 1, 6, 4, 1), "group_beats"),
    (M.Command(Mode.DENSE, 1, 1, 1, 0), "tiles"),
    (M.Command(7, 1, 1, 1, 1), "mode"),
    (M.Command(Mode.SPARSE, 2, 512, 512, 1), "act_buffer_bytes"),
    (M.Command(Mode.QK, 1, 1, 1, 1, wide=True), "wide"),
])
def test_bad_command_named(cmd, field):
    p = load_hw("ci-small").engine
    with pytest.raises(M.EngineCommandError, match=field):
        M.timeline(p, [M.Command(Mode.DENSE, 1, 1, 1, 1), cmd])
