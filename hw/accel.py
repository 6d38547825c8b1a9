"""The accelerator top (``docs/isa.md``, "Controller" and "Memory system"): the controller, the
scratchpad, the engine, the controller's executors and one instance of each special-function unit.

Ports (all ``amaranth.lib.wiring``): ``mem_rd0`` (instruction fetch, LOAD, SCATTER's reads and the
engine's weight beats unless ``accel.weight_lanes`` > 1), ``mem_rd1`` (the engine's scale beats),
``mem_wr`` (STORE, SCATTER, MARK), with ``weight_lanes`` > 1 ``mem_rdw`` (the engine's weight beats,
up to ``weight_lanes`` words per cycle: ``hw.memory.MemWideReadSignature``) — ``hw.memory`` signatures; ``start`` (in, a pulse: run the program from mem word 0), ``done`` (out,
held once HALT or an error stopped the machine), ``error`` (``hw.controller.AccelError``), ``cycles``
(cycles since ``start``, stops at ``done``); diagnostics for the harness: ``pc``, ``op``, ``state``
(``hw.controller.CTRL_STATES``), ``progress`` (a beat moved or the spad was accessed this cycle).
"""

from __future__ import annotations

from amaranth.hdl import Array, Cat, Elaboratable, Module, Mux, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .controller import CTRL_STATES, AccelError, Controller, EngineStreamer, MemOps
from .engine import Engine
from .isa import UNIT_OPS, Op
from .memory import MemReadSignature, MemWideReadSignature, MemWriteSignature
from .params import AccelParams, EngineParams
from .sfu.base import SPAD_BITS
from .sfu.registry import available_units, unit_class

__all__ = ["Accelerator", "AxiAccelerator", "resolve_units"]


def resolve_units(units=None) -> dict[Op, type]:
    """``None``: every unit whose module exists (``hw.sfu.registry.available_units``); a mapping
    opcode -> class; or an iterable of opcodes (classes from the registry)."""
    if units is None:
        return available_units()
    if isinstance(units, dict):
        out = {Op(k): v for k, v in units.items()}
    else:
        out = {Op(k): unit_class(k) for k in units}
    bad = [op.name for op in out if op not in UNIT_OPS]
    if bad:
        raise ValueError(f"units: {', '.join(bad)} are not special-function opcodes (hw.isa.UNIT_OPS)")
    return out


class SpadMux(wiring.Component):
    """Routes the spad's two read ports and its write port to the selected client (``sel``) while
    ``active``; the read data goes to every client (only the selected one looks at it)."""

    def __init__(self, addr_bits: int, n: int):
        self.n = n
        from .sfu.base import SpadRead, SpadWrite
        members = {"sel": In(range(max(2, n))), "active": In(1),
                   "rd0": Out(SpadRead(addr_bits)), "rd1": Out(SpadRead(addr_bits)), "wr": Out(SpadWrite(addr_bits))}
        for i in range(n):
            members[f"c{i}_rd0"] = In(SpadRead(addr_bits))
            members[f"c{i}_rd1"] = In(SpadRead(addr_bits))
            members[f"c{i}_wr"] = In(SpadWrite(addr_bits))
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        for i in range(self.n):
            for port in ("rd0", "rd1"):
                m.d.comb += getattr(self, f"c{i}_{port}").data.eq(getattr(self, port).data)
        with m.If(self.active):
            with m.Switch(self.sel):
                for i in range(self.n):
                    with m.Case(i):
                        for port in ("rd0", "rd1"):
                            c = getattr(self, f"c{i}_{port}")
                            m.d.comb += [getattr(self, port).addr.eq(c.addr), getattr(self, port).en.eq(c.en)]
                        c = getattr(self, f"c{i}_wr")
                        m.d.comb += [self.wr.addr.eq(c.addr), self.wr.data.eq(c.data), self.wr.en.eq(c.en)]
        return m


class ReadPortMux(wiring.Component):
    """Memory read port 0 shared by ``n`` masters, one owner at a time (``sel``)."""

    def __init__(self, word_bits: int, n: int):
        self.n = n
        members = {"sel": In(range(max(2, n))), "port": Out(MemReadSignature(word_bits))}
        for i in range(n):
            members[f"m{i}"] = In(MemReadSignature(word_bits))
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        with m.Switch(self.sel):
            for i in range(self.n):
                with m.Case(i):
                    c = getattr(self, f"m{i}")
                    m.d.comb += [self.port.req.valid.eq(c.req.valid), self.port.req.payload.eq(c.req.payload),
                                 c.req.ready.eq(self.port.req.ready),
                                 c.data.valid.eq(self.port.data.valid), c.data.payload.eq(self.port.data.payload),
                                 self.port.data.ready.eq(c.data.ready)]
        return m


