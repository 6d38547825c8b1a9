"""Per-linear-layer compression algorithms: RTN, GPTQ, clipping search, SparseGPT (2:4, optionally
joint with quantization) and Wanda, producing weights in the hardware's two-level format.

All functions are pure torch (float64 internally, CPU) on one layer's weight ``W`` (N out, K in) and,
where needed, the Hessian of its inputs ``H = 2 XᵀX / n`` (K, K) (see :func:`hessian`). They return a
:class:`quant.qlinear.QuantizedLinear` whose fields are exactly representable in the integer format::

    w[n, i] = S_row[n] * (s_hat[n, g] * q[n, i] + m_hat[n, g]),   g = i // group_size

Two-level grid. The row scale ``S_row`` (float16) is fixed first, from an initial pass over the layer
(each group's range, clipped by the search if enabled, through ``reference.fit_weight_grid``). Each
group's ``(s_hat, m_hat)`` is then chosen *with S fixed*, searching integer grids directly, so what is
evaluated is what the hardware will compute.

GPTQ with act-order is folded so the hardware still sees plain contiguous groups: columns are
processed by decreasing Hessian diagonal, but a group's grid belongs to its contiguous block of
ORIGINAL columns and is fitted when the first of them is reached, on the current (already
error-compensated) weights of the whole group (with the clipping search; without it, on the original
weights, which measured better — see ``_obs_pass``). Codes come back in the original column order.

Measured on SmolLM2-135M layer 3 (``benchmarks/layer_algorithms.py``, W2 g64, 64x256 calibration
tokens, relative output error on held-out tokens): q_proj RTN 0.366, RTN+clip 0.156, GPTQ 0.211,
GPTQ+clip 0.126; down_proj 0.439, 0.308, 0.380, 0.269.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import reference
from .formats import SPARSE_M, SPARSE_N, W_MIN, W_SCALE, WEIGHT_BITS_SUPPORTED
from .model import fake_act
from .qlinear import QuantizedLinear
from .recipe import Prune, QuantizeWeights
from .reference import FormatError

__all__ = [
    "hessian",
    "clip_candidates",
    "rtn",
    "gptq",
    "sparsegpt",
    "wanda",
    "magnitude_24",
    "quantize_linear",
    "output_error",
    "FakeQuantLinear",
    "reconstruct_linear",
    "PairMax",
    "key_smoothing_factors",
    "fold_key_smoothing",
]

F64 = torch.float64


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
def _tensor(x) -> torch.Tensor:
    """x as a tensor where it is (a tensor stays on its device; an array or list goes to the CPU, not to
    torch's default device)."""
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x, device="cpu")


def hessian(x: torch.Tensor) -> torch.Tensor:
    """H = 2 XᵀX / n for inputs X (..., K) flattened to (n, K); float64 (K, K)."""
    x = _tensor(x).reshape(-1, x.shape[-1]).to(F64)
    return 2.0 * (x.T @ x) / max(x.shape[0], 1)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor, relative: bool = True) -> float:
    """‖(W − Ŵ) Xᵀ‖_F, divided by ‖W Xᵀ‖_F when ``relative``."""
    w = _tensor(w).to(F64)
    d = (w - _tensor(w_hat).to(F64)) @ _tensor(x).to(F64).T
    num = torch.linalg.norm(d).item()
    if not relative:
        return num
    return num / max(torch.linalg.norm(w @ _tensor(x).to(F64).T).item(), 1e-300)


def _weight(W, name: str = "W") -> torch.Tensor:
    w = _tensor(W)
    if w.ndim != 2:
        raise ValueError(f"{name} must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError(f"{name} contains non-finite values")
    return w.detach().to(dtype=F64).clone()  # on W's device: every algorithm computes where W is


def _check_group(k: int, group_size: int, bits: int):
    if bits not in WEIGHT_BITS_SUPPORTED:
        raise FormatError(f"weight bits {bits} not supported; the engine runs {WEIGHT_BITS_SUPPORTED}")
    if group_size <= 0 or k % group_size:
        raise FormatError(f"group size {group_size} does not divide the input dimension {k}")


def _hessian(H, k: int, device=None) -> torch.Tensor:
    if H is None:
        raise ValueError("this method needs the input Hessian H = 2XᵀX/n (K, K); got None")
    h = _tensor(H)
    if tuple(h.shape) != (k, k):
        raise ValueError(f"Hessian shape {tuple(h.shape)} does not match the layer's {k} inputs: need ({k}, {k})")
    if not torch.isfinite(h).all():
        raise ValueError("Hessian contains non-finite values")
    return h.detach().to(device=h.device if device is None else device, dtype=F64).clone()


def _mask(mask, shape, n: int = SPARSE_N, m: int = SPARSE_M, device=None) -> torch.Tensor | None:
    if mask is None:
        return None
    mk = torch.as_tensor(np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask, bool), device="cpu")
    if tuple(mk.shape) != tuple(shape):
        raise FormatError(f"mask shape {tuple(mk.shape)} must match the weight {tuple(shape)}")
    if (n, m) == (SPARSE_N, SPARSE_M):
        reference.check_24_mask(mk.numpy())
    return mk if device is None else mk.to(device)


