"""The torch integer path: the whole decoder in the integers ``quant.reference`` defines, in torch.

Twin of ``quant.golden`` (numpy): every function below mirrors the reference operation of the same
name, on int64 tensors, and is tested equal to it element for element (``tests/quant/test_integer.py``);
the decoder (``Decoder``) is tested equal to the golden model tensor for tensor, and its one-token
step path equal to its batch forward. Products run as float matmuls only where every partial sum is
an integer the float type holds exactly (float32 below 2**24, float64 below 2**53): that is exact
whatever the summation order, so the result does not depend on the CPU or the thread count.

The constants (row multipliers, γ, RoPE tables, the softmax constant, the embedding table) come from a
``quant.golden.Spec``, built once from the artifact.
"""

from __future__ import annotations

import numpy as np
import torch

from . import formats as F
from . import golden as G
from . import model as M
from .formats import ACT_QMAX, FX, KV_QMAX, REQ_SHIFT_MAX
from .reference import FormatError

I64 = torch.int64
_F32_EXACT = 1 << 24
_F64_EXACT = 1 << 53


def _t(a, device=None) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.int64)))
    return t if device is None else t.to(device)


def _sat(x: torch.Tensor, fmt=FX) -> torch.Tensor:
    return x.clamp(fmt.min, fmt.max)


def shift_round(x: torch.Tensor, s) -> torch.Tensor:
    if isinstance(s, int):  # one shift for the whole tensor: no per-element half
        return (x + (1 << (s - 1))) >> s if s > 0 else x
    s = _t(s, x.device)
    half = torch.bitwise_left_shift(torch.ones((), dtype=I64, device=x.device), (s - 1).clamp(min=0)) * (s > 0)
    return torch.bitwise_right_shift(x + half, s)


