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
