"""RESID_ADD: the residual stream's saturating add (``reference.residual_add``), one element per cycle.

The pattern every unit follows: a counter issues reads, the data returns one cycle later, the result
is written (here one cycle after the read, in general after the unit's pipeline). Cycle model:
``cycles(ins) = T*N + 1`` (reads in cycles 1..T*N after start, the last write one cycle later)."""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, signed

from quant.formats import FX

from ..isa import Instr
from ..params import AccelParams
from .base import Unit


def cycles(ins: Instr, params: AccelParams | None = None) -> int:
    return ins.m * ins.n + 1


class ResidAdd(Unit):
    cycles = staticmethod(cycles)

    def elaborate(self, platform):
        m = Module()
        ins = self.instr
        total = Signal(32)
        i = Signal(32)           # next element to read
        reading = Signal()       # a read was issued last cycle (data valid now)
        wr_at = Signal(32)       # element whose data is arriving
        m.d.comb += total.eq(ins.m * ins.n)
        issue = Signal()
        m.d.comb += issue.eq(self.busy & (i < total))
        m.d.comb += [self.rd0.addr.eq(ins.a + i), self.rd1.addr.eq(ins.b + i),
                     self.rd0.en.eq(issue), self.rd1.en.eq(issue)]
        s = Signal(signed(66))
        m.d.comb += s.eq(self.rd0.data + self.rd1.data)
        m.d.comb += [self.wr.en.eq(reading), self.wr.addr.eq(ins.d + wr_at),
                     self.wr.data.eq(Mux(s > FX.max, FX.max, Mux(s < FX.min, FX.min, s)))]
        m.d.sync += reading.eq(issue)
        with m.If(issue):
            m.d.sync += [i.eq(i + 1), wr_at.eq(i)]
        with m.If(self.start):
            m.d.sync += [self.busy.eq(1), i.eq(0), reading.eq(0)]
        with m.Elif(self.busy & ~issue):
            m.d.sync += self.busy.eq(0)
        return m
