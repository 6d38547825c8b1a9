"""The artifact bytes of every built-in recipe on the tiny test models, as SHA-256 digests.

``python tests/quant/recipe_hashes.py`` (from the repository root, ``OMP_NUM_THREADS=1``) quantizes the
tiny random Llamas of ``tiny_llama.py`` with every recipe in ``configs/recipes/`` and writes
``tests/quant/data/recipe_hashes.json`` (``--add RECIPE ...`` adds the digests of a recipe newer than the
fixture, leaving the others as they are). The committed file was generated *before* the pipeline was
rewritten as a loop over modifiers (issue 11 item 3); ``test_recipe_hashes.py`` re-quantizes and requires
the same digests, so the refactor provably changed no byte of any artifact.

Some recipes' bytes depend on the CPU, not on the pipeline: float reductions run in another order on
another CPU's vector kernels, and where a result is rounded to a 2-bit code or drives an Adam step
(SparseGPT's updates, the reconstruction) one ulp becomes a different artifact. Measured: on an AMD EPYC
(torch's AVX512 kernels), 5 of the 26 recipes gave other bytes than the fixture made on the machine of the
pre-refactor run, on both models (the three reconstruction recipes and the SparseGPT variants
x-prune-sparsegpt-only and x-partial-targets), the same bytes at each run there. So the fixture
keeps, per model and recipe, the digests of each further CPU it was run on (``cpu_variants``, each labelled with
``cpu_label()``): ``--cpu-variant`` re-quantizes every recipe with the current pipeline and records the
digests that differ from every recorded set, under this machine's label. The test accepts a recorded set
only: a pipeline change still gives bytes that no CPU recorded.

What is hashed: ``model.safetensors`` (every tensor), ``recipe.yaml``, ``config.json`` and the manifest's
deterministic part (runtime numerics, calibration windows and the text's file name, the key-smoothing, reconstruction and
end-to-end training logs without their seconds); not timings, paths, tool versions or RSS. The tiny checkpoint's own digest is
recorded too, so a changed input (another transformers' initialisation, say) is told apart from a changed
pipeline.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = Path(__file__).resolve().parent / "data" / "recipe_hashes.json"
#: the tiny models: the fixture of test_pipeline.py (untied, GQA 4:2) and a tied one (GQA 4:1)
MODELS = {"untied-gqa2": dict(tie=False, n_kv=2), "tied-gqa1": dict(tie=True, n_kv=1, seed=1)}
#: calibration as in test_pipeline.py's CAL, a little more so the reconstruction has batches to draw
CALIB = dict(calib_samples=4, seq_len=64, seed=0)
#: recipes beyond the built-in ones, for the pipeline's branches they leave out (pruning alone, Wanda,
#: RTN with the clipping search, per-layer overrides, partial targets, reconstruction of the codes)
VARIANTS = {
    "x-prune-sparsegpt-only": [{"prune": {"method": "sparsegpt"}}],
    "x-prune-wanda-only": [{"prune": {"method": "wanda", "targets": ["gate_proj", "up_proj", "down_proj"]}}],
    "x-wanda-gptq": [{"prune": {"method": "wanda"}},
                     {"quantize_weights": {"bits": 2, "group_size": 32, "method": "gptq", "act_order": False}},
                     {"quantize_kv": {"bits": 4, "k_smoothing": False}}],
    "x-sparsegpt-rtn": [{"prune": {"method": "sparsegpt"}},
                        {"quantize_weights": {"bits": 2, "method": "rtn", "clip_search": True}},
                        {"quantize_activations": {"bits": 8}}],
    "x-rtn-clip-overrides": [{"quantize_weights": {"bits": 2, "method": "rtn", "clip_search": True,
                                                   "overrides": {"lm_head": 4, "model.layers.1.self_attn.*": 4,
                                                                 "down_proj": 4}}},
                             {"quantize_embedding": {"bits": 8}}],
    "x-partial-targets": [{"prune": {"method": "sparsegpt", "targets": ["gate_proj", "up_proj"]}},
                          {"quantize_weights": {"bits": 2, "targets": ["q_proj", "k_proj", "o_proj", "up_proj"]}},
                          {"quantize_kv": {"bits": 4, "k_smoothing_alpha": 0.5}},
                          {"attention_window": {"sinks": 2, "window": 30}}],
    "x-recon-codes": [{"quantize_weights": {"bits": 2, "method": "gptq", "overrides": {"lm_head": 4}}},
                      {"quantize_activations": {"bits": 8}},
                      {"quantize_kv": {"bits": 4}},
                      {"reconstruct": {"steps": 20, "tune_codes": True, "loss": "token_relative",
                                       "simulate_quant": False, "row_scale_lr": 0.0, "seq_len": 0}}],
}


def recipes() -> list[str]:
    """Every built-in recipe, then the variants."""
    return sorted(p.stem for p in (ROOT / "configs" / "recipes").glob("*.yaml")) + list(VARIANTS)


def load(recipe: str):
    from accllm.config import from_data, load_recipe

    if recipe in VARIANTS:
        return from_data({"recipe": {"name": recipe, "modifiers": VARIANTS[recipe]}}, f"VARIANTS[{recipe!r}]").recipe
    return load_recipe(recipe)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stable(man: dict) -> dict:
    def strip(entries):
        return None if entries is None else [{k: v for k, v in e.items() if k != "seconds"} for e in entries]

    cal = man["calibration"] and {**man["calibration"], "text": Path(man["calibration"]["text"]).name}  # not the clone's path
    out = {"runtime": man["runtime"], "calibration": cal, "not_applied": man["not_applied"],
           "k_smoothing": man["k_smoothing"], "reconstruct": strip(man["reconstruct"])}
    if "train_e2e" in man:  # only recipes with the end-to-end stage: the others' digests stay as recorded
        out["train_e2e"] = {k: v for k, v in man["train_e2e"].items() if k != "seconds"}
    return out


def artifact_digest(folder: Path) -> dict:
    man = json.loads((folder / "manifest.json").read_text())
    stable = json.dumps(_stable(man), sort_keys=True).encode()
    return {"model.safetensors": sha(folder / "model.safetensors"), "recipe.yaml": sha(folder / "recipe.yaml"),
            "config.json": sha(folder / "config.json"), "manifest": hashlib.sha256(stable).hexdigest()}


def checkpoint_digest(folder: Path) -> str:
    return sha(folder / "model.safetensors")


def make_model(name: str, folder: Path) -> Path:
    from tiny_llama import make_tiny_llama

    make_tiny_llama(folder, **MODELS[name])
    return folder


def quantize(model_dir: Path, recipe: str, out: Path) -> dict:
    from quant.pipeline import quantize_model

    quantize_model(str(model_dir), load(recipe), out, progress=False, **CALIB)
    return artifact_digest(out)


def generate() -> dict:
    import torch

    res = {"generated_with": {"torch_threads": torch.get_num_threads(), "calibration": CALIB},
           "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            d = make_model(name, Path(tmp) / name)
            res["models"][name] = {"checkpoint": checkpoint_digest(d), "recipes": {}}
            for r in recipes():
                res["models"][name]["recipes"][r] = quantize(d, r, Path(tmp) / f"{name}-{r}")
                print(name, r, res["models"][name]["recipes"][r]["model.safetensors"][:16], flush=True)
    return res


def cpu_label() -> str:
    """What the float reduction order depends on: the CPU model and torch's vector kernels."""
    import platform

    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}; torch {torch.__version__} {torch.backends.cpu.get_cpu_capability()}"


