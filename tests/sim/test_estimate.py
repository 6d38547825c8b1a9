"""sim.estimate / sim.hbm / sim.energy / sim.report and `accllm estimate|report`: the engine cycle model
against the RTL's own cycle counts in Icarus, bytes per token against the packing rules and a real
artifact's report.json, bad input, and the report rendered by headless Chromium."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from accllm.cli import main as cli_main
from accllm.config import load_hw, load_recipe
from quant.formats import weight_bits_per_weight
from sim import engine_check as ec
from sim import estimate as E
from sim import hbm as H
from sim.energy import COEFFICIENTS

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "quant"))


def _require_icarus():
    try:
        ec.find_simulator("icarus")
    except ec.SimulatorMissing as e:
        pytest.skip(str(e))


def _op(p, mode, kb, n, tokens, gb):
    per = 2 * p.pe_lanes if mode.startswith("sparse") else p.pe_lanes
    return E.Op(mode.split("_")[0], tokens, kb * per, n, gb * per)


# (mode, k_beats, rows, tokens, group_beats): few row tiles and short reductions, where every term of the
# model (command, activation load, drain, the output bank's overlap with the next command) is a large
# share of the cycles
SHAPES = [("dense_mv", 2, 5, 1, 1), ("sparse_mv", 3, 7, 1, 3), ("dense_mm", 4, 9, 2, 2), ("qk", 2, 6, 2, 2),
          ("pv", 3, 4, 1, 3), ("sparse_mm", 2, 12, 2, 1), ("dense_mv", 6, 3, 1, 3), ("pv", 5, 8, 2, 5),
          ("qk", 4, 3, 1, 4), ("sparse_mv", 1, 16, 1, 1), ("dense_mm", 1, 1, 2, 1), ("sparse_mm", 5, 4, 1, 5)]


def test_cycle_model_matches_rtl_in_icarus(tmp_path):
    """Every command's cycles from the RTL (Icarus, no stalls, back to back) within 5 % of the model."""
    _require_icarus()
    p = load_hw("ci-small").engine
    rng = np.random.default_rng(3)
    cases, ops = [], []
    for mode, kb, n, t, gb in SHAPES:
        cases.append(ec.make_case(p, mode, rng, k_beats=kb, n=n, tokens=t, group_beats=gb, requant=False))
        ops.append(_op(p, mode, kb, n, t, gb))
    # a few random shapes as well (random k_beats, rows, tokens and group sizes)
    for i, mode in enumerate(ec.MODES):
        c = ec.make_case(p, mode, rng, requant=False, max_k_beats=8, max_tiles=4)
        cases.append(c)
        kb = c.beats["cmd"]["k_beats"][0, 0]
        gb = c.beats["cmd"]["group_beats"][0, 0]
        ops.append(_op(p, mode, int(kb), c.rows, c.tokens, int(gb)))
    actual, _, _ = ec.run_cocotb(p, cases, "icarus", 0, 0.0, False, tmp_path)
    bad, first = ec.check(cases, actual)
    assert bad == 0, first
    measured = ec.case_cycles(cases, list(ec.LAST_STAMPS))
    model = E.sequence_cycles(p, ops, from_reset=True)
    for op, m_rtl, m_mod in zip(ops, measured, model):
        assert abs(m_mod - m_rtl) <= 0.05 * m_rtl, (op, m_rtl, m_mod)
    assert abs(sum(model) - sum(measured)) <= 0.05 * sum(measured)


def test_cycle_model_matches_recorded_verilator_table():
    """The Verilator measurements in benchmarks/results/engine.json (16 row tiles, up to K = 4096)."""
    data = json.loads((REPO / "benchmarks/results/engine.json").read_text())
    p = load_hw("ci-small").engine
    rows = data["throughput"]
    ops = [E.Op(r["mode"].split("_")[0], r["tokens"], r["k"], r["rows"], r["k"]) for r in rows]
    model = E.sequence_cycles(p, ops, from_reset=True)
    for r, m in zip(rows, model):
        assert abs(m - r["cycles"]) <= 0.05 * r["cycles"], (r, m)


def test_engine_refuses_shapes_it_cannot_run():
    p = load_hw("u280").engine
    with pytest.raises(E.EstimateError, match="max_reduction_len"):
        E.op_cycles(p, E.Op("dense", 1, 32768, 256, 64))
    with pytest.raises(E.EstimateError, match="multiple of 64"):
        E.op_cycles(p, E.Op("sparse", 1, 96, 256, 96))
    with pytest.raises(E.EstimateError, match="mm_tokens"):
        E.op_cycles(p, E.Op("qk", 5, 128, 512))


