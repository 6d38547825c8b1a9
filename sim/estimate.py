"""Throughput estimates of a compressed Llama on the engine: bytes per token (the roofline), a cycle model
of today's engine per operation, and whole-model decode/prefill tokens per second.

Scope: the engine's products only (dense/2:4 linears, Q.K^T, P.V). The special functions (RMSNorm, RoPE,
softmax, SiLU, the quantizers) and the controller that sequences the operations do not exist as RTL yet
(the decoder-on-RTL issue); they are not modelled and nothing is invented for them. Every result carries
``SCOPE``.

* ``load_model``: a model by its Hugging Face config.json shape alone (built-in names in configs/models/).
* ``ArtifactFormat.from_recipe``: what a recipe stores (quant.formats and docs/numerics.md packing rules).
* ``bytes_per_token``: HBM traffic of one decoded token, by component.
* ``op_cycles`` / ``sequence_cycles``: the engine's cycle model (``hw.engine_model``, beside the RTL, held
  equal to it by tests/hw/test_engine_model.py and within 5 % in Icarus by tests/sim/test_estimate.py).
* ``estimate``: decode and prefill tokens/s = per layer max(engine cycles, HBM time), plus power and
  tokens/J from ``sim.energy``.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from hw import engine_model
from hw.engine_model import Op
from hw.params import EngineParams, TargetParams
from quant.formats import (EMBED_CODE, FX, KV_CODE, KV_ZERO, ROW_SCALE_BITS, SPARSE_M, SPARSE_META_BITS,
                           SPARSE_N, W_MIN, W_SCALE, weight_bits_per_weight)
from quant.recipe import LINEAR_TARGETS, AttentionWindow, Prune, QuantizeKV, QuantizeWeights, Recipe

from . import energy as energy_model
from .hbm import HBM, FLIGHTLLM_EFFICIENCY

SCOPE = ("engine products only; special functions and controller pending the decoder-on-RTL issue")
REPO = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO / "configs" / "models"
#: the lm_head of the integer decoder: a W4 linear (docs/numerics.md, accumulator table; the integer-decoder
#: issue), group size as the recipe's; a recipe override for lm_head wins
LM_HEAD_BITS = 4
#: norm weights (gamma) are read as float16 per element (an assumption until the integer decoder fixes
#: their format: the artifact keeps them in float)
NORM_BITS = 16


class EstimateError(ValueError):
    """Input the estimator cannot work with: the message names what and what to do."""


# ---------------------------------------------------------------------------------------------------
# Model shapes
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    max_positions: int
    tied: bool
    head_dim: int

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.heads // self.kv_heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """Projection -> (out rows N, in features K) of one decoder layer."""
        d, h, kv, i = self.head_dim, self.heads, self.kv_heads, self.intermediate
        return {"q_proj": (h * d, self.hidden), "k_proj": (kv * d, self.hidden), "v_proj": (kv * d, self.hidden),
                "o_proj": (self.hidden, h * d), "gate_proj": (i, self.hidden), "up_proj": (i, self.hidden),
                "down_proj": (self.hidden, i)}

    def parameters(self) -> int:
        per_layer = sum(n * k for n, k in self.linears().values())
        return self.layers * per_layer + self.vocab * self.hidden * (1 if self.tied else 2)


def known_models() -> list[str]:
    return sorted(p.stem for p in MODELS_DIR.glob("*.json"))


def shape_from_config(cfg: dict, name: str, where: str) -> ModelShape:
    need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in need if k not in cfg]
    if missing:
        raise EstimateError(f"{where}: config.json lacks {', '.join(missing)}: a Llama config.json "
                            f"(LlamaForCausalLM) is needed")
    arch = cfg.get("architectures") or ["LlamaForCausalLM"]
    if cfg.get("model_type", "llama") != "llama" and "LlamaForCausalLM" not in arch:
        raise EstimateError(f"{where}: architecture {arch} / model_type {cfg.get('model_type')!r}: only Llama "
                            f"decoders are estimated")
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    if heads % kv:
        raise EstimateError(f"{where}: {heads} attention heads are not a multiple of {kv} KV heads")
    return ModelShape(name=name, hidden=hidden, intermediate=int(cfg["intermediate_size"]),
                      layers=int(cfg["num_hidden_layers"]), heads=heads, kv_heads=kv,
                      vocab=int(cfg["vocab_size"]), max_positions=int(cfg.get("max_position_embeddings") or 0),
                      tied=bool(cfg.get("tie_word_embeddings", False)), head_dim=head_dim)


def load_model(name_or_path: str) -> ModelShape:
    """A built-in name (``llama2-7b``, ``llama3-8b``, ``smollm2-135m``), a config.json, or a folder with one."""
    p = Path(name_or_path)
    if p.is_dir():
        p = p / "config.json"
    if p.suffix == ".json" or p.is_file():
        if not p.is_file():
            raise EstimateError(f"--model {name_or_path}: file not found")
        name = p.parent.name if p.name == "config.json" else p.stem
    else:
        builtin = MODELS_DIR / f"{name_or_path}.json"
        if not builtin.is_file():
            names = known_models()
            near = difflib.get_close_matches(name_or_path, names, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise EstimateError(f"--model {name_or_path!r}: unknown model{hint}. Known: {', '.join(names)}; "
                                f"or give the path of a Hugging Face config.json")
        p, name = builtin, name_or_path
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise EstimateError(f"--model {p}: not readable as JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise EstimateError(f"--model {p}: the top level must be a JSON object")
    return shape_from_config(cfg, name, str(p))


# ---------------------------------------------------------------------------------------------------
# What the recipe stores
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArtifactFormat:
    recipe: str
    weight_bits: int
    group_size: int
    sparse: bool
    lm_head_bits: int
    sinks: int
    window: int | None  # None: full attention (no Λ)

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> "ArtifactFormat":
        qw = recipe.get(QuantizeWeights)
        if qw is None:
            raise EstimateError(f"recipe {recipe.name!r} quantizes no weights: the engine runs W2/W4 integer "
                                f"linears only; choose a W2A8KV4 recipe (e.g. w2a8kv4, w2a8kv4-sparse24)")
        left = [t for t in LINEAR_TARGETS if t not in qw.targets]
        if left:
            raise EstimateError(f"recipe {recipe.name!r} leaves {', '.join(left)} in float: the engine has no "
                                f"float datapath; quantize every projection")
        if recipe.get(QuantizeKV) is None:
            raise EstimateError(f"recipe {recipe.name!r} has no quantize_kv: the engine's attention runs on the "
                                f"4-bit KV cache only")
        import fnmatch

        head_bits = next((int(b) for pat, b in qw.overrides.items() if fnmatch.fnmatchcase("lm_head", pat)),
                         LM_HEAD_BITS)
        win = recipe.get(AttentionWindow)
        prune = recipe.get(Prune)
        return cls(recipe=recipe.name, weight_bits=qw.bits, group_size=qw.group_size, sparse=prune is not None,
                   lm_head_bits=head_bits, sinks=win.sinks if win else 0, window=win.window if win else None)

    @property
    def cache_tokens(self) -> int | None:
        return None if self.window is None else self.sinks + self.window

    def visible(self, context: int) -> int:
        return context if self.window is None else min(context, self.sinks + self.window)


def linear_bytes(n: int, k: int, bits: int, group: int, sparse: bool) -> dict[str, int]:
    """Bytes of one quantized linear as the artifact packs it (docs/numerics.md §10, quant.artifact):
    codes and 2:4 patterns end to end, each row padded to whole bytes; ŝ (uint8) and m̂ (int8) per row and
    group; a float16 row scale."""
    if k % group:
        raise EstimateError(f"a linear with {k} inputs does not split into groups of {group}")
    kept = k // SPARSE_M * SPARSE_N if sparse else k
    out = {"codes": n * math.ceil(kept * bits / 8),
           "meta": n * math.ceil(k // SPARSE_M * SPARSE_META_BITS / 8) if sparse else 0,
           "scales": n * (k // group) * (W_SCALE.bits + W_MIN.bits) // 8,
           "row_scale": n * ROW_SCALE_BITS // 8}
    return out


def kv_token_bits(head_dim: int) -> int:
    """Bits of one token's key (or value) for one KV head: 4-bit codes + 4-bit zero + 32-bit range."""
    return head_dim * KV_CODE.bits + KV_ZERO.bits + FX.bits


