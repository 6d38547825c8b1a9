"""Formal wrappers for hw/dsp.py (test harnesses, kept out of the RTL file): each drives the cell from
free top-level inputs, keeps a shadow copy of the operands for hw.dsp.LATENCY enabled cycles and
asserts the cell's outputs equal the exact products of those operands."""

from amaranth.hdl import Elaboratable, Module, ResetSignal, Signal, signed, unsigned, Assert, Assume

from hw.dsp import LATENCY, OFFSET, ROWS_PER_DSP, Expand24, W2x2x2, W2x3
from quant.formats import ACT, SPARSE_PATTERNS


class _Shadow:
    """Operands delayed by LATENCY enabled cycles, and a counter saying when they are valid."""

    def __init__(self, m: Module, en, values: list):
        self.out = []
        stages = [[Signal(v.shape(), name=f"shadow{i}_{j}") for j, v in enumerate(values)]
                  for i in range(LATENCY)]
        self.filled = Signal(range(LATENCY + 1))
        with m.If(en):
            m.d.sync += [s.eq(v) for s, v in zip(stages[0], values)]
            for i in range(1, LATENCY):
                m.d.sync += [s.eq(p) for s, p in zip(stages[i], stages[i - 1])]
            with m.If(self.filled < LATENCY):
                m.d.sync += self.filled.eq(self.filled + 1)
        self.out = stages[-1]
        self.valid = self.filled == LATENCY


class W2x3Proof(Elaboratable):
    """offset_products[i] - OFFSET * c_i == a * c_i for every activation and code pattern."""

    def __init__(self):
        self.act = Signal(signed(ACT.bits))
        self.codes = Signal(2 * ROWS_PER_DSP)
        self.en = Signal()
        self.ports = [self.act, self.codes, self.en]

    def elaborate(self, platform):
        m = Module()
        m.submodules.dut = dut = W2x3()
        m.d.comb += [dut.act.eq(self.act), dut.codes.eq(self.codes), dut.en.eq(self.en),
                     Assume(~ResetSignal())]
        sh = _Shadow(m, self.en, [self.act, self.codes])
        a, codes = sh.out
        with m.If(sh.valid):
            for i in range(ROWS_PER_DSP):
                c = codes[2 * i:2 * i + 2]
                m.d.comb += Assert(dut.offset_products[i] - OFFSET * c == a * c)
        return m


class W2x2x2Proof(Elaboratable):
    """products == [c0*a0, c0*a1, c1*a0, c1*a1] whenever no activation is -128, and refused exactly
    when one is."""

    def __init__(self):
        self.a0, self.a1 = Signal(signed(ACT.bits)), Signal(signed(ACT.bits))
        self.c0, self.c1 = Signal(2), Signal(2)
        self.en = Signal()
        self.ports = [self.a0, self.a1, self.c0, self.c1, self.en]

    def elaborate(self, platform):
        m = Module()
        m.submodules.dut = dut = W2x2x2()
        m.d.comb += [dut.act[0].eq(self.a0), dut.act[1].eq(self.a1), dut.codes[0].eq(self.c0),
                     dut.codes[1].eq(self.c1), dut.en.eq(self.en), Assume(~ResetSignal())]
        sh = _Shadow(m, self.en, [self.a0, self.a1, self.c0, self.c1])
        a0, a1, c0, c1 = sh.out
        with m.If(sh.valid):
            minus = (a0 == ACT.min) | (a1 == ACT.min)
            m.d.comb += Assert(dut.refused == minus)
            with m.If(~minus):
                for j, want in enumerate((c0 * a0, c0 * a1, c1 * a0, c1 * a1)):
                    m.d.comb += Assert(dut.products[j] == want)
        return m


class Expand24Proof(Elaboratable):
    """codes[pos] is the kept code of that position under meta, 0 where pruned, all 0 and invalid for
    meta 6 and 7 (combinational: one step suffices)."""

    def __init__(self):
        self.k0, self.k1, self.meta = Signal(2), Signal(2), Signal(3)
        self.ports = [self.k0, self.k1, self.meta]

    def elaborate(self, platform):
        m = Module()
        m.submodules.dut = dut = Expand24()
        m.d.comb += [dut.kept[0].eq(self.k0), dut.kept[1].eq(self.k1), dut.meta.eq(self.meta)]
        kept = (self.k0, self.k1)
        for meta, pat in enumerate(SPARSE_PATTERNS):
            with m.If(self.meta == meta):
                m.d.comb += Assert(~dut.invalid)
                for pos in range(4):
                    want = kept[pat.index(pos)] if pos in pat else 0
                    m.d.comb += Assert(dut.codes[pos] == want)
        with m.If(self.meta >= len(SPARSE_PATTERNS)):
            m.d.comb += Assert(dut.invalid)
            for pos in range(4):
                m.d.comb += Assert(dut.codes[pos] == 0)
        return m
