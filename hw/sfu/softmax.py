"""LOGITS and SOFTMAX_EXP: the attention scores to base-2 logits (``reference.attention_logits``) and
the exponentials of the logits against their row maximum (``reference.softmax_exp``, every key visible).

LOGITS, per query row t: read q_amax[t], its ``mantissa16`` (mq, eq) and ``mqc = shift_round(mq * k, 16)``
into registers (k = the instruction's mult). Then one key per cycle: acc[t, j] on port 0 and
k_range[j] on port 1 in the same cycle; the next cycle ``mantissa16(k_range)`` (mr, er), the product
``acc * mqc * mr``, ``shift_round_signed`` by ``s - eq - er`` and the saturation to SOFTMAX_Z are one
combinational step, written while the next key is read. Cycle model ``T * (N + 3) + 1``.

SOFTMAX_EXP, per row, two passes over the row: (1) the row maximum, two elements per cycle on the
two ports (ceil(N/2) + 1 cycles); (2) a two-stage pipeline, one element per cycle: d = max - z, its integer part (d >> 16) and
the nearest of the 1024 ``reference.exp2_table`` entries for its fraction (a fraction rounding up to
1024 carries into the integer part), the table a synchronous-read ROM; then ``shift_round`` of the
entry by min(integer part, 62) is written (N + 2 cycles). Cycle model ``T * (N + ceil(N/2) + 4) + 1``
(``T * 3 + 1`` when N = 0, a row the reference refuses)."""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, signed, unsigned
from amaranth.lib.memory import Memory

from quant import formats as F
from quant import reference as R

from ..isa import Instr
from ..params import AccelParams
from . import arith as A
from .base import Unit

#: LOGITS: the effective shift s - eq - er is clamped to this window before the shifter (outside it
#: the result does not change: |acc * mqc * mr| < 2**71, and the reference refuses s < -10)
_LOGIT_SHIFT_LO, _LOGIT_SHIFT_HI = -15, 72


def logits_cycles(ins: Instr, params: AccelParams | None = None) -> int:
    return ins.m * (ins.n + 3) + 1


