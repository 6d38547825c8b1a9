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

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from quant.formats import W_MIN, W_SCALE

from .array_slice import ArraySlice
from .engine_parts import (CODE_BITS, META_BITS, MULT_BITS, SHIFT_BITS, TILE_BITS, AccRow, ActBuffer,
                           ArrayRow, Candidates, EngineConfigError, GroupRow, Mode, OutputBank, Requantizer,
                           Sequencer, beat_ops, check_params, layouts, max_reduction, pair_candidates,
                           partial_bits, pe_pair, tag_layout)
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
        #: the output's requantizers, one per row (combinational; their inputs are registers of the
        #: output bank, so the formal output-stream check can assert on them: sim/formal.py)
        self.requantizers = [Requantizer(params.acc_bits) for _ in range(params.pe_rows)]

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
        s1_valid, s2_valid, s3_valid = Signal(), Signal(), Signal()
        m.d.comb += [
            seq.pipe_empty.eq(~(s1_valid | s2_valid | s3_valid)), seq.stall.eq(stall),
            self.busy.eq(seq.busy),
            seq.act_valid.eq(self.act.valid), self.act.ready.eq(seq.act_ready),
            buf.w_en.eq(seq.load_en), buf.w_word.eq(seq.load_word), buf.w_data.eq(self.act.payload.as_value()),
            seq.w_valid.eq(self.weight.valid), self.weight.ready.eq(seq.w_ready),
            seq.sc_valid.eq(self.scale.valid), self.scale.ready.eq(seq.sc_ready),
            buf.r_word.eq(seq.word),
        ]
        m.d.comb += buf.r_en.eq(~stall)

        # S1 registers: the op's tags, its buffer word's parity, its weight and scale beats
        tags = tag_layout(p)
        s1 = Signal(tags)
        s1_parity = Signal()
        s1_w = Signal(wl)
        s1_sc = Signal(sl)
        with m.If(~stall):
            m.d.sync += [
                s1_valid.eq(seq.issue),
                s1.eq(seq.tags), s1_parity.eq(seq.word[0]), s1_w.eq(self.weight.payload), s1_sc.eq(self.scale.payload),
            ]

        # ---------------- S1: candidates, products, adder trees (registered into S2) ----------------
        is_sparse = cmd.mode == Mode.SPARSE
        is_pv = cmd.mode == Mode.PV
        # Fields of the weight beat as slices of the registered signal itself: indexing the payload
        # view (a slice of the beat) per row re-emits the whole beat in Amaranth's netlist builder.
        w_bits, sc_bits = s1_w.as_value(), s1_sc.as_value()
        codes_at, meta_at, zero_at = wl["codes"].offset, wl["meta"].offset, wl["zero"].offset

        def row_codes(r, n=1):
            return w_bits[codes_at + CODE_BITS * L * r:codes_at + CODE_BITS * L * (r + n)]

        def row_meta(r, n=1):
            return w_bits[meta_at + META_BITS * (L // 2) * r:][:META_BITS * (L // 2) * n]

        # the array: each row's registered sums (p, a) into S2
        row_sums = []
        if p.multiplier_style == "dsp":  # hw/engine_dsp.py: three rows per DSP48E2 column
            cand = m.submodules.candidates = DspCandidates(p)
            m.d.comb += [cand.d0.eq(buf.r_data0), cand.d1.eq(buf.r_data1), cand.parity.eq(s1_parity),
                         cand.is_pv.eq(is_pv), cand.zero.as_value().eq(w_bits[zero_at:zero_at + CODE_BITS * L])]
            for gi, (r0, n) in enumerate(dsp_row_groups(p)):
                rows = m.submodules[f"dsprows{gi}"] = DspRows(p, n)
                m.d.comb += [rows.act.eq(cand.act), rows.pair_sums.eq(cand.pair_sums), rows.a_shared.eq(cand.a_shared),
                             rows.codes.as_value().eq(row_codes(r0, n)), rows.meta.as_value().eq(row_meta(r0, n)),
                             rows.is_sparse.eq(is_sparse), rows.half.eq(s1.half), rows.en.eq(~stall)]
                row_sums += [(rows.p[i], rows.a[i]) for i in range(n)]
        else:
            cand = m.submodules.candidates = Candidates(p)
            m.d.comb += [cand.d0.eq(buf.r_data0), cand.d1.eq(buf.r_data1), cand.parity.eq(s1_parity),
                         cand.is_sparse.eq(is_sparse),
                         cand.zero.as_value().eq(w_bits[zero_at:zero_at + CODE_BITS * L])]
            for r in range(R):
                row = m.submodules[f"row{r}"] = ArrayRow(p)
                m.d.comb += [row.cand_a.eq(cand.a), row.cand_a3.eq(cand.a3), row.zsum.eq(cand.zsum),
                             row.codes.as_value().eq(row_codes(r)), row.meta.as_value().eq(row_meta(r)),
                             row.is_sparse.eq(is_sparse), row.is_pv.eq(is_pv), row.en.eq(~stall)]
                row_sums.append((row.p, row.a))
        s2 = Signal(tags)
        with m.If(~stall):
            m.d.sync += [s2_valid.eq(s1_valid), s2.eq(s1)]
        s3 = Signal(tags)
        with m.If(~stall):
            m.d.sync += [s3_valid.eq(s2_valid & s2.last_gb), s3.eq(s2)]

        bank = m.submodules.output_bank = OutputBank(p)
        accs = []
        for r in range(R):
            grp = m.submodules[f"group{r}"] = GroupRow(p)
            acc = m.submodules[f"acc{r}"] = AccRow(p)
            rq = m.submodules[f"rq{r}"] = self.requantizers[r]
            accs.append(acc)
            m.d.comb += [
                # S2 -> S3: the group stage
                grp.load.eq(~stall), grp.is_pv.eq(is_pv),
                grp.s_in.eq(sc_bits[sl["s"].offset + W_SCALE.bits * r:][:W_SCALE.bits]),
                grp.m_in.eq(sc_bits[sl["m"].offset + W_MIN.bits * r:][:W_MIN.bits].as_signed()),
                grp.p.eq(row_sums[r][0]), grp.a.eq(row_sums[r][1]),
                grp.valid.eq(s2_valid), grp.hold.eq(stall), grp.first_gb.eq(s2.first_gb), grp.t.eq(s2.t),
                # S3: accumulators and the output bank
                acc.write.eq(s3_valid & ~stall), acc.first_group.eq(s3.first_group),
                acc.last_beat.eq(s3.last_beat), acc.t.eq(s3.t), acc.g.eq(grp.g), acc.read_t.eq(bank.e),
                acc.mult_in.eq(self.rq.payload.as_value()[rl["mult"].offset + MULT_BITS * r:][:MULT_BITS]),
                acc.shift_in.eq(self.rq.payload.as_value()[rl["shift"].offset + SHIFT_BITS * r:][:SHIFT_BITS]),
                # output: one beat of pe_rows values per token
                rq.acc.eq(acc.value), rq.shift.eq(acc.shift), rq.requant.eq(bank.requant),
                self.out.payload.as_value()[ACC * r:ACC * (r + 1)].eq(rq.out),
            ]
            m.d.comb += rq.mult.eq(accs[r].mult)

        # ---------------- S3: hand-over to the output bank; the stall ----------------
        m.d.comb += [bank.ready.eq(self.out.ready), self.out.valid.eq(bank.valid), bank.t.eq(s3.t),
                     bank.tokens_in.eq(cmd.tokens), bank.requant_in.eq(cmd.requant)]
        # A requantized tile takes its per-row mult/shift beat (``rq``) when it enters the output bank.
        rq_wait = cmd.requant & ~self.rq.valid
        m.d.comb += stall.eq(s3_valid & s3.last_beat & Mux(s3.last_tok, ~bank.may_final | rq_wait, ~bank.may_write))
        m.d.comb += self.rq.ready.eq(s3_valid & s3.last_beat & s3.last_tok & cmd.requant & bank.may_final)
        arm = Signal()
        m.d.comb += bank.arm.eq(arm)
        m.d.comb += arm.eq(s3_valid & ~stall & s3.last_beat & s3.last_tok)
        for acc in accs:
            m.d.comb += acc.rq_load.eq(arm)
        return m
