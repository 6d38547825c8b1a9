"""EMBED unit: equals reference.embed_lookup's scaling (code * mult rounded by the row's shift,
saturated to Q15.16) for each row's own (mult, shift), on the multipliers of real row scales, on the
rails (codes -128/127, multiplier 1 and 65535, shifts 0..70, 127, 128 .. 2**63 - 1), on a
SmolLM2-sized prompt (T = 6 rows of 576), writes nothing outside its destination, and busy lasts
exactly cycles()."""

import numpy as np

from hw.isa import Instr, Op
from hw.params import AccelParams
from hw.sfu.embed import Embed, cycles
from quant import reference as R
from sim.unit_sim import run_unit

I64 = np.iinfo(np.int64)


def _run(codes, mult, shift, words, a, b, d, seed=0):
    """codes (T, N) of the looked-up rows; mult, shift (T,)."""
    t, n = codes.shape
    rng = np.random.default_rng(seed)
    sp = rng.integers(I64.min, I64.max, words, dtype=np.int64, endpoint=True)
    sp[a:a + t * n] = codes.reshape(-1)
    sp[b:b + 2 * t:2], sp[b + 1:b + 2 * t:2] = mult, shift
    ins = Instr(op=Op.EMBED, a=a, b=b, d=d, m=t, n=n)
    out, cyc = run_unit(Embed(AccelParams(spad_words=words)), ins, sp)
    want = sp.copy()
    # the reference's own lookup: row t of the table is codes[t], token ids 0..T-1
    want[d:d + t * n] = R.embed_lookup(np.arange(t), codes, mult, shift).reshape(-1)
    bad = np.flatnonzero(out != want)
    assert not bad.size, (bad[:8], out[bad[:8]], want[bad[:8]])
    assert cyc == cycles(ins)


def test_embed_rails_every_shift():
    """Rows with shifts 0..70 and a few huge ones (the reference accepts any shift >= 0; from 64 on its
    int64 rounding wraps), multipliers at the rails and between; the codes hit -128, 127, 0 and the
    rounding ties (|code * mult| < 2**23: the FX saturation is never reached)."""
    rng = np.random.default_rng(1)
    shift = np.array(list(range(71)) + [127, 128, 1000, 2**31, 2**62, 2**63 - 1], np.int64)
    t, n = shift.size, 9
    codes = rng.integers(-128, 128, (t, n))
    codes[:, :5] = [-128, 127, 0, 1, -1]
    mult = rng.choice([1, 2, 32768, 65535, 40961], t)
    mult[:8] = 65535
    _run(codes, mult, shift, 2048, 0, 700, 900, seed=2)


def test_embed_real_scales_smollm2_prompt():
    """Row scales from quantize_embedding of a float table, multipliers from embedding_multipliers (as
    the compiler emits them); T = 6 rows of SmolLM2's hidden size 576, one of them all zero."""
    rng = np.random.default_rng(3)
    w = rng.normal(0, 1, (6, 576)) * np.array([[0.02], [0.5], [3.0], [0.0], [30.0], [1e-3]])
    codes, s = R.quantize_embedding(w)
    mult, shift = R.embedding_multipliers(s)
    _run(codes.astype(np.int64), mult, shift, 8192, 11, 4000, 4100, seed=4)


def test_embed_random_shapes():
    """Random T, N, placement, codes, multipliers and shifts 0..40."""
    rng = np.random.default_rng(8)
    for _ in range(4):
        t, n = int(rng.integers(1, 6)), int(rng.integers(1, 40))
        codes = rng.integers(-128, 128, (t, n))
        mult, shift = rng.integers(1, 65536, t), rng.integers(0, 41, t)
        a = int(rng.integers(0, 40))
        b = a + t * n + int(rng.integers(0, 20))
        d = b + 2 * t + int(rng.integers(0, 20))
        _run(codes, mult, shift, 512, a, b, d, seed=int(rng.integers(1000)))
