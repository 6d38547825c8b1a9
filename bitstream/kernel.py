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

from amaranth.hdl import ClockDomain, Elaboratable, Module, Signal

from hw.engine import Engine, layouts
from hw.params import EngineParams

from .axi import AxiLiteControl, AxiReader, AxiWriter, Pack, Unpack, arg_offsets, words_for

__all__ = ["AccelKernel", "IN_STREAMS", "OUT_STREAMS", "STREAMS", "ARGS", "stream_widths"]

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
        out = [self.ap_clk, self.ap_rst_n, self.interrupt, *self.control.bus.values()]
        for master in self.masters.values():
            out += list(master.bus.values())
        return out

    def elaborate(self, platform):
        m = Module()
        if self.own_domain:
            cd = ClockDomain("sync", local=True)
            m.domains.sync = cd
            m.d.comb += [cd.clk.eq(self.ap_clk), cd.rst.eq(~self.ap_rst_n)]
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
