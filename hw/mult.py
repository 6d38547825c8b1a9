"""Low-bit multipliers for one array column: one signed 8-bit activation times several unsigned codes.

In matrix-vector mode one activation is broadcast down a column of ``pe_rows`` rows, each row holding
its own weight (or KV) code, so the packing unit is "one activation x several codes". Two ways to build
the products, chosen by ``EngineParams.multiplier_style`` (the numbers behind the choice are in
docs/arithmetic.md):

``"lut"``
    Select/shift-add logic, no ``*`` operator (so Yosys never infers a DSP). The column computes the
    multiples ``0, a, 2a, 3a`` once (one shared adder for ``3a``); every code is split into 2-bit digits,
    each digit selects a multiple with a 4:1 mux (one LUT per output bit), and the digits of a 4-bit
    code are combined with one adder: ``a*c = m[c & 3] + (m[c >> 2] << 2)``.

``"dsp"``
    Several codes packed into the 27-bit operand of one DSP48E2 27x18 multiplier:
    ``B = c0 + c1*2^k + c2*2^2k + ...`` with ``k = 8 + code_bits`` (the width of a signed product), then
    ``P = a*B + BIAS`` with ``BIAS = sum_i 2^(i*k + k - 1)``. The bias makes every field
    ``p_i + 2^(k-1)`` lie in ``[0, 2^k)``, so the fields never borrow from each other and each product
    is its field with the top bit inverted, read as signed: exact, no correction adders. Fields fit
    while ``(n-1)*k + code_bits <= 26`` (unsigned data in the signed 27-bit port): 3 products per DSP
    for 2-bit codes (k = 10), 2 for 4-bit codes (k = 12); a lone leftover code is a plain product.
    The bias is meant for the DSP's post-adder (C port or RND constant); Yosys 0.70 does not fold it
    and builds a carry chain instead (2 CARRY4 per product, docs/arithmetic.md).

:func:`column_offset_products` packs the same way with ``a + 128`` (a wire) and needs no bias at all,
at the price of returning ``(a + 128) * c``: the caller subtracts ``128 * sum(c)``.

``"mul"``
    Plain ``act * code`` per product: the baseline the two styles are measured against (Yosys puts each
    one in its own DSP48E2). Not an engine choice.

The engine's array (``hw.engine.pair_candidates`` / ``pe_pair``) is built from the ``lut`` pieces:
:func:`lut_multiples` once per shared (candidate) activation, :func:`select_multiples` where a row picks
one of several candidates (2:4 mode), :func:`lut_digit` and :func:`split_product` per product.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Elaboratable, Module, Mux, Signal, Value, signed, unsigned

STYLES = ("lut", "dsp", "mul")

ACT_BITS = 8
DSP_A_BITS = 27  # DSP48E2 multiplier: 27 x 18 signed
DSP_B_BITS = 18


def product_bits(code_bits: int) -> int:
    """Signed width holding every product of a signed 8-bit activation and an unsigned code:
    -128 * (2^b - 1) >= -2^(7+b) and 127 * (2^b - 1) < 2^(7+b)."""
    return ACT_BITS + code_bits


def dsp_field_bits(code_bits: int) -> int:
    """Spacing ``k`` of the packed fields in "dsp" style (one signed product per field)."""
    return product_bits(code_bits)


def codes_per_dsp(code_bits: int) -> int:
    """How many codes share one DSP48E2 in "dsp" style: fields at 0, k, 2k, ... must fit the 26
    unsigned bits of the signed 27-bit multiplier port."""
    k = dsp_field_bits(code_bits)
    usable = DSP_A_BITS - 1
    if code_bits > usable:
        return 0
    return 1 + (usable - code_bits) // k


def dsps_for(n_codes: int, code_bits: int, style: str) -> int:
    """DSP48E2 count the style is designed to use for ``n_codes`` products of one column."""
    if style == "lut":
        return 0
    if style == "mul":
        return n_codes
    per = codes_per_dsp(code_bits)
    return -(-n_codes // per)


def _check(act: Value, codes: list[Value], code_bits: int, style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"multiplier style must be one of {', '.join(STYLES)}, got {style!r}")
    if not 1 <= code_bits <= 8:
        raise ValueError(f"code_bits must be 1..8, got {code_bits}")
    shape = Value.cast(act).shape()
    if shape != signed(ACT_BITS):
        raise ValueError(f"act must be signed({ACT_BITS}), got {shape}")
    if not codes:
        raise ValueError("codes is empty: a column needs at least one code")
    for i, c in enumerate(codes):
        cs = Value.cast(c).shape()
        if cs.signed or cs.width != code_bits:
            raise ValueError(f"codes[{i}] must be unsigned({code_bits}), got {cs}")


def column_products(m: Module, act: Value, codes: list[Value], code_bits: int,
                    style: str) -> list[Value]:
    """Combinational products ``act * codes[i]`` (each ``signed(8 + code_bits)``), added to ``m``.

    ``act`` is ``signed(8)``; every code is ``unsigned(code_bits)``. All styles are exact."""
    _check(act, codes, code_bits, style)
    if style == "lut":
        return _lut_products(m, act, codes, code_bits)
    if style == "dsp":
        return _dsp_products(m, act, codes, code_bits)
    return _mul_products(m, act, codes, code_bits)


def _mul_products(m: Module, act: Value, codes: list[Value], code_bits: int) -> list[Value]:
    w = product_bits(code_bits)
    out = []
    for i, c in enumerate(codes):
        p = Signal(signed(w), name=f"mul_p{i}")
        m.d.comb += p.eq(act * c)
        out.append(p)
    return out


def lut_multiples(m: Module, act: Value, name: str = "lut") -> tuple[Signal, Signal, Signal]:
    """The multiples ``a, 2a, 3a`` of a signed 8-bit activation (``signed(10)`` each): shifts are
    wires, ``3a`` is the only adder. Computed once per shared activation (a column in dense mode, a
    candidate activation in 2:4 mode) and selected from by every product that uses it."""
    mult_w = ACT_BITS + 2
    m1 = Signal(signed(mult_w), name=f"{name}_a1")
    m2 = Signal(signed(mult_w), name=f"{name}_a2")
    m3 = Signal(signed(mult_w), name=f"{name}_a3")
    m.d.comb += [m1.eq(act), m2.eq(act << 1), m3.eq((act << 1) + act)]
    return m1, m2, m3


def lut_digit(m: Module, multiples: tuple, digit: Value, name: str) -> Signal:
    """``a * digit`` for a 2-bit digit: a 4:1 select among ``0, a, 2a, 3a`` (one LUT per bit)."""
    m1, m2, m3 = multiples
    t = Signal(signed(ACT_BITS + 2), name=name)
    m.d.comb += t.eq(Mux(digit[1], Mux(digit[0], m3, m2), Mux(digit[0], m1, 0)))
    return t


def _lut_products(m: Module, act: Value, codes: list[Value], code_bits: int) -> list[Value]:
    w = product_bits(code_bits)
    # Multiples shared by the whole column (shifts are wires; 3a is the only adder).
    multiples = lut_multiples(m, act)
    m1 = multiples[0]
    digits = (code_bits + 1) // 2
    out = []
    for i, c in enumerate(codes):
        terms = []
        for d in range(digits):
            lo = 2 * d
            if lo + 1 < code_bits:
                # 4:1 select: one LUT6 per output bit (two select bits + four data bits).
                t = lut_digit(m, multiples, c[lo:lo + 2], f"lut_p{i}_d{d}")
            else:  # a single leftover bit (odd code_bits): AND gate
                t = Signal(signed(ACT_BITS + 2), name=f"lut_p{i}_d{d}")
                m.d.comb += t.eq(Mux(c[lo], m1, 0))
            terms.append((t, lo))
        acc = terms[0][0]
        for t, lo in terms[1:]:
            acc = acc + (t << lo)
        p = Signal(signed(w), name=f"lut_p{i}")
        m.d.comb += p.eq(acc)
        out.append(p)
    return out


def select_multiples(m: Module, candidates: list[tuple], sel: Value, name: str) -> tuple:
    """One of up to four candidates' multiple sets (``lut_multiples``), chosen by ``sel``: the
    per-row choice of 2:4 mode. ``a`` and ``3a`` are selected (a 3:1 or 4:1 select per bit, one
    LUT); ``2a`` is a wire. Returns ``(x, 2x, 3x)`` of the chosen candidate ``x``."""
    if not 1 <= len(candidates) <= 4:
        raise ValueError(f"1..4 candidates, got {len(candidates)}")

    def pick(vals):
        if len(vals) == 1:
            return vals[0]
        if len(vals) == 2:
            return Mux(sel[0], vals[1], vals[0])
        hi = vals[2] if len(vals) == 3 else Mux(sel[0], vals[3], vals[2])
        return Mux(sel[1], hi, Mux(sel[0], vals[1], vals[0]))

    mult_w = ACT_BITS + 2
    x1 = Signal(signed(ACT_BITS), name=f"{name}_x1")  # the chosen activation itself
    x2 = Signal(signed(mult_w), name=f"{name}_x2")
    x3 = Signal(signed(mult_w), name=f"{name}_x3")
    m.d.comb += [x1.eq(pick([Value.cast(c[0])[:ACT_BITS].as_signed() for c in candidates])),
                 x2.eq(x1 << 1), x3.eq(pick([c[2] for c in candidates]))]
    return x1, x2, x3


def split_product(m: Module, lo: tuple, hi: tuple, code: Value, hi_enable: Value, name: str) -> Signal:
    """``x_lo * code[1:0] + 4 * x_hi * code[3:2]`` (``signed(12)``) for a 4-bit code, from two multiple
    sets: ``lo`` (e.g. chosen per row by ``select_multiples``) and ``hi`` (e.g. the column's). The
    high digit is forced to 0 when ``hi_enable`` is 0. With ``lo`` and ``hi`` the multiples of the same
    activation and ``hi_enable`` = 1 this is exactly ``x * code``."""
    if Value.cast(code).shape() != unsigned(4):
        raise ValueError(f"code must be unsigned(4), got {Value.cast(code).shape()}")
    d0 = lut_digit(m, lo, code[0:2], f"{name}_d0")
    d1 = lut_digit(m, hi, Mux(hi_enable, code[2:4], 0), f"{name}_d1")
    p = Signal(signed(product_bits(4)), name=name)
    m.d.comb += p.eq(d0 + (d1 << 2))
    return p


def _dsp_products(m: Module, act: Value, codes: list[Value], code_bits: int) -> list[Value]:
    w = product_bits(code_bits)
    k = dsp_field_bits(code_bits)
    per = codes_per_dsp(code_bits)
    out = []
    for g in range(0, len(codes), per):
        group = codes[g:g + per]
        n = len(group)
        if n == 1:  # a lone code (column height not a multiple of the packing): a plain product
            p = Signal(signed(w), name=f"dsp_p{g}")
            m.d.comb += p.eq(act * group[0])
            out.append(p)
            continue
        packed_w = (n - 1) * k + code_bits
        parts = []
        for j, c in enumerate(group):
            parts.append(c)
            if j < n - 1:
                parts.append(Const(0, k - code_bits))
        packed = Signal(unsigned(packed_w), name=f"dsp{g // per}_b")
        m.d.comb += packed.eq(Cat(*parts))
        bias = sum(1 << (j * k + k - 1) for j in range(n))
        # a * B spans 8 + packed_w + 1 bits; the fields we read span n * k bits. Keep the full width so
        # the multiply-add is a plain 27x18 product plus a C-port constant.
        full_w = ACT_BITS + packed_w + 1
        prod = Signal(signed(max(full_w, n * k) + 1), name=f"dsp{g // per}_p")
        m.d.comb += prod.eq(act * packed + bias)
        for j in range(n):
            field = prod[j * k:(j + 1) * k]
            p = Signal(signed(w), name=f"dsp_p{g + j}")
            # field = p + 2^(k-1) in [0, 2^k): flipping the top bit gives p in two's complement.
            m.d.comb += p.eq(Cat(field[:k - 1], ~field[k - 1]).as_signed())
            out.append(p)
    return out


def offset_field_bits(code_bits: int) -> int:
    """Field spacing for :func:`column_offset_products`: ``(a + 128) * c <= 255 * (2^b - 1)`` is
    unsigned and fits ``8 + b`` bits."""
    return ACT_BITS + code_bits


def column_offset_products(m: Module, act: Value, codes: list[Value], code_bits: int) -> list[Value]:
    """DSP-packed products of the *offset* activation: ``(act + 128) * codes[i]``, each
    ``unsigned(8 + code_bits)``, with no fabric logic at all.

    ``act + 128`` is ``act`` with its top bit inverted (a wire), so every packed field is non-negative
    and no field borrows from the next: the products are plain bit slices of one DSP48E2 product.
    The caller recovers ``act * c = (act + 128) * c - 128 * c``; summed over a dot product the
    correction is ``128 * sum(c)``, a property of the weights alone (precomputable per row and group,
    like an asymmetric zero-point). Not used by ``column_products``; docs/arithmetic.md measures it."""
    _check(act, codes, code_bits, "dsp")
    k = offset_field_bits(code_bits)
    per = codes_per_dsp(code_bits)
    act_u = Signal(unsigned(ACT_BITS), name="off_act")
    m.d.comb += act_u.eq(Cat(act[:ACT_BITS - 1], ~act[ACT_BITS - 1]))
    out = []
    for g in range(0, len(codes), per):
        group = codes[g:g + per]
        n = len(group)
        parts = []
        for j, c in enumerate(group):
            parts.append(c)
            if j < n - 1:
                parts.append(Const(0, k - code_bits))
        packed = Signal(unsigned((n - 1) * k + code_bits), name=f"off{g // per}_b")
        m.d.comb += packed.eq(Cat(*parts))
        prod = Signal(unsigned(n * k), name=f"off{g // per}_p")
        m.d.comb += prod.eq(act_u * packed)
        for j in range(n):
            p = Signal(unsigned(k), name=f"off_p{g + j}")
            m.d.comb += p.eq(prod[j * k:(j + 1) * k])
            out.append(p)
    return out


class Column(Elaboratable):
    """A measurement harness: one activation port, ``rows`` code ports, ``rows`` product ports, all
    top-level (no registers). ``style`` is a ``column_products`` style or ``"offset"``
    (``column_offset_products``). Used by tests and benchmarks/resources.py."""

    def __init__(self, rows: int, code_bits: int, style: str, prefix: str = ""):
        self.rows, self.code_bits, self.style = rows, code_bits, style
        self.act = Signal(signed(ACT_BITS), name=f"act{prefix}")
        self.codes = [Signal(unsigned(code_bits), name=f"code{prefix}_{i}") for i in range(rows)]
        shape = unsigned if style == "offset" else signed
        self.products = [Signal(shape(product_bits(code_bits)), name=f"prod{prefix}_{i}")
                         for i in range(rows)]

    @property
    def ports(self) -> list[Signal]:
        return [self.act, *self.codes, *self.products]

    def elaborate(self, platform):
        m = Module()
        if self.style == "offset":
            prods = column_offset_products(m, self.act, self.codes, self.code_bits)
        else:
            prods = column_products(m, self.act, self.codes, self.code_bits, self.style)
        m.d.comb += [o.eq(p) for o, p in zip(self.products, prods)]
        return m


class ColumnArray(Elaboratable):
    """A measurement harness: ``cols`` columns of ``rows`` products each (``cols`` activations, one
    code per product), products as top-level outputs. The multiplier array of an engine with
    ``pe_rows = rows`` and ``pe_lanes = cols``."""

    def __init__(self, rows: int, cols: int, code_bits: int, style: str):
        self.rows, self.cols, self.code_bits, self.style = rows, cols, code_bits, style
        self.columns = [Column(rows, code_bits, style, prefix=str(j)) for j in range(cols)]

    @property
    def ports(self) -> list[Signal]:
        return [p for col in self.columns for p in col.ports]

    def elaborate(self, platform):
        m = Module()
        for j, col in enumerate(self.columns):
            m.submodules[f"col{j}"] = col
        return m
