"""The integer reference model: what the hardware computes, defined in numpy and nothing else.

This module is the specification. The quantized PyTorch model's integer path, the Amaranth engine
and the cocotb runs on generated Verilog are each checked against it with ``np.array_equal``.
It is written for clarity first; ``docs/numerics.md`` gives the reasons behind every rule.

Conventions
-----------
* Integer arrays are returned as ``np.int64`` (codes as ``np.uint8``/``np.int8``); inputs of any
  integer dtype are accepted and range-checked.
* Shapes: activations ``(T, K)`` (T tokens, K inputs); weights ``(N, K)`` (N outputs); a
  matrix–vector product is the case ``T == 1``.
* Two rounding rules, each used in one place:
  ``round_div`` (half away from zero) for the quantizers' divisions, so that quantization is
  odd-symmetric; ``shift_round`` (half up, i.e. add half then arithmetic shift) for requantization,
  the cheapest exact rounding in hardware.
"""

from __future__ import annotations

import numpy as np

from . import formats as F
from .formats import (
    ACT,
    ACT_QMAX,
    AMAX,
    EMBED_CODE,
    FX,
    FX_FRAC_BITS,
    KV_CODE,
    KV_QMAX,
    KV_RANGE,
    KV_ZERO,
    REQ_MULT,
    REQ_SHIFT_MAX,
    SPARSE_M,
    SPARSE_N,
    SPARSE_PATTERNS,
    W_CODE,
    W_MIN,
    W_SCALE,
    WEIGHT_BITS_SUPPORTED,
    IntFormat,
)


class FormatError(ValueError):
    """An operand is outside its numeric format or has an impossible shape."""


def _int(x, fmt: IntFormat | None = None, name: str = "operand") -> np.ndarray:
    """An integer operand as int64, range-checked against ``fmt``. Values an int64 cannot hold (uint64
    at or above 2**63) are refused before the cast, which would wrap them to negatives."""
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        raise FormatError(f"{name}: expected an integer array, got dtype {a.dtype}")
    if a.dtype.kind == "u" and a.dtype.itemsize == 8 and a.size and a.max() > np.iinfo(np.int64).max:
        bad = np.argwhere(a > np.iinfo(np.int64).max)[0]
        raise FormatError(f"{name}: value {int(a[tuple(bad)])} at index {tuple(int(i) for i in bad)} does not fit "
                          f"int64 (>= 2**63); the reference's integers are at most 63 bits")
    a = a.astype(np.int64)
    if fmt is not None and a.size and (a.min() < fmt.min or a.max() > fmt.max):
        bad = np.argwhere((a < fmt.min) | (a > fmt.max))[0]
        raise FormatError(
            f"{name}: value {a[tuple(bad)]} at index {tuple(int(i) for i in bad)} is outside "
            f"{fmt.name} [{fmt.min}, {fmt.max}]"
        )
    return a


# ---------------------------------------------------------------------------------------------------
# Rounding primitives
# ---------------------------------------------------------------------------------------------------
def round_div(n, d) -> np.ndarray:
    """n / d rounded to the nearest integer, ties away from zero; d > 0. Exact for int64."""
    n = np.asarray(n, dtype=np.int64)
    d = np.asarray(d, dtype=np.int64)
    if np.any(d <= 0):
        raise FormatError("round_div: divisor must be positive")
    mag = (2 * np.abs(n) + d) // (2 * d)
    return np.where(n < 0, -mag, mag)


