"""SILU_MUL unit: equals reference.silu_mul (the 4097-entry interpolated sigmoid table, then the two
rounded products) on random operands, on every edge of the table (both clip points, each side of
them, interval boundaries, fractions 0, 255, 256, 511), on both rails of gate and up, on a
decoder-sized tensor (T = 3 rows of SmolLM2's 1536 intermediate), writes nothing outside its
destination, and busy lasts exactly cycles()."""

import numpy as np

from hw.isa import Instr, Op
from hw.params import AccelParams
from hw.sfu.silu import SiluMul, cycles
from quant import reference as R
from sim.unit_sim import run_unit

FXMIN, FXMAX = -2**31, 2**31 - 1
I64 = np.iinfo(np.int64)


def _run(gate, up, words, a, b, d, t, seed=0):
    rng = np.random.default_rng(seed)
    sp = rng.integers(I64.min, I64.max, words, dtype=np.int64, endpoint=True)
    n = gate.size // t
    sp[a:a + gate.size], sp[b:b + up.size] = gate, up
    ins = Instr(op=Op.SILU_MUL, a=a, b=b, d=d, m=t, n=n)
    out, cyc = run_unit(SiluMul(AccelParams(spad_words=words)), ins, sp)
    want = sp.copy()
    want[d:d + gate.size] = R.silu_mul(gate, up)
    bad = np.flatnonzero(out != want)
    assert not bad.size, (bad[:8], out[bad[:8]], want[bad[:8]])
    assert cyc == cycles(ins)


def test_silu_edges():
    lo, hi = -16 << 16, 16 << 16
    g = [FXMIN, FXMIN + 1, lo - 1, lo, lo + 1, lo + 255, lo + 256, lo + 511, lo + 512, -1, 0, 1, 255, 256,
         511, 512, 65536, -65536, hi - 513, hi - 512, hi - 257, hi - 256, hi - 1, hi, hi + 1, FXMAX - 1, FXMAX]
    gate = np.array([x for x in g for _ in range(4)], np.int64)
    up = np.array([FXMAX, FXMIN, 0, 65536] * len(g), np.int64)
    _run(gate, up, 512, 0, 120, 250, 4, seed=1)


def test_silu_random_decoder_sized():
    rng = np.random.default_rng(2)
    t, n = 3, 1536
    scale = rng.choice([2**10, 2**16, 2**19, 2**22, 2**31], t * n)
    gate = np.clip(rng.normal(0, 1, t * n) * scale, FXMIN, FXMAX).astype(np.int64)
    up = np.clip(rng.normal(0, 1, t * n) * scale[::-1], FXMIN, FXMAX).astype(np.int64)
    gate[:64] = rng.integers(FXMIN, FXMAX, 64, endpoint=True)
    _run(gate, up, 1 << 14, 7, 5000, 10000, t, seed=3)


def test_silu_random_shapes():
    """Random T, N and placement, gate and up of mixed magnitudes."""
    rng = np.random.default_rng(9)
    for _ in range(4):
        t, n = int(rng.integers(1, 5)), int(rng.integers(1, 40))
        mag = rng.choice([2**8, 2**17, 2**21, 2**31], (2, t * n))
        gate = np.clip(rng.normal(0, 1, t * n) * mag[0], FXMIN, FXMAX).astype(np.int64)
        up = np.clip(rng.normal(0, 1, t * n) * mag[1], FXMIN, FXMAX).astype(np.int64)
        a = int(rng.integers(0, 50))
        b = a + t * n + int(rng.integers(0, 30))
        d = b + t * n + int(rng.integers(0, 30))
        _run(gate, up, 512, a, b, d, t, seed=int(rng.integers(1000)))