def _codes(w, S, s, m, bits: int) -> torch.Tensor:
    """Nearest code (ties to the lower code): the torch mirror of ``reference.nearest_codes``.
    w: weights; S, s, m broadcast against w (float64). Returns float64 integer-valued codes."""
    qmax = (1 << bits) - 1
    target = w / S - m
    zero = s == 0
    safe = torch.where(zero, torch.ones_like(s), s)
    q = torch.clamp(torch.ceil(target / safe - 0.5), 0, qmax)
    return torch.where(zero, torch.zeros_like(q), q)


def clip_candidates(steps: int = 14, max_frac: float = 0.42, max_total: float = 0.8) -> torch.Tensor:
    """(C, 2) shrink fractions (a, b): a group's range [lo, hi] becomes [lo + a r, hi − b r], r = hi − lo.
    Asymmetric grid of fractions 0, max_frac/(steps-1), ..., max_frac with a + b <= max_total; (0, 0) first."""
    f = torch.linspace(0.0, max_frac, steps, dtype=F64, device="cpu")
    a, b = torch.meshgrid(f, f, indexing="ij")
    ab = torch.stack([a.reshape(-1), b.reshape(-1)], 1)
    return ab[ab.sum(1) <= max_total + 1e-12]



def _group_ranges(wg: torch.Tensor, keep: torch.Tensor | None):
    """min / max over the (kept) weights of each group; groups with nothing kept get [0, 0]."""
    if keep is None:
        return wg.amin(-1), wg.amax(-1)
    inf = torch.tensor(math.inf, dtype=F64, device=wg.device)
    lo = torch.where(keep, wg, inf).amin(-1)
    hi = torch.where(keep, wg, -inf).amax(-1)
    empty = ~keep.any(-1)
    return torch.where(empty, 0.0, lo), torch.where(empty, 0.0, hi)


CLIP_COARSE_STEPS = 7  # coarse grid of shrink fractions per side: 0, 0.07, ..., 0.42
CLIP_MAX_FRAC = 0.42
CLIP_REFINE_ROUNDS = 2  # then halve the step around each group's best (a, b), this many times


def _search(wg, keep, wt, bits: int, S=None, clip: bool = True):
    """Choose each group's grid minimising sum_i wt_i (w_i − ŵ_i)² over its kept weights.

    wg (N, ng, G) weights; keep (N, ng, G) bool or None; wt broadcastable to wg (e.g. H diagonal as
    (1, ng, G)) or None. Without S (continuous grids) returns (lo, hi) (N, ng); with S (N,) returns
    the integer (s_hat, m_hat) (N, ng) int64 of the best integer grid under that row scale.

    Candidates shrink [lo, hi] to [lo + a r, hi − b r]: the unclipped range first (kept on ties), then
    with ``clip`` a coarse asymmetric grid of (a, b) and a local refinement around each group's best.
    """
    qmax = (1 << bits) - 1
    lo0, hi0 = _group_ranges(wg, keep)
    r = hi0 - lo0
    weight = wt
    if keep is not None:
        weight = keep.to(F64) if weight is None else weight * keep.to(F64)
    Sx = None if S is None else S.reshape(-1, 1)
    # candidates are scored in float32 (2x faster; only the choice depends on it), the chosen grid
    # is then computed in float64 below
    f32 = torch.float32
    wg32 = wg.to(f32)
    weight32 = None if weight is None else weight.to(f32)
    S32 = None if Sx is None else Sx.to(f32)
    lo032, hi032, r32 = lo0.to(f32), hi0.to(f32), r.to(f32)

    def evaluate(a, b):
        a = a.to(f32)
        b = b.to(f32)
        lo = lo032 + a * r32
        hi = hi032 - b * r32
        if S32 is None:
            step = (hi - lo) / qmax
            zero = step == 0
            q = torch.clamp(torch.round((wg32 - lo[..., None]) / torch.where(zero, 1.0, step)[..., None]), 0, qmax)
            w_hat = lo[..., None] + step[..., None] * q
        else:
            s, m = _int_grid(lo, hi, S32, qmax)
            q = _codes(wg32, S32[..., None], s[..., None], m[..., None], bits)
            w_hat = S32[..., None] * (s[..., None] * q + m[..., None])
        e = (wg32 - w_hat) ** 2
        return (e * weight32).sum(-1) if weight32 is not None else e.sum(-1)

    best_a = torch.zeros_like(r)
    best_b = torch.zeros_like(r)
    best_err = evaluate(best_a, best_b)

    def consider(a, b):
        nonlocal best_err, best_a, best_b
        err = evaluate(a, b)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_a = torch.where(better, a, best_a)
        best_b = torch.where(better, b, best_b)

    if clip:
        for a, b in clip_candidates(CLIP_COARSE_STEPS, CLIP_MAX_FRAC, 2 * CLIP_MAX_FRAC)[1:].tolist():
            consider(torch.full_like(r, a), torch.full_like(r, b))
        d = CLIP_MAX_FRAC / (CLIP_COARSE_STEPS - 1)
        for _ in range(CLIP_REFINE_ROUNDS):
            d = d / 2
            a0, b0 = best_a, best_b
            for da in (-d, 0.0, d):
                for db in (-d, 0.0, d):
                    if da or db:
                        a = torch.clamp(a0 + da, min=0.0)
                        b = torch.clamp(b0 + db, min=0.0)
                        consider(a, torch.minimum(b, 0.95 - a))
    lo = lo0 + best_a * r
    hi = hi0 - best_b * r
    if Sx is None:
        return lo, hi
    s, m = _int_grid(lo, hi, Sx, qmax)
    return s.to(torch.int64), m.to(torch.int64)


