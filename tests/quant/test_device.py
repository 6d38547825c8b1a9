"""``--device`` (quantize, eval, generate): every tensor where it is asked for, the integer path still exact.

Two kinds of check. (1) On every device torch sees here (``DEVICES``: the CPU, and each CUDA device where
there is one: the same tests run on a GPU machine), quantizing, evaluating and generating on the device
give what the CPU gives: the integer path the same integers (token ids and per-window losses equal), the
artifact a valid one whose integer route equals the golden model. (2) On the CPU, with torch's *default*
device set to ``meta`` for the whole run: a tensor made without an explicit device (``torch.zeros(n)``,
``torch.arange(t)``, ``torch.as_tensor(t)``, an ``nn.Module`` built inside the run) lands on meta, has no
data, and the run fails on it; with the device threaded through, the run gives the CPU's exact results.
That is the class of bug a CUDA run would hit (a tensor left on the default device), caught on a machine
without a GPU. What it cannot catch here: a CPU tensor from disk not moved to the device (on the CPU that is
where it should be); those moves are at the entry points (``Run``, ``load_model``, ``stream_logits``,
``train_e2e``) and a GPU run of these tests checks them.

A device torch does not see (``cuda`` without a GPU, ``mps``, a typo) is refused by name before any work,
exit status 2, nothing written."""

import json

import numpy as np
import pytest
import torch

import recipe_hashes as RH
from accllm.cli import main as cli_main
from accllm.config import load_recipe
from quant.errors import QuantError
from quant.evaluate import evaluate, generate
from quant.integer import generate_against_golden
from quant.loading import load_model
from quant.pipeline import quantize_model
from quant.recipe import QuantizeWeights, Recipe, TrainE2E
from quant.runtime import resolve_device
from tiny_llama import make_tiny_llama

pytestmark = pytest.mark.model

DEVICES = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
CAL = dict(calib_samples=8, seq_len=64, seed=0, progress=False)
EVAL = dict(seq_len=64, max_tokens=320, progress=False, bootstrap=0)


def _recipe(name):
    rec = load_recipe(name)
    rec.get(QuantizeWeights).clip_search = False  # fast: the device handling is under test, not the search
    return rec


def _e2e(rec):  # every stage that trains: reconstruction (in the recipe) and a short end-to-end stage
    return Recipe(name=rec.name + "-e2e", modifiers=list(rec.modifiers) + [
        TrainE2E(steps=4, lr=0.05, row_scale_lr=0.002, batch_samples=2, seq_len=32)])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("dev")
    make_tiny_llama(d / "m", tie=False, n_kv=2)
    quantize_model(str(d / "m"), _recipe("w2a8kv4"), d / "art", **CAL)
    return d


@pytest.mark.parametrize("device", DEVICES)
def test_eval_and_generate_on_the_device_equal_the_cpu(tiny, device):
    """The artifact's integer path on ``device``: the same per-window losses as on the CPU, whole and
    streamed, and the same greedy tokens as the numpy golden model; the float path the same losses on the
    CPU and within float rounding on a GPU."""
    art = str(tiny / "art")
    ref = evaluate(art, None, **EVAL)
    for streamed in (False, True):
        got = evaluate(art, None, **EVAL, device=device, stream_layers=streamed)
        assert got["integer_path"] and got["device"] == str(torch.device(device))
        assert got["window_nll"] == ref["window_nll"]
    f_ref = evaluate(str(tiny / "m"), None, **EVAL)
    f_got = evaluate(str(tiny / "m"), None, **EVAL, device=device)
    if device == "cpu":
        assert f_got["window_nll"] == f_ref["window_nll"]
    else:
        np.testing.assert_allclose(f_got["window_nll"], f_ref["window_nll"], rtol=1e-4)
    model, tok = load_model(art, resolve_device(device))
    assert all(t.device == torch.device(device) for t in list(model.parameters()) + list(model.buffers()))
    res = generate_against_golden(model, tok("The", add_special_tokens=True)["input_ids"], 12)
    assert res["equal"], res
    assert generate(art, "The", 12, device=device) == generate(art, "The", 12)


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_on_the_device(tiny, tmp_path, device):
    """Quantizing on ``device`` (GPTQ, the reconstruction and the end-to-end stage there): on the CPU the
    bytes of the default run; on a GPU a valid artifact (float reduction order may flip a code, so its bytes
    are not compared) whose integer path equals the golden model. The report names the device."""
    rec = _e2e(_recipe("w2a8kv4-recon"))
    rep = quantize_model(str(tiny / "m"), rec, tmp_path / "dev", **CAL, device=device)
    assert rep["device"] == str(torch.device(device))
    model, tok = load_model(str(tmp_path / "dev"))
    assert generate_against_golden(model, tok("The", add_special_tokens=True)["input_ids"], 8)["equal"]
    if device == "cpu":
        quantize_model(str(tiny / "m"), rec, tmp_path / "default", **CAL)
        assert RH.artifact_digest(tmp_path / "dev") == RH.artifact_digest(tmp_path / "default")


RECIPES = ["w2a8kv4-recon", "w2a8kv4-sparse24", "w2a8kv4-rot", "rtn-w2a8kv4"]


