"""The numpy golden model: a whole Llama decoder in the integers ``quant.reference`` defines.

From token id to next token id, nothing here is float: the embedding lookup, RMSNorm, the W×A8
linears with their per-row × per-token rescale, RoPE, the KV4 cache under Λ-shaped attention (sinks +
a ring-buffer window), the base-2 softmax and the P·V fold, SwiGLU, the residual stream (Q15.16 in an
int32), the W4 lm_head and greedy argmax. It is built only from ``quant.reference`` operations, so it
is what the decoder RTL and the torch integer path (``quant.integer``) must equal, element for element.

Every intermediate tensor is returned by name in a ``Trace`` (``"layer3.attn.logits"``, ...), so a
mismatch can be named as layer, operation and element (``first_mismatch``).

The constants that come from the float checkpoint (RMSNorm γ, RoPE frequencies, row scales) are turned
into integers once by ``reference.*_params`` when the ``Spec`` is built; nothing later reads a float.
numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import reference as R
from .formats import FX
from .reference import FormatError

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------------------------------------------
# the integer model: every constant the hardware holds
# ---------------------------------------------------------------------------------------------------
@dataclass
class Linear:
    """A quantized linear in the hardware's weight format plus its per-row output multipliers."""

    name: str
    codes: np.ndarray  # (N, K) uint8, 0 at pruned positions
    scales: np.ndarray  # (N, K/G) uint8
    mins: np.ndarray  # (N, K/G) int8
    group_size: int
    bits: int
    mask: np.ndarray | None  # (N, K) bool for 2:4, else None
    row_mult: np.ndarray  # (N,) int64: S_row / 127 as mult * 2**-shift
    row_shift: np.ndarray  # (N,) int64
    bias_fx: np.ndarray | None = None  # (N,) Q15.16, added after the rescale

    @classmethod
    def from_fields(cls, name, codes, scales, mins, row_scale, group_size, bits=2, mask=None, bias=None):
        rm, rs = R.linear_row_multipliers(row_scale)
        return cls(name, np.asarray(codes, np.uint8), np.asarray(scales, np.uint8), np.asarray(mins, np.int8),
                   int(group_size), int(bits), None if mask is None else np.asarray(mask, bool), rm, rs,
                   None if bias is None else R.to_fx(np.asarray(bias, np.float64)))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)


@dataclass
class Norm:
    g: np.ndarray  # (H,) Q15.16 gamma * sqrt(H)
    eps_term: int

    @classmethod
    def from_float(cls, gamma, eps: float):
        g, e = R.rmsnorm_params(gamma, eps)
        return cls(g, e)


@dataclass
class Layer:
    attn_norm: Norm
    mlp_norm: Norm
    linears: dict[str, Linear]


