"""Amaranth simulation of one special-function unit (``hw.sfu``) on a scratchpad: the unit's test
harness. ``run_unit`` starts one instruction on a spad holding the given values and returns the spad
afterwards and the cycles ``busy`` was high; a watchdog stops a unit that never finishes."""

from __future__ import annotations

import numpy as np
from amaranth.hdl import Elaboratable, Module, signed
from amaranth.lib.memory import Memory
from amaranth.sim import Simulator

from hw.isa import FIELDS, Instr
from hw.sfu.base import SPAD_BITS


class UnitHang(RuntimeError):
    pass


class SpadTop(Elaboratable):
    """A unit wired to a spad of ``depth`` words (2 synchronous read ports, 1 write port)."""

    def __init__(self, unit, depth: int, init):
        self.unit = unit
        self.spad = Memory(shape=signed(SPAD_BITS), depth=depth, init=[int(v) for v in init])

    def elaborate(self, platform):
        m = Module()
        m.submodules.unit = u = self.unit
        m.submodules.spad = spad = self.spad
        for rd in (u.rd0, u.rd1):
            p = spad.read_port(domain="sync")
            m.d.comb += [p.addr.eq(rd.addr), p.en.eq(rd.en), rd.data.eq(p.data)]
        w = spad.write_port()
        m.d.comb += [w.addr.eq(u.wr.addr), w.data.eq(u.wr.data), w.en.eq(u.wr.en)]
        return m


def run_unit(unit, ins: Instr, spad: np.ndarray, *, watchdog: int = 1_000_000, vcd: str | None = None
             ) -> tuple[np.ndarray, int]:
    """Run ``ins`` on ``unit`` (an elaboratable with ``hw.sfu.base.UnitSignature``) with the spad
    initialised to ``spad`` (int64 array, its length the spad depth). Returns (spad after, cycles busy)."""
    spad = np.asarray(spad, np.int64)
    top = SpadTop(unit, spad.size, spad.tolist())
    sim = Simulator(top)
    sim.add_clock(1e-8)
    out: dict = {}

    async def bench(ctx):
        for name, _ in FIELDS:
            ctx.set(getattr(unit.instr, name), int(getattr(ins, name)))
        ctx.set(unit.start, 1)
        await ctx.tick()
        ctx.set(unit.start, 0)
        n = 0
        while True:
            if not ctx.get(unit.busy):
                break
            n += 1
            if n > watchdog:
                raise UnitHang(f"{ins.op.name}: busy for more than {watchdog} cycles")
            await ctx.tick()
        out["cycles"] = n
        out["spad"] = np.array([ctx.get(top.spad.data[i]) for i in range(spad.size)], np.int64)

    sim.add_testbench(bench)
    if vcd:
        with sim.write_vcd(vcd):
            sim.run()
    else:
        sim.run()
    return out["spad"], out["cycles"]
