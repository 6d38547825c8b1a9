"""quantize: checkpoint -> calibrated, pruned, quantized, packed artifact, one decoder layer at a time.

Per layer i (GPTQ-style sequential over layers):
  1. read layer i's float weights from the checkpoint (lazily: nothing else of the model is in memory
     except the embeddings, the final norm and the already packed earlier layers);
  2. run the calibration activations X (N, L, H) through it with the deployment numerics in the
     attention (KV4, A8 on Q·K/P·V, Λ window) and hooks accumulating, for every linear, the
     Hessian H = 2 XᵀX / n (float64) and the input norms ‖X_:,i‖;
  3. per linear named by the recipe: ``quant.algorithms.quantize_linear`` (GPTQ / RTN, SparseGPT /
     Wanda 2:4, bits from ``QuantizeWeights.overrides``), packed immediately;
  4. run X through the quantized layer (A8 linears too): its output is layer i+1's input.
The final norm's output calibrates an ``lm_head`` named in the overrides (e.g. ``{lm_head: 4}``; a tied
model's lm_head is quantized from the float embedding matrix). ``quantize_embedding`` turns the embedding
table into int8 codes per row with a float16 row scale (``reference.quantize_embedding``) before any
layer is touched; calibration then starts from the quantized table, as deployment does.

Peak memory beyond the packed result is one float decoder layer, its Hessians, and the
calibration activations twice (input and output of the layer):

    peak ≈ P_layer·4 (one float layer) + (3·H² + I²)·8 (Hessians: q/k/v share one, gate/up one,
           o and down one each; float64) + 2·N·L·H·4 (calibration activations in and out)
           + V·H·4 (embeddings) + packed layers (≈ 2.3/8 bytes per weight) + runtime (~0.6 GB)

For Llama-2-7B (H 4096, I 11008, V 32000, 32 layers, 202 M weights per layer) with 64 × 512
calibration tokens: 0.81 GB + 1.37 GB + 1.07 GB + 0.52 GB + 1.9 GB + 0.6 GB ≈ 6.3 GB, well inside
24 GB (the float checkpoint is memory-mapped and read tensor by tensor, never loaded whole).
Measured on SmolLM2-135M (GGUF, then held whole as float32; it is now read tensor by tensor from the
memory-mapped file, quant/loading.py), 8 × 256 calibration tokens: peak RSS 1.69 GB. ``report.json`` records ``peak_rss_bytes`` of every run.
The quantized lm_head is the largest single linear (V·H weights, GPTQ with the clipping search on all
rows at once): on SmolLM2-135M (49152 × 576) the run's peak rose from 1.55 GB through the layers to
2.80 GB at the lm_head (``accllm quantize smollm2-135m --recipe w2a8kv4 --calib-samples 8``, 1 thread);
for Llama-2-7B's 131 M-weight head that term grows about 4.6× (not measured). Rows are independent
given the Hessian, so quantizing the head in row blocks would bound it; not done yet.
The embedding is quantized first (``quantize_embedding``): V·H·8 bytes transiently.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import resource
import time
from pathlib import Path

import torch

from .artifact import (EMBED, FORMAT, FORMAT_VERSION, atomic_dir, decode_bytes_per_token, float_parameter_count,
                       kv_bytes_per_token_per_layer, pack_embedding, pack_linear, packed_weight_bytes,
                       recipe_yaml, runtime_numerics, tensor_bytes, tool_versions, write_model)
from .data import calibration_windows
from .errors import QuantError
from .loading import WeightStore, is_artifact, load_config, load_tokenizer, resolve_source
from . import algorithms, reference
from .model import ATTN, MLP_NAMES, FloatLinear, Numerics, QLinear, float_layer, linear_name, rms_norm
from .reconstruct import reconstruct_layer
from .recipe import AttentionWindow, Prune, QuantizeEmbedding, QuantizeKV, QuantizeWeights, Reconstruct, Recipe

CHUNK = 4  # calibration sequences per forward
SHARED_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}


def peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def _in_features(cfg, proj: str) -> int:
    heads = cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return {"o_proj": heads * hd, "down_proj": cfg.intermediate_size}.get(proj, cfg.hidden_size)


def bits_for(qw: QuantizeWeights, name: str) -> int | None:
    """Bits for a linear by full name (model.layers.3.mlp.down_proj) or short name (down_proj, lm_head);
    None if the recipe leaves it in float. An override names lm_head to quantize it."""
    short = name.rsplit(".", 1)[-1]
    for pat, b in qw.overrides.items():
        if fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(short, pat):
            if short in qw.targets or short == "lm_head":
                return int(b)
    return qw.bits if short in qw.targets else None


def check_recipe(cfg, recipe: Recipe, where: str):
    """Everything that can make the recipe fail on this model, before any work is done."""
    probs = recipe.problems()
    for m in recipe.modifiers:
        probs += [(f"{type(m).__name__}.{k}", msg) for k, msg in (m.problems() if hasattr(m, "problems") else [])]
    if probs:
        raise QuantError(f"recipe {recipe.name!r}: " + "; ".join(f"{k}: {m}" for k, m in probs))
    qw, prune = recipe.get(QuantizeWeights), recipe.get(Prune)
    for proj in ATTN + MLP_NAMES + ("lm_head",):
        k = _in_features(cfg, proj)
        if qw is not None and bits_for(qw, proj if proj != "lm_head" else "lm_head") is not None:
            if k % qw.group_size:
                divs = [g for g in (32, 64, 128, 256) if k % g == 0]
                raise QuantError(
                    f"recipe {recipe.name!r}: quantize_weights.group_size={qw.group_size} does not divide the "
                    f"input dimension {k} of {proj} in {where}; choose a group size that divides "
                    f"{k} (e.g. {', '.join(map(str, divs)) or 'a divisor of it'})")
        if prune is not None and proj in prune.targets and k % prune.m:
            raise QuantError(f"recipe {recipe.name!r}: 2:4 pruning needs the input dimension {k} of {proj} "
                             f"to be a multiple of {prune.m} ({where})")
    win = recipe.get(AttentionWindow)
    if win is not None and win.sinks + win.window < 2:
        raise QuantError(f"recipe {recipe.name!r}: attention_window keeps fewer than 2 tokens")
    rt = runtime_numerics(recipe)
    if rt["a8"] and rt["kv4"]:  # the hardware's numerics: the integer decoder must be able to run the shapes
        from .golden import shape_problems

        heads = cfg.num_attention_heads
        probs = shape_problems(cfg.hidden_size, heads, getattr(cfg, "num_key_value_heads", None) or heads,
                               getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
                               sinks=win.sinks if win else 0, window=win.window if win else None,
                               max_positions=getattr(cfg, "max_position_embeddings", None))
        if probs:
            raise QuantError(f"{where}: the integer formats (docs/numerics.md, sections 11-17) cannot run this "
                             f"model: " + "; ".join(f"{k}: {m}" for k, m in probs))


def _smooth_keys(att, pmax: dict, alpha: float, i: int) -> dict:
    """Fold the calibrated key smoothing into the float layer's q_proj / k_proj (in place) and return
    what it did: the spread (max / median) of the key pair maxima before and after."""
    f = algorithms.key_smoothing_factors(pmax["q_proj"].max, pmax["k_proj"].max, alpha)
    wq, wk = algorithms.fold_key_smoothing(att.q_proj.weight.data, att.k_proj.weight.data, f)
    att.q_proj.weight.data.copy_(wq)
    att.k_proj.weight.data.copy_(wk)
    half = f.shape[1] // 2
    k0 = pmax["k_proj"].max
    k1 = k0 / f[:, :half]
    q1 = (pmax["q_proj"].max.reshape(f.shape[0], -1, half) * f[:, None, :half]).reshape(-1, half)

    def spread(t):  # per head: max over channels / median over channels, then the worst head
        return round(float((t.amax(1) / t.median(1).values.clamp(min=1e-30)).max()), 3)

    return {"layer": i, "key_spread_before": spread(k0), "key_spread_after": spread(k1),
            "query_spread_before": spread(pmax["q_proj"].max), "query_spread_after": spread(q1),
            "factor_min": round(float(f.min()), 4), "factor_max": round(float(f.max()), 4)}


class _Stats:
    """Hook accumulating XᵀX (float64) and Σx² of a linear's inputs."""

    def __init__(self, k: int):
        self.xtx = torch.zeros(k, k, dtype=torch.float64)
        self.sq = torch.zeros(k, dtype=torch.float64)
        self.n = 0

    def __call__(self, module, inputs, output):
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
        self.xtx += x.T @ x
        self.sq += (x * x).sum(0)
        self.n += x.shape[0]

    def hessian(self):
        return 2.0 * self.xtx / max(self.n, 1)

    def x_norm(self):
        return torch.sqrt(self.sq)


