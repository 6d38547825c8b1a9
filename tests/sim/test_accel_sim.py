"""The accelerator under Verilator and Icarus (sim/accel_sim.py: the Verilog memory model, $readmemh
image, $writememh result), and the RTL's final memory against the machine model (hw/machine.py).
Verilator is built once per design (cached under build/accel/); the first build takes about a minute."""

import shutil

import numpy as np
import pytest
import shared_build  # tests/sim/shared_build.py: the one Verilator build of the whole accelerator

from hw import machine
from hw.controller import AccelError
from hw.isa import Instr, Op, encode
from hw.params import AccelParams, EngineParams
from sim.accel_programs import (ImageBuilder, check_memory, engine_program, load_store_program, resid_program,
                                scatter_program)
from sim.accel_sim import AccelHang, MemoryRangeError, run_accelerator

P = EngineParams()
A256 = shared_build.ACCEL  # 256-bit words; the Verilator tests share its build
A64 = AccelParams(mem_word_bits=64, spad_words=2048)
#: every unit: the Verilator tests run on the one shared build (tests/sim/shared_build.py)
UNITS = shared_build.UNITS
#: what the programs use, for the simulators that elaborate or build a design per run (Amaranth, Icarus)
SMALL = [Op.RESID_ADD]
needs_iverilog = pytest.mark.skipif(shutil.which("iverilog") is None, reason="iverilog not installed "
                                    "(apt-get install iverilog)")


def programs(accel):
    return {
        "load_store": load_store_program(accel, seed=11),
        "scatter": scatter_program(accel, seed=5),
        "resid": resid_program(accel, seed=2),
        "dense_mv": engine_program(P, accel, "dense", 1, tokens=1, k_beats=4, n=9, group_beats=2, g=1, h=8, gap=3),
        "dense_mm": engine_program(P, accel, "dense", 2, tokens=2, k_beats=3, n=6, b=19, i0=11, count=2),
        "sparse": engine_program(P, accel, "sparse", 3, tokens=2, k_beats=2, n=8, h=7, gap=2),
        "qk": engine_program(P, accel, "qk", 4, tokens=2, k_beats=2, n=7, g=2, b=13),
        "pv": engine_program(P, accel, "pv", 5, tokens=2, k_beats=3, n=6, h=5, gap=1, i0=9),
    }


def _run_all(simulator, accel, profile, tmp_path, latency, units=UNITS):
    for name, (img, checks, _) in programs(accel).items():
        r = run_accelerator(P, accel, img, simulator=simulator, stall_profile=profile, mem_latency=latency,
                            seed=7, run_dir=tmp_path / name, units=units)
        assert r.error == 0, (name, r.error_name)
        bad = check_memory(r.mem, accel, checks)
        assert not bad, (name, bad)


def test_verilator_directed_programs(tmp_path):
    """Every directed program (LOAD/STORE all widths, SCATTER, RESID_ADD, ENGINE in each mode) under
    Verilator with the asymmetric stall profile and a latency of 13 cycles."""
    _run_all("verilator", A256, "asymmetric", tmp_path, 13)


def test_verilator_errors_and_hangs(tmp_path):
    """The Verilog harness reports the error register, a range error and a hang like the Amaranth one."""
    ib = ImageBuilder(A256)
    ib.program([Instr(Op.NOP), Instr(Op.LOAD, w=12, a=0, d=0, n=1), Instr(Op.HALT)])
    r = run_accelerator(P, A256, ib.image(8), simulator="verilator", run_dir=tmp_path / "bad_width", units=UNITS)
    assert r.error == AccelError.BAD_WIDTH and r.pc == 1
    ib = ImageBuilder(A256)
    ib.place(0, [encode(Instr(Op.NOP)) & ((1 << 256) - 1), 0])
    ib.place(2, [7, 0])  # opcode 7 is not an instruction
    r = run_accelerator(P, A256, ib.image(8), simulator="verilator", run_dir=tmp_path / "unknown", units=UNITS)
    assert r.error == AccelError.UNKNOWN_OPCODE and r.pc == 1
    ib = ImageBuilder(A256)
    ib.program([Instr(Op.NOP), Instr(Op.LOAD, w=64, a=100, d=0, n=8), Instr(Op.HALT)])
    with pytest.raises(MemoryRangeError, match=r"read port 0: job of 2 words at word 100 .*16 words .*pc 1, LOAD"):
        run_accelerator(P, A256, ib.image(16), simulator="verilator", run_dir=tmp_path / "range", units=UNITS)
    ib = ImageBuilder(A256)
    ib.program([Instr(Op.HALT)])
    with pytest.raises(AccelHang, match=r"no progress for 20 cycles .*pc 0 .*state FETCH_DATA"):
        run_accelerator(P, A256, ib.image(4), simulator="verilator", mem_latency=300, watchdog_cycles=20,
                        run_dir=tmp_path / "hang", units=UNITS)


