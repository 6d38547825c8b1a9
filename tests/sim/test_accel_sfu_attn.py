"""RESCALE, LOGITS, SOFTMAX_EXP and ROPE through the accelerator top (hw.accel, sim.accel_sim): a tiny
program LOADs the operands from memory into the spad, runs the opcode and STOREs the result; the
memory afterwards holds the reference's values."""

import numpy as np
import pytest
import shared_build  # tests/sim/shared_build.py: the one Verilator build of the whole accelerator

from hw.isa import FLAG_SIGNED, Instr, Op
from hw.params import AccelParams, EngineParams
from hw.sfu.registry import unit_class
from quant import reference as R
from sim.accel_programs import Layout, check_memory
from sim.accel_sim import ImageBuilder, read_elements, run_accelerator

ACCEL = AccelParams(mem_word_bits=256, spad_words=4096)
#: a unit whose cycle model is established (tests/hw/test_sfu_resid.py), on spare spad words; long
#: enough (41 cycles) that the controller's prefetch of the next instruction ends inside it, as it does
#: inside the units measured
BASELINE = Instr(Op.RESID_ADD, a=3800, b=3850, d=3900, m=1, n=40)


def unit_program(accel, inputs, ins: Instr, out_at: int, expected):
    """inputs: [(spad address, values)]; the unit's result (``expected``, flat) is STOREd from
    spad[out_at..]. MARKs around a RESID_ADD (the baseline) and around ``ins``. Returns (image, checks,
    the three MARK words)."""
    expected = np.asarray(expected, np.int64).reshape(-1)
    lay = Layout(accel, len(inputs) + 7)
    prog, data = [], []
    for at, vals in inputs:
        vals = np.asarray(vals, np.int64).reshape(-1)
        src = lay.take_elements(vals.size, 64)
        prog.append(Instr(Op.LOAD, flags=FLAG_SIGNED, w=64, a=src, d=at, n=vals.size))
        data.append((src, vals))
    dst = lay.take_elements(expected.size, 64)
    marks = lay.take(1), lay.take(1), lay.take(1)
    prog += [Instr(Op.MARK, d=marks[0]), BASELINE, Instr(Op.MARK, d=marks[1]), ins, Instr(Op.MARK, d=marks[2]),
             Instr(Op.STORE, w=64, a=out_at, d=dst, n=expected.size), Instr(Op.HALT)]
    ib = ImageBuilder(accel)
    ib.program(prog)
    for src, vals in data:
        ib.elements(src, vals, 64)
    return ib.image(lay.next + 1), [(dst, expected.size, 64, True, expected)], marks


def _cases():
    rng = np.random.default_rng(11)
    out = {}
    # RESCALE: two tokens (one dead), 40 rows
    t, n = 2, 40
    acc = rng.integers(-2**31 + 1, 2**31, (t, n))
    acc[0, 0] = 2**31 - 1
    amax = np.array([2**31, 0])
    rm, rs = R.linear_row_multipliers(rng.uniform(1e-3, 0.5, n).astype(np.float16))
    out[Op.RESCALE] = ([(0, acc), (100, amax), (200, rm), (300, rs)],
                       Instr(Op.RESCALE, a=0, b=100, c=200, g=300, d=400, m=t, n=n),
                       R.rescale_linear(acc, rm, rs, *R.token_multiplier(amax)))
    # LOGITS: three queries x 50 keys, SmolLM2's multiplier
    mult, shift = R.softmax_params(64)
    acc = rng.integers(-2**19 + 1, 2**19, (3, 50))
    qa = np.array([0, 65536 * 5, 2**32 - 1])
    kr = rng.integers(0, 2**32, 50)
    z = R.attention_logits(acc, qa, kr, mult, shift)
    out[Op.LOGITS] = ([(0, acc), (200, qa), (300, kr)],
                      Instr(Op.LOGITS, a=0, b=200, c=300, d=400, m=3, n=50, k=mult, s=shift), z)
    # SOFTMAX_EXP of those logits, with both rails in a row
    z = z.copy()
    z[1, :2] = [2**31 - 1, -2**31]
    z[2, :4] = 2**31 - 1 - np.array([0, 65504, 65535, 3 * 65536 + 65510])  # fractions that carry
    out[Op.SOFTMAX_EXP] = ([(0, z)], Instr(Op.SOFTMAX_EXP, a=0, d=200, m=3, n=50), R.softmax_exp(z))
    # ROPE: 2 tokens x 3 heads x 16 channels at the top positions, clamped
    x = rng.integers(-2**31, 2**31, (2, 3, 16))
    theta = R.rope_params(1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16))[0]
    top = 2**31 - 1
    cos, sin = R.rope_cos_sin(np.minimum(top - 1 + np.arange(2), top), theta, R.rope_params(np.zeros(0))[1])
    out[Op.ROPE] = ([(0, x), (200, theta)],
                    Instr(Op.ROPE, a=0, b=200, d=300, m=2, k=3, n=16, i0=top - 1, h=top),
                    R.rope_rotate(x.transpose(1, 0, 2), cos, sin).transpose(1, 0, 2))
    return out