def _quantize_linear(w: torch.Tensor, st: _Stats, qcfg: QuantizeWeights | None, prune: Prune | None):
    """-> QuantizedLinear (qcfg given) or pruned float weights (prune only)."""
    if qcfg is None:  # prune only: float weights with the 2:4 mask applied
        if prune.method == "sparsegpt":
            w_p, _ = algorithms.sparsegpt(w, st.hessian(), prune)
            return torch.as_tensor(w_p).to(torch.float32)
        mk = algorithms.wanda(w, st.x_norm(), prune)
        return (w * torch.as_tensor(mk)).to(torch.float32)
    return algorithms.quantize_linear(w, st.hessian(), st.x_norm(), qcfg, prune)


@torch.no_grad()
def _run(layer, x: torch.Tensor, rope, out: torch.Tensor | None = None) -> torch.Tensor:
    pos = torch.arange(x.shape[1])
    out = torch.empty_like(x) if out is None else out
    for s in range(0, x.shape[0], CHUNK):
        out[s: s + CHUNK] = layer(x[s: s + CHUNK], rope, pos)
    return out


def quantize_model(source: str, recipe: Recipe, out_dir: str | Path, *, calib_text: str | Path | None = None,
                   calib_samples: int = 32, seq_len: int = 512, seed: int = 0, device: str = "cpu",
                   progress: bool = True) -> dict:
    """Compress ``source`` with ``recipe`` into the artifact folder ``out_dir`` (written atomically).
    Returns the report dict (also written to out_dir/report.json)."""
    from tqdm import tqdm

    from .model import Rope

    if device != "cpu":
        if not (device.startswith("cuda") and torch.cuda.is_available()):
            raise QuantError(f"--device {device}: not available here (torch {torch.__version__}, "
                             f"cuda available: {torch.cuda.is_available()}); use --device cpu")
        raise QuantError("--device cuda: the layer-wise pipeline runs on cpu only so far; use --device cpu")
    t_start = time.time()
    secs: dict[str, float] = {}
    t = time.time()
    path = resolve_source(source)
    if is_artifact(path):
        raise QuantError(f"{path} is already an accllm artifact; quantize the original checkpoint")
    cfg = load_config(path)
    check_recipe(cfg, recipe, str(path))
    qw, prune = recipe.get(QuantizeWeights), recipe.get(Prune)
    recon = recipe.get(Reconstruct)
    recon_log: list[dict] = []
    rt = runtime_numerics(recipe)
    kv = recipe.get(QuantizeKV)
    smooth = kv is not None and kv.k_smoothing and rt["kv4"]
    smooth_log: list[dict] = []
    nm = Numerics(a8=rt["a8"], kv4=rt["kv4"], sinks=rt["sinks"], window=rt["window"])
    float_nm = Numerics()  # Hessians from the float layer (on the quantized predecessors' outputs)

    with atomic_dir(out_dir) as tmp:
        store = WeightStore(path, cfg)
        tok = load_tokenizer(path)
        secs["load"] = time.time() - t
        t = time.time()
        embed_f = store.get(f"{EMBED}.weight").to(torch.float32)
        emb_tensors, emb_meta = {}, None
        if recipe.get(QuantizeEmbedding) is not None:  # cheap, and it can refuse the table: do it first
            try:
                codes, rs = reference.quantize_embedding(embed_f.numpy())
                emb_tensors, emb_meta = pack_embedding(codes, rs)
            except reference.FormatError as e:
                raise QuantError(f"recipe {recipe.name!r}: quantize_embedding cannot represent the embedding "
                                 f"of {path}: {e}; remove quantize_embedding from the recipe") from e
            embed_in = torch.from_numpy(reference.dequantize_embedding(codes, rs)).to(torch.float32)
        else:
            embed_in = embed_f
        secs["embedding"] = time.time() - t
        t = time.time()
        # plain RTN (no clipping search, no pruning, no reconstruction) reads no activations
        needs_calib = (prune is not None or recon is not None or smooth
                       or (qw is not None and (qw.method != "rtn" or qw.clip_search)))
        calib_info = None
        if needs_calib:
            ids, calib_info = calibration_windows(tok, calib_text, calib_samples, seq_len, seed)
            x = embed_in[ids]  # (N, L, H): the embedding the artifact stores

            y = torch.empty_like(x)
            if recon is not None:  # the float model's own activations, the reconstruction's targets
                xf, yf = x.clone(), torch.empty_like(x)
        secs["calibration_data"] = time.time() - t
        rope = Rope(cfg)

        tensors: dict = {}
        linears: dict[str, dict] = {}
        qbytes = 0
        qweights = 0
        t = time.time()
        it = range(cfg.num_hidden_layers)
        bar = tqdm(it, desc=f"quantize {recipe.name}", unit="layer", disable=not progress)
        for i in bar:
            layer = float_layer(cfg, store, i, float_nm)
            for nrm in ("input_layernorm", "post_attention_layernorm"):
                tensors[f"model.layers.{i}.{nrm}.weight"] = store.get(f"model.layers.{i}.{nrm}.weight")
            mods = {p: (layer.self_attn if p in ATTN else layer.mlp) for p in ATTN + MLP_NAMES}
            todo = {}
            for p in ATTN + MLP_NAMES:
                name = linear_name(i, p)
                b = bits_for(qw, name) if qw is not None else None
                pr = prune if (prune is not None and p in prune.targets) else None
                if b is not None or pr is not None:
                    todo[p] = (b, pr)
            # q/k/v and gate/up read the same input: one Hessian each
            hook_on = {SHARED_INPUT.get(p, p) for p in todo}
            stats = {p: _Stats(getattr(mods[p], p).in_features) for p in hook_on}
            if needs_calib and (todo or smooth):
                hooks = [getattr(mods[p], p).register_forward_hook(stats[p]) for p in hook_on]
                if smooth:
                    att = layer.self_attn
                    pmax = {"q_proj": algorithms.PairMax(att.n_heads, att.head_dim),
                            "k_proj": algorithms.PairMax(att.n_kv, att.head_dim)}
                    hooks += [getattr(att, p).register_forward_hook(h) for p, h in pmax.items()]
                _run(layer, x, rope, y)
                for h in hooks:
                    h.remove()
                if smooth:  # q·k unchanged in float, so the Hessians and y above stay valid
                    smooth_log.append(_smooth_keys(layer.self_attn, pmax, kv.k_smoothing_alpha, i))
            if recon is not None:  # the float model's output of this layer: the target
                _run(layer, xf, rope, yf)
            results = {}
            for p in ATTN + MLP_NAMES:
                name = linear_name(i, p)
                lin = getattr(mods[p], p)
                if p not in todo:
                    w0 = store.get(name + ".weight")
                    tensors[name + ".weight"] = (lin.weight.data.to(w0.dtype) if smooth and p in ("q_proj", "k_proj")
                                                 else w0)
                    continue
                b, pr = todo[p]
                qcfg = None if b is None else dataclasses.replace(qw, bits=b)
                res = _quantize_linear(lin.weight.data, stats[SHARED_INPUT.get(p, p)], qcfg, pr)
                if isinstance(res, torch.Tensor):  # pruned float
                    setattr(mods[p], p, FloatLinear(res))
                    tensors[name + ".weight"] = res.to(store.get(name + ".weight").dtype)
                    continue
                results[p] = res
            if recon is not None and results:
                results, rstats = reconstruct_layer(layer, results, x, yf, rope, recon, seed=seed + i,
                                                   deploy=nm)
                recon_log.append({"layer": i, **rstats})
                bar.set_postfix(recon=f"{rstats['loss_before']:.3g}->{rstats['loss_after']:.3g}")
            for p, res in results.items():
                name = linear_name(i, p)
                packed, meta = pack_linear(name, res)
                tensors.update(packed)
                linears[name] = meta
                qbytes += packed_weight_bytes(packed, name)
                qweights += meta["in"] * meta["out"]
                setattr(mods[p], p, QLinear(res, nm, name))
            if recon is not None:
                xf, yf = yf, xf
            if needs_calib:
                layer.self_attn.nm = nm
                _run(layer, x, rope, y)
                x, y = y, x
            del layer
            bar.set_postfix(rss=f"{peak_rss_bytes() / 2**20:.0f}MiB")
        secs["layers"] = time.time() - t
        if recon_log:
            secs["reconstruct"] = sum(r["seconds"] for r in recon_log)

        t = time.time()
        if emb_meta is not None:
            tensors.update(emb_tensors)
        else:
            tensors[f"{EMBED}.weight"] = store.get(f"{EMBED}.weight")
        tensors["model.norm.weight"] = store.get("model.norm.weight")
        head_w = store.lm_head()
        tied = head_w is None
        hb = bits_for(qw, "lm_head") if qw is not None else None
        if hb is not None:
            w = (embed_f if tied else head_w).to(torch.float32)  # tied: from the float table, not its int8 codes
            st = _Stats(w.shape[1])
            if needs_calib:
                h = rms_norm(x, store.get("model.norm.weight").to(torch.float32), cfg.rms_norm_eps)
                st(None, (h,), None)
            res = _quantize_linear(w, st, dataclasses.replace(qw, bits=hb), None)
            packed, meta = pack_linear("lm_head", res)
            tensors.update(packed)
            linears["lm_head"] = meta
            qbytes += packed_weight_bytes(packed, "lm_head")
            qweights += meta["in"] * meta["out"]
        elif not tied:
            tensors["lm_head.weight"] = head_w
        secs["lm_head"] = time.time() - t

        t = time.time()
        write_model(tmp, tensors, linears, emb_meta)
        cfg.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "recipe.yaml").write_text(recipe_yaml(recipe))
        secs["write"] = time.time() - t
        t = time.time()
        src_hash = store.source_hash()
        secs["hash"] = time.time() - t
        seconds = time.time() - t_start
        not_applied = []
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "source": str(source), "source_path": str(path), "source_sha256": src_hash,
            "recipe": recipe.name, "runtime": rt, "tools": tool_versions(),
            "seconds": {k: round(v, 3) for k, v in secs.items()}, "calibration": calib_info,
            "not_applied": not_applied, "k_smoothing": smooth_log or None, "reconstruct": recon_log or None,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        size = (tmp / "model.safetensors").stat().st_size
        report = {
            "recipe": recipe.name,
            "source": str(source),
            "bits_per_weight": (8 * qbytes / qweights) if qweights else None,
            # the whole model as stored (every tensor) over the float model's parameters
            "bits_per_parameter": 8 * sum(tensor_bytes(v) for v in tensors.values()) / float_parameter_count(cfg),
            "float_parameters": float_parameter_count(cfg),
            "stored_tensor_bytes": sum(tensor_bytes(v) for v in tensors.values()),
            # read per decoded token: all linears incl. lm_head as stored, one embedding row, the norms
            "bytes_per_token_decode": decode_bytes_per_token(tensors, linears, cfg, emb_meta),
            "kv_bytes_per_token_per_layer": kv_bytes_per_token_per_layer(cfg, rt["kv4"]),
            "embedding_bits": emb_meta["bits"] if emb_meta else None,
            "lm_head_bits": linears["lm_head"]["bits"] if "lm_head" in linears else None,
            "quantized_linears": len(linears),
            "quantized_weights": qweights,
            "quantized_weight_bytes": qbytes,
            "size_bytes": size,
            "artifact_bytes": sum(f.stat().st_size for f in tmp.iterdir() if f.is_file()),
            "seconds": round(seconds, 3),
            "seconds_per_step": manifest["seconds"],
            "seconds_per_layer": round(secs["layers"] / cfg.num_hidden_layers, 3),
            "peak_rss_bytes": peak_rss_bytes(),
            "layers": cfg.num_hidden_layers,
            "calibration_tokens": (calib_samples * seq_len) if needs_calib else 0,
            "not_applied": not_applied,
        }
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
