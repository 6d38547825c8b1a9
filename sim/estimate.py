"""Throughput estimates of a compressed Llama on the accelerator, through the compiler that emits its RTL
programs: a model given by its config.json shape and a recipe's formats is compiled without weights
(``hw.compile.shape_spec``, ``weights=False``: the same instructions as a real compile), one decode step
at the context (``compile_decode_step``) and representative prefill chunks (``compile_prefill_chunk``)
are timed by the controller's cycle model (``hw.controller_model.program_timeline``, held equal to the
RTL by tests/sim/test_cycle_model.py) against a memory whose read ports are HBM AXI ports
(``sim.hbm.port_words_per_cycle``), and the bytes per token are the program's own memory traffic,
beside the artifact format's (``bytes_per_token``).

* ``load_model``: a model by its Hugging Face config.json shape alone (built-in names in configs/models/).
* ``ArtifactFormat.from_recipe``: what a recipe stores (quant.formats and docs/numerics.md packing rules).
* ``bytes_per_token``: the artifact's bytes per decoded token, by component (the cross-check).
* ``decode_timing`` / ``prefill_timing`` / ``part_timing``: the compiled program's cycles by opcode,
  layer, kind of instruction and cause (``CAUSES``), and its bytes by part.
* ``estimate``: decode and prefill tokens/s, the roofline, what binds, power and tokens/J (``sim.energy``).
* ``op_cycles`` / ``sequence_cycles``: the engine's own cycle model (``hw.engine_model``).
"""

from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from hw import engine_model
from hw.compile import accesses
from hw.controller_model import MemTiming, program_timeline, weight_transfers_per_beat
from hw.engine import Mode
from hw.engine_model import Op
from hw.isa import ENGINE_MODE_MASK, UNIT_OPS
from hw.isa import Op as IOp
from hw.params import AccelParams, EngineParams, TargetParams
from quant.formats import (EMBED_CODE, FX, KV_CODE, KV_ZERO, ROW_SCALE_BITS, SPARSE_M, SPARSE_META_BITS,
                           SPARSE_N, W_MIN, W_SCALE, weight_bits_per_weight)
from quant.recipe import LINEAR_TARGETS, AttentionWindow, Prune, QuantizeKV, QuantizeWeights, Recipe

from . import energy as energy_model
from .hbm import HBM, port_words_per_cycle

__all__ = ["SCOPE", "EstimateError", "ModelShape", "ArtifactFormat", "load_model", "known_models", "bytes_per_token",
           "linear_bytes", "artifact_weight_bytes", "bits_per_weight", "model_spec", "mem_timing", "part_timing",
           "decode_timing", "prefill_timing", "estimate", "Op", "op_beats", "op_cycles", "sequence_cycles",
           "CAUSES", "MEM_LATENCY_CYCLES", "LATENCY_SWEEP"]

SCOPE = ("the compiled program (hw.compile, shape only) timed by the cycle model of the controller "
         "(hw.controller_model) against stall-free HBM ports; batch 1")
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
    #: RMSNorm's eps (config.json ``rms_norm_eps``; absent: transformers' LlamaConfig default 1e-6). Only
    #: RMSNORM's eps_term field carries it: no cycle or byte depends on it
    rms_norm_eps: float = 1e-6

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
                      tied=bool(cfg.get("tie_word_embeddings", False)), head_dim=head_dim,
                      rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)))


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


#: the memory's read latency in cycles (``MemTiming.latency``). No measured read latency of the U280's
#: HBM was found to cite (docs/estimate.md, "Memory timing", lists the searches): 40 is the larger of the
#: two latencies at which the cycle model was measured equal to the RTL (tests/sim/test_cycle_model.py);
#: the report gives decode at every latency of ``LATENCY_SWEEP`` beside it
MEM_LATENCY_CYCLES = 40
#: the latencies (cycles at the engine clock) the report times decode at: 8 and 40, the two the cycle
#: model was held to the RTL at; 300, the m_axi ``latency`` Xilinx's own HBM random-access example sets
#: for its HLS kernels (Vitis_Accel_Examples host/hbm_bandwidth_pseudo_random: a tuning hint, not a
#: measurement); the others between
LATENCY_SWEEP = (8, 24, 40, 64, 100, 150, 300)


