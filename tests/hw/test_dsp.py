"""hw/dsp.py: the DSP48E2-packed W2 x A8 cells equal a * c for every code pattern and activation —
exhaustively in numpy (the layout arithmetic), in Amaranth simulation (the RTL, exhaustive where it
is small enough), by formal proofs (Yosys write_smt2 -> smtbmc + boolector: every input, complete
because the pipeline is filled from the inputs in LATENCY steps), and mapped by Yosys to DSP48E2."""

import numpy as np
import pytest
from amaranth.hdl import Elaboratable, Module, Signal, signed
from amaranth.sim import Simulator

from bitstream.depth import synthesize_netlist
from bitstream.formal import prove
from hw import dsp as D
from quant import reference as R
from quant.formats import ACT_QMAX

from dsp_proofs import Expand24Proof, W2x2x2Proof, W2x3Proof


# --- the layout arithmetic, every case, in numpy ----------------------------------------------------
def test_w2x3_layout_every_case():
    a = np.arange(-128, 128)[:, None]
    pat = np.arange(64)[None, :]
    codes = [(pat >> (2 * i)) & 3 for i in range(3)]
    # the DSP's product: (a + 128) * (c0 + c1 * 2^10 + c2 * 2^20), fields read at 0/10/20
    p = (a + D.OFFSET) * sum(c << (D.FIELD_BITS * i) for i, c in enumerate(codes))
    assert p.max() < 1 << 30 and p.min() >= 0
    for i, c in enumerate(codes):
        field = (p >> (D.FIELD_BITS * i)) & ((1 << D.FIELD_BITS) - 1)
        assert np.array_equal(field - D.OFFSET * c, a * c)
        assert np.array_equal(field, D.w2x3_model(a, np.stack(codes, -1))[..., i])


