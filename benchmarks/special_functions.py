"""Error of each fixed-point special function (quant.reference) against float64, on stated inputs.

    .venv/bin/python benchmarks/special_functions.py [--out benchmarks/results/special_functions.json]

Every input is generated from a fixed seed; each row gives the inputs, the error measure and its value,
so docs/numerics.md can quote them. The integer functions see Q15.16 inputs (to_fx of the float
inputs); float64 sees the same rounded inputs, so the figures are the error of the function alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant import reference as R  # noqa: E402
from quant.atomic import write_json  # noqa: E402

FX = 65536.0


def measure(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []

    # RMSNorm: rows of every magnitude (log-normal row scale), H = 576 and 4096
    for h in (576, 4096):
        x = rng.normal(0, 1, (2000, h)) * np.exp(rng.normal(0, 2.5, (2000, 1)))
        x[:10, 0] *= 50  # a few massive activations
        x = np.clip(x, -32000, 32000)
        xq = R.to_fx(x)
        xr = xq / FX
        gamma = rng.normal(1, 0.3, h)
        g, e = R.rmsnorm_params(gamma, 1e-5)
        y = R.rmsnorm(xq, g, e) / FX
        yf = xr / np.sqrt((xr ** 2).mean(1, keepdims=True) + 1e-5) * gamma
        rms = np.sqrt((yf ** 2).mean(1))
        rel = np.abs(y - yf).max(1) / rms
        rows.append({"function": "rmsnorm", "inputs": f"2000 rows x {h}, row rms log-normal(0, 2.5), eps 1e-5",
                     "measure": "max |y - y_float| / rms(y_float), per row: max / median",
                     "max": float(rel.max()), "median": float(np.median(rel))})

    v = np.concatenate([np.arange(1, 1 << 16), rng.integers(1, 1 << 62, 500000)])
    r, e = R.rsqrt(v)
    rel = np.abs(r * 2.0 ** (-15 - e) * np.sqrt(v.astype(np.float64)) - 1)
    rows.append({"function": "rsqrt", "inputs": "1..65535 and 500k uniform in 1..2**62",
                 "measure": "relative error", "max": float(rel.max()), "median": float(np.median(rel))})

    # RoPE cos/sin: head_dim 64 / 128, base 10000, positions 0..8191 and up to 1e6
    for d, top in ((64, 8192), (128, 8192), (128, 1_000_000)):
        inv = 1.0 / 10000 ** (np.arange(0, d, 2) / d)
        theta, table = R.rope_params(inv)
        pos = np.unique(np.concatenate([np.arange(0, min(top, 8192)), rng.integers(0, top, 4000)]))
        c, s = R.rope_cos_sin(pos, theta, table)
        ang = pos[:, None] * inv[None, :]
        err = np.maximum(np.abs(c / 32768 - np.cos(ang)), np.abs(s / 32768 - np.sin(ang)))
        rows.append({"function": "rope cos/sin", "inputs": f"head_dim {d}, base 10000, positions < {top}",
                     "measure": "max |table - float|", "max": float(err.max()), "median": float(np.median(err))})

    # attention logits and softmax: head_dim 64, 512 keys, scores of spread ~N(0, 3) in the natural base
    d, tk = 64, 512
    mc, sc = R.softmax_params(d)
    q = rng.normal(0, 2, (256, d))
    k = rng.normal(0, 2, (tk, d)) * np.exp(rng.normal(0, 0.5, (tk, 1)))
    qa, qam = R.quantize_activations(R.to_fx(q))
    kc, kz, kr = R.quantize_kv(R.to_fx(k))
    acc = R.qk_scores(qa, kc, kz)
    z = R.attention_logits(acc, qam, kr, mc, sc)
    s_real = acc * qam[:, None] / 127 * kr[None, :] / 15 / 2.0 ** 32 / np.sqrt(d)
    zf = s_real * np.log2(np.e)
    rel = np.abs(z / FX - zf) / np.maximum(np.abs(zf), 1e-9)
    rows.append({"function": "attention_logits", "inputs": f"head_dim {d}, {tk} keys, A8 queries x KV4 keys",
                 "measure": "relative error of the base-2 logit (|z| > 0.1)",
                 "max": float(rel[np.abs(zf) > 0.1].max()), "median": float(np.median(rel[np.abs(zf) > 0.1]))})
    e = R.softmax_exp(z)
    p = e / e.sum(1, keepdims=True)
    pf = np.exp(s_real - s_real.max(1, keepdims=True))
    pf /= pf.sum(1, keepdims=True)
    err = np.abs(p - pf) / pf.max(1, keepdims=True)
    rows.append({"function": "softmax (exp2 table)", "inputs": "the logits above",
                 "measure": "max |p - p_float| / max p_float, per row", "max": float(err.max(1).max()),
                 "median": float(np.median(err.max(1)))})
    v = rng.normal(0, 1, (tk, d))
    vc, vz, vr = R.quantize_kv(R.to_fx(v))
    pa, wmax, esum = R.pv_weights(e, vr)
    o = R.pv_output(R.pv_product(pa, vc, vz), wmax, esum) / FX
    vd = R.dequantize_kv(vc, vz, vr)
    of_float_p = pf @ vd  # float softmax, exact P (the float route with an unquantized P)
    # the float route quantizes P too: the fold of the float probabilities (quant.model.fold_quantize_pv)
    pt = np.rint(pf * vr[None, :] / 15)
    pta, ptam = R.quantize_activations(pt.astype(np.int64))
    of_route = R.pv_product(pta, vc, vz) * ptam[:, None] / 127 / FX
    scale = np.abs(of_float_p).max()
    rows.append({"function": "attention output (softmax + P.V fold + reciprocal)",
                 "inputs": "the softmax above, values N(0, 1) in KV4",
                 "measure": "max |o - o_float_route| / max |o|, where the float route folds and quantizes the "
                            "float probabilities (the error the integer special functions add)",
                 "max": float(np.abs(o - of_route).max() / scale),
                 "median": float(np.median(np.abs(o - of_route)) / scale)})
    rows.append({"function": "attention output, P at 8 bits (for comparison)",
                 "inputs": "the same", "measure": "max |o_float_route - o_exact_P| / max |o|",
                 "max": float(np.abs(of_route - of_float_p).max() / scale),
                 "median": float(np.median(np.abs(of_route - of_float_p)) / scale)})

    # SiLU x up
    g = rng.normal(0, 4, 500000)
    u = rng.normal(0, 2, 500000)
    gq, uq = R.to_fx(g), R.to_fx(u)
    h = R.silu_mul(gq, uq) / FX
    gr, ur = gq / FX, uq / FX
    hf = gr / (1 + np.exp(-gr)) * ur
    rows.append({"function": "silu(gate) * up", "inputs": "gate N(0, 4), up N(0, 2), 500k",
                 "measure": "|h - h_float| (absolute, Q15.16 step 1.5e-5)", "max": float(np.abs(h - hf).max()),
                 "median": float(np.median(np.abs(h - hf)))})
    sig = R.sigmoid(gq) / FX
    rows.append({"function": "sigmoid", "inputs": "N(0, 4), 500k", "measure": "absolute error",
                 "max": float(np.abs(sig - 1 / (1 + np.exp(-gr))).max()),
                 "median": float(np.median(np.abs(sig - 1 / (1 + np.exp(-gr)))))})

    # the per-row x per-token rescale of a linear
    acc = rng.integers(-(1 << 30), 1 << 30, (200, 500))
    rs = np.float16(np.exp(rng.uniform(-12, -2, 500))).astype(np.float64)
    amax = rng.integers(1, 1 << 31, 200)
    rm, rsh = R.linear_row_multipliers(rs)
    y = R.rescale_linear(acc, rm, rsh, *R.token_multiplier(amax))
    exact = acc * rs[None, :] / 127 * amax[:, None].astype(np.float64)
    live = np.abs(exact) < 2 ** 31 - 1
    rel = np.abs(y - exact)[live] / np.maximum(np.abs(exact)[live], 1)
    rows.append({"function": "rescale_linear (per row x per token)", "inputs": "random acc, row scales, amax",
                 "measure": "relative error against acc * S_row / 127 * amax (|y| >= 2**10)",
                 "max": float(rel[np.abs(exact)[live] >= 1024].max()),
                 "median": float(np.median(rel[np.abs(exact)[live] >= 1024]))})

    w = rng.normal(0, 0.05, (2000, 576))
    ec, ers = R.quantize_embedding(w)
    x = R.embed_lookup(np.arange(2000), ec, *R.embedding_multipliers(ers)) / FX
    rel = np.abs(x - w).max(1) / np.abs(w).max(1)
    rows.append({"function": "embedding int8 per row", "inputs": "N(0, 0.05), 2000 x 576",
                 "measure": "max |x - w| / max |w| per row (half an int8 step is 0.0039)",
                 "max": float(rel.max()), "median": float(np.median(rel))})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/special_functions.json")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rows = measure(args.seed)
    out = {"command": "python benchmarks/special_functions.py", "seed": args.seed, "rows": rows}
    p = Path(args.out)
    write_json(p, out, indent=2)
    for r in rows:
        print(f"{r['function']:<52} max {r['max']:.3g}  median {r['median']:.3g}   ({r['measure']})")


if __name__ == "__main__":
    main()
