"""SCATTER's row streams (``hw.controller.MemOps``, states X_*) against the ISA text and against the
cycle model (``hw.controller_model.scatter_busy``): each program below runs in the Amaranth simulation
behind the memory model of sim/accel_sim.py; with stalls (``bursty``) every word must equal the ISA
text's; with a memory that never stalls the accelerator's cycle counter must equal the model's total
exactly. The cases cover what the streams have to get right: rows spanning many words (the V codes of
a KV-cache token: 4 fields per word, 32 words), rows far apart (the K codes), a row starting in the
word the previous one ended in (the cached word kept), rows overlapping the words of the previous one
(the read must wait for the write-backs), fields several words apart (stream words passed over),
several fields in one word in different bytes (the strobes must cover every field), k = 0."""

import pytest

from hw import controller_model as CM
from hw.params import AccelParams, EngineParams
from sim import accel_planted
from sim.accel_programs import check_memory, scatter_cases, scatter_program
from sim.accel_sim import run_accelerator

P = EngineParams()  # ci-small
A64 = AccelParams(mem_word_bits=64, spad_words=2048)
A256 = AccelParams(mem_word_bits=256, spad_words=2048)


def stream_cases(W: int) -> list[tuple]:
    """(w, m, n, e, f, k, neg) beyond ``scatter_cases``."""
    return [
        (4, 1, 16, 4, 0, W // 4, False),        # V codes: 4 fields per word, 4 words in one stream
        (4, 3, 6, 8, 3 * W, 4, False),          # K codes: a short row per word, rows words apart
        (8, 2, 12, 0, 96, 8, True),             # row 1 starts in row 0's last word (kept cached)
        (8, 3, 4, 8, 16, W, False),             # rows interleave the same words (read waits for writes)
        (16, 1, 3, 16, 0, 3 * W, False),        # fields three words apart (two stream words passed over)
        (4, 2, 5, 0, 8, 0, False),              # k = 0: every field of a row in one place (the last wins)
        (4, 1, 2, W - 8, 0, 4, True),           # the word's two top nibbles, negated
    ]


def _program(accel, seed=7):
    return scatter_program(accel, seed, cases=scatter_cases(accel.mem_word_bits) + stream_cases(accel.mem_word_bits))


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


@pytest.mark.parametrize("bug", ["scatter_skip_unchecked", "scatter_strobe_last_field"])
def test_planted_scatter_bugs_are_caught(bug):
    """A stale word written back (the stream's first word taken for a field in a later word) and a
    field lost in a shared word (the strobes cover only the last field patched) each change memory."""
    img, checks, _ = _program(A64)
    try:
        r = run_accelerator(P, A64, img, simulator="amaranth", stall_profile="bursty", mem_latency=9,
                            accel_factory=accel_planted.factory(bug), watchdog_cycles=4000)
    except Exception as exc:  # a hang (the stream left words owed) is caught as well
        assert "hang" in type(exc).__name__.lower() or "range" in type(exc).__name__.lower(), exc
        return
    assert r.error != 0 or check_memory(r.mem, A64, checks), f"{bug} not caught"
