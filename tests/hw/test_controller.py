"""The accelerator (controller, memory ports, spad, engine, units) running directed programs in Amaranth
simulation behind the memory model of sim/accel_sim.py, with stalls and latency. Expected values come
from quant.reference (ENGINE, RESID_ADD) or from the ISA text (LOAD/STORE/SCATTER), never from the RTL."""

import pytest

from hw.controller import AccelError
from hw.isa import FLAG_SIGNED, Instr, Op, encode
from hw.params import AccelParams, EngineParams
from sim import accel_planted
from sim.accel_programs import (ImageBuilder, check_memory, engine_program, load_store_program, resid_program,
                                scatter_program, scatter_stream_cases, short_instrs_program)
from sim.accel_sim import AccelHang, MemoryRangeError, read_elements, run_accelerator

P = EngineParams()  # ci-small: 4 rows x 8 lanes, mm_tokens 2
A256 = AccelParams(mem_word_bits=256, spad_words=2048)
A64 = AccelParams(mem_word_bits=64, spad_words=2048)


def run(accel, img, **kw):
    kw.setdefault("stall_profile", "asymmetric")
    kw.setdefault("mem_latency", 7)
    return run_accelerator(P, accel, img, simulator="amaranth", **kw)


def assert_ok(r, accel, checks):
    assert r.error == 0, r.error_name
    bad = check_memory(r.mem, accel, checks)
    assert not bad, bad


@pytest.mark.parametrize("accel,profile", [(A256, "asymmetric"), (A64, "bursty")], ids=["w256", "w64"])
def test_load_store_every_width(accel, profile):
    """LOAD (zero- and sign-extended, one indexed) and STORE of 4..64-bit elements, counts that end
    mid-word and span several words, rails; MARK; HALT."""
    img, checks, info = load_store_program(accel, seed=11)
    r = run(accel, img, stall_profile=profile)
    assert_ok(r, accel, checks)
    assert r.instrs == len(info["program"])
    mark = int(read_elements(r.mem, accel.mem_word_bits, info["mark"], 1, 64)[0])
    assert 0 < mark < r.cycles  # the cycle counter when MARK ran, before HALT


@pytest.mark.parametrize("accel,profile", [(A256, "bursty"), (A64, "asymmetric")], ids=["w256", "w64"])
def test_scatter(accel, profile):
    """Nibbles with a stride, FLAG_NEG, 2-D rows, fields at both edges of a word, 8..64-bit fields;
    every other bit of the words is unchanged."""
    img, checks, _ = scatter_program(accel, seed=5)
    r = run(accel, img, stall_profile=profile)
    assert_ok(r, accel, checks)


ENGINE_CASES = {
    # mode, kwargs of engine_program
    "dense_mv": ("dense", dict(tokens=1, k_beats=4, n=9, group_beats=2, g=1, h=8, gap=3)),
    "dense_mm_zero_fill": ("dense", dict(tokens=2, k_beats=3, n=6, group_beats=1, b=19, i0=11)),
    "sparse_mm": ("sparse", dict(tokens=2, k_beats=2, n=8, group_beats=1, h=7, gap=2)),
    "qk": ("qk", dict(tokens=2, k_beats=2, n=7, g=2, b=13)),
    "pv": ("pv", dict(tokens=2, k_beats=3, n=6, h=5, gap=1, i0=9)),
}


@pytest.mark.parametrize("case", list(ENGINE_CASES))
def test_engine_modes(case):
    """ENGINE in every mode with row filters (g, h), a token stride i0, zero fill (b < K) and a tile
    stride f, two instructions back to back; the outputs equal quant.reference's."""
    mode, kw = ENGINE_CASES[case]
    img, checks, _ = engine_program(P, A256, mode, seed=hash(case) % 1000, count=2, **kw)
    r = run(A256, img)
    assert_ok(r, A256, checks)


def test_engine_w64_multiword_beats():
    """At 64-bit memory words a weight beat is 4 words and a scale beat 1: the gather path."""
    img, checks, _ = engine_program(P, A64, "dense", seed=3, tokens=2, k_beats=2, n=5, group_beats=1, gap=1)
    r = run(A64, img, stall_profile="bursty")
    assert_ok(r, A64, checks)


