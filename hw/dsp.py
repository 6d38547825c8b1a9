"""W2 x A8 products packed into DSP48E2 multipliers, with a behavioural model beside each component.

The DSP48E2 (Xilinx UG579, "UltraScale Architecture DSP Slice"): a 27 x 18 two's-complement
multiplier fed by the A:D pre-adder path (27 bits into the multiplier, A port 30 bits) and the B port
(18 bits), with optional registers on A/B (AREG/BREG), after the multiplier (MREG) and on the 48-bit
P output (PREG). Each component below writes its product as one ``*`` between registered stages
(A/B, M, P), with a clock enable on every stage (the DSP's CEA/CEB/CEM/CEP), so that synthesis can
map it to one DSP48E2 with its registers. What Yosys 0.70 actually does with it is measured in
docs/arithmetic.md ("DSP-packed products"): it infers the DSP48E2 but leaves the stage registers in
fabric for ``-family xcup``.

:class:`W2x3` — three weight rows, one shared activation (matrix-vector, the column-shared scheme)
    Field layout (derived here, checked exhaustively in tests/hw/test_dsp.py and by a formal proof):
    ``B = a + 128`` (0..255: the activation with its top bit inverted, a wire) and
    ``A = c0 + c1 * 2**10 + c2 * 2**20`` (the three 2-bit codes at bits 0/10/20: 22 bits, positive,
    inside the 27-bit signed multiplier input). Every field ``(a + 128) * c_i <= 255 * 3 = 765 < 2**10``
    is non-negative, so no field borrows from another and ``P[10i : 10i + 10]`` *is*
    ``(a + 128) * c_i``: no bias, no fabric after the DSP. Three is the most that fits: a fourth field
    at bit 30 needs 32 bits on the A side. The price is the correction
    ``a * c = (a + 128) * c - 128 * c``: summed over a dot product it is ``128 * sum(c)`` per row and
    weight group, a constant of the weights (:func:`group_correction`, computed once per row and
    group, as a zero-point is).

:class:`W2x2x2` — two weight rows x two tokens (prefill, matrix-matrix), four products per DSP
    ``A = c0 + c1 * 2**20`` (codes at bits 0/20), ``B = a0 + a1 * 2**10`` (both tokens signed in the
    18-bit B port). ``P = c0*a0 + c0*a1 * 2**10 + c1*a0 * 2**20 + c1*a1 * 2**30``: four signed 10-bit
    fields (|a * c| <= 384 < 512). B fits 18 signed bits for all ``a0`` only if ``a1 != -128``
    (``a0 + 1024 * a1 >= -2**17``), and the layout is symmetric in the tokens only if neither is
    -128: the cell needs ``|a| <= 127`` and flags -128 (``refused``; :func:`check_packable` refuses it
    by name on the compiler side). The quantizer emits -127..127 (``quant.formats.ACT_QMAX``).
    Signed fields borrow from the field above: field ``j >= 1`` is
    ``sext(P[10j : 10j + 10] + P[10j - 1])`` — the lower fields' sum is the sign-extended low
    ``10j`` bits of P (|sum| < 2**(10j - 1)), so its sign bit is the borrow. That is one 10-bit
    increment per product in fabric after the P register (measured in docs/arithmetic.md).
    Neither offset trick fits here: ``B`` cannot hold two values of 0..255 (``255 * 1025 > 2**17``).

:class:`Expand24` — a 2:4 group expanded on the weight side
    Two kept codes and 3-bit metadata (``quant.formats.SPARSE_PATTERNS``) in, four position codes
    out (0 where pruned), so 2:4 weights feed the same column-shared cells as dense ones
    (``quant.reference.expand_24`` is the model). Metadata 6 and 7 are invalid: all four codes are 0
    and ``invalid`` is set.

Harnesses for measurement (:class:`PackedColumn`, :class:`Sparse24Column`) and formal wrappers live in
``benchmarks/dsp_density.py`` and ``tests/hw/test_dsp.py``, not here.
"""

from __future__ import annotations

import numpy as np
from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from quant.formats import ACT, ACT_QMAX, SPARSE_META_BITS, SPARSE_PATTERNS, W_CODE