class ReadPortArbiter(wiring.Component):
    """A memory read port shared by ``n`` masters at once: requests by fixed priority (master 0
    first), a queue of the accepted jobs' owners and word counts (``depth``), each word of data routed
    to the owner of the oldest job."""

    def __init__(self, word_bits: int, n: int, depth: int = 8):
        self.n, self.depth = n, depth
        members = {"port": Out(MemReadSignature(word_bits))}
        for i in range(n):
            members[f"m{i}"] = In(MemReadSignature(word_bits))
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        D = self.depth
        owners = Array(Signal(range(max(2, self.n)), name=f"owner{j}") for j in range(D))
        counts = Array(Signal(32, name=f"count{j}") for j in range(D))
        head, tail = Signal(range(D)), Signal(range(D))
        used = Signal(range(D + 1))
        grant = Signal(range(max(2, self.n)))
        for i in reversed(range(self.n)):
            with m.If(getattr(self, f"m{i}").req.valid):
                m.d.comb += grant.eq(i)
        ms = [getattr(self, f"m{i}") for i in range(self.n)]
        for i, c in enumerate(ms):
            m.d.comb += [c.req.ready.eq((grant == i) & self.port.req.ready & (used < D)),
                         c.data.payload.eq(self.port.data.payload),
                         c.data.valid.eq(self.port.data.valid & (used != 0) & (owners[head] == i))]
        with m.Switch(grant):
            for i, c in enumerate(ms):
                with m.Case(i):
                    m.d.comb += [self.port.req.valid.eq(c.req.valid & (used < D)),
                                 self.port.req.payload.eq(c.req.payload)]
        with m.Switch(owners[head]):
            for i, c in enumerate(ms):
                with m.Case(i):
                    m.d.comb += self.port.data.ready.eq(c.data.ready & (used != 0))
        push = self.port.req.valid & self.port.req.ready
        pop = Signal()
        fire = self.port.data.valid & self.port.data.ready
        m.d.comb += pop.eq(fire & (counts[head] == 1))
        with m.If(push):
            m.d.sync += [owners[tail].eq(grant), counts[tail].eq(self.port.req.payload.count),
                         tail.eq(Mux(tail == D - 1, 0, tail + 1))]
        with m.If(fire & ~pop):
            m.d.sync += counts[head].eq(counts[head] - 1)
        with m.If(pop):
            m.d.sync += head.eq(Mux(head == D - 1, 0, head + 1))
        m.d.sync += used.eq(used + push - pop)
        return m


