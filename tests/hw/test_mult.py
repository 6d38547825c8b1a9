"""hw/mult.py: every multiplier style equals act * code for every (act, code) pair, exhaustively, in
Amaranth simulation, with enough codes per column to fill several DSP groups and a partial one."""

import pytest
from amaranth.hdl import Module, Signal, signed, unsigned
from amaranth.sim import Simulator

from hw.mult import (Column, codes_per_dsp, column_offset_products, column_products, dsps_for,
                     product_bits)


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