def recorded(res: dict, model: str, recipe: str) -> list[dict]:
    """Every digest set the fixture accepts for ``model`` / ``recipe``: the pre-refactor one, then one per
    further CPU (``{"digests": ..., "recorded_on": cpu_label()}``)."""
    return [res["models"][model]["recipes"][recipe]] + [
        v["digests"] for v in res.get("cpu_variants", {}).get(model, {}).get(recipe, [])]


def requantized(res: dict, names: list[str]):
    """(model, recipe, digests) for ``names`` on each tiny model, quantized by the current pipeline after
    checking that the tiny checkpoint is still the fixture's."""
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            d = make_model(name, Path(tmp) / name)
            assert checkpoint_digest(d) == res["models"][name]["checkpoint"], f"the tiny checkpoint {name} changed"
            for r in names:
                yield name, r, quantize(d, r, Path(tmp) / f"{name}-{r}")


def add_cpu_variant(res: dict) -> dict:
    """Re-quantize every recipe here and record, under this CPU's label, the digests no recorded set has."""
    label = cpu_label()
    for name, r, got in requantized(res, recipes()):
        new = got not in recorded(res, name, r)
        if new:
            res.setdefault("cpu_variants", {}).setdefault(name, {}).setdefault(r, []).append(
                {"digests": got, "recorded_on": label})
        print(name, r, "new on this CPU" if new else "as recorded", flush=True)
    return res


def add(names: list[str], res: dict) -> dict:
    """Digests of recipes the committed fixture lacks (newer than the pre-refactor pipeline), added with the
    current pipeline; the existing digests are left as they are and must still reproduce."""
    for name, r, got in requantized(res, names):
        res["models"][name]["recipes"][r] = got
        print(name, r, got["model.safetensors"][:16], flush=True)
    res["generated_with"].setdefault("added_later", {}).update(
        {r: "by the modifier loop (the recipe is newer than the pre-refactor pipeline)" for r in names})
    return res


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(ROOT))
    if sys.argv[1:2] == ["--cpu-variant"]:  # python tests/quant/recipe_hashes.py --cpu-variant
        res = add_cpu_variant(json.loads(FIXTURE.read_text()))
    elif sys.argv[1:2] == ["--add"]:  # python tests/quant/recipe_hashes.py --add RECIPE [RECIPE ...]
        res = add(sys.argv[2:], json.loads(FIXTURE.read_text()))
    else:
        res = generate()
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    tmp = FIXTURE.with_name(f".{FIXTURE.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    tmp.replace(FIXTURE)
    print(f"wrote {FIXTURE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
