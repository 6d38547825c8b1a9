"""The reconstruction stage (recipe modifier ``reconstruct``): block-wise output matching.

After GPTQ (or RTN, or joint SparseGPT) has quantized the seven linears of decoder layer i, their
integer fields become trainable through ``quant.algorithms.FakeQuantLinear``: group scales ŝ and
mins m̂ (integer units), the float16 row scales (as log S), and optionally the codes (a latent
continuous code, rounded). Every forward pass rounds them to the integer format with straight-through
gradients, so the weights the optimizer evaluates are always weights the hardware can hold, and
``to_quantized`` exports exactly those.

The objective: the quantized layer, fed the *quantized* model's input to layer i, should reproduce
the *float* model's output of layer i (its input being the float model's own activations). Matching
the float model's activations rather than the float layer's output on the quantized input lets each
layer correct part of the error accumulated upstream (as in OmniQuant's and EfficientQAT's block
stages). Loss (``Reconstruct.loss``): mean squared error over all tokens and channels, or
``token_relative``, each token's squared error relative to its target's squared norm (the next
RMSNorm divides by that norm, and a few residual channels hundreds of times larger than the rest would
otherwise decide the whole objective from layer 12 of SmolLM2 on). Adam, ``batch_samples`` calibration
sequences per step, each cut to its first ``seq_len`` tokens (exact: attention is causal, so a
prefix's outputs do not depend on what follows it; the cost per step falls with the square of it).
The training forward keeps activations and the KV cache in float, or with ``simulate_quant`` runs
them through A8 and KV4 simulated with straight-through rounding (``quant.model.fake_act`` /
``fake_kv``), so the tuning can also absorb the activation and cache quantization; attention is
causal (the training prefixes are no longer than the Λ cache).

Safety: the loss on a fixed probe batch is measured before and after; if tuning made it worse the
layer keeps its starting fields (``improved`` False in the returned statistics).
"""

from __future__ import annotations

import time

import torch

from .algorithms import FakeQuantLinear
from .model import ATTN, DecoderLayer, Numerics
from .qlinear import QuantizedLinear
from .recipe import Reconstruct

PROBE_SAMPLES = 4  # sequences on which the before / after loss is measured


def _set(layer: DecoderLayer, proj: str, module):
    parent = layer.self_attn if proj in ATTN else layer.mlp
    setattr(parent, proj, module)


def _objective(out: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean loss of a batch (B, T, H) against its targets (``Reconstruct.loss``)."""
    d = out - y
    if kind == "token_relative":
        return ((d * d).sum(-1) / (y * y).sum(-1).clamp(min=1e-12)).mean()
    return (d * d).mean()


@torch.no_grad()
def _loss(layer, x, y, rope, pos, kind: str = "mse", chunk: int = 4) -> float:
    tot, n = 0.0, 0
    for s in range(0, x.shape[0], chunk):
        xb = x[s: s + chunk]
        tot += float(_objective(layer(xb, rope, pos), y[s: s + chunk], kind)) * xb.shape[0]
        n += xb.shape[0]
    return tot / max(n, 1)


def reconstruct_layer(layer: DecoderLayer, qlin: dict[str, QuantizedLinear], x: torch.Tensor, y: torch.Tensor,
                      rope, cfg: Reconstruct, seed: int = 0,
                      deploy: Numerics | None = None) -> tuple[dict[str, QuantizedLinear], dict]:
    """Tune ``qlin`` (projection name -> QuantizedLinear) inside ``layer`` so that ``layer(x) ≈ y``.

    ``layer`` is the float decoder layer (its linears for the projections not in ``qlin`` stay as
    they are); x, y (N, L, H) float32. Returns the tuned fields and statistics (loss before/after,
    seconds). The layer's modules for ``qlin`` are left as FakeQuantLinear; the caller replaces them.
    ``deploy``: the deployment numerics, simulated in training when ``cfg.simulate_quant``."""
    t0 = time.time()
    nm_saved = layer.self_attn.nm
    sim = cfg.simulate_quant and deploy is not None and (deploy.a8 or deploy.kv4)
    # differentiable attention: float, or A8 / KV4 simulated with straight-through rounding
    layer.self_attn.nm = Numerics(a8=deploy.a8, kv4=deploy.kv4, simulate=True) if sim else Numerics()
    fq = {p: FakeQuantLinear(q, train_row_scale=cfg.row_scale_lr > 0, tune_codes=cfg.tune_codes,
                             a8=bool(sim and deploy.a8))
          for p, q in qlin.items()}
    fq = {p: m.to(x.device) for p, m in fq.items()}  # the trained fields live where the layer runs
    for p, m in fq.items():
        _set(layer, p, m)
    groups = [{"params": [p for m in fq.values() for p in (m.s, m.m)], "lr": cfg.lr}]
    if cfg.tune_codes:
        groups.append({"params": [m.u for m in fq.values()], "lr": cfg.lr})
    if cfg.row_scale_lr > 0:
        groups.append({"params": [m.log_row_scale for m in fq.values()], "lr": cfg.row_scale_lr})
    opt = torch.optim.Adam(groups)
    if 0 < cfg.seq_len < x.shape[1]:  # causal attention: a prefix's outputs depend on the prefix only
        x, y = x[:, : cfg.seq_len], y[:, : cfg.seq_len]
    pos = torch.arange(x.shape[1], device=x.device)
    probe = slice(0, min(PROBE_SAMPLES, x.shape[0]))
    before = _loss(layer, x[probe], y[probe], rope, pos, cfg.loss)
    g = torch.Generator(device="cpu").manual_seed(seed)  # the CPU's stream: the same batches on any device
    n = x.shape[0]
    b = min(cfg.batch_samples, n)
    with torch.enable_grad():
        for _ in range(cfg.steps):
            idx = torch.randperm(n, generator=g, device="cpu")[:b].to(x.device)
            opt.zero_grad(set_to_none=True)
            loss = _objective(layer(x[idx], rope, pos), y[idx], cfg.loss)
            loss.backward()
            opt.step()
    tuned = {p: m.to_quantized() for p, m in fq.items()}
    after = _loss(layer, x[probe], y[probe], rope, pos, cfg.loss)
    layer.self_attn.nm = nm_saved
    improved = after < before
    stats = {"loss_before": before, "loss_after": after, "improved": bool(improved),
             "seconds": round(time.time() - t0, 3)}
    return (tuned if improved else dict(qlin)), stats