def shift_round_signed(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return torch.where(s >= 0, shift_round(x, s.clamp(min=0)), torch.bitwise_left_shift(x, (-s).clamp(min=0)))


def round_div(n: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """reference.round_div in int64 (ties away from zero; d > 0): floor((2|n| + d) / (2d)) with the sign.
    Not quant.model.round_div (float64-carried): the softmax's numerators reach 2**55, beyond float64's
    exact integers."""
    mag = torch.div(2 * n.abs() + d, 2 * d, rounding_mode="floor")
    return torch.where(n < 0, -mag, mag)


def bit_length(x: torch.Tensor) -> torch.Tensor:
    v = x.clone()
    bits = torch.zeros_like(x)
    for s in (32, 16, 8, 4, 2, 1):
        big = v >= (1 << s)
        bits += torch.where(big, s, 0)
        v = torch.where(big, v >> s, v)
    return torch.where(x > 0, bits + 1, 0)


def mantissa16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    nz = x > 0
    exp = bit_length(x) - 16
    mult = torch.where(exp > 0, shift_round(x, exp.clamp(min=0)), torch.bitwise_left_shift(x, (-exp).clamp(min=0)))
    carry = mult == (1 << 16)
    mult = torch.where(carry, 1 << 15, mult)
    exp = torch.where(carry, exp + 1, exp)
    return torch.where(nz, mult, 0), torch.where(nz, exp, 0)


# ---------------------------------------------------------------------------------------------------
# quantizers and the linear
# ---------------------------------------------------------------------------------------------------
def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.quantize_activations over the last axis of Q15.16 int64 values: (codes, amax), int64.
    The float route's quantizer (quant.model.quantize_act_fx: integers carried exactly in float64)."""
    a, amax = M.quantize_act_fx(x)
    return a.to(I64), amax.to(I64)


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """reference.quantize_kv over the last axis of Q15.16 int64 values: (codes, zero, range), int64
    (quant.model.quantize_kv_fx, as the float route quantizes the cache)."""
    return tuple(t.to(I64) for t in M.quantize_kv_fx(x))


def _matmul_exact(a: torch.Tensor, b: torch.Tensor, max_term: int) -> torch.Tensor:
    """a @ b of int64 tensors through float32/float64 where every partial sum is exact; int64 result."""
    bound = a.shape[-1] * max_term
    if bound < _F32_EXACT and M.exact_float32(a.device):
        return (a.to(torch.float32) @ b.to(torch.float32)).to(I64)
    if bound < _F64_EXACT:
        return (a.to(torch.float64) @ b.to(torch.float64)).to(I64)
    raise FormatError(f"integer matmul: partial sums up to {bound} are beyond float64's exact integers")


class Linear:
    """A golden.Linear as torch tensors: the integer weight s_hat*q + m_hat (0 where pruned)."""

    def __init__(self, lin: G.Linear, device=None):
        self.name = lin.name
        g = lin.group_size
        w = (np.repeat(lin.scales.astype(np.int64), g, axis=1) * lin.codes.astype(np.int64)
             + np.repeat(lin.mins.astype(np.int64), g, axis=1))
        if lin.mask is not None:
            w = np.where(lin.mask, w, 0)
        self.w_t = torch.from_numpy(w.T.copy()).to(device=device, dtype=torch.float64)  # (K, N)
        self.max_w = int(np.abs(w).max()) if w.size else 0
        self.row_mult, self.row_shift = _t(lin.row_mult, device), _t(lin.row_shift, device)
        self.bias = None if lin.bias_fx is None else _t(lin.bias_fx, device)

    def __call__(self, x: torch.Tensor, trace: dict | None = None, name: str = "") -> torch.Tensor:
        a, amax = quantize_activations(x)
        bound = a.shape[-1] * ACT_QMAX * max(self.max_w, 1)
        if bound >= _F64_EXACT:
            raise FormatError(f"{self.name}: accumulators beyond float64's exact integers")
        acc = (a.to(torch.float64) @ self.w_t).to(I64)
        tm, te = mantissa16(amax)
        sh = self.row_shift[None, :] - te[:, None]
        live = tm[:, None] != 0
        if bool((live & ((sh < 0) | (sh > REQ_SHIFT_MAX))).any()):
            raise FormatError(f"{self.name}: rescale shift outside 0..{REQ_SHIFT_MAX}")
        if bool((acc.abs() >= (1 << 31)).any()):
            raise FormatError(f"{self.name}: |accumulator| >= 2**31")
        y = _sat(shift_round(acc * self.row_mult[None, :] * tm[:, None], sh.clamp(0, REQ_SHIFT_MAX)))
        if self.bias is not None:
            y = _sat(y + self.bias[None, :])
        if trace is not None:
            trace[f"{name}.a"], trace[f"{name}.amax"], trace[f"{name}.acc"], trace[f"{name}.y"] = a, amax, acc, y
        return y


# ---------------------------------------------------------------------------------------------------
# the special functions (twins of reference.rmsnorm, rope_*, attention_logits, softmax_exp, ...)
# ---------------------------------------------------------------------------------------------------
_TABLES = {"rsqrt": G.R.rsqrt_table, "exp2": G.R.exp2_table, "sigmoid": G.R.sigmoid_table}
_ON_DEVICE: dict = {}


def _table(name: str, device) -> torch.Tensor:
    """The special-function table ``name`` (reference.*_table) on ``device`` (made once per device)."""
    key = (name, str(device))
    if key not in _ON_DEVICE:
        _ON_DEVICE[key] = torch.from_numpy(_TABLES[name]()).to(device)
    return _ON_DEVICE[key]


def rsqrt(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    e = (bit_length(v) - 1) // 2
    sh = 2 * e - F.RSQRT_MANT_FRAC
    mq = torch.where(sh > 0, torch.bitwise_right_shift(v, sh.clamp(min=0)),
                     torch.bitwise_left_shift(v, (-sh).clamp(min=0)))
    y = _table("rsqrt", v.device)[mq >> F.RSQRT_INDEX_SHIFT]
    t = shift_round(mq * (y * y), 2 * F.RSQRT_FRAC)
    h = (3 << F.RSQRT_MANT_FRAC) - t
    return shift_round(y * h, F.RSQRT_MANT_FRAC + 1).clamp(max=1 << F.RSQRT_FRAC), e


def rmsnorm(x: torch.Tensor, g: torch.Tensor, eps_term: int) -> torch.Tensor:
    kmin = -((62 - int(G.R.bit_length(eps_term))) // 2)
    k = (bit_length(x.abs().amax(dim=-1)) - F.RMS_PRESHIFT_BITS).clamp(min=kmin)
    xs = shift_round_signed(x, k.unsqueeze(-1))
    ss = (xs * xs).sum(dim=-1) + shift_round_signed(torch.full_like(k, int(eps_term)), 2 * k)
    r, e = rsqrt(ss.clamp(min=1))
    u = shift_round_signed(x * r.unsqueeze(-1), (F.RSQRT_FRAC + k).unsqueeze(-1))
    y = _sat(shift_round(u * g, e.unsqueeze(-1)))
    return torch.where((ss > 0).unsqueeze(-1), y, 0)


def rope_cos_sin(pos: torch.Tensor, theta: torch.Tensor, table: torch.Tensor):
    if bool((pos < 0).any()) or bool((pos > F.ROPE_MAX_POSITION).any()):
        raise FormatError(f"rope: position outside 0..{F.ROPE_MAX_POSITION}")
    tb = F.ROPE_TABLE_BITS
    ph = (pos[:, None] * theta[None, :]) & ((1 << F.ROPE_PHASE_BITS) - 1)
    idx = ((ph + (1 << (F.ROPE_PHASE_BITS - tb - 1))) >> (F.ROPE_PHASE_BITS - tb)) & ((1 << tb) - 1)
    return table[(idx + (1 << (tb - 2))) & ((1 << tb) - 1)], table[idx]


def rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return _sat(torch.cat([shift_round(x1 * cos - x2 * sin, F.ROPE_FRAC),
                           shift_round(x2 * cos + x1 * sin, F.ROPE_FRAC)], dim=-1))


def attention_logits(acc, q_amax, k_range, mult: int, shift: int) -> torch.Tensor:
    """acc (..., Tq, Tk), q_amax (..., Tq), k_range (..., Tk)."""
    mq, eq = mantissa16(q_amax)
    mr, er = mantissa16(k_range)
    if not 0 <= int(mult) < 1 << 16:
        raise FormatError(f"attention_logits: mult {int(mult)} outside 0..65535")
    mqc = shift_round(mq * int(mult), 16)
    s = int(shift) - eq.unsqueeze(-1) - er.unsqueeze(-2)
    if bool((s < -10).any()) or bool((s > REQ_SHIFT_MAX).any()):
        raise FormatError(f"attention_logits: scale exponent outside -10..{REQ_SHIFT_MAX}")
    return _sat(shift_round_signed(acc * mqc.unsqueeze(-1) * mr.unsqueeze(-2), s))


def softmax_exp(z: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    zmax = torch.where(visible, z, torch.iinfo(I64).min).amax(dim=-1, keepdim=True)
    d = torch.where(visible, zmax - z, 0)
    ip = d >> F.FX_FRAC_BITS
    step = F.FX_FRAC_BITS - F.EXP2_TABLE_BITS
    idx = ((d & ((1 << F.FX_FRAC_BITS) - 1)) + (1 << (step - 1))) >> step
    carry = idx == (1 << F.EXP2_TABLE_BITS)
    ip, idx = torch.where(carry, ip + 1, ip), torch.where(carry, 0, idx)
    return torch.where(visible, shift_round(_table("exp2", z.device)[idx], ip.clamp(max=REQ_SHIFT_MAX)), 0)


def pv_weights(e: torch.Tensor, v_range: torch.Tensor):
    """e (..., Tq, Tk), v_range (..., Tk) -> (pa, wmax, esum)."""
    w = e * v_range.unsqueeze(-2)
    wmax = w.amax(dim=-1)
    pa = torch.where(wmax.unsqueeze(-1) > 0, round_div(ACT_QMAX * w, wmax.clamp(min=1).unsqueeze(-1)), 0)
    return pa, wmax, e.sum(dim=-1)


def pv_output(acc: torch.Tensor, wmax: torch.Tensor, esum: torch.Tensor) -> torch.Tensor:
    mw, ew = mantissa16(wmax)
    me, eexp = mantissa16(ACT_QMAX * KV_QMAX * esum)
    rq = round_div(torch.full_like(me, 1 << F.RECIP_NUM_BITS), me)
    s = F.RECIP_NUM_BITS + eexp - ew
    return _sat(shift_round_signed(acc * (mw * rq).unsqueeze(-1), s.unsqueeze(-1)))


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    lo, hi = -F.SIGMOID_RANGE << F.FX_FRAC_BITS, F.SIGMOID_RANGE << F.FX_FRAC_BITS
    off = x.clamp(lo, hi - 1) - lo
    idx = off >> F.SIGMOID_STEP_SHIFT
    fr = off & ((1 << F.SIGMOID_STEP_SHIFT) - 1)
    tab = _table("sigmoid", x.device)
    t0, t1 = tab[idx], tab[idx + 1]
    s = t0 + shift_round((t1 - t0) * fr, F.SIGMOID_STEP_SHIFT)
    return torch.where(x < lo, 0, torch.where(x >= hi, 1 << F.SIGMOID_FRAC, s))


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    s = shift_round(g * sigmoid(g), F.SIGMOID_FRAC)
    return _sat(shift_round(s * u, F.FX_FRAC_BITS))


def embed_lookup(ids: torch.Tensor, codes: torch.Tensor, mult: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    if bool((ids < 0).any()) or bool((ids >= codes.shape[0]).any()):
        raise FormatError(f"token id outside the vocabulary 0..{codes.shape[0] - 1}")
    return _sat(shift_round(codes[ids] * mult[ids].unsqueeze(-1), shift[ids].unsqueeze(-1)))


# ---------------------------------------------------------------------------------------------------
# the decoder
# ---------------------------------------------------------------------------------------------------
class Cache:
    """One layer's Λ-shaped KV4 cache for one sequence (golden.Cache in torch): S + W slots, a ring
    buffer for the window; growing (doubling) under full attention."""

    def __init__(self, n_kv: int, head_dim: int, sinks: int, window: int | None, device=None):
        self.n_kv, self.head_dim, self.sinks, self.window = n_kv, head_dim, sinks, window
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self._alloc(sinks + window if window is not None else 16)

    def _alloc(self, n: int):
        dev = self.device
        self.k = torch.zeros(self.n_kv, n, self.head_dim, dtype=torch.uint8, device=dev)
        self.v = torch.zeros_like(self.k)
        self.kz, self.vz = (torch.zeros(self.n_kv, n, dtype=torch.uint8, device=dev) for _ in range(2))
        self.kr, self.vr = (torch.zeros(self.n_kv, n, dtype=I64, device=dev) for _ in range(2))
        self.pos = torch.full((n,), -1, dtype=I64, device=dev)

    def slot(self, t: int) -> int:
        if self.window is None:
            while t >= self.pos.numel():
                old = (self.k, self.v, self.kz, self.vz, self.kr, self.vr, self.pos)
                n = self.pos.numel()
                self._alloc(2 * n)
                self.k[:, :n], self.v[:, :n] = old[0], old[1]
                self.kz[:, :n], self.vz[:, :n], self.kr[:, :n], self.vr[:, :n] = old[2:6]
                self.pos[:n] = old[6]
            return t
        return int(G.R.cache_slot(t, self.sinks, self.window))

    def write(self, t: int, kc, kz, kr, vc, vz, vr):
        i = self.slot(t)
        self.k[:, i], self.kz[:, i], self.kr[:, i] = kc.to(torch.uint8), kz.to(torch.uint8), kr
        self.v[:, i], self.vz[:, i], self.vr[:, i] = vc.to(torch.uint8), vz.to(torch.uint8), vr
        self.pos[i] = t

    def contents(self):
        filled = torch.nonzero(self.pos >= 0).flatten()
        order = filled[torch.argsort(self.pos[filled], stable=True)]
        return (self.k[:, order].to(I64), self.kz[:, order].to(I64), self.kr[:, order], self.v[:, order].to(I64),
                self.vz[:, order].to(I64), self.vr[:, order], self.pos[order])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.kz, self.vz, self.kr, self.vr, self.pos))


class Decoder:
    """The integer decoder over a golden.Spec (golden.forward in torch). ``forward(ids, start, caches)``
    runs T tokens at positions start.. (a prompt, or one decode step) and returns Q15.16 logits."""

    #: under Λ attention, queries go through scores/softmax/P.V in blocks of this many, each over only the
    #: keys its queries can see (sinks + window span): the same integers, 5x less time for a 2048-token
    #: window at Λ 4 + 508. None or 0: one block (the whole (heads, T, Tk) at once). A trace always takes
    #: one block: it records the full score matrix.
    query_block: int | None = 64

    def __init__(self, spec: G.Spec, device=None):
        self.spec = spec.check()
        self.device = dev = torch.device("cpu") if device is None else torch.device(device)
        self.layers = [self.build_layer(l) for l in spec.layers]
        self.final_norm = (_t(spec.final_norm.g, dev), spec.final_norm.eps_term)
        self.lm_head = Linear(spec.lm_head, dev)
        self.embed = (_t(spec.embed_codes, dev), _t(spec.embed_mult, dev), _t(spec.embed_shift, dev))
        self.rope = (_t(spec.rope_theta, dev), _t(spec.rope_table, dev))
        if spec.window is not None and (spec.sinks + spec.window) * ACT_QMAX * KV_QMAX >= _F32_EXACT:
            raise FormatError("Λ cache too large for the exact float32 P.V products")

    def build_layer(self, l: G.Layer) -> dict:
        """One decoder layer's tensors (norms, the seven linears' integer weights) from its golden.Layer.
        ``layer(i, ..., lay=build_layer(...))`` runs a layer the decoder does not hold (a streamed
        evaluation builds each in turn, runs every window through it and drops it)."""
        dev = self.device
        return {"attn_norm": (_t(l.attn_norm.g, dev), l.attn_norm.eps_term),
                "mlp_norm": (_t(l.mlp_norm.g, dev), l.mlp_norm.eps_term),
                **{p: Linear(l.linears[p], dev) for p in G.ATTN_PROJ + G.MLP_PROJ}}

    def new_cache(self) -> Cache:
        s = self.spec
        return Cache(s.n_kv, s.head_dim, s.sinks, s.window, self.device)

    def new_caches(self) -> list[Cache]:
        return [self.new_cache() for _ in self.spec.layers]

    def attention(self, i: int, x: torch.Tensor, positions: torch.Tensor, cache: Cache, trace: dict | None,
                  lay: dict | None = None):
        s, lay = self.spec, self.layers[i] if lay is None else lay
        p = f"layer{i}.attn"
        d, nh, nkv = s.head_dim, s.n_heads, s.n_kv
        rep = nh // nkv
        t = x.shape[0]
        q = lay["q_proj"](x, trace, f"{p}.q_proj")
        k = lay["k_proj"](x, trace, f"{p}.k_proj")
        v = lay["v_proj"](x, trace, f"{p}.v_proj")
        cos, sin = rope_cos_sin(positions, *self.rope)
        qr = rope_rotate(q.view(t, nh, d).transpose(0, 1), cos, sin)  # (heads, T, D)
        kr = rope_rotate(k.view(t, nkv, d).transpose(0, 1), cos, sin)
        vh = v.view(t, nkv, d).transpose(0, 1)
        kc, kz, krng = quantize_kv(kr)
        vc, vz, vrng = quantize_kv(vh)
        ck, ckz, ckr, cv, cvz, cvr, cpos = cache.contents()
        keys, kzs, krs = torch.cat([ck, kc], 1), torch.cat([ckz, kz], 1), torch.cat([ckr, krng], 1)
        vals, vzs, vrs = torch.cat([cv, vc], 1), torch.cat([cvz, vz], 1), torch.cat([cvr, vrng], 1)
        kpos = torch.cat([cpos, positions])
        for j in range(t):
            cache.write(int(positions[j]), kc[:, j], kz[:, j], krng[:, j], vc[:, j], vz[:, j], vrng[:, j])
        n = positions[:, None]
        jp = kpos[None, :]
        visible = jp <= n
        lam = s.window is not None
        if lam:
            visible &= (jp < s.sinks) | (jp > n - s.window)
        qa, qamax = quantize_activations(qr)  # per (head, token): the last axis is the head's channels
        sinks_apart = lam and s.sinks > 0
        if sinks_apart:
            cs, ss = rope_cos_sin(positions.clamp(max=s.sinks + s.window - 1), *self.rope)
            qsa, qsamax = quantize_activations(rope_rotate(q.view(t, nh, d).transpose(0, 1), cs, ss))
        # GQA: query head h reads KV head h // rep
        idx = torch.arange(nh, device=x.device) // rep
        kk = keys[idx] - kzs[idx].unsqueeze(-1)  # (heads, Tk, D)
        vv, krh, vrh = vals[idx] - vzs[idx].unsqueeze(-1), krs[idx], vrs[idx]
        qs = (qsa, qsamax) if sinks_apart else None
        block = self.query_block
        if trace is None and lam and block and t > block:
            # banded: a block of queries reads only the keys some query in it sees (the sinks and the
            # window's span); every other key is invisible to the whole block, adds 0 to each sum and is
            # never a maximum, so the result is the same integers at a fraction of the (heads, T, Tk) work
            outs = []
            for a in range(0, t, block):
                b = min(t, a + block)
                cols = torch.nonzero((kpos < s.sinks) | ((kpos > int(positions[a]) - s.window)
                                                         & (kpos <= int(positions[b - 1])))).flatten()
                outs.append(self._attend(qa[:, a:b], qamax[:, a:b],
                                         None if qs is None else (qsa[:, a:b], qsamax[:, a:b]),
                                         kk[:, cols], krh[:, cols], vv[:, cols], vrh[:, cols], kpos[cols],
                                         visible[a:b][:, cols])[0])
            out = torch.cat(outs, 1)
        else:
            out, z, vis, pa = self._attend(qa, qamax, qs, kk, krh, vv, vrh, kpos, visible)
        o = out.transpose(0, 1).reshape(t, nh * d)
        if trace is not None:
            trace.update({f"{p}.q_rot": qr, f"{p}.k_rot": kr, f"{p}.k_codes": kc, f"{p}.k_zero": kz,
                          f"{p}.k_range": krng, f"{p}.v_codes": vc, f"{p}.v_zero": vz, f"{p}.v_range": vrng,
                          f"{p}.q_codes": qa, f"{p}.q_amax": qamax, f"{p}.logits": torch.where(vis, z, 0),
                          f"{p}.p_codes": pa, f"{p}.pv_out": o})
            if sinks_apart:
                trace[f"{p}.q_sink_codes"] = qsa
        return lay["o_proj"](o, trace, f"{p}.o_proj")

    def _attend(self, qa, qamax, qs, kk, krs, vv, vrs, kpos, visible):
        """Scores, softmax and P.V for queries (heads, Tq) over keys (heads, Tk): -> (out, logits, visible,
        p codes). ``qs``: the sinks' queries (codes, amax) or None."""
        s = self.spec
        acc_w = _matmul_exact(qa, kk.transpose(1, 2), ACT_QMAX * KV_QMAX)
        z = attention_logits(acc_w, qamax, krs, s.softmax_mult, s.softmax_shift)
        if qs is not None:
            acc_s = _matmul_exact(qs[0], kk.transpose(1, 2), ACT_QMAX * KV_QMAX)
            z_s = attention_logits(acc_s, qs[1], krs, s.softmax_mult, s.softmax_shift)
            z = torch.where((kpos < s.sinks)[None, None, :], z_s, z)
        vis = visible.unsqueeze(0).expand(qa.shape[0], -1, -1)
        e = softmax_exp(z, vis)
        pa, wmax, esum = pv_weights(e, vrs)
        acc_pv = _matmul_exact(pa, vv, ACT_QMAX * KV_QMAX)
        return pv_output(acc_pv, wmax, esum), z, vis, pa  # (heads, Tq, D), ...

    def layer(self, i: int, x, positions, cache: Cache, trace: dict | None, lay: dict | None = None):
        """Decoder layer i (its tensors ``lay``, by default the decoder's own layer i) on x (T, H)."""
        lay = self.layers[i] if lay is None else lay
        p = f"layer{i}"
        xn = rmsnorm(x, *lay["attn_norm"])
        h = _sat(x + self.attention(i, xn, positions, cache, trace, lay))
        hn = rmsnorm(h, *lay["mlp_norm"])
        gate = lay["gate_proj"](hn, trace, f"{p}.mlp.gate_proj")
        up = lay["up_proj"](hn, trace, f"{p}.mlp.up_proj")
        act = silu_mul(gate, up)
        out = _sat(h + lay["down_proj"](act, trace, f"{p}.mlp.down_proj"))
        if trace is not None:
            trace.update({f"{p}.attn_norm": xn, f"{p}.resid_attn": h, f"{p}.mlp_norm": hn,
                          f"{p}.mlp.silu_mul": act, f"{p}.out": out})
        return out

    @torch.no_grad()
    def forward(self, ids, start: int, caches: list[Cache], trace: dict | None = None) -> torch.Tensor:
        """ids (T,) at positions start..start+T-1 -> logits (T, V) int64 Q15.16."""
        x, positions = self.embed_tokens(ids, start, trace)
        for i in range(len(self.layers)):
            x = self.layer(i, x, positions, caches[i], trace)
        return self.head(x, trace)

    def embed_tokens(self, ids, start: int, trace: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (T,) at positions start.. -> (the embedded rows (T, H) Q15.16, the positions (T,))."""
        s = self.spec
        ids = torch.as_tensor(ids, dtype=I64, device=self.device).reshape(-1)
        positions = torch.arange(start, start + ids.numel(), dtype=I64, device=self.device)
        if s.window is None and s.max_positions is not None and ids.numel() and int(positions[-1]) >= s.max_positions:
            raise FormatError(f"position {int(positions[-1])} beyond the model's {s.max_positions} positions "
                              f"without Λ-attention: use a recipe with attention_window")
        x = embed_lookup(ids, *self.embed)
        if trace is not None:
            trace["embed"] = x
        return x, positions

    @torch.no_grad()
    def head(self, x: torch.Tensor, trace: dict | None = None) -> torch.Tensor:
        """The last layer's output (T, H) -> logits (T, V): final RMSNorm and the lm_head."""
        xn = rmsnorm(x, *self.final_norm)
        logits = self.lm_head(xn, trace, "lm_head")
        if trace is not None:
            trace.update({"final_norm": xn, "logits": logits, "next_token": torch.argmax(logits, dim=-1)})
        return logits


def to_float_logits(logits_fx: torch.Tensor) -> torch.Tensor:
    """Q15.16 logits as float64 (for the perplexity's cross-entropy, which is measurement, not hardware)."""
    return logits_fx.to(torch.float64) / (1 << F.FX_FRAC_BITS)


def generate_against_golden(model, prompt_ids: list[int], max_new_tokens: int) -> dict:
    """Greedy tokens from the torch integer path (through the model's cache, one step per token) and from
    the numpy golden model (prompt as a batch, then decode steps), for the same prompt:
    {"tokens_torch_integer", "tokens_golden", "equal", "first_difference"}."""
    from .evaluate import generate_ids

    why = model.integer_unready()
    if why:
        raise FormatError(f"cannot run the integer path: {why}")
    model.numerics.integer_path = True
    ours = generate_ids(model, list(prompt_ids), max_new_tokens)
    ref = G.generate(model.integer_spec(), list(prompt_ids), max_new_tokens)[: len(ours)]
    diff = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
    return {"tokens_torch_integer": ours, "tokens_golden": ref, "equal": ours == ref, "first_difference": diff}