CASES = _cases()


UNITS = [*CASES, Op.RESID_ADD]


def _run_and_check(op, simulator, stall, run_dir, units):
    inputs, ins, want = CASES[op]
    image, checks, marks = unit_program(ACCEL, inputs, ins, ins.d, want)
    accel = ACCEL if simulator == "amaranth" else shared_build.ACCEL  # the shared Verilator build
    run = run_accelerator(EngineParams(), accel, image, simulator=simulator, units=units,
                          run_dir=run_dir, watchdog_cycles=20000, stall_profile=stall, max_cycles=20_000)
    assert run.error == 0, (op.name, run.error_name)
    assert check_memory(run.mem, ACCEL, checks) == [], op.name
    t0, t1, t2 = (int(read_elements(run.mem, ACCEL.mem_word_bits, at, 1, 64)[0]) for at in marks)
    # the unit's cycles, seen by the top, against its model: the same controller overhead as RESID_ADD's
    # when memory never stalls (the MARKs' writes), at least the model when it does
    over_base = t1 - t0 - unit_class(Op.RESID_ADD).cycles(BASELINE, ACCEL)
    over = t2 - t1 - unit_class(op).cycles(ins, ACCEL)
    if stall == "none":
        assert over == over_base, (op.name, over, over_base)
    else:
        assert over >= 0 and over_base >= 0, (op.name, over, over_base)


@pytest.mark.parametrize("op", list(CASES), ids=lambda o: o.name)
@pytest.mark.parametrize("stall", ["none", "asymmetric"])
def test_unit_through_the_accelerator(op, stall, tmp_path):
    _run_and_check(op, "amaranth", stall, tmp_path, [op, Op.RESID_ADD])


@pytest.mark.slow
def test_units_through_the_accelerator_under_verilator(tmp_path):
    """The four programs on the accelerator's Verilog with the four units and RESID_ADD (one build,
    cached under build/accel/), memory with and without stalls."""
    for stall in ("none", "asymmetric"):
        for op in CASES:
            _run_and_check(op, "verilator", stall, tmp_path / f"{op.name}-{stall}", shared_build.UNITS)


@pytest.mark.parametrize("op", list(CASES), ids=lambda o: o.name)
def test_unit_runs_twice_without_leftovers(op, tmp_path):
    """The same opcode twice in a program (as the decoder does: q then k, layer after layer): between
    them a LOAD covers the first result with sentinels; the second run's result is exact and nothing
    of the first run (a pipeline's pending write) reaches the sentinels."""
    from dataclasses import replace

    inputs, ins, want = CASES[op]
    want = np.asarray(want, np.int64).reshape(-1)
    sentinels = np.random.default_rng(3).integers(-2**62, 2**62, want.size)
    ins2 = replace(ins, d=2000)
    lay = Layout(ACCEL, len(inputs) + 6)
    prog, ib = [], ImageBuilder(ACCEL)
    for at, vals in inputs:
        vals = np.asarray(vals, np.int64).reshape(-1)
        src = lay.take_elements(vals.size, 64)
        prog.append(Instr(Op.LOAD, flags=FLAG_SIGNED, w=64, a=src, d=at, n=vals.size))
        ib.elements(src, vals, 64)
    sent_at, out1, out2 = (lay.take_elements(want.size, 64) for _ in range(3))
    ib.elements(sent_at, sentinels, 64)
    prog += [ins, Instr(Op.LOAD, flags=FLAG_SIGNED, w=64, a=sent_at, d=ins.d, n=want.size), ins2,
             Instr(Op.STORE, w=64, a=ins.d, d=out1, n=want.size),
             Instr(Op.STORE, w=64, a=ins2.d, d=out2, n=want.size), Instr(Op.HALT)]
    ib.program(prog)
    run = run_accelerator(EngineParams(), ACCEL, ib.image(lay.next + 1), simulator="amaranth",
                          units=[op], run_dir=tmp_path, watchdog_cycles=20000, stall_profile="none",
                          max_cycles=20_000)
    assert run.error == 0, run.error_name
    assert check_memory(run.mem, ACCEL, [(out1, want.size, 64, True, sentinels),
                                         (out2, want.size, 64, True, want)]) == []
