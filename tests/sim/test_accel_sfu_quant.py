"""QUANT_ACT, QUANT_KV, PV_WEIGHTS and PV_OUT through the accelerator top (``hw.accel`` run by
``sim.accel_sim.run_accelerator``, Amaranth and Verilator): one program LOADs every operand and a
sentinel frame around every destination into the spad, runs the four opcodes (each between MARKs, a
RESID_ADD baseline first), STOREs the frames; each frame must hold the ``quant.reference`` result
between intact sentinels, and each unit's cycles seen by the top must match its behavioural model.
The unit tests (tests/hw/test_sfu_quantize.py, test_sfu_pv.py) cover the edges exhaustively."""

import numpy as np
import pytest
import shared_build  # tests/sim/shared_build.py: the one Verilator build of the whole accelerator

from hw.isa import FLAG_SIGNED, Instr, Op
from hw.params import AccelParams, EngineParams
from hw.sfu.registry import unit_class
from quant import reference as R
from quant.formats import FX
from sim.accel_programs import Layout, check_memory
from sim.accel_sim import ImageBuilder, read_elements, run_accelerator

ACCEL = AccelParams(mem_word_bits=256, spad_words=8192)
UNITS = [Op.QUANT_ACT, Op.QUANT_KV, Op.PV_WEIGHTS, Op.PV_OUT, Op.RESID_ADD]
EDGE = 3
BASELINE = Instr(Op.RESID_ADD, a=8100, b=8124, d=8148, m=1, n=24)
#: (24 elements: longer than the controller's prefetch of the next instruction, so the baseline's
#: controller overhead is the fixed one, as for the longer units; docs/isa.md, "Controller")