# ---------------------------------------------------------------------------------------------------
def test_bytes_follow_the_packing_rules_on_llama2_7b():
    m = E.load_model("llama2-7b")
    for recipe, sparse in (("w2a8kv4", False), ("w2a8kv4-sparse24", True)):
        fmt = E.ArtifactFormat.from_recipe(load_recipe(recipe))
        assert fmt.sparse is sparse and fmt.lm_head_bits == 4 and (fmt.sinks, fmt.window) == (4, 508)
        bpw = weight_bits_per_weight(64, sparse=sparse)
        expect = sum(n * k * bpw / 8 + 2 * n for n, k in m.linears().values()) * m.layers
        b = E.bytes_per_token(m, fmt, 2048)
        assert b["weights"] == expect
        assert b["lm_head"] == 32000 * 4096 * weight_bits_per_weight(64, sparse=False, code_bits=4) / 8 + 2 * 32000
        # KV: 512 cached tokens x 32 layers x 32 heads x (K + V) x (128 x 4 + 4 + 32) bits
        assert b["kv_read"] == 512 * 32 * 32 * 2 * (128 * 4 + 36) / 8
        assert b["embedding"] == 4096 + 2
    sparse = E.bytes_per_token(m, E.ArtifactFormat.from_recipe(load_recipe("w2a8kv4-sparse24")), 2048)
    assert 1.70e9 < sum(sparse.values()) < 1.80e9  # the issue's ≈ 1.78 GB, recomputed from the format


@pytest.mark.model
@pytest.mark.parametrize("recipe", ["rtn-w2a8kv4", "w2a8kv4-sparse24"])
def test_weight_bytes_equal_a_real_artifact(recipe, tmp_path):
    """The shape-only count equals quantized_weight_bytes of an artifact quantized from a tiny Llama (lm_head
    quantized as a W4 linear through the recipe's override, as the integer decoder does)."""
    from quant.pipeline import quantize_model
    from quant.recipe import QuantizeWeights
    from tiny_llama import make_tiny_llama

    src = tmp_path / "src"
    make_tiny_llama(src, tie=False, n_kv=2, hidden=128, intermediate=256, vocab=384)
    rec = load_recipe(recipe)
    qw = rec.get(QuantizeWeights)
    qw.method, qw.clip_search, qw.overrides = "rtn", False, {"lm_head": 4}
    rep = quantize_model(str(src), rec, tmp_path / "art", calib_samples=2, seq_len=32, progress=False)
    m = E.load_model(str(tmp_path / "art" / "config.json"))
    fmt = E.ArtifactFormat.from_recipe(rec)
    assert E.artifact_weight_bytes(m, fmt) == rep["quantized_weight_bytes"]
    assert rep["quantized_linears"] == 7 * m.layers + 1


def test_bits_per_weight_equal_the_real_smollm2_artifacts():
    """benchmarks/results/quality.json records bits_per_weight (8 x quantized bytes / weights, lm_head in float)
    of the SmolLM2-135M artifacts quantized for the quality table: the shape-only count gives the same."""
    rows = {r["row"]: r for r in json.loads((REPO / "benchmarks/results/quality.json").read_text())["rows"]}
    m = E.load_model("smollm2-135m")
    weights = m.layers * sum(n * k for n, k in m.linears().values())
    for row, recipe in (("gptq", "w2a8kv4"), ("sparse", "w2a8kv4-sparse24")):
        assert rows[row]["recipe"] == recipe
        fmt = E.ArtifactFormat.from_recipe(load_recipe(recipe))
        assert 8 * E.artifact_weight_bytes(m, fmt, with_lm_head=False) / weights == rows[row]["bits_per_weight"]