def test_engine_edge_values():
    """All-max / all-min operands: the accumulators at their largest for this K."""
    for i, edge in enumerate(("max", "min")):
        img, checks, _ = engine_program(P, A256, "dense", seed=40 + i, tokens=2, k_beats=8, n=4, group_beats=8,
                                        edge=edge)
        r = run(A256, img)
        assert_ok(r, A256, checks)


def test_instructions_shorter_than_the_prefetch():
    """Zero-length LOADs and SCATTERs end before the next instruction's prefetch has arrived."""
    img, checks, info = short_instrs_program(A256, seed=3)
    r = run(A256, img, mem_latency=20)
    assert_ok(r, A256, checks)
    assert r.instrs == len(info["program"])


def test_resid_add_through_top():
    img, checks, _ = resid_program(A256, seed=2)
    r = run(A256, img)
    assert_ok(r, A256, checks)


def _raw_program(accel, words_of_instrs, extra_words=8):
    ib = ImageBuilder(accel)
    iw = 512 // accel.mem_word_bits
    for j, v in enumerate(words_of_instrs):
        ib.place(j * iw, [(v >> (accel.mem_word_bits * q)) & ((1 << accel.mem_word_bits) - 1) for q in range(iw)])
    return ib.image(len(words_of_instrs) * iw + extra_words)


@pytest.mark.parametrize("what,instr,code,units", [
    ("unknown opcode", 7, AccelError.UNKNOWN_OPCODE, None),
    ("unknown opcode 255", 255, AccelError.UNKNOWN_OPCODE, None),
    ("missing unit", Instr(Op.RESID_ADD, a=0, b=8, d=16, m=1, n=8), AccelError.NO_UNIT, []),
    ("bad width", Instr(Op.LOAD, w=12, a=0, d=0, n=1), AccelError.BAD_WIDTH, None),
    ("engine tokens 0", Instr(Op.ENGINE, m=0, n=1, k=1, s=1), AccelError.BAD_ENGINE, None),
    ("engine tokens > mm_tokens", Instr(Op.ENGINE, m=3, n=1, k=1, s=1), AccelError.BAD_ENGINE, None),
    ("engine k does not divide n", Instr(Op.ENGINE, m=1, n=3, k=2, s=1), AccelError.BAD_ENGINE, None),
    ("scatter straddles", Instr(Op.SCATTER, w=8, a=0, b=1, d=4, e=252, m=1, n=1), AccelError.SCATTER_STRADDLE,
     None),
])
def test_errors_stop_the_machine(what, instr, code, units):
    """A bad instruction stops the machine with its error code, pc and opcode; the STORE after it never
    runs (its target word keeps its value)."""
    first = Instr(Op.LOAD, flags=FLAG_SIGNED, w=8, a=6, d=0, n=4)
    after = Instr(Op.STORE, w=64, a=0, d=7, n=1)
    bad = instr if isinstance(instr, int) else encode(instr)
    img = _raw_program(A256, [encode(first), bad, encode(after), encode(Instr(Op.HALT))])
    img[7 * 32:8 * 32] = 0xA5
    r = run(A256, img, units=units)
    assert r.error == code, (what, r.error_name)
    assert r.pc == 1 and r.instrs == 2
    assert (r.mem[7 * 32:8 * 32] == 0xA5).all()


def test_halt_stops_and_marks_count_up():
    """Nothing after HALT runs; two MARKs record increasing cycle counts."""
    prog = [Instr(Op.MARK, d=20), Instr(Op.NOP), Instr(Op.MARK, d=21), Instr(Op.HALT), Instr(Op.MARK, d=22)]
    ib = ImageBuilder(A256)
    ib.program(prog)
    ib.place(22, [12345])
    r = run(A256, ib.image(24))
    assert r.error == 0 and r.instrs == 4
    m0, m1, m2 = read_elements(r.mem, 256, 20, 3 * 4, 64)[::4]
    assert 0 < m0 < m1 < r.cycles and m2 == 12345


