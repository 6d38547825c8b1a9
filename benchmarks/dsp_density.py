"""Arithmetic density at the u280 lane width: LUT / FF / DSP per W2 x A8 product, by Yosys.

Measured designs (each a slice of ``--rows`` rows x 32 lanes, every input and output a top-level
port, synthesized flat with ``synth_xilinx -family xcup``; bitstream/yosys.py):

* ``engine_lut``: today's array cell, ``hw.engine.ArraySlice`` (hw.mult ``lut`` pieces: 4-bit code
  lanes, the 2:4 candidate selects), rows x 32 lanes.
* ``mult_lut_w2``: ``hw.mult.ColumnArray`` in ``lut`` style with 2-bit codes: a dense-W2-only LUT array
  (the best case for LUTs).
* ``packed_w2x3``: ``hw.dsp.W2x3`` cells, 3 rows per DSP48E2, one shared activation per lane.
* ``sparse24_w2x3``: 2:4 weights expanded on the weight side (``hw.dsp.Expand24``, 8 groups per row
  of 32 positions) feeding the same ``W2x3`` cells.
* ``packed_w2x2x2``: ``hw.dsp.W2x2x2`` cells, 2 rows x 2 tokens per DSP48E2, 32 lanes.

The whole-array projection for 256 x 32 multiplies the per-instance cost of these slices by the
instance count (``ceil(256 / 3) * 32`` W2x3 cells, ``256 * 8`` Expand24 groups, 8,192 lut products):
a projection from sub-components synthesized once, not a synthesis of the array.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dsp_density.py
writes benchmarks/results/dsp_density.json (temporary name, then moved into place).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from amaranth.hdl import Elaboratable, Module, Signal, signed  # noqa: E402

from bitstream.yosys import estimate, yosys_version  # noqa: E402
from hw import dsp as D  # noqa: E402
from quant.atomic import write_json  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "dsp_density.json"
U280 = {"lut": 1_303_680, "ff": 2_607_360, "dsp": 9_024}  # xcu280 totals (as benchmarks/resources.py)
LANES = 32     # configs/hw/u280.yaml pe_lanes
ROWS = 256     # configs/hw/u280.yaml pe_rows
KEYS = ("lut", "ff", "dsp", "carry")


class PackedSlice(Elaboratable):
    """``rows`` rows x ``lanes`` lanes of W2x3 cells: lane j's activation shared by its column."""

    def __init__(self, rows: int, lanes: int, sparse: bool = False):
        if rows % D.ROWS_PER_DSP:
            raise ValueError(f"rows must be a multiple of {D.ROWS_PER_DSP}, got {rows}")
        self.rows, self.lanes, self.sparse = rows, lanes, sparse
        self.act = [Signal(signed(8), name=f"a{j}") for j in range(lanes)]
        self.en = Signal()
        if sparse:
            self.kept = [[Signal(4, name=f"k{r}_{g}") for g in range(lanes // 4)] for r in range(rows)]
            self.meta = [[Signal(3, name=f"m{r}_{g}") for g in range(lanes // 4)] for r in range(rows)]
            self.bad = [Signal(name=f"bad{r}_{g}") for r in range(rows) for g in range(lanes // 4)]
            ins = [s for row in self.kept for s in row] + [s for row in self.meta for s in row]
        else:
            self.codes = [[Signal(2, name=f"c{r}_{j}") for j in range(lanes)] for r in range(rows)]
            self.bad = []
            ins = [s for row in self.codes for s in row]
        self.out = [[Signal(10, name=f"p{r}_{j}") for j in range(lanes)] for r in range(rows)]
        self.ports = self.act + [self.en] + ins + self.bad + [s for row in self.out for s in row]

    def elaborate(self, platform):
        m = Module()
        codes = [[None] * self.lanes for _ in range(self.rows)]
        if self.sparse:
            k = 0
            for r in range(self.rows):
                for g in range(self.lanes // 4):
                    e = m.submodules[f"x{r}_{g}"] = D.Expand24()
                    m.d.comb += [e.kept.eq(self.kept[r][g]), e.meta.eq(self.meta[r][g]),
                                 self.bad[k].eq(e.invalid)]
                    k += 1
                    for p in range(4):
                        codes[r][4 * g + p] = e.codes[p]
        else:
            codes = self.codes
        for r0 in range(0, self.rows, D.ROWS_PER_DSP):
            for j in range(self.lanes):
                c = m.submodules[f"d{r0}_{j}"] = D.W2x3()
                m.d.comb += [c.act.eq(self.act[j]), c.en.eq(self.en)]
                for i in range(D.ROWS_PER_DSP):
                    m.d.comb += [c.codes[i].eq(codes[r0 + i][j]), self.out[r0 + i][j].eq(c.offset_products[i])]
        return m


class TwoTokenSlice(Elaboratable):
    """``pairs`` row pairs x ``lanes`` lanes of W2x2x2 cells: 2 tokens per lane shared down the
    column (Yosys merges the cells' identical B = a0 + a1 * 2**10 adders of one lane), 4 products
    per cell."""

    def __init__(self, lanes: int, pairs: int = 1):
        self.lanes, self.pairs = lanes, pairs
        self.act = [[Signal(signed(8), name=f"a{t}_{j}") for j in range(lanes)] for t in range(2)]
        self.codes = [[[Signal(2, name=f"c{q}_{r}_{j}") for j in range(lanes)] for r in range(2)]
                      for q in range(pairs)]
        self.en = Signal()
        self.out = [[[Signal(signed(10), name=f"p{q}_{f}_{j}") for j in range(lanes)] for f in range(4)]
                    for q in range(pairs)]
        self.refused = [Signal(name=f"ref{q}_{j}") for q in range(pairs) for j in range(lanes)]
        self.ports = ([s for t in self.act for s in t] + [s for q in self.codes for r in q for s in r]
                      + [self.en] + [s for q in self.out for f in q for s in f] + self.refused)

    def elaborate(self, platform):
        m = Module()
        for q in range(self.pairs):
            for j in range(self.lanes):
                c = m.submodules[f"d{q}_{j}"] = D.W2x2x2()
                m.d.comb += [c.act[0].eq(self.act[0][j]), c.act[1].eq(self.act[1][j]),
                             c.codes[0].eq(self.codes[q][0][j]), c.codes[1].eq(self.codes[q][1][j]),
                             c.en.eq(self.en), self.refused[q * self.lanes + j].eq(c.refused)]
                m.d.comb += [self.out[q][f][j].eq(c.products[f]) for f in range(4)]
        return m


def designs(rows: int):
    from hw.engine import ArraySlice
    from hw.mult import ColumnArray
    return {
        "engine_lut": (ArraySlice(rows, LANES // 2), rows * LANES,
                       f"hw.engine.ArraySlice({rows}, {LANES // 2}): today's array cell, {rows} x {LANES}"),
        "mult_lut_w2": (ColumnArray(rows, LANES, 2, "lut"), rows * LANES,
                        f"hw.mult.ColumnArray({rows}, {LANES}, 2, 'lut'): dense W2 LUT columns"),
        "packed_w2x3": (PackedSlice(rows, LANES), rows * LANES,
                        f"{rows // 3} x {LANES} hw.dsp.W2x3 cells ({rows} rows x {LANES} lanes)"),
        "sparse24_w2x3": (PackedSlice(rows, LANES, sparse=True), rows * LANES,
                          f"{rows} x {LANES // 4} hw.dsp.Expand24 + {rows // 3} x {LANES} hw.dsp.W2x3"),
        "packed_w2x2x2": (TwoTokenSlice(LANES, 1), 4 * LANES,
                          f"{LANES} hw.dsp.W2x2x2 cells (2 rows x 2 tokens x {LANES} lanes)"),
        "packed_w2x2x2_4rows": (TwoTokenSlice(LANES, 2), 8 * LANES,
                                f"{2 * LANES} hw.dsp.W2x2x2 cells (4 rows x 2 tokens x {LANES} lanes)"),
    }


def project(meas: dict, rows: int) -> dict:
    """Whole-array (256 x 32) projection from the slices: per-instance cost x instance count."""
    out = {}
    dsp_rows = math.ceil(ROWS / D.ROWS_PER_DSP)          # 86 DSP rows, the last one 1/3 used
    if "engine_lut" in meas:
        e = meas["engine_lut"]
        out["engine_lut"] = {k: round(e[k] / e["products"] * ROWS * LANES) for k in KEYS} | {
            "how": f"per product of the {rows} x {LANES} slice x {ROWS * LANES} products"}
    if "packed_w2x3" in meas:
        p = meas["packed_w2x3"]
        cells = p["dsp"]
        per_cell = {k: p[k] / cells for k in KEYS}
        out["packed_w2x3"] = {k: round(per_cell[k] * dsp_rows * LANES) for k in KEYS} | {
            "how": f"per W2x3 cell of the slice ({cells} cells) x {dsp_rows} x {LANES} cells"}
    if "sparse24_w2x3" in meas and "packed_w2x3" in meas:
        s, p = meas["sparse24_w2x3"], meas["packed_w2x3"]
        expand = {k: (s[k] - p[k]) / (rows * LANES // 4) for k in KEYS}  # per Expand24 group
        out["sparse24_w2x3"] = {k: round(out["packed_w2x3"][k] + expand[k] * ROWS * LANES // 4) for k in KEYS} | {
            "how": f"packed_w2x3 projection + (sparse24 - packed slice) per group x {ROWS * LANES // 4} groups",
            "per_group": {k: round(v, 3) for k, v in expand.items()}}
    if "packed_w2x2x2" in meas and "packed_w2x2x2_4rows" in meas:
        one, two = meas["packed_w2x2x2"], meas["packed_w2x2x2_4rows"]
        per_cell = {k: (two[k] - one[k]) / LANES for k in KEYS}       # a second row pair's cells
        per_lane = {k: (one[k] - per_cell[k] * LANES) / LANES for k in KEYS}  # shared per lane
        cells = ROWS // 2 * LANES
        out["packed_w2x2x2"] = {k: round(per_cell[k] * cells + per_lane[k] * LANES) for k in KEYS} | {
            "how": (f"(4-row slice - 2-row slice) / {LANES} per cell x {cells} cells + the rest of the "
                    f"2-row slice per lane x {LANES} lanes (the shared B adder)"),
            "per_cell": {k: round(v, 3) for k, v in per_cell.items()},
            "per_lane": {k: round(v, 3) for k, v in per_lane.items()},
            "products_per_cycle": 4 * cells}
    for v in out.values():
        v["u280_fraction"] = {k: round(v[k] / U280[k], 4) for k in ("lut", "ff", "dsp")}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=3, help="rows of each slice (a multiple of 3)")
    ap.add_argument("--only", nargs="*", help="measure only these designs")
    ap.add_argument("--timeout", type=float, default=1200)
    args = ap.parse_args(argv)
    meas = {}
    for name, (design, products, what) in designs(args.rows).items():
        if args.only and name not in args.only:
            continue
        t0 = time.monotonic()
        res = estimate(design, timeout_s=args.timeout)
        meas[name] = {k: res[k] for k in KEYS} | {
            "products": products, "what": what, "cells": res["cells"], "yosys_seconds": res["seconds"],
            "cached": res["cached"], "per_product": {k: round(res[k] / products, 3) for k in KEYS}}
        print(f"{name}: {what}: " + ", ".join(f"{k} {res[k]:g} ({res[k] / products:.2f}/product)" for k in KEYS)
              + f" [{res['seconds']:.0f} s{' cached' if res['cached'] else ''}, {time.monotonic() - t0:.0f} s]",
              flush=True)
    data = json.loads(OUT.read_text()) if OUT.exists() else {}
    data.setdefault("slices", {}).update(meas)
    data["projection_256x32"] = project(data["slices"], args.rows)
    data["rows"] = args.rows
    data["lanes"] = LANES
    data["tool"] = yosys_version()
    data["script"] = "read_rtlil design.il; synth_xilinx -family xcup -top top -noiopad -uram -flatten; stat -json"
    data["command"] = f"OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dsp_density.py --rows {args.rows}"
    data["note"] = ("Yosys 0.70 maps each W2x3/W2x2x2 product to a DSP48E2 but does not absorb the "
                    "A/B/M/P stage registers for -family xcup: their FFs are counted in fabric here. "
                    "The projection multiplies slice costs by instance counts; it is not a synthesis "
                    "of the 256 x 32 array.")
    write_json(OUT, data)
    for name, v in data["projection_256x32"].items():
        print(f"projection {name}: " + ", ".join(f"{k} {v[k]:,}" for k in KEYS)
              + f" (LUT {100 * v['u280_fraction']['lut']:.1f} %, DSP {100 * v['u280_fraction']['dsp']:.1f} %)")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
