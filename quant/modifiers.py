"""The recipe's modifiers at work: what each one needs, and what it does at the start, per decoder layer
and at the end, in the manner of llm-compressor's modifiers.

``quant.recipe`` holds each modifier's configuration (plain dataclasses read from YAML); here each has a
class that owns its work. ``quant.pipeline.quantize_model`` fires these events, and at every event it
calls the modifiers in the recipe's order:

=============  ==============================================================================================
``start``      before any layer, before calibration: ``rotate`` (listed first) replaces the weight store with the
               rotated model's; ``quantize_embedding`` quantizes the table (cheap, and it may refuse it), so
               calibration starts from the table the artifact stores
``observe``    per layer, on the float layer: hooks for the calibration pass (``Layer.want_stats`` for the
               Hessian and input norms of the linears a modifier compresses, ``Layer.hook`` for anything else)
``prepare``    per layer, after the calibration pass, before compression: ``quantize_kv`` folds its key
               smoothing into q_proj / k_proj; ``reconstruct`` runs the float model's own activations through
               the (smoothed) float layer for its targets
``compress``   per layer: ``prune`` prunes the linears no later modifier quantizes and hands the others to
               ``quantize_weights``, which quantizes them (jointly with the 2:4 choice: SparseGPT's pass)
``tune``       per layer: ``reconstruct`` tunes the quantized fields to the float model's outputs
``finalize``   after the last layer: ``quantize_weights`` quantizes an ``lm_head`` named in its overrides;
               ``quantize_embedding`` hands its codes to the artifact; ``train_e2e`` trains every quantized
               linear's scales through the whole model against the float model's logits
=============  ==============================================================================================

``quantize_activations``, ``quantize_kv`` and ``attention_window`` also set the deployment numerics
(``Recipe.runtime``), which every layer's quantized forward (the next layer's calibration input) and the
reconstruction's simulated training use.

What a modifier needs (``needs``): ``activations`` (calibration sequences run through the model, layer by
layer: the quantized model's activations), ``input_stats`` (XᵀX and Σx² of the inputs of the linears it
compresses: the Hessian of GPTQ / SparseGPT, Wanda's input norms), ``float_stream`` (the float model's
own activations, layer by layer). The pipeline samples and runs calibration data only if some modifier
needs activations.

Orders that cannot run are refused by name when the recipe is read (``Recipe.problems``, each modifier's
``must_follow``): quantize_weights before prune (the 2:4 mask must be chosen before or with the codes),
reconstruct before what it tunes or trains through. Orders that cannot matter are accepted: the numerics
modifiers commute (per-token A8 and KV4 codes do not depend on which tokens Λ keeps), and key smoothing
acts on the float weights at ``prepare``, before any ``compress``, wherever quantize_kv is listed.
"""

from __future__ import annotations

import dataclasses
import fnmatch

import torch

from . import algorithms, reference, rotation
from .artifact import pack_embedding
from .errors import QuantError
from .model import ATTN, MLP_NAMES, FloatLinear, linear_name, rms_norm
from .reconstruct import reconstruct_layer
from .recipe import (AttentionWindow, Prune, QuantizeActivations, QuantizeEmbedding, QuantizeKV, QuantizeWeights,
                     Reconstruct, Rotate, TrainE2E)

#: q/k/v and gate/up read the same input: one Hessian each, kept under the first projection's name
SHARED_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
PROJECTIONS = ATTN + MLP_NAMES


def in_features(cfg, proj: str) -> int:
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


class Stats:
    """Hook accumulating XᵀX (float64) and Σx² of a linear's inputs."""

    def __init__(self, k: int):
        self.xtx = torch.zeros(k, k, dtype=torch.float64, device="cpu")
        self.sq = torch.zeros(k, dtype=torch.float64, device="cpu")
        self.n = 0

    def __call__(self, module, inputs, output):
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
        if self.xtx.device != x.device:  # made on the CPU, accumulated where the calibration runs
            self.xtx, self.sq = self.xtx.to(x.device), self.sq.to(x.device)
        self.xtx += x.T @ x
        self.sq += (x * x).sum(0)
        self.n += x.shape[0]

    def hessian(self):
        return 2.0 * self.xtx / max(self.n, 1)

    def x_norm(self):
        return torch.sqrt(self.sq)


