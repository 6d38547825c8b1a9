"""Reference <-> cocotb on the engine's generated Verilog, under Verilator and under Icarus, each run in
its own build folder, with random shapes, random stalls on every stream and edge values."""

import shutil
from pathlib import Path

import pytest

from accllm.config import load_hw
from sim.engine_check import MODES, SimulatorMissing, find_simulator, simulate_engine


def _require(simulator):
    try:
        find_simulator(simulator)
    except SimulatorMissing as e:
        pytest.skip(str(e))


@pytest.mark.slow
@pytest.mark.parametrize("simulator", ["icarus", "verilator"])
def test_cocotb_bit_exact_all_modes(simulator, tmp_path):
    _require(simulator)
    p = load_hw("ci-small").engine
    res = simulate_engine(p, simulator, 36, seed=21, stall_probability=0.3, build_dir=tmp_path)
    assert res["bit_exact"], res.get("first_mismatch")
    assert res["cases"] == 36 and set(res["modes"]) == set(MODES)
    assert res["cycles"] > 0 and res["macs"] > 0
    assert tmp_path in Path(res["run_dir"]).parents  # its own build folder


def test_missing_simulator_is_named(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SimulatorMissing) as e:
        find_simulator("icarus")
    assert str(e.value) == "iverilog not found: apt-get install iverilog"