def _int_grid(lo, hi, Sx, qmax):
    """Integer (s_hat, m_hat) for continuous ranges [lo, hi] under row scale Sx, rounded as
    ``reference.fit_weight_grid`` rounds them (so the unclipped RTN equals the reference)."""
    s = torch.clamp(torch.round((hi - lo) / qmax / Sx), W_SCALE.min, W_SCALE.max)
    m = torch.clamp(torch.round(lo / Sx), W_MIN.min, W_MIN.max)
    return s, m


def _row_scale(wg, keep, wt, bits: int, clip: bool) -> torch.Tensor:
    """The row scale (N,) float64 (float16-valued), from the (clipped) ranges of every group."""
    if clip:
        lo, hi = _search(wg, keep, wt, bits, None, True)
    else:
        lo, hi = _group_ranges(wg, keep)
    S, _, _ = reference.fit_weight_grid(lo.cpu().numpy(), hi.cpu().numpy(), bits)
    return torch.from_numpy(S).to(lo.device)


def _finish(codes, s_hat, m_hat, S, cfg_group: int, bits: int, mask, bias) -> QuantizedLinear:
    codes = codes.to(torch.int64)
    if mask is not None:
        codes = torch.where(mask, codes, 0)
    return QuantizedLinear(
        codes=codes.cpu().numpy().astype(np.uint8),
        scales=s_hat.cpu().numpy().astype(np.int64),
        mins=m_hat.cpu().numpy().astype(np.int64),
        row_scale=S.cpu().numpy(),
        group_size=cfg_group,
        bits=bits,
        mask=None if mask is None else mask.cpu().numpy(),
        bias=None if bias is None else _tensor(bias).detach().cpu().to(torch.float32).numpy(),
    )


# ---------------------------------------------------------------------------------------------------
# RTN
# ---------------------------------------------------------------------------------------------------
def rtn(W, cfg: QuantizeWeights, mask=None, h_diag=None, bias=None) -> QuantizedLinear:
    """Round to nearest. Without ``cfg.clip_search`` the grid is each group's min/max range and the
    result equals ``reference.quantize_weights_rtn``. With it, each group's range is searched
    (weighted by ``h_diag`` (K,), e.g. the Hessian diagonal, when given). With a 2:4 ``mask`` the
    ranges cover kept weights only and pruned codes are 0."""
    w = _weight(W)
    n, k = w.shape
    G, bits = cfg.group_size, cfg.bits
    _check_group(k, G, bits)
    mk = _mask(mask, w.shape, device=w.device)
    ng = k // G
    wg = w.reshape(n, ng, G)
    keep = None if mk is None else mk.reshape(n, ng, G)
    wt = None
    if h_diag is not None:
        hd = _tensor(h_diag).detach().to(w.device, F64).reshape(-1)
        if hd.numel() != k:
            raise ValueError(f"h_diag has {hd.numel()} entries, the layer has {k} inputs")
        wt = hd.reshape(1, ng, G)
    S = _row_scale(wg, keep, wt, bits, cfg.clip_search)
    s_hat, m_hat = _search(wg, keep, wt, bits, S, cfg.clip_search)
    codes = _codes(
        w, S[:, None], s_hat.repeat_interleave(G, 1).to(F64), m_hat.repeat_interleave(G, 1).to(F64), bits
    )
    return _finish(codes, s_hat, m_hat, S, G, bits, mk, bias)