def mem_timing(target: TargetParams, accel: AccelParams, latency: int | None = None) -> MemTiming:
    """The memory the cycle model assumes: each read port of the controller is one HBM AXI port
    (``sim.hbm.port_words_per_cycle``), never stalling, ``latency`` cycles to a job's first word."""
    return MemTiming(latency=int(MEM_LATENCY_CYCLES if latency is None else latency),
                     words_per_cycle=port_words_per_cycle(accel.mem_word_bits, target.clock_mhz))


_CACHE: dict[tuple, object] = {}


def _cached(key, make):
    if key not in _CACHE:
        if len(_CACHE) > 64:
            _CACHE.clear()
        _CACHE[key] = make()
    return _CACHE[key]


def _key(*objs) -> tuple:
    return tuple(tuple(vars(o).items()) if hasattr(o, "__dict__") else o for o in objs)


def _compile(what, m, fmt, p, accel, **kw):
    from hw.compile import CompileError, compile_decode_step, compile_prefill_chunk

    spec = _cached(("spec", m, fmt), lambda: model_spec(m, fmt))
    fn = compile_decode_step if what == "decode" else compile_prefill_chunk
    try:
        return _cached(_key(what, m, fmt, p, accel, tuple(sorted(kw.items()))),
                       lambda: fn(spec, p, accel, weights=False, **kw))
    except CompileError as e:
        raise EstimateError(f"{m.name} ({fmt.recipe}) on this engine: {e}") from None


def _bytes_part(ins) -> str:
    note, op = ins.note, IOp(ins.op)
    if op == IOp.ENGINE:
        mode = Mode(ins.flags & ENGINE_MODE_MASK)
        if mode in (Mode.QK, Mode.PV):
            return "kv_read"
        return "lm_head" if "lm_head" in note else "weights"
    if op == IOp.SCATTER:
        return "kv_write"
    if op == IOp.LOAD:
        if "ranges" in note:
            return "kv_read"
        if "row_mult" in note or "row_shift" in note:
            return "lm_head" if "lm_head" in note else "row_multipliers"
        if "gamma" in note:
            return "norms"
        if "embedding" in note or "token id" in note:
            return "embedding"
        if "theta" in note:
            return "rope"
    return "other"


def _layer_of(note: str) -> str:
    hit = _LAYER.search(note)
    if hit:
        return f"layer {hit.group(1)}"
    for key, name in (("lm_head", "head"), ("final_norm", "head"), ("argmax", "head"), ("token ->", "head"),
                      ("mark", "marks")):
        if key in note:
            return name
    return "embed"


_LAYER = re.compile(r"\blayer (\d+)\b")
#: what a cycle of the step is spent on (``part_timing``): docs/estimate.md, "What binds"
CAUSES = ("memory_port", "engine", "sfu", "memory_ops", "controller")