def bytes_per_token(m: ModelShape, fmt: ArtifactFormat, context: int, batch: int = 1) -> dict[str, float]:
    """HBM bytes moved per decoded token (batch B: weights shared by the B tokens), by component."""
    layer_w = sum(sum(linear_bytes(n, k, fmt.weight_bits, fmt.group_size, fmt.sparse).values())
                  for n, k in m.linears().values())
    head = sum(linear_bytes(m.vocab, m.hidden, fmt.lm_head_bits, fmt.group_size, False).values())
    kv_tok = 2 * m.kv_heads * kv_token_bits(m.head_dim) / 8  # K and V of one token, one layer
    return {
        "weights": m.layers * layer_w / batch,
        "lm_head": head / batch,
        "kv_read": m.layers * fmt.visible(context) * kv_tok,
        "kv_write": m.layers * kv_tok,
        "norms": (2 * m.layers + 1) * m.hidden * NORM_BITS / 8 / batch,
        "embedding": m.hidden * EMBED_CODE.bits / 8 + ROW_SCALE_BITS / 8,
    }


def artifact_weight_bytes(m: ModelShape, fmt: ArtifactFormat, with_lm_head: bool = True) -> int:
    """Bytes of the quantized linears of the whole model (what report.json calls quantized_weight_bytes)."""
    total = m.layers * sum(sum(linear_bytes(n, k, fmt.weight_bits, fmt.group_size, fmt.sparse).values())
                           for n, k in m.linears().values())
    if with_lm_head:
        total += sum(linear_bytes(m.vocab, m.hidden, fmt.lm_head_bits, fmt.group_size, False).values())
    return total


