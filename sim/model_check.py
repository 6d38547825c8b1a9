"""The proof: a whole quantized Llama generating tokens on the accelerator RTL, equal to the golden model.

``simulate_model`` (what ``accllm simulate model`` calls) takes an artifact, compiles the prompt and the
generation into one program and memory image (``hw.compile``), and runs it three ways:

* the numpy golden model (``quant.golden``: prefill, then decode steps) and the torch integer path
  (``quant.integer``), which must agree with each other (``generate_against_golden``);
* the machine model (``hw.machine``): the program itself, executed instruction by instruction with
  ``quant.reference`` — it proves the compiler, independently of the RTL;
* the RTL (``hw.accel`` in Amaranth's simulator, or its Verilog under Verilator or Icarus,
  ``sim.accel_sim``), with stalls on the memory ports.

The tokens of all four must be equal, and so must every traced intermediate (each layer's output, the
final norm, the logits, per step; ``--trace all`` stores every operation): on a mismatch the first
differing step, layer, operation and element is named, and both tensors are written to the run folder.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from quant import golden as G

__all__ = ["golden_run", "simulate_model", "compare_traces", "ModelMismatch"]


class ModelMismatch(RuntimeError):
    pass


#: the golden model's greedy generation with every step's trace (``quant.golden.generate_traced``)
golden_run = G.generate_traced


def compare_traces(expected: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> str | None:
    """The first traced tensor (in computation order of ``got``'s names) that differs, as
    ``golden.first_mismatch`` names it; only names present in ``got`` are compared."""
    want = {k: expected[k] for k in got if k in expected}
    missing = [k for k in got if k not in expected]
    if missing:
        return f"{missing[0]}: traced by the program but not computed by the golden model"
    return G.first_mismatch(want, got)


def _dump(run_dir: Path, name: str, want, have) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "mismatch.npz"
    np.savez(path, name=np.array(name), expected=np.asarray(want), got=np.asarray(have))
    return path


def simulate_model(artifact: str | Path, engine, accel, simulator: str, prompt: str | None = None,
                   tokens: int = 4, *, prompt_ids: list[int] | None = None, trace: str = "layers",
                   stall_profile: str = "asymmetric", seed: int = 0, build_dir: str | Path = "build/sim",
                   progress: bool = True, model=None, tokenizer=None, units=None,
                   max_cycles: int | None = None) -> dict:
    """Prefill ``prompt`` and generate ``tokens`` tokens of ``artifact`` on the RTL (``simulator``:
    amaranth, verilator or icarus), against the golden model, the torch integer path and the machine
    model. Returns the JSON the CLI prints (see ``accllm simulate model --help``). ``model``/``tokenizer``:
    an already loaded artifact (its numerics as set); ``units``: the special-function units to build
    (``hw.accel.resolve_units``; tests plant bugs this way); ``max_cycles``: the RTL's cycle budget
    (default ``run_accelerator``'s 50 M, too few for a model of SmolLM2's size)."""
    from hw.compile import compile_generation
    from hw.machine import run as machine_run
    from quant.errors import QuantError
    from quant.evaluate import generate_ids
    from quant.loading import load_model

    from .accel_sim import run_accelerator

    t0 = time.perf_counter()
    stages = ["load", "compile", "golden + torch", "machine model", f"RTL ({simulator})"]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(stages), desc="simulate model", unit="stage", leave=False)

    times: dict[str, float] = {}
    last = [time.perf_counter()]

    def stage(i):
        now = time.perf_counter()
        if i:
            times[stages[i - 1]] = round(now - last[0], 2)
        last[0] = now
        if bar is not None:
            if i < len(stages):
                bar.set_postfix_str(stages[i])
            if i:
                bar.update(1)

    stage(0)
    if model is None:
        model, tokenizer = load_model(str(artifact), "cpu")
    if prompt_ids is None:
        if prompt is None:
            raise QuantError("simulate model: give --prompt TEXT")
        prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if not prompt_ids:
        raise QuantError("simulate model: the prompt is empty after tokenization; give some text")
    if tokens < 1:
        raise QuantError(f"simulate model: --tokens {tokens}: generate at least one token")
    spec = model.integer_spec()

    stage(1)  # the compiler first: a model the engine config cannot run is refused before any work
    compiled = compile_generation(spec, engine, accel, list(prompt_ids), tokens, trace=trace)

    stage(2)
    ref_tokens, ref_trace = golden_run(spec, prompt_ids, tokens)  # the golden model once, traced
    model.numerics.integer_path = True  # integer_spec() above has refused a model that cannot run it
    torch_tokens = generate_ids(model, list(prompt_ids), tokens)

    stage(3)
    mrun = machine_run(compiled, engine, accel)
    machine_tokens = compiled.read_tokens(mrun.mem)
    machine_bad = compare_traces(ref_trace, compiled.read_trace(mrun.mem))

    stage(4)
    run_root = Path(build_dir) / "model" / f"{simulator}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{seed}"
    budget = {} if max_cycles is None else {"max_cycles": int(max_cycles)}
    rtl = run_accelerator(engine, accel, compiled.image, simulator=simulator, stall_profile=stall_profile,
                          seed=seed, run_dir=run_root, units=units, **budget)
    stage(len(stages))
    if bar is not None:
        bar.close()
    if rtl.error:
        ins = compiled.program[rtl.pc] if 0 <= rtl.pc < len(compiled.program) else None
        raise ModelMismatch(f"the RTL stopped with error {rtl.error_name} at instruction {rtl.pc} "
                            f"({ins!r}) after {rtl.cycles} cycles; run folder {rtl.run_dir}")
    rtl_tokens = compiled.read_tokens(rtl.mem)
    rtl_trace = compiled.read_trace(rtl.mem)
    rtl_bad = compare_traces(ref_trace, rtl_trace)
    mem_equal = bool(np.array_equal(_without_marks(compiled, rtl.mem), _without_marks(compiled, mrun.mem)))
    cycles = compiled.read_cycles(rtl.mem)
    first = None
    dumped = None
    for who, bad in (("RTL", rtl_bad), ("machine model", machine_bad)):
        if bad:
            first = f"{who}: {bad}"
            name = bad.split("[")[0].split(":")[0]
            src = rtl_trace if who == "RTL" else compiled.read_trace(mrun.mem)
            if name in src and name in ref_trace:
                dumped = str(_dump(Path(getattr(rtl, "run_dir", run_root)), name, ref_trace[name], src[name]))
            break
    if first is None and not mem_equal:
        first = "RTL: final memory differs from the machine model's outside the traced tensors " \
                f"({_first_mem_difference(compiled, rtl.mem, mrun.mem)})"
    bit_exact = (first is None and rtl_tokens == ref_tokens == torch_tokens == machine_tokens)
    res = {
        "bit_exact": bool(bit_exact),
        "tokens_rtl": rtl_tokens,
        "tokens_reference": ref_tokens,
        "tokens_torch_integer": torch_tokens,
        "tokens_machine": machine_tokens,
        "cycles_prefill": cycles["prefill"],
        "cycles_per_token": cycles["per_token"],
        "hbm_bytes_per_token": compiled.decode_bytes_per_token() if hasattr(compiled, "decode_bytes_per_token")
        else None,
        "first_mismatch": first,
        "mismatch_dump": dumped,
        "simulator": simulator,
        "instructions": len(compiled.program),
        "prompt_tokens": len(prompt_ids),
        "rtl_cycles": int(rtl.cycles),
        "wall_s": round(time.perf_counter() - t0, 2),
        "rtl_wall_s": round(float(rtl.wall_s), 2),
        "rtl_cpu_s": round(float(getattr(rtl, "cpu_s", 0.0)), 2),
        "machine_cycles_estimate": None if mrun.cycles is None else int(mrun.cycles),
        "stage_wall_s": times,
    }
    if tokenizer is not None:
        res["text_rtl"] = tokenizer.decode(rtl_tokens, skip_special_tokens=True)
    return res


def _without_marks(compiled, mem: np.ndarray) -> np.ndarray:
    """The memory with the cycle counters MARK stored zeroed: the machine model's are estimates."""
    out = np.array(mem, np.uint8, copy=True)
    lo, words = compiled.regions["marks"]
    wb = compiled.accel.mem_word_bits // 8
    out[lo * wb:(lo + words) * wb] = 0
    return out


def _first_mem_difference(compiled, a: np.ndarray, b: np.ndarray) -> str:
    a, b = _without_marks(compiled, a), _without_marks(compiled, b)
    n = min(a.size, b.size)
    diff = np.flatnonzero(a[:n] != b[:n])
    if not diff.size:
        return f"sizes {a.size} and {b.size} bytes"
    byte = int(diff[0])
    word = byte * 8 // compiled.accel.mem_word_bits
    for name, (lo, words) in compiled.regions.items():
        if lo <= word < lo + words:
            return f"region {name!r}, word {word - lo}, byte {byte}"
    return f"byte {byte} (word {word}, in no named region)"


def to_json(res: dict) -> str:
    return json.dumps(res)
