"""Peer quantizers side by side with accllm: optimum-quanto and hqq on the same model, the same layers
and the same evaluation tokens as the rows of ``benchmarks/quality.py``.

Optional: ``pip install -e ".[peers]"`` (or ``pip install -r requirements/peers.txt``) installs
optimum-quanto 0.2.7 and hqq 0.2.8. Without them a peer row is reported as skipped.

What is compared, and how:

- The float model is the one accllm loads (``quant.loading``: alias, GGUF or HF folder; GGUF tensors
  dequantized by transformers), built as a ``transformers.LlamaForCausalLM`` in float32.
- Quantized: every q/k/v/o/gate/up/down projection of every decoder layer, weight groups of 64
  contiguous input features; embeddings, norms and lm_head stay in float: the layers accllm quantizes.
- quanto: int2/int4 weights with its min/max (asymmetric, scale + shift per group) optimizer; int8
  activations (quanto's static per-tensor scales, calibrated on the same calibration windows as
  accllm's recipes) when ``activations8``. quanto picks group 128/96 by itself for these shapes, so the
  group size is set to 64 before the weights are frozen.
- hqq: ``HQQLinear`` with ``BaseQuantizeConfig(nbits, group_size=64)`` (axis 1 = groups along the input
  features, half-quadratic optimisation of scale and zero on); weights only, no calibration data.
- Perplexity: ``quant.evaluate.perplexity`` itself, so the tokenizer, the windows (``quant.data.eval_windows``)
  and the loss summation are the very code of the other rows. Neither peer quantizes the KV cache.
- ``bits_per_weight``: stored code bits plus the per-group scale and zero counted at 16 bits (how both
  libraries hold them in their usual fp16/bf16 use; this run keeps them in float32 for CPU evaluation),
  over all quantized projection weights.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import resource
import threading
import time
from pathlib import Path
from types import SimpleNamespace

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GROUP_SIZE = 64
INSTALL = ".venv/bin/pip install -r requirements/peers.txt  (or: pip install -e \".[peers]\")"
PACKAGES = {"quanto": ("optimum-quanto", "optimum.quanto"), "hqq": ("hqq", "hqq")}

#: quality.py rows: name -> (description, peer, weight bits, int8 activations)
PEER_ROWS = {
    "peers-float": ("as loaded, through transformers (the peers' float model)", None, None, False),
    "quanto-w2": ("optimum-quanto W2 g64 + A8 (static per-tensor, calibrated)", "quanto", 2, True),
    "quanto-w4": ("optimum-quanto W4 g64 + A8 (static per-tensor, calibrated)", "quanto", 4, True),
    "quanto-w2a16": ("optimum-quanto W2 g64, float activations", "quanto", 2, False),
    "quanto-w4a16": ("optimum-quanto W4 g64, float activations", "quanto", 4, False),
    "hqq-w2": ("hqq W2 g64 (HQQ-optimised scale/zero), float activations", "hqq", 2, False),
    "hqq-w4": ("hqq W4 g64 (HQQ-optimised scale/zero), float activations", "hqq", 4, False),
}


def missing(peer: str | None) -> str | None:
    """None if ``peer`` can run here, else why not and how to install it."""
    if peer is None:
        return None
    dist, mod = PACKAGES[peer]
    try:
        found = importlib.util.find_spec(mod) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        return f"{dist} is not installed: {INSTALL}"
    return None


def version(peer: str) -> str:
    return importlib.metadata.version(PACKAGES[peer][0])


class RssPeak:
    """Peak resident set size while the block runs (sampled from /proc/self/statm every 20 ms), so a
    row's peak is its own even inside a longer run; ``ru_maxrss`` (the process peak) is kept too."""

    def __init__(self, every: float = 0.02):
        import os

        self.every = every
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self):
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, self._rss())

    def __enter__(self):
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.process_peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ---------------------------------------------------------------------------------------------------
# the float model, as transformers builds it from accllm's loader
# ---------------------------------------------------------------------------------------------------
def load_hf_float(source: str):
    """-> (transformers.LlamaForCausalLM in float32, eval mode; tokenizer) for an alias, GGUF or HF folder,
    with the tensors ``quant.loading.WeightStore`` reads (the same float weights as accllm's rows)."""
    import torch
    from transformers import LlamaForCausalLM

    from quant.loading import WeightStore, load_config, load_tokenizer, resolve_source

    path = resolve_source(source)
    cfg = load_config(path)
    store = WeightStore(path, cfg)
    tok = load_tokenizer(path)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    sd = {k: store.get(k).to(torch.float32) for k in store.keys()}
    missing_keys, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    tied = getattr(cfg, "tie_word_embeddings", False)
    missing_keys = [k for k in missing_keys if not (tied and k == "lm_head.weight")]
    if missing_keys or unexpected:
        raise RuntimeError(f"{source}: weights do not fit LlamaForCausalLM: missing {missing_keys[:3]}, "
                           f"unexpected {unexpected[:3]}")
    if tied:
        model.tie_weights()
    # buffers (rotary inv_freq) were made on the meta device: rebuild them on the CPU
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{source}: tensors left unloaded: {left[:3]}")
    model = model.to(torch.float32).eval()
    return model, tok


