"""AXI4 master ports for the accelerator's memory system (``docs/isa.md``, "Memory system"; issue 12,
item 3), each component with its behavioural model beside it:

* ``AxiReadAdapter`` — one ``hw.memory`` read port (jobs of ``count`` words) as an AXI4 AR/R master:
  a job becomes INCR bursts of full-width beats, split at every 4 KiB boundary (AXI4 forbids a burst to
  cross one: IHI 0022, A3.4.1) and at ``max_burst`` beats (AXI4 INCR: at most 256); at most
  ``outstanding`` bursts in flight, one ARID; R beats are passed through in order; a beat with RRESP
  other than OKAY pulses ``error``. Model: ``read_bursts``.
* ``AxiWriteAdapter`` — one ``hw.memory`` write port (one word per request) as AW/W/B: each word a
  single-beat burst (AWLEN 0, its strobes as WSTRB), AW and W offered together, at most ``outstanding``
  writes unanswered; every B beat is the port's response (BRESP as ``resp.payload``, so a SLVERR or
  DECERR reaches the accelerator, which stops with ``AccelError.MEM_WRITE``). Model: ``write_beats``.
* ``ReadStriper`` / ``WriteStriper`` — the accelerator's word address space striped over
  ``AccelParams.mem_ports`` AXI ports: ``stripe_words`` consecutive words on port 0, the next on port 1,
  ... (``stripe_map``: the address mapping, one place), so one long read (a layer's weight tiles)
  streams from every port at once; a read job becomes per-stripe chunks issued to their ports and the
  data merged back in job order; a write goes to its word's port and the responses come back in order.
  Model: ``stripe_chunks``.
* ``WideReadStriper`` — a wide read port (``hw.memory.MemWideReadSignature``, the engine's weight
  stream when ``AccelParams.weight_lanes`` > 1) over the ``mem_ports`` ports with one-word stripes: a job
  becomes one contiguous job per port (its words on that port, ``wide_port_jobs``), each port's words
  wait in their own small FIFO (per-port back-pressure: a stalled port holds only its own R channel),
  and every cycle the next ``min(ports, beat left, job left)`` words leave together, in job order, one
  from each port (``hw.memory.wide_transfers``).

The flat AXI signal names (``<prefix>_araddr`` ...) are those Vivado's interface inference, Vitis'
``package_xo`` and cocotbext-axi's ``AxiBus.from_prefix`` expect; ``bitstream/axi.py`` imports
``axi_master_ports`` from here.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2, exact_log2

from .memory import MemReadSignature, MemWideReadSignature, MemWriteSignature

__all__ = ["BOUNDARY", "AXI4_MAX_BURST", "RESP_OKAY", "RESP_SLVERR", "RESP_DECERR", "axi_master_ports",
           "MASTER_OUTPUTS", "read_bursts", "write_beats", "stripe_map", "stripe_chunks", "AxiReadAdapter",
           "AxiWriteAdapter", "ReadStriper", "WriteStriper", "idle_read_channels", "idle_write_channels",
           "AxiMemorySystem", "memory_buses", "port_names",
           "wide_port_jobs", "WideReadStriper"]

BOUNDARY = 4096          # bytes: no AXI4 burst crosses one (IHI 0022 E, A3.4.1)
AXI4_MAX_BURST = 256     # beats of an AXI4 INCR burst (AxLEN is 8 bits, A3.4.1)
RESP_OKAY, RESP_EXOKAY, RESP_SLVERR, RESP_DECERR = 0, 1, 2, 3
BURST_INCR = 1


def _sig(prefix: str, name: str, width: int) -> Signal:
    return Signal(width, name=f"{prefix}_{name}")


def axi_master_ports(prefix: str, data_width: int, addr_width: int, id_width: int = 1,
                     len_width: int = 8) -> dict[str, Signal]:
    """The signals of one AXI4 master port, keyed by lower-case channel name (``araddr``...); outputs of
    the master and inputs alike (the direction is the AXI spec's)."""
    spec = {
        "awvalid": 1, "awready": 1, "awaddr": addr_width, "awlen": len_width, "awsize": 3, "awburst": 2,
        "awid": id_width,
        "wvalid": 1, "wready": 1, "wdata": data_width, "wstrb": data_width // 8, "wlast": 1,
        "bvalid": 1, "bready": 1, "bresp": 2, "bid": id_width,
        "arvalid": 1, "arready": 1, "araddr": addr_width, "arlen": len_width, "arsize": 3, "arburst": 2,
        "arid": id_width,
        "rvalid": 1, "rready": 1, "rdata": data_width, "rresp": 2, "rlast": 1, "rid": id_width,
    }
    return {k: _sig(prefix, k, w) for k, w in spec.items()}


MASTER_OUTPUTS = {"awvalid", "awaddr", "awlen", "awsize", "awburst", "awid", "wvalid", "wdata", "wstrb",
                  "wlast", "bready", "arvalid", "araddr", "arlen", "arsize", "arburst", "arid", "rready"}


def idle_read_channels(m: Module, bus: dict, size: int):
    """AR/R of a master that never reads: every output driven (an undriven one would become an input)."""
    m.d.comb += [bus["arvalid"].eq(0), bus["rready"].eq(1), bus["arburst"].eq(BURST_INCR),
                 bus["arsize"].eq(size), bus["araddr"].eq(0), bus["arlen"].eq(0), bus["arid"].eq(0)]


def idle_write_channels(m: Module, bus: dict, size: int):
    """AW/W/B of a master that never writes."""
    m.d.comb += [bus["awvalid"].eq(0), bus["wvalid"].eq(0), bus["bready"].eq(1), bus["awburst"].eq(BURST_INCR),
                 bus["awsize"].eq(size), bus["awaddr"].eq(0), bus["awlen"].eq(0), bus["awid"].eq(0),
                 bus["wdata"].eq(0), bus["wstrb"].eq(0), bus["wlast"].eq(0)]


# ---------------------------------------------------------------------------------------------------
# behavioural models
# ---------------------------------------------------------------------------------------------------
def read_bursts(word_addr: int, count: int, word_bits: int, max_burst: int = AXI4_MAX_BURST,
                base: int = 0) -> list[tuple[int, int]]:
    """The AR bursts ``AxiReadAdapter`` issues for one job, in order: (ARADDR in bytes, beats = ARLEN + 1).
    Each is as long as the job, ``max_burst`` and the next 4 KiB boundary allow."""
    nb = word_bits // 8
    out, addr, left = [], base + word_addr * nb, count
    while left:
        n = min(left, max_burst, (BOUNDARY - addr % BOUNDARY) // nb)
        out.append((addr, n))
        addr, left = addr + n * nb, left - n
    return out


def write_beats(word_addr: int, data: int, strb: int, word_bits: int, base: int = 0) -> list[tuple]:
    """What ``AxiWriteAdapter`` sends for one write request: [(AWADDR, AWLEN, WDATA, WSTRB, WLAST)]."""
    return [(base + word_addr * (word_bits // 8), 0, data, strb, 1)]


def stripe_map(word: int, ports: int, stripe_words: int, channel_words: int) -> tuple[int, int]:
    """Where accelerator word ``word`` lives: (port, word address in the AXI space). Stripe
    ``s = word // stripe_words`` is on port ``s % ports``, at local word ``(s // ports) * stripe_words +
    word % stripe_words`` of that port's channel, which starts at word ``port * channel_words`` of the
    flat AXI address space (the U280's HBM: pseudo-channel p at byte p * 256 MiB). With one port: the
    identity."""
    s = word // stripe_words
    p = s % ports
    local = (s // ports) * stripe_words + word % stripe_words
    if local >= channel_words:
        raise ValueError(f"word {word}: local word {local} beyond the channel's {channel_words} words "
                         f"(AccelParams.mem_channel_bytes too small for the image)")
    return p, p * channel_words + local


def stripe_chunks(word_addr: int, count: int, ports: int, stripe_words: int,
                  channel_words: int) -> list[tuple[int, int, int]]:
    """The per-port jobs ``ReadStriper`` issues for one read job, in order: (port, AXI word, words).
    One port: the job itself (``AxiMemorySystem`` has no striper then)."""
    if ports == 1:
        return [(0, stripe_map(word_addr + count - 1, 1, stripe_words, channel_words)[1] - count + 1, count)]
    out, a, left = [], word_addr, count
    while left:
        n = min(left, stripe_words - a % stripe_words)
        p, w = stripe_map(a, ports, stripe_words, channel_words)
        out.append((p, w, n))
        a, left = a + n, left - n
    return out


def wide_port_jobs(word_addr: int, count: int, ports: int, channel_words: int) -> list[tuple[int, int, int]]:
    """The per-port jobs ``WideReadStriper`` issues for one wide job (one-word stripes), by port:
    (port, AXI word, words). Port p holds the job's words ``a + d, a + d + ports, ...`` with
    ``d = (p - a) % ports``: local words ``(a + d) // ports ..``, contiguous; a port with none is left out."""
    out = []
    for p in range(ports):
        d = (p - word_addr) % ports
        n = (count + ports - 1 - d) // ports
        if n:
            first = word_addr + d
            out.append((p, stripe_map(first, ports, 1, channel_words)[1], n))
            stripe_map(first + (n - 1) * ports, ports, 1, channel_words)  # the last word fits the channel
    return out


# ---------------------------------------------------------------------------------------------------
# AXI4 adapters
# ---------------------------------------------------------------------------------------------------
class AxiReadAdapter(wiring.Component):
    """``mem`` (a ``hw.memory`` read port, the accelerator side) -> the AR/R channels of ``bus``
    (``axi_master_ports(prefix, ...)``). ``mem.req.addr`` is a word address of the AXI space (byte
    address ``base + addr * W/8``, ``base`` a constant). The adapter takes a new job once the previous
    one's bursts are all issued; ``error`` pulses with every R beat whose RRESP is not OKAY."""

    def __init__(self, word_bits: int, prefix: str, *, addr_width: int = 64, id_width: int = 1, arid: int = 0,
                 max_burst: int = AXI4_MAX_BURST, outstanding: int = 8, base: int = 0, bus: dict | None = None):
        if not 1 <= max_burst <= AXI4_MAX_BURST:
            raise ValueError(f"max_burst {max_burst}: AXI4 INCR bursts are 1..{AXI4_MAX_BURST} beats")
        if outstanding < 1:
            raise ValueError(f"outstanding {outstanding}: at least one burst must be allowed in flight")
        self.W, self.max_burst, self.outstanding, self.arid, self.base = word_bits, max_burst, outstanding, arid, base
        self.bus = bus if bus is not None else axi_master_ports(prefix, word_bits, addr_width, id_width)
        super().__init__({"mem": In(MemReadSignature(word_bits)), "error": Out(1)})

    def elaborate(self, platform):
        m = Module()
        b, mem = self.bus, self.mem
        lgB = exact_log2(self.W // 8)
        bnd_beats = BOUNDARY >> lgB
        cur = Signal(32)       # next word to request
        left = Signal(32)      # words of the job not yet requested
        active = Signal()
        inflight = Signal(range(self.outstanding + 1))
        to_bnd = Signal(range(bnd_beats + 1))
        blen = Signal(range(AXI4_MAX_BURST + 1))
        m.d.comb += to_bnd.eq(bnd_beats - cur[:ceil_log2(bnd_beats)] if bnd_beats > 1 else 1)
        lim = Signal(range(AXI4_MAX_BURST + 1))
        m.d.comb += lim.eq(Mux(to_bnd < self.max_burst, to_bnd, self.max_burst))
        m.d.comb += blen.eq(Mux(left < lim, left, lim))
        m.d.comb += [b["arvalid"].eq(active & (inflight < self.outstanding)),
                     b["araddr"].eq(self.base + (cur << lgB)), b["arlen"].eq(blen - 1), b["arsize"].eq(lgB),
                     b["arburst"].eq(BURST_INCR), b["arid"].eq(self.arid),
                     mem.req.ready.eq(~active)]
        ar_fire = b["arvalid"] & b["arready"]
        with m.If(mem.req.valid & mem.req.ready):
            m.d.sync += [cur.eq(mem.req.payload.addr), left.eq(mem.req.payload.count),
                         active.eq(mem.req.payload.count != 0)]
        with m.If(ar_fire):
            m.d.sync += [cur.eq(cur + blen), left.eq(left - blen), active.eq(left != blen)]
        r_fire = b["rvalid"] & b["rready"]
        m.d.comb += [mem.data.valid.eq(b["rvalid"]), mem.data.payload.eq(b["rdata"]),
                     b["rready"].eq(mem.data.ready),
                     self.error.eq(r_fire & (b["rresp"] != RESP_OKAY))]
        m.d.sync += inflight.eq(inflight + ar_fire - (r_fire & b["rlast"]))
        return m


class AxiWriteAdapter(wiring.Component):
    """``mem`` (a ``hw.memory`` write port) -> the AW/W/B channels of ``bus``: each request one
    single-beat burst at byte ``base + addr * W/8``, AW and W offered together (W never before its AW
    is offered), the request taken once both are accepted; at most ``outstanding`` writes unanswered;
    B beats are ``mem.resp`` (payload BRESP). ``error`` pulses with a B beat that is not OKAY."""

    def __init__(self, word_bits: int, prefix: str, *, addr_width: int = 64, id_width: int = 1, awid: int = 0,
                 outstanding: int = 8, base: int = 0, bus: dict | None = None):
        if outstanding < 1:
            raise ValueError(f"outstanding {outstanding}: at least one write must be allowed in flight")
        self.W, self.outstanding, self.awid, self.base = word_bits, outstanding, awid, base
        self.bus = bus if bus is not None else axi_master_ports(prefix, word_bits, addr_width, id_width)
        super().__init__({"mem": In(MemWriteSignature(word_bits)), "error": Out(1)})

    def elaborate(self, platform):
        m = Module()
        b, mem = self.bus, self.mem
        lgB = exact_log2(self.W // 8)
        aw_sent, w_sent = Signal(), Signal()
        unanswered = Signal(range(self.outstanding + 1))
        room = unanswered < self.outstanding
        m.d.comb += [b["awvalid"].eq(mem.req.valid & ~aw_sent & room),
                     b["awaddr"].eq(self.base + (mem.req.payload.addr << lgB)), b["awlen"].eq(0),
                     b["awsize"].eq(lgB), b["awburst"].eq(BURST_INCR), b["awid"].eq(self.awid),
                     b["wvalid"].eq(mem.req.valid & ~w_sent & (aw_sent | room)),
                     b["wdata"].eq(mem.req.payload.data), b["wstrb"].eq(mem.req.payload.strb), b["wlast"].eq(1)]
        aw_fire = b["awvalid"] & b["awready"]
        w_fire = b["wvalid"] & b["wready"]
        m.d.comb += mem.req.ready.eq((aw_sent | aw_fire) & (w_sent | w_fire))
        with m.If(mem.req.valid & mem.req.ready):
            m.d.sync += [aw_sent.eq(0), w_sent.eq(0)]
        with m.Else():
            with m.If(aw_fire):
                m.d.sync += aw_sent.eq(1)
            with m.If(w_fire):
                m.d.sync += w_sent.eq(1)
        b_fire = b["bvalid"] & b["bready"]
        m.d.comb += [mem.resp.valid.eq(b["bvalid"]), mem.resp.payload.eq(b["bresp"]),
                     b["bready"].eq(mem.resp.ready), self.error.eq(b_fire & (b["bresp"] != RESP_OKAY))]
        m.d.sync += unanswered.eq(unanswered + aw_fire - b_fire)
        return m


# ---------------------------------------------------------------------------------------------------
# striping over ports
# ---------------------------------------------------------------------------------------------------
class _StripeGeometry:
    def __init__(self, ports: int, stripe_words: int, channel_words: int):
        for name, v in (("ports", ports), ("stripe_words", stripe_words), ("channel_words", channel_words)):
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name} {v}: must be a power of two")
        self.ports, self.stripe_words, self.channel_words = ports, stripe_words, channel_words
        self.lgN, self.lgS, self.lgC = exact_log2(ports), exact_log2(stripe_words), exact_log2(channel_words)

    def map(self, m: Module, word, name: str):
        """(port, AXI word) of accelerator word ``word``, as ``stripe_map`` says."""
        port = Signal(range(max(2, self.ports)), name=f"{name}_port")
        axi = Signal(40, name=f"{name}_axi")
        s = word >> self.lgS
        m.d.comb += port.eq(s[:self.lgN] if self.lgN else 0)
        local = Cat(word[:self.lgS], s >> self.lgN) if self.lgS else (s >> self.lgN)
        m.d.comb += axi.eq(local | (port << self.lgC))
        return port, axi


class ReadStriper(wiring.Component):
    """``mem`` (the accelerator's read port) -> ``out0`` .. ``out{outputs-1}``: a job is cut into the
    chunks ``stripe_chunks`` lists; chunk on port p goes to ``out{p % outputs}`` (``outputs`` is
    ``ports`` for the data ports, 1 for a port that reaches every channel) and the data are merged back
    in job order: a queue of the issued chunks (output, words), ``depth`` deep, says which output the
    next words come from. Each output's data are only its own chunks', in order, so the merge cannot
    deadlock."""

    def __init__(self, word_bits: int, ports: int, stripe_words: int, channel_words: int, outputs: int | None = None,
                 depth: int = 8):
        self.g = _StripeGeometry(ports, stripe_words, channel_words)
        self.outputs = ports if outputs is None else outputs
        if self.outputs not in (1, ports):
            raise ValueError(f"outputs {self.outputs}: 1 or ports = {ports}")
        self.depth = depth
        members = {"mem": In(MemReadSignature(word_bits))}
        for i in range(self.outputs):
            members[f"out{i}"] = Out(MemReadSignature(word_bits))
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        g, mem, S = self.g, self.mem, self.g.stripe_words
        outs = [getattr(self, f"out{i}") for i in range(self.outputs)]
        cur, left, active = Signal(32), Signal(32), Signal()
        n = Signal(range(S + 1))
        off = cur[:g.lgS] if g.lgS else Const(0, 1)
        room = Signal(range(S + 1))
        m.d.comb += room.eq(S - off)
        m.d.comb += n.eq(Mux(left < room, left, room))
        port, axi = g.map(m, cur, "rs")
        o = port if self.outputs > 1 else Const(0, 1)
        ow = max(1, ceil_log2(self.outputs))
        m.submodules.order = order = SyncFIFO(width=ow + len(n), depth=self.depth)
        fire = Signal()
        for i, out in enumerate(outs):
            sel = o == i
            m.d.comb += [out.req.valid.eq(active & order.w_rdy & sel), out.req.payload.addr.eq(axi),
                         out.req.payload.count.eq(n)]
            with m.If(sel & out.req.valid & out.req.ready):
                m.d.comb += fire.eq(1)
        m.d.comb += [order.w_en.eq(fire), order.w_data.eq(Cat(o[:ow], n)), mem.req.ready.eq(~active)]
        with m.If(mem.req.valid & mem.req.ready):
            m.d.sync += [cur.eq(mem.req.payload.addr), left.eq(mem.req.payload.count),
                         active.eq(mem.req.payload.count != 0)]
        with m.If(fire):
            m.d.sync += [cur.eq(cur + n), left.eq(left - n), active.eq(left != n)]
        # merge
        head_o, head_n = order.r_data[:ow], order.r_data[ow:]
        taken = Signal(range(S + 1))
        dfire = Signal()
        for i, out in enumerate(outs):
            with m.If(order.r_rdy & (head_o == i)):
                m.d.comb += [mem.data.valid.eq(out.data.valid), mem.data.payload.eq(out.data.payload),
                             out.data.ready.eq(mem.data.ready), dfire.eq(out.data.valid & mem.data.ready)]
        last = taken + 1 == head_n
        with m.If(dfire):
            m.d.sync += taken.eq(Mux(last, 0, taken + 1))
        m.d.comb += order.r_en.eq(dfire & last)
        return m


class WideReadStriper(wiring.Component):
    """``mem`` (a wide read port, ``ports`` lanes) -> ``out0`` .. ``out{ports-1}`` (``hw.memory`` read
    ports), one-word stripes (word a on port ``a % ports``, ``stripe_map`` with ``stripe_words`` 1).
    A job is accepted once the previous one's port jobs are all issued and the job queue (``depth``) has
    room; each port gets one job of its words (``wide_port_jobs``). Each port's data go into its own
    FIFO (``skid`` words); a transfer of ``n = min(ports, beat left, job left)`` words leaves when the n
    ports holding them (from port ``(a + j) % ports`` on) all have a word, lane i from port
    ``(a + j + i) % ports``."""

    def __init__(self, word_bits: int, ports: int, channel_words: int, depth: int = 4, skid: int = 2):
        self.g = _StripeGeometry(ports, 1, channel_words)
        if ports < 2:
            raise ValueError(f"ports {ports}: a wide read over one port is that port (use hw.memory.BeatGather)")
        self.W, self.depth, self.skid = word_bits, depth, skid
        members = {"mem": In(MemWideReadSignature(word_bits, ports))}
        for i in range(ports):
            members[f"out{i}"] = Out(MemReadSignature(word_bits))
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        g, mem, W = self.g, self.mem, self.W
        P, lgP = g.ports, g.lgN
        outs = [getattr(self, f"out{i}") for i in range(P)]
        # ---- issue: one job per port ----
        a, c = Signal(32), Signal(32)
        active = Signal()
        sent = Signal(P)
        m.submodules.order = order = SyncFIFO(width=lgP + 32 + 16, depth=self.depth)
        m.d.comb += [mem.req.ready.eq(~active & order.w_rdy), order.w_en.eq(mem.req.valid & mem.req.ready),
                     order.w_data.eq(Cat(mem.req.payload.addr[:lgP], mem.req.payload.count, mem.req.payload.beat))]
        with m.If(mem.req.valid & mem.req.ready):
            m.d.sync += [a.eq(mem.req.payload.addr), c.eq(mem.req.payload.count), sent.eq(0),
                         active.eq(mem.req.payload.count != 0)]
        done_p = []
        for p, out in enumerate(outs):
            d = Signal(lgP, name=f"d{p}")
            n_p = Signal(32, name=f"n{p}")
            first = Signal(32, name=f"first{p}")
            m.d.comb += [d.eq(p - a[:lgP]), n_p.eq((c + (P - 1) - d) >> lgP), first.eq(a + d)]
            m.d.comb += [out.req.valid.eq(active & ~sent[p] & (n_p != 0)),
                         out.req.payload.addr.eq((first >> lgP) | (p << g.lgC)), out.req.payload.count.eq(n_p)]
            with m.If(out.req.valid & out.req.ready):
                m.d.sync += sent[p].eq(1)
            done_p.append(sent[p] | (n_p == 0) | (out.req.valid & out.req.ready))
        with m.If(active & Cat(*done_p).all()):
            m.d.sync += active.eq(0)
        # ---- per-port FIFOs ----
        fifos = []
        for p, out in enumerate(outs):
            m.submodules[f"skid{p}"] = f = SyncFIFO(width=W, depth=self.skid)
            m.d.comb += [f.w_en.eq(out.data.valid), f.w_data.eq(out.data.payload), out.data.ready.eq(f.w_rdy)]
            fifos.append(f)
        # ---- merge: the head job's next transfer ----
        h0, cnt, beat = order.r_data[:lgP], order.r_data[lgP:lgP + 32], order.r_data[lgP + 32:]
        j, k = Signal(32), Signal(16)
        h = Signal(lgP)
        m.d.comb += h.eq(h0 + j[:lgP])
        n = Signal(range(P + 1))
        left_b, left_j = Signal(16), Signal(32)
        m.d.comb += [left_b.eq(beat - k), left_j.eq(cnt - j)]
        m.d.comb += n.eq(Mux((left_b < P) & (left_b <= left_j), left_b, Mux(left_j < P, left_j, P)))
        need, ok = [], []
        for p, f in enumerate(fifos):
            rel = Signal(lgP, name=f"rel{p}")
            m.d.comb += rel.eq(p - h)
            nd = Signal(name=f"need{p}")
            m.d.comb += nd.eq(rel < n)
            need.append(nd)
            ok.append(~nd | f.r_rdy)
        valid = Signal()
        m.d.comb += valid.eq(order.r_rdy & Cat(*ok).all())
        fire = valid & mem.data.ready
        allw = Cat(*[f.r_data for f in fifos])
        rot = Signal(W * P)
        with m.Switch(h):
            for r in range(P):
                with m.Case(r):
                    m.d.comb += rot.eq(Cat(allw[r * W:], allw[:r * W]) if r else allw)
        m.d.comb += [mem.data.valid.eq(valid), mem.data.payload.words.eq(rot), mem.data.payload.n.eq(n)]
        for p, f in enumerate(fifos):
            m.d.comb += f.r_en.eq(fire & need[p])
        with m.If(fire):
            with m.If(j + n == cnt):
                m.d.sync += [j.eq(0), k.eq(0)]
            with m.Else():
                m.d.sync += [j.eq(j + n), k.eq(Mux(k + n == beat, 0, k + n))]
        m.d.comb += order.r_en.eq(fire & (j + n == cnt))
        return m


class WriteStriper(wiring.Component):
    """``mem`` (the accelerator's write port) -> ``out0`` .. ``out{ports-1}``: each write to its word's
    port (``stripe_map``), the responses returned in request order (a queue of ports, ``depth`` deep:
    at most that many writes unanswered)."""

    def __init__(self, word_bits: int, ports: int, stripe_words: int, channel_words: int, depth: int = 16):
        self.g = _StripeGeometry(ports, stripe_words, channel_words)
        self.depth = depth
        members = {"mem": In(MemWriteSignature(word_bits))}
        for i in range(ports):
            members[f"out{i}"] = Out(MemWriteSignature(word_bits))
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        g, mem = self.g, self.mem
        outs = [getattr(self, f"out{i}") for i in range(g.ports)]
        port, axi = g.map(m, mem.req.payload.addr, "ws")
        pw = max(1, g.lgN)
        m.submodules.order = order = SyncFIFO(width=pw, depth=self.depth)
        fire = Signal()
        for i, out in enumerate(outs):
            sel = port == i
            m.d.comb += [out.req.valid.eq(mem.req.valid & order.w_rdy & sel), out.req.payload.addr.eq(axi),
                         out.req.payload.data.eq(mem.req.payload.data), out.req.payload.strb.eq(mem.req.payload.strb)]
            with m.If(sel):
                m.d.comb += [mem.req.ready.eq(out.req.ready & order.w_rdy),
                             fire.eq(out.req.valid & out.req.ready)]
        m.d.comb += [order.w_en.eq(fire), order.w_data.eq(port[:pw])]
        for i, out in enumerate(outs):
            with m.If(order.r_rdy & (order.r_data == i)):
                m.d.comb += [mem.resp.valid.eq(out.resp.valid), mem.resp.payload.eq(out.resp.payload),
                             out.resp.ready.eq(mem.resp.ready), order.r_en.eq(out.resp.valid & mem.resp.ready)]
        return m


# ---------------------------------------------------------------------------------------------------
# the accelerator's memory system on AXI
# ---------------------------------------------------------------------------------------------------
def port_names(accel) -> list[str]:
    """The AXI master ports of ``AxiMemorySystem``: ``mem0`` .. ``mem{N-1}`` and ``aux``."""
    return [f"mem{p}" for p in range(accel.mem_ports)] + ["aux"]


def memory_buses(accel, addr_width: int = 64) -> dict[str, dict[str, Signal]]:
    return {n: axi_master_ports(f"m_axi_{n}", accel.mem_word_bits, addr_width) for n in port_names(accel)}


def _gated(m: Module, outer, inner, allow):
    """``outer`` (a read port of the component, the accelerator side) to ``inner`` (a striper's), new
    jobs passed only while ``allow``; data passed through."""
    m.d.comb += [inner.req.valid.eq(outer.req.valid & allow), inner.req.payload.eq(outer.req.payload),
                 outer.req.ready.eq(inner.req.ready & allow), outer.data.valid.eq(inner.data.valid),
                 outer.data.payload.eq(inner.data.payload), inner.data.ready.eq(outer.data.ready)]


class AxiMemorySystem(wiring.Component):
    """The accelerator's three ``hw.memory`` ports on AXI4 masters (``AccelParams``: ``mem_ports``,
    ``mem_stripe_words``, ``mem_channel_bytes``, ``axi_max_burst``, ``axi_outstanding``): ``rd0`` and
    ``wr`` striped over ``m_axi_mem<p>`` (``stripe_map``), ``rd1`` on ``m_axi_aux`` through the same map;
    ``read_fault`` pulses with any read beat answered SLVERR/DECERR (a write's BRESP is ``wr.resp``'s
    payload). ``buses``: ``memory_buses(accel)``, made here when not given."""

    def __init__(self, accel, buses: dict | None = None, addr_width: int = 64):
        self.accel = accel
        W = accel.mem_word_bits
        self.buses = buses if buses is not None else memory_buses(accel, addr_width)
        members = {"rd0": In(MemReadSignature(W)), "rd1": In(MemReadSignature(W)),
                   "wr": In(MemWriteSignature(W)), "read_fault": Out(1)}
        if accel.weight_lanes > 1:
            if accel.weight_lanes != accel.mem_ports or accel.mem_stripe_words != 1:
                raise ValueError(f"AxiMemorySystem: weight_lanes {accel.weight_lanes} needs mem_ports = "
                                 f"weight_lanes and mem_stripe_words 1 (got mem_ports {accel.mem_ports}, "
                                 f"mem_stripe_words {accel.mem_stripe_words}): the wide weight read takes one "
                                 f"word from each port per cycle")
            members["rdw"] = In(MemWideReadSignature(W, accel.weight_lanes))
        super().__init__(members)

    @property
    def bus_ports(self) -> list:
        return [s for bus in self.buses.values() for s in bus.values()]

    def elaborate(self, platform):
        m = Module()
        A = self.accel
        W, N = A.mem_word_bits, A.mem_ports
        geo = (N, A.mem_stripe_words, A.mem_channel_words)
        kw = dict(outstanding=A.axi_outstanding)
        faults = []
        # read port 0 and the write port over the striped data ports
        if N == 1:
            rd0, wr = [wiring.flipped(self.rd0)], [wiring.flipped(self.wr)]
        else:
            m.submodules.rd0_stripe = rs = ReadStriper(W, *geo, depth=max(8, 2 * N))
            m.submodules.wr_stripe = ws = WriteStriper(W, *geo, depth=max(16, 2 * A.axi_outstanding))
            if A.weight_lanes > 1:
                # rd0 and the wide read share every port's R channel in job order, and each merges its
                # ports in its own order: both outstanding at once could deadlock (each waiting on a
                # port whose next word is the other's), so a job is taken only while the other has
                # none outstanding (the controller never overlaps them: no cycle is lost there)
                m.submodules.rdw_stripe = wsr = WideReadStriper(W, N, A.mem_channel_words)
                owed0, owedw = Signal(33), Signal(33)
                rq0, rqw = self.rd0.req.valid & self.rd0.req.ready, self.rdw.req.valid & self.rdw.req.ready
                d0, dw = self.rd0.data.valid & self.rd0.data.ready, self.rdw.data.valid & self.rdw.data.ready
                m.d.sync += [owed0.eq(owed0 + Mux(rq0, self.rd0.req.payload.count, 0) - d0),
                             owedw.eq(owedw + Mux(rqw, self.rdw.req.payload.count, 0)
                                      - Mux(dw, self.rdw.data.payload.n, 0))]
                _gated(m, self.rd0, rs.mem, owedw == 0)
                _gated(m, self.rdw, wsr.mem, (owed0 == 0) & ~self.rd0.req.valid)
            else:
                wiring.connect(m, wiring.flipped(self.rd0), rs.mem)
            wiring.connect(m, wiring.flipped(self.wr), ws.mem)
            rd0 = [getattr(rs, f"out{p}") for p in range(N)]
            wr = [getattr(ws, f"out{p}") for p in range(N)]
        if A.weight_lanes > 1:
            # the wide weight read on the same ports: each port's jobs from rd0 and the wide striper
            # through an arbiter (a queue of owners routes each R word back)
            from .accel import ReadPortArbiter
        for p in range(N):
            bus = self.buses[f"mem{p}"]
            m.submodules[f"rd_mem{p}"] = ra = AxiReadAdapter(W, f"m_axi_mem{p}", max_burst=A.axi_max_burst,
                                                             bus=bus, **kw)
            m.submodules[f"wr_mem{p}"] = wa = AxiWriteAdapter(W, f"m_axi_mem{p}", bus=bus, **kw)
            if A.weight_lanes > 1:
                m.submodules[f"rd_arb{p}"] = arb = ReadPortArbiter(W, 2)
                wiring.connect(m, rd0[p], arb.m0)
                wiring.connect(m, getattr(wsr, f"out{p}"), arb.m1)
                wiring.connect(m, arb.port, ra.mem)
            else:
                wiring.connect(m, rd0[p], ra.mem)
            wiring.connect(m, wr[p], wa.mem)
            faults.append(ra.error)
        # read port 1 on the auxiliary port, through the same address map
        bus = self.buses["aux"]
        m.submodules.rd_aux = xa = AxiReadAdapter(W, "m_axi_aux", max_burst=A.axi_max_burst, bus=bus, **kw)
        if N == 1:
            wiring.connect(m, wiring.flipped(self.rd1), xa.mem)
        else:
            m.submodules.rd1_stripe = xs = ReadStriper(W, *geo, outputs=1, depth=8)
            wiring.connect(m, wiring.flipped(self.rd1), xs.mem)
            wiring.connect(m, xs.out0, xa.mem)
        idle_write_channels(m, bus, exact_log2(W // 8))
        faults.append(xa.error)
        m.d.comb += self.read_fault.eq(Cat(*faults).any())
        return m
