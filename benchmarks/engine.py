"""Engine benchmark: MACs per cycle per mode as shapes shrink (fill and drain included), and simulation
speed (engine cycles per wall-second) under Verilator, Icarus and Amaranth's simulator, on ci-small.

Command (writes benchmarks/results/engine.json and prints a table):

    .venv/bin/python benchmarks/engine.py

Every run is also checked bit-exact against quant.reference.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from accllm.config import load_hw  # noqa: E402
from sim import engine_check as ec  # noqa: E402

COMMAND = ".venv/bin/python benchmarks/engine.py"


def throughput(p, simulator: str, k_beats_list, build_dir: Path) -> list[dict]:
    """One case per (mode, k_beats), back to back, no stalls; cycles per case from output stamps."""
    rng = np.random.default_rng(0)
    cases, meta = [], []
    for mode in ec.MODES:
        for kb in k_beats_list:
            per_beat = 2 * p.pe_lanes if mode.startswith("sparse") else p.pe_lanes
            if mode == "qk" and kb * per_beat > p.max_head_dim:
                continue
            tokens = 1 if mode.endswith("_mv") else p.mm_tokens
            cases.append(ec.make_case(p, mode, rng, k_beats=kb, n=16 * p.pe_rows, tokens=tokens,
                                      group_beats=kb, requant=False))
            meta.append((mode, kb, kb * per_beat, tokens))
    run_dir = ec._run_folder(build_dir, simulator, 0)
    if simulator == "amaranth":
        actual, cycles = ec.run_amaranth(p, cases, 0, 0.0, run_dir=run_dir)
    else:
        actual, cycles, _ = ec.run_cocotb(p, cases, simulator, 0, 0.0, False, run_dir)
    bad, first = ec.check(cases, actual)
    assert bad == 0, first
    stamps = list(ec.LAST_STAMPS)
    per_case = ec.case_cycles(cases, stamps)
    rows, first = [], 0
    for (mode, kb, k, tokens), c, cyc in zip(meta, cases, per_case):
        # steady state, measured: cycles between the last outputs of consecutive row tiles inside the
        # case (median over the tiles after the first)
        last = [stamps[first + (j + 1) * tokens - 1] for j in range(c.tiles)]
        first += c.n_out
        gaps = np.diff(last)[1:] if c.tiles > 2 else np.diff(last)
        per_tile = float(np.median(gaps))
        steady = c.macs / c.tiles / per_tile
        rows.append({"mode": mode, "k": k, "k_beats": kb, "tokens": tokens, "rows": c.rows,
                     "cycles": int(cyc), "macs": int(c.macs), "macs_per_cycle": round(c.macs / cyc, 2),
                     "peak": p.macs_per_cycle, "efficiency": round(c.macs / cyc / p.macs_per_cycle, 3),
                     "cycles_per_tile": per_tile, "ideal_cycles_per_tile": kb * tokens,
                     "steady_macs_per_cycle": round(steady, 2)})
    return rows


def speed(p, simulator: str, cases: int, max_k_beats: int, max_tiles: int, build_dir: Path) -> dict:
    res = ec.simulate_engine(p, simulator, cases, seed=1, stall_probability=0.25, build_dir=build_dir,
                             max_k_beats=max_k_beats, max_tiles=max_tiles)
    assert res["bit_exact"], res.get("first_mismatch")
    keep = ("bit_exact", "cases", "cycles", "macs", "macs_per_cycle", "sim_seconds", "wall_seconds",
            "cycles_per_second", "sim_cpu_seconds", "cycles_per_cpu_second")
    out = {k: res[k] for k in keep}
    out["workload"] = dict(cases=cases, max_k_beats=max_k_beats, max_tiles=max_tiles, stall_probability=0.25)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hw", default="ci-small")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "engine.json"))
    ap.add_argument("--build-dir", default=str(REPO / "build" / "bench"))
    ap.add_argument("--skip", nargs="*", default=[], help="simulators to skip")
    args = ap.parse_args(argv)
    p = load_hw(args.hw).engine
    bdir = Path(args.build_dir)
    result = {"command": COMMAND + (f" --hw {args.hw}" if args.hw != "ci-small" else ""),
              "hw": args.hw, "engine": {k: getattr(p, k) for k in ("pe_rows", "pe_lanes", "mm_tokens")},
              "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "throughput_simulator": "verilator",
              "load_average_at_start": list(__import__("os").getloadavg())}
    thr_sim = "verilator" if "verilator" not in args.skip else "amaranth"
    result["throughput_simulator"] = thr_sim
    result["throughput"] = throughput(p, thr_sim, [1, 2, 4, 8, 16, 64, 256], bdir)
    workloads = {"verilator": (600, 64, 16), "icarus": (60, 8, 3), "amaranth": (30, 8, 3)}
    result["sim_speed"] = {}
    for sim_name, (n, kb, tiles) in workloads.items():
        if sim_name in args.skip:
            continue
        result["sim_speed"][sim_name] = speed(p, sim_name, n, kb, tiles, bdir)
    result["load_average_at_end"] = list(__import__("os").getloadavg())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    print(f"# {result['command']}  ({result['date_utc']} UTC)")
    print(f"MACs per cycle, {args.hw} ({p.pe_rows}x{p.pe_lanes} = {p.macs_per_cycle} peak), "
          f"{16 * p.pe_rows} output rows, no stalls, activation load + fill + drain included:")
    print(f"{'mode':10s} {'K':>6s} {'T':>3s} {'cycles':>7s} {'MACs':>8s} {'MAC/cyc':>8s} {'eff':>6s} "
          f"{'cyc/tile':>8s} {'ideal':>6s} {'steady MAC/cyc':>14s}")
    for r in result["throughput"]:
        print(f"{r['mode']:10s} {r['k']:6d} {r['tokens']:3d} {r['cycles']:7d} {r['macs']:8d} "
              f"{r['macs_per_cycle']:8.2f} {r['efficiency']:6.3f} {r['cycles_per_tile']:8.1f} "
              f"{r['ideal_cycles_per_tile']:6d} {r['steady_macs_per_cycle']:14.2f}")
    print("\nSimulation speed (engine cycles per wall-second of simulation, 25% stalls on every stream):")
    for sim_name, r in result["sim_speed"].items():
        print(f"{sim_name:10s} {r['cycles']:9d} cycles in {r['sim_seconds']:8.2f} s = "
              f"{r['cycles_per_second']:10.0f} cycles/s wall, {r['cycles_per_cpu_second']:10.0f} cycles/CPU-s "
              f"(bit_exact={r['bit_exact']}, {r['cases']} cases)")
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
