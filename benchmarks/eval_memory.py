"""Peak memory of an evaluation, the whole model loaded against the decoder layers streamed one at a time
(``accllm eval --stream-layers``), on a float checkpoint with Llama-2-7B-shaped layers and random weights.

The checkpoint has ``gptq_speed.SHAPES["llama2-7b"]``'s layer (hidden 4096, intermediate 11008, 32 heads,
32 KV heads, head_dim 128), vocab 32000 and an untied lm_head, stored in float16 as Llama-2-7B's own
safetensors are (the evaluation holds float32), one safetensors shard per decoder layer; it is written
tensor by tensor, so the builder holds one tensor at a time. The model with fewer layers is a folder with
its own config.json and links to the first shards. The tokenizer is tests/quant/tiny_llama.py's byte-level
BPE (ids below 32000): the tokens' values do not change the memory.

Every (layers, mode) evaluation runs in a fresh Python process (``quant.evaluate.evaluate`` on the float
path, one thread), which reports its peak RSS (``getrusage`` ru_maxrss: the process's high-water mark)
and its per-window losses; the JSON says whether streamed and whole gave the same losses exactly.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/eval_memory.py \
        --layers 2,4 --seq-len 128 --max-tokens 512 --out benchmarks/results/eval_memory.json

(about 10 minutes on one core here; the checkpoint, about 2.1 GB for 4 layers, goes to a temporary folder
under --work, removed at the end.)
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

from benchmarks.gptq_speed import SHAPES, linears, loadavg  # noqa: E402
from quant.atomic import write_json  # noqa: E402

VOCAB = 32000  # meta-llama/Llama-2-7b-hf config.json


def build(folder: Path, n_layers: int, shape: str = "llama2-7b", seed: int = 0) -> None:
    """A float16 checkpoint with ``n_layers`` random layers of ``shape``: model-common.safetensors
    (embedding, final norm, lm_head) and model-layer{i}.safetensors, each tensor drawn and written alone."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(REPO / "tests" / "quant"))
    from tiny_llama import _tokenizer

    h, inter, nh, nkv, hd = SHAPES[shape]
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)

    def rnd(n, k):
        return (torch.randn(n, k, generator=g) * k ** -0.5).to(torch.float16)

    save_file({"model.embed_tokens.weight": rnd(VOCAB, h), "model.norm.weight": torch.ones(h, dtype=torch.float16),
               "lm_head.weight": rnd(VOCAB, h)}, str(folder / "model-common.safetensors"))
    for i in range(n_layers):
        t = {f"model.layers.{i}.{n}.weight": torch.ones(h, dtype=torch.float16)
             for n in ("input_layernorm", "post_attention_layernorm")}
        for name, n_out, k in linears(shape):
            part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            t[f"model.layers.{i}.{part}.{name}.weight"] = rnd(n_out, k)
        save_file(t, str(folder / f"model-layer{i}.safetensors"))
        del t
    config(folder, n_layers, shape)
    _tokenizer(VOCAB).save_pretrained(str(folder))


def config(folder: Path, n_layers: int, shape: str) -> None:
    from transformers import LlamaConfig

    h, inter, nh, nkv, hd = SHAPES[shape]
    LlamaConfig(vocab_size=VOCAB, hidden_size=h, intermediate_size=inter, num_hidden_layers=n_layers,
                num_attention_heads=nh, num_key_value_heads=nkv, head_dim=hd, max_position_embeddings=4096,
                tie_word_embeddings=False, rope_theta=10000.0, bos_token_id=0, eos_token_id=0,
                torch_dtype="float16").save_pretrained(str(folder))


def fewer_layers(full: Path, folder: Path, n_layers: int, shape: str) -> None:
    """``full``'s first n_layers as a folder of links to its shards, with its own config.json."""
    folder.mkdir(parents=True)
    for f in full.iterdir():
        if f.name.startswith("model-layer") and int(f.name[len("model-layer"):].split(".")[0]) >= n_layers:
            continue
        if f.name != "config.json":
            (folder / f.name).symlink_to(f)
    config(folder, n_layers, shape)


def child(args) -> dict:
    import resource

    import torch

    from quant.evaluate import evaluate

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    res = evaluate(args.model, args.text, seq_len=args.seq_len, max_tokens=args.max_tokens, integer_path=False,
                   progress=False, bootstrap=0, stream_layers=args.stream)
    return {"seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024,
            "perplexity": res["perplexity"], "tokens": res["tokens"], "windows": res["windows"],
            "window_nll": res["window_nll"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default="2,4", help="decoder layer counts, comma-separated")
    ap.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--text", default=None, help="evaluation text (default: the built-in excerpt)")
    ap.add_argument("--work", default=None, help="folder for the temporary checkpoint (default: the system's)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "eval_memory.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    counts = sorted({int(x) for x in args.layers.split(",") if x.strip()})
    if not counts or counts[0] < 1:
        ap.error(f"--layers {args.layers!r}: give positive layer counts such as 2,4")
    runs = []
    with tempfile.TemporaryDirectory(prefix="accllm-eval-memory-", dir=args.work) as tmp:
        full = Path(tmp) / f"L{counts[-1]}"
        t0 = time.perf_counter()
        build(full, counts[-1], args.shape)
        build_s = round(time.perf_counter() - t0, 1)
        print(f"built {full} in {build_s} s", flush=True)
        for n in counts:
            folder = full if n == counts[-1] else Path(tmp) / f"L{n}"
            if not folder.exists():
                fewer_layers(full, folder, n, args.shape)
            for stream in (False, True):
                cmd = [sys.executable, __file__, "--child", "--model", str(folder), "--seq-len", str(args.seq_len),
                       "--max-tokens", str(args.max_tokens)] + (["--text", args.text] if args.text else []) + \
                      (["--stream"] if stream else [])
                before = loadavg()
                p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                if p.returncode:
                    sys.stderr.write(p.stderr)
                    raise SystemExit(f"the {n}-layer {'streamed' if stream else 'whole'} evaluation failed")
                r = json.loads(p.stdout.strip().splitlines()[-1])
                r.update({"layers": n, "mode": "streamed" if stream else "whole", "loadavg_before": before,
                          "loadavg_after": loadavg()})
                runs.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "window_nll"}), flush=True)
    by = {(r["layers"], r["mode"]): r for r in runs}
    equal = {str(n): by[(n, "whole")]["window_nll"] == by[(n, "streamed")]["window_nll"] for n in counts}
    h, inter, nh, nkv, hd = SHAPES[args.shape]
    layer_params = sum(o * k for _, o, k in linears(args.shape)) + 2 * h
    out = {"benchmark": "eval_memory", "shape": args.shape,
           "model": {"hidden": h, "intermediate": inter, "heads": nh, "kv_heads": nkv, "head_dim": hd,
                     "vocab": VOCAB, "tied": False, "stored": "float16", "evaluated": "float32"},
           "float32_bytes": {"layer": 4 * layer_params, "embedding": 4 * VOCAB * h, "lm_head": 4 * VOCAB * h},
           "seq_len": args.seq_len, "max_tokens": args.max_tokens, "threads": 1, "build_seconds": build_s,
           "streamed_equals_whole": equal, "runs": runs,
           "command": "OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/eval_memory.py "
                      + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()}}
    write_json(args.out, out)
    print(f"wrote {args.out}; streamed == whole: {equal}")
    return 0 if all(equal.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
