"""ARGMAX: greedy next token, ``spad[d + t] = reference.argmax_first(row t of T x N)``, two logits per
cycle.

Each cycle reads the pair (2j, 2j+1) of a row through both read ports; the cycle after, the pair's
winner (the first of the two when they are equal; the second alone is masked off past an odd N) meets
the running best, which it replaces only when strictly larger, so the first index of the maximum
stays. Logits are compared as the full signed 64 bits the reference accepts. The pipeline runs
through row boundaries: a pair carries "first of its row" (the best is replaced, not compared) and
"last of its row" (the row's final index is written in that cycle). Cycle model:
``cycles = T * ceil(N/2) + 1`` (reads in cycles 1..T*ceil(N/2), the last write one cycle later).
A row of N = 0 reads and writes nothing (the reference refuses it)."""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, signed

from ..isa import Instr
from ..params import AccelParams
from .base import SPAD_BITS, Unit


def cycles(ins: Instr, params: AccelParams | None = None) -> int:
    return ins.m * ((ins.n + 1) // 2) + 1


class Argmax(Unit):
    cycles = staticmethod(cycles)

    def elaborate(self, platform):
        m = Module()
        ins = self.instr
        t = Signal(32)           # row being read
        j = Signal(33)           # next element of the row to read (even)
        base = Signal(64)        # a + t*N
        issue = Signal()
        m.d.comb += issue.eq(self.busy & (t < ins.m) & (ins.n != 0))
        m.d.comb += [self.rd0.addr.eq(base + j), self.rd1.addr.eq(base + j + 1),
                     self.rd0.en.eq(issue), self.rd1.en.eq(issue)]
        last_pair = Signal()
        m.d.comb += last_pair.eq(j + 2 >= ins.n)
        # the pair read last cycle
        v = Signal()             # data valid now
        v_first = Signal()       # the pair opens its row
        v_last = Signal()        # the pair closes its row
        v_two = Signal()         # the second element is inside the row
        v_idx = Signal(32)       # index of the first element of the pair
        v_row = Signal(32)       # its row
        m.d.sync += [v.eq(issue)]
        with m.If(issue):
            m.d.sync += [v_first.eq(j == 0), v_last.eq(last_pair), v_two.eq(j + 1 < ins.n),
                         v_idx.eq(j), v_row.eq(t)]
            with m.If(last_pair):
                m.d.sync += [j.eq(0), t.eq(t + 1), base.eq(base + ins.n)]
            with m.Else():
                m.d.sync += j.eq(j + 2)
        x0, x1 = self.rd0.data, self.rd1.data
        c_val = Signal(signed(SPAD_BITS))
        c_idx = Signal(32)
        second = Signal()
        m.d.comb += second.eq(v_two & (x1 > x0))
        m.d.comb += [c_val.eq(Mux(second, x1, x0)), c_idx.eq(Mux(second, v_idx + 1, v_idx))]
        best = Signal(signed(SPAD_BITS))
        best_idx = Signal(32)
        n_val = Signal(signed(SPAD_BITS))
        n_idx = Signal(32)
        take = Signal()
        m.d.comb += take.eq(v_first | (c_val > best))
        m.d.comb += [n_val.eq(Mux(take, c_val, best)), n_idx.eq(Mux(take, c_idx, best_idx))]
        with m.If(v):
            m.d.sync += [best.eq(n_val), best_idx.eq(n_idx)]
        m.d.comb += [self.wr.en.eq(v & v_last), self.wr.addr.eq(ins.d + v_row), self.wr.data.eq(n_idx)]
        with m.If(self.start):
            m.d.sync += [self.busy.eq(1), t.eq(0), j.eq(0), base.eq(ins.a), v.eq(0)]
        with m.Elif(self.busy & ~issue):
            m.d.sync += self.busy.eq(0)
        return m