def test_estimate_fields_and_what_binds():
    cfg = load_hw("u280")
    m = E.load_model("llama2-7b")
    fmt = E.ArtifactFormat.from_recipe(load_recipe("w2a8kv4-sparse24"))
    r = E.estimate(cfg.engine, cfg.target, m, fmt, 2048, hw_name="u280", accel=cfg.accelerator, prefill=False)
    for k, t in (("decode_tokens_per_s", float), ("prefill_tokens_per_s", float), ("power_w", float),
                 ("tokens_per_j", float), ("hbm_bytes_per_token", int), ("hbm_roofline_tokens_per_s", float),
                 ("clock_mhz", float), ("bound_by", str)):
        assert isinstance(r[k] if k != "prefill_tokens_per_s" else 0.0, t), k
    assert r["scope"] == E.SCOPE
    assert r["hbm_roofline_tokens_per_s"] == pytest.approx(460e9 / r["hbm_bytes_per_token"], rel=1e-6)
    assert r["decode_tokens_per_s"] <= r["hbm_roofline_tokens_per_s"]
    assert r["bound_by"] in E.CAUSES + ("hbm",)
    assert r["tokens_per_j"] == pytest.approx(r["decode_tokens_per_s"] / r["power_w"])
    # the memory port: one HBM AXI port's 14.375 GB/s at Shuhai's efficiency, 512-bit words at 225 MHz
    assert r["memory"]["words_per_cycle"] == pytest.approx(14.375e9 * H.SEQUENTIAL_EFFICIENCY / (64 * 225e6))
    # Λ bounds the cache: beyond the window, the bytes stop growing
    r2 = E.estimate(cfg.engine, cfg.target, m, fmt, 16384, hw_name="u280", accel=cfg.accelerator, prefill=False)
    assert r2["hbm_bytes_per_token"] == r["hbm_bytes_per_token"]
    assert r2["decode"]["visible_keys"] == r["decode"]["visible_keys"] == 512


def test_hbm_model_cites_its_measurements():
    assert H.THEORETICAL_GBPS == 460.0
    assert H.efficiency("sequential") == pytest.approx(425 / 460)
    assert H.efficiency("random", 64) == pytest.approx(4.75379 / 14.375)
    assert H.efficiency("random", 1024) == pytest.approx(13.155 / 14.375)
    assert H.efficiency("random", 64) < H.efficiency("random", 96) < H.efficiency("random", 128)
    with pytest.raises(H.HBMError, match="64..1024"):
        H.efficiency("random", 32)
    with pytest.raises(H.HBMError, match="pattern"):
        H.efficiency("strided")


def test_energy_coefficients_are_sourced():
    for k, c in COEFFICIENTS.items():
        assert c.source and c.status in ("cited", "unverified"), k
        assert c.mapping, f"{k}: say how the source's figure was mapped onto the model"
        if c.status == "cited":
            assert "'" in c.source, f"{k}: a cited coefficient quotes the figure it was read from"


def test_energy_model_reproduces_its_sources():
    """Each cited coefficient, put back into the model, gives the figure it was read from (so a unit slip,
    e.g. mW/MHz for uW/MHz, or pJ for fJ, cannot pass), and the target point stays inside the board's
    measured range."""
    from types import SimpleNamespace

    from sim import energy as EN
    # the xcu280 Vivado report: the FSA core (347,543 LUT, 320 DSP, 8 BRAM36 at 70 MHz) draws 3.686 W;
    # its flip-flops are inside the LUT figure, so none are counted again
    fsa = EN.power(None, SimpleNamespace(clock_mhz=70.0), hbm_bytes_per_s=0.0, engine_busy=1.0,
                   resources={"lut": 347_543, "ff": 0, "dsp": 320, "bram36": 8})
    assert fsa["fabric_dynamic_w"] == pytest.approx(3.686, rel=0.02)
    assert fsa["fabric_by_resource_w"]["dsp"] == pytest.approx(0.061, rel=1e-6)
    # FGDRAM (MICRO 2017): 4 TB/s of HBM2 'would dissipate upwards of 120 W'
    gpu = EN.power(None, SimpleNamespace(clock_mhz=225.0), hbm_bytes_per_s=4e12, engine_busy=0.0,
                   resources={"lut": 0, "ff": 0, "dsp": 0, "bram36": 0})
    assert 120 <= gpu["hbm_w"] <= 130
    # the FlexLLM xbutil log's lowest reading: the board figure + that design's VCCINT (0.851 V x 17.160 A)
    # is the 12 V input power it logged
    c = {k: v.value for k, v in COEFFICIENTS.items()}
    assert c["board_overhead_w"] + 0.851 * 17.160 == pytest.approx(37.342674, abs=1e-3)
    # the Vivado report's VCCINT static (0.85 V x 1.679 A) is part of its 3.575 W device static
    assert 1.0 < c["fpga_static_w"] < 3.575
    # the Llama-2-7B target point: above what the board draws with the engine idle, below the 225 W the
    # board's controller reports as its maximum (same log, 'max_power_W'); unverified share as recomputed
    cfg = load_hw("u280")
    r = E.estimate(cfg.engine, cfg.target, E.load_model("llama2-7b"),
                   E.ArtifactFormat.from_recipe(load_recipe("w2a8kv4-sparse24")), 2048, hw_name="u280",
                   accel=cfg.accelerator, prefill=False)
    pw = r["power"]
    assert c["board_overhead_w"] + c["fpga_static_w"] < pw["total_w"] < 225.0
    assert pw["total_w"] == pytest.approx(sum(pw[k] for k in ("fpga_static_w", "fabric_dynamic_w", "hbm_w",
                                                               "board_overhead_w")))
    unv = sum(pw["fabric_by_resource_w"][r_] for r_, k in EN.FABRIC_TERMS if COEFFICIENTS[k].status != "cited")
    assert pw["unverified_share"] == pytest.approx(unv / pw["total_w"])


