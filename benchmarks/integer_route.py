"""The cost of the fixed-point special functions: one artifact's perplexity on the float route (the
hardware's quantized products with float RMSNorm/RoPE/softmax/SiLU) and on the integer route (the whole
decoder in integers, quant.integer), on the same windows.

    .venv/bin/python benchmarks/integer_route.py ARTIFACT [--max-tokens 4096] [--seq-len 512]
        [--text FILE] [--out benchmarks/results/integer_route.json]

An artifact whose embedding table is float gets the recipe's int8 table (reference.quantize_embedding)
on both routes, so they compare like with like. Seconds are wall time; the JSON records the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant.atomic import write_json  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--text", default=None)
    ap.add_argument("--out", default="benchmarks/results/integer_route.json")
    args = ap.parse_args(argv)
    import torch

    from quant import reference as R
    from quant.artifact import load_artifact
    from quant.evaluate import perplexity

    model, tok = load_artifact(args.artifact)
    table = "artifact"
    if model.embed_q is None:
        model.embed_q = R.quantize_embedding(model.embed_tokens.detach().numpy())
        c, s = model.embed_q
        model.embed_tokens.data = torch.from_numpy((c.astype("float64") * s[:, None]).astype("float32"))
        table = "quantized on load (reference.quantize_embedding)"
    out = {"command": "python benchmarks/integer_route.py " + " ".join(argv or sys.argv[1:]),
           "artifact": str(args.artifact), "embedding_table": table, "threads": torch.get_num_threads(),
           "loadavg_start": os.getloadavg()[0]}
    for route in (False, True):
        model.numerics.integer_path = route
        t = time.time()
        r = perplexity(model, tok, args.text, args.seq_len, args.max_tokens, progress=False)
        r["seconds"] = round(time.time() - t, 1)
        out["integer" if route else "float"] = r
        print(("integer" if route else "float  "), json.dumps(r), flush=True)
    out["ratio_integer_over_float"] = out["integer"]["perplexity"] / out["float"]["perplexity"]
    out["loadavg_end"] = os.getloadavg()[0]
    p = Path(args.out)
    write_json(p, out, indent=2)
    print(f"integer / float = {out['ratio_integer_over_float']:.4f}")


if __name__ == "__main__":
    main()
