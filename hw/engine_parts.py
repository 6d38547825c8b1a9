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
* ``Requantizer`` (pe_rows)  ``saturate(shift_round(acc * mult, shift))`` on the way out; not built
  in the lean engine (``EngineParams.requantizer`` false), whose commands must not requantize.

Widths come from ``quant.formats``; nothing here is a test harness.
"""

from __future__ import annotations

from dataclasses import dataclass
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


def check_requant(p: EngineParams, requant: bool, where: str) -> None:
    """Refuse a requantizing command for the lean engine (``requantizer: false``), which has no
    requantizers and would hand back the accumulators unchanged; ``where`` names the command."""
    if p.requantizer or not requant:
        return
    raise EngineConfigError("requantizer", f"false, but {where} requantizes: the lean engine has no per-row "
                            f"requantizers (the accelerator's controller never asks for them, RESCALE "
                            f"requantizes). Set engine.requantizer: true, or send requant = 0")


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


@dataclass(frozen=True)
class Stages:
    """The engine's pipeline registers, counted in cycles of an op that is not held: the one place the
    RTL (``hw.engine.Engine`` builds exactly these registers) and the cycle models
    (``hw.engine_model``, ``hw.controller_model``) read its latency from.

    * ``seq``: from the op's generation by the sequencer's counters to its issue: the op queue
      (``Sequencer``), a register between the counters and the stall, so the first op of a command
      issues ``seq`` cycles after the load's last word;
    * ``buffer``: from the op's issue (S0) to its activation words at the array: the block RAM's
      read and its output register (the DOA_REG/DOB_REG place, so the RAM's slow clock-to-out sees
      no logic);
    * ``array``: from those words to the row sums ``p``, ``a`` (S2): ``lut`` style the candidates
      and their ``3a`` (``Candidates``, a register), the products and the first ``TREE_SPLIT`` levels
      of the adder trees, a register, the rest of the trees, a register; ``dsp`` style
      ``hw.engine_dsp.DspRows`` (``DSP_ARRAY_STAGES``: the DSPs' A/B, M, the trees' split, the sums);
    * ``codes``: of those, the cycles before the array takes the weight beat's codes (``lut``: 1,
      after the candidates' register; ``dsp``: 0);
    * ``group``: from S2 to the group value ``g`` (S3): the group partial sums, the DSP's A/B input
      registers, its M register, the sum ``s * Pg + m * Ag`` registered (``GroupRow``);
    * ``acc``: issue to S3, where the accumulators add ``g`` (and at a tile's last beat the sum goes
      into the requantizers);
    * ``requant``: the requantizers' registers (``Requantizer(pipelined=True)``: the inputs, the two
      partial products, their sum, the rounding add, the shift; the saturation goes into the bank);
      0 in the lean engine (``requantizer: false``), where the accumulators' sum goes into the bank;
    * ``drain``: issue to the bank stage, where a finished tile's values enter the output bank (and
      the bank's rules may stall the pipeline);
    * ``out``: from the bank to ``out``: the output register (``OutputSkid``), so a beat leaves the
      cycle after it left the bank."""

    seq: int
    buffer: int
    array: int
    codes: int
    group: int
    requant: int
    out: int

    @property
    def acc(self) -> int:
        return self.buffer + self.array + self.group

    @property
    def drain(self) -> int:
        return self.acc + self.requant


#: the pipelined requantizer's register stages (``Requantizer``)
REQUANT_STAGES = 5
#: the low part of the requantizer's split product: ``acc[:17]`` (unsigned) and ``acc[17:]`` (signed)
#: each times ``mult`` fit one DSP48E2 (27 x 18) for acc_bits <= 44
REQUANT_LO_BITS = 17

#: the dsp array's register stages (``hw.engine_dsp.DspRows``), from the op's buffer words and weight
#: codes to the row sums (S2): the DSP48E2s' A/B inputs, their products (M), the adder trees split
#: after ``TREE_SPLIT`` levels, the row sums
DSP_ARRAY_STAGES = 4

#: levels of ArrayRow's adder trees before its middle register (pe_lanes products -> pe_lanes / 2**k sums)
TREE_SPLIT = 2


def stages(p: EngineParams) -> Stages:
    """The pipeline of ``p`` (``Stages``)."""
    dsp = p.multiplier_style == "dsp"
    return Stages(seq=1, buffer=2, array=DSP_ARRAY_STAGES if dsp else 3, codes=0 if dsp else 1, group=3,
                  requant=REQUANT_STAGES if p.requantizer else 0, out=1)


def tree_levels(m: Module, values: list, levels: int, name: str) -> list:
    """``levels`` levels of a balanced adder tree of two-input adders, every node a named wire Yosys
    keeps (``keep``): adders on carry chains, not one multi-operand ``$macc`` (mapped to LUT full
    adders of many levels). Returns the sums left (one once the tree is complete)."""
    vals = list(values)
    for level in range(levels):
        if len(vals) <= 1:
            break
        nxt = []
        for i in range(0, len(vals) - 1, 2):
            w = max(len(v) + (0 if v.shape().signed else 1) for v in (vals[i], vals[i + 1])) + 1
            s = Signal(signed(w), name=f"{name}_t{level}_{i // 2}", attrs={"keep": 1})
            m.d.comb += s.eq(vals[i] + vals[i + 1])
            nxt.append(s)
        if len(vals) % 2:
            nxt.append(vals[-1])
        vals = nxt
    return vals


def register_all(m: Module, values: list, en, name: str) -> list:
    """Each of ``values`` registered while ``en`` (same shapes; reset-less, as data registers are: a
    reset would sit beside the enable on every bit, and what they hold is only read with a valid op)."""
    regs = []
    for i, v in enumerate(values):
        r = Signal(v.shape(), name=f"{name}_{i}", reset_less=True)
        with m.If(en):
            m.d.sync += r.eq(v)
        regs.append(r)
    return regs


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
            "is_sparse": Out(1), "is_pv": Out(1),   # the command's mode, registered with it
        })

    def elaborate(self, platform):
        p = self.params
        TT = p.mm_tokens
        kb_max = max_reduction(p) // p.pe_lanes
        wb = word_bits(p)
        m = Module()
        cmd = self.command
        wpt = self.words_per_token  # activation words per token
        # what the issue logic compares against, registered with the command (``c`` = the beat taken):
        # the counts minus one and the mode's flags, so a counter's end is an equality of registers
        c = self.cmd.payload
        c_sparse = c.mode == Mode.SPARSE
        tokens_m1 = Signal.like(cmd.tokens, name="tokens_m1")
        gb_m1 = Signal.like(cmd.group_beats, name="gb_m1")
        kb_m1 = Signal.like(cmd.k_beats, name="kb_m1")
        tiles_m1 = Signal(TILE_BITS, name="tiles_m1")
        wpt_m1 = Signal.like(wpt, name="wpt_m1")
        sparse = Signal(name="is_sparse")
        two_ops = Signal(name="two_ops")  # beat_ops == 2 in dsp style: 2:4, QK/PV, wide DENSE
        scaled = Signal(name="has_scale")
        # counts - 2 (wrapping for a count of 1, whose end comes from the ``_1`` flag instead)
        tokens_m2, gb_m2, kb_m2, tiles_m2 = (Signal(len(x) + 1, name=x.name.replace("m1", "m2"))
                                             for x in (tokens_m1, gb_m1, kb_m1, tiles_m1))
        tokens_1, gb_1, kb_1, tiles_1 = (Signal(name=n) for n in ("tokens_1", "gb_1", "kb_1", "tiles_1"))
        accept_regs = [tokens_m2.eq(c.tokens - 2), gb_m2.eq(c.group_beats - 2), kb_m2.eq(c.k_beats - 2),
                       tiles_m2.eq(c.tiles - 2), tokens_1.eq(c.tokens == 1), gb_1.eq(c.group_beats == 1),
                       kb_1.eq(c.k_beats == 1), tiles_1.eq(c.tiles == 1)]
        accept_regs += [wpt.eq(Mux(c_sparse, c.k_beats << 1, c.k_beats)), tokens_m1.eq(c.tokens - 1),
                       gb_m1.eq(c.group_beats - 1), kb_m1.eq(c.k_beats - 1), tiles_m1.eq(c.tiles - 1),
                       wpt_m1.eq(Mux(c_sparse, c.k_beats << 1, c.k_beats) - 1), sparse.eq(c_sparse),
                       scaled.eq(c.mode != Mode.PV), two_ops.eq((c.mode != Mode.DENSE) | c.wide),
                       self.is_sparse.eq(c_sparse), self.is_pv.eq(c.mode == Mode.PV)]

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
        m.d.comb += split.eq(two_ops if p.multiplier_style == "dsp" else 0)
        half_last = ~split | half
        # a counter's end (t == tokens - 1, ...) as a register set with the counter: the issue logic
        # sees flip-flops, not comparators (``set``: the counter's new value and its flag)
        last_tok, last_gb, last_beat, first_gb = Signal(), Signal(), Signal(), Signal()
        is_last_tile = Signal()

        # restart (0): its end if the count is 1; step (+1): its end if the old value is count - 2
        def set_t(step):
            return [t.eq(t + 1), last_tok.eq(t == tokens_m2)] if step else [t.eq(0), last_tok.eq(tokens_1)]

        def set_gb(step):
            return ([gb.eq(gb + 1), last_gb.eq(gb == gb_m2), first_gb.eq(0)] if step
                    else [gb.eq(0), last_gb.eq(gb_1), first_gb.eq(1)])

        def set_b(step):
            return [b.eq(b + 1), last_beat.eq(b == kb_m2)] if step else [b.eq(0), last_beat.eq(kb_1)]

        def set_tile(step):
            return ([tile.eq(tile + 1), is_last_tile.eq(tile == tiles_m2)] if step
                    else [tile.eq(0), is_last_tile.eq(tiles_1)])

        need_scale = scaled & last_gb
        # the op queue (``stages(p).seq`` = 1): the counters generate an op (``gen``) into a queue of two
        # entries while it has ``room`` (a register), and the issue takes the queue's head when its
        # weight (and scale) beat is there and the pipeline is not stalled. So the stall reaches only
        # the queue's own few registers, never the counters (issue 10's 225 MHz budget), and the beats
        # are taken at the issue, by the head's ``w_take``/``sc_take``.
        op = data.StructLayout({"tags": tag_layout(p), "word": wb + 1, "need_scale": 1, "w_take": 1, "sc_take": 1})
        gen = Signal()
        gen_op = Signal(op)
        head, second = Signal(op, name="q_head"), Signal(op, name="q_second")
        q_count = Signal(range(3))
        q_room = Signal(init=1)    # q_count < 2, a register kept with it
        q_valid = Signal()         # q_count != 0, a register kept with it
        q_empty = Signal()
        m.d.comb += [
            self.load_word.eq(lw),
            gen_op.word.eq(tok_base + b_word + (half & sparse)),
            gen_op.tags.t.eq(t), gen_op.tags.first_gb.eq(first_gb & ~half),
            gen_op.tags.last_gb.eq(last_gb & half_last),
            gen_op.tags.first_group.eq(g_first), gen_op.tags.last_beat.eq(last_beat & half_last),
            gen_op.tags.last_tok.eq(last_tok), gen_op.tags.half.eq(half),
            gen_op.need_scale.eq(need_scale), gen_op.w_take.eq(last_tok & half_last),
            gen_op.sc_take.eq(need_scale & last_tok & half_last),
            self.issue.eq(q_valid & self.w_valid & (~head.need_scale | self.sc_valid) & ~self.stall),
            self.word.eq(head.word), self.tags.eq(head.tags),
            self.w_ready.eq(self.issue & head.w_take),
            self.sc_ready.eq(self.issue & head.sc_take),
            q_empty.eq(~q_valid),
        ]
        pop = self.issue
        with m.If(gen & pop):
            m.d.sync += head.eq(gen_op)  # q_count is 1 here (a pop needs an entry, a push room)
        with m.Elif(gen):
            m.d.sync += [q_count.eq(q_count + 1), q_room.eq(q_count == 0), q_valid.eq(1)]
            with m.If(q_count == 0):
                m.d.sync += head.eq(gen_op)
            with m.Else():
                m.d.sync += second.eq(gen_op)
        with m.Elif(pop):
            m.d.sync += [q_count.eq(q_count - 1), head.eq(second), q_room.eq(1), q_valid.eq(q_count == 2)]
        # the pipeline is empty for a new command once the queue is too
        empty = Signal()
        m.d.comb += empty.eq(self.pipe_empty & q_empty)

        with m.FSM(name="state") as fsm:
            with m.State("IDLE"):
                m.d.comb += self.cmd.ready.eq(empty)
                with m.If(self.cmd.valid & empty):
                    m.d.sync += [cmd.eq(self.cmd.payload), lw.eq(0), lword.eq(0), ltok.eq(0), *accept_regs]
                    m.next = "LOAD"
            with m.State("LOAD"):
                m.d.comb += [self.act_ready.eq(1), self.load_en.eq(self.act_valid)]
                with m.If(self.act_valid):
                    m.d.sync += [lw.eq(lw + 1), lword.eq(lword + 1)]
                    with m.If(lword == wpt_m1):
                        m.d.sync += [lword.eq(0), ltok.eq(ltok + 1)]
                        with m.If(ltok == tokens_m1):
                            m.d.sync += [*set_t(0), *set_b(0), *set_gb(0), g_first.eq(1), *set_tile(0),
                                         tok_base.eq(0), b_word.eq(0), half.eq(0)]
                            m.next = "COMPUTE"
            with m.State("COMPUTE"):
                m.d.comb += gen.eq(q_room)
                with m.If(gen):
                    with m.If(last_tok & ~half_last):  # the beat's second half
                        m.d.sync += [*set_t(0), tok_base.eq(0), half.eq(1)]
                    with m.Elif(last_tok):
                        m.d.sync += [*set_t(0), tok_base.eq(0), *set_b(1), *set_gb(1), half.eq(0),
                                     b_word.eq(b_word + Mux(sparse, 2, 1))]
                        with m.If(last_gb):
                            m.d.sync += [*set_gb(0), g_first.eq(0)]
                        with m.If(last_beat):
                            m.d.sync += [*set_b(0), b_word.eq(0), *set_gb(0), g_first.eq(1), *set_tile(1)]
                            with m.If(is_last_tile):
                                m.next = "IDLE"
                    with m.Else():
                        m.d.sync += [*set_t(1), tok_base.eq(tok_base + wpt)]
        m.d.comb += self.busy.eq(~fsm.ongoing("IDLE") | ~empty)
        return m


class ActBuffer(wiring.Component):
    """The activation buffer: two banks of ``pe_lanes`` bytes (``Memory``), word ``w`` in bank
    ``w % 2`` at ``w // 2``. One write port (``w_en``, ``w_word``, ``w_data``); both banks read at
    ``r_word // 2`` each cycle ``r_en`` is set and the words go through an output register (also held
    while ``r_en`` is low) to ``r_data0``, ``r_data1``: ``stages(p).buffer`` = 2 cycles from the
    address to the data, and nothing but wires between the RAM and its output register (the place
    of the RAM's own DOA_REG/DOB_REG). The pair of words a 2:4 beat needs comes out together."""

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
                         rp.addr.eq(self.r_word >> 1), rp.en.eq(self.r_en)]
            with m.If(self.r_en):
                m.d.sync += out.eq(rp.data)
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
    the pair's own two activations at candidates 0 and 3), registered (``a``, ``a3``, loading while
    ``en``), and the P·V zero row: ``zsum`` = sum over lanes of the lane's registered activation
    times its key's zero-point (``zero``, taken with the registered candidates), its tree split by a
    register where ``ArrayRow``'s are, so ``zsum`` arrives with the rows' own partial sums."""

    def __init__(self, p: EngineParams):
        self.params = p
        L = p.pe_lanes
        super().__init__({
            **candidate_inputs(p), "is_sparse": In(1), "en": In(1),
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
        with m.If(self.en):
            for pair in range(L // 2):
                for i in range(4):
                    m.d.sync += [self.a[4 * pair + i].eq(cand[pair][i][0]), self.a3[4 * pair + i].eq(cand[pair][i][2])]
        zero = self.zero.as_value()
        zprods = []
        for lane in range(L):
            k = 4 * (lane // 2) + (0 if lane % 2 == 0 else 3)  # the lane's own activation, registered
            own = multiples_of(m, self.a[k], self.a3[k], f"zown{lane}")
            zprods.append(split_product(m, own, own, zero[CODE_BITS * lane:CODE_BITS * (lane + 1)],
                                        Const(1), f"zp{lane}"))
        half = register_all(m, tree_levels(m, zprods, TREE_SPLIT, "zs"), self.en, "zs_r")
        m.d.comb += self.zsum.eq(tree_levels(m, half, 64, "zs2")[0])
        return m


class ArrayRow(wiring.Component):
    """One row of the array: ``pe_lanes`` products of the row's codes with the activations its 2:4
    patterns choose among the shared candidates (``pe_pair``), summed by two adder trees: ``p`` = sum
    of the products, ``a`` = sum of the chosen activations (or, in P·V mode, the zero row's ``zsum``).
    The trees are split by a register after ``TREE_SPLIT`` levels; both registers load while ``en``:
    2 cycles from the (registered) candidates to ``p``, ``a`` (S2; with ``Candidates``' register
    ``stages(p).array`` = 3). ``zsum`` is taken in
    the second cycle (``Candidates`` registers it at the same split)."""

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
        pv = Signal()
        with m.If(self.en):
            m.d.sync += pv.eq(self.is_pv)
        prods = register_all(m, tree_levels(m, prods, TREE_SPLIT, "p"), self.en, "p_r")
        acts = register_all(m, tree_levels(m, acts, TREE_SPLIT, "a"), self.en, "a_r")
        p_sum, a_sum = register_all(m, [tree_levels(m, prods, 64, "p2")[0],
                                        Mux(pv, self.zsum, tree_levels(m, acts, 64, "a2")[0])], self.en, "sums")
        m.d.comb += [self.p.eq(p_sum), self.a.eq(a_sum)]
        return m


class GroupRow(wiring.Component):
    """One row's group stage: the op's scale (``s_in``, ``m_in``; s = 1, m = -1 in P·V mode) is
    registered with the row's sums while ``load`` (S1 -> S2); for a valid op not held (``valid``,
    ``hold``) the group partial sums of its token add the row's ``p`` and ``a`` (restarting at a
    group's first beat), and ``g = s * sum(q*a) + m * sum(a)`` follows ``stages(p).group`` = 3
    cycles after S2 through registers that load while ``load``: the sums with their s, m (the
    multipliers' A/B registers), the two products (M), their sum ``g`` (S3)."""

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
            m.d.sync += [pg[self.t].eq(ptot), ag[self.t].eq(atot)]
        pt_r, at_r = Signal(signed(WP)), Signal(signed(WP))
        s_r, mn_r = Signal(unsigned(W_SCALE.bits)), Signal(signed(W_MIN.bits))
        prod_p = Signal(signed(WP + W_SCALE.bits + 1))
        prod_a = Signal(signed(WP + W_MIN.bits))
        with m.If(self.load):
            m.d.sync += [pt_r.eq(ptot), at_r.eq(atot), s_r.eq(s), mn_r.eq(mn),   # A, B
                         prod_p.eq(s_r * pt_r), prod_a.eq(mn_r * at_r),           # M
                         self.g.eq(prod_p + prod_a)]                              # the sum: S3
        return m


class AccRow(wiring.Component):
    """One row's accumulators (one per token) and its slot of the output bank. While ``write``, token
    ``t``'s accumulator adds ``g`` (restarting at a tile's first group); ``final`` is the sum (the
    tile's value at its last beat, which goes into the row's requantizer). ``rq_load`` takes the row's
    requantization (``mult_in``, ``shift_in``) for the tile whose first token is at its last beat;
    ``mult``/``shift`` are those values (this cycle's while ``rq_load``). The bank: while
    ``bank_write`` token ``bank_t``'s slot takes ``bank_in`` (the requantizer's output, or ``final``
    in the lean engine); ``value`` is the bank's token ``read_t``. The lean engine's rows
    (``requantizer: false``) have no requantization registers and no ``rq_load``/``mult``/``shift``
    ports."""

    def __init__(self, p: EngineParams):
        self.params = p
        TT, ACC = p.mm_tokens, p.acc_bits
        rq = {"rq_load": In(1), "mult_in": In(MULT_BITS), "shift_in": In(SHIFT_BITS),
              "mult": Out(MULT_BITS), "shift": Out(SHIFT_BITS)} if p.requantizer else {}
        super().__init__({
            "write": In(1), "first_group": In(1), "t": In(range(TT)),
            "g": In(signed(ACC)), "final": Out(signed(ACC)),
            **rq,
            "bank_write": In(1), "bank_t": In(range(TT)), "bank_in": In(signed(ACC)),
            "read_t": In(range(TT + 1)), "value": Out(signed(ACC)),
        })

    def elaborate(self, platform):
        TT, ACC = self.params.mm_tokens, self.params.acc_bits
        m = Module()
        acc = Array(Signal(signed(ACC), name=f"acc_t{tk}") for tk in range(TT))
        ob = Array(Signal(signed(ACC), name=f"ob_t{tk}") for tk in range(TT))
        m.d.comb += [self.value.eq(ob[self.read_t]),
                     self.final.eq(Mux(self.first_group, 0, acc[self.t]) + self.g)]
        with m.If(self.write):
            m.d.sync += acc[self.t].eq(self.final)
        with m.If(self.bank_write):
            m.d.sync += ob[self.bank_t].eq(self.bank_in)
        if not self.params.requantizer:
            return m
        mult_r, shift_r = Signal(MULT_BITS), Signal(SHIFT_BITS)
        with m.If(self.rq_load):
            m.d.sync += [mult_r.eq(self.mult_in), shift_r.eq(self.shift_in)]
        m.d.comb += [self.mult.eq(Mux(self.rq_load, self.mult_in, mult_r)),
                     self.shift.eq(Mux(self.rq_load, self.shift_in, shift_r))]
        return m


class OutputBank(wiring.Component):
    """The output bank's control: ``valid`` while the bank holds a tile, ``e`` the token going out
    (one beat per token, advanced on ``ready``: the output register's room, ``OutputSkid``, a
    register, so ``out.ready`` reaches none of this). A finished tile may overwrite token ``t`` of the bank
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
        ob_tm1 = Signal(range(TT + 1))  # ob_tokens - 1, registered with it
        # pending[t]: the bank's token t has not gone out yet (= busy & e <= t < tokens), one flip-flop
        # per token so that the rules below are a select, not comparisons
        pending = Signal(TT)
        e_last = Signal()  # ob_e == ob_tm1, a register kept with both
        m.d.comb += [out_fire.eq(self.valid & self.ready), fire_last.eq(out_fire & e_last)]
        e_oh = Signal(TT, init=1)  # one-hot of ob_e (within 0..TT-1), kept with it
        # pending after this cycle's beat left: the slot of token t3 is free if it is not pending then
        left = Signal(TT)
        m.d.comb += left.eq(pending & ~Mux(out_fire, e_oh, 0))
        with m.If(out_fire):
            m.d.sync += [ob_e.eq(ob_e + 1), pending.eq(left), e_last.eq(ob_e + 1 == ob_tm1), e_oh.eq(e_oh << 1)]
            with m.If(e_last):
                m.d.sync += [ob_busy.eq(0), ob_e.eq(0), e_oh.eq(1)]
        may_write = ~left.bit_select(t3, 1)
        may_final = ~ob_busy | fire_last
        m.d.comb += [self.may_write.eq(may_write), self.may_final.eq(may_final)]
        with m.If(self.arm):
            m.d.sync += [ob_busy.eq(1), ob_e.eq(0), ob_tokens.eq(self.tokens_in), ob_tm1.eq(self.tokens_in - 1),
                         ob_rq.eq(self.requant_in), pending.eq((Const(1, TT + 1) << self.tokens_in) - 1),
                         e_last.eq(self.tokens_in == 1), e_oh.eq(1)]
        return m


class Requantizer(wiring.Component):
    """One output's requantizer: ``out = saturate(shift_round(acc * mult, shift))`` to int8
    (sign-extended to acc_bits) when ``requant`` is set, else ``acc`` unchanged
    (``quant.reference.requantize``). ``pipelined=False``: combinational (proved exact for every
    input in ``tests/hw/test_formal.py``); ``pipelined=True``: the same expressions with a register
    (loading while ``en``) after each of ``REQUANT_STAGES`` steps: the inputs (the DSPs' A/B), the
    two partial products ``acc[:17] * mult`` and ``acc[17:] * mult`` (M), their sum, the rounding
    add, the shift; the saturation is left for the register ``out`` goes into."""

    def __init__(self, acc_bits: int, pipelined: bool = False):
        self.acc_bits = acc_bits
        self.pipelined = pipelined
        super().__init__({
            "acc": In(signed(acc_bits)), "mult": In(MULT_BITS), "shift": In(SHIFT_BITS), "requant": In(1),
            "en": In(1), "out": Out(signed(acc_bits)),
        })

    def elaborate(self, platform):
        m = Module()
        ACC = self.acc_bits
        stages = 0

        def stage(values: dict) -> dict:
            """One step's values through a register (pipelined) or wires."""
            nonlocal stages
            stages += 1
            out = {}
            for name, v in values.items():
                sig = Signal(v.shape(), name=f"{name}_s{stages}")
                if self.pipelined:
                    with m.If(self.en):
                        m.d.sync += sig.eq(v)
                else:
                    m.d.comb += sig.eq(v)
                out[name] = sig
            return out

        # |acc * mult| < 2**(ACC+16) and half <= 2**62: the sum fits max(ACC + 18, 64) bits (64 for
        # acc_bits <= 46, a machine word in Verilator).
        sum_bits = max(ACC + MULT_BITS + 2, 64)
        LO = min(REQUANT_LO_BITS, ACC - 1)
        x = stage({"acc": self.acc, "mult": self.mult, "shift": self.shift, "rq": self.requant})
        lo, hi = x["acc"][:LO], x["acc"][LO:].as_signed()
        y = stage({"plo": lo * x["mult"], "phi": hi * x["mult"], "acc": x["acc"], "shift": x["shift"], "rq": x["rq"]})
        prod = Signal(signed(sum_bits))
        m.d.comb += prod.eq(y["plo"] + (y["phi"] << LO))
        z = stage({"prod": prod, "acc": y["acc"], "shift": y["shift"], "rq": y["rq"]})
        half = Signal(64)
        m.d.comb += half.eq(Mux(z["shift"] == 0, 0, (Const(1, 1) << z["shift"]) >> 1))
        summed = Signal(signed(sum_bits))
        m.d.comb += summed.eq(z["prod"] + half)
        u = stage({"summed": summed, "acc": z["acc"], "shift": z["shift"], "rq": z["rq"]})
        scaled = Signal(signed(sum_bits))
        m.d.comb += scaled.eq(u["summed"] >> u["shift"])
        v = stage({"scaled": scaled, "acc": u["acc"], "rq": u["rq"]})
        assert stages == REQUANT_STAGES
        sc = v["scaled"]
        sat = Mux(sc > ACT.max, ACT.max, Mux(sc < ACT.min, ACT.min, sc))
        m.d.comb += self.out.eq(Mux(v["rq"], sat, v["acc"]))
        return m


class OutputSkid(wiring.Component):
    """The output register: two entries between the output bank and ``out``. ``out.payload`` and
    ``out.valid`` come straight from flip-flops; ``room`` (a register: fewer than two entries held at
    the start of the cycle) is all the bank sees, so ``out.ready`` only moves this component's own
    registers (local flow control: it reaches no pipeline enable). ``push`` with ``data`` enters a
    beat (only while ``room``); with ``out.ready`` always high each beat leaves the cycle after its
    push (``Stages.out`` = 1)."""

    def __init__(self, width: int, layout):
        self.width = width
        super().__init__({
            "push": In(1), "data": In(width), "room": Out(1),
            "out": Out(stream.Signature(layout)),
        })

    def elaborate(self, platform):
        m = Module()
        head = Signal(self.width)
        second = Signal(self.width)
        count = Signal(range(3))
        room = Signal(init=1)  # count < 2, a register kept with count
        pop = Signal()
        m.d.comb += [pop.eq(self.out.valid & self.out.ready), self.room.eq(room),
                     self.out.valid.eq(count != 0), self.out.payload.as_value().eq(head)]
        with m.If(self.push & pop):
            # count is 1 here (a push needs room, a pop a beat; with two held the push waits)
            m.d.sync += head.eq(self.data)
        with m.Elif(self.push):
            m.d.sync += [count.eq(count + 1), room.eq(count == 0)]
            with m.If(count == 0):
                m.d.sync += head.eq(self.data)
            with m.Else():
                m.d.sync += second.eq(self.data)
        with m.Elif(pop):
            m.d.sync += [count.eq(count - 1), head.eq(second), room.eq(1)]
        return m
