"""A quantized linear layer in the hardware's weight format, as the algorithms produce it.

w[n, i] = S_row[n] * (s_hat[n, g] * q[n, i] + m_hat[n, g]),  g = i // group_size,
and w = 0 where ``mask`` (2:4, kept = True) is False. ``quant.reference`` is the specification;
``dequantize`` calls it, so the float weights here are by construction the ones the hardware means.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import reference
from .formats import SPARSE_M, WEIGHT_BITS_SUPPORTED
from .reference import FormatError


def _np(x, dtype=None):
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    return a.astype(dtype) if dtype is not None else a


@dataclass
class QuantizedLinear:
    codes: np.ndarray  # (N, K) uint8, 0..2**bits-1; 0 at pruned positions
    scales: np.ndarray  # (N, K/G) s_hat, 0..255
    mins: np.ndarray  # (N, K/G) m_hat, -128..127
    row_scale: np.ndarray  # (N,) float64 holding float16-representable values
    group_size: int
    bits: int = 2
    mask: np.ndarray | None = None  # (N, K) bool, exactly 2 kept per 4 inputs; None = dense
    bias: np.ndarray | None = None  # (N,) float

    def __post_init__(self):
        # Accept numpy or torch; store numpy with the exact dtypes of the format. Values are not
        # silently cast out of range: integer inputs are range-checked by validate().
        for name in ("codes", "scales", "mins"):
            a = _np(getattr(self, name))
            if a.dtype.kind == "f":
                if not np.array_equal(a, np.rint(a)):
                    raise FormatError(f"QuantizedLinear.{name}: non-integer values")
                a = a.astype(np.int64)
            setattr(self, name, a)
        self.row_scale = _np(self.row_scale, np.float64)
        self.mask = _np(self.mask)
        if self.mask is not None:
            self.mask = self.mask.astype(bool)
        self.bias = _np(self.bias)
        self.validate()
        self.codes = self.codes.astype(np.uint8)
        self.scales = self.scales.astype(np.uint8)
        self.mins = self.mins.astype(np.int8)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def validate(self) -> "QuantizedLinear":
        """Raise FormatError naming the first problem: ranges, shapes, row scales, 2:4 pattern."""
        if self.bits not in WEIGHT_BITS_SUPPORTED:
            raise FormatError(f"weight bits {self.bits} not supported; the engine runs {WEIGHT_BITS_SUPPORTED}")
        # ranges and shapes of codes / scales / mins (and group_size dividing K) — the reference's check
        reference._check_weights(self.codes, self.scales, self.mins, self.group_size, self.bits)
        n, k = self.codes.shape
        rs = self.row_scale
        if rs.shape != (n,):
            raise FormatError(f"row_scale shape {rs.shape} must be (out,) = ({n},)")
        if not np.all(np.isfinite(rs)) or np.any(rs <= 0):
            raise FormatError("row_scale must be finite and > 0")
        if not np.array_equal(rs.astype(np.float16).astype(np.float64), rs):
            bad = int(np.argmax(rs.astype(np.float16).astype(np.float64) != rs))
            raise FormatError(f"row_scale[{bad}] = {rs[bad]!r} is not exactly representable in float16")
        if self.mask is not None:
            if self.mask.shape != (n, k):
                raise FormatError(f"mask {self.mask.shape} must match codes {(n, k)}")
            if self.group_size % SPARSE_M:
                raise FormatError(f"2:4 sparse layers need a group size that is a multiple of 4, got {self.group_size}")
            reference.check_24_mask(self.mask)
            if np.any(self.codes[~self.mask] != 0):
                raise FormatError("codes at pruned positions (mask False) must be 0")
        if self.bias is not None and self.bias.shape != (n,):
            raise FormatError(f"bias shape {self.bias.shape} must be (out,) = ({n},)")
        return self

    def dequantize_np(self) -> np.ndarray:
        """(N, K) float64: exactly ``reference.dequantize_weights``."""
        return reference.dequantize_weights(
            self.codes, self.scales, self.mins, self.row_scale, self.group_size, self.mask, self.bits
        )

    def dequantize(self) -> torch.Tensor:
        """(N, K) float32: the reference's float64 weights cast once."""
        return torch.from_numpy(self.dequantize_np()).to(torch.float32)

    def to_numpy(self) -> dict:
        """The fields as numpy arrays in their storage dtypes (codes uint8, scales uint8, mins int8,
        row_scale float16, mask bool or None, bias float32 or None) plus group_size and bits."""
        return {
            "codes": self.codes.astype(np.uint8),
            "scales": self.scales.astype(np.uint8),
            "mins": self.mins.astype(np.int8),
            "row_scale": self.row_scale.astype(np.float16),
            "mask": None if self.mask is None else self.mask.astype(bool),
            "bias": None if self.bias is None else self.bias.astype(np.float32),
            "group_size": int(self.group_size),
            "bits": int(self.bits),
        }

    def compressed_24(self) -> tuple[np.ndarray, np.ndarray]:
        """(kept codes (N, K/2), metadata (N, K/4)) for a 2:4 layer (``reference.compress_24``)."""
        if self.mask is None:
            raise FormatError("compressed_24: this layer is dense (mask is None)")
        return reference.compress_24(self.codes, self.mask, self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float simulation y = x Ŵᵀ + b with the dequantized weights (weights-only fake quant)."""
        w = self.dequantize().to(device=x.device, dtype=x.dtype)
        y = x @ w.T
        if self.bias is not None:
            y = y + torch.as_tensor(self.bias, dtype=x.dtype, device=x.device)
        return y