class Accelerator(wiring.Component):
    """Controller + spad + engine + executors + special-function units (``units``: see
    ``resolve_units``)."""

    def __init__(self, engine: EngineParams, accel: AccelParams, units=None, read_fault: bool = False):
        problems = accel.problems()
        if problems:
            raise ValueError("accel." + "; ".join(f"{k}: {v}" for k, v in problems))
        self.engine_params, self.accel = engine, accel
        self.unit_classes = resolve_units(units)
        W = accel.mem_word_bits
        members = {
            "mem_rd0": Out(MemReadSignature(W)), "mem_rd1": Out(MemReadSignature(W)),
            "mem_wr": Out(MemWriteSignature(W)),
            "start": In(1), "done": Out(1), "error": Out(8), "cycles": Out(64),
            "pc": Out(32), "op": Out(8), "state": Out(range(len(CTRL_STATES))), "progress": Out(1),
        }
        if accel.weight_lanes > 1:  # the engine's weights on their own wide read port
            members["mem_rdw"] = Out(MemWideReadSignature(W, accel.weight_lanes))
        if read_fault:  # the AXI top: a pulse with every read beat answered SLVERR/DECERR
            members["mem_rd_fault"] = In(1)
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        A = self.accel
        ab = A.spad_addr_bits
        m.submodules.engine = engine = Engine(self.engine_params)
        m.submodules.memops = memops = MemOps(A)
        m.submodules.streamer = streamer = EngineStreamer(self.engine_params, A)
        clients = [memops, streamer]
        dispatch = {Op.LOAD: 0, Op.STORE: 0, Op.SCATTER: 0, Op.MARK: 0, Op.ENGINE: 1}
        for op, cls in sorted(self.unit_classes.items()):
            unit = cls(A)
            m.submodules[f"unit_{op.name.lower()}"] = unit
            dispatch[op] = len(clients)
            clients.append(unit)
        m.submodules.ctrl = ctrl = Controller(self.engine_params, A, dispatch, len(clients))

        # ---- dispatch: start pulse, held instruction, busy and error of the selected client ----
        busy = Signal(len(clients))
        for i, c in enumerate(clients):
            m.d.comb += [c.start.eq(ctrl.go & (ctrl.sel == i)), c.instr.eq(ctrl.instr), busy[i].eq(c.busy)]
        cerror = Signal(8)
        with m.Switch(ctrl.sel):
            for i, c in enumerate(clients):
                with m.Case(i):
                    m.d.comb += [ctrl.cbusy.eq(c.busy)]
                    if hasattr(c, "error"):
                        m.d.comb += cerror.eq(c.error)
        # a memory error response (sticky until the next start) ends the machine at the end of the
        # instruction it came in, and is the error reported (the root cause) whatever the decode did
        mem_err = Signal(8)
        with m.If(self.start):
            m.d.sync += mem_err.eq(0)
        with m.Elif(mem_err == 0):
            if "mem_rd_fault" in self.signature.members:
                with m.If(self.mem_rd_fault):
                    m.d.sync += mem_err.eq(AccelError.MEM_READ)
            with m.If(self.mem_wr.resp.valid & self.mem_wr.resp.ready & (self.mem_wr.resp.payload != 0)):
                m.d.sync += mem_err.eq(AccelError.MEM_WRITE)
        m.d.comb += [ctrl.cerror.eq(Mux(mem_err != 0, mem_err, cerror)),
                     ctrl.start.eq(self.start), self.done.eq(ctrl.done),
                     self.error.eq(Mux(mem_err != 0, mem_err, ctrl.error)),
                     self.pc.eq(ctrl.pc), self.op.eq(ctrl.op), self.state.eq(ctrl.state)]

        # ---- scratchpad ----
        spad = Memory(shape=signed(SPAD_BITS), depth=A.spad_words, init=[])
        m.submodules.spad = spad
        r0, r1 = spad.read_port(domain="sync"), spad.read_port(domain="sync")
        wp = spad.write_port()
        m.submodules.spadmux = mux = SpadMux(ab, len(clients))
        m.d.comb += [mux.sel.eq(ctrl.sel), mux.active.eq(ctrl.running),
                     r0.addr.eq(mux.rd0.addr), r0.en.eq(mux.rd0.en), mux.rd0.data.eq(r0.data),
                     r1.addr.eq(mux.rd1.addr), r1.en.eq(mux.rd1.en), mux.rd1.data.eq(r1.data),
                     wp.addr.eq(mux.wr.addr), wp.data.eq(mux.wr.data), wp.en.eq(mux.wr.en)]
        for i, c in enumerate(clients):
            wiring.connect(m, c.rd0, getattr(mux, f"c{i}_rd0"))
            wiring.connect(m, c.rd1, getattr(mux, f"c{i}_rd1"))
            wiring.connect(m, c.wr, getattr(mux, f"c{i}_wr"))

        # ---- memory: read port 0 shared by fetch, MemOps and the engine's weights ----
        wide = A.weight_lanes > 1
        m.submodules.rd0mux = rmux = ReadPortMux(A.mem_word_bits, 2 if wide else 3)
        owner = Signal(2)
        m.d.comb += owner.eq(Mux(ctrl.fetching, 0, 1) if wide else Mux(ctrl.fetching, 0, Mux(ctrl.sel == 0, 1, 2)))
        m.d.comb += rmux.sel.eq(owner)
        wiring.connect(m, ctrl.mrd, rmux.m0)
        wiring.connect(m, memops.mrd, rmux.m1)
        if wide:
            wiring.connect(m, streamer.wrd, wiring.flipped(self.mem_rdw))
        else:
            wiring.connect(m, streamer.wrd, rmux.m2)
        wiring.connect(m, rmux.port, wiring.flipped(self.mem_rd0))
        m.submodules.rd1arb = arb = ReadPortArbiter(A.mem_word_bits, 2)
        wiring.connect(m, ctrl.mpf, arb.m0)
        wiring.connect(m, streamer.srd, arb.m1)
        wiring.connect(m, arb.port, wiring.flipped(self.mem_rd1))
        wiring.connect(m, memops.mwr, wiring.flipped(self.mem_wr))
        m.d.comb += memops.cycles.eq(self.cycles)

        # ---- engine streams ----
        for name in ("cmd", "act", "weight", "scale", "rq"):
            wiring.connect(m, getattr(streamer, name), getattr(engine, name))
        wiring.connect(m, engine.out, streamer.out)

        # ---- cycle counter and progress ----
        with m.If(self.start):
            m.d.sync += self.cycles.eq(0)
        with m.Elif(ctrl.running):
            m.d.sync += self.cycles.eq(self.cycles + 1)
        chans = [self.mem_rd0.req, self.mem_rd0.data, self.mem_rd1.req, self.mem_rd1.data, self.mem_wr.req,
                 self.mem_wr.resp]
        if wide:
            chans += [self.mem_rdw.req, self.mem_rdw.data]
        fires = [p.valid & p.ready for p in chans]
        fires += [getattr(engine, s).valid & getattr(engine, s).ready for s in ("cmd", "act", "weight",
                                                                                   "scale", "rq", "out")]
        fires += [mux.rd0.en, mux.rd1.en, mux.wr.en, ctrl.go]
        m.d.comb += self.progress.eq(Cat(*fires).any())
        return m


