"""The reconfigurable compute engine: a pe_rows x pe_lanes array of 8-bit x 4-bit multipliers that runs
every integer product of the W2A8KV4 model (``quant.reference``) with valid/ready streams on every
interface. ``docs/engine.md`` describes the architecture, the stream protocols and the cycle behaviour.

Modes (``Mode``), each run as a sequence of row tiles of ``pe_rows`` outputs:

* ``DENSE``  W2xA8 ``w2a8_linear``: lane l of a weight beat multiplies input ``beat*pe_lanes + l``.
  ``tokens == 1`` is the matrix-vector (decode) case; ``tokens > 1`` (prefill, matrix-matrix) holds each
  weight beat for ``tokens`` cycles, one token per cycle, so every fetched weight is reused.
* ``SPARSE`` 2:4 W2xA8 ``w2a8_sparse_linear``: a beat carries ``pe_lanes`` *kept* codes (covering
  ``2*pe_lanes`` dense inputs) and one 3-bit pattern per pair of lanes; the pattern picks the two
  activations of each group of four. No multiplier sees a pruned weight.
* ``QK``     ``qk_scores``: rows are keys, the reduction runs over head_dim; the key codes are the
  4-bit codes, and the group (the whole head_dim) has s_hat = 1, m_hat = -zero (sent on the scale
  stream), so acc = sum q*k - zero * sum q.
* ``PV``     ``pv_product``: rows are value channels, the reduction runs over keys; lane l carries
  v[key, channel] and the beat carries each lane's key zero-point. An extra row of ``pe_lanes``
  multipliers forms sum p*zero, which is subtracted (s = 1, m = -1 internally, no scale beats).

Every accumulator is optionally requantized on output: saturate(shift_round(acc * mult, shift)) to int8,
with one (mult, shift) per output row: a requantizing command is followed by one ``rq`` beat per row
tile, taken when the tile enters the output bank (per-operation scalars: the same value in every row).
"""

from __future__ import annotations

from enum import IntEnum

from amaranth.hdl import Array, Cat, Const, Elaboratable, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import bits_for

from quant.formats import ACT, KV_CODE, KV_QMAX, SPARSE_PATTERNS, W_MIN, W_SCALE, signed_bits_for

from .mult import lut_multiples, select_multiples, split_product
from .params import EngineParams

__all__ = ["Mode", "Engine", "Requantizer", "EngineConfigError", "check_params", "layouts", "CODE_BITS"]

#: Bits of a code lane: the array is built for the widest code it multiplies (the 4-bit KV cache).
CODE_BITS = KV_CODE.bits
META_BITS = 3
SHIFT_BITS = 6
MULT_BITS = 16
TILE_BITS = 16


class Mode(IntEnum):
    DENSE = 0
    SPARSE = 1
    QK = 2
    PV = 3


class EngineConfigError(ValueError):
    """An engine configuration the RTL cannot build; ``param`` names the offending parameter."""

    def __init__(self, param: str, message: str):
        self.param = param
        super().__init__(f"engine.{param}: {message}")


def max_reduction(p: EngineParams) -> int:
    return max(p.max_reduction_len, p.max_keys)


def check_params(p: EngineParams) -> None:
    """Refuse configurations the RTL cannot build, naming the parameter."""
    problems = list(p.problems())  # every build constraint lives in EngineParams.problems()
    if problems:
        key, msg = problems[0]
        more = "" if len(problems) == 1 else f" (and {len(problems) - 1} more: " + \
            "; ".join(f"{k}: {m}" for k, m in problems[1:]) + ")"
        raise EngineConfigError(key, msg + more)


def partial_bits(p: EngineParams) -> int:
    """Width of a group partial sum (sum q*a, sum a, or sum p*zero over one group)."""
    return signed_bits_for(max_reduction(p) * -ACT.min * KV_QMAX)