@dataclass
class Spec:
    """Everything the integer decoder needs, as integers."""

    hidden: int
    n_heads: int
    n_kv: int
    head_dim: int
    layers: list[Layer]
    final_norm: Norm
    lm_head: Linear
    embed_codes: np.ndarray  # (V, H) int8
    embed_mult: np.ndarray  # (V,) int64
    embed_shift: np.ndarray  # (V,) int64
    rope_theta: np.ndarray  # (D/2,) int64
    rope_table: np.ndarray  # (2**14,) int64
    softmax_mult: int
    softmax_shift: int
    sinks: int = 0
    window: int | None = None  # None: full causal attention (the cache grows); else Λ: S + W slots
    max_positions: int | None = None  # positions the model was trained for (full attention only)

    @property
    def vocab(self) -> int:
        return int(self.embed_codes.shape[0])

    def check_layer(self, i: int, lay: "Layer") -> "Layer":
        """Layer i's attention projections have this model's shapes (named otherwise)."""
        d = self.head_dim
        want = {"q_proj": (self.n_heads * d, self.hidden), "k_proj": (self.n_kv * d, self.hidden),
                "v_proj": (self.n_kv * d, self.hidden), "o_proj": (self.hidden, self.n_heads * d)}
        for p, shp in want.items():
            if lay.linears[p].shape != shp:
                raise FormatError(f"layer {i} {p}: shape {lay.linears[p].shape}, expected {shp}")
        return lay

    def check(self) -> "Spec":
        """Shapes and bounds that every later operation relies on, named."""
        d = self.head_dim
        probs = shape_problems(self.hidden, self.n_heads, self.n_kv, d, sinks=self.sinks, window=self.window)
        if probs:
            raise FormatError("; ".join(f"{k}: {m}" for k, m in probs))
        if self.rope_theta.shape != (d // 2,):
            raise FormatError(f"head_dim {d}: RoPE needs D/2 = {d // 2} frequencies, got {self.rope_theta.shape}")
        for i, lay in enumerate(self.layers):
            self.check_layer(i, lay)
        if self.lm_head.shape != (self.vocab, self.hidden):
            raise FormatError(f"lm_head {self.lm_head.shape} does not match the embedding {self.embed_codes.shape}")
        return self


def shape_problems(hidden: int, n_heads: int, n_kv: int, head_dim: int, *, sinks: int = 0,
                   window: int | None = None, max_positions: int | None = None) -> list[tuple[str, str]]:
    """(parameter, problem) for every model shape the integer formats cannot run, so the quantizer can
    refuse it by name before any work is done (docs/numerics.md, sections 11-17)."""
    from . import formats as F

    out = []
    if hidden > F.RMS_MAX_HIDDEN:
        out.append(("hidden_size", f"{hidden} > {F.RMS_MAX_HIDDEN}: RMSNorm's int64 sum of squares would overflow"))
    if head_dim % 2:
        out.append(("head_dim", f"{head_dim} is odd: RoPE rotates channel pairs"))
    if head_dim > 128:
        out.append(("head_dim", f"{head_dim} > 128: beyond the Q.K accumulator bound of the softmax's logits"))
    if n_kv < 1 or n_heads % n_kv:
        out.append(("num_key_value_heads", f"{n_kv} does not divide num_attention_heads {n_heads}"))
    if window is not None and sinks + window > 8192:
        out.append(("attention_window", f"sinks + window = {sinks + window} > 8192: the P.V accumulator bound"))
    if window is None and max_positions is not None and max_positions - 1 > F.ROPE_MAX_POSITION:
        out.append(("max_position_embeddings", f"{max_positions} beyond the RoPE phase's {F.ROPE_MAX_POSITION} "
                                               f"positions without Λ-attention"))
    return out


# ---------------------------------------------------------------------------------------------------
# the Λ-shaped KV4 cache of one layer (codes, zero-points, ranges per token and KV head)
# ---------------------------------------------------------------------------------------------------
@dataclass
class Cache:
    n_kv: int
    head_dim: int
    sinks: int
    window: int | None
    k: np.ndarray = field(init=False)
    kz: np.ndarray = field(init=False)
    kr: np.ndarray = field(init=False)
    v: np.ndarray = field(init=False)
    vz: np.ndarray = field(init=False)
    vr: np.ndarray = field(init=False)
    pos: np.ndarray = field(init=False)  # token index held by each slot, -1 = empty

    def __post_init__(self):
        self._alloc(self.capacity or 16)

    @property
    def capacity(self) -> int | None:
        return None if self.window is None else self.sinks + self.window

    def _alloc(self, n):
        self.k = np.zeros((self.n_kv, n, self.head_dim), np.uint8)
        self.v = np.zeros_like(self.k)
        self.kz, self.vz = (np.zeros((self.n_kv, n), np.uint8) for _ in range(2))
        self.kr, self.vr = (np.zeros((self.n_kv, n), np.int64) for _ in range(2))
        self.pos = np.full(n, -1, np.int64)

    def slot(self, t: int) -> int:
        if self.window is None:
            while t >= self.pos.size:  # full attention: the cache grows (doubles)
                old = (self.k, self.v, self.kz, self.vz, self.kr, self.vr, self.pos)
                n = self.pos.size
                self._alloc(2 * n)
                self.k[:, :n], self.v[:, :n] = old[0], old[1]
                self.kz[:, :n], self.vz[:, :n], self.kr[:, :n], self.vr[:, :n] = old[2:6]
                self.pos[:n] = old[6]
            return t
        return int(R.cache_slot(t, self.sinks, self.window))

    def write(self, t: int, kc, kz, kr, vc, vz, vr):
        i = self.slot(t)
        self.k[:, i], self.kz[:, i], self.kr[:, i] = kc, kz, kr
        self.v[:, i], self.vz[:, i], self.vr[:, i] = vc, vz, vr
        self.pos[i] = t

    def contents(self):
        """Filled slots ordered by token index: (k, kz, kr, v, vz, vr, positions)."""
        filled = np.flatnonzero(self.pos >= 0)
        order = filled[np.argsort(self.pos[filled], kind="stable")]
        return (self.k[:, order], self.kz[:, order], self.kr[:, order], self.v[:, order], self.vz[:, order],
                self.vr[:, order], self.pos[order])

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.k, self.v, self.kz, self.vz, self.kr, self.vr, self.pos))


