"""The `accllm` command: thin wrappers over Python functions that notebooks and tests call too."""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import __version__

EPILOG = """\
stages: quant/ (compress a Llama checkpoint to W2A8KV4), hw/ (the Amaranth engine),
sim/ (co-simulation against the integer reference), bitstream/ (U280 builds).
Start with `accllm doctor`, then `accllm run` (the main job on the built-in defaults).
Numeric formats: docs/numerics.md.  Configuration: `accllm config --dump`."""


class UserError(Exception):
    """Bad input from the user: printed as one clear line, exit status 2."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from quant.reference import FormatError

    from .config import ConfigError

    errs: list[type[BaseException]] = [UserError, ConfigError, FormatError]
    try:
        from quant.errors import QuantError

        errs.append(QuantError)
    except ImportError:
        pass
    try:
        from sim.engine_check import EngineHang, SimulatorMissing

        errs += [SimulatorMissing, EngineHang]
    except ImportError:
        pass
    try:  # the accelerator stopped with an error code, hung, or addressed memory out of range
        from sim.accel_sim import AccelHang, MemoryRangeError
        from sim.model_check import ModelMismatch

        errs += [AccelHang, MemoryRangeError, ModelMismatch]
    except ImportError:
        pass
    try:
        from bitstream.build import BuildError

        errs.append(BuildError)
    except ImportError:
        pass
    return tuple(errs)


# ---------------------------------------------------------------------------------------------------
def cmd_doctor(args) -> int:
    from .doctor import doctor, format_table

    report = doctor()
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0 if report["ok"] else 1


def cmd_config(args) -> int:
    from . import config

    if args.dump:
        cfg = config.load(*args.files) if args.files else config.Config()
        sys.stdout.write(config.dump(cfg))
        return 0
    if args.check:
        for f in args.check:
            config.load(f)
            print(f"{f}: ok")
        return 0
    raise UserError("config: give --dump [FILE...] or --check FILE [FILE...]")


def cmd_run(args) -> int:
    from .flow import run

    summary = run(config_files=args.config, out_dir=args.out, force=args.force, steps=args.steps,
                  progress=not args.quiet)
    if args.json:
        print(json.dumps(summary, indent=2))
    return 0 if summary.get("ok", False) else 1


def _threads(args):
    """torch threads: --threads N, else OMP_NUM_THREADS, else the CPUs this process may use
    (os.sched_getaffinity; quant/runtime.py)."""
    n = getattr(args, "threads", 0) or 0
    if n < 0:
        raise UserError(f"--threads must be >= 0, got {n}")
    from quant.runtime import set_threads

    set_threads(n or None)


def cmd_quantize(args) -> int:
    from quant.pipeline import quantize_model

    from .config import load_recipe

    _threads(args)
    recipe = load_recipe(args.recipe)
    report = quantize_model(args.model, recipe, args.out, calib_text=args.calib_text,
                            calib_samples=args.calib_samples, seq_len=args.seq_len, seed=args.seed,
                            progress=not args.quiet, device=args.device)
    print(json.dumps(report, indent=2) if args.json else
          f"wrote {args.out}: " + ("no weights quantized, " if report.get("bits_per_weight") is None else
                                   f"{report['bits_per_weight']:.3f} bits/weight, ") +
          f"{report.get('size_bytes', 0) / 1e6:.1f} MB, {report.get('seconds', 0):.0f} s")
    return 0


def cmd_eval(args) -> int:
    from quant.evaluate import evaluate

    _threads(args)
    res = evaluate(args.model, args.text, seq_len=args.seq_len, max_tokens=args.max_tokens,
                   integer_path=args.integer_path, progress=not args.json,
                   attention=args.attention, against=args.against, bootstrap=args.bootstrap,
                   stream_layers=args.stream_layers, device=args.device)
    if args.json:
        print(json.dumps(res))
        return 0
    ci = res["ci95"]
    att = "full attention" if res["window"] is None else f"Λ {res['sinks']} + {res['window']}"
    print(f"perplexity {res['perplexity']:.3f}" + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else "") +
          f" over {res['tokens']} tokens in {res['windows']} windows of {os.path.basename(res['text'])} "
          f"(seq_len {res['seq_len']}, {att}, integer path: {res['integer_path']})")
    if "ratio" in res:
        r = res["ratio"]
        print(f"ratio {r['ratio']:.3f}x against {r['against_model']} ({r['against']:.3f})" +
              (f", paired 95% CI {r['ci95'][0]:.3f}-{r['ci95'][1]:.3f}" if r["ci95"] else ""))
    return 0


def cmd_generate(args) -> int:
    from quant.evaluate import generate

    if not args.golden:
        print(generate(args.model, args.prompt, max_new_tokens=args.max_new_tokens, device=args.device))
        return 0
    from quant.errors import QuantError
    from quant.integer import generate_against_golden
    from quant.loading import load_model
    from quant.runtime import resolve_device

    model, tok = load_model(args.model, resolve_device(args.device))
    ids = tok(args.prompt, add_special_tokens=True)["input_ids"]
    if not ids:
        raise QuantError("--prompt is empty after tokenization; give some text")
    res = generate_against_golden(model, ids, args.max_new_tokens)
    res["text"] = tok.decode(res["tokens_torch_integer"], skip_special_tokens=True)
    print(json.dumps(res))
    if not res["equal"]:
        print(f"error: the torch integer path and the golden model differ from generated token "
              f"{res['first_difference']} on", file=sys.stderr)
        return 1
    return 0


def cmd_simulate_model(args) -> int:
    from hw.compile import CompileError
    from sim.model_check import simulate_model

    from .config import load_hw

    cfg = load_hw(args.hw)
    try:
        res = simulate_model(args.artifact, cfg.engine, cfg.accelerator, args.sim, args.prompt, args.tokens,
                             trace=args.trace, stall_profile=args.stall_profile, seed=args.seed,
                             build_dir=args.build_dir, progress=not args.json)
    except CompileError as e:
        raise UserError(f"the compiler refused the model for engine config {args.hw!r}: {e}") from None
    if args.json:
        print(json.dumps(res))
    else:
        verdict = "bit-exact" if res["bit_exact"] else "MISMATCH"
        print(f"{args.sim}: {verdict}; RTL tokens {res['tokens_rtl']}; reference {res['tokens_reference']}; "
              f"torch integer {res['tokens_torch_integer']}")
        print(f"  prefill {res['cycles_prefill']} cycles ({res['prompt_tokens']} tokens), decode "
              f"{res['cycles_per_token']} cycles per token; {res['instructions']} instructions; "
              f"RTL wall time {res['rtl_wall_s']} s")
        if res.get("text_rtl") is not None:
            print(f"  text: {res['text_rtl']!r}")
    if not res["bit_exact"]:
        print(f"error: {res['first_mismatch'] or 'the token lists differ'}"
              + (f" (operands written to {res['mismatch_dump']})" if res.get("mismatch_dump") else ""),
              file=sys.stderr)
        return 1
    return 0


def cmd_simulate(args) -> int:
    from sim.engine_check import simulate_engine

    from .config import load_hw

    cfg = load_hw(args.hw)
    waves = args.waves or os.environ.get("WAVES", "") not in ("", "0")
    res = simulate_engine(cfg.engine, args.sim, args.cases, args.seed,
                          stall_probability=args.stall_probability, waves=waves,
                          build_dir=args.build_dir, stall_profile=args.stall_profile,
                          watchdog_cycles=args.watchdog_cycles)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{args.sim}: {res['cases']} cases, modes {', '.join(res['modes'])}: "
              f"{'bit-exact' if res['bit_exact'] else str(res['mismatches']) + ' MISMATCHES'}; "
              f"{res['macs']} MACs in {res['cycles']} cycles = {res['macs_per_cycle']:.2f} MACs/cycle")
    return 0 if res["bit_exact"] else 1


# --- estimate / report (sim/estimate.py, sim/report.py; docs/estimate.md) ---------------------------
def _estimate_inputs(args):
    from sim.energy import EnergyError
    from sim.estimate import ArtifactFormat, EstimateError, load_model
    from sim.hbm import HBMError

    from .config import load_hw, load_recipe, resolve_named

    try:
        hw_path = resolve_named("hw", args.hw)
        cfg = load_hw(args.hw)
        fmt = ArtifactFormat.from_recipe(load_recipe(args.recipe))
        m = load_model(args.model)
    except (EstimateError, HBMError, EnergyError) as e:
        raise UserError(str(e)) from None
    return cfg, fmt, m, hw_path.stem


def cmd_estimate(args) -> int:
    from sim.energy import EnergyError
    from sim.estimate import EstimateError, estimate
    from sim.hbm import HBMError

    cfg, fmt, m, hw_name = _estimate_inputs(args)
    try:
        res = estimate(cfg.engine, cfg.target, m, fmt, args.context, args.batch, hw_name=hw_name,
                       accel=cfg.accelerator)
    except (EstimateError, HBMError, EnergyError) as e:
        raise UserError(str(e)) from None
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        dec = res["decode"]
        causes = ", ".join(f"{k} {v / dec['cycles_per_token']:.0%}" for k, v in dec["cycles_by_cause"].items())
        print(f"{m.name} / {fmt.recipe} on {hw_name} at {res['clock_mhz']:.0f} MHz, context {args.context}, "
              f"batch {args.batch} ({res['scope']}):\n"
              f"  decode  {res['decode_tokens_per_s']:8.1f} token/s   bound by {res['bound_by']} "
              f"({dec['cycles_per_token']:,} cycles, {dec['instructions']:,} instructions: {causes})\n"
              f"          {res['of_roofline']:.1%} of the 460 GB/s roofline {res['hbm_roofline_tokens_per_s']:.1f} "
              f"token/s of the program's bytes (artifact's bytes: {res['artifact_roofline_tokens_per_s']:.1f})\n"
              f"  prefill {res['prefill_tokens_per_s']:8.1f} token/s   bound by {res['prefill']['bound_by']}\n"
              f"  HBM     {res['hbm_bytes_per_token'] / 1e9:8.3f} GB/token read and written by the program "
              f"(artifact {res['artifact_hbm_bytes_per_token'] / 1e9:.3f})\n"
              f"  power   {res['power_w']:8.1f} W  -> {res['tokens_per_j']:.2f} token/J "
              f"({res['power']['unverified_share']:.1%} of the watts from unverified coefficients: "
              f"docs/estimate.md)")
    return 0


def cmd_report(args) -> int:
    from sim.energy import EnergyError
    from sim.estimate import EstimateError
    from sim.hbm import HBMError
    from sim.report import write_report

    from .config import load_recipe

    cfg, fmt, m, hw_name = _estimate_inputs(args)
    try:
        path = write_report(args.out, cfg.engine, cfg.target, m, args.recipe, args.context, args.batch,
                            hw_name=hw_name, hw_arg=args.hw, model_arg=args.model, json_out=args.json_out,
                            load_recipe=load_recipe, accel=cfg.accelerator)
    except (EstimateError, HBMError, EnergyError) as e:
        raise UserError(str(e)) from None
    print(f"wrote {path}")
    return 0


def add_estimate_parsers(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--hw", default="u280", help="engine config: ci-small, u280 or a YAML path")
    common.add_argument("--model", default="llama2-7b",
                        help="built-in shape (llama2-7b, llama3-8b, smollm2-135m) or a config.json path")
    common.add_argument("--recipe", default="w2a8kv4-sparse24", help="built-in recipe name or a YAML path")
    common.add_argument("--context", type=int, default=2048, metavar="N", help="tokens in the context")
    common.add_argument("--batch", type=int, default=1, metavar="B", help="sequences decoded together")
    est = sub.add_parser("estimate", parents=[common], help="decode/prefill tokens/s, power, tokens/J, roofline",
                         description="Throughput and energy of a model shape on an accelerator config: the "
                                     "compiler's program for the shape (no weights), timed by the controller's "
                                     "cycle model (equal to the RTL's counts), the HBM model and the energy "
                                     "model (docs/estimate.md). Batch 1.")
    est.add_argument("--json", action="store_true", help="print every figure as JSON")
    est.set_defaults(func=cmd_estimate)
    rep = sub.add_parser("report", parents=[common], help="self-contained HTML report with figures",
                         description="Writes one HTML file (figures embedded as PNG): roofline, tokens/s and "
                                     "tokens/J against context with and without Λ, bytes per token, dense vs "
                                     "2:4, the table against AccLLM and FlightLLM.")
    rep.add_argument("--out", default="build/report/estimate.html", metavar="FILE")
    rep.add_argument("--json-out", default=None, metavar="FILE", help="also write the estimate JSON here")
    rep.set_defaults(func=cmd_report)
# --- end estimate / report ------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------
# `accllm build` (bitstream/build.py) -- begin
def cmd_build(args) -> int:
    from bitstream.build import build

    from .config import load_hw

    cfg = load_hw(args.hw)
    summary = build(cfg.engine, cfg.target, out=args.out, target=args.target, run=args.run,
                    estimate=not args.no_estimate, flat_check=args.flat_check, accel=cfg.accelerator,
                    depth=args.depth, log=(lambda *_: None) if args.json else print)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        u = summary.get("utilization")
        if u:
            print("estimate: " + ", ".join(f"{k} {u[k]:,} ({u['percent'][k]:.2f} %)"
                                           for k in ("lut", "ff", "dsp", "bram36", "uram"))
                  + f"; fits the U280: {'yes' if u['fits_u280'] else 'NO'}")
            for b in u["binding"]:
                print(f"over the budget: {b['resource']} {b['percent']:.1f} % > {b['budget_percent']:.0f} %, "
                      f"{b['component_share_percent']:.0f} % of it in {b['component']}")
    return 0


def add_build_parser(sub) -> None:
    b = sub.add_parser("build", help="write a U280 build plan (Vivado project or Vitis kernel) and a "
                                     "Yosys resource estimate",
                       description="Writes OUT/<target>/ (the generated Tcl, XDC/XML, Verilog and scripts, "
                                   "with manifest.json) and OUT/utilization.json (Yosys synth_xilinx "
                                   "-family xcup: the whole accelerator, each distinct component "
                                   "once, summed by instance count). An unchanged design is not rewritten; --run executes Vivado "
                                   "or v++ when found on PATH. README, 'bitstream/'.")
    b.add_argument("--hw", default="ci-small", help="engine config: ci-small, u280 or a YAML path")
    b.add_argument("--out", required=True, metavar="DIR")
    b.add_argument("--target", default="vivado", choices=["vivado", "vitis"])
    b.add_argument("--run", action="store_true", help="run Vivado (vivado) or package_xo + v++ (vitis)")
    b.add_argument("--no-estimate", action="store_true", help="only write the plan, no Yosys run")
    b.add_argument("--flat-check", action="store_true",
                   help="also synthesize the whole accelerator flat and record how close the sum of its "
                        "parts is (affordable at ci-small)")
    b.add_argument("--depth", action="store_true",
                   help="also walk the logic depth of every part (utilization.json logic_levels_max)")
    b.add_argument("--json", action="store_true", help="print the summary as JSON")
    b.set_defaults(func=cmd_build)
# `accllm build` -- end


# ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="accllm", description="Algorithm-hardware co-design toolflow for "
                                "long-context LLM inference on FPGAs (W2A8KV4, 2:4, Λ-attention, U280).",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"accllm {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("doctor", help="check which tools are installed and their versions",
                       description="For each tool: version found, version wanted (requirements/pinned.txt), "
                                   "whether it is required, and ok/missing/wrong with an install hint. "
                                   "Exit status 1 when a required tool is missing or wrong.")
    d.add_argument("--json", action="store_true", help="machine-readable report")
    d.set_defaults(func=cmd_doctor)

    c = sub.add_parser("config", help="dump the resolved defaults or check YAML files",
                       description="--dump prints the fully resolved configuration (defaults, or FILEs "
                                   "merged onto them) as YAML that loads back to the same object. --check "
                                   "validates files: unknown keys (with the nearest valid key), wrong types, "
                                   "out-of-range values and impossible combinations are named by file and key.")
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--dump", action="store_true", help="print resolved configuration as YAML")
    g.add_argument("--check", nargs="+", metavar="FILE", help="validate YAML files")
    c.add_argument("files", nargs="*", metavar="FILE", help="with --dump: files merged onto the defaults")
    c.set_defaults(func=cmd_config)

    r = sub.add_parser("run", help="the main job: the whole flow on a config (resumable)",
                       description="Runs the flow's ordered steps (see accllm/flow.py), each verified "
                                   "before the next. Finished steps whose inputs did not change are skipped "
                                   "on a rerun. With no --config, runs the built-in default offline.")
    r.add_argument("--config", nargs="*", default=[], metavar="FILE", help="YAML files merged onto defaults")
    r.add_argument("--out", default="build/run", help="output folder (default: build/run)")
    r.add_argument("--steps", nargs="*", default=None, help="only these steps (default: all)")
    r.add_argument("--force", action="store_true", help="rerun steps even if up to date")
    r.add_argument("--json", action="store_true", help="print the run summary as JSON")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=cmd_run)

    q = sub.add_parser("quantize", help="compress a checkpoint with a recipe into a packed artifact",
                       description="MODEL: a Hugging Face Llama folder, a .gguf file, or smollm2-135m; or an "
                                   "artifact, continued with a recipe that repeats its own and adds train_e2e "
                                   "(same calibration; same bytes as quantizing the checkpoint with the whole "
                                   "recipe). Writes DIR atomically: model.safetensors, recipe.yaml, "
                                   "manifest.json, report.json.")
    q.add_argument("model")
    q.add_argument("--recipe", required=True, help="built-in name (fp16, rtn-w2a8kv4, w2a8kv4, "
                                                   "w2a8kv4-sparse24, w2a8kv4-recon, w2a8kv4-recon-e2e, "
                                                   "w2a8kv4-sparse24-recon, w2a8kv4-rot) "
                                                   "or a YAML path")
    q.add_argument("--out", required=True, metavar="DIR")
    q.add_argument("--calib-text", default=None, metavar="FILE", help="calibration text (default: built-in)")
    q.add_argument("--calib-samples", type=int, default=32, metavar="N",
                   help="calibration sequences (default 32; with --seq-len 512 that is 16k tokens)")
    q.add_argument("--seq-len", type=int, default=512, metavar="L", help="tokens per calibration sequence")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--json", action="store_true", help="print the report as JSON")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.add_argument("--threads", type=int, default=0, metavar="N",
                   help="torch CPU threads (default: OMP_NUM_THREADS, else the CPUs this process may use). "
                        "OpenMP threads wait passively unless OMP_WAIT_POLICY says otherwise, which keeps "
                        "them fast on a machine other jobs share (docs/quantizer.md, Speed)")
    _device_option(q, "the layers, the calibration stream, the Hessians, GPTQ and the training stages run there; "
                      "the checkpoint is read and the artifact written from the CPU")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity of a model or artifact on a text",
                       description="An artifact is evaluated on its integer path (the hardware's arithmetic) "
                                   "by default.")
    e.add_argument("model", metavar="MODEL_OR_ARTIFACT")
    e.add_argument("--text", default=None, metavar="FILE",
                   help="any plain UTF-8 text file (default: the built-in Pride and Prejudice excerpt)")
    e.add_argument("--seq-len", type=int, default=512, metavar="L", help="tokens per window (the context)")
    e.add_argument("--max-tokens", type=int, default=16384, metavar="N",
                   help="evaluate the first N tokens (default 16384; 0 = the whole text). A text with fewer "
                        "tokens is refused")
    e.add_argument("--attention", default="model", metavar="SPEC",
                   help="'model' (the artifact's own, e.g. Λ 4 + 508; full for a checkpoint), 'full', or "
                        "SINKS,WINDOW such as 4,508")
    e.add_argument("--against", default=None, metavar="MODEL_OR_JSON",
                   help="also report the perplexity ratio to this reference (a model, evaluated on the same "
                        "windows and attention, or the output of an earlier `eval --json`), with a 95%% "
                        "confidence interval paired per window")
    e.add_argument("--bootstrap", type=int, default=2000, metavar="N",
                   help="bootstrap resamples over windows for the 95%% intervals (default 2000; 0 = none)")
    ip = e.add_mutually_exclusive_group()
    ip.add_argument("--integer-path", dest="integer_path", action="store_true", default=None)
    ip.add_argument("--float-path", dest="integer_path", action="store_false")
    e.add_argument("--stream-layers", action="store_true",
                   help="read the decoder layers one at a time (every window through layer i, then layer i is "
                        "freed and layer i+1 read) instead of loading the whole model: for a model bigger than "
                        "memory (a float Llama-2-7B, ~27 GB in float32). The same result exactly; memory is one "
                        "layer plus the embedding, lm_head and the windows' hidden states (docs/quantizer.md)")
    e.add_argument("--json", action="store_true",
                   help='print the result as JSON: "perplexity", "tokens", "seq_len", "integer_path", "ci95", '
                        'the per-window losses, and "ratio" with --against')
    _device_option(e, "the integer path gives the same integers on any device (float64 and int64 arithmetic), "
                      "the float path the same up to float rounding")
    e.set_defaults(func=cmd_eval)

    gen = sub.add_parser("generate", help="generate text for a quick look")
    gen.add_argument("model", metavar="MODEL_OR_ARTIFACT")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=32, metavar="N")
    gen.add_argument("--golden", action="store_true",
                     help="generate on the integer path and with the numpy golden model (quant.golden) and "
                          'print {"tokens_torch_integer", "tokens_golden", "equal", ...}; exit 1 if they differ')
    _device_option(gen, "the integer path's tokens are the same on any device")
    gen.set_defaults(func=cmd_generate)

    s = sub.add_parser("simulate", help="simulate hardware against the integer reference")
    ssub = s.add_subparsers(dest="what", metavar="WHAT", required=True)
    se = ssub.add_parser("engine", help="random cases in every mode on one simulator",
                         description="Random cases across all engine modes (dense/sparse, mv/mm, qk, pv) with "
                                     "random stalls, checked bit for bit against quant.reference. Exit status "
                                     "1 on any mismatch; the first bad element is named and the case dumped.")
    se.add_argument("--hw", default="ci-small", help="engine config: ci-small, u280 or a YAML path")
    se.add_argument("--sim", default="amaranth", choices=["amaranth", "verilator", "icarus"])
    se.add_argument("--cases", type=int, default=50, metavar="N")
    se.add_argument("--seed", type=int, default=0, metavar="S")
    se.add_argument("--stall-probability", type=float, default=0.25,
                    help="per-cycle stall chance of the streams the profile stalls at that rate")
    from sim.params import SimParams
    from sim.stalls import PROFILES

    se.add_argument("--stall-profile", default="uniform", choices=list(PROFILES),
                    help="how each stream stalls (sim/stalls.py): " +
                         "; ".join(f"{k}: {v[0]}" for k, v in PROFILES.items()))
    se.add_argument("--watchdog-cycles", type=int, default=SimParams().watchdog_cycles, metavar="N",
                    help="fail (exit 1, cycle and stopped stream named) after N cycles with no beat on any stream")
    se.add_argument("--waves", action="store_true", help="write a waveform (or WAVES=1)")
    se.add_argument("--build-dir", default="build/sim")
    se.add_argument("--json", action="store_true")
    se.set_defaults(func=cmd_simulate)

    sm = ssub.add_parser(
        "model", help="a whole quantized model generating tokens on the accelerator RTL",
        description="Compile the prompt and the generation of ARTIFACT into one program and memory image "
                    "(hw/compile.py, docs/isa.md), run it on the accelerator RTL (controller, engine, "
                    "special-function units, memory with stalls), and check that the RTL's tokens and every "
                    "traced layer equal the numpy golden model's, the torch integer path's and the machine "
                    "model's. Exit status 1 on any difference, naming the first step, layer, operation and "
                    "element that differs.")
    sm.add_argument("artifact", metavar="ARTIFACT")
    sm.add_argument("--hw", default="ci-small", help="engine + accelerator config: ci-small, u280 or a YAML path")
    sm.add_argument("--sim", default="verilator", choices=["verilator", "icarus", "amaranth"])
    sm.add_argument("--prompt", required=True, metavar="TEXT")
    sm.add_argument("--tokens", type=int, default=4, metavar="N", help="tokens to generate (prefill makes the first)")
    sm.add_argument("--trace", default="layers", choices=["none", "layers", "all"],
                    help="what the program stores for comparison: nothing but the tokens, each layer's output "
                         "(default), or every operation (slower; names the first differing operation)")
    sm.add_argument("--stall-profile", default="asymmetric", choices=list(PROFILES),
                    help="how the memory ports stall (sim/stalls.py)")
    sm.add_argument("--seed", type=int, default=0, metavar="S")
    sm.add_argument("--build-dir", default="build/sim")
    sm.add_argument("--json", action="store_true",
                    help='print {"bit_exact", "tokens_rtl", "tokens_reference", "tokens_torch_integer", '
                         '"cycles_prefill", "cycles_per_token", "hbm_bytes_per_token", ...}')
    sm.set_defaults(func=cmd_simulate_model)

    add_estimate_parsers(sub)
    add_build_parser(sub)
    return p


def _device_option(parser, what: str):
    parser.add_argument("--device", default="cpu", metavar="DEV",
                        help=f"cpu (default), cuda or cuda:N, where torch sees a GPU: {what}. A device torch "
                             f"does not see is refused before any work (exit status 2)")


def main(argv: list[str] | None = None) -> int:
    from quant.runtime import passive_wait

    passive_wait()  # OMP_WAIT_POLICY=PASSIVE unless set: must happen before torch loads (quant/runtime.py)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except _user_errors() as e:
        print(f"accllm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `accllm ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