def part_timing(c, first: int, count: int, p: EngineParams, accel: AccelParams, mem: MemTiming) -> dict:
    """Instructions first .. first+count-1 of compiled program ``c`` timed by the controller's cycle model
    (``program_timeline``, whole program: the same periods as the RTL's): cycles by opcode, by layer, by
    kind of instruction (its note with numbers starred), and by cause: an ENGINE's busy cycles up to the
    words its fullest read port carries at ``mem.words_per_cycle`` are ``memory_port``, the rest
    ``engine`` (setup, activation load, drain); a unit's busy cycles ``sfu``; LOAD/STORE/SCATTER/MARK's
    ``memory_ops``; every instruction's cycles beyond its busy ones (DECODE, GO, NEXT, the fetch)
    ``controller``. Bytes by part from ``Compiled.instr_bytes``."""
    tl = program_timeline(c.program, p, accel, mem)
    wtb = weight_transfers_per_beat(p, accel)
    by_op: dict[str, int] = {}
    by_layer: dict[str, int] = {}
    by_kind: dict[str, list] = {}
    cause = dict.fromkeys(CAUSES, 0)
    parts: dict[str, int] = {}
    read_words = engine_busy = port_moves = 0
    layer0 = []
    for i in range(first, first + count):
        ins = c.program[i]
        cyc = tl.cycles[i]
        op = IOp(ins.op)
        busy = tl.busy[i]
        acc = accesses(ins, p, accel)
        if op == IOp.ENGINE:
            # what each read port moves, one per cycle at most: the weight port a beat's words or, wide,
            # its transfers (one per tile and k-beat); the scale port its words
            ports = [ins.s * ins.n * wtb] + [hi - lo for lo, hi in acc["mem_r"][1:]]
            stream = min(busy, int(math.ceil(max(ports) / mem.words_per_cycle)))
            port_moves += max(ports)
            cause["memory_port"] += stream
            cause["engine"] += busy - stream
            engine_busy += busy
        elif op in UNIT_OPS:
            cause["sfu"] += busy
        else:
            cause["memory_ops"] += busy
            port_moves += sum(hi - lo for lo, hi in acc["mem_r"])
        cause["controller"] += cyc - busy
        read_words += sum(hi - lo for lo, hi in acc["mem_r"])
        by_op[op.name] = by_op.get(op.name, 0) + cyc
        layer = _layer_of(ins.note)
        by_layer[layer] = by_layer.get(layer, 0) + cyc
        kind = re.sub(r"\d+", "*", ins.note.split(" ", 1)[1] if " " in ins.note else ins.note)
        k = by_kind.setdefault(kind, [op.name, 0, 0])
        k[1] += 1
        k[2] += cyc
        part = _bytes_part(ins)
        parts[part] = parts.get(part, 0) + c.instr_bytes(ins)
        if layer == "layer 0":
            layer0.append([ins.note, op.name, cyc])
    total = sum(tl.cycles[first:first + count])
    assert total == sum(cause.values())
    return {"cycles": total, "instructions": count, "by_op": by_op, "by_layer": by_layer,
            "by_kind": {k: {"op": v[0], "count": v[1], "cycles": v[2]}
                        for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1][2])},
            "by_cause": cause, "bytes": sum(parts.values()), "bytes_by_part": parts, "read_words": read_words,
            "port_moves": port_moves,
            "engine_busy_cycles": engine_busy, "layer0_instructions": layer0}


def _step_range(c, name: str) -> tuple[int, int]:
    (_, first, count), = [s for s in c.steps if s[0] == name]
    return first, count


def decode_timing(p: EngineParams, accel: AccelParams, m: ModelShape, fmt: ArtifactFormat, context: int,
                  mem: MemTiming) -> dict:
    """One decode step at context ``context`` (the step embedding position context - 1, the cache as a
    generation leaves it: ``compile_decode_step``), shape-only compiled, timed from its first
    instruction to its MARK (what one generated token adds to the RTL's cycle counter)."""
    if context < 2:
        raise EstimateError(f"--context {context}: a decode step follows at least one token; give 2 or more")
    c = _compile("decode", m, fmt, p, accel, position=context - 1)
    out = _cached(_key("decode-timing", m, fmt, p, accel, context, mem),
                  lambda: part_timing(c, *_step_range(c, "step1"), p, accel, mem))
    return {**out, "spad_words_used": max(lo + n for lo, n in c.spad.values())}