def projections(model):
    """(name, nn.Linear) for every q/k/v/o/gate/up/down projection of the decoder layers."""
    import torch

    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.") and n.split(".")[-1] in PROJECTIONS]


class _Evaluated:
    """What ``quant.evaluate.perplexity`` needs of a model: ``model(ids[None]) -> logits`` and numerics."""

    def __init__(self, hf_model):
        self.hf = hf_model
        self.numerics = SimpleNamespace(integer_path=False)

    def __call__(self, ids):
        import torch

        out = self.hf(input_ids=ids, use_cache=False).logits
        if not isinstance(out, torch.Tensor) or type(out) is not torch.Tensor:  # a quanto QTensor
            out = out.dequantize() if hasattr(out, "dequantize") else torch.as_tensor(out)
        return out.to(torch.float32)


# ---------------------------------------------------------------------------------------------------
# the peers
# ---------------------------------------------------------------------------------------------------
def quantize_quanto(model, tokenizer, bits: int, group_size: int = GROUP_SIZE, activations8: bool = True,
                    calib_text=None, calib_samples: int = 8, calib_seq_len: int = 256, seed: int = 0) -> dict:
    """Quantize the projections of ``model`` in place with optimum-quanto. -> facts about what was done."""
    import torch
    from optimum.quanto import Calibration, freeze, qint2, qint4, qint8, quantize
    from optimum.quanto.nn import QModuleMixin

    qtype = {2: qint2, 4: qint4}[bits]
    names = [n for n, _ in projections(model)]
    quantize(model, weights=qtype, activations=qint8 if activations8 else None, include=names)
    qmods = {n: m for n, m in model.named_modules() if isinstance(m, QModuleMixin)}
    if sorted(qmods) != sorted(names):
        raise RuntimeError(f"quanto quantized {len(qmods)} modules, expected the {len(names)} projections")
    chosen = sorted({m.weight_group_size for m in qmods.values()})
    for m in qmods.values():
        if m.in_features % group_size:
            raise ValueError(f"group size {group_size} does not divide in_features {m.in_features}")
        m.weight_group_size = group_size  # read when the weights are quantized (freeze / forward)
    info = {"quanto_default_group_sizes": chosen, "group_size": group_size, "quantized_modules": len(qmods)}
    if activations8:
        from quant.data import calibration_windows

        ids, cinfo = calibration_windows(tokenizer, calib_text, calib_samples, calib_seq_len, seed)
        with torch.no_grad(), Calibration(momentum=0.9):
            for w in ids:
                model(input_ids=w[None], use_cache=False)
        info["calibration"] = {k: cinfo[k] for k in ("text", "samples", "seq_len", "seed")}
    freeze(model)
    code_bits, meta = 0, 0
    weights = 0
    for m in qmods.values():
        qw = m.weight
        weights += qw.numel()
        data = qw._data
        packed = getattr(data, "_data", data)  # PackedTensor -> its uint8 storage
        code_bits += packed.numel() * packed.element_size() * 8
        meta += qw._scale.numel() + qw._shift.numel()
        info["meta_dtype"] = str(qw._scale.dtype)
    info.update(weights=weights, code_bits_per_weight=code_bits / weights,
                bits_per_weight=(code_bits + 16 * meta) / weights)
    return info