def layouts(p: EngineParams) -> dict[str, data.StructLayout | data.ArrayLayout]:
    """Payload layouts of the four input streams and the output stream (first field at bit 0)."""
    kb = max_reduction(p) // p.pe_lanes
    return {
        "cmd": data.StructLayout({
            "mode": 2,
            "tokens": range(p.mm_tokens + 1),
            "k_beats": range(kb + 1),      # weight beats per row tile (per token)
            "group_beats": range(kb + 1),  # weight beats per scale group
            "tiles": TILE_BITS,            # row tiles of pe_rows outputs
            "requant": 1,                  # requantize: one ``rq`` beat per row tile follows
        }),
        "act": data.ArrayLayout(signed(ACT.bits), p.pe_lanes),
        "weight": data.StructLayout({
            "codes": data.ArrayLayout(unsigned(CODE_BITS), p.pe_rows * p.pe_lanes),  # [row*lanes+lane]
            "meta": data.ArrayLayout(unsigned(META_BITS), p.pe_rows * p.pe_lanes // 2),
            "zero": data.ArrayLayout(unsigned(CODE_BITS), p.pe_lanes),
        }),
        "rq": data.StructLayout({          # per-row requantization of one row tile
            "mult": data.ArrayLayout(unsigned(MULT_BITS), p.pe_rows),
            "shift": data.ArrayLayout(unsigned(SHIFT_BITS), p.pe_rows),
        }),
        "scale": data.StructLayout({
            "s": data.ArrayLayout(unsigned(W_SCALE.bits), p.pe_rows),
            "m": data.ArrayLayout(signed(W_MIN.bits), p.pe_rows),
        }),
        "out": data.ArrayLayout(signed(p.acc_bits), p.pe_rows),
    }


def _tree_sum(values: list):
    vals = list(values)
    while len(vals) > 1:
        nxt = [vals[i] + vals[i + 1] for i in range(0, len(vals) - 1, 2)]
        if len(vals) % 2:
            nxt.append(vals[-1])
        vals = nxt
    return vals[0]


def pair_candidates(m: Module, q: list, a_even, a_odd, is_sparse, pair: int) -> list[tuple]:
    """The four candidate activations of a lane pair and their multiples ``a, 2a, 3a``, computed once
    for all rows: c0..c3 = the pair's group of four ``q`` in 2:4 mode; outside it c0 and c3 are the
    pair's own two activations (``a_even``, ``a_odd``) and c1, c2 go unused."""
    c = [Signal(signed(8), name=f"cand{pair}_{i}") for i in range(4)]
    m.d.comb += [c[0].eq(Mux(is_sparse, q[0], a_even)), c[1].eq(q[1]), c[2].eq(q[2]),
                 c[3].eq(Mux(is_sparse, q[3], a_odd))]
    return [lut_multiples(m, c[i], name=f"cand{pair}_{i}") for i in range(4)]


def pe_pair(m: Module, cand: list[tuple], meta, codes: list, is_sparse, hi_enable, r: int,
            pair: int) -> tuple[list, list]:
    """Row ``r``'s two products at lane pair ``pair`` (``signed(12)``) and the activations they chose
    (``signed(8)``): only selects and one adder per product, the multiples come from ``cand``
    (``pair_candidates``). ``meta``: the row's 3-bit 2:4 pattern; ``codes``: its two 4-bit codes."""
    mc = Signal(META_BITS, name=f"meta_r{r}_{pair}")
    m.d.comb += mc.eq(meta)
    # SPARSE_PATTERNS: 0:(0,1) 1:(0,2) 2:(0,3) 3:(1,2) 4:(1,3) 5:(2,3). The first kept weight takes
    # candidate 0, 1 or 2 of the group, the second 1, 2 or 3; outside 2:4 mode the lanes take c0 and
    # c3 (their own activations).
    sel_first = Signal(2, name=f"self_r{r}_{pair}")
    sel_second = Signal(2, name=f"sels_r{r}_{pair}")
    m.d.comb += [
        sel_first.eq(Mux(is_sparse, Mux(mc < 3, 0, Mux(mc < 5, 1, 2)), 0)),
        sel_second.eq(Mux(is_sparse, Mux(mc == 0, 0, Mux((mc == 1) | (mc == 3), 1, 2)), 2)),
    ]
    prods, acts = [], []
    for lane, sel, group, own, code in ((2 * pair, sel_first, cand[0:3], cand[0], codes[0]),
                                        (2 * pair + 1, sel_second, cand[1:4], cand[3], codes[1])):
        chosen = select_multiples(m, group, sel, f"pe_r{r}_l{lane}")
        acts.append(chosen[0])
        prods.append(split_product(m, chosen, own, code, hi_enable, f"pe_r{r}_l{lane}_p"))
    return prods, acts


class ArraySlice(Elaboratable):
    """A measurement harness: ``rows`` rows x ``2 * pairs`` lanes of the engine's array exactly as
    ``Engine`` builds it (``pair_candidates`` + ``pe_pair``), every input and product a top-level port,
    no registers. ``benchmarks/resources.py`` synthesizes it to price one product of the real array."""

    def __init__(self, rows: int, pairs: int):
        self.rows, self.pairs = rows, pairs
        self.q = [[Signal(signed(8), name=f"q{p}_{i}") for i in range(4)] for p in range(pairs)]
        self.dense = [Signal(signed(8), name=f"a{lane}") for lane in range(2 * pairs)]
        self.is_sparse = Signal()
        self.meta = [[Signal(META_BITS, name=f"meta{r}_{p}") for p in range(pairs)] for r in range(rows)]
        self.codes = [[Signal(CODE_BITS, name=f"code{r}_{lane}") for lane in range(2 * pairs)]
                      for r in range(rows)]
        self.prods = [[Signal(signed(12), name=f"prod{r}_{lane}") for lane in range(2 * pairs)]
                      for r in range(rows)]

    @property
    def ports(self) -> list:
        return ([s for g in self.q for s in g] + self.dense + [self.is_sparse]
                + [s for row in self.meta for s in row] + [s for row in self.codes for s in row]
                + [s for row in self.prods for s in row])

    def elaborate(self, platform):
        m = Module()
        hi_enable = Signal()
        m.d.comb += hi_enable.eq(~self.is_sparse)
        cand = [pair_candidates(m, self.q[p], self.dense[2 * p], self.dense[2 * p + 1], self.is_sparse, p)
                for p in range(self.pairs)]
        for r in range(self.rows):
            for p in range(self.pairs):
                pp, _ = pe_pair(m, cand[p], self.meta[r][p], self.codes[r][2 * p:2 * p + 2],
                                self.is_sparse, hi_enable, r, p)
                m.d.comb += [self.prods[r][2 * p].eq(pp[0]), self.prods[r][2 * p + 1].eq(pp[1])]
        return m


assert SPARSE_PATTERNS == ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))  # the selects below


