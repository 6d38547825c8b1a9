"""The compression recipe (a list of named modifiers, applied in order) and the model section.

Each modifier here is its configuration; ``quant.modifiers`` has the class that does its work and says
what the order means: at every event of the pipeline (start, per layer observe / prepare / compress /
tune, finalize) the modifiers act in the recipe's order. An order that cannot run is refused by name
(``must_follow``): quantize_weights before prune, reconstruct before what it tunes or trains through.

YAML form, in the spirit of llm-compressor's recipes::

    recipe:
      name: w2a8kv4
      modifiers:
        - quantize_weights: {bits: 2, group_size: 64, method: gptq, overrides: {lm_head: 4}}
        - quantize_embedding: {bits: 8}
        - quantize_activations: {bits: 8}
        - quantize_kv: {bits: 4}
        - attention_window: {sinks: 4, window: 508}
"""

from __future__ import annotations

from dataclasses import dataclass

from .formats import ACT, EMBED_BITS_SUPPORTED, KV_CODE, WEIGHT_BITS_SUPPORTED
from .schema import param

LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ModelConfig:
    source: str = param("smollm2-135m", "a Hugging Face folder, a .gguf file, or the alias smollm2-135m")
    calib_text: str = param("", "text file for calibration ('' = the built-in default)")
    calib_samples: int = param(32, "calibration sequences (32 x 512 tokens: the quality table's setting)", min=1, max=100_000)
    calib_seq_len: int = param(512, "tokens per calibration sequence", min=8, max=131_072)
    eval_text: str = param("", "text file for perplexity ('' = the built-in default)")
    eval_seq_len: int = param(512, "tokens per evaluation window", min=8, max=131_072)
    eval_max_tokens: int = param(8192, "evaluate at most this many tokens (0 = the whole text)",
                                 min=0, max=1 << 31)
    seed: int = param(0, "seed for sampling calibration windows", min=0)
    device: str = param("cpu", "where quantize and evaluate run: cpu, cuda or cuda:N where torch sees a GPU "
                               "(quant.runtime.resolve_device; checked before any step runs)")


@dataclass
class Rotate:
    """A rotation of the residual stream folded into the float weights before anything else reads them
    (QuaRot / SpinQuant R1; ``quant/rotation.py``): the norms' weights are folded into the linears after
    them, the embedding, every linear and the lm_head are rotated, the model computes the same function and
    the hardware sees ordinary weights. With ``vo``, V and O are also rotated per head (R2)."""
    kind: str = param("hadamard", "hadamard: a random Hadamard matrix (signs drawn from the seed); orthogonal: "
                                  "a random orthogonal matrix; identity: no rotation, the norms' fold alone (a "
                                  "diagnostic)", choices=["hadamard", "orthogonal", "identity"])
    seed: int = param(0, "seed of the random signs / matrix (the V/O rotation uses seed + 1)", min=0)
    vo: bool = param(False, "also rotate each value head (v_proj's rows) and undo it in o_proj's columns")
    residual: bool = param(True, "rotate the residual stream (false: the V/O heads only, with vo: true)")

    def problems(self):
        if not (self.residual or self.vo):
            return [("residual", "residual: false and vo: false rotate nothing; set one of them or drop rotate")]
        return []

    def must_follow(self) -> dict[str, str]:
        return {}


@dataclass
class Prune:
    method: str = param("sparsegpt", "how to choose the pruned weights", choices=["sparsegpt", "wanda"])
    n: int = param(2, "kept weights per group of m", min=1, max=2)
    m: int = param(4, "group of consecutive inputs", min=4, max=4)
    targets: list[str] = param(doc="linear layers pruned (projection names)",
                               default_factory=lambda: list(LINEAR_TARGETS))
    damp_percent: float = param(0.01, "Hessian dampening (fraction of mean diagonal)", min=0.0, max=1.0)
    block_size: int = param(128, "columns per lazy update block", min=4, max=4096)

    def problems(self):
        return [("targets", f"unknown projection {t!r}; known: {', '.join(LINEAR_TARGETS)}")
                for t in self.targets if t not in LINEAR_TARGETS]

    def must_follow(self) -> dict[str, str]:
        return {}


