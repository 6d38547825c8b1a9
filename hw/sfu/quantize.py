"""QUANT_ACT and QUANT_KV: the per-token quantizers (``reference.quantize_activations``,
``reference.quantize_kv``), two passes over each row on the shared row sequencer (``rows.py``).

QUANT_ACT, per row of N: pass 1 reads x and keeps amax = max |x| (a register); pass 2 reads x again
and writes round_div(127*x, amax) (0 when amax = 0); one more step writes amax to spad[e + t]. Steps
per row 2N + 1, cycles T*(2N + 1) + 1.

QUANT_KV, per row of N: pass 1 keeps lo = min(x, 0), hi = max(x, 0) (both registers start at 0, which
is the reference's widening to include 0); r = hi - lo and zero = round_div(-15*lo, r) are
combinational from them; pass 2 writes clamp(round_div(15*x, r) + zero, 0, 15) (0 when r = 0); two
more steps write zero to spad[e + t] and r to spad[f + t]. Steps per row 2N + 2, cycles
T*(2N + 2) + 1.

Inputs are Q15.16 (the reference refuses anything else): the units read the low 32 bits of each spad
element as signed. The divisions are combinational ``//`` (``arith.round_div``) in this first version."""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, signed, unsigned

from quant.formats import ACT_QMAX, KV_QMAX

from ..isa import Instr
from ..params import AccelParams
from . import arith as A
from .base import Unit
from .rows import RowSequencer


def quant_act_cycles(ins: Instr, params: AccelParams | None = None) -> int:
    return ins.m * (2 * ins.n + 1) + 1


def quant_kv_cycles(ins: Instr, params: AccelParams | None = None) -> int:
    return ins.m * (2 * ins.n + 2) + 1


class QuantAct(Unit):
    cycles = staticmethod(quant_act_cycles)

    def elaborate(self, platform):
        m = Module()
        ins = self.instr
        n = ins.n
        sq = RowSequencer(m, self, 2 * n + 1, n)
        # issue: both passes read x[t, j mod N]
        col = Signal(33)
        m.d.comb += col.eq(Mux(sq.j < n, sq.j, sq.j - n))
        m.d.comb += [self.rd0.addr.eq(ins.a + sq.off + col), self.rd0.en.eq(sq.issue & (sq.j < 2 * n))]
        # arrival
        x = Signal(signed(32))
        m.d.comb += x.eq(self.rd0.data[:32])
        ax = Signal(unsigned(32))
        m.d.comb += ax.eq(Mux(x < 0, -x, x))
        amax = Signal(unsigned(32))
        code = A.round_div(m, x * ACT_QMAX, amax, 42, "qa_code")
        pass1 = sq.v1 & (sq.j1 < n)
        pass2 = sq.v1 & (sq.j1 >= n) & (sq.j1 < 2 * n)
        last = sq.v1 & (sq.j1 == 2 * n)
        with m.If(pass1 & (ax > amax)):
            m.d.sync += amax.eq(ax)
        with m.If(last | self.start):
            m.d.sync += amax.eq(0)
        m.d.comb += self.wr.en.eq(pass2 | last)
        with m.If(pass2):
            m.d.comb += [self.wr.addr.eq(ins.d + sq.off1 + (sq.j1 - n)),
                         self.wr.data.eq(Mux(amax == 0, 0, code))]
        with m.Else():
            m.d.comb += [self.wr.addr.eq(ins.e + sq.t1), self.wr.data.eq(amax)]
        return m


class QuantKV(Unit):
    cycles = staticmethod(quant_kv_cycles)

    def elaborate(self, platform):
        m = Module()
        ins = self.instr
        n = ins.n
        sq = RowSequencer(m, self, 2 * n + 2, n)
        col = Signal(33)
        m.d.comb += col.eq(Mux(sq.j < n, sq.j, sq.j - n))
        m.d.comb += [self.rd0.addr.eq(ins.a + sq.off + col), self.rd0.en.eq(sq.issue & (sq.j < 2 * n))]
        x = Signal(signed(32))
        m.d.comb += x.eq(self.rd0.data[:32])
        lo, hi = Signal(signed(32)), Signal(signed(32))
        r = Signal(unsigned(33))
        m.d.comb += r.eq(hi - lo)
        zero = A.round_div(m, lo * -KV_QMAX, r, 38, "qkv_zero")
        q = A.round_div(m, x * KV_QMAX, r, 38, "qkv_q")
        qz = Signal(signed(41))
        m.d.comb += qz.eq(q + zero)
        code = A.saturate(m, qz, 0, KV_QMAX, 41, "qkv_code")
        pass1 = sq.v1 & (sq.j1 < n)
        pass2 = sq.v1 & (sq.j1 >= n) & (sq.j1 < 2 * n)
        w_zero = sq.v1 & (sq.j1 == 2 * n)
        w_range = sq.v1 & (sq.j1 == 2 * n + 1)
        with m.If(pass1):
            with m.If(x < lo):
                m.d.sync += lo.eq(x)
            with m.If(x > hi):
                m.d.sync += hi.eq(x)
        with m.If(w_range | self.start):
            m.d.sync += [lo.eq(0), hi.eq(0)]
        m.d.comb += self.wr.en.eq(pass2 | w_zero | w_range)
        with m.If(pass2):
            m.d.comb += [self.wr.addr.eq(ins.d + sq.off1 + (sq.j1 - n)),
                         self.wr.data.eq(Mux(r == 0, 0, code))]
        with m.Elif(w_zero):
            m.d.comb += [self.wr.addr.eq(ins.e + sq.t1), self.wr.data.eq(Mux(r == 0, 0, zero))]
        with m.Else():
            m.d.comb += [self.wr.addr.eq(ins.f + sq.t1), self.wr.data.eq(r)]
        return m