def new_caches(spec: Spec) -> list[Cache]:
    return [Cache(spec.n_kv, spec.head_dim, spec.sinks, spec.window) for _ in spec.layers]


# ---------------------------------------------------------------------------------------------------
# the operations, each named in the trace
# ---------------------------------------------------------------------------------------------------
class Trace(dict):
    """name -> integer array, in the order the decoder computes them."""

    def put(self, name: str, value):
        self[name] = np.asarray(value)
        return value


def linear(x_fx, lin: Linear, trace: Trace | None = None, name: str | None = None) -> np.ndarray:
    """Q15.16 (T, K) -> Q15.16 (T, N): A8 per token, the W×A8 products, the per-row × per-token rescale."""
    a, amax = R.quantize_activations(x_fx)
    acc = R.w2a8_linear(a, lin.codes, lin.scales, lin.mins, lin.group_size, lin.mask, lin.bits)
    tm, te = R.token_multiplier(amax)
    y = R.rescale_linear(acc, lin.row_mult, lin.row_shift, tm, te)
    if lin.bias_fx is not None:
        y = R.saturate(y + lin.bias_fx[None, :], FX)
    if trace is not None:
        n = name or lin.name
        trace.put(f"{n}.a", a)
        trace.put(f"{n}.amax", amax)
        trace.put(f"{n}.acc", acc)
        trace.put(f"{n}.y", y)
    return y


def _rotate_heads(x, heads: int, d: int, cos, sin):
    """(T, heads*D) -> (heads, T, D) rotated."""
    t = x.shape[0]
    return R.rope_rotate(x.reshape(t, heads, d).transpose(1, 0, 2), cos, sin)


def _quantize_heads(x):
    """(heads, T, D) Q15.16 -> A8 codes (heads, T, D) and amax (heads, T), per token and head."""
    h, t, d = x.shape
    a, amax = R.quantize_activations(x.reshape(h * t, d))
    return a.reshape(h, t, d), amax.reshape(h, t)