class Requantizer(Elaboratable):
    """One output's requantizer, combinational: ``out = saturate(shift_round(acc * mult, shift))`` to
    int8 (sign-extended to acc_bits) when ``requant`` is set, else ``acc`` unchanged
    (``quant.reference.requantize``; proved exact for every input in ``tests/hw/test_formal.py``)."""

    def __init__(self, acc_bits: int):
        self.acc_bits = acc_bits
        self.acc = Signal(signed(acc_bits))
        self.mult = Signal(MULT_BITS)
        self.shift = Signal(SHIFT_BITS)
        self.requant = Signal()
        self.out = Signal(signed(acc_bits))

    def elaborate(self, platform):
        m = Module()
        ACC = self.acc_bits
        half = Signal(64)
        m.d.comb += half.eq(Mux(self.shift == 0, 0, (Const(1, 1) << self.shift) >> 1))
        # |acc * mult| < 2**(ACC+16) and half <= 2**62: the sum fits max(ACC + 18, 64) bits (64 for
        # acc_bits <= 46, a machine word in Verilator).
        sum_bits = max(ACC + MULT_BITS + 2, 64)
        summed = Signal(signed(sum_bits))
        scaled = Signal(signed(sum_bits))
        m.d.comb += [summed.eq(self.acc * self.mult + half), scaled.eq(summed >> self.shift)]
        sat = Mux(scaled > ACT.max, ACT.max, Mux(scaled < ACT.min, ACT.min, scaled))
        m.d.comb += self.out.eq(Mux(self.requant, sat, self.acc))
        return m