def shift_round(x, shift) -> np.ndarray:
    """x / 2**shift rounded to the nearest integer, ties toward +inf (add half, shift right)."""
    x = np.asarray(x, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    if np.any(shift < 0):
        raise FormatError("shift_round: shift must be >= 0")
    half = np.where(shift > 0, np.left_shift(np.int64(1), np.maximum(shift - 1, 0)), 0)
    return np.right_shift(x + half, shift)


def saturate(x, fmt: IntFormat) -> np.ndarray:
    return np.clip(np.asarray(x, dtype=np.int64), fmt.min, fmt.max)


# ---------------------------------------------------------------------------------------------------
# Fixed point (the boundary to the float / special-function domain)
# ---------------------------------------------------------------------------------------------------
def to_fx(x) -> np.ndarray:
    """Float to Q15.16: x * 2**16 rounded half to even (exact for float32/64), saturated to int32
    (so +-inf saturate to the int32 limits, a documented saturation). NaN has no fixed-point value
    and is refused: it would otherwise cast to -2**63."""
    f = np.asarray(x, dtype=np.float64)
    if np.isnan(f).any():
        bad = np.argwhere(np.isnan(f))[0] if f.ndim else ()
        raise FormatError(f"to_fx: NaN at index {tuple(int(i) for i in bad)}; a NaN reached the fixed-point "
                          f"boundary (the float computation before it diverged)")
    scaled = np.rint(f * (1 << FX_FRAC_BITS))
    return np.clip(scaled, FX.min, FX.max).astype(np.int64)


def from_fx(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64) / (1 << FX_FRAC_BITS)


# ---------------------------------------------------------------------------------------------------
# Activation quantizer: symmetric, per token, dynamic
# ---------------------------------------------------------------------------------------------------
def quantize_activations(x_fx) -> tuple[np.ndarray, np.ndarray]:
    """Quantize fixed-point activations (T, K) to int8 codes per token.

    amax_t = max_i |x_ti|;  a_ti = round_div(127 * x_ti, amax_t)  (0 where amax_t == 0).
    Returns (codes (T, K) int8 in [-127, 127], amax (T,) int64). The token's real scale is
    amax_t / 127 in Q15.16 units: x ~= a * amax / 127 / 2**16.
    """
    x = _int(x_fx, FX, "activations (Q15.16)")
    if x.ndim != 2:
        raise FormatError(f"activations must be 2-D (tokens, features), got shape {x.shape}")
    amax = np.abs(x).max(axis=1) if x.shape[1] else np.zeros(x.shape[0], np.int64)
    safe = np.where(amax == 0, 1, amax)[:, None]
    codes = np.where(amax[:, None] == 0, 0, round_div(ACT_QMAX * x, safe))
    return codes.astype(np.int8), amax.astype(np.int64)


def dequantize_activations(codes, amax) -> np.ndarray:
    a = _int(codes, ACT, "activation codes")
    return a * (np.asarray(amax, np.float64)[:, None] / ACT_QMAX) / (1 << FX_FRAC_BITS)


# ---------------------------------------------------------------------------------------------------
# KV quantizer: asymmetric uint4 per token (per head), integer zero-point
# ---------------------------------------------------------------------------------------------------
def quantize_kv(x_fx) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize one head's keys or values, (T, D) in Q15.16, to 4-bit codes as tokens enter the cache.

    lo, hi = min, max over the token's D channels, widened to include 0; r = hi - lo (the range).
    zero = round_div(-15 * lo, r) in [0, 15];  code = clamp(round_div(15 * x, r) + zero, 0, 15).
    Returns (codes (T, D) uint8, zero (T,) uint8, range (T,) int64); r == 0 gives codes = zero = 0.
    Dequantized: x ~= (code - zero) * r / 15 / 2**16.
    """
    x = _int(x_fx, FX, "kv (Q15.16)")
    if x.ndim != 2 or x.shape[1] == 0:
        raise FormatError(f"kv must be 2-D (tokens, head_dim) with head_dim > 0, got {x.shape}")
    lo = np.minimum(x.min(axis=1), 0)
    hi = np.maximum(x.max(axis=1), 0)
    r = hi - lo
    safe = np.where(r == 0, 1, r)
    zero = np.where(r == 0, 0, round_div(-KV_QMAX * lo, safe))
    codes = np.where(
        r[:, None] == 0, 0, np.clip(round_div(KV_QMAX * x, safe[:, None]) + zero[:, None], 0, KV_QMAX)
    )
    return codes.astype(np.uint8), zero.astype(np.uint8), r.astype(np.int64)


def dequantize_kv(codes, zero, rng) -> np.ndarray:
    c = _int(codes, KV_CODE, "kv codes")
    z = _int(zero, KV_ZERO, "kv zero-points")
    rng = _int(rng, KV_RANGE, "kv ranges")
    return (c - z[:, None]) * (np.asarray(rng, np.float64)[:, None] / KV_QMAX) / (1 << FX_FRAC_BITS)


# ---------------------------------------------------------------------------------------------------
# Weight format: w = S_row * (s_hat * q + m_hat), per group of G inputs
# ---------------------------------------------------------------------------------------------------
def _check_weights(codes, scales, mins, group_size: int, code_bits: int = 2):
    q = _int(codes, _code_format(code_bits), "weight codes")
    s = _int(scales, W_SCALE, "group scales")
    m = _int(mins, W_MIN, "group mins")
    if q.ndim != 2:
        raise FormatError(f"weight codes must be 2-D (out, in), got shape {q.shape}")
    n, k = q.shape
    if group_size <= 0 or k % group_size:
        raise FormatError(f"group size {group_size} does not divide the input dimension {k}")
    if s.shape != (n, k // group_size) or m.shape != s.shape:
        raise FormatError(
            f"scales {s.shape} and mins {m.shape} must both be (out, in/group) = {(n, k // group_size)}"
        )
    return q, s, m


def dequantize_weights(
    codes, scales, mins, row_scale, group_size: int, mask=None, code_bits: int = 2
) -> np.ndarray:
    """Float weights (N, K) the integer format stands for (pruned positions, where mask is False, are 0)."""
    q, s, m = _check_weights(codes, scales, mins, group_size, code_bits)
    w_int = np.repeat(s, group_size, axis=1) * q + np.repeat(m, group_size, axis=1)
    if mask is not None:
        w_int = np.where(np.asarray(mask, bool), w_int, 0)
    return w_int * np.asarray(row_scale, np.float64)[:, None]


def fit_weight_grid(lo, hi, code_bits: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Choose the two-level grid for ranges [lo, hi] of each group (arrays (N, G_count), float).

    Per group the ideal grid is lo + step * q, step = (hi - lo) / qmax. The row scale S is the
    smallest float16 such that every step fits 255 S and every lo fits [-128 S, 127 S]; then
    s_hat = round(step / S), m_hat = round(lo / S). An all-zero row gets S = 1 (and s_hat = m_hat = 0).
    Returns (row_scale (N,), s_hat, m_hat). Refused: non-finite bounds, and ranges that need a row
    scale above float16's largest value 65504 (steps beyond 255 * 65504, |lo| beyond 128 * 65504).
    """
    lo = np.asarray(lo, np.float64)
    hi = np.asarray(hi, np.float64)
    if lo.shape != hi.shape or lo.ndim != 2:
        raise FormatError(f"fit_weight_grid: lo {lo.shape} and hi {hi.shape} must both be (rows, groups)")
    for nm_, v in (("lo", lo), ("hi", hi)):
        if not np.all(np.isfinite(v)):
            bad = np.argwhere(~np.isfinite(v))[0]
            raise FormatError(f"fit_weight_grid: {nm_} = {v[tuple(bad)]} at (row, group) "
                              f"{tuple(int(i) for i in bad)} is not finite; the weights hold inf or NaN")
    qmax = (1 << code_bits) - 1
    step = np.maximum(hi - lo, 0.0) / qmax
    need = np.maximum(step / W_SCALE.max, np.maximum(-lo / -W_MIN.min, lo / W_MIN.max))
    row_scale = need.max(axis=1)
    f16_max = float(np.finfo(np.float16).max)
    if row_scale.size and row_scale.max() > f16_max:
        r = int(np.argmax(row_scale))
        raise FormatError(f"fit_weight_grid: row {r} needs a row scale of {row_scale[r]:.6g}, above float16's "
                          f"largest {f16_max:.0f} (its weights reach {max(abs(lo[r]).max(), abs(hi[r]).max()):.6g}); "
                          f"the weight format cannot hold them")
    row_scale = np.where(row_scale > 0, row_scale, 1.0).astype(np.float16).astype(np.float64)
    # float16 rounding may have shrunk S below what is needed: grow it by one ulp until it fits
    # (never past 65504: a need <= 65504 rounds to at most 65504, and its next float16 up is finite).
    while True:
        short = row_scale < need.max(axis=1)
        if not short.any():
            break
        up = np.nextafter(row_scale.astype(np.float16), np.float16(np.inf)).astype(np.float64)
        row_scale = np.where(short, up, row_scale)
    s_hat = np.clip(np.rint(step / row_scale[:, None]), W_SCALE.min, W_SCALE.max).astype(np.int64)
    m_hat = np.clip(np.rint(lo / row_scale[:, None]), W_MIN.min, W_MIN.max).astype(np.int64)
    return row_scale, s_hat, m_hat


def nearest_codes(w, row_scale, scales, mins, group_size: int, code_bits: int = 2) -> np.ndarray:
    """Round each weight to the nearest grid point of its group (ties to the lower code)."""
    w = np.asarray(w, np.float64)
    qmax = (1 << code_bits) - 1
    s = np.repeat(np.asarray(scales, np.float64), group_size, axis=1)
    m = np.repeat(np.asarray(mins, np.float64), group_size, axis=1)
    target = w / np.asarray(row_scale, np.float64)[:, None] - m
    safe = np.where(s == 0, 1.0, s)
    q = np.where(s == 0, 0, np.clip(np.ceil(target / safe - 0.5), 0, qmax))
    return q.astype(np.uint8)


def quantize_weights_rtn(w, group_size: int, code_bits: int = 2):
    """Round-to-nearest baseline: per group min/max range, then nearest codes.
    Returns (codes (N, K) uint8, s_hat, m_hat, row_scale)."""
    w = np.asarray(w, np.float64)
    n, k = w.shape
    if k % group_size:
        raise FormatError(f"group size {group_size} does not divide the input dimension {k}")
    g = w.reshape(n, k // group_size, group_size)
    row_scale, s_hat, m_hat = fit_weight_grid(g.min(axis=2), g.max(axis=2), code_bits)
    codes = nearest_codes(w, row_scale, s_hat, m_hat, group_size, code_bits)
    return codes, s_hat, m_hat, row_scale


# ---------------------------------------------------------------------------------------------------
# W×A8 linear layers (dense and 2:4 sparse); matrix–vector is T == 1
# ---------------------------------------------------------------------------------------------------
def w2a8_linear(a, codes, scales, mins, group_size: int, mask=None, code_bits: int = 2) -> np.ndarray:
    """acc[t, n] = sum_g ( s_hat[n,g] * sum_{i in g, kept} q[n,i] a[t,i]
                           + m_hat[n,g] * sum_{i in g, kept} a[t,i] ).

    ``mask`` (N, K) bool marks kept weights (None: dense). Returns int64 (T, N). The real output is
    acc * S_row[n] * amax_t / 127 / 2**16.
    """
    x = _int(a, ACT, "activations")
    q, s, m = _check_weights(codes, scales, mins, group_size, code_bits)
    n, k = q.shape
    if x.ndim != 2 or x.shape[1] != k:
        raise FormatError(f"activations {x.shape} do not match weights {q.shape}: need (T, {k})")
    keep = np.ones_like(q) if mask is None else np.asarray(mask, bool).astype(np.int64)
    if keep.shape != q.shape:
        raise FormatError(f"mask {keep.shape} must match weights {q.shape}")
    ng = k // group_size
    qk = (q * keep).reshape(n, ng, group_size)
    kept = keep.reshape(n, ng, group_size)
    xg = x.reshape(x.shape[0], ng, group_size)
    prod = np.einsum("tgi,ngi->tng", xg, qk)  # sum q*a per group
    asum = np.einsum("tgi,ngi->tng", xg, kept)  # sum a over kept inputs per group
    return (s[None] * prod + m[None] * asum).sum(axis=2)


def random_24_mask(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """A random valid 2:4 mask (n, k) bool: each group of four inputs keeps one of the six patterns,
    uniformly (for tests, self-checks and the engine's random cases)."""
    if k % SPARSE_M:
        raise FormatError(f"2:4 mask needs in_features divisible by {SPARSE_M}, got {k}")
    pats = np.array([[i in p for i in range(SPARSE_M)] for p in SPARSE_PATTERNS], bool)
    return pats[rng.integers(0, len(pats), (n, k // SPARSE_M))].reshape(n, k)


def check_24_mask(mask) -> np.ndarray:
    mk = np.asarray(mask, bool)
    if mk.ndim != 2 or mk.shape[1] % SPARSE_M:
        raise FormatError(f"2:4 mask must be (out, in) with in divisible by 4, got {mk.shape}")
    per = mk.reshape(mk.shape[0], -1, SPARSE_M).sum(axis=2)
    if np.any(per != SPARSE_N):
        r, g = np.argwhere(per != SPARSE_N)[0]
        raise FormatError(
            f"2:4 mask row {r}, inputs {4 * g}..{4 * g + 3} keep {per[r, g]} weights, not exactly 2"
        )
    return mk


def _code_format(code_bits: int | None) -> IntFormat:
    """The range of ``code_bits``-bit weight codes; None: the widest code the engine runs."""
    if code_bits is None:
        code_bits = max(WEIGHT_BITS_SUPPORTED)
    return W_CODE if code_bits == W_CODE.bits else IntFormat(f"{code_bits}-bit weight code", code_bits, False)


def compress_24(codes, mask, code_bits: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Dense codes + 2:4 mask -> (kept codes (N, K/2) uint8, metadata (N, K/4) uint8 pattern index).
    Codes must be ``code_bits``-bit weight codes (0..2**bits-1; None: up to the widest code width the
    engine runs, 4 bits) and match the mask's shape: nothing wraps through uint8."""
    mk = check_24_mask(mask)
    q = _int(codes, _code_format(code_bits), "codes")
    if q.shape != mk.shape:
        raise FormatError(f"compress_24: codes {q.shape} and mask {mk.shape} must have the same shape")
    n, k = q.shape
    groups = mk.reshape(n, k // SPARSE_M, SPARSE_M)
    meta = np.zeros((n, k // SPARSE_M), np.uint8)
    for idx, p in enumerate(SPARSE_PATTERNS):
        sel = np.zeros(SPARSE_M, bool)
        sel[list(p)] = True
        meta[np.all(groups == sel, axis=2)] = idx
    kept = q.reshape(n, k // SPARSE_M, SPARSE_M)[groups].reshape(n, k // 2)
    return kept.astype(np.uint8), meta


def expand_24(kept, meta, code_bits: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of compress_24: -> (dense codes (N, K) uint8 with 0 at pruned places, mask (N, K) bool).
    Kept codes must be ``code_bits``-bit weight codes (None: up to 4 bits, as in compress_24)."""
    kq = _int(kept, _code_format(code_bits), "kept codes")
    md = _int(meta, None, "2:4 metadata")
    if md.ndim != 2:
        raise FormatError(f"2:4 metadata must be 2-D (out, in/4), got shape {md.shape}")
    if md.size and (md.min() < 0 or md.max() >= len(SPARSE_PATTERNS)):
        bad = np.argwhere((md < 0) | (md >= len(SPARSE_PATTERNS)))[0]
        raise FormatError(f"2:4 metadata code {md[tuple(bad)]} at {tuple(bad)} is not one of 0..5")
    n, gcount = md.shape
    if kq.shape != (n, gcount * SPARSE_N):
        raise FormatError(f"kept codes {kq.shape} must be (out, in/2) = {(n, gcount * SPARSE_N)}")
    pat = np.array(SPARSE_PATTERNS, np.int64)[md]  # (N, G4, 2) positions within each four
    mask = np.zeros((n, gcount, SPARSE_M), bool)
    codes = np.zeros((n, gcount, SPARSE_M), np.int64)
    rows = np.arange(n)[:, None, None]
    grp = np.arange(gcount)[None, :, None]
    mask[rows, grp, pat] = True
    codes[rows, grp, pat] = kq.reshape(n, gcount, SPARSE_N)
    return codes.reshape(n, -1).astype(np.uint8), mask.reshape(n, -1)


def w2a8_sparse_linear(a, kept, meta, scales, mins, group_size: int) -> np.ndarray:
    """The 2:4-sparse linear, written directly on the compressed form (what the engine streams):
    in every four inputs, metadata selects two activations; each is multiplied by its kept code and
    also summed for the group-min term. Equal to w2a8_linear on the expanded codes and mask."""
    x = _int(a, ACT, "activations")
    kq = _int(kept, W_CODE, "kept weight codes")
    md = _int(meta, None, "2:4 metadata")
    n, g4 = md.shape
    k = g4 * SPARSE_M
    s = _int(scales, W_SCALE, "group scales")
    m = _int(mins, W_MIN, "group mins")
    if x.ndim != 2 or x.shape[1] != k:
        raise FormatError(f"activations {x.shape} do not match 2:4 metadata for {k} inputs")
    if group_size % SPARSE_M or k % group_size:
        raise FormatError(f"group size {group_size} must be a multiple of 4 dividing {k}")
    if kq.shape != (n, k // 2) or s.shape != (n, k // group_size) or m.shape != s.shape:
        raise FormatError("kept codes, scales or mins have the wrong shape for the metadata")
    if md.size and (md.min() < 0 or md.max() > 5):
        raise FormatError("2:4 metadata codes must be 0..5")
    pat = np.array(SPARSE_PATTERNS, np.int64)[md]  # (N, G4, 2)
    idx = (np.arange(g4)[None, :, None] * SPARSE_M + pat).reshape(n, k // 2)  # input index per kept
    sel = x[:, idx]  # (T, N, K/2): the selected activations
    per_group = group_size // 2  # kept weights per scale group
    qk = kq.reshape(n, k // group_size, per_group)
    selg = sel.reshape(x.shape[0], n, k // group_size, per_group)
    prod = (selg * qk[None]).sum(axis=3)
    asum = selg.sum(axis=3)
    return (s[None] * prod + m[None] * asum).sum(axis=2)


# ---------------------------------------------------------------------------------------------------
# Attention products against the KV4 cache
# ---------------------------------------------------------------------------------------------------
def qk_scores(q_a, k_codes, k_zero) -> np.ndarray:
    """scores[t, j] = sum_c q[t, c] * (k[j, c] - zero[j]).  (Tq, D) x (Tk, D) -> int64 (Tq, Tk).
    The real score is scores * (amax_q / 127) * (r_j / 15) / 2**32."""
    q = _int(q_a, ACT, "query codes")
    k = _int(k_codes, KV_CODE, "key codes")
    z = _int(k_zero, KV_ZERO, "key zero-points")
    if q.ndim != 2 or k.ndim != 2 or q.shape[1] != k.shape[1] or z.shape != (k.shape[0],):
        raise FormatError(f"Q {q.shape}, K {k.shape}, zero {z.shape}: need (Tq, D), (Tk, D), (Tk,)")
    return q @ (k - z[:, None]).T


def pv_product(p_a, v_codes, v_zero) -> np.ndarray:
    """out[t, c] = sum_j p[t, j] * (v[j, c] - zero[j]).  (Tq, Tk) x (Tk, D) -> int64 (Tq, D).
    p holds the attention weights with each value token's scale r_j / 15 folded in before
    they were quantized per query by ``quantize_activations``."""
    p = _int(p_a, ACT, "attention-weight codes")
    v = _int(v_codes, KV_CODE, "value codes")
    z = _int(v_zero, KV_ZERO, "value zero-points")
    if p.ndim != 2 or v.ndim != 2 or p.shape[1] != v.shape[0] or z.shape != (v.shape[0],):
        raise FormatError(f"P {p.shape}, V {v.shape}, zero {z.shape}: need (Tq, Tk), (Tk, D), (Tk,)")
    return p @ (v - z[:, None])


# ---------------------------------------------------------------------------------------------------
# Requantization between operations
# ---------------------------------------------------------------------------------------------------
def requantize(acc, mult, shift, out: IntFormat) -> np.ndarray:
    """out = saturate(shift_round(acc * mult, shift)).

    ``mult`` (uint16, 1..65535) and ``shift`` (0..62) broadcast against ``acc``: one per operation
    (scalars) or one per output row (arrays of shape (N,) against acc (T, N)). A multiplier of 0 is
    refused: it would silently zero the output (``multiplier_for`` never produces it)."""
    x = _int(acc, None, "accumulator")
    mu = _int(mult, REQ_MULT, "requant multiplier")
    sh = _int(shift, None, "requant shift")
    if mu.size and mu.min() == 0:
        raise FormatError("requant multiplier 0 would zero every output; use multiplier_for(scale)")
    if sh.size and (sh.min() < 0 or sh.max() > REQ_SHIFT_MAX):
        bad = sh.min() if sh.min() < 0 else sh.max()
        raise FormatError(f"requant shift {int(bad)} outside 0..{REQ_SHIFT_MAX}")
    if x.size and np.abs(x).max() >= (1 << 46):
        raise FormatError("accumulator beyond 2**46: acc * mult would overflow 63 bits")
    return saturate(shift_round(x * mu, sh), out)


def bit_length(x) -> np.ndarray:
    """Bit length of non-negative int64 values (0 -> 0), exactly, without a float logarithm."""
    v = _int(x, None, "bit_length operand")
    if v.size and v.min() < 0:
        raise FormatError("bit_length: negative operand")
    bits = np.zeros(v.shape, np.int64)
    for s in (32, 16, 8, 4, 2, 1):
        big = v >= (1 << s)
        bits += np.where(big, s, 0)
        v = np.where(big, v >> s, v)
    return np.where(np.asarray(x) > 0, bits + 1, 0).astype(np.int64)


def shift_round_signed(x, s) -> np.ndarray:
    """x * 2**-s: ``shift_round`` for s >= 0, an exact left shift for s < 0 (callers bound the result)."""
    x = np.asarray(x, np.int64)
    s = np.asarray(s, np.int64)
    return np.where(s >= 0, shift_round(x, np.maximum(s, 0)), np.left_shift(x, np.maximum(-s, 0)))


def mantissa16(x) -> tuple[np.ndarray, np.ndarray]:
    """A non-negative integer (< 2**62) as a 16-bit mantissa and an exponent, integer only:
    ``x ~= mult * 2**exp`` with ``mult`` in [2**15, 2**16), rounded half up (exact when x < 2**16;
    relative error <= 2**-16). 0 gives (0, 0)."""
    a = _int(x, None, "mantissa16 operand")
    if a.size and (a.min() < 0 or a.max() >= (1 << 62)):
        raise FormatError("mantissa16: operand outside 0..2**62-1")
    nz = a > 0
    exp = bit_length(a) - 16
    mult = np.where(exp > 0, shift_round(a, np.maximum(exp, 0)), np.left_shift(a, np.maximum(-exp, 0)))
    carry = mult == (1 << 16)  # rounding up to 2**16: renormalise
    mult = np.where(carry, 1 << 15, mult)
    exp = np.where(carry, exp + 1, exp)
    return np.where(nz, mult, 0).astype(np.int64), np.where(nz, exp, 0).astype(np.int64)


def token_multiplier(amax) -> tuple[np.ndarray, np.ndarray]:
    """A per-token integer scale (an activation ``amax``, 0..2**31, or a KV range, 0..2**32-1) as
    ``mantissa16``: (mult (T,) in [2**15, 2**16) or 0, exp (T,)), ``amax ~= mult * 2**exp``."""
    return mantissa16(_int(amax, AMAX, "amax"))


def rescale_linear(acc, row_mult, row_shift, tok_mult, tok_exp) -> np.ndarray:
    """A W×A8 linear's accumulators (T, N) to Q15.16 with a per-row and a per-token scale:

        y[t, n] = saturate_FX( shift_round(acc[t,n] * row_mult[n] * tok_mult[t], row_shift[n] - tok_exp[t]) )

    where (row_mult, row_shift) = ``linear_row_multipliers(row_scale)`` stands for S_row[n] / 127 and
    (tok_mult, tok_exp) = ``token_multiplier(amax)`` for the token's amax. |acc| < 2**31 and both
    multipliers < 2**16 keep the product below 2**63; the effective shift must lie in 0..62."""
    x = _int(acc, None, "accumulator")
    rm = _int(row_mult, REQ_MULT, "row multiplier")
    rs = _int(row_shift, None, "row shift")
    tm = _int(tok_mult, REQ_MULT, "token multiplier")
    te = _int(tok_exp, None, "token exponent")
    if x.ndim != 2 or rm.shape != (x.shape[1],) or rs.shape != rm.shape or tm.shape != (x.shape[0],) \
            or te.shape != tm.shape:
        raise FormatError(f"rescale_linear: acc {x.shape}, row {rm.shape}/{rs.shape}, token {tm.shape}/{te.shape}")
    if x.size and np.abs(x).max() >= (1 << 31):
        raise FormatError("rescale_linear: |accumulator| >= 2**31 (the engine's 32-bit accumulators)")
    sh = rs[None, :] - te[:, None]
    live = (tm[:, None] != 0) & np.ones_like(sh, bool)
    if np.any(live & ((sh < 0) | (sh > REQ_SHIFT_MAX))):
        t, n = np.argwhere(live & ((sh < 0) | (sh > REQ_SHIFT_MAX)))[0]
        raise FormatError(f"rescale_linear: shift {int(sh[t, n])} at token {t}, row {n} outside 0..{REQ_SHIFT_MAX} "
                          f"(row scale or activation range out of the format)")
    return saturate(shift_round(x * rm[None, :] * tm[:, None], np.clip(sh, 0, REQ_SHIFT_MAX)), FX)


def linear_row_multipliers(row_scale) -> tuple[np.ndarray, np.ndarray]:
    """(mult, shift) per output row for the real factor S_row[n] / 127 (``multiplier_for``, float64:
    computed once offline from the artifact's float16 row scales, identically by every consumer)."""
    return multipliers_for(np.asarray(row_scale, np.float64) / ACT_QMAX)


def multipliers_for(reals) -> tuple[np.ndarray, np.ndarray]:
    """``multiplier_for`` of every element: (mult, shift) int64 arrays of the input's shape."""
    r = np.asarray(reals, np.float64)
    pairs = [multiplier_for(float(x)) for x in r.reshape(-1)]
    return (np.array([p[0] for p in pairs], np.int64).reshape(r.shape),
            np.array([p[1] for p in pairs], np.int64).reshape(r.shape))


def multiplier_for(real: float) -> tuple[int, int]:
    """Represent a positive real scale as mult / 2**shift with mult a 16-bit integer in [2**15, 2**16)
    (full precision), computed in float64 (so torch and numpy agree bit for bit)."""
    if not (real > 0 and np.isfinite(real)):
        raise FormatError(f"requant scale must be positive and finite, got {real}")
    mant, exp = np.frexp(np.float64(real))  # real = mant * 2**exp, mant in [0.5, 1)
    mult = int(np.rint(mant * (1 << 16)))
    shift = 16 - int(exp)
    if mult == 1 << 16:
        mult, shift = 1 << 15, shift - 1
    if shift < 0:
        raise FormatError(f"requant scale {real} is too large (>= 2**16)")
    if shift > REQ_SHIFT_MAX:
        raise FormatError(f"requant scale {real} is too small (shift {shift} > {REQ_SHIFT_MAX})")
    return mult, shift


# ---------------------------------------------------------------------------------------------------
# Embedding table: int8 per row with a float16 row scale; lookup straight into Q15.16
# ---------------------------------------------------------------------------------------------------
EMBED_ZERO_ROW_SCALE = 2.0 ** -16  # the row scale of an all-zero row (float16-exact; multiplier 2**15 >> 15)

def quantize_embedding(w) -> tuple[np.ndarray, np.ndarray]:
    """Float table (V, H) -> (codes (V, H) int8 in -127..127, row_scale (V,) float16-representable
    float64). Per row: S = amax / 127 rounded up to float16 (so |w| / S <= 127), codes = rint(w / S);
    an all-zero row (padding or unused tokens) gets S = 2**-16, one Q15.16 unit per code, and codes 0
    (any S below 1 would do: it only has to give the lookup a valid multiplier). S must stay below 1
    (|w| < 127) so that the lookup's multiplier S * 2**16 fits 16 bits."""
    w = np.asarray(w, np.float64)
    if w.ndim != 2:
        raise FormatError(f"embedding table must be 2-D (vocab, hidden), got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        bad = np.argwhere(~np.isfinite(w))[0]
        raise FormatError(f"embedding table: non-finite value at {tuple(int(i) for i in bad)}")
    amax = np.abs(w).max(axis=1) if w.shape[1] else np.zeros(w.shape[0])
    s = (amax / ACT_QMAX).astype(np.float16).astype(np.float64)
    short = s * ACT_QMAX < amax
    s = np.where(short, np.nextafter(s.astype(np.float16), np.float16(np.inf)).astype(np.float64), s)
    s = np.where(amax > 0, s, EMBED_ZERO_ROW_SCALE)
    if np.any(s >= 1.0) and np.any(amax[s >= 1.0] > 0):
        r = int(np.argmax((s >= 1.0) & (amax > 0)))
        raise FormatError(f"embedding row {r}: |w| up to {amax[r]:.4g} needs a row scale >= 1, outside the "
                          f"lookup's 16-bit multiplier (rows must stay below 127 in magnitude)")
    codes = np.clip(np.rint(w / s[:, None]), -ACT_QMAX, ACT_QMAX).astype(np.int8)
    return codes, s


def dequantize_embedding(codes, row_scale) -> np.ndarray:
    """The float table (V, H) float64 the int8 table stands for: code * S_row (what the float route
    looks up). ``embed_lookup`` gives code * S_row * 2**16 rounded half up to Q15.16 (its multiplier
    is exact: a float16 mantissa has 11 bits, the multiplier 16)."""
    c = _int(codes, EMBED_CODE, "embedding codes")
    s = np.asarray(row_scale, np.float64)
    if c.ndim != 2 or s.shape != (c.shape[0],):
        raise FormatError(f"embedding codes {c.shape} and row scales {s.shape} must be (V, H) and (V,)")
    if s.size and not (np.all(np.isfinite(s)) and s.min() > 0):
        bad = int(np.argmax(~np.isfinite(s) | (s <= 0)))
        raise FormatError(f"embedding row scale {float(s[bad])} at row {bad} is not finite and > 0")
    return c * s[:, None]


def embedding_multipliers(row_scale) -> tuple[np.ndarray, np.ndarray]:
    """(mult, shift) per embedding row for the real factor S_row * 2**16 (codes -> Q15.16)."""
    return multipliers_for(np.asarray(row_scale, np.float64) * (1 << FX_FRAC_BITS))


def embed_lookup(ids, codes, mult, shift) -> np.ndarray:
    """Token ids (T,) -> hidden states (T, H) in Q15.16: shift_round(code * mult[id], shift[id])."""
    i = _int(ids, None, "token ids")
    c = _int(codes, EMBED_CODE, "embedding codes")
    if i.ndim != 1:
        raise FormatError(f"token ids must be 1-D, got shape {i.shape}")
    if i.size and (i.min() < 0 or i.max() >= c.shape[0]):
        bad = int(i[(i < 0) | (i >= c.shape[0])][0])
        raise FormatError(f"token id {bad} outside the vocabulary 0..{c.shape[0] - 1}")
    mu = _int(mult, REQ_MULT, "embedding multipliers")[i]
    sh = _int(shift, None, "embedding shifts")[i]
    return saturate(shift_round(c[i] * mu[:, None], sh[:, None]), FX)


# ---------------------------------------------------------------------------------------------------
# Λ-shaped attention: sink + window cache addressing and positions
# ---------------------------------------------------------------------------------------------------
def cache_slot(t, sinks: int, window: int) -> np.ndarray:
    """The cache slot token t is written to: sinks keep slots 0..S-1; the rest cycle through a ring of W."""
    t = np.asarray(t, np.int64)
    if sinks < 0 or window < 1:
        raise FormatError("need sinks >= 0 and window >= 1")
    return np.where(t < sinks, t, sinks + (t - sinks) % window)


def visible_tokens(n: int, sinks: int, window: int) -> np.ndarray:
    """Token indices a query at token n attends to: the sinks and the last W tokens up to n."""
    start = max(sinks, n - window + 1)
    return np.concatenate([np.arange(min(sinks, n + 1)), np.arange(start, n + 1)]).astype(np.int64)


def attention_distances(n: int, sinks: int, window: int) -> np.ndarray:
    """Relative position (query minus key) seen for each visible token (order of visible_tokens).

    Window keys are seen at their true distance (< W). A sink s is seen at distance
    min(n, S + W - 1) - s: exact while the context fits the cache, then frozen, so no distance ever
    exceeds S + W - 1. Keys are stored already rotated at their own position; the query is rotated
    twice, at n for the window and at min(n, S + W - 1) for the sinks.
    """
    vis = visible_tokens(n, sinks, window)
    qpos_sink = min(n, sinks + window - 1)
    return np.where(vis < sinks, qpos_sink - vis, n - vis).astype(np.int64)


def lambda_mask(t: int, sinks: int, window: int) -> np.ndarray:
    """(T, T) bool: entry [n, j] is True when the query at n sees key j."""
    n = np.arange(t)[:, None]
    j = np.arange(t)[None, :]
    return (j <= n) & ((j < sinks) | (j > n - window))


# ---------------------------------------------------------------------------------------------------
# The special functions between the products (docs/numerics.md, sections 11-16), integer only.
# Constants that come from the float checkpoint (gamma, RoPE frequencies, the softmax's 1/sqrt(D)) are
# turned into integers once, offline, by the ``*_params`` functions (float64, deterministic); every
# consumer (the torch integer path, the golden model, the RTL) reads those integers.
# ---------------------------------------------------------------------------------------------------
def residual_add(x, y) -> np.ndarray:
    """The residual stream is Q15.16 in an int32: x + y, saturated."""
    return saturate(_int(x, FX, "residual") + _int(y, FX, "residual update"), FX)


def rsqrt_table() -> np.ndarray:
    """2**15 / sqrt(m) at the middle of each interval [i/64, (i+1)/64) of m, for i = 64..255 (entries
    below 64 are unused zeros): a 192-entry table of 16-bit values."""
    i = np.arange(F.RSQRT_TABLE_HI, dtype=np.float64)
    t = np.rint((1 << F.RSQRT_FRAC) / np.sqrt((i + 0.5) / F.RSQRT_TABLE_LO))
    t[: F.RSQRT_TABLE_LO] = 0
    return t.astype(np.int64)


_RSQRT_TABLE = rsqrt_table()


def rsqrt(v) -> tuple[np.ndarray, np.ndarray]:
    """1 / sqrt(v) for integers 1 <= v < 2**63 as r * 2**-(15 + e): (r in (2**14, 2**15], e >= 0).

    v = m * 4**e with m in [1, 4) (e from the bit length); m as Q2.30 (truncated); y0 from the table at
    m's top 8 bits; one Newton step y1 = y0 * (3 - m * y0**2) / 2 in fixed point, rounded half up."""
    x = _int(v, None, "rsqrt operand")
    if x.size and x.min() < 1:
        raise FormatError("rsqrt: operand must be >= 1")
    e = (bit_length(x) - 1) // 2
    sh = 2 * e - F.RSQRT_MANT_FRAC
    mq = np.where(sh > 0, np.right_shift(x, np.maximum(sh, 0)), np.left_shift(x, np.maximum(-sh, 0)))
    y = _RSQRT_TABLE[mq >> F.RSQRT_INDEX_SHIFT]
    t = shift_round(mq * (y * y), 2 * F.RSQRT_FRAC)  # m * y**2 in Q2.30, ~2**30
    h = (3 << F.RSQRT_MANT_FRAC) - t
    r = np.minimum(shift_round(y * h, F.RSQRT_MANT_FRAC + 1), 1 << F.RSQRT_FRAC)
    return r.astype(np.int64), e.astype(np.int64)


def rmsnorm_params(gamma, eps: float, hidden: int | None = None) -> tuple[np.ndarray, int]:
    """Offline: (g, eps_term) with g = rint(gamma * sqrt(H) * 2**16) (Q15.16) and
    eps_term = rint(eps * H * 2**32), the eps of the mean square in the units of the sum of squares of
    Q15.16 values (2**-32)."""
    gm = np.asarray(gamma, np.float64).reshape(-1)
    h = gm.size if hidden is None else int(hidden)
    if h < 1 or h > F.RMS_MAX_HIDDEN:
        raise FormatError(f"rmsnorm: hidden size {h} outside 1..{F.RMS_MAX_HIDDEN} (the int64 sum of squares)")
    if not np.all(np.isfinite(gm)) or not (np.isfinite(eps) and 0 <= eps < 1):
        raise FormatError(f"rmsnorm: gamma must be finite and eps in [0, 1), got eps {eps}")
    g = np.rint(gm * np.sqrt(h) * (1 << FX_FRAC_BITS))
    if g.size and np.abs(g).max() > F.GAMMA.max:
        i = int(np.argmax(np.abs(g)))
        raise FormatError(f"rmsnorm: gamma[{i}] * sqrt({h}) = {gm[i] * np.sqrt(h):.4g} does not fit Q15.16")
    return g.astype(np.int64), int(np.rint(eps * h * float(1 << (2 * FX_FRAC_BITS))))


def rmsnorm(x_fx, g, eps_term: int) -> np.ndarray:
    """y = x / sqrt(mean(x**2) + eps) * gamma in Q15.16, per row:

        k  = max(bit_length(max |x|) - 23, -((62 - bit_length(eps_term)) // 2))   (may be negative)
        x' = x * 2**-k  (shift_round for k > 0, exact left shift for k < 0)     (|x'| < 2**23)
        ss = sum_i x'_i**2 + eps_term * 2**-2k                                   (< 2**63 for H <= 2**16)
        r, e = rsqrt(ss)                                                         (1/sqrt(ss) ~= r * 2**-(15+e))
        y_i = saturate( shift_round( (x_i * r) * 2**-(15+k) * g_i, e ) )   (|x_i * r| < 2**46)

    (g carries sqrt(H) and 2**16: y = x * gamma * sqrt(H * 2**(32-2k) / ss) * 2**-16 ... see
    docs/numerics.md.) Normalising every row to about 23 significant bits keeps the relative error near
    2**-15 for rows of any magnitude; the bound on k stops eps_term * 2**-2k from passing 2**62 (rows so
    small are dominated by eps). A row with ss == 0 (all zero, eps_term 0) gives zeros."""
    x = _int(x_fx, FX, "rmsnorm input (Q15.16)")
    gg = _int(g, F.GAMMA, "rmsnorm weights")
    if x.ndim != 2 or gg.shape != (x.shape[1],):
        raise FormatError(f"rmsnorm: x {x.shape} and g {gg.shape} need (T, H) and (H,)")
    if x.shape[1] > F.RMS_MAX_HIDDEN:
        raise FormatError(f"rmsnorm: hidden size {x.shape[1]} beyond {F.RMS_MAX_HIDDEN}")
    eps_term = int(eps_term)
    if not 0 <= eps_term < (1 << 62):
        raise FormatError(f"rmsnorm: eps_term {eps_term} outside 0..2**62")
    kmin = -((62 - int(bit_length(eps_term))) // 2)
    k = np.maximum(bit_length(np.abs(x).max(axis=1)) - F.RMS_PRESHIFT_BITS, kmin)
    xs = shift_round_signed(x, k[:, None])
    ss = (xs * xs).sum(axis=1) + shift_round_signed(eps_term, 2 * k)
    r, e = rsqrt(np.maximum(ss, 1))
    u = shift_round_signed(x * r[:, None], (F.RSQRT_FRAC + k)[:, None])  # the unshifted x: no bits lost
    y = saturate(shift_round(u * gg[None, :], e[:, None]), FX)
    return np.where((ss > 0)[:, None], y, 0)


def rope_params(inv_freq, scaling: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Offline: (theta, table). theta_j = rint(inv_freq_j / 2pi * 2**32): radians per position as a
    32-bit fraction of a turn; table[i] = rint(scaling * sin(2pi i / 2**14) * 2**15), 2**14 entries."""
    f = np.asarray(inv_freq, np.float64).reshape(-1)
    if not np.all(np.isfinite(f)) or np.any(f < 0) or np.any(f >= 2 * np.pi):
        raise FormatError("rope: inverse frequencies must be finite and in [0, 2pi)")
    if not (np.isfinite(scaling) and 0 < scaling < 2):
        raise FormatError(f"rope: attention scaling {scaling} outside (0, 2): the Q1.15 table cannot hold it")
    theta = np.rint(f / (2 * np.pi) * float(1 << F.ROPE_PHASE_BITS)).astype(np.int64)
    n = 1 << F.ROPE_TABLE_BITS
    table = np.rint(scaling * np.sin(2 * np.pi * np.arange(n) / n) * (1 << F.ROPE_FRAC)).astype(np.int64)
    return theta, table


def rope_cos_sin(pos, theta, table) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (P, D/2) in Q1.15 for positions (P,): phase = n * theta mod 2**32, nearest table entry."""
    p = _int(pos, None, "positions")
    if p.size and (p.min() < 0 or p.max() > F.ROPE_MAX_POSITION):
        raise FormatError(f"rope: position outside 0..{F.ROPE_MAX_POSITION}")
    th = _int(theta, None, "rope theta")
    tb = F.ROPE_TABLE_BITS
    ph = (p.reshape(-1)[:, None] * th[None, :]) & ((1 << F.ROPE_PHASE_BITS) - 1)
    idx = ((ph + (1 << (F.ROPE_PHASE_BITS - tb - 1))) >> (F.ROPE_PHASE_BITS - tb)) & ((1 << tb) - 1)
    t = np.asarray(table, np.int64)
    return t[(idx + (1 << (tb - 2))) & ((1 << tb) - 1)], t[idx]


def rope_rotate(x_fx, cos, sin) -> np.ndarray:
    """Rotate (..., P, D) Q15.16 vectors, channel j with j + D/2 (the Hugging Face Llama convention):
    x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin, each shift_round(., 15) and saturated."""
    x = _int(x_fx, FX, "rope input (Q15.16)")
    half = x.shape[-1] // 2
    if x.shape[-1] % 2 or cos.shape != sin.shape or cos.shape[-1] != half or cos.shape[0] != x.shape[-2]:
        raise FormatError(f"rope: x {x.shape} against cos/sin {cos.shape}")
    x1, x2 = x[..., :half], x[..., half:]
    y1 = shift_round(x1 * cos - x2 * sin, F.ROPE_FRAC)
    y2 = shift_round(x2 * cos + x1 * sin, F.ROPE_FRAC)
    return saturate(np.concatenate([y1, y2], axis=-1), FX)


def softmax_params(head_dim: int) -> tuple[int, int]:
    """Offline: (mult, shift) of log2(e) / (127 * 15 * sqrt(D)): from a Q·K accumulator and the token
    scales to a base-2 logit."""
    if head_dim < 1:
        raise FormatError("softmax: head_dim must be >= 1")
    return multiplier_for(float(np.log2(np.e)) / (ACT_QMAX * KV_QMAX * np.sqrt(head_dim)))


def attention_logits(acc, q_amax, k_range, mult: int, shift: int) -> np.ndarray:
    """Base-2 logits z (Tq, Tk) in Q15.16 of the scores acc * amax_q/127 * r_j/15 * 2**-32 / sqrt(D):

        mq, eq = mantissa16(amax_q);  mr, er = mantissa16(r_j);  mqc = shift_round(mq * mult, 16)
        z = saturate( (acc * mqc * mr) * 2**-(shift - eq - er) )     (|acc*mqc*mr| < 2**51)"""
    a = _int(acc, None, "Q.K accumulators")
    mq, eq = token_multiplier(q_amax)
    mr, er = token_multiplier(k_range)
    if a.ndim != 2 or mq.shape != (a.shape[0],) or mr.shape != (a.shape[1],):
        raise FormatError(f"attention_logits: acc {a.shape}, q_amax {mq.shape}, k_range {mr.shape}")
    if a.size and np.abs(a).max() >= (1 << 19):
        raise FormatError("attention_logits: |Q.K accumulator| >= 2**19 (head_dim beyond 128?)")
    if not REQ_MULT.min <= int(mult) <= REQ_MULT.max:
        raise FormatError(f"attention_logits: mult {int(mult)} outside the requant multiplier's "
                          f"{REQ_MULT.min}..{REQ_MULT.max} (softmax_params makes it; beyond, the int64 product wraps)")
    mqc = shift_round(mq * int(mult), 16)
    s = int(shift) - eq[:, None] - er[None, :]
    if np.any(s < -10) or np.any(s > REQ_SHIFT_MAX):
        bad = int(s.min()) if np.any(s < -10) else int(s.max())
        raise FormatError(f"attention_logits: scale exponent {bad} outside -10..{REQ_SHIFT_MAX} (shift {int(shift)} "
                          f"against the q_amax and k_range exponents; beyond 62 the int64 rounding wraps)")
    return saturate(shift_round_signed(a * mqc[:, None] * mr[None, :], s), F.SOFTMAX_Z)


def exp2_table() -> np.ndarray:
    """rint(2**(-i / 1024) * 2**16), i = 0..1023: Q0.16 values in (2**15, 2**16]."""
    n = 1 << F.EXP2_TABLE_BITS
    return np.rint(2.0 ** (-np.arange(n) / n) * (1 << F.EXP2_FRAC)).astype(np.int64)


_EXP2_TABLE = exp2_table()


def softmax_exp(z, visible=None) -> np.ndarray:
    """e_j = 2**(z_j - max z) in Q0.16 over the visible keys of each row (0 elsewhere):
    d = max - z; integer part d >> 16 shifts (half up), the fraction picks the nearest of 1024 table
    entries (a fraction rounding up to 1 carries into the integer part)."""
    zz = _int(z, F.SOFTMAX_Z, "logits")
    vis = np.ones(zz.shape, bool) if visible is None else np.asarray(visible, bool)
    if vis.shape != zz.shape:
        raise FormatError(f"softmax: visible {vis.shape} does not match logits {zz.shape}")
    if zz.ndim != 2 or (zz.shape[1] and not vis.any(axis=1).all()):
        raise FormatError("softmax: every row needs at least one visible key")
    zmax = np.where(vis, zz, np.iinfo(np.int64).min).max(axis=1)
    d = np.where(vis, zmax[:, None] - zz, 0)
    ip = d >> F.FX_FRAC_BITS
    step = F.FX_FRAC_BITS - F.EXP2_TABLE_BITS
    idx = ((d & ((1 << F.FX_FRAC_BITS) - 1)) + (1 << (step - 1))) >> step
    carry = idx == (1 << F.EXP2_TABLE_BITS)
    ip, idx = np.where(carry, ip + 1, ip), np.where(carry, 0, idx)
    e = shift_round(_EXP2_TABLE[idx], np.minimum(ip, REQ_SHIFT_MAX))
    return np.where(vis, e, 0).astype(np.int64)


def pv_weights(e, v_range) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The probability format P·V consumes, with each value token's scale r_j folded in:
    w_j = e_j * r_j; pa_j = round_div(127 * w_j, max_j w) (int8 codes 0..127; 0 when max w = 0).
    Returns (pa (Tq, Tk) int8, wmax (Tq,), esum (Tq,) = sum_j e_j)."""
    ee = _int(e, None, "exponentials")
    r = _int(v_range, AMAX, "value ranges")
    if ee.ndim != 2 or r.shape != (ee.shape[1],):
        raise FormatError(f"pv_weights: e {ee.shape}, v_range {r.shape}")
    if ee.size and (ee.min() < 0 or ee.max() > (1 << F.EXP2_FRAC)):
        raise FormatError("pv_weights: exponentials outside 0..2**16")
    w = ee * r[None, :]
    wmax = w.max(axis=1) if w.shape[1] else np.zeros(w.shape[0], np.int64)
    pa = np.where(wmax[:, None] > 0, round_div(ACT_QMAX * w, np.maximum(wmax, 1)[:, None]), 0)
    return pa.astype(np.int8), wmax.astype(np.int64), ee.sum(axis=1).astype(np.int64)


def pv_output(acc, wmax, esum) -> np.ndarray:
    """Attention output in Q15.16 from the P·V accumulators: o = acc * wmax / (127 * 15 * esum), as
    mw, ew = mantissa16(wmax); me, ee = mantissa16(1905 * esum); rq = round_div(2**31, me)
    o = saturate( shift_round(acc * mw * rq, 31 + ee - ew) )   (the reciprocal of the sum: one
    16-bit division per query row)."""
    a = _int(acc, None, "P.V accumulators")
    mw, ew = mantissa16(wmax)
    es = _int(esum, None, "softmax sums")
    if a.ndim != 2 or mw.shape != (a.shape[0],) or es.shape != mw.shape:
        raise FormatError(f"pv_output: acc {a.shape}, wmax {mw.shape}, esum {es.shape}")
    if es.size and es.min() < 1:
        raise FormatError("pv_output: a softmax sum is 0 (no visible key)")
    if a.size and np.abs(a).max() >= (1 << 24):
        raise FormatError("pv_output: |P.V accumulator| >= 2**24 (more than 8192 keys?)")
    me, eexp = mantissa16(ACT_QMAX * KV_QMAX * es)
    rq = round_div(1 << F.RECIP_NUM_BITS, me)
    s = F.RECIP_NUM_BITS + eexp - ew
    return saturate(shift_round_signed(a * (mw * rq)[:, None], s[:, None]), FX)


def sigmoid_table() -> np.ndarray:
    """rint(sigmoid(-16 + i / 128) * 2**16), i = 0..4096 (Q0.16)."""
    n = 2 * F.SIGMOID_RANGE << (F.FX_FRAC_BITS - F.SIGMOID_STEP_SHIFT)
    x = -F.SIGMOID_RANGE + np.arange(n + 1) / float(1 << (F.FX_FRAC_BITS - F.SIGMOID_STEP_SHIFT))
    return np.rint((1 << F.SIGMOID_FRAC) / (1 + np.exp(-x))).astype(np.int64)


_SIGMOID_TABLE = sigmoid_table()


def sigmoid(x_fx) -> np.ndarray:
    """sigmoid(x) in Q0.16 for Q15.16 x: table on [-16, 16) in steps of 2**-7 with linear interpolation
    on the 9 bits below (half up); 0 below -16, 2**16 from 16 on."""
    x = _int(x_fx, FX, "sigmoid input (Q15.16)")
    lo, hi = -F.SIGMOID_RANGE << F.FX_FRAC_BITS, F.SIGMOID_RANGE << F.FX_FRAC_BITS
    off = np.clip(x, lo, hi - 1) - lo
    idx = off >> F.SIGMOID_STEP_SHIFT
    fr = off & ((1 << F.SIGMOID_STEP_SHIFT) - 1)
    t0, t1 = _SIGMOID_TABLE[idx], _SIGMOID_TABLE[idx + 1]
    s = t0 + shift_round((t1 - t0) * fr, F.SIGMOID_STEP_SHIFT)
    return np.where(x < lo, 0, np.where(x >= hi, 1 << F.SIGMOID_FRAC, s)).astype(np.int64)


def silu_mul(gate_fx, up_fx) -> np.ndarray:
    """SwiGLU in Q15.16: s = shift_round(g * sigmoid(g), 16); h = saturate(shift_round(s * u, 16))."""
    g = _int(gate_fx, FX, "gate (Q15.16)")
    u = _int(up_fx, FX, "up (Q15.16)")
    if g.shape != u.shape:
        raise FormatError(f"silu_mul: gate {g.shape} and up {u.shape} differ")
    s = shift_round(g * sigmoid(g), F.SIGMOID_FRAC)
    return saturate(shift_round(s * u, FX_FRAC_BITS), FX)


def argmax_first(logits) -> np.ndarray:
    """Greedy next token over integer logits (..., V): the first index of the largest value."""
    return np.argmax(_int(logits, None, "logits"), axis=-1).astype(np.int64)
