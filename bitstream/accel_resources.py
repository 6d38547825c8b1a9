"""Whole-accelerator resource counts (``hw.accel.AxiAccelerator``: the engine, the special-function
units, the controller and its executors, the scratchpad, the AXI memory system) without a flat run:
every distinct component synthesized once with Yosys ``synth_xilinx -family xcup`` and summed by its
instance count in the real top (``bitstream.partsum``).

    from bitstream.accel_resources import accel_estimate, flat_check
    accel_estimate(engine_params, accel_params)  # {"totals", "by_part", "by_component", ...}

The parts, read from the real tops (``Module._named_submodules``, Amaranth 0.5):

* ``engine.*`` — the engine by its own parts (``bitstream.engine_resources.engine_parts``);
* one part per special-function unit class (``hw/sfu/``, one instance of each in the top);
* ``Controller``, ``MemOps``, ``EngineStreamer`` (its beat gathers as black boxes) and each of the
  streamer's gathers (``BeatGather``, ``WideBeatGather``), one part per class and width;
* ``SpadMux`` and the scratchpad ``Memory`` synthesized alone (its two read and one write ports; Yosys
  maps it to BRAM or, with ``-uram``, URAM288);
* ``ReadPortMux``, ``ReadPortArbiter`` (read ports 0 and 1 shared) and ``AxiMemorySystem`` (the AXI4
  masters, ``hw/axi.py``);
* the glue: the ``Accelerator`` top and the ``AxiAccelerator`` top, each with every sub-component a
  black box (``bitstream.blackbox``).

``by_component`` groups the parts by ``CATEGORIES``. ``flat_check`` synthesizes the whole
``AxiAccelerator`` flat at the same parameters and compares it with the sum (``cross_check``, within
``TOLERANCE_PERCENT``): affordable at ``ci-small`` with a few units, not at ``u280``.
"""

from __future__ import annotations

import time

from amaranth.hdl import Elaboratable, Module

from hw.params import AccelParams, EngineParams

from .blackbox import _component_ports, _memory_ports, rtlil_with_black_boxes, silence
from .engine_resources import engine_parts
from .partsum import KEYS, Part, counts, sum_parts
from .yosys import estimate

__all__ = ["CATEGORIES", "TOLERANCE_PERCENT", "accel_parts", "accel_estimate", "by_component", "cross_check",
           "flat_check", "Alone"]

#: how ``by_component`` groups the parts (the issue's engine, special functions, controller, memory
#: system, and the glue; the scratchpad and its port multiplexer apart, since they are its own memory)
CATEGORIES = ("engine", "special_functions", "controller", "scratchpad", "memory_system", "glue")
_CATEGORY = {"Controller": "controller", "MemOps": "controller", "EngineStreamer": "controller",
             "SpadMux": "scratchpad", "Memory": "scratchpad",
             "ReadPortMux": "memory_system", "ReadPortArbiter": "memory_system", "AxiMemorySystem": "memory_system"}
#: how far the sum of parts may be from the flat run (``cross_check``), in percent of the flat count,
#: (below, above). Below: a part synthesized alone keeps all its logic, so the sum is not under the
#: whole design beyond Yosys' mapping noise (measured: never under here; the engine's own flat check
#: at 16 x 32 dsp: -1.1 % in LUTs, benchmarks/results/u280_engine_utilization_dsp.json). Above: in the
#: whole design Yosys removes what the parts alone keep (outputs nobody reads, inputs constant in
#: context). Measured at ci-small with two units (accel_utilization.py --hw ci-small --units
#: RESID_ADD,ARGMAX --flat-check, 2026-12-02, after the 225 MHz pipeline): with the engine's
#: requantizers the sum was 15,685 LUT / 9,892 FF / 30 DSP against the flat 12,895 / 8,403 / 22
#: (+21.6 %, +17.7 %, +36 %): the controller ties every ENGINE command's requant to 0, so in the flat run
#: the 4 Requantizers (464 LUT, 446 FF, 2 DSP each) fold to their 5-stage acc delay line, and the
#: AccRows' (mult, shift) registers and the rq register go too. The lean engine (requantizer: false,
#: the engine the accelerator needs) does not build them: its sum is 13,734 / 7,906 / 22 against the flat 12,860 /
#: 7,739 / 22 (+6.8 %, +2.2 %, 0.0 %; benchmarks/results/accel_flat_check.json; the flat run moved by
#: 35 LUT and 0 DSP between the two builds, its FFs by the delay line's 664). The upper bounds are
#: those plus a margin; the check catches a part left out or counted twice down to the size of the
#: AccRows' flip-flops (a small part or one row more or less is below its resolution: the instance
#: counts are tested from the real top).
TOLERANCE_PERCENT = {"lut": (2.0, 10.0), "ff": (2.0, 5.0), "dsp": (2.0, 5.0), "bram36": (2.0, 5.0),
                     "uram": (2.0, 5.0)}


