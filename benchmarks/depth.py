"""Logic depth of today's engine (``hw.engine.Engine``) on the Yosys UltraScale+ netlist.

For each configuration: elaborate the engine, synthesize it flat (``synth_xilinx -family xcup``,
bitstream/depth.py), walk every register-to-register / port path, and record the deepest paths, the
unregistered DSPs and memories, and what breaks the budget (``bitstream.depth.BUDGET``: 8 LUT levels,
225 MHz). Estimates only: Vivado has the last word on timing.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/depth.py                  # every configuration below
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/depth.py ci-small

Configurations: ``ci-small`` (configs/hw/ci-small.yaml), ``u280-2rows`` and ``u280-1row``
(configs/hw/u280.yaml with ``pe_rows = 2`` / ``1``, lut style: the u280 lane width and widths; the one-row
slice is the depth test's, tests/bitstream/test_engine_depth.py), ``u280-dsp-1row`` (the same slice in
``multiplier_style: dsp``, u280.yaml's own style: one ``DspRows1``; the depth test's too) and
``u280-dsp-3rows`` (dsp, one ``DspRows3``). Writes benchmarks/results/depth.json
(merging with what is there; written to a temporary name and moved into place).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accllm.config import load_hw  # noqa: E402
from bitstream.depth import BUDGET, check_budget, logic_depth  # noqa: E402
from quant.atomic import write_json  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "depth.json"
# the u280 slices keep the requantizer (u280 builds the lean engine, requantizer false), so that the
# numbers recorded before stay comparable and its stages stay measured
CONFIGS = {"ci-small": ("ci-small", {}), "u280-2rows": ("u280", {"pe_rows": 2, "multiplier_style": "lut", "requantizer": True}),
           # tests/bitstream/test_engine_depth.py's slice; the dsp style's smallest (one DspRows3)
           "u280-1row": ("u280", {"pe_rows": 1, "multiplier_style": "lut", "requantizer": True}),
           # the same slice in dsp style (u280.yaml's own: one DspRows1), the depth test's too
           "u280-dsp-1row": ("u280", {"pe_rows": 1, "multiplier_style": "dsp", "requantizer": True}),
           "u280-dsp-3rows": ("u280", {"pe_rows": 3, "multiplier_style": "dsp", "requantizer": True})}


def _engine_params(name: str):
    base, override = CONFIGS[name]
    params = load_hw(base).engine
    return dataclasses.replace(params, **override)


def _summarize_unregistered(items: list[dict]) -> list[dict]:
    """Group the unregistered cells by (type, missing registers), with a count and examples."""
    groups: dict[tuple, dict] = {}
    for u in items:
        key = (u["type"], tuple(u["missing"]))
        g = groups.setdefault(key, {"type": u["type"], "missing": u["missing"], "count": 0, "examples": []})
        g["count"] += 1
        if len(g["examples"]) < 3:
            g["examples"].append(u["cell"])
    return list(groups.values())


def measure(name: str, timeout_s: float) -> dict:
    from hw.engine import Engine
    params = _engine_params(name)
    t0 = time.monotonic()
    eng = Engine(params)
    res = logic_depth(eng, timeout_s=timeout_s)
    problems = check_budget(res)
    return {
        "config": name, "params": dataclasses.asdict(params),
        "max_levels": res["max_levels"], "max_carry": res["max_carry"],
        "estimate_ns": res["estimate_ns"], "period_ns": round(BUDGET.period_ns, 3),
        "path_levels": res["path_levels"], "path_carry": res["path_carry"], "path_dsp": res["path_dsp"],
        "path": res["path"], "levels_path": res["levels_path"],
        "unregistered": _summarize_unregistered(res["unregistered"]),
        "fabric_registered": _summarize_unregistered(res["fabric_registered"]),
        "flip_flops": res["flip_flops"], "ends": res["ends"],
        "within_budget": not problems, "problems": problems[:20], "problem_count": len(problems),
        "script": res["script"], "yosys_seconds": res["seconds"], "cached": res["cached"],
        "total_seconds": round(time.monotonic() - t0, 1),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--timeout", type=float, default=900, help="Yosys timeout per config (s)")
    args = ap.parse_args(argv)
    new = {}
    for name in args.configs:
        print(f"{name}: synthesizing and walking ...", flush=True)
        r = new[name] = measure(name, args.timeout)
        print(f"  max_levels {r['max_levels']}, max_carry {r['max_carry']}, worst estimate "
              f"{r['estimate_ns']} ns (period {r['period_ns']}), unregistered "
              f"{sum(u['count'] for u in r['unregistered'])}, within budget: {r['within_budget']} "
              f"({r['total_seconds']} s)", flush=True)
    # read what is there only now (another run may have written it meanwhile), then merge
    data = json.loads(OUT.read_text()) if OUT.exists() else {}
    data.setdefault("results", {}).update(new)
    data["budget"] = dataclasses.asdict(BUDGET)
    data.setdefault("commands", {}).update(
        {name: f"OMP_NUM_THREADS=1 .venv/bin/python benchmarks/depth.py {name}" for name in new})
    data["host"] = {"python": platform.python_version(), "machine": platform.machine()}
    write_json(OUT, data)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
