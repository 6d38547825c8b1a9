"""What the int8 embedding table costs on its own, separated from the W4 lm_head.

Takes an artifact whose embedding is float (and whose lm_head is tied to it, e.g. one made with
benchmarks/recipes/w2a8kv4-float-edges.yaml) and evaluates it three ways on the integer path:
the float table as stored; the int8 table (``reference.quantize_embedding``) for the lookup only,
the tied head kept on the float table; and the int8 table for both. Writes JSON to --out (or stdout).

    OMP_NUM_THREADS=1 python benchmarks/embedding_ablation.py /tmp/numio/w2a8kv4-float-edges \\
        --text ../shared/data/text/pride-and-prejudice.txt --out /tmp/numio/embedding-ablation.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quant import reference  # noqa: E402
from quant.artifact import load_artifact  # noqa: E402
from quant.atomic import write_text  # noqa: E402
from quant.evaluate import perplexity  # noqa: E402
from quant.model import FloatLinear  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--text", default=None)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    model, tok = load_artifact(a.artifact)
    if model.embed_q is not None or model.lm_head is not None:
        raise SystemExit(f"{a.artifact}: needs a float embedding with a tied lm_head (this one has "
                         f"{'an int8 table' if model.embed_q is not None else 'a separate lm_head'})")
    model.numerics.integer_path = True
    f = model.embed_tokens.data.clone()
    codes, rs = reference.quantize_embedding(f.double().numpy())
    q = torch.from_numpy(reference.dequantize_embedding(codes, rs)).to(torch.float32)
    res = {"artifact": str(a.artifact), "seq_len": a.seq_len, "max_tokens": a.max_tokens}
    with torch.no_grad():
        res["float_table"] = perplexity(model, tok, a.text, a.seq_len, a.max_tokens, progress=False)["perplexity"]
        model.embed_tokens.data.copy_(q)
        model.lm_head = FloatLinear(f)  # the head keeps the float table
        res["int8_lookup_float_head"] = perplexity(model, tok, a.text, a.seq_len, a.max_tokens,
                                                   progress=False)["perplexity"]
        model.lm_head = None  # tied: the head reads the int8 table too
        res["int8_lookup_and_head"] = perplexity(model, tok, a.text, a.seq_len, a.max_tokens,
                                                 progress=False)["perplexity"]
    text = json.dumps(res, indent=2) + "\n"
    if a.out:  # written whole, then moved into place
        write_text(a.out, text)
    else:
        sys.stdout.write(text)
    return res


if __name__ == "__main__":
    main()
