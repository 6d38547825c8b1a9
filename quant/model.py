"""A compact Llama forward over the checkpoint's weights, with the accllm numerics switchable in place.

Why an own forward rather than patching transformers: Λ-shaped attention rotates a query at two
positions (``reference.attention_distances``), the KV cache holds 4-bit codes in a fixed ring of
S + W slots, and the integer path must compute every product as the reference does. All of that is a
few lines here and fragile as a patch. With every switch off the forward is the Hugging Face Llama
forward (same RMSNorm, RoPE from ``LlamaRotaryEmbedding``, SwiGLU, GQA); a test checks the perplexity
against ``LlamaForCausalLM``'s own loss.

Two routes, selected by ``Numerics.integer_path``:

* **The integer route** (``integer_path=True``): the whole decoder in integers, ``quant.integer`` — the
  torch twin of the numpy golden model ``quant.golden``, proven equal to it tensor for tensor. From token
  id to next token id nothing is float: int8 embedding lookup, fixed-point RMSNorm, RoPE, softmax, SiLU,
  the per-row × per-token rescale of every linear, the W4 lm_head (docs/numerics.md §8, §11–16). Its
  one-token step path equals its batch forward exactly. ``LlamaLM.forward`` / ``step`` / ``new_cache``
  dispatch to it; ``LlamaLM.integer_spec`` turns the artifact into its integers once.
* **The float route** (``integer_path=False``): the products' quantizers as ``quant.reference`` defines
  them — A8 (``to_fx`` then ``quantize_activations``, per token; per token and head for the query) and
  KV4 (``quantize_kv`` per token and KV head, keys after RoPE), the P·V fold (each value token's
  r_j/15 enters P̃ = rint(p_j·r_j/15) before A8) — with dequantized weights, float32 products and float32
  RMSNorm, RoPE, softmax, SiLU and residuals. Calibration runs on it; its perplexity is the
  "float special functions" row of the quality table.
* ``Numerics.simulate``: the training variant of the float route (differentiable A8/KV4 with
  straight-through rounding, ``fake_act`` / ``fake_kv``), for the reconstruction stage only.
* Λ attention (``Numerics.window`` set): a query at n sees sinks 0..S-1 and keys n-W+1..n
  (``reference.lambda_mask``); scores against sink keys use the query rotated at min(n, S+W-1).
  In generation the cache is a ring of S + W slots (``reference.cache_slot``): constant memory.
* Static per-channel key smoothing (``QuantizeKV.k_smoothing``) lives in the weights: the quantizer
  folds it into q_proj / k_proj (``quant.algorithms.fold_key_smoothing``), so neither route needs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .formats import ACT_QMAX, FX, FX_FRAC_BITS, KV_QMAX

F64 = torch.float64
_FX_ONE = float(1 << FX_FRAC_BITS)


@dataclass
class Numerics:
    a8: bool = False  # 8-bit per-token activations into quantized linears and attention products
    kv4: bool = False  # 4-bit per-token KV cache
    sinks: int = 0
    window: int | None = None  # None: full causal attention; else Λ-shaped (sinks + window)
    integer_path: bool = False  # the whole decoder in integers (quant.integer, twin of quant.golden)
    # A8 and KV4 simulated in float with straight-through rounding (differentiable; for training
    # only: ``fake_act`` / ``fake_kv``, not bit-exact with the reference)
    simulate: bool = False


# ---------------------------------------------------------------------------------------------------
# the reference's quantizers in torch, bit-exact with quant.reference. Integers are carried in
# float64 tensors (exact below 2**53, and several times faster than int64 on CPU).
# ---------------------------------------------------------------------------------------------------
def to_fx(x: torch.Tensor) -> torch.Tensor:
    """reference.to_fx: rint(x · 2**16) (half to even), saturated to int32 (integer-valued float64)."""
    return torch.round(x.to(F64) * _FX_ONE).clamp_(FX.min, FX.max)


def round_div(n: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """reference.round_div: n / d, ties away from zero (d > 0), for quotients |n/d| <= 2**10.

    Computed as floor((2|n| + d) / (2d)) in float64, which is exact here: numerator and denominator
    are integers below 2**53 (so exact in float64), and when the true quotient is not an integer it
    is at least 1/(2d) >= 2**-33 away from one, while the float64 division errs by at most
    2**11 · 2**-53. (The quantizers call it with |n/d| <= 127.5; tests check it against the
    reference.) Several times faster than int64 floor division on CPU."""
    nf, df = n.to(F64), d.to(F64)
    mag = (2 * nf.abs()).add_(df).div_(2 * df).floor_()
    return mag.copysign_(nf).add_(0.0)  # + 0.0 turns -0.0 into 0.0


def quantize_act_fx(x_fx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.quantize_activations over the last axis of Q15.16 values -> (codes, amax), float64.
    A token with amax == 0 gets codes 0 (round_div(0, 1) = 0)."""
    x_fx = x_fx.to(F64)
    amax = x_fx.abs().amax(dim=-1)
    safe = amax.clamp(min=1).unsqueeze(-1)
    return round_div(ACT_QMAX * x_fx, safe), amax


