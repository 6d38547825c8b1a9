"""RMSNORM: ``spad[d..] (T x N) = reference.rmsnorm(x = spad[a..] (T x N), g = spad[b..b+N), eps_term = i0)``.

Four phases per row on the shared row sequencer (``hw/sfu/rows.py``: one step a cycle, a step's data
acted on the cycle after it is read), P = ceil(N/2):

* A, P steps: the pair x[2i], x[2i+1] read through both ports; amax = max |x| (32 bits unsigned: 2**31
  for -2**31). An odd N masks the pair's second element.
* B, P steps: the row read again in pairs; each element shifted by k = max(bit_length(amax) - 23,
  kmin) (``arith.shift_round_signed``; kmin = -((62 - bit_length(eps_term)) // 2) is fixed by i0),
  squared (two 24 x 24-bit squarers) and summed into ss (64 bits: < 2**63 for N <= 2**16).
* R, 2 steps, the reciprocal square root exactly as ``reference.rsqrt``: step 0 adds the eps term
  shift_round_signed(eps_term, 2k), takes v = max(ss, 1), e = (bit_length(v) - 1) // 2, the Q2.30
  mantissa mq = v * 2**(30 - 2e) (truncated) and reads the 192-entry table
  (``reference.rsqrt_table()``, a 256 x 16-bit ROM, entries below 64 unused) at mq >> 24; step 1 does
  the Newton step r = min(shift_round(y * (3 * 2**30 - shift_round(mq * y*y, 30)), 31), 2**15).
* C, N steps: x[i] and g[i] read; y = saturate_FX(shift_round(shift_round_signed(x*r, 15 + k) * g, e))
  written to spad[d + t*N + i].

A row with ss = 0 (all zero, eps_term 0) gives zeros without a special case: every x is 0 then.
Inputs are Q15.16 (the low 32 bits of each spad word). Cycle model:
``cycles = T * (2*ceil(N/2) + 2 + N) + 1`` (T = 0: 1)."""

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
from .rows import RowSequencer


