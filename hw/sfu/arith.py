"""Combinational integer primitives shared by the special-function units, each the exact twin of the
``quant.reference`` function of the same name (tests/hw/test_sfu_arith.py holds them equal on random
and edge operands). Widths are explicit: every function returns a named Signal wide enough that nothing
wraps for the operands the reference allows.

This first version is built for exactness, not timing: wide products and ``//`` are single
combinational operators (Yosys maps ``//`` to a full divider). Pipelining them for 225 MHz is the
U280-build issue's work."""

from __future__ import annotations

from amaranth.hdl import Const, Module, Mux, Signal, signed, unsigned

def _name(base: str) -> str:
    """The signal's name: ``base`` itself (Amaranth makes names unique within a module). A process-wide
    counter here once numbered them, so the same unit converted twice in one process gave different
    RTLIL, and bitstream/'s content-addressed Yosys cache and build plans missed."""
    return base


def shift_round(m: Module, x, sh, width: int, name: str = "sr") -> Signal:
    """(x + (2**(sh-1) if sh > 0 else 0)) >> sh, arithmetic (reference.shift_round); ``sh`` unsigned.
    ``width``: bits of the signed result and of the intermediate sum (must hold x + half)."""
    half = Signal(unsigned(width), name=_name(name + "_half"))
    m.d.comb += half.eq((Const(1, width + 1) << sh) >> 1)
    s = Signal(signed(width + 1), name=_name(name + "_sum"))
    out = Signal(signed(width), name=_name(name))
    m.d.comb += [s.eq(x + half), out.eq(s >> sh)]
    return out


def shift_round_signed(m: Module, x, s, width: int, name: str = "srs") -> Signal:
    """reference.shift_round_signed: shift_round by s for s >= 0, x << -s for s < 0 (``s`` signed)."""
    pos = shift_round(m, x, Mux(s[-1], 0, s.as_unsigned()), width, name + "_p")
    out = Signal(signed(width), name=_name(name))
    m.d.comb += out.eq(Mux(s[-1], x << (-s).as_unsigned(), pos))
    return out


def saturate(m: Module, x, lo: int, hi: int, width: int = 64, name: str = "sat") -> Signal:
    out = Signal(signed(width), name=_name(name))
    m.d.comb += out.eq(Mux(x > hi, hi, Mux(x < lo, lo, x)))
    return out


def bit_length(m: Module, x, width: int, name: str = "bl") -> Signal:
    """Bit length of the unsigned value ``x`` of ``width`` bits (0 -> 0) (reference.bit_length)."""
    out = Signal(range(width + 1), name=_name(name))
    v, top = x, 1
    while (1 << top) < width:
        top += 1
    acc = []
    for k in reversed(range(top)):  # binary search, as the reference does: log2(width) steps
        s = 1 << k
        big = Signal(name=_name(name + f"_b{s}"))
        nv = Signal(unsigned(width), name=_name(name + f"_v{s}"))
        m.d.comb += [big.eq(v >= (1 << s)), nv.eq(Mux(big, v >> s, v))]
        acc.append(Mux(big, s, 0))
        v = nv
    total = acc[0]
    for t in acc[1:]:
        total = total + t
    m.d.comb += out.eq(Mux(x == 0, 0, total + 1))
    return out


def mantissa16(m: Module, x, width: int, name: str = "m16") -> tuple[Signal, Signal]:
    """(mult, exp) with x ~= mult * 2**exp, mult in [2**15, 2**16) rounded half up, (0, 0) for 0
    (reference.mantissa16); ``x`` unsigned of ``width`` bits (<= 62)."""
    bl = bit_length(m, x, width, name + "_bl")
    e = Signal(signed(8), name=_name(name + "_e"))
    m.d.comb += e.eq(bl - 16)
    right = shift_round(m, x, Mux(e > 0, e.as_unsigned(), 0), width + 2, name + "_r")
    raw = Signal(unsigned(width + 17), name=_name(name + "_raw"))
    m.d.comb += raw.eq(Mux(e > 0, right.as_unsigned(), x << Mux(e < 0, (-e).as_unsigned(), 0)))
    carry = raw == (1 << 16)
    mult = Signal(unsigned(17), name=_name(name + "_mult"))
    exp = Signal(signed(8), name=_name(name + "_exp"))
    nz = x != 0
    m.d.comb += [mult.eq(Mux(nz, Mux(carry, 1 << 15, raw), 0)),
                 exp.eq(Mux(nz, Mux(carry, e + 1, e), 0))]
    return mult, exp


def round_div(m: Module, n, d, width: int, name: str = "rdiv") -> Signal:
    """n / d rounded to nearest, ties away from zero, d > 0 (reference.round_div); ``n`` signed,
    ``d`` unsigned, |n| and d below 2**(width-2)."""
    an = Signal(unsigned(width), name=_name(name + "_abs"))
    m.d.comb += an.eq(Mux(n < 0, -n, n))
    mag = Signal(unsigned(width + 1), name=_name(name + "_mag"))
    m.d.comb += mag.eq((2 * an + d) // (2 * d))
    out = Signal(signed(width + 2), name=_name(name))
    m.d.comb += out.eq(Mux(n < 0, -mag, mag))
    return out


def shift_round_signed_i64(m: Module, x, s, name: str = "srs64") -> Signal:
    """reference.shift_round_signed as numpy computes it in int64, for every shift: ``s`` signed,
    ``x`` at most 64 bits signed. Every intermediate is a 64-bit register that wraps as int64 does:
    the half 1 << (s-1) is -2**63 for s = 64 and 0 beyond, x + half wraps, a right shift by 64 or more
    leaves the sign (-1 or 0), a left shift keeps the low 64 bits. Inside the range where nothing
    wraps (0 <= s <= 63 and |x| + 2**(s-1) < 2**63, or a left shift whose result fits) it equals
    ``shift_round_signed(m, x, s, 64)``; beyond it, it still equals the reference bit for bit."""
    neg = s[-1]
    sh = Signal(unsigned(len(s)), name=_name(name + "_sh"))
    m.d.comb += sh.eq(Mux(neg, 0, s.as_unsigned()))
    half = Signal(signed(64), name=_name(name + "_half"))
    m.d.comb += half.eq((Const(1, 66) << sh) >> 1)      # truncated to 64 bits: bit 63 -> -2**63
    tot = Signal(signed(64), name=_name(name + "_sum"))
    m.d.comb += tot.eq(x + half)                         # wraps as int64
    left = Signal(signed(64), name=_name(name + "_l"))
    m.d.comb += left.eq(x << Mux(neg, (-s).as_unsigned(), 0))
    out = Signal(signed(64), name=_name(name))
    m.d.comb += out.eq(Mux(neg, left, tot >> sh))        # >> of a signed value fills with its sign
    return out
