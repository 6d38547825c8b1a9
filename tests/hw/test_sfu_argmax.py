"""ARGMAX unit: equals reference.argmax_first (first index of the maximum, full signed 64-bit logits)
on random, tied and edge rows, on a SmolLM2-sized row of 49,152 logits, writes nothing outside its
destination, and busy lasts exactly cycles()."""

import numpy as np
import pytest

from hw.isa import Instr, Op
from hw.params import AccelParams
from hw.sfu.argmax import Argmax, cycles
from quant import reference as R
from sim.unit_sim import run_unit

I64 = np.iinfo(np.int64)


def _run(rows: np.ndarray, words: int, a: int, d: int, seed: int = 0):
    t, n = rows.shape
    rng = np.random.default_rng(seed)
    sp = rng.integers(I64.min, I64.max, words, dtype=np.int64, endpoint=True)  # sentinels everywhere
    sp[a:a + t * n] = rows.reshape(-1)
    ins = Instr(op=Op.ARGMAX, a=a, d=d, m=t, n=n)
    out, cyc = run_unit(Argmax(AccelParams(spad_words=words)), ins, sp)
    want = sp.copy()
    want[d:d + t] = R.argmax_first(rows)
    assert np.array_equal(out, want), (np.flatnonzero(out != want)[:8], out[d:d + t], want[d:d + t])
    assert cyc == cycles(ins)


def _edge_rows(rng, n):
    rows = [rng.integers(I64.min, I64.max, n, dtype=np.int64, endpoint=True),   # random int64
            np.full(n, 7, np.int64),                                          # all equal: index 0
            np.full(n, I64.min, np.int64),                                    # all at the lower rail
            rng.integers(-3, 3, n),                                           # many ties
            np.zeros(n, np.int64)]
    r = rng.integers(-2**31, 2**31, n)
    r[n - 1] = I64.max                                                        # maximum last (odd/even end)
    rows.append(r)
    r = np.full(n, I64.min, np.int64)
    r[1::3] = I64.max                                                         # ties at the upper rail
    rows.append(r)
    r = rng.integers(-100, 100, n)
    r[(n // 2) % n], r[(n // 2 + 1) % n] = 1000, 1000                                    # a tie inside one pair
    rows.append(r)
    r = rng.integers(-100, 100, n)
    r[(n // 2 - 1) % n], r[(n // 2) % n] = 1000, 1000                                    # a tie across two pairs
    rows.append(r)
    return np.stack(rows)


@pytest.mark.parametrize("n", [1, 2, 7, 10])
def test_argmax_small_rows_edges(n):
    rng = np.random.default_rng(n)
    _run(_edge_rows(rng, n), 256, 3, 200, seed=n)


def test_argmax_smollm2_vocabulary_row():
    """Two rows of 49,152 logits (the SmolLM2 vocabulary): one random with its maximum near the end
    and a tie earlier, one maximum at index 0 with the same value repeated after it."""
    rng = np.random.default_rng(5)
    v = 49152
    rows = rng.integers(-2**40, 2**40, (2, v))
    rows[0, 49150] = rows[0, 48001] = 2**41
    rows[0, 49151] = 2**41 - 1
    rows[1, 0] = rows[1, 40000] = rows[1, 49151] = 2**41
    _run(rows, 1 << 17, 5, (1 << 17) - 4)


@pytest.mark.parametrize("seed", range(4))
def test_argmax_random_shapes(seed):
    """Random T, N and placement; values from a narrow range (many ties) or the whole int64 range."""
    rng = np.random.default_rng(100 + seed)
    t, n = int(rng.integers(1, 6)), int(rng.integers(1, 80))
    lim = int(rng.choice([3, 2**20, 2**63 - 1]))
    rows = rng.integers(-lim, lim, (t, n), endpoint=True)
    a = int(rng.integers(0, 64))
    _run(rows, 1024, a, int(rng.integers(a + t * n, 1024 - t)), seed=seed)