class Layer:
    """One decoder layer's work in progress, shared by the modifiers at its events.

    ``layer``: the float DecoderLayer (its linears replaced as they are compressed); ``results``:
    projection -> QuantizedLinear, packed by the pipeline after ``tune``; ``done``: projections whose
    weights a modifier has already written to the artifact; ``changed``: projections whose float weights a
    modifier has changed in place (written as they are now, not as read); ``joint``: projection -> Prune
    config that ``quantize_weights`` applies in its own pass."""

    def __init__(self, i: int, layer):
        self.i, self.layer = i, layer
        self.stats: dict[str, Stats] = {}
        self.hooks: list = []
        self.results: dict = {}
        self.done: set[str] = set()
        self.changed: set[str] = set()
        self.joint: dict[str, Prune] = {}

    def parent(self, proj: str):
        return self.layer.self_attn if proj in ATTN else self.layer.mlp

    def linear(self, proj: str):
        return getattr(self.parent(proj), proj)

    def want_stats(self, proj: str):
        """Collect the input statistics of ``proj`` in the calibration pass (shared with the projections
        reading the same input)."""
        key = SHARED_INPUT.get(proj, proj)
        if key not in self.stats:
            self.stats[key] = Stats(self.linear(key).in_features)

    def stats_for(self, proj: str) -> Stats | None:
        return self.stats.get(SHARED_INPUT.get(proj, proj))

    def hook(self, module, fn):
        self.hooks.append((module, fn))


class Modifier:
    """Base: a modifier's configuration (``cfg``) and its events; each does nothing unless overridden."""

    config: type = object

    def __init__(self, cfg, recipe):
        self.cfg, self.recipe = cfg, recipe

    def needs(self) -> set[str]:
        return set()

    def check(self, model_cfg, where: str):
        """Raise QuantError if this modifier cannot run on the model (before any work is done)."""

    def start(self, run):
        pass

    def calibrated(self, run):
        """After the calibration sequences are read, before the first layer (a modifier's own data)."""

    def observe(self, run, lw: Layer):
        pass

    def prepare(self, run, lw: Layer):
        pass

    def compress(self, run, lw: Layer):
        pass

    def tune(self, run, lw: Layer):
        pass

    def finalize(self, run):
        pass


class RotateModifier(Modifier):
    """The residual-stream rotation (and optionally V/O per head) folded into the float weights
    (``quant/rotation.py``): at ``start``, listed first, it replaces the run's weight store with the rotated
    model's, so that every later read (the embedding, each layer, the final norm, the lm_head) sees rotated
    weights. The rotated model has its own lm_head (untied)."""

    config = Rotate

    def check(self, model_cfg, where):
        probs = rotation.check(model_cfg, self.cfg.kind, self.cfg.vo, self.cfg.residual)
        if probs:
            raise QuantError(f"recipe {self.recipe.name!r}: rotate cannot run on {where}: " + "; ".join(probs))

    def start(self, run):
        run.store = rotation.rotated_store(run.store, run.cfg, self.cfg.kind, self.cfg.seed, self.cfg.vo,
                                           self.cfg.residual)
        if self.cfg.residual:
            run.embed_f = run.embed_in = run.store.get(rotation.EMBED_W)
            run.cfg.tie_word_embeddings = False  # E·Q and E·diag(γ)·Q: the head is its own tensor now


class PruneModifier(Modifier):
    """2:4 pruning (SparseGPT or Wanda). A linear that a later ``quantize_weights`` quantizes is pruned in
    that modifier's pass (joint SparseGPT, or Wanda's mask then GPTQ/RTN with it); the others are pruned
    here and stay float."""

    config = Prune

    def needs(self):
        return {"activations", "input_stats"}

    def check(self, model_cfg, where):
        for proj in self.cfg.targets:
            k = in_features(model_cfg, proj)
            if k % self.cfg.m:
                raise QuantError(f"recipe {self.recipe.name!r}: 2:4 pruning needs the input dimension {k} of "
                                 f"{proj} to be a multiple of {self.cfg.m} ({where})")

    def _quantized_later(self, i: int, proj: str) -> bool:
        qw = self.recipe.get(QuantizeWeights)
        return qw is not None and bits_for(qw, linear_name(i, proj)) is not None

    def observe(self, run, lw):
        for p in self.cfg.targets:
            lw.want_stats(p)

    def compress(self, run, lw):
        for p in PROJECTIONS:
            if p not in self.cfg.targets:
                continue
            if self._quantized_later(lw.i, p):
                lw.joint[p] = self.cfg
                continue
            w, st = lw.linear(p).weight.data, lw.stats_for(p)
            if self.cfg.method == "sparsegpt":
                w_p = algorithms.sparsegpt(w, st.hessian(), self.cfg)[0].to(torch.float32)
            else:
                w_p = (w * algorithms.wanda(w, st.x_norm(), self.cfg)).to(torch.float32)
            setattr(lw.parent(p), p, FloatLinear(w_p))
            name = linear_name(lw.i, p) + ".weight"
            run.tensors[name] = w_p.to("cpu", run.store.get(name).dtype)
            lw.done.add(p)