# ---------------------------------------------------------------------------------------------------
# GPTQ / SparseGPT: one optimal-brain-surgeon pass over the columns
# ---------------------------------------------------------------------------------------------------
def _inverse_cholesky(H: torch.Tensor, damp_percent: float) -> torch.Tensor:
    k = H.shape[0]
    damp = damp_percent * torch.mean(torch.diagonal(H))
    H = H + damp * torch.eye(k, dtype=F64, device=H.device)
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() != 0:
        raise ValueError(
            f"Hessian is not positive definite after dampening {damp_percent} x mean diagonal "
            f"(Cholesky failed at column {info.item()}); raise damp_percent or use more calibration data"
        )
    Hinv = torch.cholesky_inverse(L)
    U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    if info.item() != 0:
        raise ValueError("inverse Hessian is not positive definite; raise damp_percent")
    return U


def _obs_pass(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    bits: int | None,
    group_size: int,
    clip: bool,
    act_order: bool,
    damp_percent: float,
    block_size: int,
    mask: torch.Tensor | None,
    select_nm: tuple[int, int] | None,
    grid_from: str = "auto",
):
    """The shared GPTQ/SparseGPT loop. ``bits`` None: no quantization (pruning only).
    ``mask`` fixed kept-mask (pruned weights forced to 0, their error compensated on the others);
    ``select_nm`` (n, m): choose an n:m mask on the fly, SparseGPT's way (natural column order).
    ``grid_from``: where a group's grid is fitted — "current": on the group's current (error-
    compensated) weights when its first column is reached; "initial": on the layer's original weights;
    "auto": current with the clipping search, initial without it (measured better each way on
    SmolLM2-135M layer 3: unclipped grids on compensated weights widen with the accumulated updates).
    Returns (W_hat float64 (N, K), codes, s_hat, m_hat, S, mask) in original column order."""
    if grid_from == "auto":
        grid_from = "current" if clip else "initial"
    if grid_from not in ("current", "initial"):
        raise ValueError(f"grid_from must be 'auto', 'current' or 'initial', got {grid_from!r}")
    n, k = W.shape
    dev = W.device
    W = W.clone()
    H = H.clone()
    diag0 = torch.diagonal(H).clone()
    dead = diag0 == 0
    idx = torch.nonzero(dead).flatten()
    H[idx, idx] = 1.0
    W[:, dead] = 0.0
    if mask is not None:
        W[~mask] = 0.0
    G = group_size
    ng = k // G
    W0 = W.clone()

    S = None
    if bits is not None:
        wt0 = diag0.reshape(1, ng, G)
        S = _row_scale(W.reshape(n, ng, G), None if mask is None else mask.reshape(n, ng, G), wt0, bits, clip)
        s_all = torch.zeros(n, ng, dtype=torch.int64, device=dev)
        m_all = torch.zeros(n, ng, dtype=torch.int64, device=dev)
        ready = [False] * ng  # a Python list: a device tensor here would synchronize at every column

    if act_order and select_nm is None:
        perm = torch.argsort(diag0, descending=True, stable=True)
    else:
        perm = torch.arange(k, device=dev)
    invperm = torch.argsort(perm)
    W = W[:, perm]
    H = H[perm][:, perm]
    keepP = None if mask is None else mask[:, perm].clone()
    if select_nm is not None:
        keepP = torch.ones(n, k, dtype=torch.bool, device=dev)
        sn, sm = select_nm
        if block_size % sm or k % sm:
            raise ValueError(f"{sn}:{sm} pruning needs block_size ({block_size}) and in_features ({k}) divisible by {sm}")
    Hinv = _inverse_cholesky(H, damp_percent)
    hinv_diag = torch.diagonal(Hinv)
    Q = torch.zeros(n, k, dtype=F64, device=dev)  # codes, permuted order
    W_hat = torch.zeros(n, k, dtype=F64, device=dev)
    perm_l = perm.tolist()

    def select(vals, pos):  # SparseGPT score w² / [H⁻¹]_jj², keep the sn largest of each sm
        score = vals**2 / hinv_diag[pos][None, :] ** 2
        sc = score.reshape(n, -1, sm)
        top = torch.argsort(sc, dim=-1, descending=True, stable=True)[..., :sn]
        keep = torch.zeros_like(sc, dtype=torch.bool).scatter_(-1, top, True)
        return keep.reshape(n, -1)

    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        cnt = i2 - i1
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros(n, cnt, dtype=F64, device=dev)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(cnt):
            j = i1 + i
            col = perm_l[j]
            if select_nm is not None and j % sm == 0:
                keepP[:, j : j + sm] = select(W1[:, i : i + sm], torch.arange(j, j + sm, device=dev))
            if bits is not None:
                g = col // G
                if not ready[g]:
                    pos = invperm[g * G : (g + 1) * G]  # where the group's columns sit in processing order
                    if grid_from == "initial":
                        vals = W0[:, g * G : (g + 1) * G]
                    else:  # the whole group's current weights (none of its columns is processed yet)
                        inb = pos < i2
                        vals = torch.empty(n, G, dtype=F64, device=dev)
                        vals[:, inb] = W1[:, pos[inb] - i1]
                        if (~inb).any():  # later blocks: add the lazy update this block owes them so far
                            later = pos[~inb]
                            vals[:, ~inb] = W[:, later] - Err1[:, :i] @ Hinv[i1:j, later]
                    if select_nm is not None:
                        keep_g = select(vals, pos)  # provisional 2:4 choice: the grid covers the likely kept
                    else:
                        keep_g = None if keepP is None else keepP[:, pos]
                    s_g, m_g = _search(
                        vals.reshape(n, 1, G),
                        None if keep_g is None else keep_g.reshape(n, 1, G),
                        diag0[g * G : (g + 1) * G].reshape(1, 1, G),
                        bits,
                        S,
                        clip,
                    )
                    s_all[:, g] = s_g[:, 0]
                    m_all[:, g] = m_g[:, 0]
                    ready[g] = True
            w = W1[:, i]
            d = Hinv1[i, i]
            if bits is not None:
                s = s_all[:, g].to(F64)
                m = m_all[:, g].to(F64)
                q = _codes(w, S, s, m, bits)
                wq = S * (s * q + m)
            else:
                q = None
                wq = w.clone()
            if keepP is not None:
                kj = keepP[:, j]
                wq = torch.where(kj, wq, 0.0)
                if q is not None:
                    q = torch.where(kj, q, 0.0)
            if q is not None:
                Q[:, j] = q
            W_hat[:, j] = wq
            err = (w - wq) / d
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    W_hat = W_hat[:, invperm]
    out_mask = None if keepP is None else keepP[:, invperm]
    if bits is None:
        return W_hat, None, None, None, None, out_mask
    return W_hat, Q[:, invperm], s_all, m_all, S, out_mask


