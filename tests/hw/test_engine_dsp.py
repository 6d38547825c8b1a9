# amaranth: UnusedElaboratable=no
"""``multiplier_style: dsp`` (hw/engine_dsp.py): the engine with its products packed three rows to a
DSP48E2 against the reference in every mode (dense W2, dense W4, 2:4, QK and PV with KV4, prefill),
under the stall profiles, edge values, full-size reductions and the directed hazard run; its cycle
count equal to the cycle model's (2:4 beats as two half-beat ops); each of its planted bugs
(sim/planted.py, ``dsp_*``) caught by these checks."""

import dataclasses

import numpy as np
import pytest

from accllm.config import load_hw
from hw import engine_model as M
from hw.engine import Mode
from sim import engine_check as ec
from sim import planted


@pytest.fixture(scope="module")
def params():
    return dataclasses.replace(load_hw("ci-small").engine, multiplier_style="dsp")


def _w4_cases(p, count, seed, **kw):
    rng = np.random.default_rng(seed)
    return [ec.make_case(p, "dense_mm" if i % 2 else "dense_mv", rng, code_bits=4, **kw) for i in range(count)]


@pytest.mark.parametrize("mode", ec.MODES)
@pytest.mark.parametrize("profile", ["uniform", "bursty"])
def test_mode_bit_exact_with_stalls(params, mode, profile):
    cases = ec.make_cases(params, 4, seed=31 + ec.MODES.index(mode), modes=(mode,))
    actual, _ = ec.run_amaranth(params, cases, seed=5, stall_probability=0.3, stall_profile=profile)
    bad, first = ec.check(cases, actual)
    assert bad == 0, first


def test_w4_dense_bit_exact(params):
    """4-bit weight codes in dense mode (the W4 lm_head, the command's ``wide``): two digit ops per beat."""
    cases = _w4_cases(params, 6, seed=2)
    assert max(int(c.inputs["codes"].max()) for c in cases) > 3
    actual, _ = ec.run_amaranth(params, cases, seed=3, stall_probability=0.2, stall_profile="asymmetric")
    bad, first = ec.check(cases, actual)
    assert bad == 0, first


@pytest.mark.parametrize("edge", ["extreme", "min", "max", "pruned"])
def test_edge_values(params, edge):
    rng = np.random.default_rng(7)
    cases = [ec.make_case(params, mode, rng, edge=edge, requant=(i % 2 == 0)) for i, mode in enumerate(ec.MODES)]
    cases.append(ec.make_case(params, "dense_mv", rng, edge=edge, code_bits=4))
    actual, _ = ec.run_amaranth(params, cases, seed=1, stall_probability=0.2)
    bad, first = ec.check(cases, actual)
    assert bad == 0, first


def test_hazard_full_size_and_per_row_requant(params):
    bad, first, _, stalled = ec.hazard_check(params, 0)
    assert bad == 0 and stalled > 0, first
    bad, first = ec.full_size_check(params)
    assert bad == 0, first
    bad, first = ec.per_row_requant_check(params)
    assert bad == 0, first


def test_every_beat_on_the_predicted_cycle(params):
    """The cycle model with 2:4 and 4-bit beats as two ops (hw.engine_parts.beat_ops) equals the RTL
    beat for beat, every mode and W4 dense, random shapes, no stalls."""
    cases = ec.make_cases(params, 18, seed=13, max_k_beats=6, max_tiles=3) + _w4_cases(params, 3, seed=14)
    actual, _ = ec.run_amaranth(params, cases, seed=0, stall_probability=0.0, stall_profile="none")
    bad, first = ec.check(cases, actual)
    assert bad == 0, first
    cmds = [ec.case_command(c) for c in cases]
    assert any(c.mode == Mode.SPARSE for c in cmds) and any(c.wide for c in cmds)
    model = [b for ct in M.timeline(params, cmds, from_reset=True) for b in ct.out]
    assert list(ec.LAST_STAMPS) == model
    # and a 2:4, QK, PV or W4 beat really costs two issue slots in this style, one in lut; W2 dense one
    lut = dataclasses.replace(params, multiplier_style="lut")
    issue = lambda p, c: M.timeline(p, [c])[0].last_issue - M.timeline(p, [c])[0].first_issue + 1
    for kind in (Mode.SPARSE, Mode.QK, Mode.PV, Mode.DENSE):
        for c in (c for c in cmds if c.mode == kind):
            ops = 2 if kind != Mode.DENSE or c.wide else 1
            assert issue(params, c) == ops * issue(lut, c) == ops * c.tiles * c.k_beats * c.tokens


def test_u280_lane_width_slice():
    """The u280 lanes and widths (32 lanes, 4 tokens) in dsp style with 4 rows (a DspRows3 and a
    DspRows1): every mode and W4, random stalls."""
    p = dataclasses.replace(load_hw("u280").engine, pe_rows=4, multiplier_style="dsp")
    cases = ec.make_cases(p, 12, seed=5, max_k_beats=3, max_tiles=2) + _w4_cases(p, 2, seed=6)
    actual, _ = ec.run_amaranth(p, cases, seed=2, stall_probability=0.2, stall_profile="asymmetric")
    bad, first = ec.check(cases, actual)
    assert bad == 0, first


#: each planted dsp bug and the cases that must catch it, each set on its own ("w4": dense W4 cases)
PLANTED = {
    "dsp_field_offset": (("dense_mv",),),
    "dsp_no_correction": (("dense_mv",),),
    "dsp_pass1_unshifted": (("qk",), ("pv",), ("w4",)),
    "dsp_sum_a_twice": (("qk",), ("pv",), ("w4",)),
    "dsp_w4_one_pass": (("w4",),),
    "dsp_half_swapped": (("sparse_mv",),),
    "dsp_kept_sum_pair": (("sparse_mv",),),
    "dsp_digit_undelayed": (("qk",), ("pv",), ("w4",)),
}
#: the planted dsp bugs of the array's pipeline registers (not held on a stall): the directed hazard
#: run (output stalled 80 %, inputs never) must catch each
HOLD_PLANTED = ("dsp_ab_not_held",)


def test_every_dsp_bug_is_listed():
    assert set(PLANTED) | set(HOLD_PLANTED) == {b for b in planted.BUGS if b.startswith("dsp_")}


@pytest.mark.parametrize("bug", HOLD_PLANTED)
def test_planted_hold_bug_is_caught_by_the_hazard_run(params, bug):
    bad, first, _, stalled = ec.hazard_check(params, 0, planted.load(bug).Engine)
    assert stalled > 0 and bad > 0, f"planted {bug} ({planted.BUGS[bug][0]}) passed the hazard run"


@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_planted_bug_is_caught(params, bug):
    engine = planted.load(bug).Engine
    for modes in PLANTED[bug]:
        # unrequantized: a requantized case's rounding and saturation can hide a small error
        cases = (_w4_cases(params, 2, seed=8, requant=False) if modes == ("w4",) else
                 ec.make_cases(params, 3, seed=41, modes=modes, requant=False))
        actual, _ = ec.run_amaranth(params, cases, seed=5, stall_probability=0.2, engine_factory=engine)
        bad, first = ec.check(cases, actual)
        assert bad > 0, f"planted {bug} ({planted.BUGS[bug][0]}) passed on {modes}"
