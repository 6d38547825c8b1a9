"""A rotation of the residual stream folded offline into the float weights (QuaRot / SpinQuant's R1), and
optionally a head-wise rotation of V and O (their R2). The hardware sees ordinary weights: the artifact
format, the integer decoder and the RTL do not change.

With the residual stream h (a row vector of ``hidden`` values) replaced by h' = h·Q for an orthogonal Q,
every RMSNorm sees the same root mean square (‖h·Q‖ = ‖h‖), so RMSNorm(h')·Q^T = RMSNorm(h) before its
weight γ. γ does not commute with Q, so it is folded first into the linears that read the norm's output;
then, in torch's (out, in) layout:

    embedding              E   ← E·Q                    (the stream starts rotated)
    q/k/v, gate/up          W   ← (W·diag(γ))·Q          (γ: the norm before them; the norm's weight → 1)
    o_proj, down_proj       W   ← Q^T·W                  (they write to the stream)
    lm_head                 W   ← (W·diag(γ_final))·Q    (W = E for a tied model; the final norm → 1)

A tied model does not stay tied: E·Q and E·diag(γ_final)·Q differ unless γ_final is all ones, so the
rotated checkpoint has its own lm_head (``RotatedStore.lm_head`` always returns one and the artifact's
config says ``tie_word_embeddings: false``; the built-in recipes quantize that head at 4 bits anyway).

The head-wise V/O rotation (``vo``): the values of each KV head are rotated by an orthogonal H of size
head_dim (v' = v·H: the rows of v_proj's head block ← H^T·W), and each query head's block of o_proj's
inputs undoes it (columns ← W·H). Attention is linear in V, so every head's output o' = o·H and o_proj
sees o' · H^T = o. What it changes is what the per-token, per-head KV4 quantizer sees. It can run alone
(``residual: false``): then nothing else changes, and a tied model stays tied.

Q is a random Hadamard matrix (``kind: hadamard``: diag(±1)·H_n/√n, H_n by Sylvester's doubling from
Paley's construction for the orders q + 1, q a prime ≡ 3 mod 4: 576 = 8 · 72 for SmolLM2, 4096 = 2^12
for Llama-2-7B) or a random orthogonal matrix (``kind: orthogonal``: QR of a Gaussian matrix, signs fixed).
All products in float64, stored as float32.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from .errors import QuantError

EMBED_W = "model.embed_tokens.weight"
READS_INPUT_NORM = ("q_proj", "k_proj", "v_proj")
READS_POST_NORM = ("gate_proj", "up_proj")
WRITES_STREAM = ("o_proj", "down_proj")


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, int(p ** 0.5) + 1))


def _paley(n: int) -> np.ndarray:
    """Paley's construction I: a Hadamard matrix of order n = q + 1, q a prime ≡ 3 (mod 4)."""
    q = n - 1
    residues = {(x * x) % q for x in range(1, q)}
    chi = np.array([0] + [1 if a in residues else -1 for a in range(1, q)])
    c = np.array([[chi[(j - i) % q] for j in range(q)] for i in range(q)])  # skew: c^T = -c
    s = np.zeros((n, n), dtype=np.int8)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, c
    return s + np.eye(n, dtype=np.int8)


