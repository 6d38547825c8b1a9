"""Resource estimates (Yosys ``synth_xilinx -family xcup``) for engine configurations, and the
multiplier-style sweep behind docs/arithmetic.md.

For each hardware config (default ``ci-small`` and ``u280``):

* the multiplier array: ``pe_rows x pe_lanes`` products of a signed 8-bit activation and a
  ``--code-bits`` code (default 4: the engine's array is built for the widest code, the 4-bit KV cache)
  in the config's ``multiplier_style`` and, for comparison, in the other styles. Large arrays are
  measured on a slice (``--slice-cols`` columns of ``pe_rows`` rows) and scaled linearly to
  ``pe_lanes`` columns; the JSON says so (``measured`` vs ``scaled_to``).
* the full engine (``hw.engine.Engine``) when it imports and elaborates, under ``--engine-timeout``;
  any failure is recorded, not hidden.

``--sweep`` adds one column of R rows (R = 1, 4, 16, 64) for 2- and 4-bit codes in every style, the
numbers of docs/arithmetic.md. Results are cached by content under build/yosys/ (bitstream/yosys.py).

    .venv/bin/python benchmarks/resources.py --sweep
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accllm.config import load_hw  # noqa: E402
from bitstream.yosys import YosysError, estimate, yosys_version  # noqa: E402
from hw.mult import Column, ColumnArray, dsps_for  # noqa: E402

# Alveo U280 (xcu280): device totals used for the fractions below.
from bitstream.platform import U280_RESOURCES as U280  # noqa: E402  (one source of truth)
KEYS = ("lut", "ff", "dsp", "bram36", "uram", "carry")
SWEEP_STYLES = ("lut", "dsp", "mul", "mul-nodsp", "offset")


def _style_args(style: str) -> tuple[str, bool]:
    """Harness style and Yosys -nodsp flag for a sweep style name."""
    if style == "mul-nodsp":
        return "mul", True
    return style, False


def _summary(res: dict) -> dict:
    return {k: res[k] for k in KEYS} | {"cells": res["cells"], "seconds": res["seconds"],
                                         "cached": res["cached"], "script": res["script"]}


def measure_column(rows: int, code_bits: int, style: str, cols: int = 1) -> dict:
    hstyle, nodsp = _style_args(style)
    design = Column(rows, code_bits, hstyle) if cols == 1 else ColumnArray(rows, cols, code_bits, hstyle)
    # Columns share nothing, so the hierarchy is kept (synth_xilinx's default): same counts, and
    # the per-column breakdown is in the Yosys log.
    res = estimate(design, nodsp=nodsp, flatten=False)
    n = rows * cols
    out = {"style": style, "rows": rows, "cols": cols, "code_bits": code_bits, "products": n,
           **_summary(res)}
    out["per_product"] = {k: round(res[k] / n, 3) for k in ("lut", "ff", "dsp", "carry")}
    return out


def sweep(rows_list=(1, 4, 16, 64), bits_list=(2, 4), styles=SWEEP_STYLES) -> list[dict]:
    out = []
    for bits in bits_list:
        for rows in rows_list:
            for style in styles:
                if style == "offset" and rows == 1:
                    continue
                r = measure_column(rows, bits, style)
                out.append(r)
                pp = r["per_product"]
                print(f"  sweep b={bits} R={rows:3d} {style:9s} LUT/p {pp['lut']:6.2f} "
                      f"FF/p {pp['ff']:4.1f} DSP/p {pp['dsp']:5.3f} CARRY4/p {pp['carry']:5.2f} "
                      f"({r['seconds']:.0f} s{', cached' if r['cached'] else ''})", flush=True)
    return out


def array_estimate(rows: int, lanes: int, code_bits: int, style: str, slice_cols: int,
                   max_full_products: int) -> dict:
    """The rows x lanes array, measured whole when small, else on ``slice_cols`` columns and scaled."""
    if rows * lanes <= max_full_products:
        cols = lanes
    else:
        cols = max(1, min(slice_cols, lanes))
    r = measure_column(rows, code_bits, style, cols=cols)
    scale = lanes / cols
    est = {k: (r[k] * scale) for k in KEYS}
    return {
        "style": style, "code_bits": code_bits, "products": rows * lanes,
        "measured": {"rows": rows, "cols": cols, "products": rows * cols,
                     **{k: r[k] for k in KEYS}, "cells": r["cells"], "seconds": r["seconds"]},
        "scaled": cols != lanes,
        "scale_factor": scale,
        "note": (f"measured {rows} x {cols} and scaled linearly x{scale:g} to {rows} x {lanes} "
                 f"(columns are independent: no logic is shared between columns)"
                 if cols != lanes else f"measured whole ({rows} x {lanes})"),
        "estimate": {k: round(v, 1) for k, v in est.items()},
        "expected_dsp": dsps_for(rows, code_bits, _style_args(style)[0]) * lanes,
        "u280_fraction": {k: round(est[k] / U280[k], 4) for k in ("lut", "ff", "dsp")},
    }


def engine_array(rows_list=(4, 64), lanes: int = 8) -> list[dict]:
    """The engine's own array (``hw.engine.ArraySlice``: candidate multiples per lane pair, per-row
    selects, one adder per product; every mode's datapath, 4-bit code lanes), ``rows x lanes`` products
    as top-level outputs, per product. Comparable with the sweep's one-activation columns."""
    from hw.engine import ArraySlice
    out = []
    for rows in rows_list:
        res = estimate(ArraySlice(rows, lanes // 2), flatten=False)
        n = rows * lanes
        r = {"rows": rows, "lanes": lanes, "products": n, **_summary(res),
             "per_product": {k: round(res[k] / n, 3) for k in ("lut", "ff", "dsp", "carry")}}
        out.append(r)
        pp = r["per_product"]
        print(f"  engine array {rows} x {lanes}: LUT/p {pp['lut']:6.2f} DSP/p {pp['dsp']:5.3f} "
              f"CARRY4/p {pp['carry']:5.2f} ({r['seconds']:.0f} s{', cached' if r['cached'] else ''})",
              flush=True)
    return out


_ELABORATE = """
import sys, dataclasses, json
sys.path.insert(0, {root!r})
from amaranth.back import rtlil
from hw.engine import Engine
from hw.params import EngineParams
params = EngineParams(**json.loads({params!r}))
open({out!r}, "w").write(rtlil.convert(Engine(params), name="top"))
"""


def engine_estimate(params, timeout_s: float, rtlil_file: str | None = None) -> dict:
    """The full engine: import, elaborate and convert to RTLIL in a child process (a large one can take
    long), then Yosys; each step under ``timeout_s``. ``rtlil_file``: use this RTLIL of the same
    engine instead of converting again (the u280 conversion alone takes minutes). Every failure is
    recorded with its reason."""
    import dataclasses
    import subprocess
    import tempfile
    t0 = time.monotonic()
    if rtlil_file is not None:
        text = Path(rtlil_file).read_text()
        try:
            res = estimate(text, timeout_s=timeout_s)
        except YosysError as e:
            return {"status": "timeout" if "did not finish" in str(e) else "error", "error": str(e)[:2000],
                    "rtlil_file": str(rtlil_file), "rtlil_bytes": len(text),
                    "seconds": round(time.monotonic() - t0, 1)}
        return {"status": "ok", **_summary(res), "rtlil_file": str(rtlil_file), "rtlil_bytes": len(text),
                "u280_fraction": {k: round(res[k] / U280[k], 4) for k in ("lut", "ff", "dsp",
                                                                            "bram36", "uram")}}
    with tempfile.TemporaryDirectory(prefix="accllm-engine-") as tmp:
        il = Path(tmp) / "engine.il"
        code = _ELABORATE.format(root=str(ROOT), params=json.dumps(dataclasses.asdict(params)),
                                 out=str(il))
        try:
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "error": f"hw.engine.Engine did not elaborate to RTLIL within "
                                                  f"{timeout_s:.0f} s (--engine-timeout)",
                    "seconds": round(time.monotonic() - t0, 1)}
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["?"])[-1]
            status = "unavailable" if "import" in last.lower() and "engine" in last.lower() else "error"
            return {"status": status, "error": f"hw.engine.Engine did not elaborate: {last[:1000]}"}
        text = il.read_text()
    elaborate_s = time.monotonic() - t0
    try:
        res = estimate(text, timeout_s=timeout_s)
    except YosysError as e:
        return {"status": "error", "error": str(e)[:2000], "seconds": round(time.monotonic() - t0, 1)}
    return {"status": "ok", **_summary(res), "elaborate_seconds": round(elaborate_s, 1),
            "u280_fraction": {k: round(res[k] / U280[k], 4) for k in ("lut", "ff", "dsp", "bram36",
                                                                        "uram")}}