class AxiAccelerator(Elaboratable):
    """The accelerator with AXI4 master ports (``hw/axi.py``; docs/isa.md, "Memory system"): the word
    address space striped over ``accel.mem_ports`` ports ``m_axi_mem<p>`` (read port 0 — fetch, LOAD,
    SCATTER, the weights — and the write port: ``stripe_map``), and one more read-only port
    ``m_axi_aux`` for read port 1 (the prefetch and the scales) that reaches every channel. The AXI
    space is flat: port p's channel at byte ``p * mem_channel_bytes`` (HBM pseudo-channel p on the U280);
    every port may address all of it. Plain signals with the flat names Vitis and cocotbext-axi expect
    (``m_axi_mem0_araddr`` ...), ``start`` (in, a pulse), ``done``, ``error`` (``AccelError``; 7/8 for an
    RRESP/BRESP error), ``cycles``, ``pc``, ``op``, ``progress``; ``clk``/``rst`` from the sync domain."""

    def __init__(self, engine: EngineParams, accel: AccelParams, units=None, addr_width: int = 64):
        from .axi import memory_buses
        self.engine_params, self.accel = engine, accel
        self.core = Accelerator(engine, accel, units, read_fault=True)
        self.buses = memory_buses(accel, addr_width)
        self.port_names = list(self.buses)
        self.start, self.done, self.error = Signal(name="start"), Signal(name="done"), Signal(8, name="error")
        self.cycles, self.pc = Signal(64, name="cycles"), Signal(32, name="pc")
        self.op, self.progress = Signal(8, name="op"), Signal(name="progress")
        self.activity = Signal(32, name="activity")  # cycles with progress: a testbench's cheap watchdog

    @property
    def ports(self) -> list:
        out = [self.start, self.done, self.error, self.cycles, self.pc, self.op, self.progress, self.activity]
        for n in self.port_names:
            out += list(self.buses[n].values())
        return out

    def elaborate(self, platform):
        from .axi import AxiMemorySystem
        m = Module()
        m.submodules.core = core = self.core
        m.submodules.memsys = ms = AxiMemorySystem(self.accel, buses=self.buses)
        wiring.connect(m, core.mem_rd0, ms.rd0)
        wiring.connect(m, core.mem_rd1, ms.rd1)
        wiring.connect(m, core.mem_wr, ms.wr)
        if self.accel.weight_lanes > 1:
            wiring.connect(m, core.mem_rdw, ms.rdw)
        m.d.comb += [core.mem_rd_fault.eq(ms.read_fault), core.start.eq(self.start),
                     self.done.eq(core.done), self.error.eq(core.error), self.cycles.eq(core.cycles),
                     self.pc.eq(core.pc), self.op.eq(core.op), self.progress.eq(core.progress)]
        with m.If(core.progress):
            m.d.sync += self.activity.eq(self.activity + 1)
        return m