def quantize_act(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_act_fx(to_fx(x))


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """reference.quantize_kv over the last axis (one head's channels) of float values (to_fx first)."""
    return quantize_kv_fx(to_fx(x))


def quantize_kv_fx(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """reference.quantize_kv over the last axis of Q15.16 values -> (codes, zero, range), float64."""
    x = x.to(F64)
    lo = x.amin(dim=-1).clamp_(max=0)
    hi = x.amax(dim=-1).clamp_(min=0)
    r = hi - lo
    safe = r.clamp(min=1)
    zero = round_div(-KV_QMAX * lo, safe)  # 0 when r == 0 (then lo == 0)
    codes = round_div(KV_QMAX * x, safe.unsqueeze(-1)).add_(zero.unsqueeze(-1)).clamp_(0, KV_QMAX)
    codes = torch.where(r.unsqueeze(-1) == 0, torch.zeros_like(codes), codes)
    return codes, zero, r


def fold_pv(p: torch.Tensor, v_range: torch.Tensor) -> torch.Tensor:
    """P̃ = rint(p · r / 15): Q15.16 codes of p_j · r_j/15/2**16 (see the module docstring).
    p (..., Tq, Tk) float32 probabilities, v_range (..., Tk) -> integer-valued float64."""
    return torch.round(p.to(F64) * (v_range.to(F64) / KV_QMAX).unsqueeze(-2)).clamp_(FX.min, FX.max)


def fold_quantize_pv(p: torch.Tensor, v_range: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_act_fx(fold_pv(p, v_range))`` in fewer passes over the (..., Tq, Tk) tensor, which
    dominates the cost of attention: P̃ >= 0 (p >= 0, ranges >= 0), so round_div needs no abs or
    sign, and P̃ <= 2**32/15 < FX.max needs no clamp. Equal element for element (tested)."""
    pf = p.to(F64).mul_((v_range.to(F64) / KV_QMAX).unsqueeze(-2)).round_()
    amax = pf.amax(dim=-1)
    d = amax.clamp(min=1).unsqueeze(-1)
    # round_div(127·P̃, d) for 127·P̃ >= 0: floor((2·127·P̃ + d) / (2d)) (exactness: see round_div)
    pa = pf.mul_(2 * ACT_QMAX).add_(d).div_(2 * d).floor_()
    return pa, amax


def _i64(t):
    return t.to(torch.int64)


# ---------------------------------------------------------------------------------------------------
# differentiable simulations of A8 and KV4 (Numerics.simulate; the reconstruction stage trains through
# them). The same grids as quantize_act / quantize_kv in float, without the Q15.16 input rounding;
# straight-through: the forward value is quantized, the gradient is the identity's.
# ---------------------------------------------------------------------------------------------------
def _ste(x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    return x + (xq - x).detach()


def fake_act(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per last axis, amax/127 steps (quantize_act's grid), as float."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).clamp(min=1e-30)
    return _ste(x, torch.round(x.detach() * (ACT_QMAX / amax)) * (amax / ACT_QMAX))


def fake_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit asymmetric per last axis with an integer zero (quantize_kv's grid), as float; also returns
    each row's step r/15 (..., 1)."""
    xd = x.detach()
    lo, hi = xd.amin(dim=-1, keepdim=True).clamp(max=0), xd.amax(dim=-1, keepdim=True).clamp(min=0)
    step = ((hi - lo) / KV_QMAX).clamp(min=1e-30)
    z = torch.round(-lo / step)
    q = (torch.round(xd / step) + z).clamp(0, KV_QMAX)
    return _ste(x, (q - z) * step), step


#: float32 represents every integer of magnitude <= 2**24 exactly
_F32_EXACT = 1 << 24


def exact_float32(device) -> bool:
    """Whether float32 matmuls on ``device`` sum integer products exactly (below 2**24): on the CPU yes; on
    CUDA only when TF32 is off (``torch.backends.cuda.matmul.allow_tf32``: TF32 keeps 10 mantissa bits of
    each operand, so a product of 8-bit codes may be rounded). Otherwise the exact routes use float64."""
    dev = torch.device(device)
    return dev.type == "cpu" or (dev.type == "cuda" and not torch.backends.cuda.matmul.allow_tf32)


def _int_matmul(a: torch.Tensor, b: torch.Tensor, max_term: int) -> torch.Tensor:
    """a @ b for integer-valued float tensors whose products are at most ``max_term`` in magnitude,
    returned as float64. When every partial sum is bounded by (inner dimension) · max_term < 2**24 the
    product is computed in float32, which is then exact whatever the summation order (each partial sum
    is an integer float32 represents); otherwise in float64 (exact below 2**53). The float32 route is
    2-3x faster on a CPU and is what makes the calibration and evaluation passes affordable."""
    if a.shape[-1] * max_term < _F32_EXACT and exact_float32(a.device):
        return (a.to(torch.float32) @ b.to(torch.float32)).to(F64)
    return a.to(F64) @ b.to(F64)


# ---------------------------------------------------------------------------------------------------
# linear layers
# ---------------------------------------------------------------------------------------------------
class FloatLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight.to(torch.float32), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.to(torch.float32), requires_grad=False)

    @property
    def in_features(self):
        return self.weight.shape[1]

    def forward(self, x):
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


class QLinear(nn.Module):
    """A linear layer in the hardware's weight format (any object with the fields of
    ``quant.qlinear.QuantizedLinear``: codes, scales, mins, row_scale, group_size, bits, mask, bias)."""

    def __init__(self, q, numerics: Numerics, name: str = ""):
        super().__init__()
        self.q = q  # the integer fields (numpy), for the reference and the artifact
        self.name = name
        self.numerics = numerics
        g = int(q.group_size)
        s = np.repeat(np.asarray(q.scales, np.int64), g, axis=1)
        m = np.repeat(np.asarray(q.mins, np.int64), g, axis=1)
        w_int = s * np.asarray(q.codes, np.int64) + m
        if q.mask is not None:
            w_int = np.where(np.asarray(q.mask, bool), w_int, 0)
        self.register_buffer("w_int", torch.from_numpy(w_int.astype(np.int16)), persistent=False)
        self.register_buffer("row_scale", torch.from_numpy(np.asarray(q.row_scale, np.float64)), persistent=False)
        b = None if q.bias is None else torch.from_numpy(np.asarray(q.bias, np.float32))
        self.register_buffer("bias", b, persistent=False)

    @property
    def in_features(self):
        return self.w_int.shape[1]

    def weight_float(self) -> torch.Tensor:
        """The dequantized weights (reference.dequantize_weights), float32."""
        return (self.w_int.to(F64) * self.row_scale[:, None]).to(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The float route: the dequantized weights in float32 on the input as A8 quantizes it (codes
        dequantized) when 8-bit activations are on. The integer route (the whole decoder in integers)
        is quant.integer, reached through LlamaLM when ``Numerics.integer_path`` is set."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.numerics.a8:
            a, amax = quantize_act(x2)
            x2 = (a * (amax[:, None] / (ACT_QMAX * _FX_ONE))).to(torch.float32)
        y = x2 @ self.weight_float().T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], y.shape[-1])


# ---------------------------------------------------------------------------------------------------
# RoPE, norm
# ---------------------------------------------------------------------------------------------------
class Rope(nn.Module):
    """cos/sin exactly as transformers' LlamaRotaryEmbedding (so rope_scaling variants are honoured)."""

    def __init__(self, cfg):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        with torch.device("cpu"):  # built on the CPU whatever the default device; moved with the model
            hf = LlamaRotaryEmbedding(cfg)
        self.register_buffer("inv_freq", hf.inv_freq.detach().clone().to(torch.float32), persistent=False)
        self.scale = float(hf.attention_scaling)

    def forward(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = pos[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.scale, emb.sin() * self.scale


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


def rms_norm(x, weight, eps):
    x32 = x.to(torch.float32)
    var = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(var + eps))


# ---------------------------------------------------------------------------------------------------
# attention with KV4, A8 and Λ
# ---------------------------------------------------------------------------------------------------
class KVCache:
    """One layer's cache for one sequence: S + W slots under Λ (a ring, ``reference.cache_slot``),
    otherwise growing. Stores 4-bit codes + zero + range when KV4 is on, float otherwise."""

    def __init__(self, n_kv: int, head_dim: int, numerics: Numerics, capacity: int | None, device=None):
        self.nm = numerics
        dev = torch.device("cpu") if device is None else device
        self.capacity = capacity
        size = capacity or 16
        dt = torch.uint8 if numerics.kv4 else torch.float32
        self.k = torch.zeros(n_kv, size, head_dim, dtype=dt, device=dev)
        self.v = torch.zeros(n_kv, size, head_dim, dtype=dt, device=dev)
        self.kz = torch.zeros(n_kv, size, dtype=torch.int64, device=dev)
        self.kr = torch.zeros(n_kv, size, dtype=torch.int64, device=dev)
        self.vz = torch.zeros(n_kv, size, dtype=torch.int64, device=dev)
        self.vr = torch.zeros(n_kv, size, dtype=torch.int64, device=dev)
        self.pos = torch.full((size,), -1, dtype=torch.int64, device=dev)  # token index held by each slot

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.kz, self.kr, self.vz, self.vr, self.pos))

    def _slot(self, t: int) -> int:
        if self.capacity is None:
            if t >= self.k.shape[1]:  # grow (no Λ window): double
                for name in ("k", "v", "kz", "kr", "vz", "vr", "pos"):
                    old = getattr(self, name)
                    pad = torch.zeros_like(old) if name != "pos" else torch.full_like(old, -1)
                    setattr(self, name, torch.cat([old, pad], dim=-2 if old.dim() == 3 else -1))
            return t
        s, w = self.nm.sinks, self.nm.window
        return t if t < s else s + (t - s) % w

    def write(self, t: int, k, v):
        """k, v (n_kv, D) float (k already rotated at t)."""
        i = self._slot(t)
        if self.nm.kv4:
            kc, kz, kr = quantize_kv(k)
            vc, vz, vr = quantize_kv(v)
            self.k[:, i], self.kz[:, i], self.kr[:, i] = kc.to(torch.uint8), _i64(kz), _i64(kr)
            self.v[:, i], self.vz[:, i], self.vr[:, i] = vc.to(torch.uint8), _i64(vz), _i64(vr)
        else:
            self.k[:, i], self.v[:, i] = k, v
        self.pos[i] = t

    def view(self):
        """Filled slots ordered by token index -> (k, kz, kr, v, vz, vr, positions)."""
        filled = torch.nonzero(self.pos >= 0).flatten()
        order = filled[torch.argsort(self.pos[filled])]
        return tuple(t[:, order] for t in (self.k, self.kz, self.kr, self.v, self.vz, self.vr)) + (self.pos[order],)


