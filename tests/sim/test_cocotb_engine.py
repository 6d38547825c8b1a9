"""Reference <-> cocotb on the engine's generated Verilog, under Verilator and under Icarus, each run in
its own build folder, with random shapes, the stall profiles of sim/stalls.py, edge values, the
harness's watchdog, and a slice of the u280 configuration."""

import dataclasses
import shutil
from pathlib import Path

import pytest

from accllm.config import load_hw
from sim import planted
from sim.engine_check import (MODES, EngineHang, SimulatorMissing, check, find_simulator, full_size_cases,
                              hazard_cases, make_cases, run_cocotb, simulate_engine)


def _require(simulator):
    try:
        find_simulator(simulator)
    except SimulatorMissing as e:
        pytest.skip(str(e))


@pytest.mark.slow
@pytest.mark.parametrize("simulator, profile", [("icarus", "bursty"), ("verilator", "asymmetric")])
def test_cocotb_bit_exact_all_modes(simulator, profile, tmp_path):
    _require(simulator)
    p = load_hw("ci-small").engine
    res = simulate_engine(p, simulator, 36, seed=21, stall_probability=0.3, build_dir=tmp_path,
                          stall_profile=profile)
    assert res["bit_exact"], res.get("first_mismatch")
    assert res["cases"] == 36 and set(res["modes"]) == set(MODES) and res["stall_profile"] == profile
    assert res["cycles"] > 0 and res["macs"] > 0
    assert tmp_path in Path(res["run_dir"]).parents  # its own build folder


@pytest.mark.slow
def test_cocotb_watchdog_names_the_hang(tmp_path):
    """The Verilog harness's watchdog (the same code under Verilator and Icarus; Icarus here, it
    builds in a second): an engine that loses an op (sim/planted.py) fails with the cycle and the
    stopped stream named instead of hanging the simulator."""
    _require("icarus")
    p = load_hw("ci-small").engine
    cases = hazard_cases(p, 0)
    with pytest.raises(EngineHang) as e:
        run_cocotb(p, cases, "icarus", 0, 0.0, False, tmp_path, stall_profile="hazard", watchdog_cycles=500,
                   engine_factory=planted.load("no_hold_on_stall").Engine)
    h = e.value
    assert h.simulator == "icarus" and "out" in h.stopped and h.limit == 500
    assert h.state["out"]["taken"] < h.state["out"]["total"] and 500 < h.cycle < 5000
    assert f"watchdog at cycle {h.cycle}" in str(h)


@pytest.mark.slow
def test_verilator_u280_slice_hazard_and_full_size(tmp_path):
    """The u280 configuration's lane width and widths (32 lanes, 4 prefill tokens, K up to 16,384, a
    64 KiB activation buffer) with 2 of its 256 rows, under Verilator: full-size reductions, the
    directed hazard cases and random cases, output stalled 80 %, inputs never."""
    _require("verilator")
    p = dataclasses.replace(load_hw("u280").engine, pe_rows=2)
    cases = (full_size_cases(p, 0, modes=("dense_mv", "sparse_mm", "qk")) + hazard_cases(p, 0)
             + make_cases(p, 12, seed=5, max_k_beats=4))
    assert max(int(c.beats["cmd"]["k_beats"][0][0]) for c in cases) == p.max_reduction_len // p.pe_lanes
    actual, cycles, _ = run_cocotb(p, cases, "verilator", 0, 0.0, False, tmp_path, stall_profile="hazard")
    bad, first = check(cases, actual)
    assert bad == 0, first
    assert cycles > 0


def test_missing_simulator_is_named(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SimulatorMissing) as e:
        find_simulator("icarus")
    assert str(e.value) == "iverilog not found: apt-get install iverilog"


@pytest.mark.slow
def test_verilator_dsp_style_all_modes(tmp_path):
    """multiplier_style dsp (hw/engine_dsp.py) under Verilator: every mode, asymmetric stalls."""
    _require("verilator")
    p = dataclasses.replace(load_hw("ci-small").engine, multiplier_style="dsp")
    res = simulate_engine(p, "verilator", 36, seed=21, stall_probability=0.3, build_dir=tmp_path,
                          stall_profile="asymmetric")
    assert res["bit_exact"], res.get("first_mismatch")
    assert res["cases"] == 36 and set(res["modes"]) == set(MODES)