def softmax_exp_cycles(ins: Instr, params: AccelParams | None = None) -> int:
    return ins.m * (ins.n + (ins.n + 1) // 2 + 4 if ins.n else 3) + 1


class Logits(Unit):
    cycles = staticmethod(logits_cycles)

    def elaborate(self, platform):
        m = Module()
        ins = self.instr
        t = Signal(32)
        i = Signal(32)             # next key to read
        rowbase = Signal(64)       # t * N
        valid = Signal()           # a key's operands arrive this cycle
        wr_at = Signal(32)         # ... that key's index
        mqc = Signal(unsigned(34))
        eq = Signal(signed(8))

        # the query row's scale (port 0 during QAMAX)
        qamax = Signal(unsigned(32))
        m.d.comb += qamax.eq(self.rd0.data[:32])
        mq, eq_now = A.mantissa16(m, qamax, 32, "lg_q")
        mq_k = Signal(unsigned(49))
        m.d.comb += mq_k.eq(mq * ins.k)
        mqc_now = A.shift_round(m, mq_k, 16, 50, "lg_mqc")

        # one key: acc (port 0), k_range (port 1)
        acc = Signal(signed(20))
        kr = Signal(unsigned(32))
        m.d.comb += [acc.eq(self.rd0.data[:20]), kr.eq(self.rd1.data[:32])]
        mr, er = A.mantissa16(m, kr, 32, "lg_k")
        prod = Signal(signed(72))
        m.d.comb += prod.eq(acc * mqc * mr)
        se = Signal(signed(35))
        m.d.comb += se.eq(ins.s - eq - er)
        s_cl = Signal(signed(8))
        m.d.comb += s_cl.eq(Mux(se < _LOGIT_SHIFT_LO, _LOGIT_SHIFT_LO, Mux(se > _LOGIT_SHIFT_HI, _LOGIT_SHIFT_HI, se)))
        scaled = A.shift_round_signed(m, prod, s_cl, 90, "lg_z")
        z = A.saturate(m, scaled, F.SOFTMAX_Z.min, F.SOFTMAX_Z.max, 64, "lg_sat")

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
                    m.next = "QAMAX"
            with m.State("QAMAX"):
                m.d.sync += [mqc.eq(mqc_now), eq.eq(eq_now), i.eq(0), valid.eq(0)]
                m.next = "KEYS"
            with m.State("KEYS"):
                issue = Signal()
                m.d.comb += issue.eq(i < ins.n)
                m.d.comb += [self.rd0.addr.eq(ins.a + rowbase + i), self.rd0.en.eq(issue),
                             self.rd1.addr.eq(ins.c + i), self.rd1.en.eq(issue),
                             self.wr.addr.eq(ins.d + rowbase + wr_at), self.wr.data.eq(z),
                             self.wr.en.eq(valid)]
                m.d.sync += [valid.eq(issue), wr_at.eq(i)]
                with m.If(issue):
                    m.d.sync += i.eq(i + 1)
                with m.Else():  # the row's last key is written this cycle
                    m.d.sync += [t.eq(t + 1), rowbase.eq(rowbase + ins.n)]
                    m.next = "ROW"
        m.d.comb += self.busy.eq(~fsm.ongoing("IDLE"))
        return m


class SoftmaxExp(Unit):
    cycles = staticmethod(softmax_exp_cycles)

    def elaborate(self, platform):
        m = Module()
        ins = self.instr
        table = R.exp2_table()
        m.submodules.exp2 = rom = Memory(shape=unsigned(F.EXP2_FRAC + 1), depth=table.size,
                                         init=[int(v) for v in table])
        port = rom.read_port(domain="sync")

        t = Signal(32)
        i = Signal(32)
        rowbase = Signal(64)
        zmax = Signal(signed(F.SOFTMAX_Z.bits))
        v1 = Signal()              # stage 1: z arrives on port 0
        v1b = Signal()             # max pass: a second z arrives on port 1
        at1 = Signal(32)
        v2 = Signal()              # stage 2: the table entry arrives
        at2 = Signal(32)
        ip2 = Signal(range(F.REQ_SHIFT_MAX + 1))

        z = Signal(signed(F.SOFTMAX_Z.bits))
        m.d.comb += z.eq(self.rd0.data[:F.SOFTMAX_Z.bits])
        zb = Signal(signed(F.SOFTMAX_Z.bits))
        m.d.comb += zb.eq(self.rd1.data[:F.SOFTMAX_Z.bits])
        # the max pass: the larger of the running max and the pair that arrives
        m0 = Signal(signed(F.SOFTMAX_Z.bits))
        m.d.comb += m0.eq(Mux(v1 & (z > zmax), z, zmax))
        m1 = Signal(signed(F.SOFTMAX_Z.bits))
        m.d.comb += m1.eq(Mux(v1b & (zb > m0), zb, m0))
        # stage 1: d = max - z >= 0, integer part and rounded table index (with the carry)
        dd = Signal(unsigned(F.SOFTMAX_Z.bits + 1))
        m.d.comb += dd.eq(zmax - z)
        step = F.FX_FRAC_BITS - F.EXP2_TABLE_BITS
        idx = Signal(unsigned(F.EXP2_TABLE_BITS + 1))
        m.d.comb += idx.eq((dd[:F.FX_FRAC_BITS] + (1 << (step - 1))) >> step)
        carry = idx[F.EXP2_TABLE_BITS]
        ip = Signal(unsigned(F.SOFTMAX_Z.bits + 2 - F.FX_FRAC_BITS))
        m.d.comb += ip.eq(dd[F.FX_FRAC_BITS:] + carry)
        m.d.comb += port.addr.eq(idx[:F.EXP2_TABLE_BITS])
        # stage 2: the entry shifted by min(ip, 62)
        e = A.shift_round(m, port.data, ip2, 64, "sx_e")

        with m.FSM() as fsm:
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [t.eq(0), rowbase.eq(0)]
                    m.next = "ROW"
            with m.State("ROW"):
                m.d.sync += [i.eq(0), v1.eq(0), v1b.eq(0), zmax.eq(F.SOFTMAX_Z.min)]
                with m.If(t == ins.m):
                    m.next = "IDLE"
                with m.Else():
                    m.next = "MAX"
            with m.State("MAX"):
                issue = Signal()
                m.d.comb += issue.eq(i < ins.n)
                second = Signal()
                m.d.comb += second.eq(i + 1 < ins.n)
                m.d.comb += [self.rd0.addr.eq(ins.a + rowbase + i), self.rd0.en.eq(issue),
                             self.rd1.addr.eq(ins.a + rowbase + i + 1), self.rd1.en.eq(issue & second)]
                m.d.sync += [v1.eq(issue), v1b.eq(issue & second), zmax.eq(m1)]
                with m.If(issue):
                    m.d.sync += i.eq(i + 2)
                with m.Else():  # the last pair is compared this cycle
                    m.d.sync += [i.eq(0), v1.eq(0), v1b.eq(0), v2.eq(0)]
                    m.next = "EXP"
            with m.State("EXP"):
                issue = Signal()
                m.d.comb += issue.eq(i < ins.n)
                m.d.comb += [self.rd0.addr.eq(ins.a + rowbase + i), self.rd0.en.eq(issue),
                             port.en.eq(v1),
                             self.wr.addr.eq(ins.d + rowbase + at2), self.wr.data.eq(e), self.wr.en.eq(v2)]
                m.d.sync += [v1.eq(issue), at1.eq(i), v2.eq(v1), at2.eq(at1),
                             ip2.eq(Mux(ip > F.REQ_SHIFT_MAX, F.REQ_SHIFT_MAX, ip))]
                with m.If(issue):
                    m.d.sync += i.eq(i + 1)
                with m.Elif(~v1):  # the row's last element is written this cycle
                    m.d.sync += [t.eq(t + 1), rowbase.eq(rowbase + ins.n)]
                    m.next = "ROW"
        m.d.comb += self.busy.eq(~fsm.ongoing("IDLE"))
        return m