def quantize_hqq(model, bits: int, group_size: int = GROUP_SIZE) -> dict:
    """Replace the projections of ``model`` by hqq ``HQQLinear`` layers (CPU, float32 compute)."""
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    cfg = BaseQuantizeConfig(nbits=bits, group_size=group_size)  # axis=1: groups along in_features
    code_bits, meta, weights = 0, 0, 0
    for name, lin in projections(model):
        if lin.in_features % group_size:
            raise ValueError(f"{name}: group size {group_size} does not divide in_features {lin.in_features}")
        q = HQQLinear(lin, cfg, compute_dtype=torch.float32, device="cpu")
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        setattr(parent, name.rsplit(".", 1)[1], q)
        weights += lin.out_features * lin.in_features
        code_bits += q.W_q.numel() * q.W_q.element_size() * 8
        meta += q.meta["scale"].numel() + q.meta["zero"].numel()
        meta_dtype = str(q.meta["scale"].dtype)
    return {"group_size": group_size, "axis": cfg["weight_quant_params"]["axis"],
            "optimize": cfg["weight_quant_params"]["optimize"], "meta_dtype": meta_dtype, "weights": weights,
            "quantized_modules": len(projections_names(model, HQQLinear)),
            "code_bits_per_weight": code_bits / weights, "bits_per_weight": (code_bits + 16 * meta) / weights}


def projections_names(model, cls) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, cls)]


def run_peer(peer: str | None, source: str, text, **kw) -> dict:
    """:func:`_run_peer` without gradients, leaving the caller's grad mode as it was."""
    import torch

    with torch.no_grad():
        return _run_peer(peer, source, text, **kw)


def _run_peer(peer: str | None, source: str, text, *, bits: int | None = 2, group_size: int = GROUP_SIZE,
              activations8: bool = False, seq_len: int = 512, max_tokens: int | None = None, calib_text=None,
              calib_samples: int = 8, calib_seq_len: int = 256, seed: int = 0, progress: bool = False) -> dict:
    """Load the float model of ``source``, quantize it with ``peer`` ('quanto', 'hqq', or None for the float
    model itself) and measure its perplexity on ``text`` exactly as quality.py's rows do.
    -> {"perplexity", "tokens", "seq_len", "integer_path", "bits_per_weight", "load_seconds",
        "quantize_seconds", "eval_seconds", "seconds", "peak_rss_bytes", "process_peak_rss_bytes", ...}"""
    import torch

    from quant.evaluate import perplexity

    why = missing(peer)
    if why:
        raise ModuleNotFoundError(why)
    t0 = time.time()
    with RssPeak() as rss:
        model, tok = load_hf_float(source)
        t1 = time.time()
        if peer == "quanto":
            info = quantize_quanto(model, tok, bits, group_size, activations8, calib_text, calib_samples,
                                   calib_seq_len, seed)
        elif peer == "hqq":
            if activations8:
                raise ValueError("hqq quantizes weights only")
            info = quantize_hqq(model, bits, group_size)
        elif peer is None:
            info = {"bits_per_weight": None}
        else:
            raise ValueError(f"unknown peer {peer!r}; known: {', '.join(PACKAGES)}")
        t2 = time.time()
        res = perplexity(_Evaluated(model), tok, text, seq_len=seq_len, max_tokens=max_tokens, progress=progress)
        t3 = time.time()
        del model
    return {**res, "peer": peer, "peer_version": version(peer) if peer else None, "weight_bits": bits,
            "activations": "int8" if activations8 else "float32", "kv": "float32", **info,
            "load_seconds": round(t1 - t0, 1), "quantize_seconds": round(t2 - t1, 1),
            "eval_seconds": round(t3 - t2, 1), "seconds": round(t3 - t0, 1),
            "peak_rss_bytes": rss.peak, "process_peak_rss_bytes": rss.process_peak,
            "threads": torch.get_num_threads()}


def quanto(source: str, text, *, bits: int = 2, activations8: bool = True, **kw) -> dict:
    """optimum-quanto W``bits`` g64 (+ A8) on the float ``source``; see :func:`run_peer`."""
    return run_peer("quanto", source, text, bits=bits, activations8=activations8, **kw)


def hqq(source: str, text, *, bits: int = 2, **kw) -> dict:
    """hqq W``bits`` g64 on the float ``source``; see :func:`run_peer`."""
    return run_peer("hqq", source, text, bits=bits, **kw)


