"""Bit packing: exact round trips for every field width, layout, and corrupt input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quant import packing as P
from quant.reference import FormatError


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 8), st.integers(0, 3), st.integers(0, 70), st.integers(0, 2**32 - 1))
def test_pack_round_trip_any_width(width, rows, n, seed):
    rng = np.random.default_rng(seed)
    v = rng.integers(0, 1 << width, size=(rows, n))
    packed = P.pack_bits(v, width)
    assert packed.dtype == np.uint8 and packed.shape == (rows, P.packed_bytes(n, width))
    assert np.array_equal(P.unpack_bits(packed, width, n), v)


def test_layout_is_lsb_first():
    assert P.pack_w2([[1, 2, 3, 0, 3]]).tolist() == [[0b00111001, 0b00000011]]
    assert P.pack_kv4([[0xA, 0x5, 0xF]]).tolist() == [[0x5A, 0x0F]]
    assert P.pack_sparse_meta([[5, 1, 2]]).tolist() == [[0b10001101, 0b0]]  # 101 001 010 (LSB first)


def test_named_round_trips():
    rng = np.random.default_rng(0)
    w = rng.integers(0, 4, size=(3, 64))
    kv = rng.integers(0, 16, size=(5, 64))
    meta = rng.integers(0, 6, size=(3, 16))
    assert np.array_equal(P.unpack_w2(P.pack_w2(w), 64), w)
    assert np.array_equal(P.unpack_kv4(P.pack_kv4(kv), 64), kv)
    assert np.array_equal(P.unpack_sparse_meta(P.pack_sparse_meta(meta), 16), meta)
    assert P.pack_sparse_meta(meta).shape[1] == 6  # 16 groups x 3 bits = 48 bits


def test_bad_input():
    with pytest.raises(FormatError, match="does not fit 2 bits"):
        P.pack_w2([[4]])
    with pytest.raises(FormatError, match="not one of 0..5"):
        P.pack_sparse_meta([[6]])
    with pytest.raises(FormatError, match="corrupt"):
        P.unpack_sparse_meta(np.array([[0b111]], np.uint8), 1)
    with pytest.raises(FormatError, match="cannot hold"):
        P.unpack_bits(np.zeros((1, 3), np.uint8), 2, 4)
    with pytest.raises(FormatError, match="integers"):
        P.pack_bits(np.ones(3), 2)


def test_embedding_table_layout_and_round_trip():
    """The int8 embedding table: one signed byte per code, row-major (token row v at bytes v*H ..
    v*H+H-1), and one float16 row scale per token; unpacking gives back exactly what was packed."""
    from quant.artifact import EMBED, pack_embedding, unpack_embedding

    rng = np.random.default_rng(0)
    v, h = 7, 24
    codes = rng.integers(-128, 128, (v, h))
    codes[0, :3] = [-128, 127, -1]
    rs = (rng.random(v) + 2.0**-8).astype(np.float16).astype(np.float64)
    t, meta = pack_embedding(codes, rs)
    q, s = t[f"{EMBED}.qweight"], t[f"{EMBED}.row_scale"]
    assert q.dtype == np.int8 and q.shape == (v, h) and q.nbytes == v * h
    assert s.dtype == np.float16 and s.shape == (v,)
    assert q.tobytes()[:3] == bytes([0x80, 0x7F, 0xFF])  # two's complement, one byte per code
    assert q.tobytes()[3 * h: 4 * h] == codes[3].astype(np.int8).tobytes()
    assert meta == {"vocab": v, "hidden": h, "bits": 8}
    c2, s2 = unpack_embedding(t, meta)
    assert np.array_equal(c2, codes) and np.array_equal(s2, rs) and s2.dtype == np.float64


def test_embedding_table_bad_input():
    from quant.artifact import pack_embedding

    with pytest.raises(FormatError, match=r"embedding codes: value 128 at index \(1, 0\) is outside"):
        pack_embedding(np.array([[0], [128]], np.int16), np.ones(2) / 4)
    with pytest.raises(FormatError, match="row scale 0.1 at row 0 is not a float16 value"):
        pack_embedding(np.zeros((1, 2), np.int8), np.array([0.1]))
    with pytest.raises(FormatError, match="need"):
        pack_embedding(np.zeros((2, 2), np.int8), np.ones(3) / 4)