def attention_shape(cfg) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) of a Llama config."""
    heads = cfg.num_attention_heads
    return heads, getattr(cfg, "num_key_value_heads", None) or heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // heads


class Attention(nn.Module):
    def __init__(self, cfg, numerics: Numerics, q, k, v, o):
        super().__init__()
        self.nm = numerics
        self.n_heads, self.n_kv, self.head_dim = attention_shape(cfg)
        self.scaling = self.head_dim ** -0.5
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q, k, v, o

    # -- the two products, shared by the full-sequence and the cached forward ------------------------
    # The float route: A8 and KV4 are applied as quant.reference defines them (the same codes), and the
    # products and softmax are computed in float32 on the dequantized codes. ``simulate`` is the training
    # variant (differentiable, straight-through). The integer route is quant.integer.
    def _scores(self, q, k, kz, kr):
        """q (..., Tq, D) float rotated; k (..., Tk, D) float or 4-bit codes -> real scores, float32."""
        nm = self.nm
        if nm.simulate:  # k is already fake_kv'd by _kv_store
            return (fake_act(q) if nm.a8 else q) @ k.transpose(-1, -2)
        if nm.a8:
            qa, qamax = quantize_act(q)
            q = (qa * (qamax / (ACT_QMAX * _FX_ONE)).unsqueeze(-1)).to(torch.float32)
        if nm.kv4:
            k = ((k.to(F64) - kz.to(F64).unsqueeze(-1)) * (kr.to(F64) / (KV_QMAX * _FX_ONE)).unsqueeze(-1)).to(torch.float32)
        return q @ k.transpose(-1, -2)

    def _pv(self, p, v, vz, vr):
        """p (..., Tq, Tk) float32 probabilities -> output (..., Tq, D) float32."""
        nm = self.nm
        if nm.simulate:  # v fake_kv'd, vr its steps (..., Tk, 1) or None: P·V as the fold computes it
            if not nm.a8:
                return p @ v
            if vr is None:
                return fake_act(p) @ v
            w = p * vr.squeeze(-1).unsqueeze(-2)  # p_j · r_j/15, (..., Tq, Tk)
            w = _ste(w, torch.round(w.detach() * _FX_ONE) / _FX_ONE)  # the fold's Q15.16 rounding (P̃)
            return fake_act(w) @ (v / vr)
        if nm.kv4 and nm.a8:  # the fold: each value token's scale r_j/15 enters P̃ before A8
            pa, pamax = fold_quantize_pv(p, vr)
            acc = _int_matmul(pa, v.to(F64) - vz.to(F64).unsqueeze(-1), ACT_QMAX * KV_QMAX)
            return (acc * (pamax / (ACT_QMAX * _FX_ONE)).unsqueeze(-1)).to(torch.float32)
        if nm.kv4:
            v = ((v.to(F64) - vz.to(F64).unsqueeze(-1)) * (vr.to(F64) / (KV_QMAX * _FX_ONE)).unsqueeze(-1)).to(torch.float32)
        elif nm.a8:
            pa, pamax = quantize_act(p)
            p = (pa * (pamax / (ACT_QMAX * _FX_ONE)).unsqueeze(-1)).to(torch.float32)
        return p @ v

    def _kv_store(self, k, v):
        if self.nm.simulate:
            if not self.nm.kv4:
                return k, None, None, v, None, None
            (kq, _), (vq, vstep) = fake_kv(k), fake_kv(v)
            return kq, None, None, vq, None, vstep
        if self.nm.kv4:
            kc, kz, kr = quantize_kv(k)
            vc, vz, vr = quantize_kv(v)
            return kc, kz, kr, vc, vz, vr
        return k, None, None, v, None, None

    def _expand(self, t, dim: int = 1):
        """Share KV heads among query heads (GQA): head h reads KV head h // (n_heads / n_kv)."""
        rep = self.n_heads // self.n_kv
        return t if t is None or rep == 1 else t.repeat_interleave(rep, dim=dim)

    def forward(self, x, rope: Rope, pos: torch.Tensor):
        """Full sequence: x (B, T, H); pos (T,) int64 token positions 0..T-1."""
        nm = self.nm
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = rope(pos)
        qr, kr_ = rotate(q, cos, sin), rotate(k, cos, sin)
        kc, kz, krng, vc, vz, vrng = (self._expand(z) for z in self._kv_store(kr_, v))
        scores = self._scores(qr, kc, kz, krng)
        lam = nm.window is not None
        n = torch.arange(t, device=x.device)[:, None]
        j = torch.arange(t, device=x.device)[None, :]
        visible = j <= n
        if lam:
            s, w = nm.sinks, nm.window
            visible = visible & ((j < s) | (j > n - w))
            if s > 0 and t > s + w:  # queries past the cache see the sinks from position S+W-1
                cs, ss = rope(torch.clamp(pos, max=s + w - 1))
                sl = slice(0, min(s, t))
                sink = self._scores(rotate(q, cs, ss), kc[..., sl, :],
                                    None if kz is None else kz[..., sl], None if krng is None else krng[..., sl])
                scores = torch.cat([sink, scores[..., s:]], dim=-1)
        scores = (scores * self.scaling).masked_fill_(~visible, float("-inf"))
        p = torch.softmax(scores, dim=-1)
        out = self._pv(p, vc, vz, vrng)
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        return self.o_proj(out)

    def step(self, x, rope: Rope, n: int, cache: KVCache):
        """One new token at position n: x (1, 1, H) -> (1, 1, H), reading and writing ``cache``."""
        nm = self.nm
        q = self.q_proj(x).view(self.n_heads, self.head_dim)
        k = self.k_proj(x).view(self.n_kv, self.head_dim)
        v = self.v_proj(x).view(self.n_kv, self.head_dim)
        cos, sin = rope(torch.tensor([n], device=x.device))
        cache.write(n, rotate(k, cos, sin), v)
        kc, kz, krng, vc, vz, vrng, kpos = cache.view()
        kc, kz, krng, vc, vz, vrng = (self._expand(z, 0) for z in (kc, kz, krng, vc, vz, vrng))
        if not nm.kv4:
            kz = krng = vz = vrng = None
        qr = rotate(q, cos, sin).unsqueeze(1)  # (heads, 1, D)
        scores = self._scores(qr, kc, kz, krng)  # (heads, 1, Tk)
        if nm.window is not None and nm.sinks > 0 and n > nm.sinks + nm.window - 1:
            cs, ss = rope(torch.tensor([nm.sinks + nm.window - 1], device=x.device))
            ns = int((kpos < nm.sinks).sum())
            sink = self._scores(rotate(q, cs, ss).unsqueeze(1), kc[:, :ns],
                                None if kz is None else kz[:, :ns], None if krng is None else krng[:, :ns])
            scores = torch.cat([sink, scores[..., ns:]], dim=-1)
        p = torch.softmax(scores * self.scaling, dim=-1)
        out = self._pv(p, vc, vz, vrng)  # (heads, 1, D)
        return self.o_proj(out.reshape(1, 1, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, gate, up, down):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg, numerics: Numerics, linears: dict, norms: dict):
        super().__init__()
        self.eps = cfg.rms_norm_eps
        self.self_attn = Attention(cfg, numerics, linears["q_proj"], linears["k_proj"], linears["v_proj"],
                                   linears["o_proj"])
        self.mlp = MLP(linears["gate_proj"], linears["up_proj"], linears["down_proj"])
        self.input_layernorm = nn.Parameter(norms["input_layernorm"].to(torch.float32), requires_grad=False)
        self.post_attention_layernorm = nn.Parameter(norms["post_attention_layernorm"].to(torch.float32),
                                                     requires_grad=False)

    def forward(self, x, rope, pos):
        h = x + self.self_attn(rms_norm(x, self.input_layernorm, self.eps), rope, pos)
        return h + self.mlp(rms_norm(h, self.post_attention_layernorm, self.eps))

    def step(self, x, rope, n, cache):
        h = x + self.self_attn.step(rms_norm(x, self.input_layernorm, self.eps), rope, n, cache)
        return h + self.mlp(rms_norm(h, self.post_attention_layernorm, self.eps))


ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_NAMES = ("gate_proj", "up_proj", "down_proj")


