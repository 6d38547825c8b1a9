"""SILU_MUL: SwiGLU, ``spad[d + i] = reference.silu_mul(spad[a + i], spad[b + i])`` for i < T*N, one
element per cycle in a three-stage pipeline.

* cycle c: gate g and up u read (both ports);
* c + 1: the sigmoid's table address: g clipped to [-16, 16), offset, index = off >> 9 and fraction
  off & 511; the ROM (``reference.sigmoid_table()``, 4097 entries of 17 bits, two synchronous read
  ports) reads entries index and index + 1; g, u and the fraction move on;
* c + 2: sigmoid = t0 + shift_round((t1 - t0) * fraction, 9) (0 below -16, 2**16 from 16 on),
  s = shift_round(g * sigmoid, 16), h = saturate_FX(shift_round(s * u, 16)) written.

Every product is exact at its full width (|s * u| < 2**63). Cycle model: ``cycles = T*N + 2``."""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, signed, unsigned
from amaranth.lib.memory import Memory

from quant import formats as F
from quant import reference as R
from quant.formats import FX

from ..isa import Instr
from ..params import AccelParams
from . import arith as A
from .base import Unit

_LO = -F.SIGMOID_RANGE << F.FX_FRAC_BITS
_HI = F.SIGMOID_RANGE << F.FX_FRAC_BITS
_ONE = 1 << F.SIGMOID_FRAC


def cycles(ins: Instr, params: AccelParams | None = None) -> int:
    return ins.m * ins.n + 2


class SiluMul(Unit):
    cycles = staticmethod(cycles)

    def elaborate(self, platform):
        m = Module()
        ins = self.instr
        table = R.sigmoid_table()
        m.submodules.rom = rom = Memory(shape=unsigned(int(table.max()).bit_length()), depth=table.size,
                                        init=[int(v) for v in table])
        p0, p1 = rom.read_port(domain="sync"), rom.read_port(domain="sync")

        total = Signal(32)
        i = Signal(32)
        issue = Signal()
        m.d.comb += total.eq(ins.m * ins.n)
        m.d.comb += issue.eq(self.busy & (i < total))
        m.d.comb += [self.rd0.addr.eq(ins.a + i), self.rd1.addr.eq(ins.b + i),
                     self.rd0.en.eq(issue), self.rd1.en.eq(issue)]
        # stage 1: operands arrive, table addresses
        v1 = Signal()
        at1 = Signal(32)
        g, u = self.rd0.data, self.rd1.data
        clip = Signal(signed(33))
        m.d.comb += clip.eq(Mux(g < _LO, _LO, Mux(g > _HI - 1, _HI - 1, g)))
        off = Signal(unsigned(F.SIGMOID_RANGE.bit_length() + F.FX_FRAC_BITS + 1))
        m.d.comb += off.eq(clip - _LO)
        idx = Signal(range(table.size))
        m.d.comb += idx.eq(off >> F.SIGMOID_STEP_SHIFT)
        m.d.comb += [p0.addr.eq(idx), p1.addr.eq(idx + 1), p0.en.eq(v1), p1.en.eq(v1)]
        # stage 2: table entries arrive
        v2 = Signal()
        at2 = Signal(32)
        g2, u2 = Signal(signed(32)), Signal(signed(32))
        fr2 = Signal(F.SIGMOID_STEP_SHIFT)
        below2, above2 = Signal(), Signal()
        with m.If(v1):
            m.d.sync += [g2.eq(g), u2.eq(u), fr2.eq(off[:F.SIGMOID_STEP_SHIFT]), at2.eq(at1),
                         below2.eq(g < _LO), above2.eq(g >= _HI)]
        m.d.sync += [v1.eq(issue), v2.eq(v1)]
        with m.If(issue):
            m.d.sync += [i.eq(i + 1), at1.eq(i)]
        t0, t1 = p0.data, p1.data
        dif = Signal(signed(19))
        m.d.comb += dif.eq(t1 - t0)
        prod = Signal(signed(29))
        m.d.comb += prod.eq(dif * fr2)
        interp = A.shift_round(m, prod, F.SIGMOID_STEP_SHIFT, 29, "sig_interp")
        sig = Signal(unsigned(18))
        m.d.comb += sig.eq(Mux(below2, 0, Mux(above2, _ONE, t0 + interp)))
        gs = Signal(signed(51))
        m.d.comb += gs.eq(g2 * sig)
        s = A.shift_round(m, gs, F.SIGMOID_FRAC, 51, "silu_s")
        su = Signal(signed(68))
        m.d.comb += su.eq(s * u2)
        h = A.shift_round(m, su, F.FX_FRAC_BITS, 68, "silu_h")
        m.d.comb += [self.wr.en.eq(v2), self.wr.addr.eq(ins.d + at2),
                     self.wr.data.eq(A.saturate(m, h, FX.min, FX.max, 68, "silu_sat"))]
        with m.If(self.start):
            m.d.sync += [self.busy.eq(1), i.eq(0), v1.eq(0), v2.eq(0)]
        with m.Elif(self.busy & ~issue & ~v1):
            m.d.sync += self.busy.eq(0)
        return m
