"""A whole quantized Llama generating tokens on the accelerator's Verilog under Verilator, as a benchmark:
``sim.model_check.simulate_model`` (what ``accllm simulate model`` runs) on an artifact, a prompt and a
token count, with the wall time of every stage, the RTL's simulated cycles per wall second, the load
average, the command, the commit and the tool versions written to a JSON file.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/rtl_model.py \\
        --artifact /tmp/lead/demo/quantize/artifact --hw configs/hw/ci-small-smollm2.yaml \\
        --prompt-ids 1,504,3458,314 --tokens 3 --out benchmarks/results/rtl_smollm2.json

Exit status 1 when the RTL's tokens are not bit-exact (the JSON is written either way).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGET_S_PER_TOKEN = 600.0  # issue 12: under 10 minutes of wall time per generated token on 2 cores


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version()}
    for pkg in ("amaranth", "numpy", "torch", "verilator", "cocotb"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _peak_rss_mb() -> dict:
    import resource
    return {"self": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "children": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifact", default="/tmp/lead/demo/quantize/artifact", help="a packed W2A8KV4 artifact")
    ap.add_argument("--hw", default=str(ROOT / "configs/hw/ci-small-smollm2.yaml"),
                    help="hardware config: ci-small, u280 or a YAML path")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--prompt", help="prompt text (tokenized with the artifact's tokenizer)")
    g.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,504,3458,314")
    ap.add_argument("--tokens", type=int, default=3, help="tokens to generate (prefill's token included)")
    ap.add_argument("--sim", default="verilator", choices=["verilator", "icarus", "amaranth"])
    ap.add_argument("--trace", default="layers", help="what the program stores for comparison (hw.compile)")
    ap.add_argument("--stall-profile", default="asymmetric")
    ap.add_argument("--max-cycles", type=int, default=4_000_000_000, help="the RTL's cycle budget")
    ap.add_argument("--build-dir", default=str(ROOT / "build" / "sim"), help="run folders (a SmolLM2 run leaves 1.4 GB of image files)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/rtl_smollm2.json"))
    args = ap.parse_args(argv)
    if args.tokens < 1:
        ap.error(f"--tokens {args.tokens}: generate at least one token")
    prompt_ids = None
    if args.prompt_ids is not None:
        try:
            prompt_ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            ap.error(f"--prompt-ids {args.prompt_ids!r}: give comma-separated integers, e.g. 1,504,3458,314")
    elif args.prompt is None:
        prompt_ids = [1, 504, 3458, 314]
    if not Path(args.artifact).is_dir():
        ap.error(f"--artifact {args.artifact}: no such folder (a packed artifact from `accllm quantize`)")

    from accllm.config import load_hw
    from sim.model_check import simulate_model

    cfg = load_hw(args.hw)
    commit = _git_commit()  # at the start: the sources this run imports and builds
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    res = simulate_model(args.artifact, cfg.engine, cfg.accelerator, args.sim, args.prompt, args.tokens,
                         prompt_ids=prompt_ids, trace=args.trace, stall_profile=args.stall_profile,
                         build_dir=args.build_dir, progress=False, max_cycles=args.max_cycles)
    wall = time.perf_counter() - t0
    from sim.accel_sim import LAST_BUILD_SECONDS

    stage = res["stage_wall_s"]
    rtl_stage = next(v for k, v in stage.items() if k.startswith("RTL"))
    per_token_rtl = rtl_stage / args.tokens
    out = {
        "command": "OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python " + shlex.join(
            ["benchmarks/rtl_model.py"] + (sys.argv[1:] if argv is None else list(argv))),
        "git_commit": commit,
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.machine()},
        "tool_versions": _versions(),
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "artifact": str(args.artifact),
        "hw": args.hw,
        "engine": {k: getattr(cfg.engine, k) for k in ("pe_rows", "pe_lanes", "mm_tokens")},
        "accelerator": {"mem_word_bits": cfg.accelerator.mem_word_bits, "spad_words": cfg.accelerator.spad_words},
        "simulator": args.sim,
        "prompt_ids": prompt_ids,
        "tokens": args.tokens,
        "bit_exact": res["bit_exact"],
        "tokens_rtl": res["tokens_rtl"],
        "tokens_golden": res["tokens_reference"],
        "tokens_torch_integer": res["tokens_torch_integer"],
        "tokens_machine": res["tokens_machine"],
        "first_mismatch": res["first_mismatch"],
        "cycles_prefill": res["cycles_prefill"],
        "cycles_per_token": res["cycles_per_token"],
        "rtl_cycles": res["rtl_cycles"],
        "machine_cycles_estimate": res.get("machine_cycles_estimate"),
        "hbm_bytes_per_token": res["hbm_bytes_per_token"],
        "instructions": res["instructions"],
        "wall_s": round(wall, 1),
        "stage_wall_s": stage,
        "rtl_verilator_build_s": round(LAST_BUILD_SECONDS[0], 1),
        "rtl_sim_process_wall_s": res["rtl_wall_s"],
        "rtl_sim_process_cpu_s": res.get("rtl_cpu_s"),
        "rtl_cycles_per_wall_s": round(res["rtl_cycles"] / max(res["rtl_wall_s"], 1e-9)),
        "wall_s_per_generated_token": round(wall / args.tokens, 1),
        "rtl_stage_wall_s_per_generated_token": round(per_token_rtl, 1),
        "target_wall_s_per_token": TARGET_S_PER_TOKEN,
        "meets_target": bool(wall / args.tokens < TARGET_S_PER_TOKEN),
        "peak_rss_mb": _peak_rss_mb(),
        "text_rtl": res.get("text_rtl"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0 if res["bit_exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