def attention(spec: Spec, lay: Layer, i: int, x_fx, positions, cache: Cache, trace: Trace) -> np.ndarray:
    """Attention of T new tokens (positions consecutive) against the cache; writes them into it."""
    p = f"layer{i}.attn"
    d, nh, nkv = spec.head_dim, spec.n_heads, spec.n_kv
    rep = nh // nkv
    t = x_fx.shape[0]
    q = linear(x_fx, lay.linears["q_proj"], trace, f"{p}.q_proj")
    k = linear(x_fx, lay.linears["k_proj"], trace, f"{p}.k_proj")
    v = linear(x_fx, lay.linears["v_proj"], trace, f"{p}.v_proj")
    cos, sin = R.rope_cos_sin(positions, spec.rope_theta, spec.rope_table)
    qr = trace.put(f"{p}.q_rot", _rotate_heads(q, nh, d, cos, sin))  # (heads, T, D)
    kr = trace.put(f"{p}.k_rot", _rotate_heads(k, nkv, d, cos, sin))  # (n_kv, T, D)
    vh = v.reshape(t, nkv, d).transpose(1, 0, 2)
    kc, kz, krng = (a.reshape(nkv, t, *a.shape[1:]) for a in R.quantize_kv(kr.reshape(nkv * t, d)))
    vc, vz, vrng = (a.reshape(nkv, t, *a.shape[1:]) for a in R.quantize_kv(vh.reshape(nkv * t, d)))
    for nm_, val in (("k_codes", kc), ("k_zero", kz), ("k_range", krng), ("v_codes", vc), ("v_zero", vz),
                     ("v_range", vrng)):
        trace.put(f"{p}.{nm_}", val)
    # the keys every new query may see: what the cache holds from earlier tokens, then the new ones
    # (gathered before the new tokens are written, since they may overwrite ring slots)
    ck, ckz, ckr, cv, cvz, cvr, cpos = cache.contents()
    keys = np.concatenate([ck, kc], axis=1)
    kzs = np.concatenate([ckz, kz], axis=1)
    krs = np.concatenate([ckr, krng], axis=1)
    vals = np.concatenate([cv, vc], axis=1)
    vzs = np.concatenate([cvz, vz], axis=1)
    vrs = np.concatenate([cvr, vrng], axis=1)
    kpos = np.concatenate([cpos, positions])
    for j, n in enumerate(positions):
        cache.write(int(n), kc[:, j], kz[:, j], krng[:, j], vc[:, j], vz[:, j], vrng[:, j])
    n = positions[:, None]
    jp = kpos[None, :]
    visible = jp <= n
    lam = spec.window is not None
    if lam:
        visible &= (jp < spec.sinks) | (jp > n - spec.window)
    sink_col = (kpos < spec.sinks) if lam else np.zeros(kpos.shape, bool)
    qa, qamax = _quantize_heads(qr)
    trace.put(f"{p}.q_codes", qa)
    trace.put(f"{p}.q_amax", qamax)
    if lam and spec.sinks:  # sinks are seen from position min(n, S + W - 1) (reference.attention_distances)
        cs, ss = R.rope_cos_sin(np.minimum(positions, spec.sinks + spec.window - 1), spec.rope_theta, spec.rope_table)
        qsa, qsamax = _quantize_heads(_rotate_heads(q, nh, d, cs, ss))
        trace.put(f"{p}.q_sink_codes", qsa)
    else:
        qsa, qsamax = qa, qamax
    outs, logits_all, pa_all = [], [], []
    for h in range(nh):
        g = h // rep
        acc_w = R.qk_scores(qa[h], keys[g], kzs[g])
        acc_s = R.qk_scores(qsa[h], keys[g], kzs[g]) if qsa is not qa else acc_w
        z_w = R.attention_logits(acc_w, qamax[h], krs[g], spec.softmax_mult, spec.softmax_shift)
        z_s = (R.attention_logits(acc_s, qsamax[h], krs[g], spec.softmax_mult, spec.softmax_shift)
               if qsa is not qa else z_w)
        z = np.where(sink_col[None, :], z_s, z_w)
        e = R.softmax_exp(z, visible)
        pa, wmax, esum = R.pv_weights(e, vrs[g])
        acc_pv = R.pv_product(pa, vals[g], vzs[g])
        outs.append(R.pv_output(acc_pv, wmax, esum))
        logits_all.append(np.where(visible, z, 0))
        pa_all.append(pa)
    trace.put(f"{p}.logits", np.stack(logits_all))  # (heads, T, keys): 0 where not visible
    trace.put(f"{p}.p_codes", np.stack(pa_all))
    o = trace.put(f"{p}.pv_out", np.stack(outs).transpose(1, 0, 2).reshape(t, nh * d))
    return linear(o, lay.linears["o_proj"], trace, f"{p}.o_proj")


def layer_forward(spec: Spec, i: int, x_fx, positions, cache: Cache, trace: Trace) -> np.ndarray:
    """One decoder layer on T new tokens: x + attn(norm(x)), then h + mlp(norm(h))."""
    lay = spec.layers[i]
    p = f"layer{i}"
    xn = trace.put(f"{p}.attn_norm", R.rmsnorm(x_fx, lay.attn_norm.g, lay.attn_norm.eps_term))
    h = trace.put(f"{p}.resid_attn", R.residual_add(x_fx, attention(spec, lay, i, xn, positions, cache, trace)))
    hn = trace.put(f"{p}.mlp_norm", R.rmsnorm(h, lay.mlp_norm.g, lay.mlp_norm.eps_term))
    gate = linear(hn, lay.linears["gate_proj"], trace, f"{p}.mlp.gate_proj")
    up = linear(hn, lay.linears["up_proj"], trace, f"{p}.mlp.up_proj")
    act = trace.put(f"{p}.mlp.silu_mul", R.silu_mul(gate, up))
    down = linear(act, lay.linears["down_proj"], trace, f"{p}.mlp.down_proj")
    return trace.put(f"{p}.out", R.residual_add(h, down))


