"""The reconfigurable compute engine: a pe_rows x pe_lanes array of 8-bit x 4-bit multipliers that runs
every integer product of the W2A8KV4 model (``quant.reference``) with valid/ready streams on every
interface. ``docs/engine.md`` describes the architecture, the stream protocols and the cycle behaviour.
``Engine`` wires the sub-components of ``hw/engine_parts.py`` (the sequencer, the activation buffer, the
array rows, the group stages, the accumulators, the output bank, the requantizers); ``hw/engine_model.py``
is its cycle model.

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

from amaranth.hdl import Cat, Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from quant.formats import W_MIN, W_SCALE

from .array_slice import ArraySlice
from .engine_parts import (CODE_BITS, META_BITS, MULT_BITS, SHIFT_BITS, TILE_BITS, AccRow, ActBuffer,
                           ArrayRow, Candidates, EngineConfigError, GroupRow, Mode, OutputBank, OutputSkid, Requantizer,
                           Sequencer, beat_ops, check_params, layouts, max_reduction, pair_candidates,
                           partial_bits, pe_pair, stages, tag_layout)
from .engine_dsp import DspCandidates, DspRows, dsp_row_groups
from .params import EngineParams

__all__ = ["Mode", "Engine", "Requantizer", "EngineConfigError", "check_params", "layouts", "CODE_BITS",
           "ArraySlice", "Sequencer", "ActBuffer", "Candidates", "ArrayRow", "GroupRow", "AccRow", "OutputBank",
           "META_BITS", "SHIFT_BITS", "MULT_BITS", "TILE_BITS", "max_reduction", "partial_bits",
           "pair_candidates", "pe_pair", "DspCandidates", "DspRows", "beat_ops"]


class Engine(wiring.Component):
    """The compute engine. Streams: ``cmd``, ``act``, ``weight``, ``scale``, ``rq`` in; ``out`` out.

    A pipeline of sub-components (``hw.engine_parts``; docs/engine.md, "Structure"): the ``Sequencer``
    issues one op per cycle (S0) reading the ``ActBuffer``; S1 holds the op's weight and scale beats
    while ``Candidates`` and the ``ArrayRow`` s multiply and reduce; ``GroupRow`` s scale each group
    (S2); ``AccRow`` s accumulate and hand a finished tile to the output bank (S3, ``OutputBank``), whose
    ``Requantizer`` s feed ``out``. One stall, from the output bank, holds S0-S3."""

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
        #: the requantizers, one per row, pipelined (``stages(p).requant``) between the accumulators
        #: and the output bank; none in the lean engine (``requantizer: false``: the accumulators' sums
        #: go into the bank, ``rq`` is never ready, and a command must not requantize)
        self.requantizers = [Requantizer(params.acc_bits, pipelined=True)
                             for _ in range(params.pe_rows if params.requantizer else 0)]

    def elaborate(self, platform):
        p = self.p
        R, L = p.pe_rows, p.pe_lanes
        ACC = p.acc_bits
        m = Module()
        stall = self.stall
        wl, sl, rl = self.layouts["weight"], self.layouts["scale"], self.layouts["rq"]

        # ---------------- S0: command FSM, activation load, issue ----------------
        seq = m.submodules.seq = Sequencer(p)
        buf = m.submodules.act_buffer = ActBuffer(p)
        wiring.connect(m, wiring.flipped(self.cmd), seq.cmd)
        cmd = seq.command
        st = stages(p)
        D = st.drain
        tags = tag_layout(p)
        # the pipeline's stage registers, index k = cycles after the op's issue (k = 0: the issue
        # itself), all held by the stall: valid[k], tag[k]; the weight beat up to the array
        # (k = st.buffer), the scale beat up to the group stage's input (k = st.buffer + st.array - 1)
        valid = [seq.issue] + [Signal(name=f"v{k}") for k in range(1, D + 1)]
        tag = [seq.tags] + [Signal(tags, name=f"tag{k}") for k in range(1, D + 1)]
        w_st = [self.weight.payload] + [Signal(wl, name=f"w{k}") for k in range(1, st.buffer + st.codes + 1)]
        sc_st = [self.scale.payload] + [Signal(sl, name=f"sc{k}") for k in range(1, st.buffer + st.array)]
        parity = [seq.word[0]] + [Signal(name=f"par{k}") for k in range(1, st.buffer + 1)]
        with m.If(~stall):
            for k in range(1, D + 1):
                m.d.sync += [valid[k].eq(valid[k - 1]), tag[k].eq(tag[k - 1])]
            for chain in (w_st, sc_st, parity):
                for k in range(1, len(chain)):
                    m.d.sync += chain[k].eq(chain[k - 1])
        m.d.comb += [
            seq.pipe_empty.eq(~Cat(*valid[1:]).any()), seq.stall.eq(stall),
            seq.act_valid.eq(self.act.valid), self.act.ready.eq(seq.act_ready),
            buf.w_en.eq(seq.load_en), buf.w_word.eq(seq.load_word), buf.w_data.eq(self.act.payload.as_value()),
            seq.w_valid.eq(self.weight.valid), self.weight.ready.eq(seq.w_ready),
            seq.sc_valid.eq(self.scale.valid), self.scale.ready.eq(seq.sc_ready),
            buf.r_word.eq(seq.word),
        ]
        m.d.comb += buf.r_en.eq(~stall)

        # ---------------- the array: candidates, products, adder trees (registered into S2) ----------------
        is_sparse, is_pv = seq.is_sparse, seq.is_pv  # registered with the command
        # Fields of the weight beat as slices of the registered signal itself: indexing the payload
        # view (a slice of the beat) per row re-emits the whole beat in Amaranth's netlist builder.
        B, S2 = st.buffer, st.buffer + st.array
        w_bits, sc_bits = w_st[B + st.codes].as_value(), sc_st[S2 - 1].as_value()
        codes_at, meta_at, zero_at = wl["codes"].offset, wl["meta"].offset, wl["zero"].offset

        def row_codes(r, n=1):
            return w_bits[codes_at + CODE_BITS * L * r:codes_at + CODE_BITS * L * (r + n)]

        def row_meta(r, n=1):
            return w_bits[meta_at + META_BITS * (L // 2) * r:][:META_BITS * (L // 2) * n]

        # the array: each row's registered sums (p, a) into S2
        row_sums = []
        if p.multiplier_style == "dsp":  # hw/engine_dsp.py: three rows per DSP48E2 column
            cand = m.submodules.candidates = DspCandidates(p)
            m.d.comb += [cand.d0.eq(buf.r_data0), cand.d1.eq(buf.r_data1), cand.parity.eq(parity[B]),
                         cand.is_pv.eq(is_pv), cand.en.eq(~stall),
                         cand.zero.as_value().eq(w_bits[zero_at:zero_at + CODE_BITS * L])]
            for gi, (r0, n) in enumerate(dsp_row_groups(p)):
                rows = m.submodules[f"dsprows{gi}"] = DspRows(p, n)
                m.d.comb += [rows.act.eq(cand.act), rows.pair_sums.eq(cand.pair_sums), rows.a_shared.eq(cand.a_shared),
                             rows.codes.as_value().eq(row_codes(r0, n)), rows.meta.as_value().eq(row_meta(r0, n)),
                             rows.is_sparse.eq(is_sparse), rows.half.eq(tag[B].half), rows.en.eq(~stall)]
                row_sums += [(rows.p[i], rows.a[i]) for i in range(n)]
        else:
            cand = m.submodules.candidates = Candidates(p)
            m.d.comb += [cand.d0.eq(buf.r_data0), cand.d1.eq(buf.r_data1), cand.parity.eq(parity[B]),
                         cand.is_sparse.eq(is_sparse), cand.en.eq(~stall),
                         cand.zero.as_value().eq(w_bits[zero_at:zero_at + CODE_BITS * L])]
            for r in range(R):
                row = m.submodules[f"row{r}"] = ArrayRow(p)
                m.d.comb += [row.cand_a.eq(cand.a), row.cand_a3.eq(cand.a3), row.zsum.eq(cand.zsum),
                             row.codes.as_value().eq(row_codes(r)), row.meta.as_value().eq(row_meta(r)),
                             row.is_sparse.eq(is_sparse), row.is_pv.eq(is_pv), row.en.eq(~stall)]
                row_sums.append((row.p, row.a))
        s2_valid, s2 = valid[S2], tag[S2]
        s3_valid = Signal()
        s3 = tag[st.acc]
        m.d.comb += s3_valid.eq(valid[st.acc] & s3.last_gb)
        # the bank stage: a tile's last-beat ops, requantized, enter the output bank
        # (sb_valid and rq_need are registers of the chain, computed one stage early, so that the
        # stall is a few LUTs of registers)
        sb_valid = Signal()
        sb = tag[D]
        with m.If(~stall):
            m.d.sync += sb_valid.eq(valid[D - 1] & tag[D - 1].last_gb & tag[D - 1].last_beat)

        # the rq stream through a pipeline register (``rq_full``, ``rq_buf``): its valid reaches no
        # enable. A requantized tile takes its beat when its first token's last beat is at S3.
        # The lean engine (``requantizer: false``) has neither: ``rq`` is never ready.
        rq_full = Signal()
        rq_take = Signal()
        rq_need = Signal()
        if p.requantizer:
            rq_buf = Signal(rl)
            pre = tag[st.acc - 1]
            with m.If(~stall):
                m.d.sync += rq_need.eq(valid[st.acc - 1] & pre.last_gb & pre.last_beat & (pre.t == 0) & cmd.requant)
            rq_fire = Signal()
            m.d.comb += [self.rq.ready.eq(~rq_full | rq_take), rq_fire.eq(self.rq.valid & (~rq_full | rq_take))]
            m.d.sync += rq_full.eq(rq_fire | (rq_full & ~rq_take))
            with m.If(rq_fire):
                m.d.sync += rq_buf.eq(self.rq.payload)
            rq_bits = rq_buf.as_value()

        bank = m.submodules.output_bank = OutputBank(p)
        skid = m.submodules.output_skid = OutputSkid(R * ACC, self.layouts["out"])
        wiring.connect(m, skid.out, wiring.flipped(self.out))
        accs = []
        for r in range(R):
            grp = m.submodules[f"group{r}"] = GroupRow(p)
            acc = m.submodules[f"acc{r}"] = AccRow(p)
            accs.append(acc)
            m.d.comb += [
                # S2 -> S3: the group stage
                grp.load.eq(~stall), grp.is_pv.eq(is_pv),
                grp.s_in.eq(sc_bits[sl["s"].offset + W_SCALE.bits * r:][:W_SCALE.bits]),
                grp.m_in.eq(sc_bits[sl["m"].offset + W_MIN.bits * r:][:W_MIN.bits].as_signed()),
                grp.p.eq(row_sums[r][0]), grp.a.eq(row_sums[r][1]),
                grp.valid.eq(s2_valid), grp.hold.eq(stall), grp.first_gb.eq(s2.first_gb), grp.t.eq(s2.t),
                # S3: accumulators; into the requantizers
                acc.write.eq(s3_valid & ~stall), acc.first_group.eq(s3.first_group),
                acc.t.eq(s3.t), acc.g.eq(grp.g),
                # the bank stage: the bank takes the requantized values (the lean engine: the sums,
                # the bank stage is S3); out: one beat per token
                acc.bank_write.eq(sb_valid & ~stall), acc.bank_t.eq(sb.t),
                acc.read_t.eq(bank.e),
                skid.data[ACC * r:ACC * (r + 1)].eq(acc.value),
            ]
            if p.requantizer:
                rq = m.submodules[f"rq{r}"] = self.requantizers[r]
                m.d.comb += [
                    acc.rq_load.eq(rq_take),
                    acc.mult_in.eq(rq_bits[rl["mult"].offset + MULT_BITS * r:][:MULT_BITS]),
                    acc.shift_in.eq(rq_bits[rl["shift"].offset + SHIFT_BITS * r:][:SHIFT_BITS]),
                    rq.acc.eq(acc.final), rq.mult.eq(acc.mult), rq.shift.eq(acc.shift),
                    rq.requant.eq(cmd.requant), rq.en.eq(~stall),
                    acc.bank_in.eq(rq.out),
                ]
            else:
                m.d.comb += acc.bank_in.eq(acc.final)

        # ---------------- the bank stage: hand-over to the output bank; the stall ----------------
        # busy: a command runs, or the bank still holds beats not yet in the output register
        m.d.comb += self.busy.eq(seq.busy | bank.valid)
        m.d.comb += [bank.ready.eq(skid.room), skid.push.eq(bank.valid & skid.room), bank.t.eq(sb.t),
                     bank.tokens_in.eq(cmd.tokens), bank.requant_in.eq(cmd.requant if p.requantizer else 0)]
        # the stall: the bank cannot take a finished tile's token, or a requantized tile's rq beat is
        # not there yet; both from registers only (bank state, ``rq_full``, the stage tags)
        m.d.comb += stall.eq((sb_valid & Mux(sb.last_tok, ~bank.may_final, ~bank.may_write))
                             | (rq_need & ~rq_full))
        m.d.comb += rq_take.eq(rq_need & ~stall)
        arm = Signal()
        m.d.comb += bank.arm.eq(arm)
        m.d.comb += arm.eq(sb_valid & ~stall & sb.last_tok)
        return m