def engine_rows_estimate(params, rows_list: list[int], timeout_s: float) -> dict:
    """Hierarchical estimate of a large engine: the real engine (``hw.engine.Engine``) with the same
    parameters except ``pe_rows``, synthesized whole (flat) at two or more row counts; the cost is
    fitted as ``fixed + per_row * pe_rows`` (least squares; exact for two counts) and evaluated at the
    configured ``pe_rows``. Everything of the engine is either per row (codes, products, adder trees,
    group partials, accumulators, output bank, requantizer) or independent of the row count (activation
    buffer, candidate multiples per lane pair, zero-point row, control), so the fit is linear by
    construction; the residual at the measured points is recorded."""
    import dataclasses
    import numpy as np
    runs = []
    for r in rows_list:
        sub = dataclasses.replace(params, pe_rows=r)
        res = engine_estimate(sub, timeout_s)
        if res["status"] != "ok":
            return {"status": res["status"], "error": f"pe_rows = {r}: {res.get('error', '')}"[:2000],
                    "runs": runs}
        runs.append({"pe_rows": r, **{k: res[k] for k in KEYS}, "cells": res["cells"],
                     "seconds": res["seconds"], "elaborate_seconds": res.get("elaborate_seconds")})
        print(f"    engine with pe_rows {r}: " + ", ".join(f"{k} {res[k]:g}" for k in KEYS)
              + f" ({res['seconds']:.0f} s)", flush=True)
    x = np.array([run["pe_rows"] for run in runs], float)
    fit, est, resid = {}, {}, {}
    for k in KEYS:
        y = np.array([run[k] for run in runs], float)
        per_row, fixed = np.polyfit(x, y, 1)
        fit[k] = {"fixed": round(float(fixed), 2), "per_row": round(float(per_row), 3)}
        est[k] = round(float(fixed + per_row * params.pe_rows), 1)
        resid[k] = round(float(np.max(np.abs(fixed + per_row * x - y))), 2) if len(x) > 2 else 0.0
    return {
        "status": "estimate",
        "method": (f"hierarchical: hw.engine.Engine with pe_rows in {list(rows_list)} (all other "
                   f"parameters as configured, pe_lanes = {params.pe_lanes}) synthesized flat, each "
                   f"count fitted as fixed + per_row * pe_rows and evaluated at pe_rows = "
                   f"{params.pe_rows}; not a synthesis of the whole engine"),
        "runs": runs, "fit": fit, "max_residual": resid, "estimate": est,
        **{k: est[k] for k in KEYS},
        "u280_fraction": {k: round(est[k] / U280[k], 4) for k in ("lut", "ff", "dsp", "bram36", "uram")},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="*", default=["ci-small", "u280"], help="hw configs (names or paths)")
    ap.add_argument("--code-bits", type=int, default=4, help="code width of the array (default 4)")
    ap.add_argument("--slice-cols", type=int, default=8,
                    help="columns measured for arrays too large to run whole (scaled linearly)")
    ap.add_argument("--max-full-products", type=int, default=1024,
                    help="arrays with at most this many products are measured whole")
    ap.add_argument("--styles", default="lut,dsp,mul", help="array styles to estimate per config")
    ap.add_argument("--no-engine", action="store_true", help="skip the full-engine estimate")
    ap.add_argument("--engine-timeout", type=float, default=900,
                    help="seconds allowed for elaborating the engine, and again for its Yosys run")
    ap.add_argument("--engine-rows", default="",
                    help="comma-separated pe_rows counts (e.g. 8,16): also estimate each config's engine "
                         "from engines with these row counts (engine_rows_estimate), for configs with "
                         "more rows than the largest count")
    ap.add_argument("--engine-rtlil", default=None,
                    help="RTLIL file of the (single) config's full engine, already converted; skips "
                         "the conversion")
    ap.add_argument("--no-arrays", action="store_true", help="skip the multiplier-array estimates")
    ap.add_argument("--merge", action="store_true",
                    help="update only the configs (and sweep) run now in an existing --out file")
    ap.add_argument("--sweep", action="store_true", help="also run the multiplier-style sweep")
    ap.add_argument("--engine-array", action="store_true",
                    help="also price the engine's own array cell (hw.engine.ArraySlice, 4 and 64 rows x 8 "
                         "lanes)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/resources.json"))
    args = ap.parse_args(argv)

    cmd = ".venv/bin/python benchmarks/resources.py " + " ".join(shlex.quote(a) for a in
                                                                 (argv if argv is not None else sys.argv[1:]))
    t0 = time.monotonic()
    result = {
        "command": cmd.strip(),
        "tool": yosys_version(),
        "script": "read_rtlil design.il; synth_xilinx -family xcup -top top -noiopad -uram "
                  "[-nodsp for mul-nodsp] [-flatten for the engine]; stat -json (each entry has "
                  "its exact script)",
        "python": platform.python_version(),
        "u280_device": U280,
        "counting": "lut = LUT1..6 + LUT6_2 + INV; ff = FD*; dsp = DSP48E2; bram36 = RAMB36E2 + "
                    "RAMB18E2/2; uram = URAM288; carry = CARRY4 (Yosys emits no CARRY8)",
        "configs": {},
    }
    styles = [s for s in args.styles.split(",") if s]
    for name in args.configs:
        cfg = load_hw(name)
        e = cfg.engine
        print(f"{name}: pe_rows {e.pe_rows} x pe_lanes {e.pe_lanes} = {e.macs_per_cycle} products, "
              f"multiplier_style {e.multiplier_style}", flush=True)
        entry = {"pe_rows": e.pe_rows, "pe_lanes": e.pe_lanes, "multiplier_style": e.multiplier_style,
                 "arrays": {}}
        for style in ([] if args.no_arrays else dict.fromkeys([e.multiplier_style, *styles])):
            a = array_estimate(e.pe_rows, e.pe_lanes, args.code_bits, style, args.slice_cols,
                               args.max_full_products)
            entry["arrays"][style] = a
            print(f"  array {style:4s}: " + ", ".join(f"{k} {a['estimate'][k]:g}" for k in KEYS)
                  + f"  [{a['note']}]", flush=True)
        if args.no_engine:
            entry["engine"] = {"status": "skipped", "error": "--no-engine"}
        else:
            entry["engine"] = engine_estimate(e, args.engine_timeout, args.engine_rtlil)
            eng = entry["engine"]
            if eng["status"] == "ok":
                print("  engine: " + ", ".join(f"{k} {eng[k]:g}" for k in KEYS)
                      + f" ({eng['seconds']:.0f} s)", flush=True)
            else:
                print(f"  engine: {eng['status']}: {eng['error'][:300]}", flush=True)
        rows = [int(r) for r in args.engine_rows.split(",") if r]
        if rows and e.pe_rows > max(rows):
            print(f"  engine from pe_rows {rows}:", flush=True)
            entry["engine_rows_estimate"] = engine_rows_estimate(e, rows, args.engine_timeout)
            est = entry["engine_rows_estimate"]
            if est["status"] == "estimate":
                print("  engine (estimate): " + ", ".join(f"{k} {est[k]:g}" for k in KEYS), flush=True)
            else:
                print(f"  engine estimate: {est['status']}: {est['error'][:300]}", flush=True)
        if not entry["arrays"] and entry["engine"]["status"] == "skipped" and "engine_rows_estimate" not in entry:
            result["configs"][name] = entry  # nothing measured for this config: --merge keeps the old one
            continue
        entry["command"] = cmd.strip()
        entry["date_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        for key in ("engine", "engine_rows_estimate"):  # provenance survives later --merge runs
            if key in entry and entry[key].get("status") != "skipped":
                entry[key].update(command=entry["command"], date_utc=entry["date_utc"])
        result["configs"][name] = entry
    if args.sweep:
        print("multiplier sweep (one column of R rows, products as top-level outputs):", flush=True)
        result["sweep"] = sweep()
    if args.engine_array:
        print("engine array (hw.engine.ArraySlice, products as top-level outputs):", flush=True)
        result["engine_array"] = engine_array()
    result["seconds"] = round(time.monotonic() - t0, 1)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge and out.exists():
        old = json.loads(out.read_text())
        for name, entry in result["configs"].items():
            # keep what this run did not measure (skipped engine, skipped arrays) from the old entry
            keep = {k: v for k, v in entry.items()
                    if not ((k == "engine" and v.get("status") == "skipped") or (k == "arrays" and not v))}
            prev = old.setdefault("configs", {}).get(name, {})
            for key in ("engine", "engine_rows_estimate"):
                if key in prev and "command" in prev:
                    prev[key].setdefault("command", prev["command"])
            old["configs"][name] = prev | keep
        for key in ("sweep", "engine_array"):
            if key in result:
                old[key] = result[key]
        old.setdefault("commands", [old.get("command")])
        old["commands"] = [c for c in old["commands"] if c] + [result["command"]]
        for key in ("tool", "script", "python", "counting"):
            old[key] = result[key]
        result = old
    out.write_text(json.dumps(result, indent=1) + "\n")
    _table(result)
    print(f"wrote {out}")
    return 0


def _table(result: dict) -> None:
    print()
    print(f"{'config':10s} {'what':22s} {'LUT':>10s} {'FF':>9s} {'DSP':>7s} {'BRAM36':>7s} {'URAM':>5s} "
          f"{'CARRY4':>7s}  note")
    for name, entry in result["configs"].items():
        for style, a in entry["arrays"].items():
            est = a["estimate"]
            print(f"{name:10s} {'array ' + style:22s} {est['lut']:10.0f} {est['ff']:9.0f} {est['dsp']:7.0f} "
                  f"{est['bram36']:7.1f} {est['uram']:5.0f} {est['carry']:7.0f}  "
                  f"{'scaled x%g' % a['scale_factor'] if a['scaled'] else 'whole'}")
        eng = entry["engine"]
        if eng["status"] == "ok":
            print(f"{name:10s} {'engine':22s} {eng['lut']:10.0f} {eng['ff']:9.0f} {eng['dsp']:7.0f} "
                  f"{eng['bram36']:7.1f} {eng['uram']:5.0f} {eng['carry']:7.0f}  whole")
        else:
            print(f"{name:10s} {'engine':22s} {eng['status']}")
        est = entry.get("engine_rows_estimate")
        if est and est["status"] == "estimate":
            print(f"{name:10s} {'engine (from rows)':22s} {est['lut']:10.0f} {est['ff']:9.0f} "
                  f"{est['dsp']:7.0f} {est['bram36']:7.1f} {est['uram']:5.0f} {est['carry']:7.0f}  "
                  f"estimate")


if __name__ == "__main__":
    sys.exit(main())