def prefill_timing(p: EngineParams, accel: AccelParams, m: ModelShape, fmt: ArtifactFormat, prompt: int,
                   mem: MemTiming) -> dict:
    """A ``prompt``-token prefill: chunks of min(mm_tokens, prompt) tokens, then the lm_head on the last
    token. Compiled and timed exactly: the first chunk, the first chunk whose every query sees a full Λ
    cache (full attention: the last full chunk), the last chunk and the head; every other chunk is
    interpolated linearly in its position between the first and the saturated one (its attention work
    grows with the keys it sees) and equals the saturated one beyond it (the same instructions up to
    RoPE positions and cache slots). ``tests/sim/test_estimate_compiled.py`` holds the sum to the whole
    compiled prefill's timeline."""
    T = min(p.mm_tokens, prompt)
    starts = list(range(0, prompt, T))
    last = starts[-1]
    full = [s for s in starts if s + T <= prompt]
    if fmt.window is not None:
        cap = fmt.sinks + fmt.window
        sat = next((s for s in full if s + 1 >= cap), full[-1] if full else 0)
    else:
        sat = full[-1] if full else 0
    exact: dict[int, dict] = {}
    for s in sorted({0, sat, last}):
        c = _compile("prefill", m, fmt, p, accel, start=s, prompt=prompt)
        first, count = _step_range(c, "prefill")
        exact[s] = part_timing(c, first, count - 1, p, accel, mem)  # without the part's closing MARK
    ch = _compile("prefill", m, fmt, p, accel, start=None, prompt=prompt, head=True)
    first, count = _step_range(ch, "prefill")
    head = part_timing(ch, first, count - 1, p, accel, mem)
    c0, cs = exact[0]["cycles"], exact[sat]["cycles"]
    total = 0.0
    for s in starts:
        if s in exact:
            total += exact[s]["cycles"]
        elif s < sat:
            total += c0 + (cs - c0) * s / sat
        else:
            total += cs
    total += head["cycles"]
    return {"cycles": int(round(total)), "chunks": len(starts), "chunk_tokens": T,
            "timed_chunks": sorted(exact), "head_cycles": head["cycles"],
            "chunk_cycles": {str(s): t["cycles"] for s, t in exact.items()},
            "saturated_chunk": exact[sat], "bytes": None}


def _bound(by_cause: dict, cycles: int, hbm_cycles: float) -> str:
    if hbm_cycles >= cycles:
        return "hbm"
    return max(by_cause, key=by_cause.get)


def estimate(p: EngineParams, target: TargetParams, m: ModelShape, fmt: ArtifactFormat, context: int,
             batch: int = 1, hw_name: str = "", resources: dict | None = None, accel: AccelParams | None = None,
             latency: int | None = None, prefill: bool = True) -> dict:
    """The figures `accllm estimate` prints (docs/estimate.md has each field): the compiler's program for
    the shape (``hw.compile``, no weights), timed by the controller's cycle model against the HBM port
    (``mem_timing``); bytes from the program's own memory traffic beside the artifact format's."""
    accel = accel or AccelParams()
    hbm = HBM.from_target(target)
    check_inputs(p, m, fmt, context, batch, hbm)
    if batch != 1:
        raise EstimateError(f"--batch {batch}: the compiler emits one sequence's program (batch 1); batched "
                            f"decode is not compiled yet")
    mem = mem_timing(target, accel, latency)
    f = target.clock_mhz * 1e6
    dec = decode_timing(p, accel, m, fmt, context, mem)
    step_s = dec["cycles"] / f
    decode_tps = 1.0 / step_s
    nbytes = dec["bytes"]
    art = bytes_per_token(m, fmt, context)
    art_total = sum(art.values())
    roofline = hbm.theoretical_bytes_per_s / nbytes
    hbm_s = hbm.seconds(nbytes)
    bound_by = _bound(dec["by_cause"], dec["cycles"], hbm_s * f)
    macs = decode_macs(m, fmt, context)
    busy = dec["engine_busy_cycles"] / dec["cycles"]
    pw = energy_model.power(p, target, hw_name=hw_name, resources=resources, accel=accel,
                            hbm_bytes_per_s=nbytes * decode_tps, engine_busy=busy,
                            units_busy=dec["by_cause"]["sfu"] / dec["cycles"])
    out_prefill = None
    if prefill:
        pre = prefill_timing(p, accel, m, fmt, context, mem)
        sat = pre.pop("saturated_chunk")
        pre.update({"seconds": pre["cycles"] / f, "tokens": context,
                    "bound_by": _bound(sat["by_cause"], sat["cycles"], 0.0),
                    "saturated_chunk_by_cause": sat["by_cause"], "saturated_chunk_by_op": sat["by_op"]})
        pre.pop("bytes")
        out_prefill = pre
    wpc = mem.words_per_cycle
    return {
        "scope": SCOPE,
        "model": m.name, "recipe": fmt.recipe, "hw": hw_name, "context": context, "batch": batch,
        "clock_mhz": target.clock_mhz,
        "decode_tokens_per_s": decode_tps,
        "prefill_tokens_per_s": context / out_prefill["seconds"] if out_prefill else None,
        "power_w": pw["total_w"],
        "tokens_per_j": decode_tps / pw["total_w"],
        "hbm_bytes_per_token": int(nbytes),
        "hbm_roofline_tokens_per_s": roofline,
        "bound_by": bound_by,
        "of_roofline": decode_tps / roofline,
        "artifact_hbm_bytes_per_token": int(round(art_total)),
        "artifact_roofline_tokens_per_s": hbm.theoretical_bytes_per_s / art_total,
        "bytes_per_token": dict(sorted(dec["bytes_by_part"].items())),
        "artifact_bytes_per_token": {k: int(round(v)) for k, v in art.items()},
        "memory": {"word_bits": accel.mem_word_bits, "latency_cycles": mem.latency, "words_per_cycle": wpc,
                   "port_gbps": wpc * accel.mem_word_bits / 8 * f / 1e9,
                   "source": "one controller read port = one HBM AXI port (PG276: 256 bits x 450 MHz per "
                             "pseudo-channel), 14.375 GB/s (UG1393) x Shuhai's 92.4 % sequential; latency "
                             f"{mem.latency} cycles not measured (MEM_LATENCY_CYCLES)"},
        "hbm": {"theoretical_gbps": hbm.theoretical_bytes_per_s / 1e9, "efficiency": hbm.efficiency,
                "effective_gbps": hbm.effective_bytes_per_s / 1e9, "pattern": hbm.pattern,
                "source": "Shuhai (FCCM 2020): 425 GB/s sequential on a U280 (sim/hbm.py)",
                "seconds_per_token": hbm_s},
        "format": {**asdict(fmt), "bits_per_weight": bits_per_weight(fmt),
                   "weight_bytes": artifact_weight_bytes(m, fmt)},
        "model_shape": asdict(m),
        "decode": {
            "step_seconds": step_s, "cycles_per_token": dec["cycles"], "instructions": dec["instructions"],
            "position": context - 1, "visible_keys": fmt.visible(context), "spad_words_used": dec["spad_words_used"],
            "hbm_seconds": hbm_s, "port_read_words": dec["read_words"],
            "port_floor_cycles": int(math.ceil(dec["port_moves"] / wpc)),
            "macs_per_token": macs,
            "engine_utilisation": macs / (dec["cycles"] * p.macs_per_cycle),
            "engine_busy": busy,
            "cycles_by_cause": dec["by_cause"], "cycles_by_op": dec["by_op"], "cycles_by_layer": dec["by_layer"],
            "cycles_by_kind": dec["by_kind"], "layer0_instructions": dec["layer0_instructions"],
        },
        "prefill": out_prefill,
        "power": pw,
        "engine": asdict(p),
        "accelerator": asdict(accel),
    }