def linear_name(i: int, proj: str) -> str:
    return f"model.layers.{i}.{'self_attn' if proj in ATTN else 'mlp'}.{proj}"


def float_layer(cfg, store, i: int, numerics: Numerics) -> DecoderLayer:
    """Decoder layer i in float, read from a WeightStore."""
    lin = {p: FloatLinear(store.get(linear_name(i, p) + ".weight")) for p in ATTN + MLP_NAMES}
    norms = {n: store.get(f"model.layers.{i}.{n}.weight") for n in ("input_layernorm", "post_attention_layernorm")}
    return DecoderLayer(cfg, numerics, lin, norms)


def layer_float_linear(i: int, lay: DecoderLayer) -> str | None:
    """Why decoder layer i cannot run on the integer route (a float linear), or None."""
    for p in ATTN + MLP_NAMES:
        if not isinstance(getattr(lay.self_attn if p in ATTN else lay.mlp, p), QLinear):
            return f"the integer path needs every linear quantized; {linear_name(i, p)} is float"
    return None


def _golden_linear(m: "QLinear", name: str):
    from . import golden as G

    q = m.q
    return G.Linear.from_fields(name, q.codes, q.scales, q.mins, q.row_scale, q.group_size, q.bits, q.mask, q.bias)


def integer_layer(i: int, lay: DecoderLayer):
    """Decoder layer i (every linear a QLinear) as a ``quant.golden.Layer``: its integers, the norms' γ and
    eps converted as ``reference.rmsnorm_params`` does. Raises QuantError naming a float linear."""
    from . import golden as G
    from .errors import QuantError

    why = layer_float_linear(i, lay)
    if why:
        raise QuantError(why)
    mods = {p: getattr(lay.self_attn, p) for p in ATTN} | {p: getattr(lay.mlp, p) for p in MLP_NAMES}
    return G.Layer(G.Norm.from_float(lay.input_layernorm.detach().cpu().numpy(), lay.eps),
                   G.Norm.from_float(lay.post_attention_layernorm.detach().cpu().numpy(), lay.eps),
                   {p: _golden_linear(m, linear_name(i, p)) for p, m in mods.items()})