@dataclass
class QuantizeWeights:
    bits: int = param(2, "bits per weight code", choices=list(WEIGHT_BITS_SUPPORTED))
    group_size: int = param(64, "inputs sharing one scale and min", min=4, max=8192)
    method: str = param("gptq", "rtn: round to nearest; gptq: error feedback", choices=["rtn", "gptq"])
    act_order: bool = param(True, "GPTQ: process columns by decreasing Hessian diagonal")
    damp_percent: float = param(0.01, "GPTQ: Hessian dampening", min=0.0, max=1.0)
    block_size: int = param(128, "GPTQ: columns per lazy update block", min=4, max=4096)
    clip_search: bool = param(True, "search each group's range to minimise the quantization error")
    targets: list[str] = param(doc="linear layers quantized", default_factory=lambda: list(LINEAR_TARGETS))
    overrides: dict[str, int] = param(doc="bits per layer-name pattern (fnmatch), e.g. {'lm_head': 4}",
                                      default_factory=dict)

    def problems(self):
        out = []
        if self.group_size % 4:
            out.append(("group_size", f"{self.group_size} is not a multiple of 4 (2:4 groups)"))
        out += [("targets", f"unknown projection {t!r}; known: {', '.join(LINEAR_TARGETS)}")
                for t in self.targets if t not in LINEAR_TARGETS]
        if self.bits not in WEIGHT_BITS_SUPPORTED:
            out.append(("bits", f"{self.bits} bits: the engine's weight code lanes run "
                                f"{list(WEIGHT_BITS_SUPPORTED)}; choose one of them"))
        out += [(f"overrides.{k}", f"{v} bits: the engine's weight code lanes run {list(WEIGHT_BITS_SUPPORTED)} "
                                   f"(e.g. {{lm_head: 4}}); choose one of them")
                for k, v in self.overrides.items() if v not in WEIGHT_BITS_SUPPORTED]
        return out

    def must_follow(self) -> dict[str, str]:
        return {"prune": "prune chooses the 2:4 mask of the weights quantize_weights quantizes (SparseGPT "
                         "chooses it in the quantizer's own pass); pruning codes already quantized is not done"}


@dataclass
class QuantizeEmbedding:
    """The token embedding table as symmetric int8 codes per row (token id) with a float16 row scale
    (``quant.reference.quantize_embedding``); the artifact keeps no float copy. The lm_head, tied or
    not, is quantized through ``quantize_weights.overrides`` ({lm_head: 4})."""
    bits: int = param(8, "bits per embedding code (symmetric, one float16 scale per token row)",
                      choices=list(EMBED_BITS_SUPPORTED))

    def problems(self):
        if self.bits not in EMBED_BITS_SUPPORTED:
            return [("bits", f"{self.bits} bits: the embedding lookup runs {list(EMBED_BITS_SUPPORTED)}-bit "
                             f"codes; choose one of them")]
        return []

    def must_follow(self) -> dict[str, str]:
        return {}

    def runtime(self) -> dict:
        return {}


@dataclass
class QuantizeActivations:
    bits: int = param(8, "activation bits (symmetric, per token, dynamic)", choices=[ACT.bits])
    granularity: str = param("per_token", "scale granularity", choices=["per_token"])

    def must_follow(self) -> dict[str, str]:
        return {}

    def runtime(self) -> dict:
        return {"a8": True}


@dataclass
class QuantizeKV:
    bits: int = param(4, "KV cache bits (asymmetric, per token and head)", choices=[KV_CODE.bits])
    k_smoothing: bool = param(True, "fold static per-channel key scales, calibrated per RoPE pair, into "
                                    "q_proj/k_proj (q·k unchanged; flattens the keys' channel ranges)")
    k_smoothing_alpha: float = param(0.75, "migration strength: keys are divided by k_max^a / q_max^(1-a) "
                                           "(docs/quantizer.md has the sweep)",
                                     min=0.0, max=1.0)

    def must_follow(self) -> dict[str, str]:
        return {}

    def runtime(self) -> dict:
        return {"kv4": True}


