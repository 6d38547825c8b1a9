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


def test_hazard_watchdog_catches_registers_not_held(params):
    with pytest.raises(EngineHang, match="out stopped"):
        hazard_check(params, 0, planted.load("no_hold_on_stall").Engine)


def test_full_size_catches_24_bit_accumulators(params):
    bad, first = full_size_check(params, planted.load("acc_24_bits").Engine, modes=("dense_mv",))
    assert bad == 1 and first["expected"] > 1 << 23, first


def test_per_row_requant_check_catches_row0_multiplier(params):
    bad, first = per_row_requant_check(params, planted.load("rq_row0").Engine)
    assert bad > 0
