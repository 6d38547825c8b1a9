"""Simulation speed of the whole accelerator under Verilator: a long program (one ENGINE instruction
repeated, dense prefill shape, every special-function unit in the design), bit-exact checked.

    nice -n 10 .venv/bin/python benchmarks/accel_speed.py [--repeats N] [--simulator verilator]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hw.params import AccelParams  # noqa: E402
from sim import accel_sim  # noqa: E402
from sim.accel_programs import check_memory, repeated_engine_program  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=1000)
    ap.add_argument("--simulator", default="verilator")
    ap.add_argument("--profile", default="asymmetric")
    ap.add_argument("--latency", type=int, default=16)
    args = ap.parse_args(argv)
    from hw.params import EngineParams
    p = EngineParams()  # ci-small
    accel = AccelParams(mem_word_bits=256, spad_words=16384)
    img, checks, info = repeated_engine_program(p, accel, args.repeats)
    t0 = time.perf_counter()
    r = accel_sim.run_accelerator(p, accel, img, simulator=args.simulator, stall_profile=args.profile,
                                  mem_latency=args.latency)
    total = time.perf_counter() - t0
    bad = check_memory(r.mem, accel, checks)
    res = {"simulator": args.simulator, "instrs": r.instrs, "cycles": r.cycles, "bit_exact": not bad and r.error == 0,
           "sim_wall_s": round(r.wall_s, 2), "sim_cpu_s": round(r.cpu_s, 2),
           "cycles_per_wall_s": round(r.cycles / r.wall_s), "cycles_per_cpu_s": round(r.cycles / max(r.cpu_s, 1e-9)),
           "build_s": round(accel_sim.LAST_BUILD_SECONDS[0], 1), "total_s": round(total, 1),
           "units": "all available", "profile": args.profile, "latency": args.latency}
    print(json.dumps(res))
    return 0 if res["bit_exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