__all__ = ["DSP_MULT_A_BITS", "DSP_B_BITS", "FIELD_BITS", "OFFSET", "ROWS_PER_DSP", "LATENCY",
           "PackingError", "W2x3", "W2x2x2", "Expand24", "w2x3_model", "w2x2x2_model",
           "expand24_model", "expand_group", "group_correction", "check_packable"]

#: DSP48E2 multiplier operands (UG579): 27 bits from the A:D path, 18 from B, both signed.
DSP_MULT_A_BITS = 27
DSP_B_BITS = 18
DSP_P_BITS = 48

CODE_BITS = W_CODE.bits        # 2
ACT_BITS = ACT.bits            # 8
#: ``B = a + OFFSET`` makes the activation unsigned: 0..255.
OFFSET = -ACT.min              # 128
#: Field spacing: (a + 128) * c <= 255 * 3 = 765 < 2**10, and |a * c| <= 128 * 3 = 384 < 2**9.
FIELD_BITS = 10
#: Codes per DSP in W2x3: fields at 0, 10, 20 and the top code's 2 bits end at bit 22 <= 26.
ROWS_PER_DSP = 3
#: Register stages A/B -> M -> P: a product leaves P three enabled cycles after its operands enter.
LATENCY = 3

assert (W_CODE.max * (OFFSET + ACT.max)) < (1 << FIELD_BITS)
assert (ROWS_PER_DSP - 1) * FIELD_BITS + CODE_BITS <= DSP_MULT_A_BITS - 1
assert ROWS_PER_DSP * FIELD_BITS + CODE_BITS > DSP_MULT_A_BITS - 1  # a fourth field does not fit
assert OFFSET + ACT.max < (1 << (DSP_B_BITS - 1))


class PackingError(ValueError):
    """An activation the packing cannot represent (-128 where |a| <= 127 is needed); names where."""


def check_packable(acts) -> np.ndarray:
    """Refuse -128 for :class:`W2x2x2` (the two-token packing needs |a| <= ACT_QMAX = 127): raise
    :class:`PackingError` naming the first offending position; return the activations as int64."""
    a = np.asarray(acts, dtype=np.int64)
    if a.size and (a.min() < -ACT_QMAX or a.max() > ACT_QMAX):
        pos = tuple(int(i) for i in np.argwhere((a < -ACT_QMAX) | (a > ACT_QMAX))[0])
        raise PackingError(
            f"activation {int(a[pos])} at index {pos}: the 2-token x 2-row DSP packing (hw.dsp.W2x2x2) "
            f"needs |a| <= {ACT_QMAX}; the quantizer emits -{ACT_QMAX}..{ACT_QMAX} "
            f"(quant.reference.quantize_activations): requantize this operand symmetrically")
    return a


# --- behavioural models -----------------------------------------------------------------------------
def w2x3_model(a, codes) -> np.ndarray:
    """What :class:`W2x3` outputs: ``(a + 128) * c_i`` for each of the three codes (``codes[..., 3]``)."""
    a = np.asarray(a, dtype=np.int64)
    c = np.asarray(codes, dtype=np.int64)
    return (a[..., None] + OFFSET) * c


