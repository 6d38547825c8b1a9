"""The numeric formats of accllm, defined once.

Every integer that flows between the compressed model and the hardware has its range here.
``docs/numerics.md`` explains each choice; ``quant.reference`` defines the operations on them.
Nothing in this module depends on the shape of the hardware array.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations


@dataclass(frozen=True)
class IntFormat:
    """A two's-complement (signed) or plain binary (unsigned) integer of ``bits`` bits."""

    name: str
    bits: int
    signed: bool

    @property
    def min(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def max(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    def contains(self, values) -> bool:
        import numpy as np

        v = np.asarray(values)
        return bool(v.size == 0 or (v.min() >= self.min and v.max() <= self.max))


# --- weights: w = S_row * (s_hat * q + m_hat), group-wise along the input dimension --------------
W_CODE = IntFormat("weight code", 2, signed=False)  # q in 0..3
W_SCALE = IntFormat("group scale s_hat", 8, signed=False)  # 0..255, in units of the row scale
W_MIN = IntFormat("group min m_hat", 8, signed=True)  # -128..127, in units of the row scale
WEIGHT_BITS_SUPPORTED = (2, 4)  # codes the engine multiplies (4-bit codes share the KV4 datapath)

# --- activations: symmetric per-token int8 ----------------------------------------------------------
ACT = IntFormat("activation", 8, signed=True)  # the engine accepts -128..127
ACT_QMAX = 127  # the quantizer emits -127..127 (symmetric)
#: a token's amax = max |x| of Q15.16 values: reaches 2**31 (|-2**31|), so 32 bits unsigned
AMAX = IntFormat("activation amax", 32, signed=False)

# --- embedding table: symmetric int8 per row (token id), float16 row scale ---------------------------
EMBED_CODE = IntFormat("embedding code", 8, signed=True)  # -127..127 produced
EMBED_BITS_SUPPORTED = (8,)  # the lookup's one format (``reference.embed_lookup``)
EMBED_ROW_SCALE_BITS = 16  # float16, one per token row

# --- KV cache: asymmetric per-token (per head) uint4 with an integer zero-point -------------------
KV_CODE = IntFormat("kv code", 4, signed=False)  # 0..15
KV_ZERO = IntFormat("kv zero-point", 4, signed=False)  # 0..15
KV_QMAX = 15
#: a token's range r = hi - lo with lo <= 0 <= hi, both Q15.16: reaches 2**31 - 1 + 2**31 = 2**32 - 1
KV_RANGE = IntFormat("kv range r", 32, signed=False)

# --- fixed point at the boundary to the special-function domain -----------------------------------
FX_FRAC_BITS = 16  # Q15.16 in an int32
FX = IntFormat("fixed point Q15.16", 32, signed=True)

# --- requantization multiplier ----------------------------------------------------------------------
REQ_MULT = IntFormat("requant multiplier", 16, signed=False)  # 1..65535
REQ_SHIFT_MAX = 62

# --- 2:4 structured sparsity --------------------------------------------------------------------------
SPARSE_N = 2  # kept
SPARSE_M = 4  # per group of four consecutive inputs
#: The six ways to keep two of four, indexed by the 3-bit metadata code (lexicographic order).
SPARSE_PATTERNS: tuple[tuple[int, int], ...] = tuple(combinations(range(SPARSE_M), SPARSE_N))
SPARSE_META_BITS = 3  # ceil(log2(6)); codes 6 and 7 are invalid

#: Bits of a row scale (stored as float16 in the artifact).
ROW_SCALE_BITS = 16


def weight_bits_per_weight(group_size: int, *, sparse: bool, code_bits: int = 2) -> float:
    """Stored bits per dense weight position (codes, 2:4 metadata and group scale+min), excluding the
    per-row scale which adds ``16 / in_features``."""
    scale_bits = (W_SCALE.bits + W_MIN.bits) / group_size
    if sparse:
        return (SPARSE_N * code_bits + SPARSE_META_BITS) / SPARSE_M + scale_bits
    return code_bits + scale_bits


def linear_acc_bound(k: int, code_bits: int = 2) -> int:
    """Largest |accumulator| a W×A8 linear over ``k`` inputs can reach, for any group size.

    Each input contributes (s_hat*q + m_hat) * a; the integer weight s_hat*q + m_hat lies in
    [-128, 255*qmax + 127] and |a| <= 128, so |acc| <= k * 128 * max(255*qmax + 127, 128).
    The bound is reached (a = -128, q = qmax, s_hat = 255, m_hat = 127), so it is tight."""
    qmax = (1 << code_bits) - 1
    w_max = max(W_SCALE.max * qmax + W_MIN.max, -W_MIN.min)
    return k * -ACT.min * w_max


def qk_acc_bound(head_dim: int) -> int:
    """Largest |Q·K^T| accumulator: per channel |a| * |code - zero| <= 128 * 15."""
    return head_dim * -ACT.min * KV_QMAX


def pv_acc_bound(n_keys: int) -> int:
    """Largest |P·V| accumulator: per key |p| * |code - zero| <= 128 * 15."""
    return n_keys * -ACT.min * KV_QMAX


def signed_bits_for(bound: int) -> int:
    """Width of a two's-complement register that holds every value in [-bound, bound]."""
    return int(bound).bit_length() + 1


# --- the special functions between the products (docs/numerics.md, sections 11-16) ------------------
#: RMSNorm: a row whose |x| reaches 2**23 (128.0) is shifted right (rounded) until it does not, so each
#: square is exact below 2**46 and the int64 sum holds H <= 2**16 of them
RMS_PRESHIFT_BITS = 23
RMS_MAX_HIDDEN = 1 << 16
#: reciprocal square root: r ~= 2**15 / sqrt(m), m in [1, 4) normalised from the sum of squares;
#: table of 2**15/sqrt(m) indexed by the top 8 bits of m (Q2.30 >> 24: 64..255) + one Newton step
RSQRT_FRAC = 15
RSQRT_MANT_FRAC = 30
RSQRT_INDEX_SHIFT = 24
RSQRT_TABLE_LO = 64
RSQRT_TABLE_HI = 256
#: the RMSNorm weight gamma * sqrt(H) in Q15.16 (int32)
GAMMA = IntFormat("rmsnorm gamma*sqrt(H), Q15.16", 32, signed=True)

#: RoPE: a position's phase n * theta_j in turns as a 32-bit fraction; sin table of 2**14 entries
#: per turn, values Q1.15 (|v| <= 2**15), nearest entry
ROPE_PHASE_BITS = 32
ROPE_TABLE_BITS = 14
ROPE_FRAC = 15
ROPE_MAX_POSITION = (1 << 31) - 1

#: softmax: base-2 logits z in Q15.16 (int32 after saturation); 2**-f for the fraction f from a table
#: of 2**10 entries (nearest), values Q0.16 in (2**15, 2**16]; exponentials e_j in Q0.16
SOFTMAX_Z = FX
EXP2_TABLE_BITS = 10
EXP2_FRAC = 16
#: reciprocal of the softmax sum: round(2**31 / m) for its 16-bit mantissa m
RECIP_NUM_BITS = 31

#: SiLU: sigmoid table on [-16, 16) in steps of 2**-7 (4096 intervals, 4097 entries, Q0.16), linear
#: interpolation on the 9 bits below; sigmoid = 0 below -16 and 1 from 16 on
SIGMOID_RANGE = 16
SIGMOID_STEP_SHIFT = 9
SIGMOID_FRAC = 16
