"""The packed artifact the hardware runs, and reading it back.

A folder::

    model.safetensors   quantized linears packed as the hardware reads them (quant.packing):
                          {name}.qweight    codes, ``bits`` per field LSB-first per row (N, ceil(K·bits/8))
                                            — for a 2:4 layer only the kept codes (N, ceil(K/2·bits/8))
                          {name}.meta       2:4 pattern index per four inputs, 3 bits (N, ceil(K/4·3/8))
                          {name}.scales     s_hat uint8 (N, K/G);  {name}.mins  m_hat int8 (N, K/G)
                          {name}.row_scale  S_row float16 (N,)
                        a quantized embedding table (recipe ``quantize_embedding``), no float copy:
                          model.embed_tokens.qweight    codes int8 (V, H)
                          model.embed_tokens.row_scale  S_row float16 (V,)
                        and the tensors left in float under their Hugging Face names (a float
                        embedding, norms, an unquantized lm_head or projection). The header metadata
                        ``accllm.linears`` (JSON) gives each quantized linear's in/out/bits/group/sparse,
                        ``accllm.embedding`` (JSON) the quantized embedding's vocab/hidden/bits (absent:
                        the embedding is float).
    config.json         the model's transformers config;  tokenizer files
    recipe.yaml         the resolved recipe (every modifier with every field)
    manifest.json       source, its sha256, tool versions, seconds per step, runtime numerics
    report.json         bits_per_weight, bits_per_parameter, bytes_per_token_decode,
                        kv_bytes_per_token_per_layer, size_bytes, seconds, peak_rss_bytes, ...

Writing goes to a hidden temporary folder beside the destination, moved into place at the end
(``atomic_dir``): a failure leaves nothing at ``out_dir``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from . import packing, reference
from .errors import QuantError
from .formats import (EMBED_BITS_SUPPORTED, EMBED_CODE, EMBED_ROW_SCALE_BITS, KV_CODE, KV_RANGE, KV_ZERO,
                      SPARSE_M, SPARSE_N)
from .model import ATTN, MLP_NAMES, FloatLinear, LlamaLM, Numerics, QLinear, DecoderLayer, linear_name

FORMAT = "accllm-artifact"
FORMAT_VERSION = 1

try:  # the per-layer algorithms' container (validates ranges); a plain record otherwise
    from .qlinear import QuantizedLinear
except ImportError:  # pragma: no cover - only while quant/qlinear.py is absent
    @dataclasses.dataclass
    class QuantizedLinear:  # type: ignore[no-redef]
        codes: np.ndarray
        scales: np.ndarray
        mins: np.ndarray
        row_scale: np.ndarray
        group_size: int
        bits: int = 2
        mask: np.ndarray | None = None
        bias: np.ndarray | None = None


# ---------------------------------------------------------------------------------------------------
# atomic output folder
# ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_dir(out_dir: str | Path):
    """Yield a temporary folder; on success it replaces ``out_dir``, on any error it is removed."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise QuantError(f"--out {out}: exists and is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise QuantError(f"--out {out}: exists, is not empty and is not an accllm artifact; refusing to "
                         f"replace it. Remove it or choose another path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QuantError(f"--out {out}: cannot create the parent folder ({e})") from e
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    # SIGTERM (e.g. `kill`, a CI timeout) would end the process without unwinding: turn it into
    # SystemExit while the folder is being written so the temporary folder is removed.
    import signal
    import threading

    old_term = None
    if threading.current_thread() is threading.main_thread():
        def _term(signum, frame):
            raise SystemExit(128 + signum)

        old_term = signal.signal(signal.SIGTERM, _term)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# packing one linear
# ---------------------------------------------------------------------------------------------------
def pack_linear(name: str, q) -> tuple[dict[str, np.ndarray], dict]:
    """QuantizedLinear -> (tensors, metadata). Pure repacking; ``unpack_linear`` inverts it exactly."""
    codes = np.asarray(q.codes)
    n, k = codes.shape
    t: dict[str, np.ndarray] = {}
    sparse = q.mask is not None
    if sparse:
        kept, meta = reference.compress_24(codes, q.mask, q.bits)
        t[f"{name}.qweight"] = packing.pack_bits(kept, q.bits)
        t[f"{name}.meta"] = packing.pack_sparse_meta(meta)
    else:
        t[f"{name}.qweight"] = packing.pack_bits(codes, q.bits)
    t[f"{name}.scales"] = np.asarray(q.scales).astype(np.uint8)
    t[f"{name}.mins"] = np.asarray(q.mins).astype(np.int8)
    t[f"{name}.row_scale"] = np.asarray(q.row_scale).astype(np.float16)
    if q.bias is not None:
        t[f"{name}.bias"] = np.asarray(q.bias).astype(np.float32)
    meta = {"in": int(k), "out": int(n), "bits": int(q.bits), "group_size": int(q.group_size), "sparse": sparse}
    return t, meta


def packed_weight_bytes(tensors: dict[str, np.ndarray], name: str) -> int:
    """Bytes of a quantized linear as stored: codes, 2:4 metadata, group scales and mins, row scales."""
    return sum(tensors[f"{name}.{p}"].nbytes for p in ("qweight", "meta", "scales", "mins", "row_scale")
               if f"{name}.{p}" in tensors)


def unpack_linear(name: str, t: dict[str, np.ndarray], meta: dict):
    k, bits, g = meta["in"], meta["bits"], meta["group_size"]
    try:
        if meta["sparse"]:
            kept = packing.unpack_bits(t[f"{name}.qweight"], bits, k // SPARSE_M * SPARSE_N)
            md = packing.unpack_sparse_meta(t[f"{name}.meta"], k // SPARSE_M)
            codes, mask = reference.expand_24(kept, md, bits)
        else:
            codes, mask = packing.unpack_bits(t[f"{name}.qweight"], bits, k), None
        bias = t.get(f"{name}.bias")
        return QuantizedLinear(codes=codes, scales=t[f"{name}.scales"], mins=t[f"{name}.mins"],
                               row_scale=t[f"{name}.row_scale"].astype(np.float64), group_size=g, bits=bits,
                               mask=mask, bias=bias)
    except KeyError as e:
        raise QuantError(f"artifact: tensor {e.args[0]} missing for {name}; the artifact is corrupt") from e
    except (reference.FormatError, ValueError) as e:
        raise QuantError(f"artifact: {name} cannot be unpacked ({e}); the artifact is corrupt") from e


# ---------------------------------------------------------------------------------------------------
# the quantized embedding table
# ---------------------------------------------------------------------------------------------------
EMBED = "model.embed_tokens"


def pack_embedding(codes, row_scale) -> tuple[dict[str, np.ndarray], dict]:
    """(codes (V, H) int8, row scales (V,)) -> (tensors, metadata): codes as int8, one byte each (the
    lookup reads a whole row), row scales as float16. ``unpack_embedding`` inverts it exactly."""
    c = reference._int(codes, EMBED_CODE, "embedding codes")
    rs = np.asarray(row_scale, np.float64)
    if c.ndim != 2 or rs.shape != (c.shape[0],):
        raise reference.FormatError(f"embedding codes {c.shape} and row scales {rs.shape}: need (V, H), (V,)")
    if not np.array_equal(rs.astype(np.float16).astype(np.float64), rs):
        bad = int(np.argmax(rs.astype(np.float16).astype(np.float64) != rs))
        raise reference.FormatError(f"embedding row scale {float(rs[bad])} at row {bad} is not a float16 value")
    t = {f"{EMBED}.qweight": c.astype(np.int8), f"{EMBED}.row_scale": rs.astype(np.float16)}
    return t, {"vocab": int(c.shape[0]), "hidden": int(c.shape[1]), "bits": EMBED_CODE.bits}


def unpack_embedding(t: dict[str, np.ndarray], meta: dict, where: str = "artifact") -> tuple[np.ndarray, np.ndarray]:
    """-> (codes (V, H) int8, row_scale (V,) float64), checked against ``meta``."""
    try:
        codes, rs = t[f"{EMBED}.qweight"], t[f"{EMBED}.row_scale"]
        v, h, bits = int(meta["vocab"]), int(meta["hidden"]), int(meta["bits"])
    except (KeyError, TypeError, ValueError) as e:
        raise QuantError(f"{where}: quantized embedding incomplete ({e!r} missing or malformed); the artifact "
                         f"is corrupt") from e
    if bits not in EMBED_BITS_SUPPORTED:
        raise QuantError(f"{where}: embedding stored at {bits} bits; this accllm reads {list(EMBED_BITS_SUPPORTED)}")
    if codes.dtype != np.int8 or codes.shape != (v, h) or rs.dtype != np.float16 or rs.shape != (v,):
        raise QuantError(f"{where}: embedding tensors {codes.dtype}{tuple(codes.shape)} / {rs.dtype}{tuple(rs.shape)}"
                         f" do not match the header (int8 ({v}, {h}) / float16 ({v},)); the artifact is corrupt")
    rs64 = rs.astype(np.float64)
    try:
        reference.dequantize_embedding(codes, rs64)  # ranges and row scales (finite, > 0)
    except reference.FormatError as e:
        raise QuantError(f"{where}: embedding cannot be read ({e}); the artifact is corrupt") from e
    return codes, rs64


# ---------------------------------------------------------------------------------------------------
# size accounting (report.json)
# ---------------------------------------------------------------------------------------------------
def tensor_bytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    return int(np.asarray(x).nbytes)


def float_parameter_count(cfg) -> int:
    """Parameters of the float Llama: embedding, per layer the seven projections and two norms, the
    final norm, and the lm_head unless it is tied to the embedding (no biases: check_architecture)."""
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or h // heads
    layer = h * heads * hd * 2 + h * kv * hd * 2 + 3 * h * i + 2 * h
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    return v * h * (1 if tied else 2) + cfg.num_hidden_layers * layer + h


def kv_bytes_per_token_per_layer(cfg, kv4: bool) -> float:
    """Bytes one token adds to one layer's KV cache: keys and values of every KV head. KV4: D 4-bit codes
    plus the 4-bit zero-point and the 32-bit range per head (formats.KV_*); otherwise float16."""
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    bits = hd * KV_CODE.bits + KV_ZERO.bits + KV_RANGE.bits if kv4 else hd * 16
    return 2 * kv * bits / 8


def decode_bytes_per_token(tensors: dict, linears: dict, cfg, embedding: dict | None) -> int:
    """Bytes read from memory to decode one token, the KV cache excluded: every linear of every layer and
    the lm_head as stored (packed, or float), one embedding row, and every norm vector. A tied float
    lm_head reads the whole embedding table as stored."""
    total = 0
    names = [linear_name(i, p) for i in range(cfg.num_hidden_layers) for p in ATTN + MLP_NAMES]
    for name in names + ["lm_head"]:
        if name in linears:
            total += packed_weight_bytes(tensors, name)
        elif name + ".weight" in tensors:
            total += tensor_bytes(tensors[name + ".weight"])
        elif name == "lm_head":  # tied
            total += (tensor_bytes(tensors[f"{EMBED}.qweight"]) + tensor_bytes(tensors[f"{EMBED}.row_scale"])
                      if embedding else tensor_bytes(tensors[f"{EMBED}.weight"]))
    if embedding:
        total += embedding["hidden"] * EMBED_CODE.bits // 8 + EMBED_ROW_SCALE_BITS // 8
    else:
        e = tensors[f"{EMBED}.weight"]
        total += tensor_bytes(e) // e.shape[0]
    total += sum(tensor_bytes(v) for k, v in tensors.items() if k.endswith("norm.weight"))
    return int(total)


# ---------------------------------------------------------------------------------------------------
# recipe <-> yaml (quant must not import accllm.config: serialise the dataclasses directly)
# ---------------------------------------------------------------------------------------------------
def recipe_dict(recipe) -> dict:
    from .recipe import MODIFIERS

    names = {cls: key for key, cls in MODIFIERS.items()}

    def fields(m) -> dict:  # fields marked omit_default (quant.schema.param) only when set
        d = dataclasses.asdict(m)
        for f in dataclasses.fields(m):
            if f.metadata.get("omit_default") and d[f.name] == f.default:
                del d[f.name]
        return d

    mods = [{names[type(m)]: fields(m)} for m in recipe.modifiers]
    return {"recipe": {"name": recipe.name, "modifiers": mods}}


def recipe_yaml(recipe) -> str:
    import yaml

    return yaml.safe_dump(recipe_dict(recipe), sort_keys=False)


def runtime_numerics(recipe) -> dict:
    """The deployment numerics of a recipe (``Recipe.runtime``: each modifier sets its part)."""
    return recipe.runtime()


def tool_versions() -> dict:
    import platform
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for d in ("accllm", "torch", "transformers", "safetensors", "numpy", "gguf", "tokenizers"):
        try:
            out[d] = md.version(d)
        except md.PackageNotFoundError:
            out[d] = None
    return out


def write_model(folder: Path, tensors: dict[str, np.ndarray | torch.Tensor], linears: dict[str, dict],
                embedding: dict | None = None):
    from safetensors.torch import save_file

    pt = {k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v.contiguous())
          for k, v in tensors.items()}
    md = {"format": FORMAT, "accllm.linears": json.dumps(linears, sort_keys=True)}
    if embedding is not None:
        md["accllm.embedding"] = json.dumps(embedding, sort_keys=True)
    path = folder / "model.safetensors"
    save_file(pt, str(path), metadata=md)
    _canonical_header(path)


def _canonical_header(path: Path):
    """safetensors writes ``__metadata__`` from a Rust HashMap, whose order changes from one save to the
    next (measured: the same tensors gave different model.safetensors bytes in half of the saves), so the
    header is rewritten in place with every key sorted: the same length (the same JSON, padded with
    spaces as safetensors pads it), the tensor data untouched. Same model -> same bytes."""
    import struct

    with open(path, "r+b") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        raw = f.read(n)
        new = json.dumps(json.loads(raw), separators=(",", ":"), ensure_ascii=False, sort_keys=True).encode()
        if len(new) > n:  # cannot happen for the same keys; keep safetensors' own header then
            return
        f.seek(8)
        f.write(new + b" " * (n - len(new)))


# ---------------------------------------------------------------------------------------------------
# reading back
# ---------------------------------------------------------------------------------------------------
def load_artifact(path: str | Path, device: str = "cpu", numerics: Numerics | None = None):
    """-> (LlamaLM with QLinear modules, tokenizer).

    A quantized embedding becomes the model's float table ``code * S_row`` (so the float route looks up
    what is stored) and, for the integer route, ``model.embed_q = (codes int8 (V, H), row_scale float64
    (V,))``; ``model.embed_q`` is None when the artifact keeps the embedding in float."""
    parts = ArtifactParts(path, numerics)
    model = parts.shell([parts.layer(i) for i in range(parts.n_layers)])
    return model.to(device).eval(), parts.tokenizer()


class _Tensors:
    """The artifact's tensors by name, each read from model.safetensors when asked for (nothing is held)."""

    def __init__(self, f: Path, names, numpy: bool = False):
        self.f, self.names, self.numpy = f, set(names), numpy

    def __contains__(self, name):
        return name in self.names

    def keys(self):
        return sorted(self.names)

    def __getitem__(self, name):
        from safetensors import safe_open

        if name not in self.names:
            raise KeyError(name)
        try:
            with safe_open(str(self.f), framework="pt") as h:
                t = h.get_tensor(name)
        except Exception as e:
            raise QuantError(f"artifact {self.f}: cannot read {name} ({type(e).__name__}: {e}); the artifact is "
                             f"corrupt") from e
        return t.numpy() if self.numpy else t

    def get(self, name, default=None):
        return self[name] if name in self else default


class ArtifactParts:
    """An artifact opened for reading part by part: ``layer(i)`` reads decoder layer i's tensors (packed
    linears unpacked into QLinear modules, norms) and nothing else; ``shell(layers)`` is the LlamaLM
    around given layers (embedding, final norm, lm_head). ``load_artifact`` is ``shell`` over every layer;
    a streamed evaluation (quant.evaluate.stream_logits) reads one layer at a time."""

    def __init__(self, path: str | Path, numerics: Numerics | None = None):
        from safetensors import safe_open
        from transformers import AutoConfig

        from .loading import check_architecture

        path = Path(path)
        self.path = path
        try:
            manifest = json.loads((path / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise QuantError(f"artifact {path}: manifest.json unreadable ({e}); the artifact is corrupt") from e
        if manifest.get("format") != FORMAT:
            raise QuantError(f"artifact {path}: manifest format {manifest.get('format')!r}, expected {FORMAT!r}")
        try:
            cfg = AutoConfig.from_pretrained(str(path))
        except Exception as e:
            raise QuantError(f"artifact {path}: config.json unreadable ({e})") from e
        check_architecture(cfg, str(path))
        self.config = cfg
        f = self.file = path / "model.safetensors"
        try:
            with safe_open(str(f), framework="pt") as h:
                md = h.metadata() or {}
                names = list(h.keys())
        except Exception as e:
            raise QuantError(f"artifact {f}: cannot read ({type(e).__name__}: {e}); the artifact is corrupt") from e
        self._md = md
        self._t, self._tnp = _Tensors(f, names), _Tensors(f, names, numpy=True)
        self.linears = json.loads(md.get("accllm.linears", "{}"))
        rt = manifest.get("runtime", {})
        self.numerics = numerics or Numerics(a8=bool(rt.get("a8")), kv4=bool(rt.get("kv4")),
                                             sinks=int(rt.get("sinks") or 0), window=rt.get("window"))
        self.n_layers = int(cfg.num_hidden_layers)

    def _lin(self, name):
        if name in self.linears:
            return QLinear(unpack_linear(name, self._tnp, self.linears[name]), self.numerics, name)
        if name + ".weight" not in self._t:
            raise QuantError(f"artifact {self.file}: tensor {name}.weight missing; the artifact is corrupt")
        return FloatLinear(self._t[name + ".weight"])

    def _get(self, name):
        if name not in self._t:
            raise QuantError(f"artifact {self.file}: tensor {name} missing; the artifact is corrupt")
        return self._t[name]

    @property
    def quantized(self) -> bool:
        """Whether any linear (lm_head included) is stored quantized."""
        return bool(self.linears)

    def float_linear(self) -> str | None:
        """The first decoder linear stored in float (the integer route cannot run it), or None."""
        return next((linear_name(i, p) for i in range(self.n_layers) for p in ATTN + MLP_NAMES
                     if linear_name(i, p) not in self.linears), None)

    def layer(self, i: int) -> DecoderLayer:
        lins = {p: self._lin(linear_name(i, p)) for p in ATTN + MLP_NAMES}
        norms = {n: self._get(f"model.layers.{i}.{n}.weight") for n in ("input_layernorm", "post_attention_layernorm")}
        return DecoderLayer(self.config, self.numerics, lins, norms)

    def shell(self, layers: list | None = None) -> LlamaLM:
        """The LlamaLM with ``layers`` (none: the embedding, final norm and lm_head only)."""
        md, t, f, cfg = self._md, self._t, self.file, self.config
        if "accllm.embedding" in md or f"{EMBED}.qweight" in t:
            try:
                emeta = json.loads(md.get("accllm.embedding", "null"))
            except json.JSONDecodeError as e:
                raise QuantError(f"artifact {f}: header accllm.embedding unreadable ({e}); the artifact is corrupt") from e
            if not isinstance(emeta, dict):
                raise QuantError(f"artifact {f}: {EMBED}.qweight present but the header lists no accllm.embedding; "
                                 f"the artifact is corrupt")
            if (emeta.get("vocab"), emeta.get("hidden")) != (cfg.vocab_size, cfg.hidden_size):
                raise QuantError(f"artifact {f}: embedding header {emeta} does not match config.json (vocab "
                                 f"{cfg.vocab_size}, hidden {cfg.hidden_size}); the artifact is corrupt")
            codes, rs = unpack_embedding({k: self._tnp[k] for k in (f"{EMBED}.qweight", f"{EMBED}.row_scale") if k in t},
                                         emeta, f"artifact {f}")
            embed_q = (codes, rs)
            embed = torch.from_numpy(reference.dequantize_embedding(codes, rs)).to(torch.float32)
        else:
            embed_q, embed = None, self._get(f"{EMBED}.weight")
        head = self._lin("lm_head") if ("lm_head" in self.linears or "lm_head.weight" in t) else None
        model = LlamaLM(cfg, embed, list(layers or []), self._get("model.norm.weight"), head, self.numerics)
        model.embed_q = embed_q
        return model.eval()

    def tokenizer(self):
        from .loading import load_tokenizer

        return load_tokenizer(self.path)
