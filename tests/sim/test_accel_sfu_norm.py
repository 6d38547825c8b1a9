"""EMBED, RMSNORM, SILU_MUL and ARGMAX through the accelerator top (``hw.accel`` run by
``sim.accel_sim.run_accelerator``, in Amaranth and under Verilator): a tiny program LOADs the operands
and a sentinel frame around the destination into the spad, runs the opcode, STOREs the frame back; the
frame must hold the ``quant.reference`` result with both sentinel edges intact. MARKs around a RESID_ADD
(the baseline) and around the opcode: with a memory that never stalls, the top's cycles for the unit
exceed its ``cycles()`` model by exactly the baseline's overhead. The unit-level tests
(tests/hw/test_sfu_*.py) cover the edges exhaustively; these show the units wired to the controller,
its spad mux and real memory traffic, and the Verilog they become."""

import numpy as np
import pytest
import shared_build  # tests/sim/shared_build.py: the one Verilator build of the whole accelerator

from hw.isa import FLAG_SIGNED, Instr, Op
from hw.params import AccelParams, EngineParams
from hw.sfu.registry import unit_class
from quant import reference as R
from sim.accel_programs import Layout, check_memory
from sim.accel_sim import ImageBuilder, read_elements, run_accelerator

FXMIN, FXMAX = -2**31, 2**31 - 1
EDGE = 3  # sentinel words each side of the destination


#: every case runs on one accelerator build (Verilator builds once per unit set)
UNITS = [Op.EMBED, Op.RMSNORM, Op.SILU_MUL, Op.ARGMAX, Op.RESID_ADD]


def unit_program(accel: AccelParams, ins: Instr, inputs, dest: int, expected, seed: int = 0):
    """LOAD each (spad address, int64 values) of ``inputs`` and a frame of sentinels spad[dest - EDGE ..
    dest + len + EDGE), MARK, the baseline RESID_ADD (on the spad's last words), MARK, ``ins``, MARK,
    STORE the frame as 64-bit words. Returns (image, checks: the frame holds ``expected`` between its
    untouched sentinels, the three MARK words, the baseline)."""
    rng = np.random.default_rng(seed)
    exp = np.asarray(expected, np.int64).reshape(-1)
    frame = rng.integers(-2**62, 2**62, exp.size + 2 * EDGE)
    want = frame.copy()
    want[EDGE:EDGE + exp.size] = exp
    regions = [(a, np.asarray(v, np.int64).reshape(-1)) for a, v in inputs] + [(dest - EDGE, frame)]
    top = accel.spad_words
    # long enough (31 cycles) that the controller's prefetch of the next instruction is hidden behind
    # it, as it is behind every unit case here
    base = Instr(Op.RESID_ADD, a=top - 90, b=top - 60, d=top - 30, m=1, n=30)
    lay = Layout(accel, len(regions) + 7)
    ib = ImageBuilder(accel)
    prog = []
    for at, vals in regions:
        src = lay.take_elements(vals.size, 64)
        ib.elements(src, vals, 64)
        prog.append(Instr(Op.LOAD, flags=FLAG_SIGNED, w=64, a=src, d=at, n=vals.size))
    out = lay.take_elements(frame.size, 64)
    marks = lay.take(1), lay.take(1), lay.take(1)
    prog += [Instr(Op.MARK, d=marks[0]), base, Instr(Op.MARK, d=marks[1]), ins, Instr(Op.MARK, d=marks[2]),
             Instr(Op.STORE, w=64, a=dest - EDGE, d=out, n=frame.size), Instr(Op.HALT)]
    ib.program(prog)
    return ib.image(lay.next + 1), [(out, frame.size, 64, True, want)], marks, base