def _operands(rng):
    """[(instr, [(spad address, input values)], [(spad address, expected values)])] for the four units."""
    cases = []
    # QUANT_ACT: 3 rows of 200 (a zero row, the rails, full range)
    x = rng.integers(FX.min, FX.max + 1, (3, 200))
    x[0] = 0
    x[1, :4] = [FX.min, FX.max, 1, -1]
    codes, amax = R.quantize_activations(x)
    cases.append((Instr(Op.QUANT_ACT, a=0, d=700, e=1400, m=3, n=200), [(0, x)], [(700, codes), (1400, amax)]))
    # QUANT_KV: 4 heads-tokens of 64 (range 0, the widest range, all positive, random)
    x = rng.integers(-2**22, 2**22, (4, 64))
    x[0], x[1, :2], x[2] = 0, [FX.min, FX.max], np.abs(x[2])
    kc, kz, kr = R.quantize_kv(x)
    cases.append((Instr(Op.QUANT_KV, a=1500, d=1800, e=2100, f=2110, m=4, n=64), [(1500, x)],
                  [(1800, kc), (2100, kz), (2110, kr)]))
    # PV_WEIGHTS: 2 query rows over 300 keys, e from the softmax, ranges with both ends
    e = R.softmax_exp(rng.integers(-2**21, 2**21, (2, 300)))
    e[1, :3] = [0, 1 << 16, 1]
    vr = rng.integers(0, 2**32, 300)
    vr[:2] = [0, 2**32 - 1]
    pa, wmax, esum = R.pv_weights(e, vr)
    cases.append((Instr(Op.PV_WEIGHTS, a=2200, b=2800, d=3200, e=3900, f=3910, m=2, n=300),
                  [(2200, e), (2800, vr)], [(3200, pa), (3900, wmax), (3910, esum)]))
    # PV_OUT: 6 rows of 64 with wmax / esum from the decoder's range to the 62-bit limits (shift 64 among them)
    acc = rng.integers(-2**24 + 1, 2**24, (6, 64))
    acc[:, :2] = [2**24 - 1, -(2**24 - 1)]
    wm = np.array([0, 1, 2**16, 2**48 - 2**16, 2**62 - 1, int(wmax[0])])
    es = np.array([2**16, 5_000_000, 1, 2**28, (2**62 - 1) // 1905, int(esum[0])])
    cases.append((Instr(Op.PV_OUT, a=4000, b=4400, c=4410, d=4500, m=6, n=64),
                  [(4000, acc), (4400, wm), (4410, es)], [(4500, R.pv_output(acc, wm, es))]))
    return cases


def build_program(seed: int):
    rng = np.random.default_rng(seed)
    cases = _operands(rng)
    regions, frames = [], []
    for _, inputs, outputs in cases:
        regions += [(at, np.asarray(v, np.int64).reshape(-1)) for at, v in inputs]
        for at, want in outputs:
            want = np.asarray(want, np.int64).reshape(-1)
            frame = rng.integers(-2**62, 2**62, want.size + 2 * EDGE)
            regions.append((at - EDGE, frame))
            exp = frame.copy()
            exp[EDGE:EDGE + want.size] = want
            frames.append((at - EDGE, exp))
    n_instr = len(regions) + 3 + 2 * len(cases) + len(frames) + 1
    lay = Layout(ACCEL, n_instr)
    ib = ImageBuilder(ACCEL)
    prog = []
    for at, vals in regions:
        src = lay.take_elements(vals.size, 64)
        ib.elements(src, vals, 64)
        prog.append(Instr(Op.LOAD, flags=FLAG_SIGNED, w=64, a=src, d=at, n=vals.size))
    marks = [lay.take(1) for _ in range(len(cases) + 2)]
    prog += [Instr(Op.MARK, d=marks[0]), BASELINE, Instr(Op.MARK, d=marks[1])]
    for k, (ins, _, _) in enumerate(cases):
        prog += [ins, Instr(Op.MARK, d=marks[k + 2])]
    checks = []
    for at, exp in frames:
        dst = lay.take_elements(exp.size, 64)
        prog.append(Instr(Op.STORE, w=64, a=at, d=dst, n=exp.size))
        checks.append((dst, exp.size, 64, True, exp))
    prog.append(Instr(Op.HALT))
    assert len(prog) == n_instr
    ib.program(prog)
    return ib.image(lay.next + 1), checks, marks, [c[0] for c in cases]


def _check_run(run, checks, marks, instrs, stall):
    assert run.error == 0, (run.error_name, run.pc)
    bad = check_memory(run.mem, ACCEL, checks)
    assert not bad, bad
    t = [int(read_elements(run.mem, ACCEL.mem_word_bits, at, 1, 64)[0]) for at in marks]
    over_base = t[1] - t[0] - unit_class(Op.RESID_ADD).cycles(BASELINE, ACCEL)
    for k, ins in enumerate(instrs):
        over = t[k + 2] - t[k + 1] - unit_class(ins.op).cycles(ins, ACCEL)
        if stall == "none":  # the same controller overhead as the baseline's: the model is exact
            assert over == over_base, (ins.op.name, over, over_base)
        else:
            assert over >= 0, (ins.op.name, over)


def test_quant_pv_units_through_the_top_amaranth():
    """Memory that never stalls: each unit's cycles at the top are exactly its model's."""
    image, checks, marks, instrs = build_program(seed=21)
    run = run_accelerator(EngineParams(), ACCEL, image, simulator="amaranth", units=UNITS,
                          watchdog_cycles=20000, stall_profile="none")
    _check_run(run, checks, marks, instrs, "none")


@pytest.mark.slow
def test_quant_pv_units_through_the_top_verilator(tmp_path):
    """The accelerator's Verilog (these four units and RESID_ADD) under Verilator: stalling memory, then
    memory that never stalls (exact cycles); one build."""
    image, checks, marks, instrs = build_program(seed=22)
    run = run_accelerator(EngineParams(), shared_build.ACCEL, image, simulator="verilator", units=shared_build.UNITS,
                          run_dir=tmp_path / "run", watchdog_cycles=20000, stall_profile="asymmetric")
    _check_run(run, checks, marks, instrs, "asymmetric")
    run = run_accelerator(EngineParams(), shared_build.ACCEL, image, simulator="verilator", units=shared_build.UNITS,
                          run_dir=tmp_path / "run2", watchdog_cycles=20000, stall_profile="none")
    _check_run(run, checks, marks, instrs, "none")
