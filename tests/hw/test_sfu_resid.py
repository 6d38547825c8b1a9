"""RESID_ADD unit: equals reference.residual_add (saturating at both rails) and its cycle model."""

import numpy as np

from hw.isa import Instr, Op
from hw.params import AccelParams
from hw.sfu.resid import ResidAdd, cycles
from quant import reference as R
from sim.unit_sim import run_unit


def test_resid_add_equals_reference_and_cycle_model():
    rng = np.random.default_rng(0)
    sp = np.zeros(256, np.int64)
    a = rng.integers(-2**31, 2**31, 30)
    b = rng.integers(-2**31, 2**31, 30)
    a[:4], b[:4] = [2**31 - 1, -2**31, 5, -2**31], [1, -1, -5, 2**31 - 1]  # both rails
    sp[0:30], sp[40:70] = a, b
    sp[130] = 77  # just past the destination: must survive
    ins = Instr(op=Op.RESID_ADD, a=0, b=40, d=100, m=3, n=10)
    out, cyc = run_unit(ResidAdd(AccelParams(spad_words=256)), ins, sp)
    assert np.array_equal(out[100:130], R.residual_add(a, b))
    assert out[130] == 77 and out[99] == 0
    assert cyc == cycles(ins)
