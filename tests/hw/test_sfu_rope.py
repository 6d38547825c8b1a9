"""ROPE unit: equals reference.rope_cos_sin (standard table) + rope_rotate per head on random and edge
operands (positions at 2**31 - 1 and the clamp at h, input rails, full-range theta), nothing written
outside the destination, cycle model exact."""

import numpy as np
import pytest

from hw.isa import Instr, Op
from hw.params import AccelParams
from hw.sfu.rope import Rope, cycles, sine_table
from quant import formats as F
from quant import reference as R
from sim.unit_sim import run_unit

SPAD = 1 << 13


def _theta(d, base=100000.0):
    inv_freq = 1.0 / base ** (np.arange(0, d, 2, dtype=np.float64) / d)
    return R.rope_params(inv_freq)[0]


def _rope(x, theta, i0, h, seed=0, spad_words=SPAD):
    """x (T, heads, D)."""
    t, heads, d = x.shape
    a, b = 1, 1 + x.size + 3
    dst = b + theta.size + 4
    assert dst + x.size + 2 <= spad_words
    sp = np.random.default_rng(seed).integers(-2**40, 2**40, spad_words)
    sp[a:a + x.size], sp[b:b + theta.size] = x.reshape(-1), theta
    ins = Instr(op=Op.ROPE, a=a, b=b, d=dst, m=t, k=heads, n=d, h=h, i0=i0)
    out, cyc = run_unit(Rope(AccelParams(spad_words=spad_words)), ins, sp)
    pos = np.minimum(i0 + np.arange(t), h)
    cos, sin = R.rope_cos_sin(pos, theta, R.rope_params(np.zeros(0), 1.0)[1])
    want = R.rope_rotate(x.transpose(1, 0, 2), cos, sin).transpose(1, 0, 2)
    got = out[dst:dst + x.size].reshape(x.shape)
    assert np.array_equal(got, want), np.argwhere(got != want)[:5]
    rest = np.ones(spad_words, bool)
    rest[dst:dst + x.size] = False
    assert np.array_equal(out[rest], sp[rest]), "a write outside the destination"
    assert cyc == cycles(ins), (cyc, cycles(ins))
    return got


def test_rom_is_the_reference_table():
    assert np.array_equal(sine_table(), R.rope_params(np.ones(3), 1.0)[1])
    assert sine_table().size == 1 << F.ROPE_TABLE_BITS


def test_rope_decoder_shape():
    """SmolLM2's queries: 9 heads of 64 channels, three tokens from position 4093."""
    rng = np.random.default_rng(1)
    x = (rng.normal(0, 3, (3, 9, 64)) * 65536).astype(np.int64)
    _rope(x, _theta(64), 4093, 2**31 - 1)


def test_rope_positions_at_the_top_and_the_clamp():
    rng = np.random.default_rng(2)
    theta = rng.integers(0, 2**32, 8)
    theta[:3] = [0, 2**32 - 1, 1 << 31]
    x = rng.integers(-2**31, 2**31, (4, 2, 16))
    top = 2**31 - 1
    _rope(x, theta, top - 2, top)            # 2**31 - 3, -2, -1, then clamped at 2**31 - 1
    _rope(x, theta, top, top)                # every token at the largest position
    _rope(x, theta, 1000, 1001)              # 1000, 1001, 1001, 1001
    _rope(x, theta, 5, 0)                    # everything clamped to position 0: cos 1, sin 0
    _rope(x, theta, 0, 2**32 - 1)            # h beyond every position


def test_rope_rails_saturate():
    """x at both Q15.16 rails rotated by 45 degrees overflows: both output rails reached."""
    x = np.array([[[2**31 - 1, -2**31, -2**31, 0, -2**31, 2**31 - 1, -2**31, 0]]])
    theta = np.array([1 << 29, 3 << 29, 1 << 29, 0])  # 1/8 and 3/8 turn per position
    got = _rope(x, theta, 1, 10)
    assert (got == F.FX.max).any() and (got == F.FX.min).any()


def test_rope_every_table_entry():
    """Phases covering every one of the 2**14 indices (and the cosine's wrap past the last)."""
    n = 1 << 14
    k = np.arange(n)
    # at position 1 the phase is theta: index k exactly, from just below its rounding point (k << 18)
    # - 2**17 (rounds up to k, mod 2**32 for k = 0), and at the last phase that still rounds to k
    theta = ((k << 18) + np.array([0, -(1 << 17), (1 << 17) - 1])[k % 3]) % (1 << 32)
    x = np.random.default_rng(3).integers(-2**31, 2**31, (1, 1, 2 * n))
    _rope(x, theta, 1, 1, spad_words=1 << 17)


@pytest.mark.parametrize("seed", [4, 5])
def test_rope_random(seed):
    rng = np.random.default_rng(seed)
    t, heads, d = int(rng.integers(1, 4)), int(rng.integers(1, 4)), 2 * int(rng.integers(1, 12))
    x = rng.integers(-2**31, 2**31, (t, heads, d)) >> rng.integers(0, 31, (t, heads, d))
    theta = rng.integers(0, 2**32, d // 2) >> rng.integers(0, 32, d // 2)
    i0 = int(rng.integers(0, 2**31))
    _rope(x, theta, i0, int(rng.integers(i0, 2**31)), seed=seed)


def test_rope_head_dim_128():
    rng = np.random.default_rng(6)
    _rope(rng.integers(-2**31, 2**31, (2, 2, 128)), _theta(128, 10000.0), 77, 2**31 - 1)


def test_rope_empty():
    _rope(np.zeros((0, 2, 4), np.int64), np.ones(2, np.int64), 0, 5)
    _rope(np.zeros((2, 0, 4), np.int64), np.ones(2, np.int64), 0, 5)