def steps(n: int) -> int:
    """Sequencer steps per row of n elements."""
    return 2 * ((n + 1) // 2) + 2 + n


def cycles(ins: Instr, params: AccelParams | None = None) -> int:
    return ins.m * steps(ins.n) + 1


class RmsNorm(Unit):
    cycles = staticmethod(cycles)

    def elaborate(self, platform):
        m = Module()
        ins = self.instr
        table = R.rsqrt_table()
        m.submodules.rom = rom = Memory(shape=unsigned(int(table.max()).bit_length()), depth=table.size,
                                        init=[int(v) for v in table])
        rp = rom.read_port(domain="sync")

        pairs = Signal(33)
        m.d.comb += pairs.eq((ins.n + 1) >> 1)
        seq = RowSequencer(m, self, 2 * pairs + 2 + ins.n, ins.n)

        # ---- issue side (step j of row t) ----
        j = seq.j
        in_a = j < pairs
        in_b = (j >= pairs) & (j < 2 * pairs)
        in_c = j >= 2 * pairs + 2
        pidx = Signal(34)        # pair index in A and B
        m.d.comb += pidx.eq(Mux(in_a, j, j - pairs))
        ci = Signal(34)          # element index in C
        m.d.comb += ci.eq(j - 2 * pairs - 2)
        row = ins.a + seq.off
        m.d.comb += [
            self.rd0.addr.eq(Mux(in_c, row + ci, row + 2 * pidx)),
            self.rd1.addr.eq(Mux(in_c, ins.b + ci, row + 2 * pidx + 1)),
            self.rd0.en.eq(seq.issue & (in_a | in_b | in_c)),
            self.rd1.en.eq(seq.issue & (in_a | in_b | in_c)),
        ]

        # ---- data side (step j1 of row t1, one cycle later) ----
        j1, v1 = seq.j1, seq.v1
        d_a = v1 & (j1 < pairs)
        d_b = v1 & (j1 >= pairs) & (j1 < 2 * pairs)
        d_r0 = v1 & (j1 == 2 * pairs)
        d_r1 = v1 & (j1 == 2 * pairs + 1)
        d_c = v1 & (j1 >= 2 * pairs + 2)
        pidx1 = Signal(34)
        m.d.comb += pidx1.eq(Mux(j1 < pairs, j1, j1 - pairs))
        two = Signal()           # the pair's second element lies inside the row
        m.d.comb += two.eq(2 * pidx1 + 1 < ins.n)
        x0 = self.rd0.data[:32].as_signed()
        x1 = self.rd1.data[:32].as_signed()

        # A: amax
        amax = Signal(32)
        a0, a1 = Signal(32), Signal(32)
        m.d.comb += [a0.eq(Mux(x0 < 0, -x0, x0)), a1.eq(Mux(two, Mux(x1 < 0, -x1, x1), 0))]
        am = Signal(32)
        m.d.comb += am.eq(Mux(a0 > a1, a0, a1))
        with m.If(d_a):
            m.d.sync += amax.eq(Mux((j1 == 0) | (am > amax), am, amax))

        # k from amax (final once phase A's data is in) and from eps_term
        bl_eps = A.bit_length(m, ins.i0[:62], 62, "rms_bleps")
        kmin = Signal(signed(8))
        m.d.comb += kmin.eq(-((62 - bl_eps) >> 1))
        bl_amax = A.bit_length(m, amax, 32, "rms_blamax")
        kraw = Signal(signed(8))
        m.d.comb += kraw.eq(bl_amax - F.RMS_PRESHIFT_BITS)
        k = Signal(signed(7))    # -31..9; narrow shift amounts keep the shifters' wires narrow
        m.d.comb += k.eq(Mux(kraw > kmin, kraw, kmin))
        k2 = Signal(signed(8))
        k15 = Signal(signed(7))
        m.d.comb += [k2.eq(2 * k), k15.eq(F.RSQRT_FRAC + k)]

        # B: sum of squares of x * 2**-k
        xs0 = A.shift_round_signed(m, x0, k, 40, "rms_xs0")
        xs1 = A.shift_round_signed(m, x1, k, 40, "rms_xs1")
        sq = Signal(unsigned(48))
        m.d.comb += sq.eq(xs0 * xs0 + Mux(two, xs1 * xs1, 0))
        ss = Signal(unsigned(64))
        with m.If(d_b):
            m.d.sync += ss.eq(Mux(j1 == pairs, sq, ss + sq))

        # R0: eps term, normalisation, table read
        epsk = A.shift_round_signed(m, ins.i0, k2, 64, "rms_eps")
        ssf = Signal(unsigned(64))
        m.d.comb += ssf.eq(ss + epsk.as_unsigned())
        vv = Signal(unsigned(64))
        m.d.comb += vv.eq(Mux(ssf == 0, 1, ssf))
        bl_v = A.bit_length(m, vv, 64, "rms_blv")
        e_c = Signal(6)
        m.d.comb += e_c.eq((bl_v - 1) >> 1)
        shv = Signal(signed(8))
        m.d.comb += shv.eq(2 * e_c - F.RSQRT_MANT_FRAC)
        mq_c = Signal(unsigned(33))
        m.d.comb += mq_c.eq(Mux(shv > 0, vv >> shv.as_unsigned(), vv << (-shv).as_unsigned()))
        e = Signal(6)
        mq = Signal(unsigned(33))
        with m.If(d_r0):
            m.d.sync += [e.eq(e_c), mq.eq(mq_c)]
        m.d.comb += [rp.addr.eq(mq_c >> F.RSQRT_INDEX_SHIFT), rp.en.eq(d_r0)]

        # R1: one Newton step
        y = rp.data
        yy = Signal(unsigned(32))
        m.d.comb += yy.eq(y * y)
        myy = Signal(unsigned(65))
        m.d.comb += myy.eq(mq * yy)
        tt = A.shift_round(m, myy, 2 * F.RSQRT_FRAC, 67, "rms_t")
        h = Signal(signed(40))
        m.d.comb += h.eq((3 << F.RSQRT_MANT_FRAC) - tt)
        yh = Signal(signed(60))
        m.d.comb += yh.eq(y * h)
        rr = A.shift_round(m, yh, F.RSQRT_MANT_FRAC + 1, 60, "rms_r")
        r = Signal(unsigned(F.RSQRT_FRAC + 1))
        with m.If(d_r1):
            m.d.sync += r.eq(Mux(rr > (1 << F.RSQRT_FRAC), 1 << F.RSQRT_FRAC, rr))

        # C: y = saturate(shift_round(shift_round_signed(x*r, 15 + k) * g, e))
        gg = self.rd1.data[:32].as_signed()
        xr = Signal(signed(50))
        m.d.comb += xr.eq(x0 * r)
        u = A.shift_round_signed(m, xr, k15, 68, "rms_u")
        ug = Signal(signed(68))
        m.d.comb += ug.eq(u * gg)
        yv = A.shift_round(m, ug, e, 68, "rms_y")
        ci1 = Signal(34)
        m.d.comb += ci1.eq(j1 - 2 * pairs - 2)
        m.d.comb += [self.wr.en.eq(d_c), self.wr.addr.eq(ins.d + seq.off1 + ci1),
                     self.wr.data.eq(A.saturate(m, yv, FX.min, FX.max, 68, "rms_sat"))]
        return m