def bits_per_weight(fmt: ArtifactFormat) -> float:
    """Stored bits per dense weight position without the row scale (quant.formats)."""
    return weight_bits_per_weight(fmt.group_size, sparse=fmt.sparse, code_bits=fmt.weight_bits)


# ---------------------------------------------------------------------------------------------------
# The engine's cycle model lives beside the RTL (hw/engine_model.py); here its shape-level entry points
# with the estimator's error type
# ---------------------------------------------------------------------------------------------------
def _model(fn):
    def wrapped(*args, **kw):
        try:
            return fn(*args, **kw)
        except engine_model.EngineCommandError as e:
            raise EstimateError(str(e)) from None
    wrapped.__name__, wrapped.__doc__ = fn.__name__, fn.__doc__
    return wrapped


op_beats = _model(engine_model.op_beats)
op_cycles = _model(engine_model.op_cycles)
sequence_cycles = _model(engine_model.sequence_cycles)
ops_cycles = _model(engine_model.ops_cycles)


# ---------------------------------------------------------------------------------------------------
# A decoder layer as engine commands
# ---------------------------------------------------------------------------------------------------
def _split(tokens: int, mm: int) -> list[int]:
    return [min(mm, tokens - i) for i in range(0, tokens, mm)]


def linear_ops(p: EngineParams, m: ModelShape, fmt: ArtifactFormat, tokens: int) -> list[Op]:
    mode = "sparse" if fmt.sparse else "dense"
    return [Op(mode, t, k, n, fmt.group_size, name) for name, (n, k) in m.linears().items()
            for t in _split(tokens, p.mm_tokens)]