def test_group_correction_gives_the_reference_dot_product():
    rng = np.random.default_rng(0)
    n, k, g = 6, 128, 64
    codes = rng.integers(0, 4, (n, k))
    a = rng.integers(-128, 128, k)
    a[:3] = -128
    # what the W2x3 fields hold: (a + 128) * c (the cell inverts the top bit: a literal 128 here)
    offset = ((a + 128)[None, :] * codes).reshape(n, k // g, g).sum(-1)
    exact = (a[None, :] * codes).reshape(n, k // g, g).sum(-1)
    assert np.array_equal(offset - D.group_correction(codes, g), exact)
    # and through the reference linear (all-ones scale, zero min: the plain code dot product)
    ones, zeros = np.ones((n, k // g), np.int64), np.zeros((n, k // g), np.int64)
    ref = R.w2a8_linear(a[None, :], codes, ones, zeros, g)
    assert np.array_equal((offset - D.group_correction(codes, g)).sum(-1), ref[0])
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        D.group_correction(codes, 48)


def test_w2x2x2_layout_every_case():
    a0, a1, c0, c1 = np.meshgrid(np.arange(-127, 128), np.arange(-127, 128), np.arange(4), np.arange(4),
                                 indexing="ij")
    b = a0 + (a1 << D.FIELD_BITS)
    assert b.min() >= -(1 << 17) and b.max() < 1 << 17  # fits the signed 18-bit B port
    p = (c0 + (c1 << 2 * D.FIELD_BITS)) * b
    got = D.w2x2x2_fields(p)
    assert np.array_equal(got, D.w2x2x2_model(a0, a1, c0, c1))
    # -128 in the upper token overflows B (this is why the cell refuses it):
    assert -128 + (-128 << D.FIELD_BITS) < -(1 << 17)


def test_minus_128_refused_by_name():
    assert np.array_equal(D.check_packable([-127, 0, 127]), [-127, 0, 127])
    with pytest.raises(D.PackingError, match=r"activation -128 at index \(1, 2\).*\|a\| <= 127"):
        D.check_packable([[0, 1, 2], [3, 4, -128]])
    with pytest.raises(D.PackingError):
        D.w2x2x2_model(-128, 0, 1, 1)
    assert ACT_QMAX == 127


# --- the RTL in Amaranth simulation -----------------------------------------------------------------
def _run_pipeline(dut, vectors, apply, read, want):
    """Feed one vector per enabled cycle (every 7th cycle disabled, to exercise the clock enables)
    and compare what leaves the pipeline LATENCY enabled cycles later."""
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    bad, seen = [], []

    async def tb(ctx):
        inflight = []
        i = cyc = 0
        while i < len(vectors) or inflight:
            en = (cyc % 7) != 6
            v = vectors[i] if i < len(vectors) else vectors[0]
            apply(ctx, v)
            ctx.set(dut.en, en)
            await ctx.tick()
            cyc += 1
            if en:
                inflight.append(v if i < len(vectors) else None)
                i += 1
                if len(inflight) > D.LATENCY - 1:
                    old = inflight.pop(0)
                    if old is not None:
                        got, exp = read(ctx), want(old)
                        seen.append(1)
                        if got != exp and len(bad) < 5:
                            bad.append((old, got, exp))
            if i >= len(vectors) and all(x is None for x in inflight):
                break

    sim.add_testbench(tb)
    sim.run()
    return bad, len(seen)


def test_w2x3_every_activation_and_pattern():
    dut = D.W2x3()
    vectors = [(a, pat) for a in range(-128, 128) for pat in range(64)]

    def apply(ctx, v):
        ctx.set(dut.act, v[0])
        ctx.set(dut.codes.as_value(), v[1])

    def read(ctx):
        return [ctx.get(dut.offset_products[i]) for i in range(3)]

    def want(v):
        return [(v[0] + D.OFFSET) * ((v[1] >> (2 * i)) & 3) for i in range(3)]

    bad, n = _run_pipeline(dut, vectors, apply, read, want)
    assert not bad and n == 256 * 64, bad


def test_w2x2x2_every_activation_and_pattern():
    # every a0, every a1 and every code pair, each a0 with 16 different a1 (formal covers the rest)
    dut = D.W2x2x2()
    vectors = [(a0, (a0 * 37 + 11 * cc) % 255 - 127, cc & 3, cc >> 2) for a0 in range(-127, 128)
               for cc in range(16)]
    vectors += [(-128, 5, 3, 3), (5, -128, 3, 3), (-128, -128, 1, 2), (-127, -127, 3, 3), (127, 127, 3, 3)]

    def apply(ctx, v):
        ctx.set(dut.act.as_value(), (v[0] & 0xFF) | ((v[1] & 0xFF) << 8))
        ctx.set(dut.codes.as_value(), v[2] | (v[3] << 2))

    def read(ctx):
        if ctx.get(dut.refused):
            return "refused"
        return [ctx.get(dut.products[j]) for j in range(4)]

    def want(v):
        if -128 in v[:2]:
            return "refused"
        return [int(x) for x in D.w2x2x2_model(v[0], v[1], v[2], v[3])]

    bad, n = _run_pipeline(dut, vectors, apply, read, want)
    assert not bad and n == len(vectors), bad
    assert {v[1] for v in vectors} >= set(range(-127, 128))


def test_expand24_every_group():
    dut = D.Expand24()
    sim = Simulator(dut)
    bad = []

    async def tb(ctx):
        for meta in range(8):
            for k0 in range(4):
                for k1 in range(4):
                    ctx.set(dut.kept.as_value(), k0 | (k1 << 2))
                    ctx.set(dut.meta, meta)
                    await ctx.delay(1e-9)
                    got = [ctx.get(dut.codes[p]) for p in range(4)]
                    want, invalid = D.expand24_model([k0, k1], meta)
                    if meta < 6:  # the reference's own expansion agrees
                        ref, _ = R.expand_24(np.array([[k0, k1]]), np.array([[meta]]))
                        assert list(ref[0]) == list(want)
                    if got != list(want) or ctx.get(dut.invalid) != invalid:
                        bad.append((meta, k0, k1, got, list(want)))

    sim.add_testbench(tb)
    sim.run()
    assert not bad, bad[:5]


# --- formal proofs (every input) --------------------------------------------------------------------
# Depth LATENCY + 1: the first step with a filled pipeline is step LATENCY, and every reachable state
# with a filled pipeline is reached there (its registers hold the last LATENCY enabled inputs), so
# the bounded check covers all of them.
@pytest.mark.parametrize("proof", [W2x3Proof, W2x2x2Proof, Expand24Proof], ids=lambda c: c.__name__)
def test_formal(proof):
    w = proof()
    r = prove(w, ports=w.ports, depth=D.LATENCY + 1)
    assert r["status"] == "PASS", r["log"]


# --- Yosys maps the cell to one DSP48E2 -------------------------------------------------------------
class _W2x3Ports(Elaboratable):
    """W2x3 behind plain-signal ports (a cell synthesized as the top module trips a Yosys 0.70 name
    clash between Amaranth's ``codes[0]`` element wires and ABC's bit names)."""

    def __init__(self):
        self.act, self.codes, self.en = Signal(signed(8)), Signal(6), Signal()
        self.out = [Signal(10, name=f"o{i}") for i in range(3)]
        self.ports = [self.act, self.codes, self.en, *self.out]

    def elaborate(self, platform):
        m = Module()
        m.submodules.dut = d = D.W2x3()
        m.d.comb += [d.act.eq(self.act), d.codes.eq(self.codes), d.en.eq(self.en)]
        m.d.comb += [o.eq(d.offset_products[i]) for i, o in enumerate(self.out)]
        return m


def test_yosys_maps_w2x3_to_one_dsp48e2():
    w = _W2x3Ports()
    net, _ = synthesize_netlist(w, ports=w.ports, cache=False)
    cells = net["modules"]["top"]["cells"].values()
    count = {}
    for c in cells:
        count[c["type"]] = count.get(c["type"], 0) + 1
    assert count.get("DSP48E2") == 1, count
    # nothing but the DSP and its stage registers: a + 128 is one inverter, no adder, no carry
    luts = sum(n for t, n in count.items() if t.startswith("LUT") or t == "INV")
    assert luts <= 1 and "CARRY4" not in count, count
    dsp = next(c for c in cells if c["type"] == "DSP48E2")
    regs = {k: int(dsp["parameters"][k], 2) for k in ("AREG", "BREG", "MREG", "PREG")}
    ff = sum(n for t, n in count.items() if t.startswith("FD"))
    stage_bits = 6 + 8 + 30 + 30  # A (the 6 code bits; the zero gaps are constants), B, M, P
    # Either Yosys absorbs the stage registers into the DSP, or they stay in fabric (Yosys 0.70 for
    # -family xcup does not pack DSP48E2 registers: docs/arithmetic.md); nothing in between.
    assert (regs == {"AREG": 1, "BREG": 1, "MREG": 1, "PREG": 1} and ff == 0) or \
           (set(regs.values()) == {0} and ff == stage_bits), (regs, ff, count)