@dataclass
class AttentionWindow:
    sinks: int = param(4, "attention-sink tokens always kept", min=0, max=1024)
    window: int = param(508, "most recent tokens kept", min=1, max=1 << 20)

    def must_follow(self) -> dict[str, str]:
        return {}

    def runtime(self) -> dict:
        return {"sinks": self.sinks, "window": self.window}


@dataclass
class Reconstruct:
    """Block-wise output matching (quant/reconstruct.py): after a decoder layer's linears are
    quantized, tune their group scales and mins (and row scales, optionally the codes) with Adam so
    that the quantized layer, fed the quantized model's activations, reproduces the float model's
    output of that layer."""
    steps: int = param(100, "optimizer steps per decoder layer", min=1, max=100_000)
    lr: float = param(0.05, "learning rate (scales and mins move in integer units: 1e-3 never changes a rounded value)", min=0.0, max=1.0)
    row_scale_lr: float = param(0.0005, "learning rate of the log row scales (0 keeps them fixed)", min=0.0, max=1.0)
    tune_codes: bool = param(False, "also let codes change (otherwise scales and mins only)")
    batch_samples: int = param(2, "calibration sequences per optimizer step", min=1, max=4096)
    seq_len: int = param(256, "train on the first this many tokens of each sequence (causal, so exact "
                              "prefixes; 0 = whole sequences)", min=0, max=131_072)
    simulate_quant: bool = param(True, "train through A8 and KV4 simulated with straight-through rounding "
                                        "(otherwise activations and the KV cache stay float while tuning)")
    loss: str = param("mse", "mse: squared error over all tokens and channels; token_relative: each token's "
                             "squared error over its target's squared norm (what the next RMSNorm sees, so "
                             "the few huge residual channels do not dominate)", choices=["mse", "token_relative"])

    def must_follow(self) -> dict[str, str]:
        out = {"quantize_weights": "reconstruct tunes the quantized fields quantize_weights produces",
               "prune": "reconstruct tunes the pruned layers prune produces (their masks fixed)",
               "quantize_kv": "reconstruct's targets are the float layer's outputs after the key smoothing "
                              "quantize_kv folds into q_proj/k_proj"}
        if self.simulate_quant:
            out["quantize_activations"] = "reconstruct trains through A8 (simulate_quant)"
            out["quantize_kv"] += ", and it trains through KV4 (simulate_quant)"
        return out

@dataclass
class TrainE2E:
    """End-to-end training of the quantization parameters (EfficientQAT's E2E-QP; quant/e2e.py): after every
    layer is quantized (and reconstructed), the codes stay frozen and the group scales and mins (integer
    units) and the row scales (log, float16) of every quantized linear are trained together, through the
    whole quantized model with straight-through rounding, against the float model's next-token
    distribution (``kl``) or the calibration text itself (``ce``)."""
    steps: int = param(100, "optimizer steps over the whole model", min=1, max=1_000_000)
    lr: float = param(0.01, "learning rate of the group scales and mins (integer units: a value must move "
                            "by 0.5 to change)", min=0.0, max=1.0)
    row_scale_lr: float = param(0.0001, "learning rate of the log row scales (0 keeps them fixed)",
                                min=0.0, max=1.0)
    batch_samples: int = param(2, "training sequences per optimizer step", min=1, max=4096)
    seq_len: int = param(256, "tokens per training sequence: the calibration sequences cut into pieces of "
                              "this length (0 = whole calibration sequences)", min=0, max=131_072)
    loss: str = param("kl", "kl: KL(float model || quantized model) over the vocabulary at every position; "
                            "ce: cross-entropy on the calibration text's next tokens", choices=["kl", "ce"])
    lm_head: bool = param(True, "also train the quantized lm_head's scales (when the recipe quantizes it)")
    simulate_quant: bool = param(True, "train through A8 and KV4 simulated with straight-through rounding "
                                        "(otherwise activations and the KV cache stay float while training)")
    probe_samples: int = param(4, "training sequences held out (never trained on; at most a quarter of them): "
                                  "the loss on them before and after decides whether the trained fields are "
                                  "kept", min=1, max=4096)
    text: str = param("", "the stage's own training text, any plain text file ('' = the pipeline's calibration "
                          "sequences): more tokens than the calibration set, which the per-layer stages need "
                          "in memory", omit_default=True)
    samples: int = param(0, "with text: windows of the calibration length (--seq-len) drawn from it at random "
                            "(the run's seed), cut into seq_len pieces as the calibration sequences are",
                         min=0, max=1_000_000, omit_default=True)

    def problems(self):
        if self.text and self.samples < 1:
            return [("samples", f"text {self.text!r} needs samples >= 1 (windows to draw from it)")]
        if self.samples and not self.text:
            return [("text", f"samples: {self.samples} draws windows from a text; give text (a file) or samples: 0")]
        return []

    def must_follow(self) -> dict[str, str]:
        out = {"quantize_weights": "train_e2e trains the quantized fields quantize_weights produces (the "
                                   "lm_head's at the end)",
               "prune": "train_e2e trains the pruned layers prune produces (their masks fixed)",
               "reconstruct": "train_e2e starts from the reconstructed fields",
               "quantize_embedding": "train_e2e trains through the embedding table the artifact stores"}
        if self.simulate_quant:
            out["quantize_activations"] = "train_e2e trains through A8 (simulate_quant)"
            out["quantize_kv"] = "train_e2e trains through KV4 (simulate_quant)"
        return out


