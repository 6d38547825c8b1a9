"""The engine's array in ``multiplier_style: dsp`` (docs/arithmetic.md, "The dsp engine"): the W2 x A8
products packed three rows to a DSP48E2 with one activation shared down each lane column
(``hw.dsp.W2x3``'s layout: codes at bits 0/10/20, ``B = a + 128``, the correction ``-128 * sum(c)`` per
row), in every mode, with no multiplier outside the DSPs:

* dense W2: lane column l multiplies the op's activation ``l``, one op per beat;
* 4-bit codes (KV4 in QK/PV, the W4 lm_head in dense with the command's ``wide``): each beat runs as
  two ops through the same DSPs (``hw.engine_parts.beat_ops``; the sequencer's ``half`` tag is the
  digit): op 0 the low 2-bit digits, op 1 the high digits, whose partial ``lo - 128 * sum(lo)`` is
  shifted by 2 (``4 * a * hi``); the group stage sums the two ops as it sums beats. ``sum(a)`` (or the
  P·V zero row) goes with op 0 only, so it is counted once;
* 2:4: the weights are expanded on the weight side (``hw.dsp.expand_group``, ``Expand24``'s logic) so
  the same column-shared DSPs serve them: a beat's ``pe_lanes`` kept codes cover ``2 * pe_lanes``
  positions, run as two half-beat ops (the ``half`` tag), half h taking positions
  ``h * pe_lanes ..`` against the activation word ``2b + h``; each row's sum of its kept activations
  is a 6:1 select per group among the group's six pair sums (``DspCandidates.pair_sums``, formed once
  for all rows) and one adder tree;
* ``sum(a)``, the same in every row in dense and QK mode, is formed once (``DspCandidates``), not per
  row.

``DspCandidates`` (1) and ``DspRows`` (ceil(pe_rows / 3): ``DspRows3``, and ``DspRows1``/``DspRows2``
for the rest) replace ``Candidates`` and ``ArrayRow``; their outputs ``p``, ``a`` per row are what
``ArrayRow`` registers into S2, so the group stage, accumulators and output bank are shared with the
``lut`` style. The array is pipelined for 225 MHz (``DSP_ARRAY_STAGES``, ``hw.engine_parts.stages``):
each DSP48E2 has registers straight on its A/B inputs and its product (AREG/BREG, MREG), and the adder
trees are split by a register.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from quant.formats import ACT, SPARSE_PATTERNS

from .dsp import FIELD_BITS, OFFSET, ROWS_PER_DSP, expand_group
from .engine_parts import (CODE_BITS, DSP_ARRAY_STAGES, META_BITS, TREE_SPLIT, candidate_inputs, multiples_of, partial_bits,
                           register_all, tree_levels)
from .mult import split_product
from .params import EngineParams

__all__ = ["DspCandidates", "DspRows", "dsp_row_groups", "DSP_ARRAY_STAGES"]

#: bits of a code digit (the DSP field's code): a 4-bit code is two digits, run as two ops
DIGIT_BITS = 2
#: a 2:4 group's sum of its two kept activations (one of the six pair sums)
PAIR_SUM_BITS = ACT.bits + 1
#: the correction 128 * sum(lo) is a shift: OFFSET (hw.dsp, -ACT.min) is a power of two
OFFSET_SHIFT = OFFSET.bit_length() - 1
assert OFFSET == 1 << OFFSET_SHIFT


def adder_tree(m: Module, values: list, name: str):
    """The whole of ``tree_levels``' balanced tree (every node a kept two-input adder on a carry chain,
    instead of the one multi-operand ``$macc`` Yosys' ``alumacc`` would merge the tree into: more LUTs,
    measured in docs/arithmetic.md): its one sum."""
    return tree_levels(m, values, max(1, len(values) - 1).bit_length(), name)[0]


def dsp_row_groups(p: EngineParams) -> list[tuple[int, int]]:
    """(first row, rows) of each ``DspRows``: three rows per DSP48E2, the last group what is left."""
    return [(r, min(ROWS_PER_DSP, p.pe_rows - r)) for r in range(0, p.pe_rows, ROWS_PER_DSP)]


def _delay(m: Module, value, en, n: int, name: str) -> Signal:
    """``value`` through ``n`` registers loading while ``en``."""
    for k in range(n):
        r = Signal(value.shape(), name=f"{name}_d{k + 1}")
        with m.If(en):
            m.d.sync += r.eq(value)
        value = r
    return value


class DspCandidates(wiring.Component):
    """The activation side of the dsp array, shared by every row: lane l's activation of the op's
    buffer word (``parity`` picks ``d1`` over ``d0``: the word's parity, in 2:4 mode the beat's half),
    ``pair_sums``: for each group of four lanes the sums of its activation pairs in
    ``SPARSE_PATTERNS`` order (2:4: a row's group sum of kept activations is the one its pattern
    names), both combinational (the rows register what they make of them with the DSPs' A/B), and
    ``a_shared``: the P·V zero row ``sum_l a_l * zero_l`` in P·V mode, else ``sum_l a_l`` (the rows'
    sum of activations in dense and QK mode, formed once), through registers loading while ``en``:
    the lanes' activations, their ``3a`` and the zero codes (1 outside P·V: one tree of products
    serves both sums) (the A/B stage), the products and the
    first ``TREE_SPLIT`` levels of the trees (M), the rest of the trees: three cycles after the
    inputs, when the rows' trees are split (``DspRows`` takes it there)."""

    def __init__(self, p: EngineParams):
        self.params = p
        L = p.pe_lanes
        super().__init__({
            **candidate_inputs(p), "is_pv": In(1), "en": In(1),
            "act": Out(data.ArrayLayout(signed(ACT.bits), L)),
            "pair_sums": Out(data.ArrayLayout(signed(PAIR_SUM_BITS), L // 4 * len(SPARSE_PATTERNS))),
            "a_shared": Out(signed(partial_bits(p))),
        })

    def elaborate(self, platform):
        L = self.params.pe_lanes
        m = Module()
        word = Signal(8 * L)
        m.d.comb += word.eq(Mux(self.parity, self.d1, self.d0))
        zero = self.zero.as_value()
        acts = []
        for lane in range(L):
            a = word.word_select(lane, 8).as_signed()
            m.d.comb += self.act[lane].eq(a)
            acts.append(self.act[lane])
        for q in range(L // 4):
            for k, (i, j) in enumerate(SPARSE_PATTERNS):
                m.d.comb += self.pair_sums[q * len(SPARSE_PATTERNS) + k].eq(acts[4 * q + i] + acts[4 * q + j])
        # the shared sum, pipelined beside the rows: A/B (activations, 3a, the zero codes: 1 outside
        # P·V, so that the one tree of products sums the activations there), M (the products and the
        # tree's first levels), the rest of the tree
        a_r = register_all(m, acts, self.en, "sa")
        a3_r = register_all(m, [(a << 1) + a for a in acts], self.en, "sa3")
        z_r = register_all(m, [Mux(self.is_pv, zero[CODE_BITS * lane:CODE_BITS * (lane + 1)], 1) for lane in range(L)],
                           self.en, "sz")
        zprods = []
        for lane in range(L):
            mult = multiples_of(m, a_r[lane], a3_r[lane], f"lane{lane}")
            zprods.append(split_product(m, mult, mult, z_r[lane], Const(1), f"zp{lane}"))
        zp = register_all(m, tree_levels(m, zprods, TREE_SPLIT, "zs"), self.en, "zs_r")
        shared = register_all(m, [adder_tree(m, zp, "zs2")], self.en, "a_shared_r")[0]
        m.d.comb += self.a_shared.eq(shared)
        return m


class DspRows(wiring.Component):
    """``rows`` (1..3) rows of the dsp array: per lane one packed DSP product of the rows' digits and
    the lane's shared activation, per row two adder trees (the fields, the digits for the
    ``-128 * sum(c)`` correction) and, for 2:4, a 6:1 select per group of the group's kept-activation
    sum and its tree. Registered while ``en``, ``DSP_ARRAY_STAGES`` = 4 cycles from the inputs to
    ``p``, ``a`` (S2): the DSP's A/B inputs (the packed digits, ``a + 128``; beside them the digits and
    the kept sums), its product (M; nothing but flip-flops on both sides of the DSP48E2), the trees
    after ``TREE_SPLIT`` levels, the row sums. ``codes``/``meta``: the rows' slices of the weight
    beat; ``half``: which of the beat's two ops this is (2:4: the half; otherwise the digit, 1 = the
    codes' high digits, partial shifted by 2); ``a_shared`` (``DspCandidates``) is taken three
    cycles after the other inputs."""

    def __init__(self, p: EngineParams, rows: int):
        if not 1 <= rows <= ROWS_PER_DSP:
            raise ValueError(f"DspRows: rows = {rows}, must be 1..{ROWS_PER_DSP} (rows per DSP48E2)")
        self.params, self.rows = p, rows
        #: the name bitstream/engine_resources.py counts it under (instances differ by row count)
        self.part_name = f"DspRows{rows}"
        L, WP = p.pe_lanes, partial_bits(p)
        super().__init__({
            "act": In(data.ArrayLayout(signed(ACT.bits), L)),
            "pair_sums": In(data.ArrayLayout(signed(PAIR_SUM_BITS), L // 4 * len(SPARSE_PATTERNS))),
            "a_shared": In(signed(WP)),
            "codes": In(data.ArrayLayout(unsigned(CODE_BITS), rows * L)),   # [row * lanes + lane]
            "meta": In(data.ArrayLayout(unsigned(META_BITS), rows * L // 2)),
            "is_sparse": In(1), "half": In(1), "en": In(1),
            "p": Out(data.ArrayLayout(signed(WP), rows)), "a": Out(data.ArrayLayout(signed(WP), rows)),
        })

    def elaborate(self, platform):
        p, n = self.params, self.rows
        L, WP, Q = p.pe_lanes, partial_bits(p), p.pe_lanes // 4
        NP = len(SPARSE_PATTERNS)
        en = self.en
        m = Module()
        codes, meta = self.codes.as_value(), self.meta.as_value()
        act, psums = self.act.as_value(), self.pair_sums.as_value()
        A8 = ACT.bits
        hsel = Signal()
        m.d.comb += hsel.eq(self.half)
        digit = Signal()  # op 1 of a 4-bit beat: the high digits
        m.d.comb += digit.eq(self.half & ~self.is_sparse)

        def code(r, lane):
            return codes[CODE_BITS * (r * L + lane):][:CODE_BITS]

        def meta_of(r, group):
            return meta[META_BITS * (r * L // 2 + group):][:META_BITS]

        # each lane's digit into the DSP, per row; per row and group the 2:4 kept-activation sum
        dig = [[None] * L for _ in range(n)]
        ksums = [[] for _ in range(n)]
        for r in range(n):
            for q in range(Q):
                # 2:4: this half's group q is the beat's group half * Q + q (kept lanes 2g, 2g + 1)
                k0, k1 = Signal(DIGIT_BITS, name=f"k0_r{r}_g{q}"), Signal(DIGIT_BITS, name=f"k1_r{r}_g{q}")
                mt = Signal(META_BITS, name=f"meta_r{r}_g{q}")
                m.d.comb += [k0.eq(Mux(hsel, code(r, 2 * (Q + q)), code(r, 2 * q))[:DIGIT_BITS]),
                             k1.eq(Mux(hsel, code(r, 2 * (Q + q) + 1), code(r, 2 * q + 1))[:DIGIT_BITS]),
                             mt.eq(Mux(hsel, meta_of(r, Q + q), meta_of(r, q)))]
                ecodes, _ = expand_group([k0, k1], mt)
                for i in range(4):
                    lane = 4 * q + i
                    c = code(r, lane)
                    dig[r][lane] = Signal(DIGIT_BITS, name=f"dg_r{r}_l{lane}")
                    m.d.comb += dig[r][lane].eq(Mux(self.is_sparse, ecodes[i],
                                                    Mux(digit, c[DIGIT_BITS:], c[:DIGIT_BITS])))
                # the group's sum of kept activations: the pair sum its pattern names (0 for 6, 7)
                ks = Signal(signed(PAIR_SUM_BITS), name=f"ks_r{r}_g{q}")
                sel = Const(0, signed(PAIR_SUM_BITS))
                for k in range(NP):
                    sel = Mux(mt == k, psums[PAIR_SUM_BITS * (q * NP + k):][:PAIR_SUM_BITS].as_signed(), sel)
                m.d.comb += ks.eq(sel)
                ksums[r].append(ks)

        # one DSP48E2 per lane: A = the rows' digits at bits 0/10/20, B = a + 128 (top bit
        # inverted); every field (a + 128) * d <= 765 < 2**10, so field r is row r's offset product.
        # A and B registered (AREG/BREG), the product registered (MREG), both loading while ``en``.
        fields = [[] for _ in range(n)]
        for lane in range(L):
            slots = [Cat(dig[r][lane], Const(0, FIELD_BITS - DIGIT_BITS)) for r in range(n - 1)] + [dig[n - 1][lane]]
            packed = Signal(FIELD_BITS * (n - 1) + DIGIT_BITS, name=f"dsp{lane}_a", reset_less=True)
            b = Signal(unsigned(A8), name=f"dsp{lane}_b", reset_less=True)
            prod = Signal(FIELD_BITS * n, name=f"dsp{lane}_p", reset_less=True)
            a = act[A8 * lane:A8 * (lane + 1)]
            with m.If(en):
                m.d.sync += [packed.eq(Cat(*slots)), b.eq(Cat(a[:A8 - 1], ~a[A8 - 1])), prod.eq(packed * b)]
            for r in range(n):
                fields[r].append(prod[FIELD_BITS * r:FIELD_BITS * (r + 1)])
        # beside the DSPs: the digits (A/B) and their tree's first levels (M), the kept sums likewise
        dig_r = [register_all(m, dig[r], en, f"dig_r{r}") for r in range(n)]
        ks_r = [register_all(m, ksums[r], en, f"ks_r{r}") for r in range(n)]
        lc_m = [register_all(m, tree_levels(m, dig_r[r], TREE_SPLIT, f"lc_r{r}"), en, f"lc_m{r}") for r in range(n)]
        ks_m = [register_all(m, tree_levels(m, ks_r[r], TREE_SPLIT, f"ks_r{r}"), en, f"ks_m{r}") for r in range(n)]
        # the op's flags, with the op: the digit, 2:4 (a command's, held anyway; delayed for clarity)
        digit_s = _delay(m, digit, en, DSP_ARRAY_STAGES - 1, "digit")
        sparse_s = _delay(m, self.is_sparse, en, DSP_ARRAY_STAGES - 1, "sparse")

        for r in range(n):
            # the trees' first TREE_SPLIT levels after M, registered; the rest into the row sums
            lo_s = register_all(m, tree_levels(m, fields[r], TREE_SPLIT, f"lo_r{r}"), en, f"lo_s{r}")
            lc_s = register_all(m, [adder_tree(m, lc_m[r], f"lc2_r{r}")], en, f"lc_s{r}")[0]
            ks_s = register_all(m, [adder_tree(m, ks_m[r], f"ks2_r{r}")], en, f"ks_s{r}")[0]
            ls, corr = (Signal(signed(WP), name=f"{k}_r{r}") for k in ("lo_sum", "corr"))
            m.d.comb += ls.eq(adder_tree(m, lo_s, f"lo2_r{r}"))
            m.d.comb += corr.eq(ls - (lc_s << OFFSET_SHIFT))  # a * c = (a + 128) * c - 128 * c
            with m.If(en):
                m.d.sync += [self.p[r].eq(Mux(digit_s, corr << DIGIT_BITS, corr)),
                             self.a[r].eq(Mux(sparse_s, ks_s, Mux(digit_s, 0, self.a_shared)))]
        return m