def decode_macs(m: ModelShape, fmt: ArtifactFormat, context: int) -> int:
    keep = SPARSE_N / SPARSE_M if fmt.sparse else 1
    lin = sum(n * k for n, k in m.linears().values()) * keep
    att = 2 * m.heads * fmt.visible(context) * m.head_dim
    return int(m.layers * (lin + att) + m.vocab * m.hidden)


# ---------------------------------------------------------------------------------------------------
# The compiler's program for a shape (no weights): hw.compile.shape_spec + weights=False
# ---------------------------------------------------------------------------------------------------
def model_spec(m: ModelShape, fmt: ArtifactFormat):
    """The shape-only ``quant.golden.Spec`` of ``m`` stored as ``fmt`` (``hw.compile.shape_spec``)."""
    from hw.compile import CompileError, shape_spec
    from quant.reference import FormatError

    try:
        return shape_spec(hidden=m.hidden, intermediate=m.intermediate, layers=m.layers, n_heads=m.heads,
                          n_kv=m.kv_heads, head_dim=m.head_dim, vocab=m.vocab, bits=fmt.weight_bits,
                          group_size=fmt.group_size, sparse=fmt.sparse, lm_head_bits=fmt.lm_head_bits,
                          sinks=fmt.sinks, window=fmt.window, max_positions=m.max_positions or None,
                          rms_norm_eps=m.rms_norm_eps)
    except (CompileError, FormatError) as e:
        raise EstimateError(f"{m.name} ({fmt.recipe}): {e}") from None