def attention_ops(p: EngineParams, m: ModelShape, keys: int, queries: int) -> list[Op]:
    """Q.K^T and P.V of one sequence, per KV head: the ``queries`` tokens x the query heads sharing the KV
    head are the command's tokens (split by mm_tokens); P.V's keys are padded to whole lanes (pad p = 0)."""
    kp = -(-keys // p.pe_lanes) * p.pe_lanes
    ops = []
    for t in _split(queries * m.group, p.mm_tokens):
        ops.append(Op("qk", t, m.head_dim, keys, name="qk"))
        ops.append(Op("pv", t, kp, m.head_dim, name="pv"))
    return ops * m.kv_heads


def head_ops(p: EngineParams, m: ModelShape, fmt: ArtifactFormat, tokens: int) -> list[Op]:
    return [Op("dense", t, m.hidden, m.vocab, fmt.group_size, "lm_head") for t in _split(tokens, p.mm_tokens)]


# ---------------------------------------------------------------------------------------------------
# Whole-model estimate
# ---------------------------------------------------------------------------------------------------
@dataclass
class Block:
    """One layer (or the head) of one step: engine cycles, HBM bytes, and which of the two binds."""
    name: str
    cycles: int
    hbm_bytes: float
    compute_s: float = 0.0
    hbm_s: float = 0.0

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.hbm_s)

    @property
    def bound(self) -> str:
        return "hbm" if self.hbm_s >= self.compute_s else "compute"


def _block(name, p, target, hbm, ops, nbytes) -> Block:
    cyc = ops_cycles(p, ops)
    return Block(name, cyc, nbytes, cyc / (target.clock_mhz * 1e6), hbm.seconds(nbytes))