def run_case(ins, inputs, dest, expected, *, simulator="amaranth", stall="none", spad_words=4096, seed=0,
             **kw):
    """Run the program; check the frame and the cycles between the MARKs. Returns the AccelRun."""
    accel, units = AccelParams(spad_words=spad_words), UNITS
    if simulator != "amaranth":  # the Verilog every whole-accelerator test shares (one build)
        accel, units = shared_build.ACCEL, shared_build.UNITS
    image, checks, marks, base = unit_program(accel, ins, inputs, dest, expected, seed)
    run = run_accelerator(EngineParams(), accel, image, simulator=simulator, units=units, seed=seed,
                          stall_profile=stall, **kw)
    assert run.error_name == "NONE", (run.error_name, run.pc)
    bad = check_memory(run.mem, accel, checks)
    assert not bad, bad
    t0, t1, t2 = (int(read_elements(run.mem, accel.mem_word_bits, at, 1, 64)[0]) for at in marks)
    over_base = t1 - t0 - unit_class(Op.RESID_ADD).cycles(base, accel)
    over = t2 - t1 - unit_class(ins.op).cycles(ins, accel)
    if stall == "none":
        assert over == over_base, (over, over_base)
    else:
        assert over >= 0 and over_base >= 0, (over, over_base)
    return run


def embed_case(rng, t=3, n=40):
    w = rng.normal(0, 1, (t, n)) * np.array([1e-3, 0.3, 20.0][:t] + [1.0] * max(0, t - 3))[:, None]
    w[0, :2] = 0
    codes, s = R.quantize_embedding(w)
    codes = codes.astype(np.int64)
    codes[-1, :2] = [-128, 127]
    mult, shift = R.embedding_multipliers(s)
    pairs = np.stack([mult, shift], 1).reshape(-1)
    a, b, d = 0, t * n, t * n + 2 * t + 2 * EDGE
    ins = Instr(Op.EMBED, a=a, b=b, d=d, m=t, n=n)
    return ins, [(a, codes), (b, pairs)], d, R.embed_lookup(np.arange(t), codes, mult, shift)


def rmsnorm_case(rng, t=3, n=96):
    g, eps = R.rmsnorm_params(rng.normal(1, 0.5, n), 1e-5)
    x = R.to_fx(rng.normal(0, 1, (t, n)) * np.array([0.01, 2.0, 100.0][:t] + [1.0] * max(0, t - 3))[:, None])
    x[-1, :2] = [FXMIN, FXMAX]
    a, b, d = 0, t * n, t * n + n + EDGE
    ins = Instr(Op.RMSNORM, a=a, b=b, d=d, m=t, n=n, i0=eps)
    return ins, [(a, x), (b, g)], d, R.rmsnorm(x, g, eps)


def silu_case(rng, t=2, n=70):
    gate = np.clip(rng.normal(0, 4, t * n) * 65536, FXMIN, FXMAX).astype(np.int64)
    up = np.clip(rng.normal(0, 4, t * n) * 65536, FXMIN, FXMAX).astype(np.int64)
    gate[:4], up[:4] = [FXMIN, FXMAX, -16 << 16, (16 << 16) - 1], [FXMAX, FXMAX, FXMIN, FXMIN]
    a, b, d = 0, t * n, 2 * t * n + EDGE
    ins = Instr(Op.SILU_MUL, a=a, b=b, d=d, m=t, n=n)
    return ins, [(a, gate), (b, up)], d, R.silu_mul(gate, up)


def argmax_case(rng, t=3, n=301):
    x = rng.integers(-2**40, 2**40, (t, n))
    x[0, 7] = x[0, 200] = 2**41          # a tie: the first wins
    x[1] = np.iinfo(np.int64).min
    x[1, n - 1] = np.iinfo(np.int64).max  # the last element (odd n: the pair's masked half)
    a, d = 0, t * n + EDGE
    ins = Instr(Op.ARGMAX, a=a, d=d, m=t, n=n)
    return ins, [(a, x)], d, R.argmax_first(x)


CASES = {Op.EMBED: embed_case, Op.RMSNORM: rmsnorm_case, Op.SILU_MUL: silu_case, Op.ARGMAX: argmax_case}


@pytest.mark.parametrize("op", list(CASES), ids=lambda o: o.name)
@pytest.mark.parametrize("simulator,stall", [("amaranth", "none"), ("verilator", "none"),
                                             ("verilator", "asymmetric")])
def test_unit_through_the_top(op, simulator, stall, tmp_path):
    rng = np.random.default_rng(int(op))
    ins, inputs, dest, expected = CASES[op](rng)
    run_case(ins, inputs, dest, expected, simulator=simulator, stall=stall, seed=int(op), run_dir=tmp_path)