@lru_cache(maxsize=None)
def _hadamard(n: int):
    if n == 1:
        return np.ones((1, 1), dtype=np.int8)
    if n % 2 == 0:
        h = _hadamard(n // 2)
        if h is not None:
            return np.block([[h, h], [h, -h]])
    for p in range(4, n + 1, 4):  # a Paley order times a smaller Hadamard matrix
        if n % p == 0 and _is_prime(p - 1) and (p - 1) % 4 == 3:
            h = _hadamard(n // p)
            if h is not None:
                return np.kron(_paley(p), h)
    return None


def hadamard(n: int) -> np.ndarray | None:
    """An n × n matrix of ±1 with H·H^T = n·I (int8), or None if these constructions have none of order n."""
    h = _hadamard(int(n))
    return None if h is None else h.copy()


def orthogonal(n: int, kind: str, seed: int) -> torch.Tensor:
    """A random orthogonal n × n matrix (float64), the same for the same (n, kind, seed)."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))  # on the CPU: the same matrix on any machine
    if kind == "hadamard":
        h = hadamard(n)
        if h is None:
            raise QuantError(f"rotate: no Hadamard matrix of order {n} from Sylvester's and Paley's constructions; "
                             f"use rotate: {{kind: orthogonal}}")
        signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.int64, device="cpu") * 2 - 1
        return signs.to(torch.float64)[:, None] * torch.from_numpy(h).to(torch.float64) / np.sqrt(n)
    if kind == "identity":  # the norms' fold alone, no rotation: a diagnostic (what the fold itself costs)
        return torch.eye(n, dtype=torch.float64, device="cpu")
    if kind == "orthogonal":
        q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64, device="cpu"))
        return q * torch.sign(torch.diagonal(r))[None, :]
    raise QuantError(f"rotate: unknown kind {kind!r}; choose hadamard, orthogonal or identity")


# -- the folds (module-level so that the planted-bug tests can replace one side) ---------------------------
def fold_in(w: torch.Tensor, gamma: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A linear reading a norm's output: (W·diag(γ))·Q."""
    return (w * gamma[None, :]) @ q


def fold_out(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A linear writing to the stream: Q^T·W."""
    return q.T @ w


def rotate_v(w: torch.Tensor, h: torch.Tensor, hd: int) -> torch.Tensor:
    """v_proj (n_kv·hd, in): each head's rows ← H^T·W_head."""
    return (h.T[None] @ w.reshape(-1, hd, w.shape[1])).reshape(w.shape)


def rotate_o(w: torch.Tensor, h: torch.Tensor, hd: int) -> torch.Tensor:
    """o_proj (out, heads·hd): each head's columns ← W_head·H."""
    return (w.reshape(w.shape[0], -1, hd) @ h[None]).reshape(w.shape)


class RotatedStore:
    """A WeightStore whose tensors are those of the rotated model (names, shapes and order unchanged; the
    norms' weights all ones; the lm_head always its own tensor). Rotated tensors are float32; the norms keep
    the source dtype (ones are exact in any)."""

    def __init__(self, store, cfg, q: torch.Tensor, h_vo: torch.Tensor | None = None):
        self.store, self.cfg, self.q, self.h_vo = store, cfg, q, h_vo
        heads = cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        self._head = None
        # the source's own head, decided before the rotated run's config is marked untied
        self._tied = bool(getattr(cfg, "tie_word_embeddings", False)) or "lm_head.weight" not in store

    @property
    def path(self):
        return self.store.path

    def keys(self):
        return list(dict.fromkeys(list(self.store.keys()) + (["lm_head.weight"] if self.q is not None else [])))

    def __contains__(self, name):
        return (name == "lm_head.weight" and self.q is not None) or name in self.store

    def source_hash(self) -> str:
        return self.store.source_hash()

    def _f64(self, name):
        return self.store.get(name).to(torch.float64)

    def get(self, name: str):
        if self.q is None:  # V/O only: the residual stream, the norms, the embedding and the head as they are
            if name.endswith(("v_proj.weight", "o_proj.weight")):
                f = rotate_v if name.endswith("v_proj.weight") else rotate_o
                return f(self._f64(name), self.h_vo, self.head_dim).to(torch.float32)
            return self.store.get(name)
        if name == "lm_head.weight":
            return self.lm_head()
        if name == EMBED_W:
            return (self._f64(name) @ self.q).to(torch.float32)
        if name == "model.norm.weight" or name.endswith("layernorm.weight"):
            t = self.store.get(name)
            return torch.ones_like(t)
        parts = name.split(".")  # model.layers.{i}.{self_attn|mlp}.{proj}.weight
        if len(parts) == 6 and parts[:2] == ["model", "layers"] and parts[5] == "weight":
            i, proj = parts[2], parts[4]
            w = self._f64(name)
            if proj in READS_INPUT_NORM or proj in READS_POST_NORM:
                norm = "input_layernorm" if proj in READS_INPUT_NORM else "post_attention_layernorm"
                w = fold_in(w, self._f64(f"model.layers.{i}.{norm}.weight"), self.q)
                if proj == "v_proj" and self.h_vo is not None:
                    w = rotate_v(w, self.h_vo, self.head_dim)
            elif proj in WRITES_STREAM:
                if proj == "o_proj" and self.h_vo is not None:
                    w = rotate_o(w, self.h_vo, self.head_dim)
                w = fold_out(w, self.q)
            else:
                raise QuantError(f"rotate: {name} is neither read from a norm nor written to the residual stream; "
                                 f"the rotation knows only the Llama linears")
            return w.to(torch.float32)
        return self.store.get(name)

    def lm_head(self):
        """The rotated head, untied: (W·diag(γ_final))·Q with W the head, or the embedding of a tied model
        (without the residual rotation: the source's head, None if tied)."""
        if self.q is None:
            return self.store.lm_head()
        if self._head is None:
            w = self._f64(EMBED_W if self._tied else "lm_head.weight")
            self._head = fold_in(w, self._f64("model.norm.weight"), self.q).to(torch.float32)
        return self._head


def rotated_store(store, cfg, kind: str, seed: int, vo: bool, residual: bool = True) -> RotatedStore:
    if not (residual or vo):
        raise QuantError("rotate: residual: false and vo: false rotate nothing; set one of them or drop rotate")
    q = orthogonal(cfg.hidden_size, kind, seed) if residual else None
    heads = cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return RotatedStore(store, cfg, q, orthogonal(hd, kind, seed + 1) if vo else None)


def check(cfg, kind: str, vo: bool, residual: bool = True) -> list[str]:
    """What stops the rotation on this model shape (empty: nothing)."""
    heads = cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    sizes = ([("hidden_size", cfg.hidden_size)] if residual else []) + ([("head_dim", hd)] if vo else [])
    if kind != "hadamard":
        return []
    return [f"no Hadamard matrix of order {n} ({what}) from Sylvester's and Paley's constructions; use "
            f"rotate: {{kind: orthogonal}}" for what, n in sizes if hadamard(n) is None]