def test_memory_range_error_names_the_instruction():
    prog = [Instr(Op.NOP), Instr(Op.LOAD, w=64, a=100, d=0, n=8), Instr(Op.HALT)]
    ib = ImageBuilder(A256)
    ib.program(prog)
    with pytest.raises(MemoryRangeError, match=r"read port 0: job of 2 words at word 100 .*pc 1, LOAD"):
        run(A256, ib.image(16))


def test_watchdog_names_the_stuck_state():
    """A memory slower than the watchdog: the hang names the cycle, pc, opcode, state and port."""
    ib = ImageBuilder(A256)
    ib.program([Instr(Op.HALT)])
    with pytest.raises(AccelHang, match=r"no progress for 20 cycles .*pc 0 .*state FETCH_DATA"):
        run(A256, ib.image(4), mem_latency=200, watchdog_cycles=20)


def test_bad_arguments_are_refused():
    ib = ImageBuilder(A256)
    ib.program([Instr(Op.HALT)])
    img = ib.image(4)
    with pytest.raises(ValueError, match="whole number of 256-bit memory words"):
        run(A256, img[:-1])
    with pytest.raises(ValueError, match="simulator 'modelsim'"):
        run_accelerator(P, A256, img, simulator="modelsim")
    with pytest.raises(ValueError, match="stall profile 'sometimes'"):
        run(A256, img, stall_profile="sometimes")
    with pytest.raises(ValueError, match="words_per_cycle"):
        run(A256, img, words_per_cycle=2)


def test_words_per_cycle_slows_the_stream():
    """Half a word per cycle: the same program, bit-exact, takes more cycles."""
    img, checks, _ = engine_program(P, A256, "dense", seed=9, tokens=1, k_beats=8, n=8)
    fast = run(A256, img, stall_profile="none", mem_latency=2)
    slow = run(A256, img, stall_profile="none", mem_latency=2, words_per_cycle=0.5)
    assert_ok(fast, A256, checks)
    assert_ok(slow, A256, checks)
    assert slow.cycles > fast.cycles + 8


PLANTED = {
    # bug -> program that must catch it
    "store_ignores_ready": lambda: load_store_program(A256, seed=11),
    "store_strobe_top_byte": lambda: load_store_program(A256, seed=11),
    "load_ignores_valid": lambda: load_store_program(A256, seed=11),
    "scatter_neg_ignored": lambda: scatter_program(A256, seed=5),
    "scatter_skip_unchecked": lambda: scatter_program(A256, seed=5, cases=scatter_stream_cases(256)),
    "scatter_strobe_last_field": lambda: scatter_program(A256, seed=5),
    "scatter_bytes_unaligned": lambda: scatter_program(A256, seed=5, cases=scatter_stream_cases(256)),
    "row_filter_off_by_one": lambda: engine_program(P, A256, "dense", seed=1, tokens=1, k_beats=2, n=9, g=1, h=7),
    "out_beat_dropped": lambda: engine_program(P, A256, "dense", seed=1, tokens=2, k_beats=1, n=8),
    "tile_stride_ignored": lambda: engine_program(P, A256, "pv", seed=1, tokens=1, k_beats=2, n=8, gap=2),
    "no_zero_fill": lambda: engine_program(P, A256, "qk", seed=1, tokens=2, k_beats=2, n=4, b=11),
    "prefetch_not_awaited": lambda: short_instrs_program(A256, seed=3),
}


@pytest.mark.parametrize("bug", list(PLANTED))
def test_planted_bug_is_caught(bug):
    """Each planted controller bug (sim/accel_planted.py) makes its directed program fail: a wrong
    memory region, an error, or a hang caught by the watchdog. The clean RTL passes the same program."""
    assert set(PLANTED) == set(accel_planted.BUGS)
    img, checks, _ = PLANTED[bug]()
    clean = run(A256, img)
    assert_ok(clean, A256, checks)
    try:
        r = run(A256, img, accel_factory=accel_planted.factory(bug), watchdog_cycles=400)
    except (AccelHang, MemoryRangeError):
        return
    assert r.error != 0 or check_memory(r.mem, A256, checks), f"planted bug {bug} not caught"
