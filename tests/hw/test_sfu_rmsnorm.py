"""RMSNORM unit: equals reference.rmsnorm (max |x| for k, the shifted sum of squares plus the eps term,
the table + Newton rsqrt, then y) on rows of every magnitude (k from kmin up to 9), on the rails of x
and g, zero rows with and without eps, all-equal rows, eps_term from 0 to 2**62 - 1, odd and decoder
lengths (576 with T = 3, 4096), writes nothing outside its destination, and busy lasts exactly
cycles()."""

import numpy as np
import pytest

from hw.isa import Instr, Op
from hw.params import AccelParams
from hw.sfu.rmsnorm import RmsNorm, cycles
from quant import reference as R
from sim.unit_sim import run_unit

FXMIN, FXMAX = -2**31, 2**31 - 1
I64 = np.iinfo(np.int64)


def _run(x, g, eps, words, a, b, d, seed=0):
    t, n = x.shape
    rng = np.random.default_rng(seed)
    sp = rng.integers(I64.min, I64.max, words, dtype=np.int64, endpoint=True)
    sp[a:a + t * n], sp[b:b + n] = x.reshape(-1), g
    ins = Instr(op=Op.RMSNORM, a=a, b=b, d=d, m=t, n=n, i0=int(eps))
    out, cyc = run_unit(RmsNorm(AccelParams(spad_words=words)), ins, sp)
    want = sp.copy()
    want[d:d + t * n] = R.rmsnorm(x, g, eps).reshape(-1)
    bad = np.flatnonzero(out != want)
    assert not bad.size, (bad[:8], out[bad[:8]], want[bad[:8]])
    assert cyc == cycles(ins)


def _rows(rng, n):
    """Rows covering k = kmin .. 9: magnitudes 2**0 .. 2**31, rails, zeros, all equal."""
    rows = []
    for bits in (0, 1, 3, 8, 15, 20, 22, 23, 24, 25, 28, 31):
        rows.append(rng.integers(-(1 << bits), (1 << bits), n, endpoint=True))
    rows += [np.full(n, FXMIN), np.full(n, FXMAX), np.zeros(n, np.int64), np.full(n, -3), np.full(n, 1 << 23),
             np.full(n, (1 << 23) - 1)]
    r = rng.integers(FXMIN, FXMAX, n, endpoint=True)
    r[::2] = FXMIN
    rows.append(r)
    r = np.zeros(n, np.int64)
    r[n - 1] = 1                                  # the only nonzero element last (odd N: the masked pair)
    rows.append(r)
    return np.stack(rows).astype(np.int64)


@pytest.mark.parametrize("n,eps", [(1, 0), (7, 0), (8, 1), (7, 1 << 20), (9, (1 << 62) - 1), (6, 12345678901),
                                   (5, 3)])
def test_rmsnorm_edges(n, eps):
    rng = np.random.default_rng(n * 7 + eps % 97)
    x = _rows(rng, n)
    g = rng.integers(FXMIN, FXMAX, n, endpoint=True)
    g[0] = FXMIN
    g[-1] = FXMAX
    _run(x, g, eps, 1024, 0, 600, 640, seed=n)


def test_rmsnorm_smollm2_rows():
    """T = 3 rows of SmolLM2's hidden size 576 with real gamma / eps params (rmsnorm_params), activations
    of the size a residual stream has (one row with an outlier at the rail)."""
    rng = np.random.default_rng(11)
    n = 576
    g, eps = R.rmsnorm_params(rng.normal(1, 0.3, n), 1e-5)
    x = R.to_fx(rng.normal(0, 1, (3, n)) * np.array([[0.05], [3.0], [20.0]]))
    x[2, 100] = FXMIN
    _run(x, g, eps, 8192, 0, 2000, 3000, seed=12)


def test_rmsnorm_4096_wide():
    """T = 2 rows of 4096: random over the whole Q15.16 range, and the upper rail (every shifted square
    2**46, ss = 2**58: the widest sum a 4096-row makes)."""
    rng = np.random.default_rng(13)
    n = 4096
    g, eps = R.rmsnorm_params(rng.normal(0, 2, n), 1e-6)
    x = rng.integers(FXMIN, FXMAX, (2, n), endpoint=True)
    x[1] = FXMAX
    _run(x, g, eps, 1 << 15, 1, 9000, 14000, seed=14)


# Q2.30 mantissas of the sum of squares where the Newton step's rounding of m * y**2 decides r (a
# truncating t gives r one off), from a scan of 12M mantissas; then m = 1 exactly and the largest m.
_NEWTON_CORNERS = [1073792389, 1074985860, 1075449988, 1076709763, 4240181987, 1354812083, 3222957240,
                   3729393270, 1 << 30, (1 << 32) - 1]


@pytest.mark.parametrize("mq", _NEWTON_CORNERS)
def test_rmsnorm_rsqrt_corners(mq):
    """x = (2**22, 0, 0) and (-2**22, 0, 0): k = 0; eps_term chosen so that ss = mq * 2**14 (e = 22,
    the mantissa exactly mq)."""
    x = np.array([[1 << 22, 0, 0], [-(1 << 22), 0, 0]], np.int64)
    eps = (mq << 14) - (1 << 44)
    assert eps >= 0
    g = np.array([FXMAX, FXMIN, 1 << 16], np.int64)
    _run(x, g, eps, 256, 0, 10, 20, seed=mq % 1000)


def test_rmsnorm_random_shapes():
    """Random T, N, placement, magnitudes, gamma and eps_term."""
    rng = np.random.default_rng(21)
    for _ in range(4):
        t, n = int(rng.integers(1, 4)), int(rng.integers(1, 30))
        mag = rng.choice([2**4, 2**16, 2**24, 2**31], (t, 1))
        x = np.clip(rng.normal(0, 1, (t, n)) * mag, FXMIN, FXMAX).astype(np.int64)
        g = rng.integers(FXMIN, FXMAX, n, endpoint=True)
        eps = int(rng.choice([0, 1, int(rng.integers(0, 2**40)), int(rng.integers(0, 2**62))]))
        a = int(rng.integers(0, 40))
        b = a + t * n + int(rng.integers(0, 20))
        d = b + n + int(rng.integers(0, 20))
        _run(x, g, eps, 512, a, b, d, seed=int(rng.integers(1000)))
