"""The lean engine (``EngineParams.requantizer: false``, what configs/hw/u280.yaml builds): no per-row
requantizers, the accumulators' sums straight into the output bank (``stages(p).requant`` = 0), the
``rq`` stream never ready. Bit-exact and on the cycle model's cycle in both multiplier styles, under
stalls; a requantizing command is refused with the parameter named; the controller never sends one
(its ENGINE command has requant 0: formal property P4 in tests/hw/test_formal_accel.py).

Planted (sim/planted.py, ``lean_bank_late``): the lean bank stage one cycle late (``stages(p).requant``
1 instead of 0, so the RTL and the model agree on the timing but the bank takes the next op's sum):
``test_lean_engine_bit_exact_and_on_the_model_cycle`` fails (mismatching outputs), see
``test_planted_lean_bank_late_is_caught``. The refusal left out (``check_requant`` returning at once)
failed ``test_a_requantizing_command_is_refused`` with "DID NOT RAISE" (planted by hand, removed)."""

import dataclasses

import numpy as np
import pytest

from accllm.config import load_hw
from bitstream.engine_resources import engine_instances
from hw import engine_model as M
from hw.engine import Engine, EngineConfigError
from hw.engine_parts import AccRow, REQUANT_STAGES, stages
from sim import engine_check as ec
from sim import planted


def _lean(style: str):
    return dataclasses.replace(load_hw("ci-small").engine, requantizer=False, multiplier_style=style)


def test_u280_builds_the_lean_engine():
    assert load_hw("u280").engine.requantizer is False
    assert load_hw("ci-small").engine.requantizer is True  # the standalone engine tests keep theirs


@pytest.mark.parametrize("style", ["lut", "dsp"])
def test_lean_engine_has_no_requantizer(style):
    p = _lean(style)
    assert stages(p).requant == 0 and stages(dataclasses.replace(p, requantizer=True)).requant == REQUANT_STAGES
    assert stages(p).drain == stages(p).acc
    assert Engine(p).requantizers == []
    inst = engine_instances(p)
    assert "Requantizer" not in inst and inst["AccRow"]["count"] == p.pe_rows
    assert "mult" not in dict(AccRow(p).signature.members) and "mult" in dict(AccRow(load_hw("ci-small").engine).signature.members)


def _beats(p, cases, engine_factory=Engine):
    actual, _ = ec.run_amaranth(p, cases, seed=0, stall_probability=0.0, stall_profile="none",
                                engine_factory=engine_factory)
    return ec.check(cases, actual), list(ec.LAST_STAMPS)


@pytest.mark.parametrize("style", ["lut", "dsp"])
def test_lean_engine_bit_exact_and_on_the_model_cycle(style):
    """Random cases of every mode (none requantized: the lean engine draws the same shapes and never
    requantizes): bit-exact, every output beat on the model's cycle."""
    p = _lean(style)
    cases = ec.make_cases(p, 16, seed=11, max_k_beats=6, max_tiles=3)
    assert {c.mode for c in cases} == set(ec.MODES) and not any(c.inputs["requant"] for c in cases)
    (bad, first), stamps = _beats(p, cases)
    assert bad == 0, first
    tl = M.timeline(p, [ec.case_command(c) for c in cases], from_reset=True)
    assert stamps == [b for ct in tl for b in ct.out]


@pytest.mark.parametrize("style", ["lut", "dsp"])
def test_lean_engine_hazards(style):
    """The directed stall hazards (output stalled, inputs not) on the lean engine."""
    bad, first, _, _ = ec.hazard_check(_lean(style), seed=3)
    assert bad == 0, first


def test_planted_lean_bank_late_is_caught():
    p = _lean("lut")
    bug = planted.load("lean_bank_late")
    cases = ec.make_cases(p, 8, seed=11, max_k_beats=4, max_tiles=2)
    (bad, first), _ = _beats(p, cases, engine_factory=bug.Engine)
    assert bad > 0


def test_a_requantizing_command_is_refused():
    p = _lean("lut")
    rng = np.random.default_rng(0)
    with pytest.raises(EngineConfigError, match=r"^engine\.requantizer: false, but make_case\('dense_mv', "
                                                r"requant=True\) requantizes.*Set engine\.requantizer: true"):
        ec.make_case(p, "dense_mv", rng, requant=True)
    # a case built for the full engine, sent to the lean one: refused before any beat is driven
    full = load_hw("ci-small").engine
    case = ec.make_case(full, "qk", rng, requant=True)
    with pytest.raises(EngineConfigError, match=r"engine\.requantizer: false, but case 0 \(qk\)'s command"):
        ec.run_amaranth(p, [case], seed=0, stall_probability=0.0)
