"""`accllm run`: the end-to-end flow as ordered, resumable steps (in the manner of FINN's build steps).

Each step has a key (a hash of the configuration it reads and of the steps before it). Its results go
to ``OUT/<step>/`` through a temporary folder moved into place when complete, with ``step.json``
recording the key; a rerun skips a step whose key is unchanged. A step returns a dict that becomes
part of the run summary and may set ``ok: False`` to stop the flow.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from . import config as config_mod
from .config import Config


@dataclass
class Step:
    name: str
    reads: Callable[[Config], object]  # the part of the configuration the step depends on
    run: Callable[[Config, Path, dict], dict]
    doc: str


def _step_doctor(cfg: Config, out: Path, done: dict) -> dict:
    from .doctor import doctor

    rep = doctor()
    (out / "doctor.json").write_text(json.dumps(rep, indent=2))
    missing = [k for k, t in rep["tools"].items() if t["required"] and not t["ok"]]
    return {"ok": rep["ok"], "missing_or_wrong": missing}


def _step_config(cfg: Config, out: Path, done: dict) -> dict:
    (out / "resolved.yaml").write_text(config_mod.dump(cfg))
    return {"ok": True, "recipe": cfg.recipe.name, "engine_macs_per_cycle": cfg.engine.macs_per_cycle}


def _step_numerics(cfg: Config, out: Path, done: dict) -> dict:
    """Self-check of the integer reference on the configured shapes: formats, bounds, round trips."""
    from quant import formats as F
    from quant import packing as P
    from quant import reference as R
    from quant.recipe import QuantizeWeights

    rng = np.random.default_rng(cfg.model.seed)
    qw = cfg.recipe.get(QuantizeWeights) or QuantizeWeights()
    g = qw.group_size
    k = max(g, 4 * cfg.engine.pe_lanes) * 2
    w = rng.normal(size=(16, k))
    codes, s, m, S = R.quantize_weights_rtn(w, g)
    a, amax = R.quantize_activations(R.to_fx(rng.normal(size=(3, k))))
    mask = R.random_24_mask(rng, 16, k)
    kept, meta = R.compress_24(codes, mask)
    checks = {
        "w2_pack_roundtrip": bool(np.array_equal(P.unpack_w2(P.pack_w2(codes), k), codes)),
        "meta_pack_roundtrip": bool(np.array_equal(P.unpack_sparse_meta(P.pack_sparse_meta(meta), k // 4), meta)),
        "sparse_equals_masked_dense": bool(np.array_equal(
            R.w2a8_sparse_linear(a, kept, meta, s, m, g), R.w2a8_linear(a, codes, s, m, g, mask=mask))),
    }
    bounds = {
        "linear_max_reduction_len": F.linear_acc_bound(cfg.engine.max_reduction_len),
        "qk_max_head_dim": F.qk_acc_bound(cfg.engine.max_head_dim),
        "pv_max_keys": F.pv_acc_bound(cfg.engine.max_keys),
        "acc_bits": cfg.engine.acc_bits,
    }
    bpw = {"dense": F.weight_bits_per_weight(g, sparse=False), "sparse24": F.weight_bits_per_weight(g, sparse=True)}
    rep = {"ok": all(checks.values()), "checks": checks, "acc_bounds": bounds,
           "bits_per_weight_g%d" % g: bpw}
    (out / "numerics.json").write_text(json.dumps(rep, indent=2))
    return rep


def _step_quantize(cfg: Config, out: Path, done: dict) -> dict:
    from quant.pipeline import quantize_model

    m = cfg.model
    report = quantize_model(m.source, cfg.recipe, out / "artifact", calib_text=m.calib_text or None,
                            calib_samples=m.calib_samples, seq_len=m.calib_seq_len, seed=m.seed,
                            progress=True, device=m.device)
    keep = ("bits_per_weight", "size_bytes", "seconds", "peak_rss_bytes")
    return {"ok": True, "artifact": "quantize/artifact", **{k: report.get(k) for k in keep}}


def _step_evaluate(cfg: Config, out: Path, done: dict) -> dict:
    """Perplexity of the model as loaded and of the artifact (on its integer path), same text."""
    from quant.evaluate import evaluate

    m = cfg.model
    run_dir = out.parent
    kw = dict(seq_len=m.eval_seq_len, max_tokens=m.eval_max_tokens or None, device=m.device)
    base = evaluate(m.source, m.eval_text or None, integer_path=False, **kw)
    art = evaluate(str(run_dir / "quantize" / "artifact"), m.eval_text or None, **kw)
    res = {"ok": True, "as_loaded": base, "compressed": art,
           "ratio": art["perplexity"] / base["perplexity"]}
    (out / "perplexity.json").write_text(json.dumps(res, indent=2))
    return res


def _step_simulate(cfg: Config, out: Path, done: dict) -> dict:
    """Random cases in every engine mode, checked bit for bit against the integer reference."""
    from sim.engine_check import simulate_engine

    s = cfg.simulation
    res = simulate_engine(cfg.engine, s.simulator, s.cases, s.seed, stall_probability=s.stall_probability,
                          waves=s.waves, build_dir=out / "runs", stall_profile=s.stall_profile,
                          watchdog_cycles=s.watchdog_cycles)
    res["ok"] = bool(res["bit_exact"])
    # the step folder is a temporary name until the step completes: record paths relative to it
    base = out.resolve()
    res["run_dir"] = str(Path(res["run_dir"]).relative_to(base))
    if "first_mismatch" in res:
        res["first_mismatch"]["dump"] = str(Path(res["first_mismatch"]["dump"]).resolve().relative_to(base))
    return res


STEPS: list[Step] = [
    Step("doctor", lambda c: None, _step_doctor, "check tools and versions"),
    Step("config", lambda c: config_mod.to_plain(c), _step_config, "resolve and record the configuration"),
    Step("numerics", lambda c: (config_mod.to_plain(c.recipe), config_mod.to_plain(c.engine), c.model.seed),
         _step_numerics, "self-check the integer reference on the configured formats and bounds"),
    Step("quantize", lambda c: (config_mod.to_plain(c.model), config_mod.to_plain(c.recipe)), _step_quantize,
         "compress the model with the recipe into a packed artifact"),
    Step("evaluate", lambda c: config_mod.to_plain(c.model), _step_evaluate,
         "perplexity as loaded and on the artifact's integer path"),
    Step("simulate", lambda c: (config_mod.to_plain(c.engine), config_mod.to_plain(c.simulation)),
         _step_simulate, "run the engine RTL against the integer reference"),
]


def _check_device(cfg: Config):
    """model.device names a device torch sees, before any step runs (nothing is written otherwise)."""
    from quant.errors import QuantError
    from quant.runtime import resolve_device

    try:
        resolve_device(cfg.model.device)
    except QuantError as e:
        raise config_mod.ConfigError("", "model.device", str(e)) from None


def _key(obj: object, upstream: str) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str) + upstream
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run(config_files: list[str] | tuple = (), out_dir: str | Path = "build/run", force: bool = False,
        steps: list[str] | None = None, progress: bool = True) -> dict:
    cfg = config_mod.load(*config_files) if config_files else Config()
    _check_device(cfg)
    names = [s.name for s in STEPS]
    if steps:
        unknown = [s for s in steps if s not in names]
        if unknown:
            raise config_mod.ConfigError("", "steps", f"unknown step(s) {unknown}; steps are {names}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"ok": True, "out": str(out), "steps": {}}
    upstream = ""
    for step in STEPS:
        key = _key(step.reads(cfg), upstream)
        upstream = key
        if steps and step.name not in steps:
            continue
        sdir = out / step.name
        marker = sdir / "step.json"
        if not force and marker.is_file():
            prev = json.loads(marker.read_text())
            if prev.get("key") == key and prev.get("result", {}).get("ok", False):
                summary["steps"][step.name] = {**prev["result"], "skipped": True}
                if progress:
                    print(f"[{step.name}] up to date, skipped")
                continue
        if progress:
            print(f"[{step.name}] {step.doc} ...", flush=True)
        tmp = out / f".{step.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        t0 = time.perf_counter()
        try:
            result = step.run(cfg, tmp, summary["steps"])
        except BaseException:  # bad input or an interrupt: leave nothing half-written
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        result["seconds"] = round(time.perf_counter() - t0, 3)
        (tmp / "step.json").write_text(json.dumps({"key": key, "result": result}, indent=2, default=str))
        shutil.rmtree(sdir, ignore_errors=True)
        tmp.rename(sdir)
        summary["steps"][step.name] = result
        if progress:
            print(f"[{step.name}] {'ok' if result.get('ok') else 'FAILED'} in {result['seconds']:.1f} s")
        if not result.get("ok", False):
            summary["ok"] = False
            break
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if progress:
        print(yaml.safe_dump({"ok": summary["ok"], "out": str(out)}, sort_keys=False).strip())
    return summary