# ---------------------------------------------------------------------------------------------------
def _cli(capsys, *argv):
    rc = cli_main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_estimate_json(capsys):
    rc, out, _ = _cli(capsys, "estimate", "--hw", "u280", "--model", "smollm2-135m", "--recipe",
                      "w2a8kv4-sparse24", "--context", "2048", "--json")
    assert rc == 0
    d = json.loads(out)
    assert {"decode_tokens_per_s", "prefill_tokens_per_s", "power_w", "tokens_per_j", "hbm_bytes_per_token",
            "hbm_roofline_tokens_per_s", "clock_mhz", "bound_by"} <= set(d)


@pytest.mark.parametrize("argv, message", [
    (["--model", "llama9"], "Known: llama2-7b, llama3-8b, smollm2-135m"),
    (["--recipe", "rtn-w2a8kv4", "--context", "8192"], "max_position_embeddings = 4096"),
    (["--batch", "9"], "act_buffer_bytes"),
    (["--batch", "2"], "batch 1"),
    (["--context", "1"], "give 2 or more"),
    (["--recipe", "fp16"], "quantizes no weights"),
    (["--context", "0"], "at least 1"),
    (["--recipe", "rtn-w2a8kv4", "--context", "4097", "--model", "llama3-8b"], "max_keys = 4096"),
])
def test_cli_bad_input(capsys, argv, message):
    rc, out, err = _cli(capsys, "estimate", *argv)
    assert rc == 2 and out == ""
    assert message in err


def test_model_from_a_config_path(tmp_path, capsys):
    cfg = json.loads((E.MODELS_DIR / "smollm2-135m.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    rc, out, _ = _cli(capsys, "estimate", "--hw", "u280", "--model", str(tmp_path / "config.json"),
                      "--recipe", "w2a8kv4", "--context", "1024", "--json")
    assert rc == 0 and json.loads(out)["model_shape"]["hidden"] == 576
    odd = dict(cfg, hidden_size=600, num_attention_heads=10, num_key_value_heads=5)  # 600 = 18.75 x 32 lanes
    (tmp_path / "odd.json").write_text(json.dumps(odd))
    rc, out, err = _cli(capsys, "estimate", "--hw", "u280", "--model", str(tmp_path / "odd.json"),
                        "--recipe", "w2a8kv4", "--context", "1024")
    assert rc == 2 and out == "" and "does not split into groups of 64" in err
    (tmp_path / "bad.json").write_text("{}")
    rc, _, err = _cli(capsys, "estimate", "--model", str(tmp_path / "bad.json"))
    assert rc == 2 and "lacks hidden_size" in err


# ---------------------------------------------------------------------------------------------------
def test_report_renders_in_headless_chromium(tmp_path, capsys):
    out = tmp_path / "r.html"
    rc, _, _ = _cli(capsys, "report", "--hw", "u280", "--model", "smollm2-135m", "--recipe", "w2a8kv4-sparse24",
                    "--context", "2048", "--out", str(out), "--json-out", str(tmp_path / "r.json"))
    assert rc == 0
    text = out.read_text()
    assert text.count("data:image/png;base64,") == 4 and "http" not in text.split("<body>")[0]
    assert "AccLLM" in text and "FlightLLM" in text and E.SCOPE in text
    assert text.count("$ accllm report --hw u280") == 4  # the command under every figure
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium not installed (Debian: apt-get install chromium; `make setup` installs it): "
                    "the HTML was written and checked, its rendering was not")
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1100,4200", f"--screenshot={shot}", out.as_uri()],
                   check=True, capture_output=True, timeout=120)
    from PIL import Image

    rgb = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert rgb.shape == (4200, 1100, 3)
    # text drew: dark pixels well down the page, not a blank or an error page
    rows_with_ink = np.flatnonzero((rgb.mean(axis=2) < 100).sum(axis=1) > 20)
    assert rows_with_ink.size > 500 and rows_with_ink.max() > 2500
    # the figures drew: only the plots have saturated colour (matplotlib's blue and orange bars and lines);
    # a PNG that does not decode leaves a small grey placeholder
    colour = (rgb.max(axis=2) - rgb.min(axis=2)) > 80
    assert colour.sum() > 20000, colour.sum()
    assert np.flatnonzero(colour.any(axis=1)).max() > 2500  # down to the last figures


