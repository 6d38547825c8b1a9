"""quantize: checkpoint -> calibrated, pruned, quantized, packed artifact, one decoder layer at a time.

``quantize_model`` is a loop over the recipe's modifiers (``quant.modifiers``: each declares what it
needs and does its own work at the start, per layer and at the end, in the recipe's order). Per layer i
(GPTQ-style sequential over layers):
  1. read layer i's float weights from the checkpoint (lazily: nothing else of the model is in memory
     except the embeddings, the final norm and the already packed earlier layers);
  2. ``observe``: run the calibration activations X (N, L, H) through the float layer with every
     modifier's hooks (for the linears a modifier compresses, the Hessian H = 2 XᵀX / n (float64) and
     the input norms ‖X_:,i‖);
  3. ``prepare``, ``compress``, ``tune``: each modifier's work on the layer (key smoothing, the float
     targets; pruning and quantization per linear, ``quant.algorithms.quantize_linear``; reconstruction);
  4. pack what was quantized, and run X through the quantized layer with the deployment numerics
     (A8 linears, KV4, Λ): its output is layer i+1's input.
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
``train_e2e`` (quant/e2e.py) is the exception: at the end it holds the float model and the quantized one
whole, with a backward pass. An artifact given as the source is continued with it (``train_artifact``).
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch

from .artifact import (EMBED, FORMAT, FORMAT_VERSION, atomic_dir, decode_bytes_per_token, float_parameter_count,
                       kv_bytes_per_token_per_layer, pack_linear, packed_weight_bytes, recipe_yaml,
                       tensor_bytes, tool_versions, write_model)
from .data import calibration_windows
from .errors import QuantError
from .loading import WeightStore, is_artifact, load_config, load_tokenizer, resolve_source
from . import modifiers as M
from .model import ATTN, MLP_NAMES, Numerics, QLinear, float_layer, linear_name
from .recipe import Recipe

CHUNK = 4  # calibration sequences per forward
bits_for = M.bits_for


def peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def check_recipe(cfg, recipe: Recipe, where: str):
    """Everything that can make the recipe fail on this model, before any work is done."""
    probs = recipe.problems()
    for m in recipe.modifiers:
        probs += [(f"{type(m).__name__}.{k}", msg) for k, msg in (m.problems() if hasattr(m, "problems") else [])]
    if probs:
        raise QuantError(f"recipe {recipe.name!r}: " + "; ".join(f"{k}: {m}" for k, m in probs))
    for m in M.build(recipe):
        m.check(cfg, where)
    rt = recipe.runtime()
    if rt["a8"] and rt["kv4"]:  # the hardware's numerics: the integer decoder must be able to run the shapes
        from .golden import shape_problems

        heads = cfg.num_attention_heads
        probs = shape_problems(cfg.hidden_size, heads, getattr(cfg, "num_key_value_heads", None) or heads,
                               getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
                               sinks=rt["sinks"], window=rt["window"],
                               max_positions=getattr(cfg, "max_position_embeddings", None))
        if probs:
            raise QuantError(f"{where}: the integer formats (docs/numerics.md, sections 11-17) cannot run this "
                             f"model: " + "; ".join(f"{k}: {m}" for k, m in probs))


class Run:
    """What one quantization run holds between the modifiers' events: the checkpoint, the calibration
    stream (``x`` in, ``y`` out of the current layer), the deployment numerics and the artifact's tensors
    as they are produced."""

    def __init__(self, path: Path, cfg, recipe: Recipe, seed: int, device=None):
        from .model import Rope

        self.path, self.cfg, self.recipe, self.seed = path, cfg, recipe, seed
        #: where the layers, the calibration stream, the statistics and the algorithms run; what is
        #: written (``tensors``) and the store stay on the CPU
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.nm = Numerics(**recipe.runtime())
        self.float_nm = Numerics()  # Hessians from the float layer (on the quantized predecessors' outputs)
        self.store = WeightStore(path, cfg)
        self.tok = load_tokenizer(path)
        self.rope = Rope(cfg).to(self.device)
        self.embed_f = self.store.get(f"{EMBED}.weight").to(torch.float32)
        self.embed_in = self.embed_f  # the table calibration reads (quantize_embedding replaces it)
        self.emb_meta = None
        self.x = self.y = self.ids = None
        self.calib_info = None
        self.tensors: dict = {}
        self.linears: dict[str, dict] = {}
        self.qbytes = self.qweights = 0
        self.logs: dict[str, list] = {}

    def log(self, key: str, entry: dict):
        self.logs.setdefault(key, []).append(entry)

    def calibrate(self, text, samples: int, seq_len: int):
        ids, self.calib_info = calibration_windows(self.tok, text, samples, seq_len, self.seed)
        self.ids = ids  # (N, L) token ids: train_e2e trains on them
        self.x = self.embed_in[ids].to(self.device)  # (N, L, H): the embedding the artifact stores
        self.y = torch.empty_like(self.x)

    @torch.no_grad()
    def forward(self, layer, x: torch.Tensor, out: torch.Tensor):
        pos = torch.arange(x.shape[1], device=x.device)
        for s in range(0, x.shape[0], CHUNK):
            out[s: s + CHUNK] = layer(x[s: s + CHUNK], self.rope, pos)

    def open_layer(self, i: int) -> M.Layer:
        for nrm in ("input_layernorm", "post_attention_layernorm"):
            self.tensors[f"model.layers.{i}.{nrm}.weight"] = self.store.get(f"model.layers.{i}.{nrm}.weight")
        return M.Layer(i, float_layer(self.cfg, self.store, i, self.float_nm).to(self.device))

    def observe(self, lw: M.Layer):
        """The calibration pass through the float layer with the hooks the modifiers asked for."""
        hooks = [(lw.linear(p), st) for p, st in lw.stats.items()] + lw.hooks
        if self.x is None or not hooks:
            return
        handles = [mod.register_forward_hook(fn) for mod, fn in hooks]
        self.forward(lw.layer, self.x, self.y)
        for h in handles:
            h.remove()

    def add_quantized(self, name: str, res):
        packed, meta = pack_linear(name, res)
        self.tensors.update(packed)
        self.linears[name] = meta
        self.qbytes += packed_weight_bytes(packed, name)
        self.qweights += meta["in"] * meta["out"]

    def close_layer(self, lw: M.Layer):
        """Float weights of the linears nobody compressed, the packed quantized ones; then the calibration
        stream through the quantized layer (the next layer's input)."""
        for p in ATTN + MLP_NAMES:
            name = linear_name(lw.i, p)
            if p not in lw.results and p not in lw.done:
                w0 = self.store.get(name + ".weight")
                self.tensors[name + ".weight"] = (lw.linear(p).weight.data.to("cpu", w0.dtype) if p in lw.changed
                                                  else w0)
        for p, res in lw.results.items():
            name = linear_name(lw.i, p)
            self.add_quantized(name, res)
            setattr(lw.parent(p), p, QLinear(res, self.nm, name).to(self.device))
        if self.x is not None:
            lw.layer.self_attn.nm = self.nm
            self.forward(lw.layer, self.x, self.y)
            self.x, self.y = self.y, self.x

    def replace_quantized(self, name: str, res):
        """A quantized linear's fields changed after it was packed (train_e2e): the same shapes, repacked."""
        packed, meta = pack_linear(name, res)
        if meta != self.linears[name] or set(packed) != {k for k in self.tensors if k.startswith(name + ".")}:
            raise QuantError(f"{name}: the retrained fields {meta} do not match the packed layer {self.linears[name]}")
        self.tensors.update(packed)

    def quantized_model(self):
        """The model as the artifact will hold it, before ``leftovers`` (so from the run's own parts: the
        embedding table calibration reads, every layer as packed or written, the lm_head), for train_e2e.
        Built as ``load_artifact`` builds it, so that training an artifact gives the same bytes."""
        import numpy as np

        from .artifact import unpack_linear
        from .model import DecoderLayer, FloatLinear, LlamaLM

        tnp = {k: v for k, v in self.tensors.items() if isinstance(v, np.ndarray)}

        def lin(name):
            if name in self.linears:
                return QLinear(unpack_linear(name, tnp, self.linears[name]), self.nm, name)
            w = self.tensors.get(name + ".weight")
            return FloatLinear(w if w is not None else self.store.get(name + ".weight"))

        layers = []
        for i in range(self.cfg.num_hidden_layers):
            lins = {p: lin(linear_name(i, p)) for p in ATTN + MLP_NAMES}
            norms = {n: self.tensors[f"model.layers.{i}.{n}.weight"] for n in ("input_layernorm", "post_attention_layernorm")}
            layers.append(DecoderLayer(self.cfg, self.nm, lins, norms))
        head = self.store.lm_head()
        head = lin("lm_head") if "lm_head" in self.linears else (None if head is None else FloatLinear(head))
        return LlamaLM(self.cfg, self.embed_in, layers, self.store.get("model.norm.weight"), head, self.nm).eval()

    def leftovers(self):
        """What no modifier wrote: the float embedding, the final norm, an untied float lm_head."""
        if self.emb_meta is None:
            self.tensors[f"{EMBED}.weight"] = self.store.get(f"{EMBED}.weight")
        self.tensors["model.norm.weight"] = self.store.get("model.norm.weight")
        head_w = self.store.lm_head()
        if head_w is not None and "lm_head" not in self.linears:
            self.tensors["lm_head.weight"] = head_w


def quantize_model(source: str, recipe: Recipe, out_dir: str | Path, *, calib_text: str | Path | None = None,
                   calib_samples: int = 32, seq_len: int = 512, seed: int = 0, progress: bool = True,
                   device=None) -> dict:
    """Compress ``source`` with ``recipe`` into the artifact folder ``out_dir`` (written atomically).
    Returns the report dict (also written to out_dir/report.json). ``device`` (cpu, cuda, cuda:N;
    ``quant.runtime.resolve_device``): where the layers, the calibration stream, the Hessians, GPTQ and the
    training stages run; the checkpoint is read and the artifact written from the CPU."""
    from tqdm import tqdm

    from .runtime import resolve_device

    t0, secs = time.time(), {}
    dev = resolve_device(device)
    path = resolve_source(source)
    if is_artifact(path):  # only the end-of-pipeline training can continue an artifact
        return train_artifact(path, recipe, out_dir, calib_text=calib_text, calib_samples=calib_samples,
                              seq_len=seq_len, seed=seed, progress=progress, device=dev)
    cfg = load_config(path)
    check_recipe(cfg, recipe, str(path))
    mods = M.build(recipe)
    needs = set().union(*(m.needs() for m in mods))
    with atomic_dir(out_dir) as tmp:
        run = Run(path, cfg, recipe, seed, dev)
        secs["load"] = _lap(t0)
        t = time.time()
        for m in mods:
            m.start(run)
        secs["embedding"] = _lap(t)
        t = time.time()
        if "activations" in needs:
            run.calibrate(calib_text, calib_samples, seq_len)
            for m in mods:
                m.calibrated(run)
        secs["calibration_data"] = _lap(t)
        t = time.time()
        for i in tqdm(range(cfg.num_hidden_layers), desc=f"quantize {recipe.name}", unit="layer",
                      disable=not progress):
            lw = run.open_layer(i)
            for m in mods:
                m.observe(run, lw)
            run.observe(lw)
            for event in ("prepare", "compress", "tune"):
                for m in mods:
                    getattr(m, event)(run, lw)
            run.close_layer(lw)
        secs["layers"] = _lap(t)
        if "reconstruct" in run.logs:
            secs["reconstruct"] = sum(r["seconds"] for r in run.logs["reconstruct"])
        t = time.time()
        for m in mods:
            m.finalize(run)
        run.leftovers()
        secs["lm_head"] = _lap(t)
        if "train_e2e" in run.logs:  # inside the lm_head lap (finalize), also on its own
            secs["train_e2e"] = run.logs["train_e2e"][0]["seconds"]
        calib_tokens = calib_samples * seq_len if "activations" in needs else 0
        return _write(run, tmp, source, secs, t0, calib_tokens)


def _lap(t: float) -> float:
    return time.time() - t


def _write(run: Run, tmp: Path, source: str, secs: dict, t0: float, calib_tokens: int) -> dict:
    """model.safetensors, config, tokenizer, recipe.yaml, manifest.json and report.json into ``tmp``."""
    cfg, recipe, tensors, linears = run.cfg, run.recipe, run.tensors, run.linears
    t = time.time()
    write_model(tmp, tensors, linears, run.emb_meta)
    cfg.save_pretrained(str(tmp))
    run.tok.save_pretrained(str(tmp))
    (tmp / "recipe.yaml").write_text(recipe_yaml(recipe))
    secs["write"] = _lap(t)
    t = time.time()
    src_hash = run.store.source_hash()
    secs["hash"] = _lap(t)
    seconds = time.time() - t0
    rt = recipe.runtime()
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "source": str(source), "source_path": str(run.path), "source_sha256": src_hash,
        "recipe": recipe.name, "runtime": rt, "tools": tool_versions(),
        "seconds": {k: round(v, 3) for k, v in secs.items()}, "calibration": run.calib_info,
        "not_applied": [], "k_smoothing": run.logs.get("k_smoothing"),
        "reconstruct": run.logs.get("reconstruct"),
    }
    if "train_e2e" in run.logs:
        manifest["train_e2e"] = run.logs["train_e2e"][0]
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    stored = sum(tensor_bytes(v) for v in tensors.values())
    report = {
        "recipe": recipe.name,
        "source": str(source),
        "bits_per_weight": (8 * run.qbytes / run.qweights) if run.qweights else None,
        # the whole model as stored (every tensor) over the float model's parameters
        "bits_per_parameter": 8 * stored / float_parameter_count(cfg),
        "float_parameters": float_parameter_count(cfg),
        "stored_tensor_bytes": stored,
        # read per decoded token: all linears incl. lm_head as stored, one embedding row, the norms
        "bytes_per_token_decode": decode_bytes_per_token(tensors, linears, cfg, run.emb_meta),
        "kv_bytes_per_token_per_layer": kv_bytes_per_token_per_layer(cfg, rt["kv4"]),
        "embedding_bits": run.emb_meta["bits"] if run.emb_meta else None,
        "lm_head_bits": linears["lm_head"]["bits"] if "lm_head" in linears else None,
        "quantized_linears": len(linears),
        "quantized_weights": run.qweights,
        "quantized_weight_bytes": run.qbytes,
        "size_bytes": (tmp / "model.safetensors").stat().st_size,
        "artifact_bytes": sum(f.stat().st_size for f in tmp.iterdir() if f.is_file()),
        "seconds": round(seconds, 3),
        "seconds_per_step": manifest["seconds"],
        "seconds_per_layer": round(secs["layers"] / cfg.num_hidden_layers, 3),
        "peak_rss_bytes": peak_rss_bytes(),
        "layers": cfg.num_hidden_layers,
        "device": str(run.device),
        "calibration_tokens": calib_tokens,
        "not_applied": [],
    }
    (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


# ---------------------------------------------------------------------------------------------------
# continuing an artifact: the end-of-pipeline training (train_e2e) on an artifact already quantized
# ---------------------------------------------------------------------------------------------------
#: modifiers that act at finalize only, on the finished model: what an artifact can be continued with
CONTINUES = ("train_e2e",)


def _resume_problem(art: Path, recipe: Recipe) -> str | None:
    """Why ``recipe`` cannot continue the artifact ``art`` (None when it can): the recipe must be the
    artifact's own, modifier for modifier, followed by modifiers the artifact lacks that act on the finished
    model only (``CONTINUES``), so that the result equals quantizing the checkpoint with the whole recipe."""
    import yaml

    from .artifact import recipe_dict

    try:
        have = yaml.safe_load((art / "recipe.yaml").read_text())["recipe"]["modifiers"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as e:
        return f"its recipe.yaml is unreadable ({e}); the artifact is corrupt"
    want = recipe_dict(recipe)["recipe"]["modifiers"]
    key = lambda m: next(iter(m))  # noqa: E731
    done = [m for m in have if key(m) in CONTINUES]
    if done:
        return f"it was already made with {key(done[0])}; continue the artifact it was made from, or quantize the checkpoint"
    n = len(want)
    while n and key(want[n - 1]) in CONTINUES:
        n -= 1
    base = want[:n]
    if n == len(want):
        return (f"the recipe {recipe.name!r} does not end with modifiers that continue a finished artifact "
                f"({', '.join(CONTINUES)}); quantize the original checkpoint")
    for i, (a, b) in enumerate(zip(have, base)):
        if a != b:
            return (f"modifiers[{i}] differs: the artifact was made with {a}, the recipe has {b}; the recipe "
                    f"must repeat the artifact's modifiers exactly, then add {', '.join(CONTINUES)}")
    if len(base) != len(have):
        return (f"the artifact was made with {len(have)} modifiers, the recipe has {len(base)} before "
                f"{key(want[n])}; the recipe must repeat the artifact's modifiers exactly")
    return None


def train_artifact(art: Path, recipe: Recipe, out_dir: str | Path, *, calib_text=None, calib_samples: int = 32,
                   seq_len: int = 512, seed: int = 0, progress: bool = True, device=None) -> dict:
    """``quantize_model`` from an artifact: run the recipe's end-of-pipeline training (``train_e2e``) on the
    artifact ``art`` made with the rest of the recipe, and write the result to ``out_dir`` (atomically).
    The calibration (text, samples, length, seed) and the float checkpoint (its sha256) must be the
    artifact's own: the result has the same bytes as quantizing the checkpoint with the whole recipe."""
    import shutil

    from safetensors import safe_open

    from .artifact import load_artifact, pack_linear
    from .e2e import train_e2e
    from .model import LlamaLM
    from .recipe import Rotate

    from .runtime import resolve_device

    t0 = time.time()
    dev = resolve_device(device)
    art = Path(art)
    why = _resume_problem(art, recipe)
    if why:
        raise QuantError(f"{art} is already an accllm artifact and {why}")
    manifest = json.loads((art / "manifest.json").read_text())
    src = Path(manifest.get("source_path") or "")
    if not src.exists():
        raise QuantError(f"{art}: its float checkpoint {src} (manifest source_path) is not there; train_e2e needs "
                         f"the float model as its teacher")
    cfg = load_config(src)
    check_recipe(cfg, recipe, str(src))
    run = Run(src, cfg, recipe, seed, dev)
    got = run.store.source_hash()
    if got != manifest.get("source_sha256"):
        raise QuantError(f"{art}: the checkpoint at {src} has sha256 {got[:16]}…, not the {str(manifest.get('source_sha256'))[:16]}… "
                         f"the artifact was made from; quantize the checkpoint instead")
    for m in M.build(recipe):  # the rotation, if any: the teacher is the rotated float model, as in the pipeline
        if isinstance(m.cfg, Rotate):
            m.start(run)
    run.calibrate(calib_text, calib_samples, seq_len)
    had = dict(manifest.get("calibration") or {})  # none: the artifact's recipe read no calibration text
    mine = {k: run.calib_info[k] for k in ("tokens_in_text", "samples", "seq_len", "seed", "windows")}
    if had and ({k: had.get(k) for k in mine} != mine
                or Path(str(had.get("text"))).name != Path(run.calib_info["text"]).name):
        raise QuantError(f"{art} was calibrated on {had.get('samples')} x {had.get('seq_len')} tokens of "
                         f"{Path(str(had.get('text'))).name}, seed {had.get('seed')}; give the same calibration "
                         f"(--calib-text, --calib-samples, --seq-len, --seed) as the artifact, not {calib_samples} x "
                         f"{seq_len}, seed {seed} of {Path(run.calib_info['text']).name}")
    mods = [m for m in M.build(recipe) if type(m.cfg).__name__ == "TrainE2E"]
    mods[0].calibrated(run)  # its own training text, if any: read (or refused) before the models are loaded
    student, _ = load_artifact(art, dev)
    teacher = LlamaLM.from_store(run.cfg, run.store).to(dev).eval()
    tuned, st = train_e2e(student, teacher, mods[0].ids, mods[0].cfg, seed=seed, deploy=run.nm, progress=progress)
    if mods[0].data_info is not None:
        st["data"] = mods[0].data_info
    with safe_open(str(art / "model.safetensors"), framework="pt") as h:
        md = h.metadata() or {}
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    linears = json.loads(md.get("accllm.linears", "{}"))
    emb = json.loads(md["accllm.embedding"]) if "accllm.embedding" in md else None
    for name, q in tuned.items():
        packed, meta = pack_linear(name, q)
        if meta != linears[name]:
            raise QuantError(f"{name}: the trained fields {meta} do not match the artifact's {linears[name]}")
        tensors.update(packed)
    secs = {"train_e2e": st["seconds"]}
    with atomic_dir(out_dir) as tmp:
        write_model(tmp, tensors, linears, emb)
        skip = {"model.safetensors", "manifest.json", "report.json", "recipe.yaml"}
        for f in art.iterdir():  # config.json and the tokenizer's files, as the artifact has them
            if f.is_file() and f.name not in skip:
                shutil.copy2(f, tmp / f.name)
        (tmp / "recipe.yaml").write_text(recipe_yaml(recipe))
        seconds = time.time() - t0
        man = {**manifest, "recipe": recipe.name, "tools": tool_versions(), "continued_from": str(art),
               "seconds": {**manifest.get("seconds", {}), **{k: round(v, 3) for k, v in secs.items()}},
               "calibration": manifest.get("calibration") or run.calib_info, "train_e2e": st}
        (tmp / "manifest.json").write_text(json.dumps(man, indent=2) + "\n")
        report = json.loads((art / "report.json").read_text())
        report.update({
            "recipe": recipe.name,
            "seconds": round(report.get("seconds", 0) + seconds, 3),  # the whole recipe: artifact + this
            "continue_seconds": round(seconds, 3),
            "seconds_per_step": man["seconds"],
            "peak_rss_bytes": max(report.get("peak_rss_bytes", 0), peak_rss_bytes()),
            "continue_peak_rss_bytes": peak_rss_bytes(),
            "continue_device": str(dev),
            "size_bytes": (tmp / "model.safetensors").stat().st_size,
            "continued_from": str(art),
        })
        report["artifact_bytes"] = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
