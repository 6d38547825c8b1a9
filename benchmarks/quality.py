"""Quality benchmark: perplexity of SmolLM2-135M on held-out *Pride and Prejudice* (calibration is on
*Sense and Sensibility*), as loaded and after each compression recipe, at short and long context with
and without Λ-shaped attention. Writes a markdown and a JSON table.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quality.py --out benchmarks/results/quality \
        --rows float,gptq,recon,sparse,sparse-recon,rtn,float-long,float-long-lambda,gptq-long-lambda \
        --include benchmarks/results/peers.json

Each row evaluates the first 16,384 tokens (``--max-tokens``; 0 = the whole text) of any plain text
file (``--text``, default the whole *Pride and Prejudice* from $ACCLLM_TEXT_DIR), long rows at context 2048
(``--long``), and reports a 95 % bootstrap interval over windows and, for every row with an as-loaded row of
the same context, attention and tokens, the ratio with a paired interval (``quant.evaluate``). A text too
short for the tokens or a context asked for is refused before any quantization (exit status 2).

(many hours on two CPU cores: each W2A8KV4 quantization takes 10-50 minutes, a 16k-token row 10-30. ``--artifacts-dir
DIR`` keeps the artifacts and reuses them; ``--append`` adds rows to an existing table. The
committed table lists the exact commands that made it.)

Every number in the table comes from this script's run; the JSON records the settings, seconds and
peak RSS of every row. Quantized rows are evaluated on the integer path (the hardware's arithmetic).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ROWS = {
    # name: (description, recipe or None for the float model, eval seq_len key, lambda override)
    "float": ("as loaded (GGUF Q4_1 dequantized to float32)", None, "short", None),
    "rtn": ("RTN-W2A8KV4 (integer path)", "rtn-w2a8kv4", "short", None),
    "gptq": ("W2A8KV4: GPTQ + clipping search (integer path)", "w2a8kv4", "short", None),
    "sparse": ("W2A8KV4 + 2:4 SparseGPT (integer path)", "w2a8kv4-sparse24", "short", None),
    "rot": ("W2A8KV4 on the rotated model (Hadamard R1 + V/O R2 folded in; integer path)", "w2a8kv4-rot", "short",
            None),
    "rot-novo": ("W2A8KV4 on the rotated model, R1 only (no V/O rotation; integer path)", "w2a8kv4-rot:novo",
                 "short", None),
    "rot-vo": ("W2A8KV4 with the V/O head rotation only (no residual rotation; integer path)", "w2a8kv4-rot:voonly",
               "short", None),
    "fold": ("W2A8KV4 with the norms folded into the linears, no rotation (integer path)", "w2a8kv4-rot:fold",
             "short", None),
    "a8kv4": ("float weights, A8 + KV4 + Λ (simulated numerics, not the integer path)", "w2a8kv4:floatw", "short",
              None),
    "rot-a8kv4": ("rotated float weights, A8 + KV4 + Λ (simulated numerics, not the integer path)",
                  "w2a8kv4-rot:floatw", "short", None),
    "rot-long-lambda": ("W2A8KV4 on the rotated model, long context, Λ 4 + 508", "w2a8kv4-rot", "long", (4, 508)),
    "gptq-noclip": ("W2A8KV4: GPTQ without the clipping search (integer path)", "w2a8kv4:noclip", "short", None),
    "float-long": ("as loaded, long context, full attention", None, "long", "off"),
    "float-long-lambda": ("as loaded, long context, Λ 4 sinks + 508 window", None, "long", (4, 508)),
    "rtn-long": ("RTN-W2A8KV4, long context, full attention", "rtn-w2a8kv4", "long", "off"),
    "rtn-long-lambda": ("RTN-W2A8KV4, long context, Λ 4 + 508", "rtn-w2a8kv4", "long", (4, 508)),
    "gptq-long": ("W2A8KV4, long context, full attention", "w2a8kv4", "long", "off"),
    "gptq-long-lambda": ("W2A8KV4, long context, Λ 4 + 508", "w2a8kv4", "long", (4, 508)),
    "recon": ("W2A8KV4 + reconstruction stage (integer path)", "w2a8kv4-recon", "short", None),
    "recon-long": ("W2A8KV4 + reconstruction, long context, full attention", "w2a8kv4-recon", "long", "off"),
    "recon-long-lambda": ("W2A8KV4 + reconstruction, long context, Λ 4 + 508", "w2a8kv4-recon", "long", (4, 508)),
    "e2e": ("W2A8KV4 + reconstruction + end-to-end training (integer path)", "w2a8kv4-recon-e2e", "short", None),
    "e2e-long-lambda": ("W2A8KV4 + reconstruction + end-to-end training, long context, Λ 4 + 508",
                        "w2a8kv4-recon-e2e", "long", (4, 508)),
    "e2e120-lr05": ("W2A8KV4 + reconstruction + 120 steps of end-to-end training at 2.5x the learning rates "
                    "(integer path)", "w2a8kv4-recon-e2e120-lr05", "short", None),
    "e2e120-emma": ("W2A8KV4 + reconstruction + 120 steps of end-to-end training on 98k tokens of Emma "
                    "(integer path)", "w2a8kv4-recon-e2e120-emma", "short", None),
    "sparse-recon": ("W2A8KV4 + 2:4 + reconstruction stage (integer path)", "w2a8kv4-sparse24-recon", "short", None),
    "sparse-long-lambda": ("W2A8KV4 + 2:4, long context, Λ 4 + 508", "w2a8kv4-sparse24", "long", (4, 508)),
}


def _noclip(rec):  # a cheaper variant: GPTQ without the clip search
    from quant.recipe import QuantizeWeights

    rec.get(QuantizeWeights).clip_search = False


def _novo(rec):  # the rotation of the residual stream only (R1), not the V/O heads'
    from quant.recipe import Rotate

    rec.get(Rotate).vo = False


def _voonly(rec):  # the V/O heads' rotation only (R2): the residual stream, norms and head as they are
    from quant.recipe import Rotate

    rec.get(Rotate).residual = False


def _fold(rec):  # the rotation's fold of the norm weights into the linears, with Q = I and no V/O rotation
    from quant.recipe import Rotate

    rec.get(Rotate).kind, rec.get(Rotate).vo = "identity", False


def _floatw(rec):  # the recipe's activation, KV and Λ numerics on float weights: what A8 + KV4 alone cost
    from quant.recipe import QuantizeEmbedding, QuantizeWeights

    rec.modifiers = [m for m in rec.modifiers if not isinstance(m, (QuantizeWeights, QuantizeEmbedding))]


def recipe_source(name: str) -> str:
    """A row's recipe: benchmarks/recipes/NAME.yaml when there is one (experiments kept out of the built-in
    recipes), else the built-in NAME."""
    f = REPO / "benchmarks" / "recipes" / f"{name}.yaml"
    return str(f) if f.is_file() else name


#: recipe variants named after a colon in ROWS (w2a8kv4:noclip)
VARIANTS = {"noclip": _noclip, "novo": _novo, "voonly": _voonly, "fold": _fold, "floatw": _floatw}

# --- peer quantizers (optional extra `peers`: optimum-quanto, hqq) -- benchmarks/peers.py -------------
# Rows quanto-w2, quanto-w4, hqq-w2, hqq-w4 (+ quanto-w2a16, quanto-w4a16, peers-float); run by the hook
# in main(); without the extra a row is reported as skipped with the install command.
from benchmarks.peers import PEER_ROWS  # noqa: E402  (light: torch/quanto/hqq are imported per row)
from quant.atomic import write_json, write_text  # noqa: E402

ROWS.update({name: (spec[0], "peer", "short", None) for name, spec in PEER_ROWS.items()})
# --- end peer quantizers ----------------------------------------------------------------------------


def default_text() -> Path:
    from quant.data import DEFAULT_EVAL
    from quant.loading import default_text_dir

    d = default_text_dir()
    if d and (d / "pride-and-prejudice.txt").is_file():
        return d / "pride-and-prejudice.txt"

    return DEFAULT_EVAL


def write_tables(args, text, results):
    import torch

    from quant.pipeline import peak_rss_bytes

    meta = {"model": args.model, "text": str(text), "max_tokens": args.max_tokens, "short": args.short,
            "bootstrap": getattr(args, "bootstrap", 2000),
            "long": args.long, "calib_samples": args.calib_samples, "calib_seq_len": args.calib_seq_len,
            "seed": args.seed, "peak_rss_bytes": peak_rss_bytes(), "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "commands": getattr(args, "commands", []), "include": getattr(args, "include", []),
            "notes": getattr(args, "notes", [])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from quant.evaluate import paired_ratio

    n_text = next((r.get("tokens_in_text") for r in results if r.get("tokens_in_text")), None)
    first = "the whole text" if not args.max_tokens else f"the first {args.max_tokens} tokens"
    lines = [f"# Perplexity of {args.model} on {Path(text).name} ({first}"
             + (f" of {n_text}" if n_text else "") + ")", "",
             f"Evaluation text: `{text}`. Calibration: {args.calib_samples} × {args.calib_seq_len} tokens of "
             f"Sense and Sensibility, seed {args.seed}. Quantized rows run on the integer path.", "",
             "Ratio: perplexity over the as-loaded model's at the same context and attention. 95 % CI: "
             "percentile bootstrap over the evaluation windows (2000 resamples; `quant.evaluate`), for the "
             "ratio paired per window (each resample draws the same windows for both models). "
             "quantize s: wall seconds of the artifact's quantization as it ran, on whatever else the machine "
             "was doing (the notes say; quiet-machine timings: docs/quantizer.md, Speed).", "",
             "| row | seq_len | Λ (sinks, window) | bits/weight | perplexity | 95 % CI | ratio | ratio 95 % CI | "
             "tokens | quantize s | quantize peak RSS | eval s |",
             "|---|---:|---|---:|---:|---|---:|---|---:|---:|---:|---:|"]
    def attention(r):  # Λ with a window covering the whole sequence is full attention
        lam = tuple(r.get("lambda") or ())
        return () if not lam or r["seq_len"] <= sum(lam) else lam

    floats = {}
    for r in results:
        if not r.get("skipped") and r["row"].startswith("float") and "perplexity" in r:
            floats.setdefault((r["seq_len"], attention(r), r.get("tokens"), r.get("text_sha256")), r)
    # rows joined from runs on different text files are paired with the float row of their own text, and
    # the table names the text of each row
    several_texts = len({r.get("text_sha256") for r in results if not r.get("skipped")}) > 1
    for r in results:
        if r.get("skipped"):  # a peer row whose optional package is missing (benchmarks/peers.py)
            lines.append(f"| {r['description']} | skipped: {r['skipped']} | | | | | | | | | | |")
            continue
        bpw = f"{r['bits_per_weight']:.3f}" if r["bits_per_weight"] else "float"
        lam = "-" if not r["lambda"] else f"{tuple(r['lambda'])}"
        ref = floats.get((r["seq_len"], attention(r), r.get("tokens"), r.get("text_sha256")))
        ratio, rci = "-", "-"
        if ref is not None:
            if "window_nll" in r and "window_nll" in ref:
                pr = paired_ratio(r, ref, args.bootstrap)
                r["ratio"], r["ratio_ci95"] = pr["ratio"], pr["ci95"]
                ratio = f"{pr['ratio']:.3f}×"
                rci = f"{pr['ci95'][0]:.3f}–{pr['ci95'][1]:.3f}" if pr["ci95"] else "-"
            else:  # a row carried over from a table without per-window losses
                ratio = f"{r['perplexity'] / ref['perplexity']:.2f}×"
        ci = r.get("ci95")
        ci = f"{ci[0]:.3f}–{ci[1]:.3f}" if ci else "-"
        qs = r.get("quantize_seconds")
        rss = r.get("quantize_peak_rss_bytes") or r.get("peak_rss_bytes")  # peer rows: the row's peak
        rss = f"{rss / 2**30:.2f} GiB" if rss else "-"
        desc = r["description"] + (f" [text {Path(r['text']).name} {r['text_sha256'][:8]}]"
                                   if several_texts and r.get("text") and r.get("text_sha256") else "")
        lines.append(f"| {desc} | {r['seq_len']} | {lam} | {bpw} | {r['perplexity']:.3f} | {ci} | {ratio} | "
                     f"{rci} | {r['tokens']} | {qs if qs is not None else '-'} | {rss} | {r['eval_seconds']} |")
    if meta["commands"]:
        lines += ["", "Made by (in this order; artifacts quantized by the first rows that need them, or found in "
                  "`--artifacts-dir`; `--include` lists rows measured by another script):", "", "```"]
        lines += meta["commands"] + ["```"]
    if meta["notes"]:
        lines += ["", "Notes:", ""] + [f"* {n}" for n in meta["notes"]]
    # after the ratios: rows gain "ratio" and "ratio_ci95"
    write_json(out.with_suffix(".json"), {"meta": meta, "rows": results}, indent=2)
    write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    return lines


def main(argv=None) -> int:
    """The benchmark, without gradients; the caller's grad mode is left as it was (tests call main())."""
    from quant.runtime import passive_wait, set_threads

    passive_wait()  # effective when run as a script (torch not loaded yet): quant/runtime.py
    import torch

    set_threads()

    with torch.no_grad():
        return _main(argv)


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default=None, help="evaluation text (default: Pride and Prejudice)")
    ap.add_argument("--rows", default="float,float-long,float-long-lambda,rtn,rtn-long-lambda,gptq,sparse")
    ap.add_argument("--append", action="store_true", help="add the rows to the existing JSON table at --out")
    ap.add_argument("--short", type=int, default=512, help="short-context eval window")
    ap.add_argument("--long", type=int, default=2048,
                    help="long-context eval window (default 2048: Λ 4 + 508 drops all but 512 of its tokens)")
    ap.add_argument("--max-tokens", type=int, default=16384,
                    help="evaluated tokens per row (default 16384; 0 = the whole text). A shorter text is refused")
    ap.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the 95%% intervals")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quality"))
    ap.add_argument("--include", action="append", default=[], metavar="JSON",
                    help="also list the rows of another results JSON of this format (e.g. "
                         "benchmarks/results/peers.json); rows of the same name measured here win")
    ap.add_argument("--include-min-tokens", type=int, default=0, metavar="N",
                    help="leave out --include rows evaluated on fewer than N tokens (e.g. a 4k-token screen "
                         "in a 16k-token table); each one left out is printed")
    ap.add_argument("--note", dest="notes", action="append", default=[], metavar="TEXT",
                    help="a sentence for the table's notes (how artifacts found in --artifacts-dir were made, "
                         "the machine's load, rows carried over); kept by --append")
    ap.add_argument("--artifacts-dir", default=None,
                    help="keep artifacts in DIR/<recipe> and reuse one found there (same settings assumed)")
    ap.add_argument("--stream-layers", action="store_true",
                    help="evaluate with the decoder layers read one at a time (accllm eval --stream-layers): for "
                         "a model bigger than memory; the same numbers exactly")
    args = ap.parse_args(argv)

    from accllm.config import load_recipe
    from quant.evaluate import open_model, perplexity_of
    from quant.pipeline import peak_rss_bytes, quantize_model

    text = Path(args.text) if args.text else default_text()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    if args.stream_layers and any(r in PEER_ROWS for r in rows):
        ap.error(f"--stream-layers: the peer rows {[r for r in rows if r in PEER_ROWS]} load their own whole "
                 f"model (benchmarks/peers.py) and cannot stream; run them without --stream-layers")
    # the text must hold --max-tokens tokens and a window of every context asked for: refuse it now,
    # before any quantization, rather than after an hour (quant.data.eval_windows says what is short)
    from quant.data import eval_windows
    from quant.loading import load_tokenizer, resolve_source

    tok0 = load_tokenizer(resolve_source(args.model)) if not Path(args.model).joinpath("manifest.json").is_file() \
        else None
    if tok0 is not None:
        for ctx in sorted({ROWS[r][2] for r in rows}):
            eval_windows(tok0, text, args.short if ctx == "short" else args.long, args.max_tokens)
    results = []
    args.commands = []
    if args.append and Path(args.out).with_suffix(".json").is_file():
        old = json.loads(Path(args.out).with_suffix(".json").read_text())
        results = old["rows"]
        args.commands = old["meta"].get("commands", [])
        args.notes = old["meta"].get("notes", []) + args.notes
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS",) if k in os.environ)
    args.commands = args.commands + [(env + " " if env else "") + ".venv/bin/python benchmarks/quality.py "
                                     + shlex.join(sys.argv[1:] if argv is None else argv)]
    for inc in args.include:  # a row already here (same name, token count and text) or about to be measured wins
        have = {(r["row"], r.get("tokens"), r.get("text_sha256")) for r in results}
        for r in json.loads(Path(inc).read_text())["rows"]:
            if r["row"] in rows or (r["row"], r.get("tokens"), r.get("text_sha256")) in have:
                continue
            if (r.get("tokens") or 0) < args.include_min_tokens:
                print(f"--include {inc}: row {r['row']} left out ({r.get('tokens')} tokens < "
                      f"--include-min-tokens {args.include_min_tokens})", flush=True)
                continue
            results.append(r)
            have.add((r["row"], r.get("tokens"), r.get("text_sha256")))
    artifacts: dict[str, tuple] = {}
    float_model = None
    with tempfile.TemporaryDirectory(prefix="accllm-quality-") as tmp:
        for r in rows:
            desc, recipe, ctx, lam = ROWS[r]
            seq = args.short if ctx == "short" else args.long
            if r in PEER_ROWS:  # peer quantizers: benchmarks/peers.py (own model, same windows)
                from benchmarks.peers import quality_row

                results.append(quality_row(r, args, text, seq))
                print(json.dumps(results[-1]), flush=True)
                lines = write_tables(args, text, results)
                continue
            t0 = time.time()
            qreport = None
            if recipe is None:
                if float_model is None:
                    float_model = open_model(args.model, args.stream_layers)
                model, tok, parts = float_model
            else:
                if recipe not in artifacts:
                    out = Path(args.artifacts_dir or tmp) / recipe.replace(":", "-")
                    if (out / "report.json").is_file():
                        qreport = json.loads((out / "report.json").read_text())
                    else:
                        rec = load_recipe(recipe_source(recipe.split(":")[0]))
                        if ":" in recipe:
                            VARIANTS[recipe.split(":")[1]](rec)
                            rec.name += "-" + recipe.split(":")[1]
                        qreport = quantize_model(args.model, rec, out,
                                                 calib_samples=args.calib_samples, seq_len=args.calib_seq_len,
                                                 seed=args.seed, progress=True)
                    artifacts[recipe] = (open_model(str(out), args.stream_layers), qreport)
                (model, tok, parts), qreport = artifacts[recipe]
                model.numerics.integer_path = not recipe.endswith(":floatw")  # float weights: no integer path
            nm = model.numerics
            saved = (nm.sinks, nm.window)
            if lam == "off":
                nm.sinks, nm.window = 0, None
            elif lam is not None:
                nm.sinks, nm.window = lam
            t1 = time.time()
            res = perplexity_of(model, tok, parts, text, seq, args.max_tokens, True, args.bootstrap)
            used = None if nm.window is None else [nm.sinks, nm.window]
            nm.sinks, nm.window = saved
            row = {"row": r, "description": desc, "recipe": recipe, **res,
                   "lambda": used,
                   "eval_seconds": round(time.time() - t1, 1), "row_seconds": round(time.time() - t0, 1),
                   "bits_per_weight": qreport["bits_per_weight"] if qreport else None,
                   "quantize_seconds": qreport["seconds"] if qreport else None,
                   "quantize_peak_rss_bytes": qreport.get("peak_rss_bytes") if qreport else None,
                   "peak_rss_bytes_so_far": peak_rss_bytes()}
            results.append(row)
            print(json.dumps(row), flush=True)
            lines = write_tables(args, text, results)
    if not rows:
        lines = write_tables(args, text, results)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    from quant.errors import QuantError

    try:
        raise SystemExit(main())
    except QuantError as e:  # bad input: one clear line, exit status 2, no table written
        print(f"quality.py: error: {e}", file=sys.stderr)
        raise SystemExit(2)