class QuantizeWeightsModifier(Modifier):
    """GPTQ or RTN (with the clipping search) into the hardware's two-level format, per linear; at the end
    the lm_head if the overrides name it (a tied model's from the float embedding matrix)."""

    config = QuantizeWeights

    def needs(self):
        return {"activations", "input_stats"} if (self.cfg.method != "rtn" or self.cfg.clip_search) else set()

    def check(self, model_cfg, where):
        for proj in PROJECTIONS + ("lm_head",):
            k = in_features(model_cfg, proj)
            if bits_for(self.cfg, proj) is not None and k % self.cfg.group_size:
                divs = [g for g in (32, 64, 128, 256) if k % g == 0]
                raise QuantError(
                    f"recipe {self.recipe.name!r}: quantize_weights.group_size={self.cfg.group_size} does not "
                    f"divide the input dimension {k} of {proj} in {where}; choose a group size that divides "
                    f"{k} (e.g. {', '.join(map(str, divs)) or 'a divisor of it'})")

    def _quantize(self, w, st: Stats | None, bits: int, prune: Prune | None):
        h, xn = (None, None) if st is None else (st.hessian(), st.x_norm())
        return algorithms.quantize_linear(w, h, xn, dataclasses.replace(self.cfg, bits=bits), prune)

    def observe(self, run, lw):
        if "input_stats" in self.needs():
            for p in PROJECTIONS:
                if bits_for(self.cfg, linear_name(lw.i, p)) is not None:
                    lw.want_stats(p)

    def compress(self, run, lw):
        for p in PROJECTIONS:
            b = bits_for(self.cfg, linear_name(lw.i, p))
            if b is not None:
                lw.results[p] = self._quantize(lw.linear(p).weight.data, lw.stats_for(p), b, lw.joint.pop(p, None))

    def finalize(self, run):
        hb = bits_for(self.cfg, "lm_head")
        if hb is None:
            return
        head_w = run.store.lm_head()
        w = (run.embed_f if head_w is None else head_w).to(run.device, torch.float32)  # tied: the float table
        st = None
        if "input_stats" in self.needs():
            st = Stats(w.shape[1])
            h = rms_norm(run.x, run.store.get("model.norm.weight").to(run.device, torch.float32), run.cfg.rms_norm_eps)
            st(None, (h,), None)
        run.add_quantized("lm_head", self._quantize(w, st, hb, None))


class QuantizeEmbeddingModifier(Modifier):
    """The token embedding table as int8 codes per row with a float16 row scale, before any layer."""

    config = QuantizeEmbedding

    def start(self, run):
        try:
            codes, rs = reference.quantize_embedding(run.embed_f.numpy())
            self.tensors, self.meta = pack_embedding(codes, rs)
        except reference.FormatError as e:
            raise QuantError(f"recipe {self.recipe.name!r}: quantize_embedding cannot represent the embedding "
                             f"of {run.path}: {e}; remove quantize_embedding from the recipe") from e
        run.embed_in = torch.from_numpy(reference.dequantize_embedding(codes, rs)).to(torch.float32)

    def finalize(self, run):
        run.tensors.update(self.tensors)
        run.emb_meta = self.meta


class QuantizeActivationsModifier(Modifier):
    """A8: deployment numerics only (``Recipe.runtime``)."""

    config = QuantizeActivations


