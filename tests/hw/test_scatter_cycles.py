"""SCATTER's row streams (``hw.controller.MemOps``, states X_*) against the ISA text and against the
cycle model (``hw.controller_model.scatter_busy``): each program below runs in the Amaranth simulation
behind the memory model of sim/accel_sim.py; with stalls (``bursty``) every word must equal the ISA
text's; with a memory that never stalls the accelerator's cycle counter must equal the model's total
exactly. The cases cover what the streams have to get right: rows spanning many words (the V codes of
a KV-cache token: 4 fields per word, 32 words), rows far apart (the K codes), a row starting in the
word the previous one ended in (the cached word kept), rows overlapping the words of the previous one
(the read must wait for the write-backs), fields several words apart (stream words passed over),
several fields in one word in different bytes (the strobes must cover every field), k = 0, fields of
whole bytes (no word read) and bytes off the byte boundary (read)."""

import pytest

from hw import controller_model as CM
from hw.params import AccelParams, EngineParams
from sim import accel_planted
from sim.accel_programs import check_memory, scatter_cases, scatter_program, scatter_stream_cases
from sim.accel_sim import run_accelerator

P = EngineParams()  # ci-small
A64 = AccelParams(mem_word_bits=64, spad_words=2048)
A256 = AccelParams(mem_word_bits=256, spad_words=2048)


def _program(accel, seed=7):
    return scatter_program(accel, seed, cases=scatter_cases(accel.mem_word_bits) + scatter_stream_cases(accel.mem_word_bits))


@pytest.mark.parametrize("accel,profile", [(A64, "bursty"), (A256, "asymmetric")], ids=["w64", "w256"])
def test_scatter_streams_follow_the_isa(accel, profile):
    img, checks, _ = _program(accel)
    r = run_accelerator(P, accel, img, simulator="amaranth", stall_profile=profile, mem_latency=9)
    assert r.error == 0, r.error_name
    bad = check_memory(r.mem, accel, checks)
    assert not bad, bad


@pytest.mark.parametrize("accel,latency", [(A64, 3), (A64, 11), (A256, 40)], ids=["w64-L3", "w64-L11", "w256-L40"])
def test_scatter_cycles_equal_the_model(accel, latency):
    img, checks, info = _program(accel)
    r = run_accelerator(P, accel, img, simulator="amaranth", stall_profile="none", mem_latency=latency)
    assert r.error == 0, r.error_name
    assert not check_memory(r.mem, accel, checks)
    tl = CM.program_timeline(info["program"], P, accel, CM.MemTiming(latency))
    assert r.cycles == tl.total, (r.cycles, tl.total)


@pytest.mark.parametrize("bug", ["scatter_skip_unchecked", "scatter_strobe_last_field", "scatter_bytes_unaligned"])
def test_planted_scatter_bugs_are_caught(bug):
    """A stale word written back (the stream's first word taken for a field in a later word), a field
    lost in a shared word (the strobes cover only the last field patched) and a byte field off the byte
    boundary written without its word read (its other nibble zeroed) each change memory."""
    img, checks, _ = _program(A64)
    try:
        r = run_accelerator(P, A64, img, simulator="amaranth", stall_profile="bursty", mem_latency=9,
                            accel_factory=accel_planted.factory(bug), watchdog_cycles=4000)
    except Exception as exc:  # a hang (the stream left words owed) is caught as well
        assert "hang" in type(exc).__name__.lower() or "range" in type(exc).__name__.lower(), exc
        return
    assert r.error != 0 or check_memory(r.mem, A64, checks), f"{bug} not caught"