#: The modifier names a recipe may list, in YAML as single-key mappings.
MODIFIERS = {
    "rotate": Rotate,
    "prune": Prune,
    "quantize_weights": QuantizeWeights,
    "quantize_embedding": QuantizeEmbedding,
    "quantize_activations": QuantizeActivations,
    "quantize_kv": QuantizeKV,
    "attention_window": AttentionWindow,
    "reconstruct": Reconstruct,
    "train_e2e": TrainE2E,
}
Modifier = (Rotate | Prune | QuantizeWeights | QuantizeEmbedding | QuantizeActivations | QuantizeKV | AttentionWindow
            | Reconstruct | TrainE2E)


@dataclass
class Recipe:
    name: str = param("fp16", "a label recorded in the artifact")
    modifiers: list[Modifier] = param(doc="named modifiers, applied in order", default_factory=list)

    def runtime(self) -> dict:
        """The deployment numerics the recipe's modifiers set (A8, KV4, Λ sinks and window)."""
        rt = {"a8": False, "kv4": False, "sinks": 0, "window": None}
        for m in self.modifiers:
            rt.update(m.runtime() if hasattr(m, "runtime") else {})
        return rt

    def get(self, kind: type):
        found = [m for m in self.modifiers if isinstance(m, kind)]
        return found[0] if found else None

    def problems(self):
        out = []
        seen = set()
        for i, m in enumerate(self.modifiers):
            if type(m) in seen:
                out.append((f"modifiers[{i}]", f"{type(m).__name__} appears twice"))
            seen.add(type(m))
        tags = {c: n for n, c in MODIFIERS.items()}
        where = {tags[type(m)]: i for i, m in reversed(list(enumerate(self.modifiers)))}
        for i, m in enumerate(self.modifiers):
            for name, why in m.must_follow().items():
                if where.get(name, -1) > i:
                    out.append((f"modifiers[{i}]", f"{tags[type(m)]} is listed before {name} "
                                                   f"(modifiers[{where[name]}]), an order that cannot run: "
                                                   f"{why}; list {name} before {tags[type(m)]}"))
        rot = [i for i, m in enumerate(self.modifiers) if isinstance(m, Rotate)]
        if rot and rot[0] != 0:
            out.append((f"modifiers[{rot[0]}]", f"rotate is listed after {tags[type(self.modifiers[0])]} "
                                                f"(modifiers[0]), an order that cannot run: rotate rewrites the "
                                                f"float weights and the embedding every other modifier reads; "
                                                f"list rotate first"))
        prune, qw = self.get(Prune), self.get(QuantizeWeights)
        if self.get(Reconstruct) and not qw:
            out.append(("modifiers", "reconstruct needs a quantize_weights modifier to tune"))
        if self.get(TrainE2E) and not qw:
            out.append(("modifiers", "train_e2e needs a quantize_weights modifier to train"))
        if prune and qw and qw.group_size % 4:
            out.append(("modifiers", "2:4 pruning needs a weight group size that is a multiple of 4"))
        return out