class AttentionWindowModifier(Modifier):
    """Λ attention (sinks + window): deployment numerics only (``Recipe.runtime``)."""

    config = AttentionWindow

    def check(self, model_cfg, where):
        if self.cfg.sinks + self.cfg.window < 2:
            raise QuantError(f"recipe {self.recipe.name!r}: attention_window keeps fewer than 2 tokens")


class QuantizeKVModifier(Modifier):
    """KV4 (deployment numerics) and, with ``k_smoothing``, per-channel key scales calibrated per RoPE pair on
    the float layer and folded into its q_proj / k_proj before they are compressed (q·k unchanged)."""

    config = QuantizeKV

    def needs(self):
        return {"activations"} if self.cfg.k_smoothing else set()

    def observe(self, run, lw):
        if self.cfg.k_smoothing:
            att = lw.layer.self_attn
            self.pmax = {"q_proj": algorithms.PairMax(att.n_heads, att.head_dim),
                         "k_proj": algorithms.PairMax(att.n_kv, att.head_dim)}
            for p, h in self.pmax.items():
                lw.hook(getattr(att, p), h)

    def prepare(self, run, lw):
        if self.cfg.k_smoothing:  # q·k unchanged in float, so the statistics collected stay valid
            run.log("k_smoothing", smooth_keys(lw.layer.self_attn, self.pmax, self.cfg.k_smoothing_alpha, lw.i))
            lw.changed |= {"q_proj", "k_proj"}


def smooth_keys(att, pmax: dict, alpha: float, i: int) -> dict:
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


class ReconstructModifier(Modifier):
    """Block-wise output matching (quant/reconstruct.py). Owns the float model's activation stream: its
    targets are the float layer's outputs on the float model's own inputs."""

    config = Reconstruct

    def __init__(self, cfg, recipe):
        super().__init__(cfg, recipe)
        self.xf = self.yf = None

    def needs(self):
        return {"activations", "float_stream"}

    def prepare(self, run, lw):
        if self.xf is None:  # layer 0: the float model's input is the calibration embedding
            self.xf, self.yf = run.x.clone(), torch.empty_like(run.x)
        run.forward(lw.layer, self.xf, self.yf)

    def tune(self, run, lw):
        if lw.results:
            lw.results, st = reconstruct_layer(lw.layer, lw.results, run.x, self.yf, run.rope, self.cfg,
                                               seed=run.seed + lw.i, deploy=run.nm)
            run.log("reconstruct", {"layer": lw.i, **st})
        self.xf, self.yf = self.yf, self.xf


class TrainE2EModifier(Modifier):
    """End-to-end training of every quantized linear's scales against the float model's logits
    (quant/e2e.py), at ``finalize``, after every layer and the lm_head are quantized (listed after
    quantize_weights, so its finalize has quantized the lm_head). The float model is read whole."""

    config = TrainE2E

    def needs(self):
        return {"activations"}

    def calibrated(self, run):  # its own text read now: a missing or short one fails before any layer
        from .e2e import training_ids

        self.ids, self.data_info = training_ids(self.cfg, run)

    def finalize(self, run):
        from .e2e import train_e2e
        from .model import LlamaLM

        teacher = LlamaLM.from_store(run.cfg, run.store).to(run.device).eval()
        tuned, st = train_e2e(run.quantized_model().to(run.device), teacher, self.ids, self.cfg, seed=run.seed,
                              deploy=run.nm)
        if self.data_info is not None:
            st["data"] = self.data_info
        for name, q in tuned.items():
            run.replace_quantized(name, q)
        run.log("train_e2e", st)


#: configuration class -> the modifier that does its work
MODIFIER_CLASSES = {c.config: c for c in (RotateModifier, PruneModifier, QuantizeWeightsModifier, QuantizeEmbeddingModifier,
                                         QuantizeActivationsModifier, QuantizeKVModifier, AttentionWindowModifier,
                                         ReconstructModifier, TrainE2EModifier)}


def build(recipe) -> list[Modifier]:
    """The recipe's modifiers, in its order, each with the class that does its work."""
    out = []
    for m in recipe.modifiers:
        cls = MODIFIER_CLASSES.get(type(m))
        if cls is None:
            raise QuantError(f"recipe {recipe.name!r}: no modifier does the work of {type(m).__name__}")
        out.append(cls(m, recipe))
    return out
