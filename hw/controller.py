"""The controller of the accelerator (``docs/isa.md``, "Controller"): fetch, decode, dispatch, and the
executors of the instructions it runs itself.

* ``Controller``: fetches the instruction at ``pc`` (``INSTR_BITS / W`` words from mem word
  ``pc * INSTR_BITS / W``, the program starts at word 0) on memory read port 0, decodes it into
  ``hw.isa.instr_layout()``, checks it (``AccelError``), runs NOP and HALT itself and hands every
  other opcode to one *client*: an executor below or a special-function unit. A client has the unit
  interface of ``hw.sfu.base`` (``start`` pulse, ``instr`` held, ``busy``, spad ports ``rd0 rd1 wr``);
  the controller starts the next fetch in the first cycle the client's ``busy`` is low. An error
  (unknown opcode, opcode without unit, bad field, an executor's error) stops the machine: ``done``
  rises with ``error`` != 0 and ``pc``/``op`` still show the failing instruction.
* ``MemOps``: LOAD, STORE, SCATTER, MARK (spad port ``rd0``/``wr``, memory read port 0, the write
  port). It finishes an instruction only when every write it issued has been answered.
* ``EngineStreamer``: ENGINE: the command beat, activations packed from the spad (zero fill), weight
  beats from memory read port 0 (tile stride ``f``) or, with ``AccelParams.weight_lanes`` > 1, from
  its own wide read port (up to ``weight_lanes`` words per cycle, ``hw.memory.WideBeatGather``), scale
  beats from read port 1, output beats written to ``spad[d + t*i0 + r]`` for rows ``g <= r < h``.
"""

from __future__ import annotations

from enum import IntEnum

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .engine import Mode, layouts, max_reduction
from .isa import ELEMENT_BITS, ENGINE_MODE_MASK, FLAG_INDEXED, FLAG_NEG, FLAG_SIGNED, FLAG_W4, INSTR_BITS, Op, \
    instr_layout
from .memory import BeatGather, MemReadSignature, MemWideReadSignature, MemWriteSignature, WideBeatGather, words_for
from .params import AccelParams, EngineParams
from .sfu.base import SPAD_BITS, SpadRead, SpadWrite

__all__ = ["AccelError", "Controller", "MemOps", "EngineStreamer", "client_signature", "CTRL_STATES"]


class AccelError(IntEnum):
    """The controller's ``error`` register (0: none); the harness reports it by name."""
    NONE = 0
    UNKNOWN_OPCODE = 1      # op is not an hw.isa.Op
    NO_UNIT = 2             # a special-function opcode with no unit in this accelerator
    BAD_WIDTH = 3           # LOAD/STORE/SCATTER: w not in ELEMENT_BITS
    BAD_ENGINE = 4          # ENGINE: m (tokens) not in 1..mm_tokens, n (k_beats) not in 1..max, k (group
                            # beats) 0 or not dividing n, s (tiles) not in 1..65535
    SCATTER_STRADDLE = 5    # SCATTER: a field crosses a memory word
    PC_RANGE = 6            # pc reached AccelParams.max_program_instrs without HALT
    MEM_READ = 7            # a read answered with RRESP SLVERR/DECERR (AXI top; stops after the instruction)
    MEM_WRITE = 8           # a write answered with a non-OKAY response (BRESP): stops after the instruction


#: controller FSM states, in the order of the ``state`` output's encoding
CTRL_STATES = ("IDLE", "FETCH", "FETCH_DATA", "DECODE", "GO", "WAIT", "NEXT", "DONE")


def client_signature(addr_bits: int, extra: dict | None = None) -> wiring.Signature:
    """The unit interface of hw.sfu.base (start, instr, busy, rd0, rd1, wr) plus ``error`` and extras."""
    members = {"start": In(1), "instr": In(instr_layout()), "busy": Out(1), "error": Out(8),
               "rd0": Out(SpadRead(addr_bits)), "rd1": Out(SpadRead(addr_bits)),
               "wr": Out(SpadWrite(addr_bits))}
    members.update(extra or {})
    return wiring.Signature(members)


def _width_log2(m: Module, w) -> Signal:
    """log2 of an element width in ELEMENT_BITS (0 for any other value: the controller refuses it)."""
    lg = Signal(3)
    with m.Switch(w):
        for bits in ELEMENT_BITS:
            with m.Case(bits):
                m.d.comb += lg.eq(bits.bit_length() - 1)
    return lg


