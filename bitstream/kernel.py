"""The accelerator kernel: the engine (``hw.engine.Engine``, unchanged) inside a wrapper a host can drive.

Ports (Vitis RTL-kernel names, UG1393 "RTL Kernels"): ``ap_clk``, ``ap_rst_n`` (active low,
synchronous), ``interrupt``, the AXI4-Lite slave ``s_axi_control_*`` (``bitstream.axi.AxiLiteControl``)
and one AXI4 master per engine stream, ``m_axi_<stream>_*``: ``cmd``, ``act``, ``weight``, ``rq`` (per-row
requantization multipliers and shifts), ``scale`` are read (``AxiReader`` -> ``Unpack`` -> engine), ``out`` is written (engine -> ``Pack`` -> ``AxiWriter``).

Arguments (``ARGS``; offsets from ``bitstream.axi.arg_offsets``): a 64-bit buffer address per stream
(``<stream>_ptr``) and a 32-bit count of engine beats per stream (``<stream>_beats``: commands,
activation words, weight beats, rq beats, scale beats, output beats). A host writes them, sets ap_start, and
waits for ap_done: the kernel starts all six masters at once, the engine consumes its streams as it
would from a testbench, and ap_done rises when every input beat has been read and every output word's
write response has come back. Buffers hold one payload per ``words_for(width, data_width)`` bus words
(bitstream/axi.py, conventions); inconsistent counts (more commands than data) leave the kernel busy.
"""

from __future__ import annotations

from amaranth.hdl import ClockDomain, Elaboratable, Module, Mux, Signal

from hw.engine import Engine, layouts
from hw.params import EngineParams

from .axi import AxiLiteControl, AxiReader, AxiWriter, Pack, Unpack, arg_offsets, words_for

__all__ = ["AccelKernel", "AcceleratorKernel", "accel_args", "hbm_channels", "IN_STREAMS", "OUT_STREAMS", "STREAMS", "ARGS",
           "stream_widths"]

OUT_STREAMS = ("out",)
#: the engine's input streams, in ``hw.engine.layouts`` order (the one definition: today cmd, act, weight,
#: scale and the per-row requantization stream rq), one AXI4 read master each
IN_STREAMS = tuple(k for k in layouts(EngineParams()) if k not in OUT_STREAMS)
STREAMS = IN_STREAMS + OUT_STREAMS
ARGS = [(f"{s}_ptr", 64) for s in STREAMS] + [(f"{s}_beats", 32) for s in STREAMS]
OFFSETS = arg_offsets(ARGS)


def stream_widths(p: EngineParams) -> dict[str, int]:
    """Payload bits of each engine stream (from ``hw.engine.layouts``, the one definition)."""
    return {name: layout.size for name, layout in layouts(p).items()}


def _xrt_ports(k, buses: list[dict]) -> list[Signal]:
    """An XRT kernel's ports: clock, reset, interrupt, the control slave, then every master's bus."""
    out = [k.ap_clk, k.ap_rst_n, k.interrupt, *k.control.bus.values()]
    for bus in buses:
        out += list(bus.values())
    return out


def _xrt_domain(m: Module, k) -> None:
    """``own_domain``: the kernel's ``sync`` domain from ``ap_clk`` and the active-low ``ap_rst_n``."""
    if k.own_domain:
        cd = ClockDomain("sync", local=True)
        m.domains.sync = cd
        m.d.comb += [cd.clk.eq(k.ap_clk), cd.rst.eq(~k.ap_rst_n)]


