"""The row sequencer the multi-pass units share (QUANT_ACT, QUANT_KV, PV_WEIGHTS, PV_OUT).

An instruction over T = ``m`` rows runs ``S`` steps per row, one step per cycle, rows in order: in the
cycle of step (t, j) the unit issues that step's spad reads (``issue``, ``t``, ``j``, ``off`` = t*N);
the step's data arrives one cycle later, when the same coordinates are in the ``*1`` registers
(``v1``, ``t1``, ``j1``, ``off1``) and the unit acts on it (accumulate, or write one result). ``busy``
is high from the cycle after ``start`` through the cycle the last step's data arrives, so a unit built
on it takes exactly ``T*S + 1`` cycles (T = 0: 1 cycle), the count its ``cycles`` model returns.
Running offsets (``off`` += N per row) replace a T x N multiplier in the address path."""

from __future__ import annotations

from amaranth.hdl import Module, Signal


class RowSequencer:
    def __init__(self, m: Module, unit, steps, n):
        """``steps``: the per-row step count S (an expression of the instruction's fields); ``n``: the
        row length N that ``off`` advances by."""
        ins = unit.instr
        self.t, self.j, self.off = Signal(32), Signal(34), Signal(64)
        self.t1, self.j1, self.off1 = Signal(32), Signal(34), Signal(64)
        self.v1 = Signal()
        self.issue = Signal()
        self.steps = Signal(34)
        m.d.comb += [self.steps.eq(steps), self.issue.eq(unit.busy & (self.t < ins.m))]
        m.d.sync += self.v1.eq(self.issue)
        with m.If(self.issue):
            m.d.sync += [self.t1.eq(self.t), self.j1.eq(self.j), self.off1.eq(self.off)]
            with m.If(self.j + 1 == self.steps):
                m.d.sync += [self.j.eq(0), self.t.eq(self.t + 1), self.off.eq(self.off + n)]
            with m.Else():
                m.d.sync += self.j.eq(self.j + 1)
        with m.If(unit.start):
            m.d.sync += [unit.busy.eq(1), self.t.eq(0), self.j.eq(0), self.off.eq(0), self.v1.eq(0)]
        with m.Elif(unit.busy & ~self.issue):
            m.d.sync += unit.busy.eq(0)