def forward(spec: Spec, ids, start: int, caches: list[Cache], trace: Trace | None = None):
    """T tokens at positions start..start+T-1 through the whole model, against and into ``caches``.
    Returns (logits (T, V) Q15.16, next tokens (T,), trace)."""
    trace = Trace() if trace is None else trace
    ids = np.asarray(ids, np.int64).reshape(-1)
    positions = np.arange(start, start + ids.size, dtype=np.int64)
    if spec.window is None and spec.max_positions is not None and positions.size and \
            positions[-1] >= spec.max_positions:
        raise FormatError(f"position {int(positions[-1])} beyond the model's {spec.max_positions} positions "
                          f"without Λ-attention: use a recipe with attention_window")
    x = trace.put("embed", R.embed_lookup(ids, spec.embed_codes, spec.embed_mult, spec.embed_shift))
    for i in range(len(spec.layers)):
        x = layer_forward(spec, i, x, positions, caches[i], trace)
    xn = trace.put("final_norm", R.rmsnorm(x, spec.final_norm.g, spec.final_norm.eps_term))
    logits = linear(xn, spec.lm_head, trace, "lm_head")
    trace.put("logits", logits)
    nxt = trace.put("next_token", R.argmax_first(logits))
    return logits, nxt, trace


def prefill(spec: Spec, ids, trace: Trace | None = None):
    """The prompt as one batch: -> (logits (T, V), next tokens (T,), caches, trace)."""
    caches = new_caches(spec)
    logits, nxt, trace = forward(spec, ids, 0, caches, trace)
    return logits, nxt, caches, trace


def decode_step(spec: Spec, token: int, n: int, caches: list[Cache], trace: Trace | None = None):
    """One token at position n: -> (logits (V,), next token, trace)."""
    logits, nxt, trace = forward(spec, [token], n, caches, trace)
    return logits[0], int(nxt[0]), trace


def generate(spec: Spec, prompt_ids, max_new_tokens: int) -> list[int]:
    """Greedy: prefill the prompt, then ``max_new_tokens`` decode steps (no stop token)."""
    return _generate(spec, prompt_ids, max_new_tokens, None)


def generate_traced(spec: Spec, prompt_ids, max_new_tokens: int) -> tuple[list[int], dict[str, np.ndarray]]:
    """``generate``, keeping every step's trace under a step prefix ("prefill/layer0.out",
    "step1/logits", ...: the names ``hw.compile`` traces its programs under)."""
    traces: dict[str, np.ndarray] = {}
    return _generate(spec, prompt_ids, max_new_tokens, traces), traces


def _generate(spec: Spec, prompt_ids, max_new_tokens: int, traces: dict | None) -> list[int]:
    prompt = list(prompt_ids)
    if not prompt:
        raise FormatError("generate: empty prompt")
    _, nxt, caches, tr = prefill(spec, prompt)
    if traces is not None:
        traces.update({f"prefill/{k}": v for k, v in tr.items()})
    out = [int(nxt[-1])]
    n = len(prompt)
    while len(out) < max_new_tokens:
        _, tok, tr = decode_step(spec, out[-1], n, caches)
        if traces is not None:
            traces.update({f"step{len(out)}/{k}": v for k, v in tr.items()})
        out.append(tok)
        n += 1
    return out[:max_new_tokens]


def first_mismatch(expected: dict, got: dict) -> str | None:
    """None when every name of ``expected`` is in ``got`` with an equal array; otherwise a sentence naming
    the first (in computation order) operation and element that differ, with both values."""
    for name, want in expected.items():
        if name not in got:
            return f"{name}: missing"
        have = np.asarray(got[name])
        want = np.asarray(want)
        if have.shape != want.shape:
            return f"{name}: shape {have.shape}, expected {want.shape}"
        if not np.array_equal(have.astype(np.int64), want.astype(np.int64)):
            idx = tuple(int(i) for i in np.argwhere(have.astype(np.int64) != want.astype(np.int64))[0])
            return f"{name}[{', '.join(map(str, idx))}]: {int(have[idx])}, expected {int(want[idx])}"
    return None