def gptq(W, H, cfg: QuantizeWeights, mask=None, bias=None, grid_from: str = "auto") -> QuantizedLinear:
    """GPTQ with the clipping search (``cfg.clip_search``), dampening, lazy block updates and act-order
    folded onto contiguous groups. With a fixed 2:4 ``mask`` (e.g. from :func:`wanda`) pruned weights
    stay 0 and their removal error is compensated on the kept ones."""
    w = _weight(W)
    n, k = w.shape
    _check_group(k, cfg.group_size, cfg.bits)
    h = _hessian(H, k, w.device)
    mk = _mask(mask, w.shape, device=w.device)
    _, Q, s_hat, m_hat, S, _ = _obs_pass(
        w, h, bits=cfg.bits, group_size=cfg.group_size, clip=cfg.clip_search, act_order=cfg.act_order,
        damp_percent=cfg.damp_percent, block_size=cfg.block_size, mask=mk, select_nm=None, grid_from=grid_from,
    )
    return _finish(Q, s_hat, m_hat, S, cfg.group_size, cfg.bits, mk, bias)


def sparsegpt(W, H, prune: Prune, qcfg: QuantizeWeights | None = None, bias=None):
    """SparseGPT n:m pruning (default 2:4) with the OBS update, columns in natural order, mask chosen
    per m columns by w² / [H⁻¹]_jj² on the updated weights. Returns (pruned float32 W, mask) or, with
    ``qcfg`` (joint mode: each kept weight is quantized in the same pass, on the grid of its contiguous
    group, fitted when the group is reached; act-order is not used), (QuantizedLinear, mask)."""
    w = _weight(W)
    n, k = w.shape
    if prune.m <= 0 or k % prune.m or not 0 < prune.n <= prune.m:
        raise FormatError(f"{prune.n}:{prune.m} pruning does not fit {k} inputs")
    h = _hessian(H, k, w.device)
    if qcfg is None:
        W_hat, _, _, _, _, mk = _obs_pass(
            w, h, bits=None, group_size=k, clip=False, act_order=False, damp_percent=prune.damp_percent,
            block_size=prune.block_size, mask=None, select_nm=(prune.n, prune.m),
        )
        return W_hat.to(torch.float32), mk
    if (prune.n, prune.m) != (SPARSE_N, SPARSE_M):
        raise FormatError(f"the quantized format stores 2:4 sparsity only, got {prune.n}:{prune.m}")
    _check_group(k, qcfg.group_size, qcfg.bits)
    if qcfg.group_size % SPARSE_M:
        raise FormatError(f"2:4 sparse layers need a group size that is a multiple of 4, got {qcfg.group_size}")
    _, Q, s_hat, m_hat, S, mk = _obs_pass(
        w, h, bits=qcfg.bits, group_size=qcfg.group_size, clip=qcfg.clip_search, act_order=False,
        damp_percent=prune.damp_percent, block_size=prune.block_size, mask=None,
        select_nm=(prune.n, prune.m),
    )
    return _finish(Q, s_hat, m_hat, S, qcfg.group_size, qcfg.bits, mk, bias), mk


