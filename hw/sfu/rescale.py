"""RESCALE: a W×A8 linear's accumulators to Q15.16 (``reference.rescale_linear`` with
``reference.token_multiplier`` of the row's amax), computed in the unit.

Per token row t: read amax[t] (``spad[b + t]``), its ``mantissa16`` (tok_mult, tok_exp) into registers.
Per element n, two cycles: acc and row_mult read together on the two ports, then row_shift on port 0;
in the next cycle the product ``acc * row_mult * tok_mult`` (< 2**63), the effective shift
``row_shift - tok_exp`` clipped to 0..62, ``shift_round`` and the Q15.16 saturation are one
combinational step and the result is written, while the next element's first reads are issued.

Cycle model: ``T * (2N + 3) + 1`` (``T * 2 + 1`` when N = 0): per row one cycle to read amax, one to
take its mantissa, one to issue the first element's reads, two per element; one final cycle."""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, signed, unsigned

from quant.formats import FX, REQ_SHIFT_MAX

from ..isa import Instr
from ..params import AccelParams
from . import arith as A
from .base import Unit


def cycles(ins: Instr, params: AccelParams | None = None) -> int:
    per_row = 2 * ins.n + 3 if ins.n else 2
    return ins.m * per_row + 1


class Rescale(Unit):
    cycles = staticmethod(cycles)

    def elaborate(self, platform):
        m = Module()
        ins = self.instr
        t = Signal(32)            # token row
        i = Signal(32)            # element in the row
        rowbase = Signal(64)      # t * N
        tm = Signal(unsigned(17))  # token multiplier (mantissa16 of amax)
        te = Signal(signed(8))    # token exponent
        acc = Signal(signed(32))  # the element's accumulator, latched

        # amax -> (tok_mult, tok_exp), combinational on the returning read
        amax = Signal(unsigned(32))
        m.d.comb += amax.eq(self.rd0.data[:32])
        mult, exp = A.mantissa16(m, amax, 32, "rs_tok")

        # one element: acc (register) * row_mult (port 1, held) * tok_mult, shift row_shift (port 0) - tok_exp
        rm = Signal(unsigned(16))
        m.d.comb += rm.eq(self.rd1.data[:16])
        prod = Signal(signed(64))
        m.d.comb += prod.eq(acc * rm * tm)
        sh_raw = Signal(signed(66))
        m.d.comb += sh_raw.eq(self.rd0.data - te)
        sh = Signal(range(REQ_SHIFT_MAX + 1))
        m.d.comb += sh.eq(Mux(sh_raw < 0, 0, Mux(sh_raw > REQ_SHIFT_MAX, REQ_SHIFT_MAX, sh_raw)))
        rounded = A.shift_round(m, prod, sh, 64, "rs_y")
        y = A.saturate(m, rounded, FX.min, FX.max, 64, "rs_sat")

        def issue_first_reads(at):
            m.d.comb += [self.rd0.addr.eq(ins.a + rowbase + at), self.rd0.en.eq(1),
                         self.rd1.addr.eq(ins.c + at), self.rd1.en.eq(1)]

        with m.FSM() as fsm:
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [t.eq(0), rowbase.eq(0)]
                    m.next = "ROW"
            with m.State("ROW"):
                with m.If(t == ins.m):
                    m.next = "IDLE"
                with m.Else():
                    m.d.comb += [self.rd0.addr.eq(ins.b + t), self.rd0.en.eq(1)]
                    m.next = "AMAX"
            with m.State("AMAX"):
                m.d.sync += [tm.eq(mult), te.eq(exp), i.eq(0)]
                with m.If(ins.n == 0):
                    m.d.sync += t.eq(t + 1)
                    m.next = "ROW"
                with m.Else():
                    m.next = "FIRST"
            with m.State("FIRST"):
                issue_first_reads(i)
                m.next = "SHIFT"
            with m.State("SHIFT"):  # acc arrives on port 0, row_mult on port 1 (held); ask for row_shift
                m.d.sync += acc.eq(self.rd0.data[:32])
                m.d.comb += [self.rd0.addr.eq(ins.g + i), self.rd0.en.eq(1)]
                m.next = "WRITE"
            with m.State("WRITE"):  # row_shift on port 0: the result, and the next element's reads
                m.d.comb += [self.wr.addr.eq(ins.d + rowbase + i), self.wr.data.eq(y), self.wr.en.eq(1)]
                with m.If(i + 1 == ins.n):
                    m.d.sync += [t.eq(t + 1), rowbase.eq(rowbase + ins.n)]
                    m.next = "ROW"
                with m.Else():
                    issue_first_reads(i + 1)
                    m.d.sync += i.eq(i + 1)
                    m.next = "SHIFT"
        m.d.comb += self.busy.eq(~fsm.ongoing("IDLE"))
        return m
