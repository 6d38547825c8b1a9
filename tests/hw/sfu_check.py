"""The special-function unit tests' check: run one instruction on a spad of sentinels and compare the
whole spad afterwards (the destinations hold the reference's values, every other word is unchanged) and
the cycles busy against the unit's behavioural model."""

import numpy as np

from hw.params import AccelParams
from sim.unit_sim import run_unit


def sentinel_spad(words, rng):
    return rng.integers(-2**62, 2**62, words)  # sentinels everywhere


def check_unit(unit_cls, ins, sp, want: dict, run=None):
    """Run ``ins``; the spad afterwards must equal ``sp`` with ``want`` (addr -> values) written over it.
    ``run(ins, spad) -> (spad, cycles)``: another simulator (default: Amaranth's, ``run_unit``)."""
    words = sp.size
    exp = sp.copy()
    for at, vals in want.items():
        vals = np.asarray(vals, np.int64).ravel()
        exp[at:at + vals.size] = vals
    if run is None:
        out, cyc = run_unit(unit_cls(AccelParams(spad_words=words)), ins, sp)
    else:
        out, cyc = run(ins, sp)
    bad = np.flatnonzero(out != exp)
    assert bad.size == 0, f"{ins.op.name}: {bad.size} words differ, first at {bad[:8]}: got {out[bad[:8]]} want {exp[bad[:8]]}"
    assert cyc == unit_cls.cycles(ins), (cyc, unit_cls.cycles(ins))
    return cyc
