"""quant.modifiers: orders that cannot run are refused by name (reading the YAML and in quantize_model),
orders that cannot matter give the same bytes, and a modifier's declared needs decide what is computed."""

import subprocess
import sys

import pytest

from accllm.config import ConfigError, from_data
from quant import modifiers as M
from quant.errors import QuantError
from quant.pipeline import quantize_model
from quant.recipe import MODIFIERS, Prune, QuantizeKV, QuantizeWeights, Reconstruct, Recipe
from tiny_llama import make_tiny_llama

CAL = dict(calib_samples=4, seq_len=64, progress=False)
QW = {"quantize_weights": {"bits": 2, "method": "gptq", "clip_search": False, "overrides": {"lm_head": 4}}}


def _recipe(*mods, name="t"):
    return from_data({"recipe": {"name": name, "modifiers": list(mods)}}, "test").recipe


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    make_tiny_llama(d, tie=False, n_kv=2)
    return d


@pytest.mark.parametrize("mods, first, later", [
    ([QW, {"prune": {}}], "quantize_weights", "prune"),
    ([QW, {"reconstruct": {}}, {"quantize_kv": {}}], "reconstruct", "quantize_kv"),
    ([QW, {"reconstruct": {}}, {"quantize_activations": {}}], "reconstruct", "quantize_activations"),
    ([{"reconstruct": {}}, QW], "reconstruct", "quantize_weights"),
])
def test_an_order_that_cannot_run_is_refused_by_name(tiny, tmp_path, mods, first, later):
    with pytest.raises(ConfigError, match=f"{first} is listed before {later}.*list {later} before {first}"):
        _recipe(*mods)
    rec = Recipe(name="t", modifiers=[MODIFIERS[next(iter(m))](**next(iter(m.values()))) for m in mods])
    with pytest.raises(QuantError, match=f"{first} is listed before {later}"):
        quantize_model(str(tiny), rec, tmp_path / "o", **CAL)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_reconstruct_without_simulation_may_precede_the_activation_numerics():
    _recipe(QW, {"reconstruct": {"simulate_quant": False}}, {"quantize_activations": {}})
    with pytest.raises(ConfigError, match="reconstruct is listed before quantize_activations"):
        _recipe(QW, {"reconstruct": {"simulate_quant": True}}, {"quantize_activations": {}})


def test_orders_that_cannot_matter_give_the_same_bytes(tiny, tmp_path):
    """The numerics modifiers commute, key smoothing acts on the float weights before any compression
    wherever quantize_kv is listed, and the embedding is quantized before any layer."""
    import hashlib

    a = [{"prune": {"method": "wanda"}}, QW, {"quantize_embedding": {}}, {"quantize_activations": {}},
         {"quantize_kv": {}}, {"attention_window": {"sinks": 2, "window": 30}}]
    b = [{"attention_window": {"sinks": 2, "window": 30}}, {"quantize_kv": {}}, {"quantize_embedding": {}},
         {"prune": {"method": "wanda"}}, {"quantize_activations": {}}, QW]
    digest = []
    for k, mods in enumerate((a, b)):
        quantize_model(str(tiny), _recipe(*mods), tmp_path / str(k), **CAL)
        digest.append(hashlib.sha256((tmp_path / str(k) / "model.safetensors").read_bytes()).hexdigest())
    assert digest[0] == digest[1]


def test_declared_needs_decide_what_is_computed(tiny, tmp_path):
    """Plain RTN and the numerics need no calibration data: none is read; GPTQ, pruning, key smoothing and
    reconstruction do, and say so."""
    rtn = _recipe({"quantize_weights": {"method": "rtn", "clip_search": False}}, {"quantize_kv": {"k_smoothing": False}},
                  {"quantize_activations": {}}, {"attention_window": {}})
    assert set().union(*(m.needs() for m in M.build(rtn))) == set()
    rep = quantize_model(str(tiny), rtn, tmp_path / "rtn", **CAL)
    assert rep["calibration_tokens"] == 0
    for mods, need in [([QW], "input_stats"), ([{"prune": {}}], "input_stats"),
                       ([{"quantize_kv": {}}], "activations"), ([QW, {"reconstruct": {}}], "float_stream")]:
        assert need in set().union(*(m.needs() for m in M.build(_recipe(*mods)))), mods


def test_every_modifier_has_a_class_that_does_its_work():
    assert set(M.MODIFIER_CLASSES) == set(MODIFIERS.values())
    for cfg in (Prune(), QuantizeWeights(), QuantizeKV(), Reconstruct()):
        assert isinstance(M.MODIFIER_CLASSES[type(cfg)](cfg, Recipe()), M.Modifier)


def test_device_is_an_option_that_is_checked():
    """--device came back with a device path (tests/quant/test_device.py): it is checked before anything
    else, so a device torch does not see is named even when the model path is wrong too."""
    r = subprocess.run([sys.executable, "-m", "accllm.cli", "quantize", "x", "--recipe", "fp16", "--out", "y",
                        "--device", "mps"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--device mps" in r.stderr and "unrecognized" not in r.stderr, r.stderr