def group_correction(codes, group_size: int) -> np.ndarray:
    """The per-row, per-group constant of the offset packing: ``128 * sum(c)`` over each group of
    ``group_size`` consecutive codes of a row (``codes`` (N, K) -> (N, K // group_size)). With it,
    ``sum(a * c) = sum((a + 128) * c) - group_correction`` exactly, for every activation."""
    c = np.asarray(codes, dtype=np.int64)
    n, k = c.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of group_size {group_size}")
    return OFFSET * c.reshape(n, k // group_size, group_size).sum(-1)


def w2x2x2_model(a0, a1, c0, c1) -> np.ndarray:
    """What :class:`W2x2x2` outputs, ``[c0*a0, c0*a1, c1*a0, c1*a1]`` (last axis), after refusing -128."""
    a0, a1 = check_packable(a0), check_packable(a1)
    c0, c1 = np.asarray(c0, np.int64), np.asarray(c1, np.int64)
    return np.stack([c0 * a0, c0 * a1, c1 * a0, c1 * a1], axis=-1)


def w2x2x2_fields(p) -> np.ndarray:
    """The field extraction :class:`W2x2x2` does after its P register, on integers: the four signed
    10-bit fields of the 48-bit P value ``p`` with each borrow repaired (used to check the layout
    arithmetic exhaustively in numpy)."""
    p = np.asarray(p, dtype=np.int64) & ((1 << DSP_P_BITS) - 1)
    out = []
    for j in range(4):
        raw = (p >> (FIELD_BITS * j)) & ((1 << FIELD_BITS) - 1)
        if j:
            raw = (raw + ((p >> (FIELD_BITS * j - 1)) & 1)) & ((1 << FIELD_BITS) - 1)
        out.append(np.where(raw >= 1 << (FIELD_BITS - 1), raw - (1 << FIELD_BITS), raw))
    return np.stack(out, axis=-1)


def expand24_model(kept, meta) -> tuple[np.ndarray, bool]:
    """What :class:`Expand24` outputs for one group: four codes and ``invalid``."""
    if not 0 <= meta < len(SPARSE_PATTERNS):
        return np.zeros(4, np.int64), True
    out = np.zeros(4, np.int64)
    for k, pos in enumerate(SPARSE_PATTERNS[meta]):
        out[pos] = kept[k]
    return out, False


# --- the components ---------------------------------------------------------------------------------
_CODES3 = data.ArrayLayout(unsigned(CODE_BITS), ROWS_PER_DSP)


class W2x3(wiring.Component):
    """Three W2 products ``(a + 128) * c_i`` of one shared activation in one DSP48E2 (module doc).

    Ports: ``act`` signed(8), ``codes`` 3 x unsigned(2), ``en`` (clock enable of every stage);
    ``offset_products`` 3 x unsigned(10), valid :data:`LATENCY` enabled cycles after the operands.
    The caller subtracts ``128 * c`` per product, or :func:`group_correction` per dot product."""

    def __init__(self):
        super().__init__({
            "act": In(signed(ACT_BITS)),
            "codes": In(_CODES3),
            "en": In(1),
            "offset_products": Out(data.ArrayLayout(unsigned(FIELD_BITS), ROWS_PER_DSP)),
        })

    def elaborate(self, platform):
        m = Module()
        a_w = (ROWS_PER_DSP - 1) * FIELD_BITS + CODE_BITS  # 22
        # A:D side: the codes at bits 0/10/20 (wiring only); B side: a + 128 (top bit inverted).
        packed = Signal(unsigned(a_w))
        m.d.comb += packed.eq(Cat(*[Cat(self.codes[i], Const(0, FIELD_BITS - CODE_BITS))
                                    for i in range(ROWS_PER_DSP - 1)], self.codes[ROWS_PER_DSP - 1]))
        b_in = Signal(unsigned(ACT_BITS))
        m.d.comb += b_in.eq(Cat(self.act[:ACT_BITS - 1], ~self.act[ACT_BITS - 1]))
        # AREG/BREG, MREG, PREG: reset-less like the DSP's data registers (RSTA/B/M/P unused).
        a_reg = Signal(unsigned(a_w), reset_less=True)
        b_reg = Signal(unsigned(ACT_BITS), reset_less=True)
        p_w = ROWS_PER_DSP * FIELD_BITS
        m_reg = Signal(unsigned(p_w), reset_less=True)
        p_reg = Signal(unsigned(p_w), reset_less=True)
        with m.If(self.en):
            m.d.sync += [a_reg.eq(packed), b_reg.eq(b_in), m_reg.eq(a_reg * b_reg), p_reg.eq(m_reg)]
        m.d.comb += [self.offset_products[i].eq(p_reg[FIELD_BITS * i:FIELD_BITS * (i + 1)])
                     for i in range(ROWS_PER_DSP)]
        return m


class W2x2x2(wiring.Component):
    """Four W2 products ``c_r * a_t`` (2 rows x 2 tokens) in one DSP48E2 (module doc).

    Ports: ``act`` 2 x signed(8) (tokens), ``codes`` 2 x unsigned(2) (rows), ``en``;
    ``products`` 4 x signed(10) in the order ``c0*a0, c0*a1, c1*a0, c1*a1`` and ``refused``
    (an activation was -128: the products are then not defined), both valid :data:`LATENCY` enabled
    cycles after the operands."""

    FIELDS = 4

    def __init__(self):
        super().__init__({
            "act": In(data.ArrayLayout(signed(ACT_BITS), 2)),
            "codes": In(data.ArrayLayout(unsigned(CODE_BITS), 2)),
            "en": In(1),
            "products": Out(data.ArrayLayout(signed(FIELD_BITS), self.FIELDS)),
            "refused": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        k = FIELD_BITS
        a_w = 2 * k + CODE_BITS  # codes at bits 0 and 20: 22 bits
        packed = Signal(unsigned(a_w))
        m.d.comb += packed.eq(Cat(self.codes[0], Const(0, 2 * k - CODE_BITS), self.codes[1]))
        # B = a0 + a1 * 2**10 as a signed 18-bit value: a wire-level sum (a0 sign-extended into the
        # upper slot), computed before BREG; exact while a1 != -128 or a0 >= 0.
        b_in = Signal(signed(DSP_B_BITS))
        m.d.comb += b_in.eq(self.act[0] + (self.act[1] << k))
        bad = Signal()
        m.d.comb += bad.eq((self.act[0] == ACT.min) | (self.act[1] == ACT.min))
        a_reg = Signal(unsigned(a_w), reset_less=True)
        b_reg = Signal(signed(DSP_B_BITS), reset_less=True)
        p_w = 4 * k
        m_reg = Signal(signed(p_w), reset_less=True)
        p_reg = Signal(signed(p_w), reset_less=True)
        bad_pipe = [Signal(name=f"refused_s{i}", reset_less=True) for i in range(LATENCY)]
        with m.If(self.en):
            m.d.sync += [a_reg.eq(packed), b_reg.eq(b_in), m_reg.eq(a_reg * b_reg), p_reg.eq(m_reg),
                         bad_pipe[0].eq(bad)] + [bad_pipe[i].eq(bad_pipe[i - 1]) for i in range(1, LATENCY)]
        for j in range(self.FIELDS):
            raw = p_reg[k * j:k * (j + 1)]
            if j:
                fixed = Signal(unsigned(k), name=f"field{j}")
                m.d.comb += fixed.eq(raw + p_reg[k * j - 1])  # the lower fields' borrow
                raw = fixed
            m.d.comb += self.products[j].eq(raw.as_signed())
        m.d.comb += self.refused.eq(bad_pipe[-1])
        return m


class Expand24(wiring.Component):
    """A 2:4 group's two kept codes placed back at their positions (module doc). Combinational:
    it sits in front of the DSPs' A registers. Ports: ``kept`` 2 x unsigned(2), ``meta``
    unsigned(3); ``codes`` 4 x unsigned(2), ``invalid``."""

    def __init__(self):
        super().__init__({
            "kept": In(data.ArrayLayout(unsigned(CODE_BITS), 2)),
            "meta": In(unsigned(SPARSE_META_BITS)),
            "codes": Out(data.ArrayLayout(unsigned(CODE_BITS), 4)),
            "invalid": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        codes, _ = expand_group([self.kept[0], self.kept[1]], self.meta)
        m.d.comb += [self.codes[pos].eq(codes[pos]) for pos in range(4)]
        m.d.comb += self.invalid.eq(self.meta >= len(SPARSE_PATTERNS))
        return m


def expand_group(kept: list, meta) -> tuple[list, list]:
    """The logic of :class:`Expand24` as expressions, for callers that build many groups inline (the
    engine's ``DspRows``): the four position codes (0 where pruned or ``meta`` is invalid) and the
    four kept flags (1 where a kept code sits, so ``sum(a * kept)`` is the sum of the kept
    activations)."""
    codes, mask = [], []
    for pos in range(4):
        out, hit = Const(0, CODE_BITS), Const(0, 1)
        for mt, pat in enumerate(SPARSE_PATTERNS):
            if pos in pat:
                out = Mux(meta == mt, kept[pat.index(pos)], out)
                hit = hit | (meta == mt)
        codes.append(out)
        mask.append(hit)
    return codes, mask