def quality_row(name: str, args, text, seq_len: int) -> dict:
    """One row of benchmarks/quality.py's table (same keys as its other rows); a peer that is not
    installed gives a row with ``skipped`` set (and no perplexity) instead of an exception."""
    desc, peer, bits, a8 = PEER_ROWS[name]
    base = {"row": name, "description": desc, "recipe": None, "lambda": None, "seq_len": seq_len,
            "integer_path": False}
    why = missing(peer)
    if why:
        return {**base, "skipped": why, "perplexity": None, "tokens": None, "eval_seconds": None,
                "row_seconds": None, "bits_per_weight": None, "quantize_seconds": None}
    t0 = time.time()
    res = run_peer(peer, args.model, text, bits=bits, activations8=a8, seq_len=seq_len,
                   max_tokens=args.max_tokens, calib_samples=args.calib_samples,
                   calib_seq_len=args.calib_seq_len, seed=args.seed, progress=True)
    return {**base, **res, "row_seconds": round(time.time() - t0, 1)}


# ---------------------------------------------------------------------------------------------------
# the committed table: benchmarks/results/peers.{json,md}
# ---------------------------------------------------------------------------------------------------
DEFAULT_ROWS = "peers-float,quanto-w2,hqq-w2,quanto-w4,hqq-w4,quanto-w2a16,quanto-w4a16"


def main(argv=None) -> int:
    """Run the peer rows through benchmarks/quality.py (same settings, same table format) into --out,
    then add to the markdown the command, the versions and each row's cost (seconds, peak RSS)."""
    import argparse
    import json
    import platform
    import shlex
    import sys

    repo = Path(__file__).resolve().parent.parent
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", default=DEFAULT_ROWS)
    ap.add_argument("--max-tokens", type=int, default=1024, help="as benchmarks/results/quality.json")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(repo / "benchmarks" / "results" / "peers"))
    args, rest = ap.parse_known_args(argv)

    import torch

    from benchmarks import quality

    torch.set_num_threads(args.threads)
    qargs = ["--model", args.model, "--rows", args.rows, "--max-tokens", str(args.max_tokens),
             "--out", args.out, *rest]
    rc = quality.main(qargs)
    if rc:
        return rc
    out = Path(args.out)
    data = json.loads(out.with_suffix(".json").read_text())
    rows = data["rows"]
    cmd = "nice -n 19 .venv/bin/python benchmarks/peers.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    vers = {d: (importlib.metadata.version(d) if not missing(p) else "not installed")
            for p, (d, _) in PACKAGES.items()}
    lines = ["", "Peer rows: each library quantizes accllm's float weights (through transformers' "
             "LlamaForCausalLM) — all q/k/v/o/gate/up/down projections, groups of 64 input features, "
             "embeddings and lm_head in float — and is evaluated by quant.evaluate.perplexity on the same "
             "windows as benchmarks/results/quality.md (so the 'integer path' sentence above does not apply "
             "to them: they run in float32 arithmetic on dequantized weights; no KV quantization). "
             "bits/weight counts the codes plus a 16-bit scale and zero per group. quanto's A8 is its "
             "static per-tensor int8 activation scheme, calibrated on the calibration windows above; hqq is "
             "weight-only (data-free HQQ optimisation of scale and zero).", "",
             f"Command: `{cmd.strip()}` (runs `benchmarks/quality.py "
             f"{' '.join(shlex.quote(a) for a in qargs).replace(str(repo) + '/', '')}` "
             f"in {args.threads} thread(s)). Versions: "
             + ", ".join(f"{d} {v}" for d, v in vers.items())
             + f", torch {torch.__version__}, python {platform.python_version()}.", "",
             "Cost per row: quantize s includes quanto's activation calibration; peak RSS is the process's "
             "resident set sampled while the row ran (it includes what earlier rows of the run left "
             "allocated); ratio is perplexity over the peers-float row.", "",
             "| row | quantize s | eval s | row s (load + quantize + eval) | row peak RSS MB | ratio to float |",
             "|---|---:|---:|---:|---:|---:|"]
    fl = next((r["perplexity"] for r in rows if r["row"] == "peers-float" and r.get("perplexity")), None)
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['row']} | skipped: {r['skipped']} | | | | |")
            continue
        ratio = f"{r['perplexity'] / fl:.3g}×" if fl else "-"
        lines.append(f"| {r['row']} | {r.get('quantize_seconds')} | {r['eval_seconds']} | {r['row_seconds']} | "
                     f"{r['peak_rss_bytes'] / 2**20:.0f} | {ratio} |")
    with open(out.with_suffix(".md"), "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
