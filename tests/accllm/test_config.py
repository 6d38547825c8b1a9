"""YAML configuration: defaults round-trip, built-ins load, every kind of bad input is named."""

from pathlib import Path

import pytest
import yaml

from accllm import config as C
from quant.recipe import AttentionWindow, Prune, QuantizeWeights

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_dump_round_trips():
    text = C.dump()
    assert C.from_data(yaml.safe_load(text)) == C.Config()
    cfg = C.load(REPO / "configs/recipes/w2a8kv4-sparse24.yaml", REPO / "configs/hw/u280.yaml")
    assert C.from_data(yaml.safe_load(C.dump(cfg))) == cfg


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")) + sorted((REPO / "benchmarks").rglob("*.yaml")),
                         ids=lambda p: p.name)
def test_builtin_configs_load(path):
    C.load(path)


def test_builtin_recipes_have_expected_modifiers():
    r = C.load_recipe("w2a8kv4-sparse24")
    assert isinstance(r.modifiers[0], Prune) and r.get(QuantizeWeights).group_size == 64
    assert r.get(AttentionWindow).sinks == 4
    assert C.load_recipe("fp16").modifiers == []
    assert C.load_recipe("rtn-w2a8kv4").get(QuantizeWeights).method == "rtn"
    u280 = C.load_hw("u280")
    assert u280.engine.macs_per_cycle == 8192
    # the u280 sizing claim: compute covers a full-bandwidth dense W2 g64 weight stream
    from quant.formats import weight_bits_per_weight
    weights_per_cycle = u280.target.hbm_bytes_per_cycle * 8 / weight_bits_per_weight(64, sparse=False)
    assert u280.engine.macs_per_cycle >= weights_per_cycle


def test_misspelled_key_is_named_with_suggestion(tmp_path):
    p = _write(tmp_path, "engine:\n  pe_lanez: 8\n")
    with pytest.raises(C.ConfigError) as e:
        C.load(p)
    msg = str(e.value)
    assert str(p) in msg and "engine.pe_lanez" in msg and "did you mean 'pe_lanes'" in msg


def test_misspelled_section_and_modifier(tmp_path):
    with pytest.raises(C.ConfigError, match="enigne.*did you mean 'engine'"):
        C.load(_write(tmp_path, "enigne: {}\n"))
    with pytest.raises(C.ConfigError, match=r"recipe.modifiers\[0\].*did you mean 'quantize_weights'"):
        C.load(_write(tmp_path, "recipe:\n  modifiers:\n    - quantise_weights: {bits: 2}\n"))
    with pytest.raises(C.ConfigError, match=r"recipe.modifiers\[0\].quantize_weights.gruop_size.*group_size"):
        C.load(_write(tmp_path, "recipe:\n  modifiers:\n    - quantize_weights: {gruop_size: 64}\n"))


@pytest.mark.parametrize("text,match", [
    ("engine:\n  pe_rows: four\n", r"engine.pe_rows: expected an integer"),
    ("engine:\n  pe_rows: true\n", r"engine.pe_rows: expected an integer"),
    ("engine:\n  pe_rows: 0\n", r"engine.pe_rows: 0 is below the minimum 1"),
    ("target:\n  clock_mhz: 5000\n", r"target.clock_mhz: 5000.0 is above the maximum"),
    ("simulation:\n  simulator: modelsim\n", r"simulation.simulator: 'modelsim' is not one of"),
    ("recipe:\n  modifiers:\n    - quantize_weights: {bits: 3}\n", r"bits: 3 is not one of \[2, 4\]"),
    ("recipe:\n  modifiers:\n    - quantize_activations: {bits: 4}\n", r"bits: 4 is not one of \[8\]"),
    ("engine:\n  pe_lanes: 7\n  max_reduction_len: 7\n", r"engine.pe_lanes: must be even"),
    ("engine:\n  acc_bits: 24\n", r"engine.acc_bits: 24 bits cannot hold"),
    ("engine:\n  max_keys: 4092\n", r"engine.max_keys: 4092 is not a multiple of pe_lanes = 8"),
    ("recipe:\n  modifiers:\n    - quantize_weights: {group_size: 36}\n",
     r"group_size: 36 is not a multiple of engine.pe_lanes = 8"),
    ("recipe:\n  modifiers:\n    - prune: {}\n    - quantize_weights: {group_size: 8}\n",
     r"with 2:4 pruning a group of 8 inputs has 4 kept weights"),
    ("recipe:\n  modifiers:\n    - reconstruct: {}\n", r"reconstruct needs a quantize_weights"),
    ("recipe:\n  modifiers:\n    - prune: {targets: [q_prj]}\n", r"unknown projection 'q_prj'"),
    ("- a list\n", r"top level must be a mapping"),
    ("engine: [1, 2\n", r"malformed YAML: line"),
])
def test_bad_values_are_named(tmp_path, text, match):
    with pytest.raises(C.ConfigError, match=match):
        C.load(_write(tmp_path, text))


def test_missing_file_and_unknown_builtin(tmp_path):
    with pytest.raises(C.ConfigError, match="file not found"):
        C.load(tmp_path / "nope.yaml")
    with pytest.raises(C.ConfigError, match="did you mean 'w2a8kv4'"):
        C.load_recipe("w2a8kv5")


def test_later_files_override_earlier(tmp_path):
    a = _write(tmp_path, "engine: {pe_rows: 2}\n", "a.yaml")
    b = _write(tmp_path, "engine: {pe_lanes: 16}\n", "b.yaml")
    cfg = C.load(a, b)
    assert (cfg.engine.pe_rows, cfg.engine.pe_lanes) == (2, 16)
