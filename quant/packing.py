"""Bit packing of codes and metadata: the byte layout the hardware reads from memory.

Fields of ``width`` bits are laid end to end, least significant bit first, along the last axis:
field j occupies bits [j*width, (j+1)*width) of the row's bit stream, and bit b of the stream is bit
b % 8 of byte b // 8. Each row starts on a byte boundary and is padded with zero bits to whole bytes.
2-bit weight codes (4 per byte), 4-bit KV codes (2 per byte) and 3-bit 2:4 pattern codes all use it.
"""

from __future__ import annotations

import numpy as np

from .formats import KV_CODE, SPARSE_META_BITS, W_CODE
from .reference import FormatError


def packed_bytes(n_fields: int, width: int) -> int:
    return (n_fields * width + 7) // 8


def pack_bits(values, width: int) -> np.ndarray:
    """Pack unsigned fields (..., n) of ``width`` bits into bytes (..., ceil(n*width/8)) uint8."""
    if not 1 <= width <= 8:
        raise FormatError(f"field width {width} must be 1..8 bits")
    v = np.asarray(values)
    if v.dtype.kind not in "iu":
        raise FormatError(f"pack_bits needs integers, got dtype {v.dtype}")
    v = v.astype(np.int64)
    if v.size and (v.min() < 0 or v.max() >= (1 << width)):
        bad = np.argwhere((v < 0) | (v >= (1 << width)))[0]
        raise FormatError(f"value {v[tuple(bad)]} at {tuple(bad)} does not fit {width} bits")
    n = v.shape[-1]
    bits = ((v[..., :, None] >> np.arange(width)) & 1).astype(np.uint8)  # (..., n, width)
    bits = bits.reshape(*v.shape[:-1], n * width)
    pad = packed_bytes(n, width) * 8 - n * width
    if pad:
        bits = np.concatenate([bits, np.zeros((*v.shape[:-1], pad), np.uint8)], axis=-1)
    return np.packbits(bits, axis=-1, bitorder="little")


def unpack_bits(packed, width: int, n: int) -> np.ndarray:
    """Inverse of pack_bits: (..., bytes) uint8 -> (..., n) uint8 fields."""
    if not 1 <= width <= 8:
        raise FormatError(f"field width {width} must be 1..8 bits")
    p = np.asarray(packed, dtype=np.uint8)
    if p.shape[-1] != packed_bytes(n, width):
        raise FormatError(
            f"{p.shape[-1]} bytes cannot hold exactly {n} fields of {width} bits "
            f"(expected {packed_bytes(n, width)})"
        )
    bits = np.unpackbits(p, axis=-1, bitorder="little")[..., : n * width]
    bits = bits.reshape(*p.shape[:-1], n, width).astype(np.uint8)
    return (bits << np.arange(width, dtype=np.uint8)).sum(axis=-1).astype(np.uint8)


def pack_w2(codes) -> np.ndarray:
    return pack_bits(codes, W_CODE.bits)


def unpack_w2(packed, n: int) -> np.ndarray:
    return unpack_bits(packed, W_CODE.bits, n)


def pack_kv4(codes) -> np.ndarray:
    return pack_bits(codes, KV_CODE.bits)


def unpack_kv4(packed, n: int) -> np.ndarray:
    return unpack_bits(packed, KV_CODE.bits, n)


def pack_sparse_meta(meta) -> np.ndarray:
    m = np.asarray(meta)
    if m.size and m.max() > 5:
        bad = np.argwhere(m > 5)[0]
        raise FormatError(f"2:4 metadata code {m[tuple(bad)]} at {tuple(bad)} is not one of 0..5")
    return pack_bits(m, SPARSE_META_BITS)


def unpack_sparse_meta(packed, n: int) -> np.ndarray:
    m = unpack_bits(packed, SPARSE_META_BITS, n)
    if m.size and m.max() > 5:
        raise FormatError("packed 2:4 metadata holds a code above 5: corrupt data")
    return m
