"""The machine model (hw/machine.py) executes each opcode as hw/isa.py defines it: the ISA's encoding
round-trips; LOAD / STORE / SCATTER move packed elements little-endian as the memory model says; ENGINE,
fed the engine testbench's own beats (sim.engine_check.make_case, random and edge cases of every mode),
equals quant.reference; a program without HALT is stopped by the instruction limit."""

import numpy as np
import pytest

from hw import beats as B
from hw.engine import Mode, layouts
from hw.isa import (FIELDS, FLAG_INDEXED, FLAG_NEG, FLAG_SIGNED, INSTR_BITS, ISAError, Instr, Op, decode,
                    decode_program, encode, encode_program)
from hw.machine import Machine, MachineError, beat_words, run
from hw.params import AccelParams, EngineParams
from sim.engine_check import make_case

P = EngineParams(pe_rows=4, pe_lanes=8, mm_tokens=2)


def test_isa_round_trip_at_every_field_rail():
    rng = np.random.default_rng(0)
    for op in Op:
        for trial in range(6):
            vals = {}
            for name, bits in FIELDS:
                if name == "op":
                    continue
                hi = (1 << bits) - 1
                v = [0, hi, int(rng.integers(0, hi, dtype=np.uint64))][trial % 3]
                if name == "i0":
                    v = [-(1 << 63), (1 << 63) - 1, int(rng.integers(-(1 << 62), 1 << 62))][trial % 3]
                vals[name] = v
            ins = Instr(op, **vals)
            word = encode(ins)
            assert 0 <= word < (1 << INSTR_BITS)
            back = decode(word)
            assert all(getattr(back, n) == getattr(ins, n) for n, _ in FIELDS), (op, trial)
    prog = [Instr(Op.LOAD, a=5, d=7, n=3, w=8, i0=-2), Instr(Op.HALT)]
    for bits in (64, 128, 256, 512):
        words = encode_program(prog, bits)
        assert len(words) == 2 * INSTR_BITS // bits
        assert [repr(i) for i in decode_program(words, bits)] == [repr(Instr(Op.LOAD, a=5, d=7, n=3, w=8, i0=-2)),
                                                                  repr(Instr(Op.HALT))]
    with pytest.raises(ISAError, match="field a = 4294967296"):
        encode(Instr(Op.LOAD, a=1 << 32))
    with pytest.raises(ISAError, match="unknown opcode 7"):
        decode(7)