class AccelKernel(Elaboratable):
    """See the module docstring. ``engine``: an already built ``Engine`` (default: one from
    ``params``). ``own_domain``: the kernel makes its ``sync`` domain from ``ap_clk``/``ap_rst_n``
    (the Vitis kernel); False: it runs in the parent's ``sync`` domain and those two ports are unused
    (the Vivado top, which builds the clock itself)."""

    def __init__(self, params: EngineParams, data_width: int = 256, addr_width: int = 64,
                 engine: Engine | None = None, own_domain: bool = True):
        self.own_domain = own_domain
        self.p = params
        self.dw, self.aw = data_width, addr_width
        self.engine = engine if engine is not None else Engine(params)
        self.widths = stream_widths(params)
        self.words = {s: words_for(w, data_width) for s, w in self.widths.items()}
        self.ap_clk = Signal(name="ap_clk")
        self.ap_rst_n = Signal(name="ap_rst_n")
        self.interrupt = Signal(name="interrupt")
        self.control = AxiLiteControl(ARGS)
        self.readers = {s: AxiReader(f"m_axi_{s}", data_width, addr_width) for s in IN_STREAMS}
        self.writers = {s: AxiWriter(f"m_axi_{s}", data_width, addr_width) for s in OUT_STREAMS}

    @property
    def masters(self) -> dict:
        return {**self.readers, **self.writers}

    @property
    def ports(self) -> list[Signal]:
        return _xrt_ports(self, [master.bus for master in self.masters.values()])

    def elaborate(self, platform):
        m = Module()
        _xrt_domain(m, self)
        m.submodules.control = ctl = self.control
        m.submodules.engine = eng = self.engine
        m.d.comb += self.interrupt.eq(ctl.interrupt)

        running = Signal()
        busy_any = Signal()
        errors = []
        busies = []
        for s, rd in self.readers.items():
            m.submodules[f"rd_{s}"] = rd
            m.submodules[f"unpack_{s}"] = up = Unpack(self.widths[s], self.dw)
            port = getattr(eng, s)
            m.d.comb += [rd.start.eq(ctl.start), rd.base.eq(ctl.args[f"{s}_ptr"]),
                         rd.beats.eq(ctl.args[f"{s}_beats"] * self.words[s]),
                         up.i_data.eq(rd.data), up.i_valid.eq(rd.valid), rd.ready.eq(up.i_ready),
                         port.payload.as_value().eq(up.o_data), port.valid.eq(up.o_valid),
                         up.o_ready.eq(port.ready)]
            errors.append(rd.error)
            busies.append(rd.busy)
        for s, wr in self.writers.items():
            m.submodules[f"wr_{s}"] = wr
            m.submodules[f"pack_{s}"] = pk = Pack(self.widths[s], self.dw)
            port = getattr(eng, s)
            m.d.comb += [wr.start.eq(ctl.start), wr.base.eq(ctl.args[f"{s}_ptr"]),
                         wr.beats.eq(ctl.args[f"{s}_beats"] * self.words[s]),
                         pk.i_data.eq(port.payload.as_value()), pk.i_valid.eq(port.valid),
                         port.ready.eq(pk.i_ready),
                         wr.data.eq(pk.o_data), wr.valid.eq(pk.o_valid), pk.o_ready.eq(wr.ready)]
            errors.append(wr.error)
            busies.append(wr.busy)
        err = errors[0]
        for e in errors[1:]:
            err = err | e
        bsy = busies[0]
        for b in busies[1:]:
            bsy = bsy | b
        m.d.comb += [busy_any.eq(bsy), ctl.error.eq(err), ctl.idle.eq(~running)]
        # the masters load their counters on the start cycle, so their busy is valid one cycle later
        armed = Signal()
        with m.If(ctl.start):
            m.d.sync += [running.eq(1), armed.eq(0)]
        with m.Elif(running):
            m.d.sync += armed.eq(1)
            with m.If(armed & ~busy_any):
                m.d.sync += running.eq(0)
        m.d.comb += ctl.done.eq(running & armed & ~busy_any)
        return m


# ---------------------------------------------------------------------------------------------------
# The kernel around the whole accelerator (hw.accel.AxiAccelerator)
# ---------------------------------------------------------------------------------------------------
def accel_args(accel) -> list[tuple[str, int]]:
    """The accelerator kernel's arguments: a 64-bit buffer address per striped port's channel
    (``mem<p>_ptr``, in ``hw.axi.port_names`` order), then ``aux_ptr`` (64 bits), the argument of
    ``m_axi_aux`` (``AcceleratorKernel``: 0 = aux reads through the channel pointers, else the base of
    one buffer holding the channels end to end)."""
    from hw.axi import port_names
    return [(f"{n}_ptr", 64) for n in port_names(accel) if n != "aux"] + [("aux_ptr", 64)]


def hbm_channels(accel) -> dict[str, list[int]]:
    """Accelerator master -> the HBM pseudo-channels it reaches, the one definition both targets use
    (``bitstream.vitis.hbm_map``, ``bitstream.vivado.hbm_saxi``): ``mem<p>`` its own channel ``p`` of
    the striped word space (``hw.axi.stripe_map``: port p only ever addresses channel p), ``aux``
    every striped channel."""
    from hw.axi import port_names
    n = accel.mem_ports
    return {name: (list(range(n)) if name == "aux" else [int(name.removeprefix("mem"))])
            for name in port_names(accel)}


