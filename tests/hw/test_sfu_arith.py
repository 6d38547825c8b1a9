"""hw.sfu.arith: each combinational primitive equals its quant.reference twin on random and edge operands."""

import numpy as np
from amaranth.hdl import Module, Signal, signed
from amaranth.sim import Simulator

from hw.sfu import arith as A
from quant import reference as R


def test_primitives_equal_the_reference():
    m = Module()
    x = Signal(signed(48))
    sh, s, u, d = Signal(7), Signal(signed(8)), Signal(62), Signal(40)
    o1, o2 = A.shift_round(m, x, sh, 64), A.shift_round_signed(m, x, s, 64)
    mm, ee = A.mantissa16(m, u, 62)
    bl, rd = A.bit_length(m, u, 62), A.round_div(m, x, d, 64)
    rng = np.random.default_rng(1)
    cases = [(0, 0, 0, 0, 1), (-1, 1, -3, 1, 1), (2**46 - 1, 62, 30, 2**62 - 1, 2**39 - 1),
             (-2**46, 1, -1, 65535, 2), (65535, 0, 0, 65536, 3), (-3, 1, 1, 131071, 2)]
    for _ in range(300):
        xv = int(rng.integers(-2**46, 2**46)) if rng.random() < .7 else int(rng.choice([0, 1, -1, 2**46 - 1, -2**46]))
        uv = max(0, int(2 ** int(rng.integers(0, 62)) - int(rng.integers(0, 3))))
        cases.append((xv, int(rng.integers(0, 63)), int(rng.integers(-10, 40)), uv, int(rng.integers(1, 2**39))))
    bad = []

    async def bench(ctx):
        for xv, shv, sv, uv, dv in cases:
            for sig, v in ((x, xv), (sh, shv), (s, sv), (u, uv), (d, dv)):
                ctx.set(sig, v)
            await ctx.delay(1e-9)
            want = [int(R.shift_round(xv, shv)),
                    int(R.shift_round_signed(xv, sv)) if abs(xv) < 2**20 or sv >= 0 else None,
                    *map(int, R.mantissa16(uv)), int(R.bit_length(uv)), int(R.round_div(xv, dv))]
            got = [ctx.get(o1), ctx.get(o2), ctx.get(mm), ctx.get(ee), ctx.get(bl), ctx.get(rd)]
            bad.extend((i, xv, shv, sv, uv, dv, w, g) for i, (w, g) in enumerate(zip(want, got))
                       if w is not None and w != g)

    sim = Simulator(m)
    sim.add_testbench(bench)
    sim.run()
    assert not bad, bad[:5]


def test_shift_round_signed_i64_equals_numpy_int64_everywhere():
    """The int64 twin of shift_round_signed: equal to the reference for shifts -70..100 and any int64 x,
    including the wrapping corners (s = 63, 64, 65; x near the rails; left shifts that overflow)."""
    m = Module()
    x, s = Signal(signed(64)), Signal(signed(8))
    out = A.shift_round_signed_i64(m, x, s)
    rng = np.random.default_rng(2)
    xs = [0, 1, -1, 2**63 - 1, -2**63, 2**55 - 1, -2**55, 5, -5, 2**62, -2**62 - 1]
    ss = [0, 1, -1, 62, 63, 64, 65, 66, 91, 100, -7, -8, -20, -63, -64, -70]
    cases = [(a, b) for a in xs for b in ss]
    for _ in range(400):
        bits = int(rng.integers(1, 64))
        cases.append((int(rng.integers(-2**(bits - 1), 2**(bits - 1))), int(rng.integers(-70, 101))))
    cx = np.array([c[0] for c in cases], np.int64)
    cs = np.array([c[1] for c in cases], np.int64)
    want = R.shift_round_signed(cx, cs)
    got = []

    async def bench(ctx):
        for xv, sv in cases:
            ctx.set(x, xv)
            ctx.set(s, sv)
            await ctx.delay(1e-9)
            got.append(ctx.get(out))

    sim = Simulator(m)
    sim.add_testbench(bench)
    sim.run()
    bad = [(int(a), int(b), int(w), g) for a, b, w, g in zip(cx, cs, want, got) if w != g]
    assert not bad, bad[:5]
