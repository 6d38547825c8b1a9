"""AXI plumbing of the accelerator's kernel: an AXI4-Lite control slave with XRT's register map, AXI4
read masters that turn a buffer in memory into a stream, an AXI4 write master that turns a stream into a
buffer, and the gearboxes between bus words and the engine's (wider or narrower) stream payloads.

Everything is plain Amaranth with flat, explicitly named signals (``<prefix>_araddr`` ...), so the
Verilog ports carry the names Vivado's interface inference, Vitis' ``package_xo`` and cocotbext-axi's
``AxiBus.from_prefix`` expect.

Conventions (the host side must follow them; README, "bitstream/"):

* A buffer is ``beats`` bus words of ``data_width`` bits, little-endian: bit 0 of an engine payload is
  bit 0 of its first word; a payload of ``w`` bits takes ``ceil(w / data_width)`` words, the top of the
  last word is padding (zero when written by the kernel).
* Bursts are INCR, full width, at most ``MAX_BURST`` = 16 beats: the HBM controller's AXI3 ports take
  AWLEN/ARLEN of 4 bits (PG276, AXI port list: ``AXI_xx_ARLEN[3:0]``), so the same masters serve the
  Vivado project (straight to HBM) and the Vitis kernel. A buffer must start on a 4 KiB boundary (XRT
  allocates buffers so), and 16 x 32 bytes = 512 bytes never cross one.
* One transaction ID (0) per master, any number of outstanding bursts (the slave throttles with
  ARREADY/AWREADY); responses other than OKAY set the ``error`` flag, which the control slave shows.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Elaboratable, Module, Mux, Signal
from amaranth.utils import bits_for, ceil_log2

from hw.axi import MASTER_OUTPUTS, axi_master_ports  # noqa: F401  (one definition, shared with hw/)

__all__ = ["MAX_BURST", "AxiLiteControl", "AxiReader", "AxiWriter", "Unpack", "Pack", "axi_master_ports",
           "axi_lite_ports", "words_for", "REG_AP_CTRL", "REG_GIE", "REG_IER", "REG_ISR", "REG_ARGS"]

MAX_BURST = 16
# XRT's control register map for ap_ctrl_hs kernels (UG1393, "RTL Kernels: Control Requirements"):
REG_AP_CTRL, REG_GIE, REG_IER, REG_ISR, REG_ARGS = 0x00, 0x04, 0x08, 0x0C, 0x10


def words_for(payload_bits: int, data_width: int) -> int:
    """Bus words one engine payload takes."""
    return -(-payload_bits // data_width)


def _sig(prefix: str, name: str, width: int) -> Signal:
    return Signal(width, name=f"{prefix}_{name}")


def axi_lite_ports(prefix: str, addr_width: int = 12) -> dict[str, Signal]:
    spec = {"awvalid": 1, "awready": 1, "awaddr": addr_width, "wvalid": 1, "wready": 1, "wdata": 32,
            "wstrb": 4, "bvalid": 1, "bready": 1, "bresp": 2, "arvalid": 1, "arready": 1,
            "araddr": addr_width, "rvalid": 1, "rready": 1, "rdata": 32, "rresp": 2}
    return {k: _sig(prefix, k, w) for k, w in spec.items()}


LITE_SLAVE_OUTPUTS = {"awready", "wready", "bvalid", "bresp", "arready", "rvalid", "rdata", "rresp"}


class AxiLiteControl(Elaboratable):
    """XRT ``ap_ctrl_hs`` control slave: 0x00 ap_ctrl (bit 0 ap_start, set by the host, cleared when
    the kernel takes it; bit 1 ap_done, cleared when read; bit 2 ap_idle; bit 3 ap_ready), 0x04 global
    interrupt enable, 0x08 interrupt enable (bit 0: done), 0x0C interrupt status (bit 0, a write of 1
    toggles it), then the arguments from 0x10: ``args`` is a list of (name, bits), bits 32 or 64, laid
    out by ``arg_offsets`` (each at the next multiple of its own size). Reads of an unmapped address
    return 0. ``error`` (sticky until the next start) reads back as bit 4 of 0x00, a kernel-specific bit.
    ap_ready (bit 3) mirrors ap_done: the kernel takes new arguments once it has finished."""

    def __init__(self, args: list[tuple[str, int]], addr_width: int = 12, prefix: str = "s_axi_control"):
        self.addr_width = addr_width
        self.bus = axi_lite_ports(prefix, addr_width)
        self.offsets = arg_offsets(args)
        self.args = {name: Signal(bits, name=f"arg_{name}") for name, bits in args}
        self.start = Signal()      # one-cycle pulse: the kernel starts
        self.done = Signal()       # input, one-cycle pulse: the kernel finished
        self.idle = Signal()       # input
        self.error = Signal()      # input (sticky inside)
        self.interrupt = Signal()

    def elaborate(self, platform):
        m = Module()
        b = self.bus
        ap_start, ap_done, auto_restart = Signal(), Signal(), Signal()
        gie, ier, isr, err = Signal(), Signal(), Signal(), Signal()
        started = Signal()  # ap_start taken, kernel running

        # write: accept address and data together (one write in flight), respond OKAY
        aw_ok = Signal()
        m.d.comb += [aw_ok.eq(b["awvalid"] & b["wvalid"] & ~b["bvalid"]),
                     b["awready"].eq(aw_ok), b["wready"].eq(aw_ok), b["bresp"].eq(0)]
        with m.If(b["bvalid"] & b["bready"]):
            m.d.sync += b["bvalid"].eq(0)
        waddr = Signal(self.addr_width)
        m.d.comb += waddr.eq(b["awaddr"] & ~Const(3, self.addr_width))
        wdata = b["wdata"]
        wmask = Cat(*[b["wstrb"][i // 8] for i in range(32)])
        with m.If(aw_ok):
            m.d.sync += b["bvalid"].eq(1)
            with m.Switch(waddr):
                with m.Case(REG_AP_CTRL):
                    with m.If(b["wstrb"][0]):
                        with m.If(wdata[0]):
                            m.d.sync += ap_start.eq(1)
                        m.d.sync += auto_restart.eq(wdata[7])
                with m.Case(REG_GIE):
                    with m.If(b["wstrb"][0]):
                        m.d.sync += gie.eq(wdata[0])
                with m.Case(REG_IER):
                    with m.If(b["wstrb"][0]):
                        m.d.sync += ier.eq(wdata[0])
                with m.Case(REG_ISR):
                    with m.If(b["wstrb"][0] & wdata[0]):
                        m.d.sync += isr.eq(~isr)
                for name, (off, bits) in self.offsets.items():
                    reg = self.args[name]
                    for w in range(bits // 32):
                        with m.Case(off + 4 * w):
                            cur = reg[32 * w:32 * (w + 1)]
                            m.d.sync += cur.eq((cur & ~wmask) | (wdata & wmask))

        # read: one read in flight
        ar_ok = Signal()
        m.d.comb += [ar_ok.eq(b["arvalid"] & ~b["rvalid"]), b["arready"].eq(ar_ok), b["rresp"].eq(0)]
        with m.If(b["rvalid"] & b["rready"]):
            m.d.sync += b["rvalid"].eq(0)
        raddr = Signal(self.addr_width)
        m.d.comb += raddr.eq(b["araddr"] & ~Const(3, self.addr_width))
        clear_done = Signal()
        with m.If(ar_ok):
            m.d.sync += [b["rvalid"].eq(1), b["rdata"].eq(0)]
            with m.Switch(raddr):
                with m.Case(REG_AP_CTRL):
                    m.d.sync += b["rdata"].eq(Cat(ap_start, ap_done, ~started, ap_done, err, Const(0, 2),
                                                  auto_restart))
                    m.d.comb += clear_done.eq(1)
                with m.Case(REG_GIE):
                    m.d.sync += b["rdata"].eq(gie)
                with m.Case(REG_IER):
                    m.d.sync += b["rdata"].eq(ier)
                with m.Case(REG_ISR):
                    m.d.sync += b["rdata"].eq(isr)
                for name, (off, bits) in self.offsets.items():
                    reg = self.args[name]
                    for w in range(bits // 32):
                        with m.Case(off + 4 * w):
                            m.d.sync += b["rdata"].eq(reg[32 * w:32 * (w + 1)])

        # ap_start -> start pulse (the kernel takes it when idle), done -> ap_done until read
        m.d.comb += self.start.eq(ap_start & ~started & self.idle)
        with m.If(self.start):
            m.d.sync += [started.eq(1), err.eq(0)]
            with m.If(~auto_restart):
                m.d.sync += ap_start.eq(0)
        with m.If(self.error):
            m.d.sync += err.eq(1)
        with m.If(clear_done):
            m.d.sync += ap_done.eq(0)
        with m.If(self.done):
            m.d.sync += [ap_done.eq(1), started.eq(0)]
            with m.If(ier):
                m.d.sync += isr.eq(1)
        m.d.comb += self.interrupt.eq(gie & isr)
        return m


def arg_offsets(args: list[tuple[str, int]]) -> dict[str, tuple[int, int]]:
    """Register offset and width of each argument: from 0x10 on, each aligned to its own size."""
    out, off = {}, REG_ARGS
    for name, bits in args:
        if bits not in (32, 64):
            raise ValueError(f"argument {name}: {bits} bits, only 32 and 64 are supported")
        size = bits // 8
        off = -(-off // size) * size
        out[name] = (off, bits)
        off += size
    return out


class _AxiMaster(Elaboratable):
    """What the read and the write master share: the AXI4 master bus and the job interface (``start``,
    ``base``, ``beats``, ``busy``, ``error``) with the data stream ``data``/``valid``/``ready``."""

    def __init__(self, prefix: str, data_width: int = 256, addr_width: int = 64, beat_bits: int = 32,
                 len_width: int = 8):
        self.dw, self.aw = data_width, addr_width
        self.bus = axi_master_ports(prefix, data_width, addr_width, len_width=len_width)
        self.start = Signal()
        self.base = Signal(addr_width)
        self.beats = Signal(beat_bits)
        self.busy = Signal()
        self.error = Signal()
        self.data, self.valid, self.ready = Signal(data_width), Signal(), Signal()


class AxiReader(_AxiMaster):
    """AXI4 read master: on ``start`` reads ``beats`` words from ``base`` in INCR bursts of at most
    ``MAX_BURST`` beats and hands them out on ``data``/``valid``/``ready`` in order (R beats of one ID
    arrive in order). ``busy`` until every beat has been handed out; ``error`` pulses on a non-OKAY
    RRESP."""

    def elaborate(self, platform):
        m = Module()
        b = self.bus
        size = ceil_log2(self.dw // 8)
        addr = Signal(self.aw)
        ar_left = Signal.like(self.beats)   # beats not yet requested
        r_left = Signal.like(self.beats)    # beats not yet received
        burst = Signal(bits_for(MAX_BURST))
        m.d.comb += burst.eq(Mux(ar_left >= MAX_BURST, MAX_BURST, ar_left))
        m.d.comb += [b["arsize"].eq(size), b["arburst"].eq(1), b["arid"].eq(0), b["araddr"].eq(addr),
                     b["arlen"].eq(burst - 1), b["arvalid"].eq(ar_left != 0)]
        # the write channels of a read master: idle, every output driven (an undriven one would
        # become an input port)
        m.d.comb += [b["awvalid"].eq(0), b["wvalid"].eq(0), b["bready"].eq(1), b["awburst"].eq(1),
                     b["awsize"].eq(size), b["awaddr"].eq(0), b["awlen"].eq(0), b["awid"].eq(0),
                     b["wdata"].eq(0), b["wstrb"].eq(0), b["wlast"].eq(0)]
        with m.If(self.start):
            m.d.sync += [addr.eq(self.base), ar_left.eq(self.beats), r_left.eq(self.beats)]
        with m.Elif(b["arvalid"] & b["arready"]):
            m.d.sync += [addr.eq(addr + (burst << size)), ar_left.eq(ar_left - burst)]
        m.d.comb += [self.data.eq(b["rdata"]), self.valid.eq(b["rvalid"] & (r_left != 0)),
                     b["rready"].eq(self.ready & (r_left != 0)),
                     self.busy.eq(r_left != 0),
                     self.error.eq(b["rvalid"] & b["rready"] & (b["rresp"] != 0))]
        with m.If(b["rvalid"] & b["rready"] & ~self.start):
            m.d.sync += r_left.eq(r_left - 1)
        return m


class AxiWriter(_AxiMaster):
    """AXI4 write master: on ``start`` writes the next ``beats`` words of ``data``/``valid``/``ready`` to
    ``base`` in INCR bursts of at most ``MAX_BURST`` beats (full strobes); ``busy`` until every write
    response has come back; ``error`` pulses on a non-OKAY BRESP."""

    def elaborate(self, platform):
        m = Module()
        b = self.bus
        size = ceil_log2(self.dw // 8)
        addr = Signal(self.aw)
        aw_left = Signal.like(self.beats)   # beats whose address is not yet sent
        w_left = Signal.like(self.beats)    # data beats not yet sent
        b_left = Signal.like(self.beats)    # bursts whose response has not come back
        w_in_burst = Signal(bits_for(MAX_BURST))  # beats sent in the current burst
        this_aw = Signal(bits_for(MAX_BURST))
        m.d.comb += this_aw.eq(Mux(aw_left >= MAX_BURST, MAX_BURST, aw_left))
        m.d.comb += [b["awsize"].eq(size), b["awburst"].eq(1), b["awid"].eq(0), b["awaddr"].eq(addr),
                     b["awlen"].eq(this_aw - 1), b["awvalid"].eq(aw_left != 0)]
        m.d.comb += [b["arvalid"].eq(0), b["rready"].eq(1), b["arburst"].eq(1), b["arsize"].eq(size),
                     b["araddr"].eq(0), b["arlen"].eq(0), b["arid"].eq(0)]
        # the W side cuts the same bursts: the last beat of a burst is its 16th or the buffer's last
        last = Signal()
        m.d.comb += last.eq((w_in_burst == MAX_BURST - 1) | (w_left == 1))
        m.d.comb += [b["wdata"].eq(self.data), b["wstrb"].eq(Const(-1, self.dw // 8)), b["wlast"].eq(last),
                     b["wvalid"].eq(self.valid & (w_left != 0)), self.ready.eq(b["wready"] & (w_left != 0)),
                     b["bready"].eq(1),
                     self.busy.eq((w_left != 0) | (b_left != 0) | (aw_left != 0)),
                     self.error.eq(b["bvalid"] & (b["bresp"] != 0))]
        nbursts = (self.beats + (MAX_BURST - 1)) >> ceil_log2(MAX_BURST)
        with m.If(self.start):
            m.d.sync += [addr.eq(self.base), aw_left.eq(self.beats), w_left.eq(self.beats),
                         b_left.eq(nbursts), w_in_burst.eq(0)]
        with m.Else():
            with m.If(b["awvalid"] & b["awready"]):
                m.d.sync += [addr.eq(addr + (this_aw << size)), aw_left.eq(aw_left - this_aw)]
            with m.If(b["wvalid"] & b["wready"]):
                m.d.sync += [w_left.eq(w_left - 1), w_in_burst.eq(Mux(last, 0, w_in_burst + 1))]
            with m.If(b["bvalid"]):
                m.d.sync += b_left.eq(b_left - 1)
        return m


class Unpack(Elaboratable):
    """Bus words to payloads of ``width`` bits: collects ``words_for(width, data_width)`` words (the first
    is the low end) and offers the payload combinationally with the last one (no extra latency)."""

    def __init__(self, width: int, data_width: int = 256):
        self.width, self.dw = width, data_width
        self.k = words_for(width, data_width)
        self.i_data, self.i_valid, self.i_ready = Signal(data_width), Signal(), Signal()
        self.o_data, self.o_valid, self.o_ready = Signal(width), Signal(), Signal()

    def elaborate(self, platform):
        m = Module()
        k = self.k
        if k == 1:
            m.d.comb += [self.o_data.eq(self.i_data[:self.width]), self.o_valid.eq(self.i_valid),
                         self.i_ready.eq(self.o_ready)]
            return m
        held = [Signal(self.dw, name=f"held{j}") for j in range(k - 1)]
        n = Signal(range(k))
        at_last = n == k - 1
        m.d.comb += [self.o_data.eq(Cat(*held, self.i_data)[:self.width]),
                     self.o_valid.eq(self.i_valid & at_last),
                     self.i_ready.eq(~at_last | self.o_ready)]
        with m.If(self.i_valid & self.i_ready):
            m.d.sync += n.eq(Mux(at_last, 0, n + 1))
            with m.Switch(n):
                for j in range(k - 1):
                    with m.Case(j):
                        m.d.sync += held[j].eq(self.i_data)
        return m


class Pack(Elaboratable):
    """Payloads of ``width`` bits to bus words: one payload becomes ``words_for(width, data_width)``
    words, low end first, zero-padded; a payload is taken when its last word goes out."""

    def __init__(self, width: int, data_width: int = 256):
        self.width, self.dw = width, data_width
        self.k = words_for(width, data_width)
        self.i_data, self.i_valid, self.i_ready = Signal(width), Signal(), Signal()
        self.o_data, self.o_valid, self.o_ready = Signal(data_width), Signal(), Signal()

    def elaborate(self, platform):
        m = Module()
        k = self.k
        padded = Signal(k * self.dw)
        m.d.comb += padded.eq(self.i_data)
        if k == 1:
            m.d.comb += [self.o_data.eq(padded), self.o_valid.eq(self.i_valid), self.i_ready.eq(self.o_ready)]
            return m
        n = Signal(range(k))
        m.d.comb += [self.o_data.eq(padded.word_select(n, self.dw)), self.o_valid.eq(self.i_valid),
                     self.i_ready.eq(self.o_ready & (n == k - 1))]
        with m.If(self.o_valid & self.o_ready):
            m.d.sync += n.eq(Mux(n == k - 1, 0, n + 1))
        return m