class LlamaLM(nn.Module):
    def __init__(self, cfg, embed: torch.Tensor, layers: list[DecoderLayer], norm: torch.Tensor,
                 lm_head: nn.Module | None, numerics: Numerics):
        super().__init__()
        self.config = cfg
        self.numerics = numerics
        self.embed_tokens = nn.Parameter(embed.to(torch.float32), requires_grad=False)
        self.layers = nn.ModuleList(layers)
        self.norm = nn.Parameter(norm.to(torch.float32), requires_grad=False)
        self.lm_head = lm_head  # None: tied to the embedding
        self.rope = Rope(cfg)
        self.eps = cfg.rms_norm_eps

    @classmethod
    def from_store(cls, cfg, store, numerics: Numerics | None = None, layers: list | None = None) -> "LlamaLM":
        """The float model read from a WeightStore; ``layers`` given: around those (e.g. none, for a streamed
        evaluation) instead of every layer of the store."""
        nm = numerics or Numerics()
        if layers is None:
            layers = [float_layer(cfg, store, i, nm) for i in range(cfg.num_hidden_layers)]
        head = store.lm_head()
        return cls(cfg, store.get("model.embed_tokens.weight"), layers, store.get("model.norm.weight"),
                   None if head is None else FloatLinear(head), nm)

    @property
    def device(self) -> torch.device:
        """Where the model's tensors are (``model.to(device)`` moves them; the integer decoder and the caches
        follow)."""
        return self.embed_tokens.device

    @property
    def quantized(self) -> bool:
        return any(isinstance(m, QLinear) for m in self.modules())

    # -- the integer route: the whole decoder in integers (quant.integer, twin of quant.golden) -----------
    embed_q = None  # (codes (V, H) int8, row_scale (V,)) when the artifact's embedding is quantized

    def integer_unready(self) -> str | None:
        """Why the integer route cannot run this model (None when it can): it runs the hardware's numerics,
        so every product and table must be in the hardware's formats."""
        nm = self.numerics
        if not nm.a8 or not nm.kv4:
            return ("the integer path runs the hardware's numerics: it needs 8-bit activations and the 4-bit KV "
                    "cache (quantize_activations and quantize_kv in the recipe)")
        if self.embed_q is None:
            return ("the integer path needs the embedding table quantized (recipe modifier quantize_embedding); "
                    "this model keeps it in float")
        if not isinstance(self.lm_head, QLinear):
            return ("the integer path needs a quantized lm_head (quantize_weights.overrides {lm_head: 4}); this "
                    "model keeps it in float")
        for i, lay in enumerate(self.layers):
            why = layer_float_linear(i, lay)
            if why:
                return why
        return None

    def integer_spec(self):
        """The model's integers as a ``quant.golden.Spec`` (numpy): every linear and the lm_head must be
        quantized and the embedding table int8 (``embed_q``); the float constants (γ, RoPE frequencies,
        row scales) are converted once by ``reference.*_params``. Raises QuantError naming what is float."""
        from . import golden as G
        from . import reference as R
        from .errors import QuantError

        nm = self.numerics
        why = self.integer_unready()
        if why:
            raise QuantError(why)

        layers = [integer_layer(i, lay) for i, lay in enumerate(self.layers)]
        cfg = self.config
        n_heads, n_kv, head_dim = attention_shape(cfg)
        codes, row_scale = self.embed_q
        em, es = R.embedding_multipliers(row_scale)
        theta, table = R.rope_params(self.rope.inv_freq.detach().cpu().numpy(), self.rope.scale)
        mc, sc = R.softmax_params(head_dim)
        return G.Spec(hidden=cfg.hidden_size, n_heads=n_heads, n_kv=n_kv, head_dim=head_dim, layers=layers,
                      final_norm=G.Norm.from_float(self.norm.detach().cpu().numpy(), self.eps),
                      lm_head=_golden_linear(self.lm_head, "lm_head"), embed_codes=np.asarray(codes, np.int8),
                      embed_mult=em, embed_shift=es, rope_theta=theta, rope_table=table, softmax_mult=mc,
                      softmax_shift=sc, sinks=nm.sinks if nm.window is not None else 0, window=nm.window,
                      max_positions=getattr(cfg, "max_position_embeddings", None)).check()

    def integer_decoder(self):
        """The torch integer decoder for the current numerics (built once per Λ setting)."""
        from .integer import Decoder

        key = (self.numerics.sinks, self.numerics.window, self.device)
        if getattr(self, "_decoder_key", None) != key:
            self._decoder = Decoder(self.integer_spec(), device=self.device)
            self._decoder_key = key
        return self._decoder

    def head(self, h):
        h = rms_norm(h, self.norm, self.eps)
        if self.lm_head is None:
            return h @ self.embed_tokens.T
        return self.lm_head(h)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) -> logits (B, T, V): float32 on the float route; on the integer route the decoder's
        Q15.16 integer logits as float64 (exact). (quant.evaluate.stream_logits runs the same calls one
        layer at a time over many windows.)"""
        if self.numerics.integer_path:
            from .integer import to_float_logits

            dec = self.integer_decoder()
            return torch.stack([to_float_logits(dec.forward(row, 0, dec.new_caches())) for row in ids])
        ids = ids.to(self.device)
        pos = torch.arange(ids.shape[1], device=self.device)
        h = self.embed_tokens[ids]
        for layer in self.layers:
            h = layer(h, self.rope, pos)
        return self.head(h)

    def new_cache(self) -> list:
        nm = self.numerics
        if nm.integer_path:
            return self.integer_decoder().new_caches()
        cap = None if nm.window is None else nm.sinks + nm.window
        a = self.layers[0].self_attn
        return [KVCache(a.n_kv, a.head_dim, nm, cap, self.device) for _ in self.layers]

    def step(self, token: int, n: int, cache: list[KVCache]) -> torch.Tensor:
        """Logits (V,) for one token at position n, updating the caches."""
        if self.numerics.integer_path:
            from .integer import to_float_logits

            return to_float_logits(self.integer_decoder().forward([token], n, cache)[0])
        h = self.embed_tokens[torch.tensor([[token]], device=self.device)]
        for layer, c in zip(self.layers, cache):
            h = layer.step(h, self.rope, n, c)
        return self.head(h)[0, 0]
