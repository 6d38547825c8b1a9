"""hw/mult.py: every multiplier style equals act * code for every (act, code) pair, exhaustively, in
Amaranth simulation, with enough codes per column to fill several DSP groups and a partial one."""

import pytest
from amaranth.hdl import Elaboratable, Module, Signal, signed, unsigned
from amaranth.sim import Simulator

from hw.mult import (Column, codes_per_dsp, column_offset_products, column_products, dsps_for,
                     lut_multiples, product_bits, select_multiples, split_product)


def _exhaustive(code_bits: int, rows: int, style: str) -> int:
    """Drive act over -128..127 and, for every code value v, row i gets (v + 5*i) mod 2^b, so every row
    sees every (act, code) pair. Returns the number of checked products."""
    dut = Column(rows, code_bits, style)
    sim = Simulator(dut)
    n_codes = 1 << code_bits
    checked = []
    bad = []

    async def tb(ctx):
        for a in range(-128, 128):
            ctx.set(dut.act, a)
            for v in range(n_codes):
                cs = [(v + 5 * i) % n_codes for i in range(rows)]
                for sig, c in zip(dut.codes, cs):
                    ctx.set(sig, c)
                await ctx.delay(1e-9)
                for i, (sig, c) in enumerate(zip(dut.products, cs)):
                    got = ctx.get(sig)
                    want = (a + 128) * c if style == "offset" else a * c
                    if got != want and len(bad) < 5:
                        bad.append((i, a, c, got, want))
                    checked.append(1)

    sim.add_testbench(tb)
    sim.run()
    assert not bad, f"{style} code_bits={code_bits}: (row, act, code, got, want) {bad}"
    return len(checked)


# Row counts: 7 = two full 2-bit DSP groups of 3 plus a lone code; 5 = two 4-bit groups of 2 plus one.
@pytest.mark.parametrize("style", ["lut", "dsp", "mul", "offset"])
@pytest.mark.parametrize("code_bits,rows", [(2, 7), (4, 5)])
def test_products_exhaustive(style, code_bits, rows):
    n = _exhaustive(code_bits, rows, style)
    assert n == 256 * (1 << code_bits) * rows


@pytest.mark.parametrize("code_bits", [1, 3])
@pytest.mark.parametrize("style", ["lut", "dsp"])
def test_other_code_widths_exhaustive(style, code_bits):
    rows = 2 * codes_per_dsp(code_bits) + 1
    assert _exhaustive(code_bits, rows, style) == 256 * (1 << code_bits) * rows


def test_packing_density():
    # 27-bit signed port holds 26 unsigned bits; fields are 8 + b bits apart.
    assert codes_per_dsp(2) == 3 and codes_per_dsp(4) == 2
    assert product_bits(2) == 10 and product_bits(4) == 12
    assert dsps_for(64, 2, "dsp") == 22 and dsps_for(64, 4, "dsp") == 32
    assert dsps_for(64, 2, "lut") == 0 and dsps_for(64, 2, "mul") == 64


def test_product_widths_are_tight():
    # The extremes need every bit of the declared width: -128*15 and 127*15 for 4 bits.
    w = product_bits(4)
    assert -(1 << (w - 1)) <= -128 * 15 < -(1 << (w - 2))
    assert 127 * 15 < (1 << (w - 1))


def test_rejects_bad_operands():
    m = Module()
    m._MustUse__silence = True  # this Module only collects errors; it is never elaborated
    with pytest.raises(ValueError, match="act must be signed"):
        column_products(m, Signal(unsigned(8)), [Signal(2)], 2, "lut")
    with pytest.raises(ValueError, match=r"codes\[1\] must be unsigned\(2\)"):
        column_products(m, Signal(signed(8)), [Signal(2), Signal(signed(2))], 2, "dsp")
    with pytest.raises(ValueError, match="style must be one of"):
        column_products(m, Signal(signed(8)), [Signal(2)], 2, "dsp48")
    with pytest.raises(ValueError, match="codes is empty"):
        column_offset_products(m, Signal(signed(8)), [], 2)


class _Shared(Elaboratable):
    """The engine's array cell: candidate activations with their multiples computed once, one product
    that selects a candidate for its low digit (``select_multiples``) and takes its high digit from a
    fixed multiple set (``split_product``)."""

    def __init__(self, n_cands: int):
        self.cands = [Signal(signed(8), name=f"c{i}") for i in range(n_cands)]
        self.hi = Signal(signed(8))
        self.sel = Signal(2)
        self.code = Signal(4)
        self.hi_en = Signal()
        self.x = Signal(signed(8))
        self.prod = Signal(signed(12))

    def elaborate(self, platform):
        m = Module()
        sets = [lut_multiples(m, c, name=f"m{i}") for i, c in enumerate(self.cands)]
        hi = lut_multiples(m, self.hi, name="hi")
        chosen = select_multiples(m, sets, self.sel, "row")
        m.d.comb += [self.x.eq(chosen[0]), self.prod.eq(split_product(m, chosen, hi, self.code,
                                                                        self.hi_en, "p"))]
        return m


@pytest.mark.parametrize("n_cands", [3])  # the engine: c0..c2 or c1..c3 of a group of four
def test_shared_candidate_products_exhaustive(n_cands):
    """Every (selected activation, code, candidate index) with the other candidates and the high-digit
    activation set to values that differ from it; the high digit on (qk/pv) and off (2:4)."""
    import random
    rnd = random.Random(n_cands)
    dut = _Shared(n_cands)
    sim = Simulator(dut)
    bad = []
    count = [0]

    async def tb(ctx):
        for a in range(-128, 128):
            for sel in range(n_cands):
                others = [rnd.randrange(-128, 128) for _ in range(n_cands)]
                others[sel] = a
                for i, v in enumerate(others):
                    ctx.set(dut.cands[i], v)
                ctx.set(dut.sel, sel)
                for hi_en in (0, 1):
                    hi = a if hi_en and rnd.random() < 0.5 else rnd.randrange(-128, 128)
                    ctx.set(dut.hi, hi)
                    ctx.set(dut.hi_en, hi_en)
                    for code in range(16):
                        ctx.set(dut.code, code)
                        await ctx.delay(1e-9)
                        want = a * (code & 3) + (4 * hi * (code >> 2) if hi_en else 0)
                        got = ctx.get(dut.prod)
                        if (got != want or ctx.get(dut.x) != a) and len(bad) < 5:
                            bad.append((a, sel, hi, hi_en, code, got, want))
                        count[0] += 1

    sim.add_testbench(tb)
    sim.run()
    assert not bad, f"(act, sel, hi, hi_en, code, got, want) {bad}"
    assert count[0] == 256 * n_cands * 2 * 16
