"""Issue 10's throughput targets at the u280 size, from the engine's cycle model (hw/engine_model.py,
held equal to the RTL's cycle counts by tests/hw/test_engine_model.py): the u280 engine (256 rows) is
too large to simulate whole, so its cycles come from the model the RTL is checked against.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/engine_targets.py
        # -> benchmarks/results/engine_targets.json (a second; --hw, --out)

The targets (issue 10, "Throughput targets"):
* decode keeps up with HBM in dense and 2:4 modes: the weight bytes the array consumes per cycle at
  its own rate >= what 85 % of the HBM bandwidth delivers per cycle at the engine clock (the array is
  never the bottleneck);
* QK and PV on a 512-slot Λ cache, head_dim 64 and 128: >= 80 % of the array's peak
  (pe_rows x pe_lanes MACs per cycle), one token (decode) and mm_tokens tokens (prefill);
* prefill MACs per cycle reported per mode.
Each op is timed as 8 identical commands back to back (the steady rate: the command, activation load
and pipeline fill of one command overlap nothing, as in the RTL); MACs count kept weights only in 2:4.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accllm.config import load_hw  # noqa: E402
from hw.engine_model import Op, sequence_cycles  # noqa: E402
from hw.engine_parts import beat_ops, Mode  # noqa: E402
from quant.atomic import write_json  # noqa: E402
from quant.formats import SPARSE_M, SPARSE_N, weight_bits_per_weight  # noqa: E402

HBM_EFFICIENCY = 0.85  # the 85 % of the theoretical bandwidth
ATTN_TARGET = 0.80
CACHE_SLOTS = 512  # Λ 4 sinks + 508 window
GROUP = 64
REPEAT = 8


def steady(p, op: Op) -> dict:
    cyc = sequence_cycles(p, [op] * REPEAT)[-1]
    macs = op.tokens * op.k * op.n * (SPARSE_N / SPARSE_M if op.mode == "sparse" else 1)
    peak = p.pe_rows * p.pe_lanes
    return {"mode": op.mode, "tokens": op.tokens, "k": op.k, "n": op.n, "cycles": cyc,
            "macs": int(macs), "macs_per_cycle": round(macs / cyc, 1), "of_peak": round(macs / cyc / peak, 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hw", default="u280")
    ap.add_argument("--out", default=None, help="default benchmarks/results/engine_targets.json (u280) or "
                                                "engine_targets-HW.json")
    args = ap.parse_args(argv)
    hw = load_hw(args.hw)
    p, t = hw.engine, hw.target
    out_path = Path(args.out) if args.out else ROOT / "benchmarks/results" / (
        "engine_targets.json" if args.hw == "u280" else f"engine_targets-{args.hw}.json")
    hbm_bytes = t.hbm_bandwidth_gbps * 1e9 * HBM_EFFICIENCY / (t.clock_mhz * 1e6)

    decode = []
    for mode, sparse in (("dense", False), ("sparse", True)):
        k = n = 32 * p.pe_lanes * 4  # a 4096 x 4096 linear at u280 (multiple of the beat and the group)
        row = steady(p, Op(mode, 1, k, n, GROUP))
        bits = weight_bits_per_weight(GROUP, sparse=sparse)
        positions_per_cycle = row["macs_per_cycle"] * (SPARSE_M / SPARSE_N if sparse else 1)
        need = positions_per_cycle * bits / 8
        row |= {"bits_per_position": bits, "positions_per_cycle": positions_per_cycle,
                "array_bytes_per_cycle": round(need, 1), "hbm_bytes_per_cycle": round(hbm_bytes, 1),
                "array_ops_per_beat": beat_ops(p, Mode[mode.upper()], False),
                "keeps_up_with_hbm": need >= hbm_bytes}
        decode.append(row)

    attention = []
    for d in (64, 128):
        for tokens in (1, p.mm_tokens):
            for op in (Op("qk", tokens, d, CACHE_SLOTS), Op("pv", tokens, CACHE_SLOTS, d)):
                if op.k > (p.max_head_dim if op.mode == "qk" else p.max_keys):
                    continue
                row = steady(p, op) | {"head_dim": d}
                row["meets_target"] = row["of_peak"] >= ATTN_TARGET
                attention.append(row)

    prefill = [steady(p, Op(m, p.mm_tokens, 4096, 4096, GROUP)) for m in ("dense", "sparse")]
    prefill += [steady(p, Op("dense", p.mm_tokens, 4096, 4096, GROUP, code_bits=4)) | {"mode": "dense W4"}]

    res = {
        "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/engine_targets.py"
                   + (f" --hw {args.hw}" if args.hw != "u280" else ""),
        "hw": args.hw, "engine": dataclasses.asdict(p),
        "method": "hw.engine_model.sequence_cycles (the RTL's cycle model, tests/hw/test_engine_model.py), "
                  f"{REPEAT} identical commands back to back, the last one's cycles; no stalls",
        "peak_macs_per_cycle": p.pe_rows * p.pe_lanes,
        "hbm": {"bandwidth_gbps": t.hbm_bandwidth_gbps, "efficiency": HBM_EFFICIENCY, "clock_mhz": t.clock_mhz,
                "bytes_per_cycle": round(hbm_bytes, 1)},
        "decode": decode, "attention": attention, "prefill": prefill,
        "targets_met": {"decode_keeps_up_with_hbm": all(r["keeps_up_with_hbm"] for r in decode),
                        "attention_80_percent": all(r["meets_target"] for r in attention)},
    }
    write_json(out_path, res)
    print(f"{args.hw}: peak {res['peak_macs_per_cycle']} MACs/cycle; HBM at 85 %: {hbm_bytes:.0f} B/cycle")
    for r in decode:
        print(f"  decode {r['mode']:6s}: {r['macs_per_cycle']:7.1f} MACs/cycle, needs {r['array_bytes_per_cycle']:.0f} "
              f"B/cycle ({'keeps up' if r['keeps_up_with_hbm'] else 'the array binds'})")
    for r in attention:
        print(f"  {r['mode']} head_dim {r['head_dim']:3d} x {r['tokens']} token(s), {CACHE_SLOTS} slots: "
              f"{r['of_peak']:.1%} of peak ({r['cycles']} cycles)")
    for r in prefill:
        print(f"  prefill {r['mode']:8s}: {r['macs_per_cycle']:7.1f} MACs/cycle ({r['of_peak']:.1%})")
    print(f"targets: {res['targets_met']}; wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
