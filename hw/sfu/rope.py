"""ROPE: rotary position embedding of T tokens x k heads x D channels (``reference.rope_cos_sin`` with the
standard table, then ``reference.rope_rotate``), channel j rotated with channel j + D/2 of its head.

Token t's position is ``p = min(i0 + t, h)``. A pair (t, head, j) takes two cycles (the write port's
bound: two results per pair), pipelined:
  1. x1 = x[t, head, j] arrives on port 0 and theta_j on port 1 (both read the cycle before); the
     phase ``p * theta_j mod 2**32`` (a 32 x 32-bit product, low half), its nearest table index
     ``(phase + 2**17) >> 18`` and the cosine's index (+ a quarter turn, 2**12, mod 2**14) address the
     two read ports of the 2**14-entry Q1.15 sine ROM (``reference.rope_params(..., scaling=1)``'s
     table, synchronous read); x2 = x[t, head, j + D/2] is read; the previous pair's y2 is written.
  2. x2, sin and cos arrive: y1 = saturate(shift_round(x1 cos - x2 sin, 15)) is written, y2 =
     saturate(shift_round(x2 cos + x1 sin, 15)) held in a register; the next pair's x1 and theta
     are read.
Cycle model: ``2 * P + 2`` for P = T * k * (D / 2) pairs (one cycle to issue the first reads, one to
write the last y2), 1 when P = 0."""

from __future__ import annotations

import numpy as np
from amaranth.hdl import Module, Mux, Signal, signed, unsigned
from amaranth.lib.memory import Memory

from quant import formats as F
from quant import reference as R

from ..isa import Instr
from ..params import AccelParams
from . import arith as A
from .base import Unit


def cycles(ins: Instr, params: AccelParams | None = None) -> int:
    pairs = ins.m * ins.k * (ins.n // 2)
    return 2 * pairs + 2 if pairs else 1


def sine_table() -> np.ndarray:
    """The ROM's contents: the reference's standard (scaling 1) table, one source of truth."""
    return R.rope_params(np.zeros(0), 1.0)[1]


class Rope(Unit):
    cycles = staticmethod(cycles)

    def elaborate(self, platform):
        m = Module()
        ins = self.instr
        tb = F.ROPE_TABLE_BITS
        table = sine_table()
        m.submodules.sine = rom = Memory(shape=signed(F.ROPE_FRAC + 2), depth=table.size,
                                         init=[int(v) for v in table])
        sin_p = rom.read_port(domain="sync")
        cos_p = rom.read_port(domain="sync")

        half = Signal(31)
        m.d.comb += half.eq(ins.n >> 1)
        t, hd, j = Signal(32), Signal(32), Signal(31)
        off = Signal(64)                    # (t * k + head) * D
        x1 = Signal(signed(32))
        y2 = Signal(signed(64))

        # the token's position, clamped at h
        ip = Signal(signed(66))
        m.d.comb += ip.eq(ins.i0 + t)
        pos = Signal(signed(66))
        m.d.comb += pos.eq(Mux(ip > ins.h, ins.h, ip))
        # phase and table indices (stage 1, theta on port 1)
        phase = Signal(unsigned(F.ROPE_PHASE_BITS))
        m.d.comb += phase.eq(pos[:32] * self.rd1.data[:32])
        rnd = Signal(unsigned(F.ROPE_PHASE_BITS + 1))
        m.d.comb += rnd.eq(phase + (1 << (F.ROPE_PHASE_BITS - tb - 1)))
        idx = Signal(unsigned(tb))
        m.d.comb += idx.eq(rnd[F.ROPE_PHASE_BITS - tb:F.ROPE_PHASE_BITS])
        m.d.comb += [sin_p.addr.eq(idx), cos_p.addr.eq(idx + (1 << (tb - 2)))]
        # the rotation (stage 2, x2 on port 0, sin/cos from the ROM)
        x2 = Signal(signed(32))
        m.d.comb += x2.eq(self.rd0.data[:32])
        v1, v2 = Signal(signed(50)), Signal(signed(50))
        m.d.comb += [v1.eq(x1 * cos_p.data - x2 * sin_p.data), v2.eq(x2 * cos_p.data + x1 * sin_p.data)]
        y1 = A.saturate(m, A.shift_round(m, v1, F.ROPE_FRAC, 52, "rp_1"), F.FX.min, F.FX.max, 64, "rp_s1")
        y2_now = A.saturate(m, A.shift_round(m, v2, F.ROPE_FRAC, 52, "rp_2"), F.FX.min, F.FX.max, 64, "rp_s2")

        # the pair after the current one
        nj, nhd, nt, noff = Signal(31), Signal(32), Signal(32), Signal(64)
        last = Signal()
        m.d.comb += [nj.eq(j + 1), nhd.eq(hd), nt.eq(t), noff.eq(off)]
        with m.If(j + 1 == half):
            m.d.comb += [nj.eq(0), nhd.eq(hd + 1), noff.eq(off + ins.n)]
            with m.If(hd + 1 == ins.k):
                m.d.comb += [nhd.eq(0), nt.eq(t + 1)]
        m.d.comb += last.eq((j + 1 == half) & (hd + 1 == ins.k) & (t + 1 == ins.m))

        def issue_x1_theta(o, jj):
            m.d.comb += [self.rd0.addr.eq(ins.a + o + jj), self.rd0.en.eq(1),
                         self.rd1.addr.eq(ins.b + jj), self.rd1.en.eq(1)]

        wj = Signal(31)                     # the pair whose y2 is still to be written
        woff = Signal(64)
        pending = Signal()

        def write_y2():
            m.d.comb += [self.wr.addr.eq(ins.d + woff + wj + half), self.wr.data.eq(y2), self.wr.en.eq(1)]

        with m.FSM() as fsm:
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [t.eq(0), hd.eq(0), j.eq(0), off.eq(0), pending.eq(0)]
                    m.next = "FIRST"
            with m.State("FIRST"):
                with m.If((ins.m == 0) | (ins.k == 0) | (half == 0)):
                    m.next = "IDLE"
                with m.Else():
                    issue_x1_theta(0, 0)
                    m.next = "PHASE"
            with m.State("PHASE"):      # x1, theta arrive: ROM addresses; read x2; the previous y2 out
                m.d.sync += x1.eq(self.rd0.data[:32])
                m.d.comb += [sin_p.en.eq(1), cos_p.en.eq(1)]
                m.d.comb += [self.rd0.addr.eq(ins.a + off + j + half), self.rd0.en.eq(1)]
                with m.If(pending):
                    write_y2()
                m.next = "ROTATE"
            with m.State("ROTATE"):     # x2, sin, cos arrive: y1 out, y2 held; the next pair's reads
                m.d.comb += [self.wr.addr.eq(ins.d + off + j), self.wr.data.eq(y1), self.wr.en.eq(1)]
                m.d.sync += [y2.eq(y2_now), wj.eq(j), woff.eq(off), pending.eq(1),
                             j.eq(nj), hd.eq(nhd), t.eq(nt), off.eq(noff)]
                with m.If(last):
                    m.next = "DRAIN"
                with m.Else():
                    issue_x1_theta(noff, nj)
                    m.next = "PHASE"
            with m.State("DRAIN"):
                write_y2()
                m.next = "IDLE"
        m.d.comb += self.busy.eq(~fsm.ongoing("IDLE"))
        return m