class Alone(Elaboratable):
    """One sub-component of a real top, synthesized on its own with ``ports`` as the top's ports (for
    designs whose ports are not a ``wiring`` signature: a ``Memory``'s read and write ports, the AXI
    buses of ``AxiMemorySystem``)."""

    def __init__(self, sub, ports: list):
        self.sub, self.ports = sub, ports
        silence(self)  # built to be counted; only converted when synthesized

    def elaborate(self, platform):
        m = Module()
        m.submodules.sub = self.sub
        return m


def _shape_key(sub) -> tuple:
    """What makes two instances of one class the same design here: their ports' names and widths."""
    from amaranth.lib.memory import Memory
    if isinstance(sub, Memory):
        return ("memory", sub.depth, repr(sub.shape), len(sub.read_ports), len(sub.write_ports))
    if hasattr(sub, "signature"):
        return tuple((n, len(v)) for n, v, _ in _component_ports(sub))
    return (id(sub),)


def _what(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _group(subs, category_of) -> dict[str, dict]:
    """Sub-components -> one entry per distinct design: {"count", "what", "design", "category"}; a class
    with instances of different port shapes gets one entry per shape (``Class[i]``)."""
    out: dict[str, dict] = {}
    shapes: dict[str, list] = {}
    for sub in subs:
        cls = type(sub)
        key = _shape_key(sub)
        seen = shapes.setdefault(cls.__name__, [])
        if key not in seen:
            seen.append(key)
        i = seen.index(key)
        name = cls.__name__ if i == 0 else f"{cls.__name__}[{i}]"
        entry = out.setdefault(name, {"count": 0, "what": _what(cls), "design": sub, "category": category_of(cls)})
        entry["count"] += 1
        silence(sub)
    # a class seen with two shapes: name every shape by its index so the names say so
    for cname, seen in shapes.items():
        if len(seen) > 1 and cname in out:
            out[f"{cname}[0]"] = out.pop(cname)
    return out


def _submodules(elaboratable) -> list:
    """The sub-components ``elaborate`` put in ``m.submodules`` (elaborating only this level)."""
    top = elaboratable.elaborate(None)
    subs = [sub for sub, _ in top._named_submodules.values()]
    silence(elaboratable, top, *subs)
    return subs


def accel_parts(engine: EngineParams, accel: AccelParams, units=None) -> list[Part]:
    """The whole ``AxiAccelerator`` as ``sum_parts`` counts it (module docstring): every distinct
    component once with its instance count in the real tops, the tops' own logic as glue."""
    from amaranth.lib.memory import Memory

    from hw.accel import Accelerator, AxiAccelerator
    from hw.axi import AxiMemorySystem
    from hw.controller import EngineStreamer
    from hw.engine import Engine
    from hw.memory import BeatGather, WideBeatGather
    gather_classes = (BeatGather, WideBeatGather)

    top = AxiAccelerator(engine, accel, units)
    silence(top)
    unit_classes = set(top.core.unit_classes.values())

    def category(cls):
        return "special_functions" if cls in unit_classes else _CATEGORY.get(cls.__name__, "glue")

    core_subs = _submodules(top.core)
    engines = [s for s in core_subs if isinstance(s, Engine)]
    if len(engines) != 1:
        raise RuntimeError(f"hw.accel.Accelerator holds {len(engines)} engines; this count expects one "
                           f"(bitstream/accel_resources.py)")
    others = [s for s in core_subs if not isinstance(s, Engine)]
    streamers = [s for s in others if isinstance(s, EngineStreamer)]
    grouped = _group(others, category)
    for g in (g for s in streamers for g in _submodules(s) if isinstance(g, gather_classes)):
        cls = type(g)
        entry = grouped.setdefault(f"{cls.__name__}.{g.width}", {"count": 0, "what": _what(cls), "design": g,
                                                                   "category": "controller"})
        entry["count"] += 1

    parts = engine_parts(engine, prefix="engine.", category="engine")
    for name, e in grouped.items():
        d = e["design"]
        if isinstance(d, Memory):
            design = Alone(d, [v for _, v, _ in _memory_ports(d)])
            what = f"the scratchpad: amaranth.lib.memory.Memory, {d.depth} x {d.shape}, " \
                   f"{len(d.read_ports)} read + {len(d.write_ports)} write ports, alone"
            parts.append(Part(name, e["count"], what, design=design, ports=design.ports, category=e["category"]))
        elif isinstance(d, EngineStreamer):
            parts.append(Part(name, e["count"], e["what"] + " (its beat gathers as black boxes)",
                              design=lambda d=d: rtlil_with_black_boxes(d, gather_classes), category=e["category"]))
        elif isinstance(d, gather_classes):
            lanes = f" in transfers of {d.lanes}" if isinstance(d, WideBeatGather) else ""
            parts.append(Part(name, e["count"], f"{e['what']}: {d.n} words of {d.word_bits} bits{lanes} "
                              f"-> a {d.width}-bit beat", design=d, category=e["category"]))
        else:
            parts.append(Part(name, e["count"], e["what"], design=d, category=e["category"]))

    memsys = AxiMemorySystem(accel, buses=top.buses)
    silence(memsys)
    ms_ports = [v for _, v, _ in _component_ports(memsys)] + memsys.bus_ports
    ms = Alone(memsys, ms_ports)
    parts.append(Part("AxiMemorySystem", 1, _what(AxiMemorySystem) + f": {accel.mem_ports} striped port(s) "
                      f"m_axi_mem<p> + m_axi_aux, {accel.mem_word_bits}-bit", design=ms, ports=ms.ports,
                      category="memory_system"))

    core_boxes = {type(s) for s in core_subs}
    parts.append(Part("Accelerator.top", 1, "hw.accel.Accelerator's own logic (sub-components as black boxes): "
                      "dispatch, the memory-error latch, the cycle counter, progress",
                      design=lambda: rtlil_with_black_boxes(Accelerator(engine, accel, units, read_fault=True),
                                                            core_boxes), category="glue"))

    def axi_top():
        t = AxiAccelerator(engine, accel, units)
        return rtlil_with_black_boxes(t, [Accelerator, AxiMemorySystem], ports=t.ports)
    parts.append(Part("AxiAccelerator.top", 1, "hw.accel.AxiAccelerator's own logic (core and memory system as "
                      "black boxes): the activity counter", design=axi_top, category="glue"))
    return parts


def by_component(by_part: dict) -> dict:
    """``sum_parts``' ``by_part`` grouped by category: {category: {lut, ff, ..., "parts": [names]}}."""
    out = {c: {**{k: 0.0 for k in KEYS}, "parts": []} for c in CATEGORIES}
    for name, d in by_part.items():
        c = out.setdefault(d["category"] or "glue", {**{k: 0.0 for k in KEYS}, "parts": []})
        for k in KEYS:
            c[k] += d["total"][k]
        c["parts"].append(name)
    return out


def accel_estimate(engine: EngineParams, accel: AccelParams, units=None, *, limit: dict | None = None,
                   cached_only: bool = False, timeout_s: float = 3600, log=None) -> dict:
    """``sum_parts`` over ``accel_parts`` (``limit``: ``partsum.DoesNotFit`` as soon as the partial sum
    exceeds it) and the parts grouped by category."""
    res = sum_parts(accel_parts(engine, accel, units), limit=limit, cached_only=cached_only,
                    timeout_s=timeout_s, log=log)
    res["by_component"] = by_component(res["by_part"])
    return res


def _resum(by_part: dict) -> dict:
    return {k: sum(d["each"][k] * d["count"] for d in by_part.values()) for k in KEYS}


def cross_check(by_part: dict, flat: dict, tolerance_percent: dict = TOLERANCE_PERCENT) -> dict:
    """The parts (``each`` x ``count``, summed again here) against a flat run's counts: the difference
    in percent of the flat count per resource, and whether every resource the designs have is within
    ``tolerance_percent`` ((below, above), ``TOLERANCE_PERCENT``)."""
    summed = _resum(by_part)
    diff = {k: (round(100 * (summed[k] - flat[k]) / flat[k], 2) if flat[k] else (0.0 if not summed[k] else None))
            for k in KEYS}
    checked = [k for k in KEYS if k in ("lut", "ff", "dsp") or flat[k] or summed[k]]
    within = all(diff[k] is not None and -tolerance_percent[k][0] <= diff[k] <= tolerance_percent[k][1]
                 for k in checked)
    return {"sum_of_parts": summed, "flat": flat, "difference_percent": diff, "checked": checked,
            "tolerance_percent": {k: list(v) for k, v in tolerance_percent.items()}, "within_tolerance": within}


def flat_check(engine: EngineParams, accel: AccelParams, units=None, *, timeout_s: float = 3600, log=None,
               tolerance_percent: dict = TOLERANCE_PERCENT) -> dict:
    """The whole ``AxiAccelerator`` synthesized flat against ``accel_estimate`` at the same parameters
    (``cross_check``)."""
    from hw.accel import AxiAccelerator

    summed = accel_estimate(engine, accel, units, timeout_s=timeout_s, log=log)
    top = AxiAccelerator(engine, accel, units)
    res = estimate(top, top="top", ports=top.ports, timeout_s=timeout_s)
    flat = counts(res)
    if log:
        log("  flat AxiAccelerator: " + ", ".join(f"{k} {flat[k]:g}" for k in KEYS)
            + f" ({res['seconds']:.0f} s{', cached' if res['cached'] else ''})")
    return {**cross_check(summed["by_part"], flat, tolerance_percent), "by_part": summed["by_part"],
            "by_component": summed["by_component"], "flat_seconds": res["seconds"], "flat_key": res["key"],
            "seconds": round(summed["seconds"] + res["seconds"], 1)}
