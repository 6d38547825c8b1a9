"""GPTQ seconds (and peak memory) per decoder layer, quiet and with one competing CPU-bound process.

A layer is the seven linears of a Llama decoder layer with random weights (shapes from ``--shape``:
``smollm2-135m`` hidden 576 / intermediate 1536 / 9 heads, 3 KV heads; ``llama2-7b`` hidden 4096 /
intermediate 11008 / 32 heads, 32 KV heads), quantized with the ``w2a8kv4`` recipe's weight settings
(GPTQ W2 g64, act-order, clipping search) through ``quant.algorithms.quantize_linear``, the call the
pipeline makes per linear. The Hessians come from random activations with a log-normal spread of channel
scales (``--tokens`` calibration tokens); GPTQ's cost depends on the shapes, not on the values.

Every configuration runs in a fresh Python process, because OMP_WAIT_POLICY is read once when torch's
OpenMP runtime loads. ``--competitor`` starts one CPU-bound process (a pure-Python busy loop) for the
run and stops it after. /proc/loadavg is recorded before and after each run: on a shared machine
"quiet" means what that says.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gptq_speed.py --out benchmarks/results/gptq_speed.json
    .venv/bin/python benchmarks/gptq_speed.py --shape llama2-7b --configs 2:passive --competitor none \
        --layers 1 --out benchmarks/results/gptq_7b_layer.json

A configuration is THREADS:POLICY (policy passive, active or default: whatever the environment has).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from quant.atomic import write_json  # noqa: E402

SHAPES = {  # (hidden, intermediate, heads, kv heads, head_dim); sources: the models' config.json
    "smollm2-135m": (576, 1536, 9, 3, 64),     # HuggingFaceTB/SmolLM2-135M config.json
    "llama2-7b": (4096, 11008, 32, 32, 128),   # meta-llama/Llama-2-7b-hf config.json
}


def linears(shape: str) -> list[tuple[str, int, int]]:
    """(name, out_features, in_features) of one decoder layer."""
    h, i, nh, nkv, hd = SHAPES[shape]
    return [("q_proj", nh * hd, h), ("k_proj", nkv * hd, h), ("v_proj", nkv * hd, h), ("o_proj", h, nh * hd),
            ("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)]


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


# ---------------------------------------------------------------------------------------------------
def child(args) -> dict:
    """One configuration, in this process: torch is imported here, after the wait policy was set."""
    import resource

    import torch

    sys.path.insert(0, str(REPO))
    from accllm.config import load_recipe
    from quant import algorithms
    from quant.recipe import QuantizeWeights

    torch.set_num_threads(args.threads)
    qcfg = load_recipe("w2a8kv4").get(QuantizeWeights)
    g = torch.Generator().manual_seed(args.seed)
    layers = []
    for layer in range(args.layers):
        per, stats_s = {}, 0.0
        hess: dict[int, torch.Tensor] = {}
        for name, n_out, k in linears(args.shape):
            if k not in hess or name in ("q_proj", "o_proj", "gate_proj", "down_proj"):
                t0 = time.perf_counter()
                scale = torch.exp(0.7 * torch.randn(k, generator=g))  # channel spread, as in real activations
                H = torch.zeros(k, k, dtype=torch.float64)
                for s in range(0, args.tokens, 512):  # the pipeline's hook: XᵀX in float64, by chunks
                    x = (torch.randn(min(512, args.tokens - s), k, generator=g) * scale).to(torch.float64)
                    H += x.T @ x
                hess[k] = 2.0 * H / args.tokens
                stats_s += time.perf_counter() - t0
            W = torch.randn(n_out, k, generator=g) * 0.02
            t0 = time.perf_counter()
            algorithms.quantize_linear(W, hess[k], None, qcfg)
            per[name] = round(time.perf_counter() - t0, 3)
            print(json.dumps({"layer": layer, "linear": name, "seconds": per[name], "cpu_seconds": round(time.process_time(), 1),
                              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}),
                  file=sys.stderr, flush=True)
        layers.append({"gptq_seconds": round(sum(per.values()), 2), "per_linear": per,
                       "hessian_seconds": round(stats_s, 2), "cpu_seconds_so_far": round(time.process_time(), 1)})
        print(json.dumps({"layer": layer, **layers[-1]}), file=sys.stderr, flush=True)
    return {"threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
            "layers": layers, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "torch": torch.__version__}


def run_config(cfg: str, competitor: bool, args) -> dict:
    threads, policy = cfg.split(":")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("OMP_WAIT_POLICY", None)
    env["OMP_NUM_THREADS"] = threads
    if policy in ("passive", "active"):
        env["OMP_WAIT_POLICY"] = policy.upper()
    elif policy != "default":
        raise SystemExit(f"configuration {cfg!r}: policy must be passive, active or default")
    busy = None
    if competitor:
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(1.0)
    before = loadavg()
    t0 = time.time()
    try:
        with tempfile.NamedTemporaryFile("r", suffix=".json") as res:
            subprocess.run([sys.executable, __file__, "--child", "--threads", threads, "--shape", args.shape,
                            "--layers", str(args.layers), "--tokens", str(args.tokens), "--seed", str(args.seed),
                            "--child-out", res.name], env=env, check=True)
            out = json.loads(Path(res.name).read_text())
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    per_layer = [l["gptq_seconds"] for l in out["layers"]]
    return {"config": cfg, "competitor": competitor, "loadavg_before": before, "loadavg_after": loadavg(),
            "wall_seconds": round(time.time() - t0, 1), "gptq_seconds_per_layer": per_layer,
            "median_gptq_seconds_per_layer": sorted(per_layer)[len(per_layer) // 2], **out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2-135m", choices=list(SHAPES))
    ap.add_argument("--configs", default="2:default,2:passive,1:passive",
                    help="comma-separated THREADS:POLICY (policy: passive, active, default)")
    ap.add_argument("--competitor", default="none,one", help="comma-separated: none, one")
    ap.add_argument("--layers", type=int, default=3, help="layers per run (the median is reported)")
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens behind each Hessian")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON results (written atomically)")
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        Path(args.child_out).write_text(json.dumps(child(args)))
        return 0
    comps = [c.strip() for c in args.competitor.split(",") if c.strip()]
    if set(comps) - {"none", "one"}:
        ap.error(f"--competitor: none and/or one, got {args.competitor!r}")
    runs = []
    for comp in comps:
        for cfg in [c.strip() for c in args.configs.split(",") if c.strip()]:
            r = run_config(cfg, comp == "one", args)
            runs.append(r)
            print(json.dumps({k: r[k] for k in ("config", "competitor", "loadavg_before", "loadavg_after",
                                                 "gptq_seconds_per_layer", "peak_rss_bytes")}), flush=True)
    res = {"shape": args.shape, "linears": linears(args.shape), "tokens": args.tokens,
           "cpus_available": len(os.sched_getaffinity(0)), "cpu": platform.processor() or platform.machine(),
           "command": "python benchmarks/gptq_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "runs": runs}
    if args.out:
        out = Path(args.out)
        write_json(out, res, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
