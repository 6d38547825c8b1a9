"""One special-function unit (``hw.sfu``) under Verilator: the unit's Amaranth design as Verilog, a
Verilog testbench with the scratchpad as an HDL-side memory (2 synchronous read ports, 1 write port,
read-before-write like ``sim.unit_sim.SpadTop``), no Python in the cycle loop.

``build_units([unit, ...], depth, run_dir)`` compiles once (the opcode picks the unit);
``VerilatedUnit.run(ins, spad)`` then runs any number of instructions on that binary (spad and instruction passed as files) and returns (spad after,
cycles busy), the same contract as ``sim.unit_sim.run_unit``. A watchdog in the testbench (cycles set
per run) stops a unit that stays busy too long: ``UnitHang``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from hw.isa import FIELDS, Instr, encode
from sim.engine_check import find_simulator
from sim.unit_sim import UnitHang

INSTR_FIELD_BITS = sum(b for _, b in FIELDS)

TB = """`timescale 1ns/1ps
module tb;
  reg clk = 0, rst = 1, start = 0;
  reg [{ib}:0] instr_mem [0:0];
  reg [{ib}:0] instr;
  reg [63:0] spad [0:{dm1}];
  reg [63:0] rd0_q, rd1_q;
  reg busy, rd0_en, rd1_en, wr_en;
  reg [{ab}:0] rd0_addr, rd1_addr, wr_addr;
  reg [63:0] wr_data;
  wire [7:0] op = instr[7:0];
  reg [1023:0] spad_in, spad_out, instr_in, cyc_out;
  integer n, fh, wd, hung;
{units}
  always @(*) begin
    busy = 0; rd0_en = 0; rd1_en = 0; wr_en = 0; rd0_addr = 0; rd1_addr = 0; wr_addr = 0; wr_data = 0;
    case (op)
{mux}
      default: ;
    endcase
  end
  always #5 clk = ~clk;
  always @(posedge clk) begin
    if (rd0_en) rd0_q <= spad[rd0_addr];
    if (rd1_en) rd1_q <= spad[rd1_addr];
    if (wr_en) spad[wr_addr] <= wr_data;
  end
  initial begin
    if (!$value$plusargs("spad=%s", spad_in) || !$value$plusargs("out=%s", spad_out) ||
        !$value$plusargs("instr=%s", instr_in) || !$value$plusargs("cycles=%s", cyc_out) ||
        !$value$plusargs("watchdog=%d", wd)) begin
      $display("usage: +spad=F +instr=F +out=F +cycles=F +watchdog=N"); $fatal(1);
    end
    $readmemh(spad_in, spad);
    $readmemh(instr_in, instr_mem);
    instr = instr_mem[0];
    rd0_q = 0; rd1_q = 0;
    repeat (3) @(negedge clk);
    rst = 0;
    @(negedge clk) start = 1;
    @(negedge clk) start = 0;
    n = 0; hung = 0;
    while (busy && !hung) begin
      n = n + 1;
      if (n > wd) hung = 1;
      else @(negedge clk);
    end
    fh = $fopen(cyc_out, "w");
    if (hung) $fwrite(fh, "hang %0d\\n", n);
    else begin
      $writememh(spad_out, spad);
      $fwrite(fh, "%0d\\n", n);
    end
    $fclose(fh);
    $finish;
  end
endmodule
"""

UNIT_INST = """  wire u{k}_busy, u{k}_rd0_en, u{k}_rd1_en, u{k}_wr_en;
  wire [{ab}:0] u{k}_rd0_addr, u{k}_rd1_addr, u{k}_wr_addr;
  wire [63:0] u{k}_wr_data;
  unit{k} u{k}(.clk(clk), .rst(rst), .start(start && op == {op}), .instr(instr), .busy(u{k}_busy),
         .rd0__addr(u{k}_rd0_addr), .rd0__en(u{k}_rd0_en), .rd0__data(rd0_q),
         .rd1__addr(u{k}_rd1_addr), .rd1__en(u{k}_rd1_en), .rd1__data(rd1_q),
         .wr__addr(u{k}_wr_addr), .wr__en(u{k}_wr_en), .wr__data(u{k}_wr_data));
"""

UNIT_MUX = """      {op}: begin busy = u{k}_busy; rd0_en = u{k}_rd0_en; rd1_en = u{k}_rd1_en; wr_en = u{k}_wr_en;
        rd0_addr = u{k}_rd0_addr; rd1_addr = u{k}_rd1_addr; wr_addr = u{k}_wr_addr; wr_data = u{k}_wr_data; end
"""


class VerilatedUnit:
    def __init__(self, binary: Path, depth: int, run_dir: Path, name: str):
        self.binary, self.depth, self.run_dir, self.name = binary, depth, run_dir, name
        self._runs = 0

    def run(self, ins: Instr, spad: np.ndarray, *, watchdog: int = 1_000_000) -> tuple[np.ndarray, int]:
        """(spad after, cycles busy); ``UnitHang`` when busy stays high beyond ``watchdog`` cycles."""
        spad = np.asarray(spad, np.int64)
        if spad.size != self.depth:
            raise ValueError(f"{self.name}: spad of {spad.size} words, but the binary was built for "
                             f"{self.depth} (build_units(..., depth={spad.size}))")
        self._runs += 1
        d = self.run_dir / f"run{self._runs}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "spad.hex").write_text("\n".join(f"{int(v) & (2**64 - 1):016x}" for v in spad) + "\n")
        (d / "instr.hex").write_text(f"{encode(ins):0{(INSTR_FIELD_BITS + 3) // 4}x}\n")
        args = [str(self.binary), f"+spad={d / 'spad.hex'}", f"+instr={d / 'instr.hex'}",
                f"+out={d / 'out.hex'}", f"+cycles={d / 'cycles.txt'}", f"+watchdog={int(watchdog)}"]
        r = subprocess.run(args, capture_output=True, text=True, cwd=d)
        cyc = (d / "cycles.txt").read_text().split() if (d / "cycles.txt").exists() else []
        if r.returncode or not cyc:
            raise RuntimeError(f"{self.name} under Verilator failed in {d} (exit {r.returncode}): "
                               f"{(r.stdout + r.stderr)[-800:]}")
        if cyc[0] == "hang":
            raise UnitHang(f"{ins.op.name} under Verilator: busy for more than {watchdog} cycles ({d})")
        words = [ln.strip() for ln in (d / "out.hex").read_text().splitlines()
                 if ln.strip() and not ln.startswith("//")]
        out = np.array([int(w, 16) for w in words], dtype=np.uint64).view(np.int64)
        return out, int(cyc[0])


def build_units(units, depth: int, run_dir) -> VerilatedUnit:
    """Compile the units (a list of elaboratables with ``hw.sfu.base.UnitSignature`` for a spad of
    ``depth`` words, each executing the opcode its class is registered for in ``hw.sfu.registry``)
    into one testbench under Verilator in ``run_dir``: one build for all of them, the instruction's
    opcode selects the unit that gets ``start`` and the spad ports."""
    from amaranth.back import verilog

    from hw.sfu.registry import UNITS

    find_simulator("verilator")
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    by_class = {v.split(":")[1]: op for op, v in UNITS.items()}
    insts, muxes, sources = [], [], ["tb.v"]
    abits = None
    for k, unit in enumerate(units):
        name = type(unit).__name__
        if name not in by_class:
            raise ValueError(f"{name} is not a unit class of hw.sfu.registry.UNITS: no opcode selects it")
        ab = len(unit.rd0.addr)
        if abits not in (None, ab):
            raise ValueError(f"{name} has {ab} spad address bits, the others {abits}: build them with one AccelParams")
        abits = ab
        (run_dir / f"unit{k}.v").write_text(verilog.convert(unit, name=f"unit{k}"))
        sources.append(f"unit{k}.v")
        insts.append(UNIT_INST.format(k=k, ab=ab - 1, op=int(by_class[name])))
        muxes.append(UNIT_MUX.format(k=k, op=int(by_class[name])))
    if (1 << abits) < depth:
        raise ValueError(f"spad depth {depth} needs more than the units' {abits} address bits")
    (run_dir / "tb.v").write_text(TB.format(ib=INSTR_FIELD_BITS - 1, dm1=depth - 1, ab=abits - 1,
                                            units="".join(insts), mux="".join(muxes)))
    # --timing (the testbench's clock and delays) needs C++20 coroutines: g++ 12 wants -fcoroutines
    cmd = ["verilator", "--binary", "--timing", "-Wno-fatal", "-Wno-lint", "-Wno-style", "-O3",
           "-CFLAGS", "-std=c++20 -fcoroutines", "--top-module", "tb", "-Mdir", str(run_dir / "obj"),
           "-o", "Vtb", *sources]
    env = dict(os.environ)
    # verilated.mk runs ``python`` (verilator_includer): this interpreter's, whatever PATH holds
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["MAKEFLAGS"] = (env.get("MAKEFLAGS", "") + " CFG_CXXFLAGS_PCH_I=-include OPT_FAST=-O2").strip()
    r = subprocess.run(cmd, cwd=run_dir, capture_output=True, text=True, env=env)
    binary = run_dir / "obj" / "Vtb"
    names = "+".join(type(u).__name__ for u in units)
    if r.returncode or not binary.exists():
        (run_dir / "build.log").write_text(r.stdout + r.stderr)
        raise RuntimeError(f"Verilator build of {names} failed (log: {run_dir / 'build.log'}): "
                           f"{(r.stdout + r.stderr)[-1500:]}")
    return VerilatedUnit(binary, depth, run_dir, names)