def _machine(words: int, bits: int = 64, program=()):
    accel = AccelParams(mem_word_bits=bits, spad_words=256)
    iw = INSTR_BITS // bits
    img = np.zeros(words * bits // 8, np.uint8)
    prog = list(program) + [Instr(Op.HALT)]
    enc = encode_program(prog, bits)
    for i, w in enumerate(enc):
        img[i * bits // 8:(i + 1) * bits // 8] = np.frombuffer(int(w).to_bytes(bits // 8, "little"), np.uint8)
    return accel, img, len(prog) * iw


def test_load_store_scatter_follow_the_memory_model():
    accel, img, base = _machine(64)
    # data at word base: bytes 0x10 0x9f 0xfe ... ; 4-bit elements are nibbles, low first
    img[base * 8:base * 8 + 8] = [0x1f, 0x9e, 0xff, 0x7f, 0x00, 0x80, 0x01, 0x02]
    m = Machine(img, P, accel)
    m.step(Instr(Op.LOAD, a=base, d=0, n=5, w=4, flags=FLAG_SIGNED))
    assert m.spad[:5].tolist() == [-1, 1, -2, -7, -1]
    m.step(Instr(Op.LOAD, a=base, d=0, n=2, w=16))
    assert m.spad[:2].tolist() == [0x9e1f, 0x7fff]
    m.step(Instr(Op.LOAD, a=base, d=0, n=2, w=16, flags=FLAG_SIGNED))
    assert m.spad[:2].tolist() == [0x9e1f - 65536, 0x7fff]
    m.step(Instr(Op.LOAD, a=base, d=0, n=1, w=64, flags=FLAG_SIGNED))
    assert m.spad[0] == int.from_bytes(bytes(img[base * 8:base * 8 + 8]), "little", signed=True)
    # indexed: A = a + spad[b] * s
    img2 = m.mem
    img2[(base + 3) * 8] = 0x55
    m.spad[10] = 1
    m.step(Instr(Op.LOAD, flags=FLAG_INDEXED, a=base + 1, b=10, s=2, d=1, n=1, w=8))
    assert m.spad[1] == 0x55
    # STORE writes whole words: the high bits of the last word become 0
    m.mem[(base + 4) * 8:(base + 6) * 8] = 0xff
    m.spad[20:23] = [-1, 2, 0x1234567]
    m.step(Instr(Op.STORE, a=20, d=base + 4, n=3, w=32))
    got = m.mem[(base + 4) * 8:(base + 6) * 8]
    assert got[:12].tolist() == [0xff] * 4 + [2, 0, 0, 0] + [0x67, 0x45, 0x23, 0x01]
    assert not got[12:].any()
    # SCATTER: fields at d*W + e + o*f + i*k, every other bit unchanged; FLAG_NEG stores -v
    m.mem[(base + 8) * 8:(base + 10) * 8] = 0xAA
    m.spad[30:34] = [1, 2, 3, 4]
    m.step(Instr(Op.SCATTER, a=30, b=2, m=2, n=2, w=4, d=base + 8, e=4, f=64, k=8))
    w0 = int.from_bytes(bytes(m.mem[(base + 8) * 8:(base + 10) * 8]), "little")
    fields = [(w0 >> pos) & 15 for pos in (4, 12, 68, 76)]
    assert fields == [1, 2, 3, 4]
    untouched = w0 & ~sum(15 << pos for pos in (4, 12, 68, 76))
    assert untouched == int.from_bytes(b"\xaa" * 16, "little") & ~sum(15 << pos for pos in (4, 12, 68, 76))
    m.spad[40] = 5
    m.step(Instr(Op.SCATTER, flags=FLAG_NEG, a=40, m=1, n=1, w=8, d=base + 8, e=16))
    assert m.mem[(base + 8) * 8 + 2] == 256 - 5
    with pytest.raises(MachineError, match="straddles"):
        m.step(Instr(Op.SCATTER, a=40, m=1, n=1, w=8, d=base + 8, e=60))


def test_no_halt_is_stopped_and_out_of_range_is_named():
    accel, img, base = _machine(256, program=[Instr(Op.NOP)] * 3)
    img[:] = 0  # NOPs everywhere: never halts
    with pytest.raises(MachineError, match="no HALT within 20 instructions"):
        run(img, P, accel, max_instrs=20)
    accel, img, base = _machine(16, program=[Instr(Op.LOAD, a=15, d=0, n=9, w=32)])
    with pytest.raises(MachineError, match=r"instruction 0 .*outside the memory of 16 words"):
        run(img, P, accel)
    accel, img, base = _machine(32, program=[Instr(Op.MARK, d=30), Instr(Op.NOP)])
    r = run(img, P, accel)
    assert r.instrs == 3 and r.per_op == {"MARK": 1, "NOP": 1, "HALT": 1}


@pytest.mark.parametrize("bits", [64, 256])
def test_engine_equals_reference_on_the_testbench_beats(bits):
    """Every mode, random shapes with 1-3 row tiles and up to 6 beats, edge values (rails, minima,
    maxima, pruned groups) and the longest reductions: the beats make_case drives into the RTL engine,
    laid in memory, give the reference's accumulators on the machine."""
    accel = AccelParams(mem_word_bits=bits, spad_words=1 << 14)
    lay = layouts(P)
    bw = beat_words(P, accel)
    rng = np.random.default_rng(bits)
    edges = (None, "extreme", "min", "max", "pruned")
    cases = [make_case(P, mode, rng, edge=edges[i % 5], requant=False)
             for i in range(5) for mode in ("dense_mv", "dense_mm", "sparse_mv", "sparse_mm", "qk", "pv")]
    cases += [make_case(P, "dense_mv", rng, edge="max", k_beats=P.max_reduction_len // 8, n=4, requant=False,
                        max_k_beats=512, group_beats=8),
              make_case(P, "pv", rng, edge="extreme", k_beats=P.max_keys // 8, n=4, requant=False, max_k_beats=512)]
    for ci, c in enumerate(cases):
        wb = c.beats["weight"]
        nw = len(wb["codes"])
        sc = c.beats["scale"]
        ns = len(sc["s"])
        wbytes = B.pack_le(lay["weight"], wb, nw, bw["weight"] * bits // 8)
        sbytes = B.pack_le(lay["scale"], sc, ns, bw["scale"] * bits // 8) if ns else np.zeros((0, 1), np.uint8)
        words = nw * bw["weight"] + ns * bw["scale"] + 8
        img = np.zeros(words * bits // 8, np.uint8)
        img[:wbytes.size] = wbytes.reshape(-1)
        s0 = nw * bw["weight"]
        img[s0 * bits // 8:s0 * bits // 8 + sbytes.size] = sbytes.reshape(-1)
        m = Machine(img, P, accel)
        a = c.inputs["a"]
        T, K = a.shape
        m.spad[:a.size] = a.reshape(-1)
        mode = {"dense": Mode.DENSE, "sparse": Mode.SPARSE, "qk": Mode.QK, "pv": Mode.PV}[c.mode.split("_")[0]]
        kb = int(c.beats["cmd"]["k_beats"][0, 0])
        gb = int(c.beats["cmd"]["group_beats"][0, 0])
        out = 8192
        m.step(Instr(Op.ENGINE, flags=int(mode), a=0, b=K, m=T, n=kb, k=gb, s=c.tiles, c=0, e=s0, d=out,
                     i0=c.rows + 3, g=0, h=c.rows))
        got = np.stack([m.spad[out + t * (c.rows + 3): out + t * (c.rows + 3) + c.rows] for t in range(T)])
        assert np.array_equal(got, c.expected), (ci, c.mode)
        assert not m.spad[out + c.rows:out + c.rows + 3].any()  # rows >= h dropped


def test_docs_isa_tables_are_current():
    """docs/isa.md's field, flag and opcode tables are generated from hw/isa.py (python -m hw.isa_doc)."""
    from pathlib import Path

    from hw.isa_doc import render

    doc = (Path(__file__).resolve().parents[2] / "docs" / "isa.md").read_text()
    assert render(doc) == doc, "docs/isa.md is stale: run `python -m hw.isa_doc`"
    for op in Op:
        assert f"| `{op.name}` | {int(op)} |" in doc
