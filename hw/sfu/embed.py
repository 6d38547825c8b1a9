"""EMBED: the embedding lookup's scaling, ``spad[d + t*n + i] = saturate_FX(shift_round(spad[a + t*n + i]
* spad[b + 2t], spad[b + 2t + 1]))`` (``reference.embed_lookup`` with row t's multiplier and shift; the
codes of the looked-up rows were brought to the spad by an indexed LOAD).

Per row: one cycle reads the row's (mult, shift) pair through both ports; then one code per cycle
through ``rd0``, each written the cycle after its read (the pair is latched in the first code cycle,
so the last write of a row overlaps the next row's pair read). The product code * mult is exact (a
code is int8, a multiplier 16 bits unsigned). The shift is any the reference accepts (0 .. 2**63 - 1):
``arith.shift_round_signed_i64`` rounds as numpy's int64 does, which is exact for shifts up to 63
(shifts of 24 and more give 0 for every product) and wraps like the reference beyond (the half
2**(s-1) is -2**63 at s = 64 and 0 from 65 on, and every shift from 65 on acts as 65, so the shift
word is clamped to 127 first); ``multipliers_for`` emits 0..62. Cycle model: ``cycles = T * (N + 1) + 1`` (N = 0: 1)."""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, signed

from quant.formats import EMBED_CODE, FX, REQ_MULT

from ..isa import Instr
from ..params import AccelParams
from . import arith as A
from .base import Unit


def cycles(ins: Instr, params: AccelParams | None = None) -> int:
    return ins.m * (ins.n + 1) + 1 if ins.n else 1


class Embed(Unit):
    cycles = staticmethod(cycles)

    def elaborate(self, platform):
        m = Module()
        ins = self.instr
        t = Signal(32)           # row
        i = Signal(32)           # next code of the row
        j = Signal(64)           # a + t*n + i (and d + t*n + i for the write)
        pair = Signal()          # this cycle reads row t's (mult, shift)
        active = Signal()
        m.d.comb += active.eq(self.busy & (t < ins.m) & (ins.n != 0))
        issue = Signal()         # this cycle reads a code
        m.d.comb += issue.eq(active & ~pair)
        m.d.comb += [self.rd0.en.eq(active), self.rd1.en.eq(active & pair),
                     self.rd0.addr.eq(Mux(pair, ins.b + 2 * t, ins.a + j)), self.rd1.addr.eq(ins.b + 2 * t + 1)]
        first = Signal()         # the pair's data is on the ports now
        m.d.sync += first.eq(active & pair)
        mult = Signal(REQ_MULT.bits)
        shift = Signal(signed(8))  # the shift word clamped to 0..127 (see the module doc)
        sw = self.rd1.data
        with m.If(first):
            m.d.sync += [mult.eq(self.rd0.data[:REQ_MULT.bits]),
                         shift.eq(Mux(sw < 0, 0, Mux(sw > 127, 127, sw)))]
        with m.If(active):
            with m.If(pair):
                m.d.sync += pair.eq(0)
            with m.Elif(i + 1 == ins.n):
                m.d.sync += [i.eq(0), t.eq(t + 1), j.eq(j + 1), pair.eq(1)]
            with m.Else():
                m.d.sync += [i.eq(i + 1), j.eq(j + 1)]
        # the code read last cycle
        v = Signal()
        at = Signal(64)
        m.d.sync += v.eq(issue)
        with m.If(issue):
            m.d.sync += at.eq(j)
        code = self.rd0.data[:EMBED_CODE.bits].as_signed()
        prod = Signal(signed(EMBED_CODE.bits + REQ_MULT.bits + 1))
        m.d.comb += prod.eq(code * mult)
        y = A.shift_round_signed_i64(m, prod, shift, "embed_y")
        m.d.comb += [self.wr.en.eq(v), self.wr.addr.eq(ins.d + at),
                     self.wr.data.eq(A.saturate(m, y, FX.min, FX.max, 64, "embed_sat"))]
        with m.If(self.start):
            m.d.sync += [self.busy.eq(1), t.eq(0), i.eq(0), j.eq(0), pair.eq(1), v.eq(0), first.eq(0)]
        with m.Elif(self.busy & ~active):
            m.d.sync += self.busy.eq(0)
        return m