def check_inputs(p: EngineParams, m: ModelShape, fmt: ArtifactFormat, context: int, batch: int,
                 hbm: HBM) -> None:
    if context < 1:
        raise EstimateError(f"--context {context}: give at least 1 token")
    if batch < 1:
        raise EstimateError(f"--batch {batch}: give at least 1")
    if fmt.window is None and m.max_positions and context > m.max_positions:
        raise EstimateError(f"--context {context} exceeds {m.name}'s max_position_embeddings = "
                            f"{m.max_positions} and recipe {fmt.recipe!r} has no Λ attention window: use a recipe "
                            f"with attention_window (e.g. w2a8kv4) or a shorter context")
    most = min(p.mm_tokens, p.act_buffer_bytes // max(m.hidden, m.intermediate, m.heads * m.head_dim))
    if batch > most:
        raise EstimateError(f"--batch {batch}: the engine's activation buffer (engine.act_buffer_bytes = "
                            f"{p.act_buffer_bytes}) and command (engine.mm_tokens = {p.mm_tokens}) hold at most "
                            f"{most} tokens of {m.name}'s longest reduction "
                            f"({max(m.hidden, m.intermediate)} inputs); larger batches need the controller "
                            f"to loop, which is not built")
    keys = fmt.visible(context)
    if keys > p.max_keys:
        raise EstimateError(f"context {context}: {keys} visible keys exceed engine.max_keys = {p.max_keys} "
                            f"(P.V reduces over the keys in one command): use a Λ window of at most "
                            f"{p.max_keys} tokens or a larger engine")
    cache = m.layers * (fmt.cache_tokens or context) * 2 * m.kv_heads * kv_token_bits(m.head_dim) / 8
    embed_table = m.vocab * (m.hidden * EMBED_CODE.bits + ROW_SCALE_BITS) / 8
    hbm.check_fits(int(artifact_weight_bytes(m, fmt) + embed_table + batch * cache),
                   f"{m.name} ({fmt.recipe}) with {batch} KV cache(s) of {fmt.cache_tokens or context} tokens")


def decode_blocks(p, target, hbm, m, fmt, context, batch) -> list[Block]:
    keys = fmt.visible(context)
    kv_tok = 2 * m.kv_heads * kv_token_bits(m.head_dim) / 8
    layer_w = sum(sum(linear_bytes(n, k, fmt.weight_bits, fmt.group_size, fmt.sparse).values())
                  for n, k in m.linears().values())
    ops = linear_ops(p, m, fmt, batch) + attention_ops(p, m, keys, 1) * batch
    nbytes = layer_w + batch * (keys + 1) * kv_tok + 2 * m.hidden * NORM_BITS / 8
    layer = _block("layer", p, target, hbm, ops, nbytes)
    head_b = (sum(linear_bytes(m.vocab, m.hidden, fmt.lm_head_bits, fmt.group_size, False).values())
              + m.hidden * NORM_BITS / 8 + batch * (m.hidden * EMBED_CODE.bits / 8 + ROW_SCALE_BITS / 8))
    head = _block("lm_head", p, target, hbm, head_ops(p, m, fmt, batch), head_b)
    return [layer] * m.layers + [head]


def prefill_seconds(p, target, hbm, m, fmt, prompt) -> tuple[float, dict]:
    """A prompt of ``prompt`` tokens in chunks of mm_tokens: per chunk and layer max(cycles, HBM) with the
    weights streamed again for every chunk; attention of the chunk's queries against the keys visible to its
    last query (with Λ, the cache plus the chunk); lm_head for the last token only."""
    T = p.mm_tokens
    kv_tok = 2 * m.kv_heads * kv_token_bits(m.head_dim) / 8
    layer_w = sum(sum(linear_bytes(n, k, fmt.weight_bits, fmt.group_size, fmt.sparse).values())
                  for n, k in m.linears().values())
    lin_cache: dict[int, int] = {}
    att_cache: dict[tuple[int, int], int] = {}
    total, compute_bound, chunks = 0.0, 0, 0
    f = target.clock_mhz * 1e6
    for start in range(0, prompt, T):
        t = min(T, prompt - start)
        end = start + t
        keys = end if fmt.window is None else min(end, fmt.sinks + fmt.window + t - 1)
        if t not in lin_cache:
            lin_cache[t] = ops_cycles(p, linear_ops(p, m, fmt, t))
        if (keys, t) not in att_cache:
            att_cache[(keys, t)] = ops_cycles(p, attention_ops(p, m, keys, t))
        cyc = lin_cache[t] + att_cache[(keys, t)]
        nbytes = layer_w + (keys + t) * kv_tok + 2 * m.hidden * NORM_BITS / 8
        cs, hs = cyc / f, hbm.seconds(nbytes)
        total += m.layers * max(cs, hs)
        compute_bound += cs > hs
        chunks += 1
    head = _block("lm_head", p, target, hbm, head_ops(p, m, fmt, 1),
                  sum(linear_bytes(m.vocab, m.hidden, fmt.lm_head_bits, fmt.group_size, False).values()))
    total += head.seconds
    return total, {"chunks": chunks, "chunk_tokens": T,
                   "bound_by": "compute" if compute_bound * 2 > chunks else "hbm"}


def estimate(p: EngineParams, target: TargetParams, m: ModelShape, fmt: ArtifactFormat, context: int,
             batch: int = 1, hw_name: str = "", resources: dict | None = None) -> dict:
    """The figures `accllm estimate` prints (see docs/estimate.md for each field)."""
    hbm = HBM.from_target(target)
    check_inputs(p, m, fmt, context, batch, hbm)
    blocks = decode_blocks(p, target, hbm, m, fmt, context, batch)
    step_s = sum(b.seconds for b in blocks)
    decode_tps = batch / step_s
    comp = bytes_per_token(m, fmt, context, batch)
    per_token = sum(comp.values())
    roofline = hbm.theoretical_bytes_per_s / per_token
    hbm_s = sum(b.hbm_s for b in blocks)
    comp_s = sum(b.compute_s for b in blocks)
    bound_time = {"hbm": sum(b.seconds for b in blocks if b.bound == "hbm"),
                  "compute": sum(b.seconds for b in blocks if b.bound == "compute")}
    bound_by = max(bound_time, key=bound_time.get)
    pre_s, pre_info = prefill_seconds(p, target, hbm, m, fmt, context)
    cycles_per_token = sum(b.cycles for b in blocks) / batch
    macs = decode_macs(m, fmt, context) * batch
    pw = energy_model.power(p, target, hw_name=hw_name, resources=resources,
                            hbm_bytes_per_s=per_token * decode_tps,
                            engine_busy=min(1.0, comp_s / step_s))
    layer, head = blocks[0], blocks[-1]
    return {
        "scope": SCOPE,
        "model": m.name, "recipe": fmt.recipe, "hw": hw_name, "context": context, "batch": batch,
        "clock_mhz": target.clock_mhz,
        "decode_tokens_per_s": decode_tps,
        "prefill_tokens_per_s": context / pre_s,
        "power_w": pw["total_w"],
        "tokens_per_j": decode_tps / pw["total_w"],
        "hbm_bytes_per_token": int(round(per_token)),
        "hbm_roofline_tokens_per_s": roofline,
        "bound_by": bound_by,
        "of_roofline": decode_tps / roofline,
        "hbm": {"theoretical_gbps": hbm.theoretical_bytes_per_s / 1e9, "efficiency": hbm.efficiency,
                "effective_gbps": hbm.effective_bytes_per_s / 1e9, "pattern": hbm.pattern,
                "source": "Shuhai (FCCM 2020): 425 GB/s sequential on a U280 (sim/hbm.py)",
                "decode_tokens_per_s_at_flightllm_efficiency":
                    batch / sum(max(b.compute_s, b.hbm_s * hbm.efficiency / FLIGHTLLM_EFFICIENCY) for b in blocks)},
        "bytes_per_token": {k: int(round(v)) for k, v in comp.items()},
        "format": {**asdict(fmt), "bits_per_weight": bits_per_weight(fmt),
                   "weight_bytes": artifact_weight_bytes(m, fmt)},
        "model_shape": asdict(m),
        "decode": {
            "step_seconds": step_s, "engine_seconds": comp_s, "hbm_seconds": hbm_s,
            "engine_cycles_per_token": cycles_per_token,
            "macs_per_token": macs / batch,
            "engine_utilisation": macs / (sum(b.cycles for b in blocks) * p.macs_per_cycle),
            "layer": {"cycles": layer.cycles, "compute_us": layer.compute_s * 1e6, "hbm_us": layer.hbm_s * 1e6,
                      "bound_by": layer.bound, "ops": _op_breakdown(p, target, linear_ops(p, m, fmt, batch)
                                                                  + attention_ops(p, m, fmt.visible(context), 1) * batch)},
            "lm_head": {"cycles": head.cycles, "compute_us": head.compute_s * 1e6, "hbm_us": head.hbm_s * 1e6,
                        "bound_by": head.bound},
            "bound_time_s": bound_time,
        },
        "prefill": {"seconds": pre_s, "tokens": context, **pre_info},
        "power": pw,
        "engine": asdict(p),
    }


def decode_macs(m: ModelShape, fmt: ArtifactFormat, context: int) -> int:
    keep = SPARSE_N / SPARSE_M if fmt.sparse else 1
    lin = sum(n * k for n, k in m.linears().values()) * keep
    att = 2 * m.heads * fmt.visible(context) * m.head_dim
    return int(m.layers * (lin + att) + m.vocab * m.hidden)


def _op_breakdown(p, target, ops: list[Op]) -> dict:
    cyc = sequence_cycles(p, ops)
    out: dict[str, dict] = {}
    for op, c in zip(ops, cyc):
        d = out.setdefault(op.name or op.mode, {"mode": op.mode, "commands": 0, "cycles": 0})
        d["commands"] += 1
        d["cycles"] += c
    return out