# ---------------------------------------------------------------------------------------------------
# Wanda and magnitude masks
# ---------------------------------------------------------------------------------------------------
def _nm_mask(score: torch.Tensor, n_keep: int, m: int) -> torch.Tensor:
    N, K = score.shape
    if m <= 0 or K % m or not 0 < n_keep <= m:
        raise FormatError(f"{n_keep}:{m} pruning does not fit {K} inputs")
    sc = score.reshape(N, K // m, m)
    top = torch.argsort(sc, dim=-1, descending=True, stable=True)[..., :n_keep]
    return torch.zeros_like(sc, dtype=torch.bool).scatter_(-1, top, True).reshape(N, K)


def wanda(W, x_norm, prune: Prune) -> torch.Tensor:
    """Wanda mask: score |W_ij| · ‖X_j‖₂, keep the ``prune.n`` largest of every ``prune.m`` consecutive
    inputs of each row (ties: the earlier input). Returns (N, K) bool."""
    w = _weight(W)
    xn = _tensor(x_norm).detach().to(w.device, F64).reshape(-1)
    if xn.numel() != w.shape[1]:
        raise ValueError(f"x_norm has {xn.numel()} entries, the layer has {w.shape[1]} inputs")
    return _nm_mask(w.abs() * xn[None, :], prune.n, prune.m)


def magnitude_24(W, n: int = SPARSE_N, m: int = SPARSE_M) -> torch.Tensor:
    """The baseline mask: keep the n largest |W| of every m inputs."""
    return _nm_mask(_weight(W).abs(), n, m)


# ---------------------------------------------------------------------------------------------------
# static key smoothing (QuantizeKV.k_smoothing): per-channel key scales folded into q_proj / k_proj
# ---------------------------------------------------------------------------------------------------
class PairMax:
    """Forward hook on q_proj or k_proj: running max over tokens of every RoPE pair's norm, per head.

    RoPE rotates channel c with channel c + D/2 (``quant.model.rotate``), so the pair norm
    sqrt(x_c² + x_{c+D/2}²) is the same before and after the rotation at any position: the maxima
    taken on the projection's output are the maxima of the rotated keys and queries."""

    def __init__(self, heads: int, head_dim: int):
        if head_dim % 2:
            raise ValueError(f"head_dim {head_dim} is odd: RoPE needs channel pairs")
        self.heads, self.d = heads, head_dim
        self.max = torch.zeros(heads, head_dim // 2, dtype=torch.float64, device="cpu")

    def __call__(self, module, inputs, output):
        o = output.detach().reshape(-1, self.heads, self.d).to(torch.float64)
        h = self.d // 2
        pn = torch.sqrt(o[..., :h] ** 2 + o[..., h:] ** 2).amax(0)
        if self.max.device != pn.device:  # made on the CPU, kept where the calibration runs
            self.max = self.max.to(pn.device)
        torch.maximum(self.max, pn, out=self.max)


def key_smoothing_factors(q_max: torch.Tensor, k_max: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Per KV head and channel, the factor f that keys are divided by and queries multiplied by.

    q_max (n_heads, D/2), k_max (n_kv, D/2): pair-norm maxima (:class:`PairMax`). Query head h reads
    KV head h // (n_heads // n_kv) (``repeat_interleave``), so a KV head's factor meets the maximum of
    its query heads. f = k_max^α / q_max^(1−α) (SmoothQuant's migration with strength α): with α = 0.5
    every key channel's maximum becomes sqrt(k_max·q_max) and so does the matching query channel's,
    which flattens the per-token range the 4-bit key grid must cover while the 8-bit query (quantized
    per token and head) takes the spread. Channels never seen non-zero keep f = 1. Returns (n_kv, D),
    the pair's factor repeated on both of its channels so the fold commutes with RoPE."""
    n_heads, half = q_max.shape
    n_kv = k_max.shape[0]
    if n_heads % n_kv or k_max.shape[1] != half:
        raise ValueError(f"q_max {tuple(q_max.shape)} and k_max {tuple(k_max.shape)} do not match a GQA layout")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha {alpha} outside [0, 1]")
    qg = q_max.to(F64).reshape(n_kv, n_heads // n_kv, half).amax(1)
    km = k_max.to(F64)
    ok = (qg > 0) & (km > 0)
    f = torch.where(ok, km.clamp(min=1e-30) ** alpha / qg.clamp(min=1e-30) ** (1.0 - alpha), torch.ones_like(km))
    return torch.cat([f, f], dim=1)


def fold_key_smoothing(wq: torch.Tensor, wk: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(wq · f, wk / f) row-wise: k_proj's row (g, c) divided by f[g, c], q_proj's rows (h, c) for every
    query head h of group g multiplied by it. q·k per head is unchanged in exact arithmetic; the weight
    quantizers see scaled rows only (each row has its own scale, so the codes do not change; the
    float16 row scale may round differently)."""
    n_kv, d = f.shape
    n_heads = wq.shape[0] // d
    fq = f.repeat_interleave(n_heads // n_kv, dim=0).reshape(-1, 1)
    return ((wq.to(F64) * fq).to(wq.dtype), (wk.to(F64) / f.reshape(-1, 1)).to(wk.dtype))


# ---------------------------------------------------------------------------------------------------
# dispatcher
# ---------------------------------------------------------------------------------------------------
def quantize_linear(W, H, x_norm, qcfg: QuantizeWeights, prune: Prune | None = None, bias=None) -> QuantizedLinear:
    """What the pipeline calls per linear layer.

    * no prune: ``qcfg.method`` rtn (H optional: its diagonal weights the clipping search) or gptq.
    * prune sparsegpt: gptq -> joint SparseGPT (prune + quantize in one pass); rtn -> SparseGPT
      pruning, then RTN of the kept weights with the mask.
    * prune wanda: mask from |W|·‖X‖ (``x_norm``, or sqrt(diag H) when x_norm is None), then gptq with
      the fixed mask (pruned weights compensated) or rtn with the mask.
    """
    if qcfg is None:
        raise ValueError("quantize_linear needs a QuantizeWeights config; for pruning alone call sparsegpt() or wanda()")
    w = _weight(W)
    k = w.shape[1]
    if qcfg.method not in ("rtn", "gptq"):
        raise ValueError(f"unknown quantization method {qcfg.method!r}; known: rtn, gptq")
    h_diag = None if H is None else torch.diagonal(_hessian(H, k, w.device))
    if prune is None:
        if qcfg.method == "rtn":
            return rtn(w, qcfg, h_diag=h_diag, bias=bias)
        return gptq(w, H, qcfg, bias=bias)
    if prune.method == "sparsegpt":
        if qcfg.method == "gptq":
            return sparsegpt(w, H, prune, qcfg, bias=bias)[0]
        w_p, mk = sparsegpt(w, H, prune)
        return rtn(w_p, qcfg, mask=mk, h_diag=h_diag, bias=bias)
    if prune.method == "wanda":
        if x_norm is None:
            if h_diag is None:
                raise ValueError("wanda needs x_norm (K,) or the Hessian H")
            x_norm = torch.sqrt(torch.clamp(h_diag, min=0))
        mk = wanda(w, x_norm, prune)
        if qcfg.method == "gptq":
            return gptq(w, H, qcfg, mask=mk, bias=bias)
        return rtn(w, qcfg, mask=mk, h_diag=h_diag, bias=bias)
    raise ValueError(f"unknown pruning method {prune.method!r}; known: sparsegpt, wanda")


# ---------------------------------------------------------------------------------------------------
# reconstruction: differentiable fake-quant of a QuantizedLinear (for block-wise output matching)
# ---------------------------------------------------------------------------------------------------
def _ste_round(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (straight-through)."""
    return x + (torch.round(x) - x).detach()


def _ste_fp16(x: torch.Tensor) -> torch.Tensor:
    return x + (x.to(torch.float16).to(x.dtype) - x).detach()


class FakeQuantLinear(torch.nn.Module):
    """A QuantizedLinear whose group scales s_hat and mins m_hat (and optionally the row scales and
    the codes) are float parameters; the forward pass rounds them to the integer format with
    straight-through gradients, so ``weight()`` is always a weight the hardware can hold and
    :meth:`to_quantized` exports exactly that weight.

    Every parameter is in units where one optimizer step of ~lr moves it by a comparable amount:
    s and m in integer units, codes as a latent continuous code u (q = clamp(round(u))), and
    the row scale as log S (relative), rounded to float16 in the forward pass.

    * ``train_row_scale``: log row scales are parameters; else the row scales are fixed.
    * ``tune_codes``: the latent codes u (initialised at the codes) are parameters; else codes are fixed.
    * ``a8``: the input is put through ``quant.model.fake_act`` (A8 simulated, straight-through).
    """

    def __init__(self, ql: QuantizedLinear, train_row_scale: bool = False, tune_codes: bool = False,
                 dtype: torch.dtype = torch.float32, a8: bool = False):
        super().__init__()
        ql.validate()
        self.a8 = a8  # simulate the A8 input quantization (quant.model.fake_act) in the forward
        self.group_size = int(ql.group_size)
        self.bits = int(ql.bits)
        self.tune_codes = tune_codes
        self.train_row_scale = train_row_scale
        self.s = torch.nn.Parameter(torch.from_numpy(ql.scales.astype(np.float64)).to(dtype))
        self.m = torch.nn.Parameter(torch.from_numpy(ql.mins.astype(np.float64)).to(dtype))
        rs = torch.from_numpy(ql.row_scale.astype(np.float64)).to(dtype)
        if train_row_scale:
            self.log_row_scale = torch.nn.Parameter(torch.log(rs))
        else:
            self.register_buffer("row_scale", rs)
        codes = torch.from_numpy(ql.codes.astype(np.float64)).to(dtype)
        if tune_codes:
            self.u = torch.nn.Parameter(codes)
        else:
            self.register_buffer("codes", codes)
        mask = np.ones(ql.codes.shape, bool) if ql.mask is None else ql.mask
        self.register_buffer("mask", torch.from_numpy(mask.astype(np.float64)).to(dtype))
        self.has_mask = ql.mask is not None
        self.register_buffer("bias", None if ql.bias is None else torch.from_numpy(ql.bias.astype(np.float64)).to(dtype))

    def _fields(self):
        G, qmax = self.group_size, (1 << self.bits) - 1
        s = torch.clamp(_ste_round(self.s), W_SCALE.min, W_SCALE.max)
        m = torch.clamp(_ste_round(self.m), W_MIN.min, W_MIN.max)
        if self.train_row_scale:  # float16 normal range; exp keeps it positive
            S = _ste_fp16(torch.clamp(torch.exp(self.log_row_scale), min=2.0**-14, max=65504.0))
        else:
            S = self.row_scale
        s_full = s.repeat_interleave(G, 1)
        m_full = m.repeat_interleave(G, 1)
        q = torch.clamp(_ste_round(self.u), 0, qmax) * self.mask if self.tune_codes else self.codes
        return s, m, S, q, s_full, m_full

    def weight(self) -> torch.Tensor:
        s, m, S, q, s_full, m_full = self._fields()
        return S[:, None] * (s_full * q + m_full) * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.a8:
            x = fake_act(x)
        y = x @ self.weight().T
        return y if self.bias is None else y + self.bias

    @torch.no_grad()
    def to_quantized(self) -> QuantizedLinear:
        """The integer layer whose dequantized weights are :meth:`weight` (exactly, up to float32)."""
        s, m, S, q, _, _ = self._fields()
        return QuantizedLinear(
            codes=q.detach().cpu().to(torch.int64).numpy().astype(np.uint8),
            scales=s.detach().cpu().to(torch.int64).numpy(),
            mins=m.detach().cpu().to(torch.int64).numpy(),
            row_scale=S.detach().cpu().to(torch.float16).to(torch.float64).numpy(),
            group_size=self.group_size,
            bits=self.bits,
            mask=(self.mask.cpu().numpy() > 0) if self.has_mask else None,
            bias=None if self.bias is None else self.bias.cpu().to(torch.float32).numpy(),
        )


def reconstruct_linear(ql: QuantizedLinear, x: torch.Tensor, y: torch.Tensor, steps: int = 60, lr: float = 0.05,
                       tune_codes: bool = False, train_row_scale: bool = False) -> QuantizedLinear:
    """Tune one layer's s_hat / m_hat (and optionally codes, row scales) with Adam to match target
    outputs y ≈ x Ŵᵀ (+ b) in mean squared error; returns the better of the start and the result.
    ``lr`` is in units of the integer grid (Adam moves s and m by about lr per step; a move must add
    up to 0.5 to change an integer), so values like Reconstruct's 1e-3 change nothing in 60 steps.
    (The block-wise stage of the pipeline uses FakeQuantLinear directly inside a decoder layer.)"""
    fq = FakeQuantLinear(ql, train_row_scale=train_row_scale, tune_codes=tune_codes)
    x = _tensor(x).to(torch.float32)
    y = _tensor(y).to(torch.float32)
    opt = torch.optim.Adam([p for p in fq.parameters() if p.requires_grad], lr=lr)
    with torch.no_grad():
        start = torch.mean((fq(x) - y) ** 2).item()
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.mean((fq(x) - y) ** 2)
        loss.backward()
        opt.step()
    out = fq.to_quantized()
    with torch.no_grad():
        end = torch.mean((x @ out.dequantize().T + (0 if out.bias is None else torch.from_numpy(out.bias)) - y) ** 2).item()
    return out if end < start else ql
