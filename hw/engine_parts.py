"""The compute engine's interface definitions and its sub-components (``hw.engine.Engine`` wires them
together; ``docs/engine.md``, "Structure", draws the picture). Each sub-component is a
``wiring.Component`` with its own signature, so the engine can be synthesized piece by piece and summed
by instance count (``bitstream/engine_resources.py``):

* ``Sequencer``   (1)        the command FSM (``m.FSM``: IDLE / LOAD / COMPUTE), the activation load's
  write side, and the issue of one (token, weight beat) op per cycle with its pipeline tags (S0);
* ``ActBuffer``   (1)        the activation buffer: two banks of ``pe_lanes`` bytes, registered reads;
* ``Candidates``  (1)        each lane pair's four candidate activations and their multiples, shared by
  every row, and the P·V zero row (sum over lanes of p * the key's zero-point);
* ``ArrayRow``    (pe_rows)  one row's ``pe_lanes`` products (``pe_pair``) and its two adder trees,
  registered (S1 -> S2);
* ``GroupRow``    (pe_rows)  one row's group partial sums per token and the group scale
  ``s * sum(q*a) + m * sum(a)`` (S2 -> S3);
* ``AccRow``      (pe_rows)  one row's accumulators per token, its slot of the output bank and its
  requantization (mult, shift) (S3);
* ``OutputBank``  (1)        the output bank's control: which token goes out, when a finished tile may
  be written into it;
* ``Requantizer`` (pe_rows)  ``saturate(shift_round(acc * mult, shift))`` on the way out.

Widths come from ``quant.formats``; nothing here is a test harness.
"""

from __future__ import annotations

from enum import IntEnum

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import bits_for

from quant.formats import (ACT, KV_CODE, KV_QMAX, REQ_MULT, REQ_SHIFT_MAX, SPARSE_META_BITS, SPARSE_PATTERNS,
                           W_MIN, W_SCALE, signed_bits_for)

from .mult import select_multiples, split_product
from .params import EngineParams

#: Bits of a code lane: the array is built for the widest code it multiplies (the 4-bit KV cache).
CODE_BITS = KV_CODE.bits
META_BITS = SPARSE_META_BITS
SHIFT_BITS = REQ_SHIFT_MAX.bit_length()
MULT_BITS = REQ_MULT.bits
TILE_BITS = 16
#: a lane's multiples ``a, 2a, 3a`` (``hw.mult.lut_multiples``)
MULTIPLE_BITS = ACT.bits + 2


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


def bank_depth(p: EngineParams) -> int:
    """Words of ``pe_lanes`` bytes in each of the activation buffer's two banks."""
    return p.act_buffer_bytes // (2 * p.pe_lanes)


def word_bits(p: EngineParams) -> int:
    """Width of an activation-buffer word index (both banks)."""
    return bits_for(2 * bank_depth(p))