@pytest.mark.slow
@pytest.mark.heavy  # a second accelerator build (64-bit words); Amaranth covers W=64 by default
def test_verilator_w64_bursty_all_units(tmp_path):
    """The same programs with 64-bit memory words (multi-word instructions and beats), bursty stalls,
    on the accelerator with every unit that exists."""
    _run_all("verilator", A64, "bursty", tmp_path, 5, units=None)


@needs_iverilog
@pytest.mark.slow
def test_icarus_engine_program(tmp_path):
    """One ENGINE program (and its LOAD/STORE) under Icarus, bursty stalls: the Verilog is portable."""
    img, checks, _ = engine_program(P, A256, "dense", 2, tokens=2, k_beats=2, n=6, b=13, i0=8, g=1)
    r = run_accelerator(P, A256, img, simulator="icarus", stall_profile="bursty", mem_latency=9,
                        run_dir=tmp_path / "icarus", units=SMALL)
    assert r.error == 0
    assert not check_memory(r.mem, A256, checks)


def _random_programs(accel, seed, count):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        kind = ("ls", "scatter", "dense", "sparse", "qk", "pv", "resid")[i % 7]
        s = int(rng.integers(1 << 20))
        if kind == "ls":
            out.append(load_store_program(accel, s))
        elif kind == "scatter":
            out.append(scatter_program(accel, s))
        elif kind == "resid":
            out.append(resid_program(accel, s, T=int(rng.integers(1, 4)), N=int(rng.integers(1, 40))))
        else:
            tokens = int(rng.integers(1, P.mm_tokens + 1))
            kb = int(rng.integers(1, 4)) * (1 if kind != "qk" else 1)
            n = int(rng.integers(1, 3 * P.pe_rows + 1))
            kt = kb * P.pe_lanes * (2 if kind == "sparse" else 1)
            g = int(rng.integers(0, n))
            out.append(engine_program(P, accel, kind, s, tokens=tokens, k_beats=kb, n=n,
                                      b=int(rng.integers(1, kt + 1)), g=g, h=int(rng.integers(g + 1, n + 1)),
                                      i0=int(n + rng.integers(0, 4)), gap=int(rng.integers(0, 3))))
    return out


@pytest.mark.parametrize("simulator", ["amaranth", "verilator"])
def test_final_memory_equals_machine_model(simulator, tmp_path):
    """Random programs (random shapes, strides, filters, widths): the RTL's whole final memory equals
    hw.machine.run's (MARK words excepted: the machine's cycle count is an estimate)."""
    count = 4 if simulator == "amaranth" else 14
    for i, (img, checks, info) in enumerate(_random_programs(A256, 100 + (simulator == "verilator"), count)):
        r = run_accelerator(P, A256, img, simulator=simulator, stall_profile=("asymmetric", "bursty")[i % 2],
                            mem_latency=3 + i, seed=i, run_dir=tmp_path / f"p{i}",
                            units=UNITS if simulator != "amaranth" else SMALL)
        ref = machine.run(img, P, A256)
        assert r.error == 0 and r.instrs == ref.instrs
        got, exp = r.mem.copy(), ref.mem.copy()
        if "mark" in info:
            at = info["mark"] * 32
            got[at:at + 32] = exp[at:at + 32] = 0
        diff = np.flatnonzero(got != exp)
        assert diff.size == 0, f"program {i}: first differing byte {diff[:1]} (word {diff[:1] // 32})"
        assert not check_memory(r.mem, A256, checks)
