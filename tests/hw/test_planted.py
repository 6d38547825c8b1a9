# amaranth: UnusedElaboratable=no
"""The checkers catch the audit's planted bugs (issue 10; sim/planted.py): each bug is planted in a copy
of hw/engine.py and the check the default suite relies on must fail on it. The committed engine passes
the same checks (tests/hw/test_engine_amaranth.py); the formal checks' plants are in test_formal.py.
The table of bugs and the tests that catch them is in docs/engine.md ("Planted bugs")."""

import pytest

from accllm.config import load_hw
from sim import planted
from sim.engine_check import EngineHang, full_size_check, hazard_check, per_row_requant_check


@pytest.fixture(scope="module")
def params():
    return load_hw("ci-small").engine


def test_every_patch_applies():
    for name in planted.BUGS:
        assert planted.source(name) != planted.ENGINE_SOURCE.read_text()


@pytest.mark.parametrize("bug", ["bram_enable", "out_bank_overwrite",
                                 # the 225 MHz pipeline's: the output register, the stage registers
                                 "skid_full_overwrite", "requant_not_held", "group_not_held"])
def test_hazard_catches(params, bug):
    bad, first, _, _ = hazard_check(params, 0, planted.load(bug).Engine)
    assert bad > 0, f"{bug} passed the hazard check"


@pytest.mark.parametrize("bug", ["skid_pop_ignores_ready", "rq_buffer_lost"])
def test_hazard_watchdog_catches_lost_beats(params, bug):
    """The output register dropping its head when ready is low, the rq register overwritten: beats
    lost, the run hangs and the watchdog names the output."""
    with pytest.raises(EngineHang, match="out stopped"):
        hazard_check(params, 0, planted.load(bug).Engine)


@pytest.mark.parametrize("bug, caught", [("queue_not_empty", "mismatch"), ("queue_head_kept", "hang"),
                                         ("queue_room_kept", "hang")])
def test_weight_bursts_catch_op_queue_bugs(params, bug, caught):
    """The sequencer's op queue (the stall reaches it, not the counters): with the weight stream stalled
    before half its beats for runs of mean 32 cycles (``weight-bursts``) the queue fills and holds a
    command's last ops while the pipeline drains and the next command is offered. Measured on this
    run: a command taken with ops still queued gives 1 mismatching case of 6; the head kept on a pop
    (an op issued twice, the next lost) and the room kept with two entries (an op overwritten) hang,
    and the watchdog names the output. (The hazard profile, inputs never stalled, catches none of
    the three: its queue never fills.)"""
    from sim.engine_check import check, make_cases, run_amaranth

    cases = make_cases(params, 6, seed=30 + len("weight-bursts"))
    if caught == "hang":
        with pytest.raises(EngineHang, match="out stopped"):
            run_amaranth(params, cases, seed=3, stall_probability=0.5, stall_profile="weight-bursts",
                         engine_factory=planted.load(bug).Engine)
    else:
        actual, _ = run_amaranth(params, cases, seed=3, stall_probability=0.5, stall_profile="weight-bursts",
                                 engine_factory=planted.load(bug).Engine)
        bad, _ = check(cases, actual)
        assert bad > 0, f"{bug} passed the weight-bursts profile"


def test_hazard_watchdog_catches_registers_not_held(params):
    with pytest.raises(EngineHang, match="out stopped"):
        hazard_check(params, 0, planted.load("no_hold_on_stall").Engine)


def test_full_size_catches_24_bit_accumulators(params):
    bad, first = full_size_check(params, planted.load("acc_24_bits").Engine, modes=("dense_mv",))
    assert bad == 1 and first["expected"] > 1 << 23, first


def test_per_row_requant_check_catches_row0_multiplier(params):
    bad, first = per_row_requant_check(params, planted.load("rq_row0").Engine)
    assert bad > 0
