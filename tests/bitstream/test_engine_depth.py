"""The engine's logic depth against the 225 MHz budget (issue 10 item 2; bitstream/depth.py): the u280
engine's lane width and widths with one row, in both multiplier styles (``benchmarks/depth.py
u280-1row`` and ``u280-dsp-1row``, the same slices), synthesized flat with ``synth_xilinx -family
xcup`` and walked register to register. An estimate, not timing: Vivado has the last word.

Both slices meet the budget (measured: lut 7 LUT levels, 4.1 ns; dsp 7 levels, 3.95 ns; against 8
and 4.44; docs/engine.md, "Logic depth"): the stall into the sequencer's counters, 9-10 levels before,
is gone structurally (the sequencer's op queue: the stall moves only the queue's registers, the
counters generate against its registered ``room``), and the dsp array's DSP48E2s have flip-flops
straight on their A/B inputs and their product (15 levels, 9.7 ns and 32 DSPs unregistered before).
Both tests hold no DSP48E2 or block RAM missing its registers except where flip-flops sit straight on
both sides (``fabric_registered``: Yosys does not pack them for xcup, Vivado does). Planted (lut): the
sequencer's counters generating only when not stalled and the weight is there (``gen = q_room &
~stall & w_valid``, the stall back into the sequencer) fails the ceiling (measured: 8 levels, 4.4
ns, ``output_bank.valid`` -> ``seq.q_head``; within the budget, hence the tighter ceiling); the
requantizer built combinational again (``Requantizer(pipelined=False)``) fails both (measured before
the op queue: 14 levels, 10.35 ns, its two DSPs unregistered). Planted (dsp): the array's product
register left out (``prod`` combinational after the A/B registers) fails both (measured: 7 levels,
4.6 ns, the 32 array DSPs unregistered).

Marked slow: one Yosys run of 60-240 s CPU per style from a cold cache (measured on this machine under
load), cached by content in build/yosys afterwards (the two tests of a style share it)."""

import dataclasses

import pytest

from accllm.config import load_hw
from bitstream.depth import BUDGET, check_budget, logic_depth
from hw.engine import Engine

pytestmark = pytest.mark.slow

#: what each slice reaches today (measured: lut 7 levels, 4.1 ns; dsp 7 levels, 3.95 ns;
#: benchmarks/depth.py u280-1row u280-dsp-1row): tighter than the budget, so that a regression that
#: still fits it shows
CEILING = {"lut": (7, 4.1), "dsp": (7, 3.95)}


@pytest.fixture(scope="module", params=sorted(CEILING))
def depth(request):
    # with the requantizer (u280 builds the lean engine, requantizer: false): its stages and DSPs stay
    # measured; the lean engine only loses paths (its bank takes the accumulator's sum, the adder whose
    # path into the accumulator register is walked here too)
    p = dataclasses.replace(load_hw("u280").engine, pe_rows=1, multiplier_style=request.param, requantizer=True)
    return request.param, logic_depth(Engine(p), timeout_s=1800)


def test_u280_lane_slice_depth_ceiling(depth):
    style, depth = depth
    levels, ns = CEILING[style]
    assert depth["unregistered"] == [], depth["unregistered"][:5]
    assert depth["max_levels"] <= levels, depth["levels_path"]
    assert depth["estimate_ns"] <= ns, depth["path"]
    # the group stage's and the requantizer's multiplies (and in dsp style the array's), the activation
    # banks: registered in fabric
    kinds = {u["type"] for u in depth["fabric_registered"]}
    assert "DSP48E2" in kinds and any(k.startswith("RAMB") for k in kinds), depth["fabric_registered"]
    if style == "dsp":  # one DSP48E2 per lane for the row, each with flip-flops on both sides
        dsps = sum(1 for u in depth["fabric_registered"] if u["type"] == "DSP48E2")
        assert dsps >= load_hw("u280").engine.pe_lanes, depth["fabric_registered"]


def test_u280_lane_slice_meets_the_depth_budget(depth):
    _, depth = depth
    problems = check_budget(depth)
    assert problems == [], "\n".join(problems[:10])
    assert depth["max_levels"] <= BUDGET.max_levels and depth["estimate_ns"] <= BUDGET.period_ns
