"""The end-to-end training stage (recipe modifier ``train_e2e``, quant/e2e.py) on the tiny random Llamas:
the loss falls, the artifact is what was trained and still the hardware's format (the integer path equals
the golden model bit for bit), continuing an artifact gives the bytes of the whole recipe, the same bytes
at 1 and 2 threads, and bad options are refused by name."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import recipe_hashes as RH
from accllm.config import ConfigError, from_data, load_recipe
from quant.artifact import load_artifact
from quant.e2e import hidden, objective, pieces, training_numerics
from quant.errors import QuantError
from quant.model import QLinear
from quant.pipeline import quantize_model
from quant.recipe import QuantizeWeights, Recipe, TrainE2E
from test_integer import assert_integer_route_exact
from tiny_llama import make_tiny_llama

pytestmark = pytest.mark.model
#: 16 x 64 calibration tokens: 32 training pieces of 32 tokens, 4 of them held out
CAL = dict(calib_samples=16, seq_len=64, seed=0, progress=False)
E2E = dict(steps=30, lr=0.05, row_scale_lr=0.002, batch_samples=4, seq_len=32)


def _base(name="w2a8kv4"):
    rec = load_recipe(name)
    rec.get(QuantizeWeights).clip_search = False  # fast; the training stage is what is under test
    return rec


def _with_e2e(rec, **kw):
    return Recipe(name=rec.name + "-e2e", modifiers=list(rec.modifiers) + [TrainE2E(**(E2E | kw))])


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    """The tiny tied model, its w2a8kv4 artifact and the same recipe followed by train_e2e."""
    d = tmp_path_factory.mktemp("e2e")
    make_tiny_llama(d / "m", tie=True, n_kv=2)
    base = _base()
    quantize_model(str(d / "m"), base, d / "base", **CAL)
    quantize_model(str(d / "m"), _with_e2e(base), d / "e2e", **CAL)
    return d


def _fields(art):
    model, _ = load_artifact(art)
    return {m.name: m.q for m in model.modules() if isinstance(m, QLinear)}


def test_training_lowers_the_held_out_loss_and_changes_every_kind_of_field(arts):
    """Planted: ``loss.backward()`` removed from train_e2e's loop (no gradient reaches the scales): the
    held-out loss stayed 0.14316 before and after, ``improved`` False, and this test failed on its first
    assert."""
    st = json.loads((arts / "e2e" / "manifest.json").read_text())["train_e2e"]
    assert st["improved"] and st["probe_loss_after"] < st["probe_loss_before"], st
    tr = st["train_loss_trace"]
    assert len(tr) == 10 and np.mean(tr[-3:]) < np.mean(tr[:3]), tr
    assert st["train_sequences"] == 28 and st["probe_sequences"] == 4 and st["seq_len"] == 32
    base, e2e = _fields(arts / "base"), _fields(arts / "e2e")
    assert set(base) == set(e2e) and "lm_head" in e2e
    changed = {k: sum(not np.array_equal(getattr(base[n], k), getattr(e2e[n], k)) for n in base)
               for k in ("scales", "mins", "row_scale", "codes")}
    assert changed["scales"] and changed["mins"] and changed["row_scale"], changed
    assert changed["codes"] == 0, "train_e2e must keep the codes frozen"
    rep = json.loads((arts / "e2e" / "report.json").read_text())
    assert rep["bits_per_weight"] == json.loads((arts / "base" / "report.json").read_text())["bits_per_weight"]
    assert "train_e2e" in rep["seconds_per_step"]


def test_the_artifact_is_what_was_trained(arts):
    """The held-out loss the training measured at its end (on its FakeQuantLinear fields) is the loss of
    the artifact as written, read back and run with the training numerics: the exported integers and
    float16 row scales are the trained ones. Planted: ``FakeQuantLinear.to_quantized`` exporting the group
    scales as floor(ŝ) instead of the rounded values: the artifact's held-out loss 0.11942 against the
    trained 0.12321, and this test failed."""
    from quant.data import calibration_windows

    st = json.loads((arts / "e2e" / "manifest.json").read_text())["train_e2e"]
    model, tok = load_artifact(arts / "e2e")
    teacher, _ = __import__("quant.loading", fromlist=["load_model"]).load_model(str(arts / "m"))
    ids = pieces(calibration_windows(tok, None, CAL["calib_samples"], CAL["seq_len"], CAL["seed"])[0], 32)[-4:]
    from quant.e2e import fake_quantize

    nm = training_numerics(model.numerics, True)
    fake_quantize(model, TrainE2E(**E2E), nm)
    with torch.no_grad():
        got = float(objective(model.head(hidden(model, ids)), ids, teacher.head(hidden(teacher, ids)), "kl"))
    assert got == pytest.approx(st["probe_loss_after"], rel=1e-5, abs=1e-7), (got, st["probe_loss_after"])


def test_trained_artifact_runs_the_integer_path_bit_exactly(arts):
    """The trained fields are still the hardware's: every linear validates, and the torch integer decoder
    equals the numpy golden model tensor for tensor (and step for step), under Λ too."""
    for q in _fields(arts / "e2e").values():
        q.validate()
    model, _ = load_artifact(arts / "e2e")
    model.numerics.sinks, model.numerics.window = 3, 9
    model.numerics.integer_path = True
    assert_integer_route_exact(model, np.random.default_rng(7).integers(0, 300, 24))


def test_continuing_an_artifact_gives_the_whole_recipes_bytes(arts, tmp_path):
    """``quantize_model`` (``accllm quantize``) from the w2a8kv4 artifact with w2a8kv4 + train_e2e writes
    the same model.safetensors, recipe.yaml, config.json and manifest (stable part, the training log
    included) as quantizing the checkpoint with w2a8kv4 + train_e2e."""
    rep = quantize_model(str(arts / "base"), _with_e2e(_base()), tmp_path / "cont", **CAL)
    assert rep["continued_from"] == str(arts / "base")
    assert RH.artifact_digest(tmp_path / "cont") == RH.artifact_digest(arts / "e2e")
    man = json.loads((tmp_path / "cont" / "manifest.json").read_text())
    assert man["train_e2e"]["probe_loss_after"] == json.loads((arts / "e2e" / "manifest.json").read_text())[
        "train_e2e"]["probe_loss_after"]


@pytest.mark.parametrize("recipe,cal,match", [
    (lambda b: _with_e2e(_base("rtn-w2a8kv4")), {}, r"modifiers\[0\] differs"),
    (lambda b: _with_e2e(load_recipe("w2a8kv4")), {}, r"modifiers\[0\] differs.*clip_search.: True"),
    (lambda b: _with_e2e(_base("w2a8kv4-recon")), {}, r"made with 5 modifiers, the recipe has 6 before train_e2e"),
    (lambda b: b, {}, r"does not end with modifiers that continue"),
    (lambda b: _with_e2e(b), {"seed": 1}, r"calibrated on 16 x 64 tokens of .*seed 0; give the same calibration"),
    (lambda b: _with_e2e(b), {"calib_samples": 8}, r"give the same calibration"),
])
def test_continuing_refuses_what_would_not_equal_the_whole_recipe(arts, tmp_path, recipe, cal, match):
    with pytest.raises(QuantError, match=match):
        quantize_model(str(arts / "base"), recipe(_base()), tmp_path / "x", **(CAL | cal))
    assert not (tmp_path / "x").exists()


def test_continuing_a_trained_artifact_is_refused(arts, tmp_path):
    with pytest.raises(QuantError, match="already made with train_e2e"):
        quantize_model(str(arts / "e2e"), _with_e2e(_with_e2e(_base())), tmp_path / "x", **CAL)


def test_a_calibration_too_small_to_hold_one_out_is_refused(arts, tmp_path):
    with pytest.raises(QuantError, match=r"1 training sequence of 64 tokens: one must be held out"):
        quantize_model(str(arts / "m"), _with_e2e(_base(), seq_len=64), tmp_path / "x",
                       **(CAL | {"calib_samples": 1}))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("mods,match", [
    ([{"train_e2e": {"loss": "mse"}}], r"train_e2e.*loss"),
    ([{"train_e2e": {"steps": 0}}], r"train_e2e.*steps"),
    ([{"train_e2e": {"stpes": 5}}], r"stpes"),
    ([{"train_e2e": {}}], r"train_e2e needs a quantize_weights"),
    ([{"train_e2e": {}}, {"quantize_weights": {}}], r"train_e2e is listed before quantize_weights"),
    ([{"quantize_weights": {}}, {"train_e2e": {}}, {"quantize_kv": {}}], r"train_e2e is listed before quantize_kv"),
    ([{"quantize_weights": {}}, {"train_e2e": {}}, {"reconstruct": {}}], r"train_e2e is listed before reconstruct"),
])
def test_bad_options_are_refused_by_name(mods, match):
    with pytest.raises(ConfigError, match=match):
        from_data({"recipe": {"name": "x", "modifiers": mods}}, "test")


def test_without_simulation_it_may_precede_the_activation_numerics():
    from_data({"recipe": {"name": "x", "modifiers": [{"quantize_weights": {}},
                                                     {"train_e2e": {"simulate_quant": False}},
                                                     {"quantize_activations": {}}]}}, "test")


def test_ce_loss_is_the_next_token_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits, ids = torch.randn(2, 5, 11, generator=g), torch.randint(0, 11, (2, 5), generator=g)
    want = -torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    assert float(objective(logits, ids, None, "ce")) == pytest.approx(float(want), rel=1e-6)
    assert float(objective(logits, ids, logits, "kl")) == pytest.approx(0.0, abs=1e-6)
    assert float(objective(logits, ids, logits.flip(-1), "kl")) > 0


@pytest.mark.slow
def test_same_bytes_at_1_and_2_threads(tmp_path):
    """The CLI's quantize with a recipe ending in train_e2e, at 1 and 2 threads (each in its own process):
    the same artifact bytes."""
    src = tmp_path / "m"
    make_tiny_llama(src, tie=False, n_kv=2)
    yml = tmp_path / "r.yaml"
    mods = [{"quantize_weights": {"bits": 2, "method": "gptq", "clip_search": False, "overrides": {"lm_head": 4}}},
            {"quantize_embedding": {}}, {"quantize_activations": {}}, {"quantize_kv": {}},
            {"train_e2e": E2E | {"steps": 12}}]
    import yaml

    yml.write_text(yaml.safe_dump({"recipe": {"name": "t", "modifiers": mods}}))
    got = {}
    for n in (1, 2):
        out = tmp_path / f"t{n}"
        env = dict(os.environ, OMP_NUM_THREADS=str(n), PYTHONPATH=str(RH.ROOT))
        r = subprocess.run([sys.executable, "-m", "accllm.cli", "quantize", str(src), "--recipe", str(yml),
                            "--out", str(out), "--calib-samples", "16", "--seq-len", "64", "--threads", str(n),
                            "--quiet", "--json"], capture_output=True, text=True, timeout=600, env=env,
                           cwd=str(RH.ROOT))
        assert r.returncode == 0, r.stderr[-2000:]
        got[n] = RH.artifact_digest(out)
        assert json.loads((out / "manifest.json").read_text())["train_e2e"]["improved"]
    assert got[1] == got[2], got


def _own_text(tmp_path):
    """A training text of its own: the second half of the built-in evaluation excerpt (not the calibration
    text), written to a file."""
    src = (Path(__file__).resolve().parents[2] / "quant" / "data" / "eval-pride-and-prejudice.txt").read_text()
    p = tmp_path / "own.txt"
    p.write_text(src[len(src) // 2:])
    return p


def test_the_stage_can_train_on_a_text_of_its_own(arts, tmp_path):
    """``train_e2e: {text: FILE, samples: N}``: the stage trains on N windows of the calibration length drawn
    from FILE, not on the calibration sequences: the manifest names the text and windows, the fields differ
    from training on the calibration set, the artifact is still exact on the integer path, and continuing
    the base artifact gives the whole recipe's bytes. A recipe without the option keeps its recipe.yaml
    (no text / samples keys: test_recipe_hashes holds the bytes). Planted: training_ids returning run.ids
    whatever cfg.text says (no "data" in the manifest: failed). Planted: quantize_model not calling
    Modifier.calibrated (test_a_bad_training_text_is_refused_before_any_layer failed)."""
    from quant.data import calibration_windows
    from quant.e2e import training_ids

    own = _own_text(tmp_path)
    rec = _with_e2e(_base(), text=str(own), samples=12)
    quantize_model(str(arts / "m"), rec, tmp_path / "own", **CAL)
    man = json.loads((tmp_path / "own" / "manifest.json").read_text())
    data = man["train_e2e"]["data"]
    assert data["text"] == str(own) and data["samples"] == 12 and data["seq_len"] == CAL["seq_len"]
    assert man["train_e2e"]["train_sequences"] + man["train_e2e"]["probe_sequences"] == 24  # 12 x 64 -> 24 x 32
    assert man["calibration"]["text"].endswith("calib-sense-and-sensibility.txt")  # the layers' calibration
    mine, base = _fields(tmp_path / "own"), _fields(arts / "e2e")
    assert any(not np.array_equal(mine[k].scales, base[k].scales) for k in mine)
    model, _ = load_artifact(tmp_path / "own")
    model.numerics.integer_path = True
    assert_integer_route_exact(model, np.random.default_rng(5).integers(0, 300, 16))
    rep = quantize_model(str(arts / "base"), rec, tmp_path / "cont", **CAL)
    assert rep["continued_from"] and RH.artifact_digest(tmp_path / "cont") == RH.artifact_digest(tmp_path / "own")

    class R:  # training_ids reads the run's tokenizer, calibration length and seed only
        tok, seed, ids = load_artifact(arts / "base")[1], 0, torch.zeros(1, CAL["seq_len"], dtype=torch.long)
    ids, info = training_ids(rec.modifiers[-1], R)
    assert torch.equal(ids, calibration_windows(R.tok, own, 12, CAL["seq_len"], 0)[0]) and info["windows"]
    assert "text:" not in (arts / "e2e" / "recipe.yaml").read_text()


@pytest.mark.parametrize("kw,match", [
    ({"text": "MISSING", "samples": 4}, r"train_e2e.text: .*missing.txt: no such file"),
    ({"text": "OWN", "samples": 100_000}, r"train_e2e.text: .*too short.*fewer train_e2e.samples"),
    ({"samples": 4}, r"TrainE2E.text: samples: 4 draws windows from a text"),
    ({"text": "OWN"}, r"samples.*needs samples >= 1"),
])
def test_a_bad_training_text_is_refused_before_any_layer(arts, tmp_path, monkeypatch, kw, match):
    """From the checkpoint and from an artifact: refused by name, nothing written, and before any layer
    starts (the text is read with the calibration, Modifier.calibrated; a layer opened fails the test)."""
    from quant.pipeline import Run

    def no_layer(self, i):
        raise AssertionError(f"layer {i} was started before the bad text was refused")

    monkeypatch.setattr(Run, "open_layer", no_layer)
    own = str(_own_text(tmp_path))
    kw = {k: (own if v == "OWN" else str(tmp_path / "missing.txt") if v == "MISSING" else v) for k, v in kw.items()}
    for src in ("m", "base"):
        with pytest.raises(QuantError, match=match):
            quantize_model(str(arts / src), _with_e2e(_base(), **kw), tmp_path / "x", **CAL)
        assert not (tmp_path / "x").exists()