@pytest.fixture(scope="module")
def plain(tiny, tmp_path_factory):
    """Each recipe's artifact quantized the ordinary way (torch's default device the CPU)."""
    d = tmp_path_factory.mktemp("plain")
    for name in RECIPES:
        rec = _e2e(_recipe(name)) if name == "w2a8kv4-recon" else _recipe(name)
        quantize_model(str(tiny / "m"), rec, d / name, **CAL)
    return d


@pytest.mark.parametrize("name", RECIPES)
def test_quantize_makes_no_tensor_on_the_default_device(tiny, plain, tmp_path, name):
    """With torch's default device ``meta``, quantizing on the CPU gives the ordinary run's bytes: every
    tensor the pipeline makes (calibration, Hessians, GPTQ, SparseGPT, the rotation, the reconstruction and
    the end-to-end stage, whose recipe here is w2a8kv4-recon + train_e2e) is made on an explicit device.
    Planted: ``torch.zeros(n, ng, dtype=torch.int64)`` (no device) for GPTQ's scales in _obs_pass
    ("Tensor.item() cannot be called on meta tensors" and the like: failed); torch.arange(x.shape[1]) in
    Run.forward (failed)."""
    rec = _e2e(_recipe(name)) if name == "w2a8kv4-recon" else _recipe(name)
    with torch.device("meta"):
        quantize_model(str(tiny / "m"), rec, tmp_path / name, **CAL, device="cpu")
    assert RH.artifact_digest(tmp_path / name) == RH.artifact_digest(plain / name)


def test_eval_and_generate_make_no_tensor_on_the_default_device(tiny):
    """The same for evaluation (the float route, the integer route whole and streamed, Λ attention in query
    blocks) and generation through the caches. Planted: the KV cache's ``torch.zeros`` without the device
    (failed: generate); the integer decoder's ``torch.arange(nh)`` for GQA without the device (failed)."""
    art, m = str(tiny / "art"), str(tiny / "m")
    want = [evaluate(art, None, **EVAL, attention="2,16"), evaluate(art, None, **EVAL, stream_layers=True),
            evaluate(m, None, **EVAL), evaluate(m, None, **EVAL, attention="2,16")]
    toks = (generate(art, "The", 8), generate(m, "The", 8))
    with torch.device("meta"):
        got = [evaluate(art, None, **EVAL, attention="2,16", device="cpu"),
               evaluate(art, None, **EVAL, stream_layers=True, device="cpu"),
               evaluate(m, None, **EVAL, device="cpu"), evaluate(m, None, **EVAL, attention="2,16", device="cpu")]
        assert (generate(art, "The", 8, device="cpu"), generate(m, "The", 8, device="cpu")) == toks
    assert [g["window_nll"] for g in got] == [w["window_nll"] for w in want]


ABSENT = ["gpu", "mps"] + (["cuda"] if not torch.cuda.is_available() else [f"cuda:{torch.cuda.device_count()}"])


@pytest.mark.parametrize("device", ABSENT)
def test_a_device_torch_does_not_see_is_refused_before_any_work(tiny, tmp_path, capsys, device):
    art, m = str(tiny / "art"), str(tiny / "m")
    out = tmp_path / "q"
    for argv in (["quantize", m, "--recipe", "w2a8kv4", "--out", str(out)], ["eval", art, "--json"],
                 ["generate", art, "--prompt", "The"], ["generate", art, "--prompt", "The", "--golden"]):
        assert cli_main(argv + ["--device", device]) == 2
        err = capsys.readouterr().err
        assert f"--device {device}" in err.replace("'", "") and "error" in err, err
    assert not out.exists() and not list(tmp_path.iterdir())
    with pytest.raises(QuantError, match="cpu"):
        resolve_device(device)


def test_cli_device_cpu_is_the_default(tiny, capsys):
    art = str(tiny / "art")
    assert cli_main(["eval", art, "--json", "--max-tokens", "320", "--seq-len", "64", "--bootstrap", "0"]) == 0
    a = json.loads(capsys.readouterr().out)
    assert cli_main(["eval", art, "--json", "--max-tokens", "320", "--seq-len", "64", "--bootstrap", "0",
                     "--device", "cpu"]) == 0
    b = json.loads(capsys.readouterr().out)
    assert a["device"] == b["device"] == "cpu" and a["window_nll"] == b["window_nll"]
    assert resolve_device(None) == resolve_device("") == torch.device("cpu")


def test_run_config_device_is_checked_before_any_step(tmp_path, capsys):
    """``model.device`` in a run config: a device torch does not see stops ``accllm run`` before the first
    step, naming the key, exit 2, no output folder; ``cpu`` runs (the config step records it)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  device: mps\n")
    out = tmp_path / "run"
    assert cli_main(["run", "--config", str(bad), "--out", str(out), "--quiet", "--steps", "config"]) == 2
    err = capsys.readouterr().err
    assert "model.device" in err and "--device mps" in err, err
    assert not out.exists()
    good = tmp_path / "good.yaml"
    good.write_text("model:\n  device: cpu\n")
    assert cli_main(["run", "--config", str(good), "--out", str(out), "--quiet", "--steps", "config"]) == 0
    assert "device: cpu" in (out / "config" / "resolved.yaml").read_text()