@pytest.mark.slow
def test_cycle_model_matches_rtl_on_a_u280_slice(tmp_path):
    """A slice of the u280 engine (its 32 lanes, mm_tokens 4, buffers and limits; 16 of its 256 rows) in
    Icarus: every command within 5 % of the model (measured equal; ~22 s of CPU, most of it Verilog
    conversion and compile)."""
    import dataclasses

    _require_icarus()
    p = dataclasses.replace(load_hw("u280").engine, pe_rows=16)
    rng = np.random.default_rng(5)
    shapes = [("dense_mv", 2, 40, 1, 2), ("sparse_mv", 2, 20, 1, 1), ("dense_mm", 1, 33, 4, 1), ("qk", 4, 17, 3, 4),
              ("pv", 6, 16, 2, 6), ("sparse_mm", 3, 16, 4, 3), ("dense_mv", 4, 16, 1, 2)]
    cases = [ec.make_case(p, mode, rng, k_beats=kb, n=n, tokens=t, group_beats=gb, requant=False)
             for mode, kb, n, t, gb in shapes]
    ops = [_op(p, *s) for s in shapes]
    actual, _, _ = ec.run_cocotb(p, cases, "icarus", 0, 0.0, False, tmp_path)
    bad, first = ec.check(cases, actual)
    assert bad == 0, first
    measured = ec.case_cycles(cases, list(ec.LAST_STAMPS))
    for op, m_rtl, m_mod in zip(ops, measured, E.sequence_cycles(p, ops, from_reset=True)):
        assert abs(m_mod - m_rtl) <= 0.05 * m_rtl, (op, m_rtl, m_mod)


def test_power_uses_the_whole_accelerator_count_of_the_same_config():
    """u280: the counts of benchmarks/results/u280_utilization.json (its engine and accelerator equal the
    config's), URAM included, the engine's share apart; a config no file records (another multiplier
    style, another spad size) falls back to the engine alone and says so."""
    import dataclasses

    from sim import energy as EN
    cfg = load_hw("u280")
    util = json.loads((EN.RESULTS_DIR / "u280_utilization.json").read_text())
    r = EN.accelerator_resources(cfg.engine, cfg.accelerator, "u280")
    assert {k: r[k] for k in EN.RESOURCE_KEYS} == {k: float(util[k]) for k in EN.RESOURCE_KEYS}
    assert r["engine_part"]["lut"] == util["by_component"]["engine"]["lut"]
    assert r["source"].startswith("benchmarks/results/u280_utilization.json (hw u280")
    for other in (dataclasses.replace(cfg.engine, multiplier_style="lut"),):
        fb = EN.accelerator_resources(other, cfg.accelerator, "u280")
        assert fb["source"].startswith("FALLBACK, the engine alone") and fb["uram"] == 0
    fb = EN.accelerator_resources(cfg.engine, dataclasses.replace(cfg.accelerator, spad_words=1 << 19), "u280")
    assert fb["source"].startswith("FALLBACK")
    # the power of those counts: the engine's part at the engine's activity, the rest at full activity
    pw = EN.power(cfg.engine, cfg.target, resources=r, hbm_bytes_per_s=0.0, engine_busy=0.25)
    c = {k: v.value for k, v in COEFFICIENTS.items()}
    lut = 1e-6 * 225.0 * (0.25 * util["by_component"]["engine"]["lut"]
                          + util["lut"] - util["by_component"]["engine"]["lut"]) * c["lut_uw_per_mhz"]
    assert pw["fabric_by_resource_w"]["lut"] == pytest.approx(lut)
    assert pw["fabric_by_resource_w"]["uram"] == pytest.approx(1e-6 * 225.0 * 456 * c["uram_uw_per_mhz"])
    assert "uram_uw_per_mhz" in pw["unverified_coefficients"]