class MemOps(wiring.Component):
    """LOAD, STORE, SCATTER and MARK: one element per cycle between spad and memory words."""

    def __init__(self, accel: AccelParams):
        self.accel = accel
        W = accel.mem_word_bits
        super().__init__(client_signature(accel.spad_addr_bits, {
            "mrd": Out(MemReadSignature(W)), "mwr": Out(MemWriteSignature(W)), "cycles": In(64)}))

    def elaborate(self, platform):
        m = Module()
        W = self.accel.mem_word_bits
        lgW = W.bit_length() - 1
        ins = self.instr
        rd, wr, mrd, mwr = self.rd0, self.wr, self.mrd, self.mwr
        m.d.comb += [self.rd1.en.eq(0), self.rd1.addr.eq(0)]

        lgw = _width_log2(m, ins.w)
        wbits = Signal(7)
        mask = Signal(64)
        epw = Signal(range(W // 4 + 1))  # elements per word
        with m.Switch(lgw):
            for bits in ELEMENT_BITS:
                with m.Case(bits.bit_length() - 1):
                    m.d.comb += [wbits.eq(bits), mask.eq(2**bits - 1), epw.eq(W // bits)]

        # outstanding writes (every instruction waits for them before it finishes)
        outst = Signal(16)
        m.d.comb += mwr.resp.ready.eq(1)
        wfire, rfire = mwr.req.valid & mwr.req.ready, mwr.resp.valid
        m.d.sync += outst.eq(outst + wfire - rfire)
        drained = outst == 0

        # ---- shared counters ----
        i = Signal(32)          # LOAD: elements written / STORE: spad reads issued / SCATTER: inner index
        ci = Signal(32)         # STORE: elements packed
        j = Signal(32)          # STORE: words written
        o = Signal(32)          # SCATTER: outer index
        maddr = Signal(32)      # LOAD: first word
        cur = Signal(W)         # LOAD: current word (shifted as elements are taken)
        left = Signal(range(W // 4 + 1))
        acc = Signal(W)         # STORE: word being packed
        fill = Signal(range(W // 4 + 1))
        flush = Signal()
        pend = Signal()         # STORE: a spad read's data is waiting in rd.data
        # SCATTER state
        rowaddr = Signal(32)
        prow = Signal(64)       # bit position of field (o, 0)
        pos = Signal(64)        # bit position of field (o, i)
        cache = Signal(W)
        cache_addr = Signal(64 - lgW)
        cache_valid = Signal()
        dirty = Signal(W // 8)
        row_lo = Signal(64 - lgW)   # the row's first word not already cached (its read job's first word)
        row_hi = Signal(64 - lgW)   # the word of the row's last field (the job's last word)
        saddr = Signal(64 - lgW)    # the word the row's read stream delivers next
        wr_hi = Signal(64 - lgW)    # the highest word written back in this instruction
        wr_any = Signal()           # ... once one has been
        err = Signal(8)
        m.d.comb += self.error.eq(err)
        # MARK's word: the counter in the first cycle the write is offered, latched so the payload holds
        # while the write port stalls (valid/ready rule, proved in sim/formal_accel.py)
        mark = Signal(64)

        all_strb = Const(2**(W // 8) - 1, W // 8)
        m.d.comb += [mwr.req.payload.strb.eq(all_strb)]

        with m.FSM() as fsm:
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [err.eq(0), i.eq(0), ci.eq(0), j.eq(0), o.eq(0), left.eq(0), acc.eq(0),
                                 fill.eq(0), flush.eq(0), pend.eq(0), cache_valid.eq(0), dirty.eq(0), wr_any.eq(0),
                                 maddr.eq(ins.a), rowaddr.eq(ins.a),
                                 prow.eq((ins.d << lgW) + ins.e), pos.eq((ins.d << lgW) + ins.e),
                                 mark.eq(self.cycles + 1)]
                    with m.Switch(ins.op):
                        with m.Case(Op.LOAD):
                            m.next = "L_START"
                        with m.Case(Op.STORE):
                            m.next = "S_RUN"
                        with m.Case(Op.SCATTER):
                            with m.If((ins.m == 0) | (ins.n == 0)):
                                m.next = "DRAIN"
                            with m.Else():
                                m.next = "X_ROW"
                        with m.Case(Op.MARK):
                            m.next = "M_WR"

            # ---------------- LOAD ----------------
            with m.State("L_START"):
                with m.If(ins.flags & FLAG_INDEXED):
                    m.d.comb += [rd.en.eq(1), rd.addr.eq(ins.b)]
                    m.next = "L_IDX"
                with m.Else():
                    m.next = "L_REQ"
            with m.State("L_IDX"):
                m.d.sync += maddr.eq(ins.a + rd.data * ins.s)
                m.next = "L_REQ"
            with m.State("L_REQ"):
                nbits = Signal(40)
                m.d.comb += [nbits.eq(ins.n << lgw), mrd.req.valid.eq(ins.n != 0),
                             mrd.req.payload.addr.eq(maddr),
                             mrd.req.payload.count.eq((nbits + (W - 1)) >> lgW)]
                with m.If(ins.n == 0):
                    m.next = "IDLE"
                with m.Elif(mrd.req.ready):
                    m.next = "L_DATA"
            with m.State("L_DATA"):
                word = Signal(W)
                have = Signal()
                m.d.comb += [word.eq(Mux(left == 0, mrd.data.payload, cur)),
                             have.eq((left != 0) | mrd.data.valid),
                             mrd.data.ready.eq((left == 0) & (i < ins.n))]
                raw = Signal(64)
                m.d.comb += raw.eq(word[:64] & mask)
                top = Signal()
                with m.Switch(lgw):
                    for bits in ELEMENT_BITS:
                        with m.Case(bits.bit_length() - 1):
                            m.d.comb += top.eq(raw[bits - 1])
                sign = Signal()
                m.d.comb += sign.eq(top & (ins.flags & FLAG_SIGNED).any())
                m.d.comb += [wr.addr.eq(ins.d + i), wr.data.eq(Mux(sign, raw | ~mask, raw)),
                             wr.en.eq(have & (i < ins.n))]
                with m.If(have & (i < ins.n)):
                    m.d.sync += [cur.eq(word >> wbits), left.eq(Mux(left == 0, epw, left) - 1), i.eq(i + 1)]
                with m.If(i >= ins.n):
                    m.next = "IDLE"

            # ---------------- STORE ----------------
            with m.State("S_RUN"):
                consume = Signal()
                issue = Signal()
                m.d.comb += [consume.eq(pend & ~flush), issue.eq((i < ins.n) & (~pend | consume)),
                             rd.en.eq(issue), rd.addr.eq(ins.a + i)]
                m.d.sync += pend.eq(issue | (pend & ~consume))
                with m.If(issue):
                    m.d.sync += i.eq(i + 1)
                elem = Signal(W)
                at = Signal(range(W))
                m.d.comb += [at.eq(fill << lgw), elem.eq((rd.data.as_unsigned() & mask) << at)]
                with m.If(consume):
                    m.d.sync += [acc.eq(acc | elem), fill.eq(fill + 1), ci.eq(ci + 1)]
                    with m.If((fill + 1 == epw) | (ci + 1 == ins.n)):
                        m.d.sync += flush.eq(1)
                m.d.comb += [mwr.req.valid.eq(flush), mwr.req.payload.addr.eq(ins.d + j),
                             mwr.req.payload.data.eq(acc)]
                with m.If(flush & mwr.req.ready):
                    m.d.sync += [flush.eq(0), acc.eq(0), fill.eq(0), j.eq(j + 1)]
                with m.If((ci == ins.n) & ~flush):
                    m.next = "DRAIN"

            # ---------------- SCATTER ----------------
            # Row by row (o): the row's fields lie at nondecreasing positions (k >= 0), so its words are
            # the run row_lo..row_hi, each visited once. One read job streams the run while the fields are
            # patched into the cached word; a word left is written back at once (byte strobes) and never
            # read again in this row. The job waits for every write answered unless all its words lie
            # above every word written back so far (a read never overtakes a write of its word).
            word_of = pos >> lgW
            off = Signal(range(W))
            m.d.comb += off.eq(pos[:lgW])
            row_span = Signal(64)      # bits from the row's first field to its last
            m.d.comb += row_span.eq((ins.n - 1) * ins.k)
            # whole bytes only (w >= 8, every field at a byte boundary): the strobes keep every other
            # byte, so no word is read at all
            wonly = Signal()
            m.d.comb += wonly.eq((wbits >= 8) & (ins.e[:3] == 0) & (ins.k[:3] == 0) & (ins.f[:3] == 0))

            def write_back(then):
                m.d.comb += [mwr.req.valid.eq(1), mwr.req.payload.addr.eq(cache_addr),
                             mwr.req.payload.data.eq(cache), mwr.req.payload.strb.eq(dirty)]
                with m.If(mwr.req.ready):
                    m.d.sync += [cache_valid.eq(0), dirty.eq(0), wr_any.eq(1),
                                 wr_hi.eq(Mux(wr_any & (wr_hi > cache_addr), wr_hi, cache_addr))]
                    m.next = then

            with m.State("X_ROW"):
                keep = Signal()
                m.d.comb += keep.eq(cache_valid & (cache_addr == (prow >> lgW)))
                m.d.sync += [row_lo.eq((prow >> lgW) + keep), row_hi.eq((prow + row_span) >> lgW),
                             saddr.eq((prow >> lgW) + keep)]
                with m.If(cache_valid & ~keep & dirty.any()):
                    write_back("X_JOB")
                with m.Else():
                    with m.If(~keep):
                        m.d.sync += [cache_valid.eq(0), dirty.eq(0)]
                    m.next = "X_JOB"
            with m.State("X_JOB"):
                safe = Signal()
                m.d.comb += safe.eq(drained | (wr_any & (row_lo > wr_hi)))
                with m.If(wonly | (row_lo > row_hi)):   # nothing to read: bytes only, or all cached
                    m.next = "X_RD"
                with m.Else():
                    m.d.comb += [mrd.req.valid.eq(safe), mrd.req.payload.addr.eq(row_lo),
                                 mrd.req.payload.count.eq(row_hi - row_lo + 1)]
                    with m.If(safe & mrd.req.ready):
                        m.next = "X_RD"
            with m.State("X_RD"):
                m.d.comb += [rd.en.eq(1), rd.addr.eq(rowaddr + i)]
                m.next = "X_CHK"
            with m.State("X_CHK"):
                v = Signal(64)
                m.d.comb += v.eq(Mux((ins.flags & FLAG_NEG).any(), -rd.data, rd.data))
                fmask = Signal(W)
                m.d.comb += fmask.eq(mask << off)
                bytes_hit = Signal(W // 8)
                m.d.comb += bytes_hit.eq(Cat(*[fmask[8 * b:8 * b + 8].any() for b in range(W // 8)]))
                with m.If(off + wbits > W):
                    m.d.sync += err.eq(AccelError.SCATTER_STRADDLE)
                    m.next = "X_ERR"
                with m.Elif(cache_valid & (cache_addr == word_of)):
                    m.d.sync += [cache.eq((cache & ~fmask) | ((v & mask) << off)), dirty.eq(dirty | bytes_hit)]
                    with m.If(i == ins.n - 1):
                        m.d.sync += [i.eq(0), o.eq(o + 1), rowaddr.eq(rowaddr + ins.b), prow.eq(prow + ins.f),
                                     pos.eq(prow + ins.f)]
                        with m.If(o == ins.m - 1):
                            m.next = "X_FLUSH"
                        with m.Else():
                            m.next = "X_ROW"
                    with m.Else():
                        m.d.sync += [i.eq(i + 1), pos.eq(pos + ins.k)]
                        m.next = "X_RD"
                with m.Elif(cache_valid & dirty.any()):
                    m.next = "X_WB"
                with m.Else():
                    m.next = "X_SDATA"
            with m.State("X_WB"):
                write_back("X_SDATA")
            with m.State("X_SDATA"):
                # the row's stream: words before the field's are passed over, the field's is cached
                # (bytes only: the field's word starts empty, its strobes clear)
                m.d.comb += mrd.data.ready.eq(~wonly)
                with m.If(wonly):
                    m.d.sync += [cache.eq(0), cache_addr.eq(word_of), cache_valid.eq(1), dirty.eq(0)]
                    m.next = "X_CHK"
                with m.Elif(mrd.data.valid):
                    m.d.sync += saddr.eq(saddr + 1)
                    with m.If(saddr == word_of):
                        m.d.sync += [cache.eq(mrd.data.payload), cache_addr.eq(word_of), cache_valid.eq(1),
                                     dirty.eq(0)]
                        m.next = "X_CHK"
            with m.State("X_ERR"):
                # stopped by a straddling field: take the rest of the row's stream, wait for the writes
                with m.If(wonly | (saddr > row_hi)):
                    m.next = "DRAIN"
                with m.Else():
                    m.d.comb += mrd.data.ready.eq(1)
                    with m.If(mrd.data.valid):
                        m.d.sync += saddr.eq(saddr + 1)
            with m.State("X_FLUSH"):
                m.d.comb += [mwr.req.valid.eq(cache_valid & dirty.any()), mwr.req.payload.addr.eq(cache_addr),
                             mwr.req.payload.data.eq(cache), mwr.req.payload.strb.eq(dirty)]
                with m.If(~(cache_valid & dirty.any()) | mwr.req.ready):
                    m.d.sync += [cache_valid.eq(0), dirty.eq(0)]
                    m.next = "DRAIN"

            # ---------------- MARK ----------------
            with m.State("M_WR"):
                m.d.comb += [mwr.req.valid.eq(1), mwr.req.payload.addr.eq(ins.d),
                             mwr.req.payload.data.eq(mark)]
                with m.If(mwr.req.ready):
                    m.next = "DRAIN"

            with m.State("DRAIN"):
                with m.If(drained):
                    m.next = "IDLE"
        m.d.comb += self.busy.eq(~fsm.ongoing("IDLE"))
        return m


class EngineStreamer(wiring.Component):
    """ENGINE: drives the engine's streams from the spad and memory for one command."""

    def __init__(self, engine: EngineParams, accel: AccelParams):
        self.p, self.accel = engine, accel
        self.lay = layouts(engine)
        W = accel.mem_word_bits
        # the weight stream: read port 0 (one word per cycle) or, with weight_lanes > 1, a wide read port
        wrd = MemWideReadSignature(W, accel.weight_lanes) if accel.weight_lanes > 1 else MemReadSignature(W)
        super().__init__(client_signature(accel.spad_addr_bits, {
            "wrd": Out(wrd), "srd": Out(MemReadSignature(W)),
            "cmd": Out(stream.Signature(self.lay["cmd"])), "act": Out(stream.Signature(self.lay["act"])),
            "weight": Out(stream.Signature(self.lay["weight"])),
            "scale": Out(stream.Signature(self.lay["scale"])), "rq": Out(stream.Signature(self.lay["rq"])),
            "out": In(stream.Signature(self.lay["out"]))}))

    @property
    def weight_words(self) -> int:
        return words_for(data.Layout.cast(self.lay["weight"]).size, self.accel.mem_word_bits)

    @property
    def scale_words(self) -> int:
        return words_for(data.Layout.cast(self.lay["scale"]).size, self.accel.mem_word_bits)

    def elaborate(self, platform):
        m = Module()
        p = self.p
        R, L, TT = p.pe_rows, p.pe_lanes, p.mm_tokens
        ACC = p.acc_bits
        kb_max = max_reduction(p) // L
        WB, SB = self.weight_words, self.scale_words
        ins = self.instr
        mode = Signal(2)
        m.d.comb += mode.eq(ins.flags & ENGINE_MODE_MASK)
        m.d.comb += [self.rd1.en.eq(0), self.rd1.addr.eq(0), self.rq.valid.eq(0)]
        err = Signal(8)
        m.d.comb += self.error.eq(err)

        running = Signal()
        # ---- field checks and the number of scale beats: s * n / k (a 16-step divider) ----
        q = Signal(16)
        rem = Signal(17)
        step = Signal(range(17))
        nsh = Signal(16)
        n_scale_words = Signal(48)
        fields_ok = Signal()
        m.d.comb += fields_ok.eq((ins.m >= 1) & (ins.m <= TT) & (ins.n >= 1) & (ins.n <= kb_max) &
                                 (ins.k >= 1) & (ins.k <= kb_max) & (ins.s >= 1) & (ins.s < 1 << 16))

        # ---- counters of the streams ----
        cmd_sent = Signal()
        wpt = Signal(range(2 * kb_max + 1))   # act words per token
        m.d.comb += wpt.eq(Mux(mode == Mode.SPARSE, ins.n << 1, ins.n))
        ktok = Signal(32)
        m.d.comb += ktok.eq(wpt * L)
        # activations
        a_t = Signal(range(TT + 1))
        a_p = Signal(32)                     # position within the token of the next element issued
        a_row = Signal(32)                   # spad address of the token's first input
        a_pend = Signal()
        a_zero = Signal()
        lanes = Signal(8 * L)
        lane = Signal(range(L + 1))
        a_full = Signal()
        a_beats = Signal(32)
        a_total = Signal(32)
        m.d.comb += a_total.eq(ins.m * wpt)
        # weights
        w_ti = Signal(16)
        w_addr = Signal(32)
        w_stride = Signal(32)
        m.d.comb += w_stride.eq(Mux(ins.f != 0, ins.f, ins.n * WB))
        # scales
        s_req = Signal()
        # outputs
        o_full = Signal()
        o_beat = Signal(self.lay["out"])
        o_lr = Signal(range(R + 1))
        o_t = Signal(range(TT + 1))
        o_ti = Signal(16)
        o_tok = Signal(64)                   # t * i0
        o_rbase = Signal(32)                 # ti * pe_rows

        wbits = data.Layout.cast(self.lay["weight"]).size
        # the weight gather: a separately named sub-component (bitstream/ black-boxes it)
        m.submodules.wgather = wg = (WideBeatGather(self.accel.mem_word_bits, self.accel.weight_lanes, wbits)
                                     if self.accel.weight_lanes > 1 else BeatGather(self.accel.mem_word_bits, wbits))
        m.submodules.sgather = sg = BeatGather(self.accel.mem_word_bits, data.Layout.cast(self.lay["scale"]).size)
        wiring.connect(m, wiring.flipped(self.wrd.data), wg.words)
        wiring.connect(m, wiring.flipped(self.srd.data), sg.words)
        m.d.comb += [self.weight.valid.eq(wg.beats.valid & running), wg.beats.ready.eq(self.weight.ready & running),
                     self.weight.payload.eq(wg.beats.payload),
                     self.scale.valid.eq(sg.beats.valid & running), sg.beats.ready.eq(self.scale.ready & running),
                     self.scale.payload.eq(sg.beats.payload)]

        with m.FSM() as fsm:
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [err.eq(0), q.eq(0), rem.eq(0), step.eq(0)]
                    m.next = "CHECK"
            with m.State("CHECK"):
                with m.If(~fields_ok):
                    m.d.sync += err.eq(AccelError.BAD_ENGINE)
                    m.next = "IDLE"
                with m.Else():
                    m.d.sync += [rem.eq(0), q.eq(0), step.eq(0), nsh.eq(ins.n)]
                    m.next = "DIV"
            with m.State("DIV"):
                # restoring division of n by k, one quotient bit per cycle, most significant first
                r2 = Signal(17)
                m.d.comb += r2.eq(Cat(nsh[15], rem[:16]))
                m.d.sync += nsh.eq(nsh << 1)
                with m.If(step < 16):
                    with m.If(r2 >= ins.k):
                        m.d.sync += [rem.eq(r2 - ins.k), q.eq(Cat(Const(1, 1), q[:15]))]
                    with m.Else():
                        m.d.sync += [rem.eq(r2), q.eq(Cat(Const(0, 1), q[:15]))]
                    m.d.sync += step.eq(step + 1)
                with m.Else():
                    with m.If(rem != 0):
                        m.d.sync += err.eq(AccelError.BAD_ENGINE)
                        m.next = "IDLE"
                    with m.Else():
                        m.d.sync += [
                            n_scale_words.eq(Mux(mode == Mode.PV, 0, ins.s * q * SB)),
                            cmd_sent.eq(0), a_t.eq(0), a_p.eq(0), a_row.eq(ins.a), a_pend.eq(0), lane.eq(0),
                            a_full.eq(0), a_beats.eq(0), w_ti.eq(0), w_addr.eq(ins.c), s_req.eq(0),
                            o_full.eq(0), o_lr.eq(0), o_t.eq(0), o_ti.eq(0), o_tok.eq(0), o_rbase.eq(0),
                            running.eq(1)]
                        m.next = "RUN"
            with m.State("RUN"):
                with m.If(cmd_sent & (a_beats == a_total) & (o_ti == ins.s)):
                    m.d.sync += running.eq(0)
                    m.next = "IDLE"
        m.d.comb += self.busy.eq(~fsm.ongoing("IDLE"))

        # ---- cmd ----
        cp = self.cmd.payload
        m.d.comb += [self.cmd.valid.eq(running & ~cmd_sent), cp.mode.eq(mode), cp.tokens.eq(ins.m),
                     cp.k_beats.eq(ins.n), cp.group_beats.eq(ins.k), cp.tiles.eq(ins.s), cp.requant.eq(0),
                     cp.wide.eq((ins.flags & FLAG_W4).any())]
        with m.If(self.cmd.valid & self.cmd.ready):
            m.d.sync += cmd_sent.eq(1)

        # ---- act: one spad element per cycle into a lane shift register ----
        more = running & (a_t < ins.m)
        consume = Signal()
        issue = Signal()
        m.d.comb += [consume.eq(a_pend & ~a_full), issue.eq(more & (~a_pend | consume))]
        from_spad = a_p < ins.b
        m.d.comb += [self.rd0.en.eq(issue & from_spad), self.rd0.addr.eq(a_row + a_p)]
        m.d.sync += a_pend.eq(issue | (a_pend & ~consume))
        with m.If(issue):
            m.d.sync += a_zero.eq(~from_spad)
            with m.If(a_p == ktok - 1):
                m.d.sync += [a_p.eq(0), a_t.eq(a_t + 1), a_row.eq(a_row + ins.b)]
            with m.Else():
                m.d.sync += a_p.eq(a_p + 1)
        val = Mux(a_zero, 0, self.rd0.data[:8])
        with m.If(consume):
            m.d.sync += [lanes.eq(Cat(lanes[8:], val)), lane.eq(lane + 1)]
            with m.If(lane == L - 1):
                m.d.sync += [a_full.eq(1), lane.eq(0)]
        m.d.comb += [self.act.valid.eq(a_full), self.act.payload.eq(lanes)]
        with m.If(self.act.valid & self.act.ready):
            m.d.sync += [a_full.eq(0), a_beats.eq(a_beats + 1)]

        # ---- weight requests: one job of n*WB words per tile ----
        m.d.comb += [self.wrd.req.valid.eq(running & (w_ti < ins.s)), self.wrd.req.payload.addr.eq(w_addr),
                     self.wrd.req.payload.count.eq(ins.n * WB)]
        if self.accel.weight_lanes > 1:
            m.d.comb += self.wrd.req.payload.beat.eq(WB)  # transfers end at every weight beat's last word
        with m.If(self.wrd.req.valid & self.wrd.req.ready):
            m.d.sync += [w_ti.eq(w_ti + 1), w_addr.eq(w_addr + w_stride)]

        # ---- scale requests: one job of every scale beat ----
        m.d.comb += [self.srd.req.valid.eq(running & ~s_req & (n_scale_words != 0)),
                     self.srd.req.payload.addr.eq(ins.e), self.srd.req.payload.count.eq(n_scale_words)]
        with m.If(self.srd.req.valid & self.srd.req.ready):
            m.d.sync += s_req.eq(1)

        # ---- outputs: one row per cycle to spad[d + t*i0 + r], g <= r < h ----
        m.d.comb += self.out.ready.eq(running & ~o_full)
        with m.If(self.out.valid & self.out.ready):
            m.d.sync += [o_beat.eq(self.out.payload), o_full.eq(1), o_lr.eq(0)]
        row = Signal(32)
        m.d.comb += row.eq(o_rbase + o_lr)
        vals = [Signal(signed(ACC), name=f"out_row{r}") for r in range(R)]
        for r in range(R):
            m.d.comb += vals[r].eq(o_beat.as_value()[ACC * r:ACC * (r + 1)].as_signed())
        sel = Signal(signed(SPAD_BITS))
        with m.Switch(o_lr):
            for r in range(R):
                with m.Case(r):
                    m.d.comb += sel.eq(vals[r])
        m.d.comb += [self.wr.en.eq(o_full & (row >= ins.g) & (row < ins.h)),
                     self.wr.addr.eq(ins.d + o_tok + row), self.wr.data.eq(sel)]
        with m.If(o_full):
            m.d.sync += o_lr.eq(o_lr + 1)
            with m.If(o_lr == R - 1):
                m.d.sync += o_full.eq(0)
                with m.If(o_t == ins.m - 1):
                    m.d.sync += [o_t.eq(0), o_tok.eq(0), o_ti.eq(o_ti + 1), o_rbase.eq(o_rbase + R)]
                with m.Else():
                    m.d.sync += [o_t.eq(o_t + 1), o_tok.eq(o_tok + ins.i0)]
        return m


class Controller(wiring.Component):
    """Fetch, decode and dispatch. ``clients``: opcode -> client index (the top wires client ``sel``)."""

    def __init__(self, engine: EngineParams, accel: AccelParams, dispatch: dict[int, int], n_clients: int,
                 prefetch: bool = True):
        self.p, self.accel = engine, accel
        self.prefetch = int(prefetch)
        self.dispatch = dict(dispatch)
        self.n_clients = n_clients
        W = accel.mem_word_bits
        super().__init__({
            "start": In(1), "done": Out(1), "error": Out(8), "pc": Out(32), "op": Out(8),
            "state": Out(range(len(CTRL_STATES))), "running": Out(1),
            "mrd": Out(MemReadSignature(W)), "fetching": Out(1), "mpf": Out(MemReadSignature(W)),
            "instr": Out(instr_layout()), "sel": Out(range(max(2, n_clients))), "go": Out(1),
            "cbusy": In(1), "cerror": In(8),
        })

    def elaborate(self, platform):
        m = Module()
        W = self.accel.mem_word_bits
        IW = INSTR_BITS // W
        ibuf = Signal(INSTR_BITS)
        k = Signal(range(IW + 1))
        instr = Signal(instr_layout())
        m.d.comb += [self.instr.eq(instr), self.op.eq(instr.op)]
        pc = self.pc
        err = self.error
        known = [int(op) for op in Op]
        # prefetch of pc + 1 on its own read master (memory read port 1) while a client executes
        pf_want = Signal()   # the job is to be issued
        pf_busy = Signal()   # the job is issued, words pending
        pf_valid = Signal()  # pf_buf holds instruction pc + 1
        pf_buf = Signal(INSTR_BITS)
        pf_k = Signal(range(IW + 1))
        pf_nxt = Signal(INSTR_BITS)
        pf_addr = Signal(32)
        restart = Signal()
        m.d.comb += [self.mpf.req.valid.eq(pf_want), self.mpf.req.payload.addr.eq(pf_addr),
                     self.mpf.req.payload.count.eq(IW), self.mpf.data.ready.eq(1),
                     pf_nxt.eq((pf_buf >> W) | (self.mpf.data.payload << (INSTR_BITS - W)) if IW > 1
                               else self.mpf.data.payload)]
        with m.If(self.mpf.req.valid & self.mpf.req.ready):
            m.d.sync += [pf_want.eq(0), pf_busy.eq(1), pf_k.eq(0)]
        with m.If(self.mpf.data.valid):
            m.d.sync += [pf_buf.eq(pf_nxt), pf_k.eq(pf_k + 1)]
            with m.If(pf_k == IW - 1):
                m.d.sync += [pf_busy.eq(0), pf_valid.eq(1)]
        mem_ops = (Op.LOAD, Op.STORE, Op.SCATTER)

        def state(name):
            return CTRL_STATES.index(name)

        with m.FSM() as fsm:
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [pc.eq(0), err.eq(0)]
                    m.next = "FETCH"
            with m.State("FETCH"):
                with m.If(pc >= self.accel.max_program_instrs):
                    m.d.sync += err.eq(AccelError.PC_RANGE)
                    m.next = "DONE"
                with m.Else():
                    m.d.comb += [self.fetching.eq(1), self.mrd.req.valid.eq(1),
                                 self.mrd.req.payload.addr.eq(pc * IW), self.mrd.req.payload.count.eq(IW)]
                    with m.If(self.mrd.req.ready):
                        m.d.sync += k.eq(0)
                        m.next = "FETCH_DATA"
            with m.State("FETCH_DATA"):
                m.d.comb += [self.fetching.eq(1), self.mrd.data.ready.eq(1)]
                nxt = Signal(INSTR_BITS)
                m.d.comb += nxt.eq((ibuf >> W) | (self.mrd.data.payload << (INSTR_BITS - W)) if IW > 1
                                   else self.mrd.data.payload)
                with m.If(self.mrd.data.valid):
                    m.d.sync += [ibuf.eq(nxt), k.eq(k + 1)]
                    with m.If(k == IW - 1):
                        m.d.sync += instr.eq(nxt)
                        m.next = "DECODE"
            with m.State("DECODE"):
                with m.Switch(instr.op):
                    with m.Case(Op.NOP):
                        m.d.sync += pc.eq(pc + 1)
                        m.next = "FETCH"
                    with m.Case(Op.HALT):
                        m.next = "DONE"
                    for op in known:
                        if op in (Op.NOP, Op.HALT):
                            continue
                        with m.Case(op):
                            if op not in self.dispatch:
                                m.d.sync += err.eq(AccelError.NO_UNIT)
                                m.next = "DONE"
                                continue
                            ok = Const(1)
                            if op in mem_ops:
                                ok = Cat(*[instr.w == b for b in ELEMENT_BITS]).any()
                            with m.If(ok):
                                m.d.sync += [self.sel.eq(self.dispatch[op]), pf_want.eq(self.prefetch),
                                             pf_valid.eq(0), pf_addr.eq((pc + 1) * IW)]
                                m.next = "GO"
                            with m.Else():
                                m.d.sync += err.eq(AccelError.BAD_WIDTH)
                                m.next = "DONE"
                    with m.Default():
                        m.d.sync += err.eq(AccelError.UNKNOWN_OPCODE)
                        m.next = "DONE"
            with m.State("GO"):
                m.d.comb += self.go.eq(1)
                m.next = "WAIT"
            with m.State("WAIT"):
                with m.If(~self.cbusy):
                    with m.If(self.cerror != 0):
                        m.d.sync += err.eq(self.cerror)
                        m.next = "DONE"
                    with m.Else():
                        m.d.sync += pc.eq(pc + 1)
                        m.next = "NEXT"
            with m.State("NEXT"):
                # the prefetched instruction, once it is complete; without prefetch, a fetch
                with m.If(pc >= self.accel.max_program_instrs):
                    m.d.sync += err.eq(AccelError.PC_RANGE)
                    m.next = "DONE"
                with m.Elif(pf_valid):
                    m.d.sync += [instr.eq(pf_buf), pf_valid.eq(0)]
                    m.next = "DECODE"
                with m.Elif(~(pf_want | pf_busy)):
                    m.next = "FETCH"
            with m.State("DONE"):
                # a prefetch still in flight (an error stopped the machine) drains before a restart
                m.d.comb += self.done.eq(1)
                m.d.sync += pf_want.eq(0)
                with m.If(self.start):
                    m.d.sync += restart.eq(1)
                with m.If((self.start | restart) & ~pf_busy):
                    m.d.sync += [pc.eq(0), err.eq(0), restart.eq(0), pf_valid.eq(0)]
                    m.next = "FETCH"
            enc = 0
            for name in CTRL_STATES:
                enc = enc | Mux(fsm.ongoing(name), state(name), 0)
            m.d.comb += self.state.eq(enc)
            m.d.comb += self.running.eq(~fsm.ongoing("IDLE") & ~fsm.ongoing("DONE"))
        return m
