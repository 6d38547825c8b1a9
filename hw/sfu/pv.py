"""PV_WEIGHTS and PV_OUT: the P·V fold around the engine's PV mode (``reference.pv_weights``,
``reference.pv_output``), on the shared row sequencer (``rows.py``).

PV_WEIGHTS, per query row of N keys: every step reads e[t, j] (rd0) and v_range[j] (rd1). Pass 1
keeps wmax = max e*r (a 17 x 32-bit product, 49-bit register) and esum = sum e; pass 2 reads both
again and writes round_div(127*e*r, wmax) (0 when wmax = 0); two last steps write wmax to
spad[e + t] and esum to spad[f + t]. Steps per row 2N + 2, cycles T*(2N + 2) + 1.

PV_OUT, per row: step 0 reads wmax[t] (rd0) and esum[t] (rd1) together; when they arrive the row's
constants are registered: mw, ew = mantissa16(wmax), me, ee = mantissa16(1905*esum), the reciprocal
rq = round_div(2**31, me) (one division per row), K = mw*rq (32 bits) and the shift
s = 31 + ee - ew (-21..93). Steps 1..N read acc[t, j] and write saturate_FX(shift_round_signed(
acc*K, s)), the rounding shift in int64 semantics (``arith.shift_round_signed_i64``), so even the
shifts of 64 and more that only extreme operands reach equal the reference. Steps per row N + 1,
cycles T*(N + 1) + 1.

Operands are what the reference accepts: e in 0..2**16 and ranges below 2**32 (the units read the
low 17 and 32 bits), |acc| < 2**24 (25 bits), wmax and 1905*esum below 2**62."""

from __future__ import annotations

from amaranth.hdl import Const, Module, Mux, Signal, signed, unsigned

from quant.formats import ACT_QMAX, FX, KV_QMAX, RECIP_NUM_BITS

from ..isa import Instr
from ..params import AccelParams
from . import arith as A
from .base import Unit
from .rows import RowSequencer


def pv_weights_cycles(ins: Instr, params: AccelParams | None = None) -> int:
    return ins.m * (2 * ins.n + 2) + 1


def pv_out_cycles(ins: Instr, params: AccelParams | None = None) -> int:
    return ins.m * (ins.n + 1) + 1


class PvWeights(Unit):
    cycles = staticmethod(pv_weights_cycles)

    def elaborate(self, platform):
        m = Module()
        ins = self.instr
        n = ins.n
        sq = RowSequencer(m, self, 2 * n + 2, n)
        col = Signal(33)
        m.d.comb += col.eq(Mux(sq.j < n, sq.j, sq.j - n))
        rd = sq.issue & (sq.j < 2 * n)
        m.d.comb += [self.rd0.addr.eq(ins.a + sq.off + col), self.rd0.en.eq(rd),
                     self.rd1.addr.eq(ins.b + col), self.rd1.en.eq(rd)]
        e, r = Signal(unsigned(17)), Signal(unsigned(32))
        m.d.comb += [e.eq(self.rd0.data[:17]), r.eq(self.rd1.data[:32])]
        w = Signal(unsigned(49))
        m.d.comb += w.eq(e * r)
        wmax, esum = Signal(unsigned(49)), Signal(unsigned(64))
        pa = A.round_div(m, w * ACT_QMAX, wmax, 58, "pvw_pa")
        pass1 = sq.v1 & (sq.j1 < n)
        pass2 = sq.v1 & (sq.j1 >= n) & (sq.j1 < 2 * n)
        w_max = sq.v1 & (sq.j1 == 2 * n)
        w_sum = sq.v1 & (sq.j1 == 2 * n + 1)
        with m.If(pass1):
            m.d.sync += esum.eq(esum + e)
            with m.If(w > wmax):
                m.d.sync += wmax.eq(w)
        with m.If(w_sum | self.start):
            m.d.sync += [wmax.eq(0), esum.eq(0)]
        m.d.comb += self.wr.en.eq(pass2 | w_max | w_sum)
        with m.If(pass2):
            m.d.comb += [self.wr.addr.eq(ins.d + sq.off1 + (sq.j1 - n)),
                         self.wr.data.eq(Mux(wmax == 0, 0, pa))]
        with m.Elif(w_max):
            m.d.comb += [self.wr.addr.eq(ins.e + sq.t1), self.wr.data.eq(wmax)]
        with m.Else():
            m.d.comb += [self.wr.addr.eq(ins.f + sq.t1), self.wr.data.eq(esum)]
        return m


class PvOut(Unit):
    cycles = staticmethod(pv_out_cycles)

    def elaborate(self, platform):
        m = Module()
        ins = self.instr
        n = ins.n
        sq = RowSequencer(m, self, n + 1, n)
        head = sq.j == 0
        m.d.comb += [self.rd0.addr.eq(Mux(head, ins.b + sq.t, ins.a + sq.off + sq.j - 1)),
                     self.rd0.en.eq(sq.issue),
                     self.rd1.addr.eq(ins.c + sq.t), self.rd1.en.eq(sq.issue & head)]
        # the row's constants, when wmax and esum arrive
        wmax, esum = Signal(unsigned(62)), Signal(unsigned(62))
        m.d.comb += [wmax.eq(self.rd0.data[:62]), esum.eq(self.rd1.data[:62] * (ACT_QMAX * KV_QMAX))]
        mw, ew = A.mantissa16(m, wmax, 62, "pvo_w")
        me, ee = A.mantissa16(m, esum, 62, "pvo_e")
        rq = A.round_div(m, Const(1 << RECIP_NUM_BITS, 33), me, 34, "pvo_rq")
        k, s = Signal(unsigned(32)), Signal(signed(8))  # mw < 2**16, rq <= 2**16: K < 2**32
        with m.If(sq.v1 & (sq.j1 == 0)):
            m.d.sync += [k.eq(mw * rq), s.eq(RECIP_NUM_BITS + ee - ew)]
        # the elements
        acc = Signal(signed(25))
        m.d.comb += acc.eq(self.rd0.data[:25])
        prod = Signal(signed(59))
        m.d.comb += prod.eq(acc * k)
        o = A.saturate(m, A.shift_round_signed_i64(m, prod, s, "pvo_srs"), FX.min, FX.max, 64, "pvo_o")
        m.d.comb += [self.wr.en.eq(sq.v1 & (sq.j1 != 0)),
                     self.wr.addr.eq(ins.d + sq.off1 + sq.j1 - 1), self.wr.data.eq(o)]
        return m