def layouts(p: EngineParams) -> dict[str, data.StructLayout | data.ArrayLayout]:
    """Payload layouts of the five input streams and the output stream (first field at bit 0)."""
    kb = max_reduction(p) // p.pe_lanes
    return {
        "cmd": data.StructLayout({
            "mode": 2,
            "tokens": range(p.mm_tokens + 1),
            "k_beats": range(kb + 1),      # weight beats per row tile (per token)
            "group_beats": range(kb + 1),  # weight beats per scale group
            "tiles": TILE_BITS,            # row tiles of pe_rows outputs
            "requant": 1,                  # requantize: one ``rq`` beat per row tile follows
            "wide": 1,                     # DENSE: the weight codes are 4-bit (W4), else 2-bit (beat_ops)
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


def beat_ops(p: EngineParams, mode, wide=False) -> int:
    """Ops issued per weight beat and token. ``multiplier_style: dsp`` (``hw.engine_dsp``) runs a beat
    as two ops when its codes do not fit the DSPs' 2-bit digit in one: a 2:4 beat (its ``2 * pe_lanes``
    expanded positions through the ``pe_lanes`` DSP columns in two halves) and a beat of 4-bit codes
    (QK and PV always, KV4; DENSE with the command's ``wide``, the W4 lm_head: the low digits, then the
    high digits); W2 DENSE is one op. ``lut`` style: always 1. The cycle models (``hw.engine_model``,
    ``hw.controller_model``) read it."""
    if p.multiplier_style != "dsp":
        return 1
    return 2 if int(mode) != Mode.DENSE or bool(wide) else 1


def tag_layout(p: EngineParams) -> data.StructLayout:
    """What travels with an op down the pipeline: its token and where its beat sits in the group, the
    tile and the tokens; ``half``: which of a beat's two ops it is when ``beat_ops`` is 2
    (``multiplier_style: dsp``: the half of a 2:4 beat, or the digit of a 4-bit beat, 1 = the high
    digits); always 0 otherwise."""
    return data.StructLayout({
        "t": range(p.mm_tokens), "first_gb": 1, "last_gb": 1, "first_group": 1, "last_beat": 1,
        "last_tok": 1, "half": 1,
    })


def tree_sum(values: list):
    """A balanced adder tree (pairs, then pairs of pairs)."""
    vals = list(values)
    while len(vals) > 1:
        nxt = [vals[i] + vals[i + 1] for i in range(0, len(vals) - 1, 2)]
        if len(vals) % 2:
            nxt.append(vals[-1])
        vals = nxt
    return vals[0]


# ---------------------------------------------------------------------------------------------------
# The array cell (functions: ArraySlice and the components below build the same logic)
# ---------------------------------------------------------------------------------------------------
def multiples_of(m: Module, act, act3, name: str) -> tuple[Signal, Signal, Signal]:
    """``a, 2a, 3a`` from ``a`` and ``3a`` (``hw.mult.lut_multiples``' outputs: 2a is a wire)."""
    m1 = Signal(signed(MULTIPLE_BITS), name=f"{name}_a1")
    m2 = Signal(signed(MULTIPLE_BITS), name=f"{name}_a2")
    m3 = Signal(signed(MULTIPLE_BITS), name=f"{name}_a3")
    m.d.comb += [m1.eq(act), m2.eq(act << 1), m3.eq(act3)]
    return m1, m2, m3


def pair_candidates(m: Module, q: list, a_even, a_odd, is_sparse, pair: int) -> list[tuple]:
    """The four candidate activations of a lane pair and their multiples ``a, 2a, 3a``, computed once
    for all rows: c0..c3 = the pair's group of four ``q`` in 2:4 mode; outside it c0 and c3 are the
    pair's own two activations (``a_even``, ``a_odd``) and c1, c2 go unused."""
    c = [Signal(signed(ACT.bits), name=f"cand{pair}_{i}") for i in range(4)]
    m.d.comb += [c[0].eq(Mux(is_sparse, q[0], a_even)), c[1].eq(q[1]), c[2].eq(q[2]),
                 c[3].eq(Mux(is_sparse, q[3], a_odd))]
    return [multiples_of(m, c[i], (c[i] << 1) + c[i], name=f"cand{pair}_{i}") for i in range(4)]


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


assert SPARSE_PATTERNS == ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))  # pe_pair's selects


# ---------------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------------
class Sequencer(wiring.Component):
    """The command FSM and the issue stage (S0). IDLE takes a command once the pipeline is empty; LOAD
    writes ``tokens x words`` activation words into the buffer (``load_en``/``load_word``); COMPUTE
    issues one (token, weight beat) op per cycle when the weight beat (and at a group's last beat the
    scale beat) is there and the pipeline is not stalled, taking the beats with the last token.
    ``command``: the registered command; ``word``: the buffer word the op reads; ``tags``: where the op
    sits (``tag_layout``)."""

    def __init__(self, p: EngineParams):
        self.params = p
        kb_max = max_reduction(p) // p.pe_lanes
        super().__init__({
            "cmd": In(stream.Signature(layouts(p)["cmd"])),
            "command": Out(layouts(p)["cmd"]),
            "pipe_empty": In(1),
            "stall": In(1),
            "busy": Out(1),
            "act_valid": In(1), "act_ready": Out(1),
            "load_en": Out(1), "load_word": Out(word_bits(p)),
            "w_valid": In(1), "w_ready": Out(1),
            "sc_valid": In(1), "sc_ready": Out(1),
            "issue": Out(1),
            "word": Out(word_bits(p) + 1),
            "tags": Out(tag_layout(p)),
            "words_per_token": Out(range(2 * kb_max + 1)),
        })

    def elaborate(self, platform):
        p = self.params
        TT = p.mm_tokens
        kb_max = max_reduction(p) // p.pe_lanes
        wb = word_bits(p)
        m = Module()
        cmd = self.command
        wpt = self.words_per_token  # activation words per token
        m.d.comb += wpt.eq(Mux(cmd.mode == Mode.SPARSE, cmd.k_beats << 1, cmd.k_beats))

        lw = Signal(wb)                     # word being written
        lword = Signal(range(2 * kb_max + 1))
        ltok = Signal(range(TT + 1))
        t = Signal(range(TT + 1))           # compute counters
        b = Signal(range(kb_max + 1))
        gb = Signal(range(kb_max + 1))
        g_first = Signal()
        tile = Signal(TILE_BITS)
        tok_base = Signal(wb)
        b_word = Signal(wb)

        # a beat of two ops per token in dsp style (beat_ops: 2:4, QK/PV, wide DENSE): op 0 (``half``)
        # for every token, then op 1; a 2:4 beat's halves read the pair's word 2b + half, a 4-bit beat's
        # two digits the same word; the beat's tags (group start/end, tile end) go with its first and
        # last op, and the beats are taken with the last
        split = Signal()
        half = Signal()
        m.d.comb += split.eq(((cmd.mode != Mode.DENSE) | cmd.wide) if p.multiplier_style == "dsp" else 0)
        half_last = ~split | half
        last_tok = t == cmd.tokens - 1
        last_gb = gb == cmd.group_beats - 1
        last_beat = b == cmd.k_beats - 1
        need_scale = (cmd.mode != Mode.PV) & last_gb
        m.d.comb += [
            self.load_word.eq(lw),
            self.word.eq(tok_base + b_word + (half & (cmd.mode == Mode.SPARSE))),
            self.tags.t.eq(t), self.tags.first_gb.eq((gb == 0) & ~half), self.tags.last_gb.eq(last_gb & half_last),
            self.tags.first_group.eq(g_first), self.tags.last_beat.eq(last_beat & half_last),
            self.tags.last_tok.eq(last_tok), self.tags.half.eq(half),
            self.w_ready.eq(self.issue & last_tok & half_last),
            self.sc_ready.eq(self.issue & need_scale & last_tok & half_last),
        ]

        with m.FSM(name="state") as fsm:
            with m.State("IDLE"):
                m.d.comb += self.cmd.ready.eq(self.pipe_empty)
                with m.If(self.cmd.valid & self.pipe_empty):
                    m.d.sync += [cmd.eq(self.cmd.payload), lw.eq(0), lword.eq(0), ltok.eq(0)]
                    m.next = "LOAD"
            with m.State("LOAD"):
                m.d.comb += [self.act_ready.eq(1), self.load_en.eq(self.act_valid)]
                with m.If(self.act_valid):
                    m.d.sync += [lw.eq(lw + 1), lword.eq(lword + 1)]
                    with m.If(lword == wpt - 1):
                        m.d.sync += [lword.eq(0), ltok.eq(ltok + 1)]
                        with m.If(ltok == cmd.tokens - 1):
                            m.d.sync += [t.eq(0), b.eq(0), gb.eq(0), g_first.eq(1), tile.eq(0),
                                         tok_base.eq(0), b_word.eq(0), half.eq(0)]
                            m.next = "COMPUTE"
            with m.State("COMPUTE"):
                m.d.comb += self.issue.eq(self.w_valid & (~need_scale | self.sc_valid) & ~self.stall)
                with m.If(self.issue):
                    with m.If(last_tok & ~half_last):  # the beat's second half
                        m.d.sync += [t.eq(0), tok_base.eq(0), half.eq(1)]
                    with m.Elif(last_tok):
                        m.d.sync += [t.eq(0), tok_base.eq(0), b.eq(b + 1), gb.eq(gb + 1), half.eq(0),
                                     b_word.eq(b_word + Mux(cmd.mode == Mode.SPARSE, 2, 1))]
                        with m.If(last_gb):
                            m.d.sync += [gb.eq(0), g_first.eq(0)]
                        with m.If(last_beat):
                            m.d.sync += [b.eq(0), b_word.eq(0), gb.eq(0), g_first.eq(1), tile.eq(tile + 1)]
                            with m.If(tile == cmd.tiles - 1):
                                m.next = "IDLE"
                    with m.Else():
                        m.d.sync += [t.eq(t + 1), tok_base.eq(tok_base + wpt)]
        m.d.comb += self.busy.eq(~fsm.ongoing("IDLE") | ~self.pipe_empty)
        return m


class ActBuffer(wiring.Component):
    """The activation buffer: two banks of ``pe_lanes`` bytes (``Memory``), word ``w`` in bank
    ``w % 2`` at ``w // 2``. One write port (``w_en``, ``w_word``, ``w_data``); both banks read at
    ``r_word // 2`` each cycle ``r_en`` is set, registered (``r_data0``, ``r_data1``), so the pair
    of words a 2:4 beat needs comes out in one cycle."""

    def __init__(self, p: EngineParams):
        self.params = p
        L = p.pe_lanes
        super().__init__({
            "w_en": In(1), "w_word": In(word_bits(p)), "w_data": In(8 * L),
            "r_en": In(1), "r_word": In(word_bits(p) + 1),
            "r_data0": Out(8 * L), "r_data1": Out(8 * L),
        })

    def elaborate(self, platform):
        L = self.params.pe_lanes
        m = Module()
        banks = [Memory(shape=unsigned(8 * L), depth=bank_depth(self.params), init=[]) for _ in range(2)]
        m.submodules.bank0, m.submodules.bank1 = banks
        for i, (bank, out) in enumerate(zip(banks, (self.r_data0, self.r_data1))):
            wp = bank.write_port()
            rp = bank.read_port(domain="sync")
            m.d.comb += [wp.addr.eq(self.w_word >> 1), wp.data.eq(self.w_data),
                         wp.en.eq(self.w_en & (self.w_word[0] == i)),
                         rp.addr.eq(self.r_word >> 1), rp.en.eq(self.r_en), out.eq(rp.data)]
        return m


def candidate_inputs(p: EngineParams) -> dict:
    """The input ports every array's activation side takes (``Candidates``, ``hw.engine_dsp.DspCandidates``):
    the two buffer words, the op's word parity and the P·V zero-points of the lanes."""
    L = p.pe_lanes
    return {"d0": In(8 * L), "d1": In(8 * L), "parity": In(1), "zero": In(data.ArrayLayout(unsigned(CODE_BITS), L))}


class Candidates(wiring.Component):
    """The activation side of the array, shared by every row: from the two buffer words (``d0``,
    ``d1``) and the op's word parity, each lane pair's four candidate activations ``a`` and their
    ``3a`` (``pair_candidates``: in 2:4 mode the pair's group of four of the 2 x pe_lanes inputs, else
    the pair's own two activations at candidates 0 and 3), and the P·V zero row: ``zsum`` = sum over
    lanes of the lane's activation times its key's zero-point (``zero``). Combinational."""

    def __init__(self, p: EngineParams):
        self.params = p
        L = p.pe_lanes
        super().__init__({
            **candidate_inputs(p), "is_sparse": In(1),
            "a": Out(data.ArrayLayout(signed(ACT.bits), 2 * L)),      # [4 * pair + i]
            "a3": Out(data.ArrayLayout(signed(MULTIPLE_BITS), 2 * L)),
            "zsum": Out(signed(partial_bits(p))),
        })

    def elaborate(self, platform):
        L = self.params.pe_lanes
        m = Module()
        wide = Signal(2 * 8 * L)  # named signals: slicing an expression re-emits all of it per slice
        dense_word = Signal(8 * L)
        m.d.comb += [wide.eq(Cat(self.d0, self.d1)),
                     dense_word.eq(Mux(self.parity, self.d1, self.d0))]
        a_dense = [dense_word.word_select(lane, 8).as_signed() for lane in range(L)]
        cand = [pair_candidates(m, [wide.word_select(4 * pair + i, 8).as_signed() for i in range(4)],
                                a_dense[2 * pair], a_dense[2 * pair + 1], self.is_sparse, pair)
                for pair in range(L // 2)]
        for pair in range(L // 2):
            for i in range(4):
                m.d.comb += [self.a[4 * pair + i].eq(cand[pair][i][0]), self.a3[4 * pair + i].eq(cand[pair][i][2])]
        zero = self.zero.as_value()
        zprods = []
        for lane in range(L):
            own = cand[lane // 2][0 if lane % 2 == 0 else 3]
            zprods.append(split_product(m, own, own, zero[CODE_BITS * lane:CODE_BITS * (lane + 1)],
                                        Const(1), f"zp{lane}"))
        m.d.comb += self.zsum.eq(tree_sum(zprods))
        return m


class ArrayRow(wiring.Component):
    """One row of the array: ``pe_lanes`` products of the row's codes with the activations its 2:4
    patterns choose among the shared candidates (``pe_pair``), summed by two adder trees: ``p`` = sum
    of the products, ``a`` = sum of the chosen activations (or, in P·V mode, the zero row's ``zsum``).
    Both registered while ``en`` (S1 -> S2)."""

    def __init__(self, p: EngineParams):
        self.params = p
        L, WP = p.pe_lanes, partial_bits(p)
        super().__init__({
            "cand_a": In(data.ArrayLayout(signed(ACT.bits), 2 * L)),
            "cand_a3": In(data.ArrayLayout(signed(MULTIPLE_BITS), 2 * L)),
            "codes": In(data.ArrayLayout(unsigned(CODE_BITS), L)),
            "meta": In(data.ArrayLayout(unsigned(META_BITS), L // 2)),
            "is_sparse": In(1), "is_pv": In(1), "zsum": In(signed(WP)), "en": In(1),
            "p": Out(signed(WP)), "a": Out(signed(WP)),
        })

    def elaborate(self, platform):
        L = self.params.pe_lanes
        m = Module()
        hi_enable = Signal()  # 2:4 mode multiplies 2-bit codes: the code's high digit is ignored
        m.d.comb += hi_enable.eq(~self.is_sparse)
        codes, meta = self.codes.as_value(), self.meta.as_value()
        ca, ca3 = self.cand_a.as_value(), self.cand_a3.as_value()
        A8, AM = ACT.bits, MULTIPLE_BITS
        prods, acts = [], []
        for pair in range(L // 2):
            cand = [multiples_of(m, ca[A8 * k:A8 * (k + 1)].as_signed(), ca3[AM * k:AM * (k + 1)].as_signed(),
                                 f"c{pair}_{k % 4}") for k in range(4 * pair, 4 * pair + 4)]
            pp, xx = pe_pair(m, cand, meta[META_BITS * pair:META_BITS * (pair + 1)],
                             [codes[CODE_BITS * lane:CODE_BITS * (lane + 1)] for lane in (2 * pair, 2 * pair + 1)],
                             self.is_sparse, hi_enable, 0, pair)
            prods += pp
            acts += xx
        with m.If(self.en):
            m.d.sync += [self.p.eq(tree_sum(prods)), self.a.eq(Mux(self.is_pv, self.zsum, tree_sum(acts)))]
        return m


class GroupRow(wiring.Component):
    """One row's group stage: the op's scale (``s_in``, ``m_in``; s = 1, m = -1 in P·V mode) is
    registered with the row's sums while ``load`` (S1 -> S2); for a valid op not held (``valid``,
    ``hold``) the group partial sums of its token add the row's ``p`` and ``a`` (restarting at a
    group's first beat) and ``g = s * sum(q*a) + m * sum(a)`` is registered (S2 -> S3)."""

    def __init__(self, p: EngineParams):
        self.params = p
        WP = partial_bits(p)
        super().__init__({
            "load": In(1), "s_in": In(unsigned(W_SCALE.bits)), "m_in": In(signed(W_MIN.bits)), "is_pv": In(1),
            "p": In(signed(WP)), "a": In(signed(WP)),
            "valid": In(1), "hold": In(1), "first_gb": In(1), "t": In(range(p.mm_tokens)),
            "g": Out(signed(p.acc_bits)),
        })

    def elaborate(self, platform):
        TT, WP = self.params.mm_tokens, partial_bits(self.params)
        m = Module()
        s = Signal(unsigned(W_SCALE.bits))
        mn = Signal(signed(W_MIN.bits))
        with m.If(self.load):
            m.d.sync += [s.eq(Mux(self.is_pv, 1, self.s_in)), mn.eq(Mux(self.is_pv, -1, self.m_in))]
        pg = Array(Signal(signed(WP), name=f"pg_t{tk}") for tk in range(TT))
        ag = Array(Signal(signed(WP), name=f"ag_t{tk}") for tk in range(TT))
        ptot = Signal(signed(WP))
        atot = Signal(signed(WP))
        m.d.comb += [ptot.eq(Mux(self.first_gb, 0, pg[self.t]) + self.p),
                     atot.eq(Mux(self.first_gb, 0, ag[self.t]) + self.a)]
        with m.If(self.valid & ~self.hold):
            m.d.sync += [pg[self.t].eq(ptot), ag[self.t].eq(atot), self.g.eq(s * ptot + mn * atot)]
        return m


class AccRow(wiring.Component):
    """One row's accumulators (one per token) and its slot of the output bank. While ``write``, token
    ``t``'s accumulator adds ``g`` (restarting at a tile's first group) and at the tile's last beat the
    sum also goes into the bank (``value`` = the bank's token ``read_t``). ``rq_load`` takes the row's
    requantization (``mult_in``, ``shift_in``) for the tile entering the bank."""

    def __init__(self, p: EngineParams):
        self.params = p
        TT, ACC = p.mm_tokens, p.acc_bits
        super().__init__({
            "write": In(1), "first_group": In(1), "last_beat": In(1), "t": In(range(TT)),
            "g": In(signed(ACC)), "read_t": In(range(TT + 1)), "value": Out(signed(ACC)),
            "rq_load": In(1), "mult_in": In(MULT_BITS), "shift_in": In(SHIFT_BITS),
            "mult": Out(MULT_BITS), "shift": Out(SHIFT_BITS),
        })

    def elaborate(self, platform):
        TT, ACC = self.params.mm_tokens, self.params.acc_bits
        m = Module()
        acc = Array(Signal(signed(ACC), name=f"acc_t{tk}") for tk in range(TT))
        ob = Array(Signal(signed(ACC), name=f"ob_t{tk}") for tk in range(TT))
        m.d.comb += self.value.eq(ob[self.read_t])
        with m.If(self.write):
            new = Signal(signed(ACC), name="newacc")
            m.d.comb += new.eq(Mux(self.first_group, 0, acc[self.t]) + self.g)
            m.d.sync += acc[self.t].eq(new)
            with m.If(self.last_beat):
                m.d.sync += ob[self.t].eq(new)
        with m.If(self.rq_load):
            m.d.sync += [self.mult.eq(self.mult_in), self.shift.eq(self.shift_in)]
        return m


class OutputBank(wiring.Component):
    """The output bank's control: ``valid`` while the bank holds a tile, ``e`` the token going out
    (one beat per token, advanced on ``ready``). A finished tile may overwrite token ``t`` of the bank
    once the bank's old token ``t`` has gone out or goes out this cycle (``may_write``); its last token
    re-arms the bank (``arm``: ``tokens_in`` beats, ``requant_in``) when the old contents have all gone
    out (``may_final``). So a tile of one beat per token does not wait for the drain."""

    def __init__(self, p: EngineParams):
        self.params = p
        TT = p.mm_tokens
        super().__init__({
            "ready": In(1), "valid": Out(1), "e": Out(range(TT + 1)), "requant": Out(1),
            "t": In(range(TT)), "may_write": Out(1), "may_final": Out(1),
            "arm": In(1), "tokens_in": In(range(TT + 1)), "requant_in": In(1),
        })

    def elaborate(self, platform):
        TT = self.params.mm_tokens
        m = Module()
        ob_busy, ob_e, ob_rq = self.valid, self.e, self.requant
        ob_tokens = Signal(range(TT + 1))
        t3 = self.t
        out_fire = Signal()
        fire_last = Signal()
        m.d.comb += [out_fire.eq(self.valid & self.ready), fire_last.eq(out_fire & (ob_e == ob_tokens - 1))]
        with m.If(out_fire):
            m.d.sync += ob_e.eq(ob_e + 1)
            with m.If(ob_e == ob_tokens - 1):
                m.d.sync += [ob_busy.eq(0), ob_e.eq(0)]
        may_write = ~ob_busy | (t3 >= ob_tokens) | (t3 < ob_e) | ((t3 == ob_e) & out_fire)
        may_final = ~ob_busy | fire_last
        m.d.comb += [self.may_write.eq(may_write), self.may_final.eq(may_final)]
        with m.If(self.arm):
            m.d.sync += [ob_busy.eq(1), ob_e.eq(0), ob_tokens.eq(self.tokens_in), ob_rq.eq(self.requant_in)]
        return m


class Requantizer(wiring.Component):
    """One output's requantizer, combinational: ``out = saturate(shift_round(acc * mult, shift))`` to
    int8 (sign-extended to acc_bits) when ``requant`` is set, else ``acc`` unchanged
    (``quant.reference.requantize``; proved exact for every input in ``tests/hw/test_formal.py``)."""

    def __init__(self, acc_bits: int):
        self.acc_bits = acc_bits
        super().__init__({
            "acc": In(signed(acc_bits)), "mult": In(MULT_BITS), "shift": In(SHIFT_BITS), "requant": In(1),
            "out": Out(signed(acc_bits)),
        })

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