class AcceleratorKernel(Elaboratable):
    """The whole accelerator (``hw.accel.AxiAccelerator``: engine, special-function units, controller,
    scratchpad, AXI memory system) as an XRT RTL kernel (UG1393 "RTL Kernels"): ``ap_clk``,
    ``ap_rst_n``, ``interrupt``, the AXI4-Lite slave ``s_axi_control_*`` (``AxiLiteControl``, the
    ``ap_ctrl_hs`` map, arguments ``accel_args`` from 0x10) and the accelerator's own AXI4 masters
    ``m_axi_mem<p>_*`` and ``m_axi_aux_*`` (``hw.axi.memory_buses``), ``accel.mem_word_bits`` wide.

    Addresses: the accelerator's flat AXI space puts channel ``q`` at byte ``q * mem_channel_bytes``
    (``hw.axi.stripe_map``: port ``mem<q>`` only ever addresses channel ``q``, ``aux`` any channel);
    the kernel sends an address ``a`` of channel ``q = a // mem_channel_bytes`` to ``mem<q>_ptr + a %
    mem_channel_bytes``, so the host gives each channel a buffer of its own (one per HBM
    pseudo-channel: ``bitstream.vitis.link_config``) holding that channel's words of the compiled image
    (``hw.compile``'s memory image through ``stripe_map``). ``m_axi_aux`` (the instruction prefetch
    and the scales) has its own argument ``aux_ptr``: 0 (the default) sends its accesses through the
    same per-channel pointers; nonzero, to ``aux_ptr + a`` (``a`` its flat address: channel ``q`` at
    ``aux_ptr + q * mem_channel_bytes``), for a host that keeps one buffer with every channel end to
    end for the prefetch and the scales (the Vivado project: 0, the HBM's global map). ap_start pulses the accelerator's
    ``start`` (the program runs from word 0); ap_done rises when it stops (HALT or an error); a nonzero
    ``AccelError`` sets bit 4 of the control register (the code itself is the accelerator's ``error``
    output, for a debug core)."""

    def __init__(self, engine: EngineParams, accel, units=None, addr_width: int = 64, own_domain: bool = True):
        from hw.accel import AxiAccelerator
        from hw.axi import memory_buses
        problems = accel.problems()
        if problems:
            raise ValueError("accelerator: " + "; ".join(f"{k}: {v}" for k, v in problems))
        self.own_domain = own_domain
        self.p, self.accel, self.aw = engine, accel, addr_width
        self.dw = accel.mem_word_bits
        self.core = AxiAccelerator(engine, accel, units, addr_width=addr_width)
        self.args = accel_args(accel)
        self.control = AxiLiteControl(self.args)
        self.buses = memory_buses(accel, addr_width)  # the kernel's own ports, same names as the core's
        self.port_names = list(self.buses)
        self.ap_clk = Signal(name="ap_clk")
        self.ap_rst_n = Signal(name="ap_rst_n")
        self.interrupt = Signal(name="interrupt")

    @property
    def ports(self) -> list[Signal]:
        return _xrt_ports(self, [self.buses[n] for n in self.port_names])

    def elaborate(self, platform):
        from hw.axi import MASTER_OUTPUTS
        m = Module()
        _xrt_domain(m, self)
        m.submodules.control = ctl = self.control
        m.submodules.accel = core = self.core
        A = self.accel
        cbits = A.mem_channel_bytes.bit_length() - 1
        ptrs = [ctl.args[name] for name, _ in self.args if name != "aux_ptr"]
        aux_ptr = ctl.args["aux_ptr"]
        for n in self.port_names:
            inner, outer = core.buses[n], self.buses[n]
            for k, sig in inner.items():
                if k in ("araddr", "awaddr"):
                    q = sig[cbits:]
                    base = Signal(self.aw, name=f"{n}_{k}_base")
                    with m.Switch(q):
                        for c, ptr in enumerate(ptrs):
                            with m.Case(c):
                                m.d.comb += base.eq(ptr)
                    through_channels = base + sig[:cbits]
                    if n == "aux":  # its own buffer when aux_ptr is set (class docstring)
                        m.d.comb += outer[k].eq(Mux(aux_ptr.any(), aux_ptr + sig, through_channels))
                    else:
                        m.d.comb += outer[k].eq(through_channels)
                elif k in MASTER_OUTPUTS:
                    m.d.comb += outer[k].eq(sig)
                else:
                    m.d.comb += sig.eq(outer[k])
        # ap_start -> one start pulse; ap_done once the accelerator's held ``done`` has fallen after it
        # (a restart from DONE may wait for a prefetch in flight to drain) and risen again
        running, left = Signal(), Signal()
        finished = Signal()
        m.d.comb += [core.start.eq(ctl.start), ctl.idle.eq(~running), self.interrupt.eq(ctl.interrupt),
                     finished.eq(running & left & core.done),
                     ctl.done.eq(finished), ctl.error.eq(finished & (core.error != 0))]
        with m.If(ctl.start):
            m.d.sync += [running.eq(1), left.eq(0)]
        with m.Elif(running):
            with m.If(~core.done):
                m.d.sync += left.eq(1)
            with m.If(finished):
                m.d.sync += running.eq(0)
        return m