class Engine(wiring.Component):
    """The compute engine. Streams: ``cmd``, ``act``, ``weight``, ``scale`` in; ``out`` out."""

    def __init__(self, params: EngineParams):
        check_params(params)
        self.p = params
        self.layouts = layouts(params)
        super().__init__({
            "cmd": In(stream.Signature(self.layouts["cmd"])),
            "act": In(stream.Signature(self.layouts["act"])),
            "weight": In(stream.Signature(self.layouts["weight"])),
            "scale": In(stream.Signature(self.layouts["scale"])),
            "rq": In(stream.Signature(self.layouts["rq"])),
            "out": Out(stream.Signature(self.layouts["out"])),
            "busy": Out(1),
        })
        #: the pipeline's global stall (the output bank cannot take a finished tile): not a port, an
        #: observation point for testbenches that measure how often their stalls reach it
        self.stall = Signal()
        #: the output's requantizers, one per row (combinational; their inputs are registers of the
        #: output bank, so the formal output-stream check can assert on them: sim/formal.py)
        self.requantizers = [Requantizer(params.acc_bits) for _ in range(params.pe_rows)]

    def elaborate(self, platform):
        p = self.p
        R, L, TT = p.pe_rows, p.pe_lanes, p.mm_tokens
        m = Module()
        WP = partial_bits(p)
        ACC = p.acc_bits
        kb_max = max_reduction(p) // L
        bank_depth = p.act_buffer_bytes // (2 * L)
        widx_bits = bits_for(2 * bank_depth)

        # ---------------- command registers ----------------
        cmd = Signal(self.layouts["cmd"])
        IDLE, LOAD, COMPUTE = 0, 1, 2
        state = Signal(2)
        wpt = Signal(range(2 * kb_max + 1))  # activation words per token
        m.d.comb += wpt.eq(Mux(cmd.mode == Mode.SPARSE, cmd.k_beats << 1, cmd.k_beats))

        # ---------------- activation buffer: two banks of pe_lanes bytes ----------------
        banks = [Memory(shape=unsigned(8 * L), depth=bank_depth, init=[]) for _ in range(2)]
        m.submodules.bank0, m.submodules.bank1 = banks
        wps = [b.write_port() for b in banks]
        rps = [b.read_port(domain="sync") for b in banks]

        # ---------------- pipeline registers ----------------
        s1_valid, s2_valid, s3_valid = Signal(), Signal(), Signal()
        stall = self.stall
        pipe_empty = ~(s1_valid | s2_valid | s3_valid)

        # ---------------- IDLE / LOAD ----------------
        lw = Signal(widx_bits)          # word being written
        lword = Signal(range(2 * kb_max + 1))
        ltok = Signal(range(TT + 1))
        m.d.comb += self.cmd.ready.eq((state == IDLE) & pipe_empty)
        m.d.comb += self.busy.eq((state != IDLE) | ~pipe_empty)

        # compute counters
        t = Signal(range(TT + 1))
        b = Signal(range(kb_max + 1))
        gb = Signal(range(kb_max + 1))
        g_first = Signal()
        tile = Signal(TILE_BITS)
        tok_base = Signal(widx_bits)
        b_word = Signal(widx_bits)

        with m.If(self.cmd.valid & self.cmd.ready):
            m.d.sync += [cmd.eq(self.cmd.payload), state.eq(LOAD), lw.eq(0), lword.eq(0), ltok.eq(0)]

        m.d.comb += self.act.ready.eq(state == LOAD)
        for i in range(2):
            m.d.comb += [wps[i].addr.eq(lw >> 1), wps[i].data.eq(self.act.payload.as_value()),
                         wps[i].en.eq((state == LOAD) & self.act.valid & (lw[0] == i))]
        with m.If((state == LOAD) & self.act.valid):
            m.d.sync += [lw.eq(lw + 1), lword.eq(lword + 1)]
            with m.If(lword == wpt - 1):
                m.d.sync += [lword.eq(0), ltok.eq(ltok + 1)]
                with m.If(ltok == cmd.tokens - 1):
                    m.d.sync += [state.eq(COMPUTE), t.eq(0), b.eq(0), gb.eq(0), g_first.eq(1),
                                 tile.eq(0), tok_base.eq(0), b_word.eq(0)]

        # ---------------- S0: issue one (token, weight beat) op per cycle ----------------
        w, sc = self.weight, self.scale
        last_tok = t == cmd.tokens - 1
        last_gb = gb == cmd.group_beats - 1
        last_beat = b == cmd.k_beats - 1
        need_scale = (cmd.mode != Mode.PV) & last_gb
        issue = Signal()
        m.d.comb += issue.eq((state == COMPUTE) & w.valid & (~need_scale | sc.valid) & ~stall)
        m.d.comb += [w.ready.eq(issue & last_tok), sc.ready.eq(issue & need_scale & last_tok)]

        widx = tok_base + b_word
        for i in range(2):
            m.d.comb += [rps[i].addr.eq(widx >> 1), rps[i].en.eq(~stall)]

        with m.If(issue):
            with m.If(last_tok):
                m.d.sync += [t.eq(0), tok_base.eq(0), b.eq(b + 1), gb.eq(gb + 1),
                             b_word.eq(b_word + Mux(cmd.mode == Mode.SPARSE, 2, 1))]
                with m.If(last_gb):
                    m.d.sync += [gb.eq(0), g_first.eq(0)]
                with m.If(last_beat):
                    m.d.sync += [b.eq(0), b_word.eq(0), gb.eq(0), g_first.eq(1), tile.eq(tile + 1)]
                    with m.If(tile == cmd.tiles - 1):
                        m.d.sync += state.eq(IDLE)
            with m.Else():
                m.d.sync += [t.eq(t + 1), tok_base.eq(tok_base + wpt)]

        # S1 registers
        s1 = {
            "t": Signal(range(TT)), "parity": Signal(), "first_gb": Signal(), "last_gb": Signal(),
            "first_group": Signal(), "last_beat": Signal(), "last_tok": Signal(),
            "w": Signal(self.layouts["weight"]), "sc": Signal(self.layouts["scale"]),
        }
        with m.If(~stall):
            m.d.sync += [
                s1_valid.eq(issue), s1["t"].eq(t), s1["parity"].eq(widx[0]), s1["first_gb"].eq(gb == 0),
                s1["last_gb"].eq(last_gb), s1["first_group"].eq(g_first), s1["last_beat"].eq(last_beat),
                s1["last_tok"].eq(last_tok), s1["w"].eq(w.payload), s1["sc"].eq(sc.payload),
            ]

        # ---------------- S1: select activations, multiply, reduce ----------------
        d0, d1 = rps[0].data, rps[1].data
        wide = Signal(2 * 8 * L)  # named signals: slicing an expression re-emits all of it per slice
        dense_word = Signal(8 * L)
        m.d.comb += [wide.eq(Cat(d0, d1)), dense_word.eq(Mux(s1["parity"], d1, d0))]
        a_dense = [dense_word.word_select(lane, 8).as_signed() for lane in range(L)]
        is_sparse = cmd.mode == Mode.SPARSE
        is_pv = cmd.mode == Mode.PV
        P = [Signal(signed(WP), name=f"s2_p{r}") for r in range(R)]
        A = [Signal(signed(WP), name=f"s2_a{r}") for r in range(R)]
        # Fields of the weight beat as slices of the registered signal itself: indexing the payload
        # view (a slice of the beat) per product re-emits the whole beat in Amaranth's netlist builder,
        # which made the conversion time and memory grow with pe_rows squared.
        w_bits = s1["w"].as_value()
        wl = self.layouts["weight"]
        codes_at = wl["codes"].offset
        meta_at = wl["meta"].offset
        zero_at = wl["zero"].offset
        hi_enable = Signal()  # 2:4 mode multiplies 2-bit codes: the code's high digit is ignored
        m.d.comb += hi_enable.eq(~is_sparse)
        # Candidate activations of each lane pair, shared by every row (docs/engine.md, "The array"):
        # the pair's group of four in 2:4 mode; c0 and c3 are the pair's own two lanes otherwise.
        cand = [pair_candidates(m, [wide.word_select(4 * pair + i, 8).as_signed() for i in range(4)],
                                a_dense[2 * pair], a_dense[2 * pair + 1], is_sparse, pair)
                for pair in range(L // 2)]
        # zero row (P.V): sum over lanes of p * zero-point of the lane's key (the lane's own multiples)
        zprods = []
        for lane in range(L):
            own = cand[lane // 2][0 if lane % 2 == 0 else 3]
            z = w_bits[zero_at + CODE_BITS * lane:zero_at + CODE_BITS * (lane + 1)]
            zprods.append(split_product(m, own, own, z, Const(1), f"zp{lane}"))
        zsum = Signal(signed(WP))
        m.d.comb += zsum.eq(_tree_sum(zprods))
        a_sel = [[None] * L for _ in range(R)]
        prods = [[None] * L for _ in range(R)]
        for r in range(R):
            for pair in range(L // 2):
                mi = r * (L // 2) + pair
                codes = [w_bits[codes_at + CODE_BITS * ci:codes_at + CODE_BITS * (ci + 1)]
                         for ci in (r * L + 2 * pair, r * L + 2 * pair + 1)]
                pp, xx = pe_pair(m, cand[pair], w_bits[meta_at + META_BITS * mi:meta_at + META_BITS * (mi + 1)],
                                 codes, is_sparse, hi_enable, r, pair)
                prods[r][2 * pair:2 * pair + 2] = pp
                a_sel[r][2 * pair:2 * pair + 2] = xx
        s2 = {
            "t": Signal(range(TT)), "first_gb": Signal(), "last_gb": Signal(), "first_group": Signal(),
            "last_beat": Signal(), "last_tok": Signal(),
            "s": [Signal(unsigned(W_SCALE.bits), name=f"s2_s{r}") for r in range(R)],
            "m": [Signal(signed(W_MIN.bits), name=f"s2_m{r}") for r in range(R)],
        }
        with m.If(~stall):
            m.d.sync += s2_valid.eq(s1_valid)
            for key in ("t", "first_gb", "last_gb", "first_group", "last_beat", "last_tok"):
                m.d.sync += s2[key].eq(s1[key])
            sc_bits = s1["sc"].as_value()
            sl = self.layouts["scale"]
            s_at, m_at = sl["s"].offset, sl["m"].offset
            for r in range(R):
                s_r = sc_bits[s_at + W_SCALE.bits * r:s_at + W_SCALE.bits * (r + 1)]
                m_r = sc_bits[m_at + W_MIN.bits * r:m_at + W_MIN.bits * (r + 1)].as_signed()
                m.d.sync += [
                    P[r].eq(_tree_sum(prods[r])),
                    A[r].eq(Mux(is_pv, zsum, _tree_sum(a_sel[r]))),
                    s2["s"][r].eq(Mux(is_pv, 1, s_r)),
                    s2["m"][r].eq(Mux(is_pv, -1, m_r)),
                ]

        # ---------------- S2: group accumulation and group scale ----------------
        Pg = [Array(Signal(signed(WP), name=f"pg_t{tk}_r{r}") for tk in range(TT)) for r in range(R)]
        Ag = [Array(Signal(signed(WP), name=f"ag_t{tk}_r{r}") for tk in range(TT)) for r in range(R)]
        s3 = {"t": Signal(range(TT)), "first_group": Signal(), "last_beat": Signal(), "last_tok": Signal(),
              "g": [Signal(signed(ACC), name=f"s3_g{r}") for r in range(R)]}
        with m.If(~stall):
            m.d.sync += s3_valid.eq(s2_valid & s2["last_gb"])
            for key in ("t", "first_group", "last_beat", "last_tok"):
                m.d.sync += s3[key].eq(s2[key])
        for r in range(R):
            ptot = Signal(signed(WP), name=f"ptot{r}")
            atot = Signal(signed(WP), name=f"atot{r}")
            m.d.comb += [ptot.eq(Mux(s2["first_gb"], 0, Pg[r][s2["t"]]) + P[r]),
                         atot.eq(Mux(s2["first_gb"], 0, Ag[r][s2["t"]]) + A[r])]
            with m.If(s2_valid & ~stall):
                m.d.sync += [Pg[r][s2["t"]].eq(ptot), Ag[r][s2["t"]].eq(atot)]
                m.d.sync += s3["g"][r].eq(s2["s"][r] * ptot + s2["m"][r] * atot)

        # ---------------- S3: row accumulators, hand-over to the output bank ----------------
        acc = [Array(Signal(signed(ACC), name=f"acc_t{tk}_r{r}") for tk in range(TT)) for r in range(R)]
        ob = [Array(Signal(signed(ACC), name=f"ob_t{tk}_r{r}") for tk in range(TT)) for r in range(R)]
        ob_busy = Signal()
        ob_e = Signal(range(TT + 1))
        ob_tokens = Signal(range(TT + 1))
        ob_rq = Signal()
        ob_shift = [Signal(SHIFT_BITS, name=f"ob_shift{r}") for r in range(R)]
        ob_mult = [Signal(MULT_BITS, name=f"ob_mult{r}") for r in range(R)]
        # ---------------- output: one beat of pe_rows values per token ----------------
        m.d.comb += self.out.valid.eq(ob_busy)
        for r in range(R):
            rq = self.requantizers[r]
            m.submodules[f"rq{r}"] = rq
            m.d.comb += [rq.acc.eq(ob[r][ob_e]), rq.mult.eq(ob_mult[r]), rq.shift.eq(ob_shift[r]),
                         rq.requant.eq(ob_rq),
                         self.out.payload.as_value()[ACC * r:ACC * (r + 1)].eq(rq.out)]
        with m.If(self.out.valid & self.out.ready):
            m.d.sync += ob_e.eq(ob_e + 1)
            with m.If(ob_e == ob_tokens - 1):
                m.d.sync += [ob_busy.eq(0), ob_e.eq(0)]
        # A finished tile may overwrite token t of the output bank once the bank's old token t has
        # gone out (or goes out this cycle); its last token re-arms the bank when the old contents
        # have all gone out. So a tile of one beat per token does not wait for the drain.
        t3 = s3["t"]
        out_fire = Signal()
        fire_last = Signal()
        m.d.comb += [out_fire.eq(self.out.valid & self.out.ready),
                     fire_last.eq(out_fire & (ob_e == ob_tokens - 1))]
        may_write = ~ob_busy | (t3 >= ob_tokens) | (t3 < ob_e) | ((t3 == ob_e) & out_fire)
        may_final = ~ob_busy | fire_last
        # A requantized tile takes its per-row mult/shift beat (``rq``) when it enters the output bank.
        rq_wait = cmd.requant & ~self.rq.valid
        m.d.comb += stall.eq(s3_valid & s3["last_beat"] & Mux(s3["last_tok"], ~may_final | rq_wait, ~may_write))
        m.d.comb += self.rq.ready.eq(s3_valid & s3["last_beat"] & s3["last_tok"] & cmd.requant & may_final)
        with m.If(s3_valid & ~stall):
            for r in range(R):
                new = Signal(signed(ACC), name=f"newacc{r}")
                m.d.comb += new.eq(Mux(s3["first_group"], 0, acc[r][s3["t"]]) + s3["g"][r])
                m.d.sync += acc[r][s3["t"]].eq(new)
                with m.If(s3["last_beat"]):
                    m.d.sync += ob[r][s3["t"]].eq(new)
            with m.If(s3["last_beat"] & s3["last_tok"]):
                m.d.sync += [ob_busy.eq(1), ob_e.eq(0), ob_tokens.eq(cmd.tokens), ob_rq.eq(cmd.requant)]
                rq_bits = self.rq.payload.as_value()
                rl = self.layouts["rq"]
                for r in range(R):
                    m.d.sync += [
                        ob_mult[r].eq(rq_bits[rl["mult"].offset + MULT_BITS * r:][:MULT_BITS]),
                        ob_shift[r].eq(rq_bits[rl["shift"].offset + SHIFT_BITS * r:][:SHIFT_BITS]),
                    ]

        return m
