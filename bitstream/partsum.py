"""Summing per-part Yosys counts by instance count, with an early refusal when the running sum alone
already exceeds a limit (the counts only grow, so the partial sum is a lower bound of the design).

    parts = [Part("ArrayRow", 256, "hw.engine_parts.ArrayRow", design=row), ...]
    sum_parts(parts, limit=U280_RESOURCES)  # {"totals": {...}, "by_part": {...}}; raises DoesNotFit

Parts are synthesized largest instance count first, so a config with too many rows is refused after
its first (often cached) part, before anything else is built.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .yosys import estimate, to_rtlil

__all__ = ["KEYS", "Part", "DoesNotFit", "PartFailed", "sum_parts", "counts"]

KEYS = ("lut", "ff", "dsp", "bram36", "uram")


@dataclass
class Part:
    """One distinct design and how many times the whole holds it. ``design``: an elaboratable, RTLIL
    text, or a callable returning one (built only when synthesized: the black-boxed tops take seconds
    to convert). ``lut_mapper``: Yosys' LUT mapping for this part (``bitstream.yosys.script_for``)."""
    name: str
    count: int
    what: str
    design: Any = None
    ports: list | None = None
    category: str = ""
    extra: dict = field(default_factory=dict)
    lut_mapper: str = "abc9"

    def get_design(self):
        return self.design() if callable(self.design) and not hasattr(self.design, "elaborate") else self.design


class DoesNotFit(RuntimeError):
    """The partial sum of per-part counts exceeds ``limit`` for ``resource``."""

    def __init__(self, resource: str, value: float, limit: float, counted_totals: dict[str, float],
                 remaining: list[str]):
        self.resource, self.value, self.limit = resource, value, limit
        self.percent = 100 * value / limit
        self.counted_totals = counted_totals  # part -> its count x instances, of ``resource``
        self.counted, self.remaining = list(counted_totals), remaining
        super().__init__(f"{resource} {value:,.0f} = {self.percent:.0f} % of {limit:,.0f} already from "
                         f"{', '.join(self.counted)} ({len(remaining)} parts not yet counted)")


class PartFailed(RuntimeError):
    """A part could not be converted to RTLIL or synthesized; the message names the part."""

    def __init__(self, part: "Part", stage: str, cause: BaseException):
        self.part, self.stage, self.cause = part, stage, cause
        super().__init__(f"{part.name} ({part.what}): {stage} failed: {type(cause).__name__}: "
                         f"{str(cause).strip()[:1500] or '(no message)'}")


def counts(res: dict) -> dict:
    return {k: res[k] for k in KEYS}


def sum_parts(parts: list[Part], *, limit: dict | None = None, cached_only: bool = False,
              timeout_s: float = 3600, log: Callable[[str], None] | None = None) -> dict:
    """Synthesize each part once (``bitstream.yosys.estimate``, cached by content) and sum by instance
    count; with ``limit`` raise ``DoesNotFit`` as soon as the partial sum exceeds it. ``cached_only``:
    no synthesis, parts not in the cache are left out (listed in ``not_counted``; the totals are then
    a lower bound)."""
    t0 = time.monotonic()
    order = sorted(parts, key=lambda p: -p.count)  # stable: equal counts keep their order
    by: dict[str, dict] = {}
    total = {k: 0.0 for k in KEYS}
    skipped: list[str] = []
    res = None
    for i, part in enumerate(order):
        tc = time.monotonic()
        try:
            design = to_rtlil(part.get_design(), top="top", ports=part.ports)
        except Exception as e:  # Amaranth asserts on some designs (a cell over 65,536 bits): name the part
            raise PartFailed(part, "conversion to RTLIL (Amaranth)", e) from e
        convert_s = time.monotonic() - tc
        try:
            res = estimate(design, top="top", timeout_s=timeout_s, cached_only=cached_only,
                           lut_mapper=part.lut_mapper)
        except Exception as e:
            raise PartFailed(part, "Yosys synthesis", e) from e
        if res is None:
            skipped.append(part.name)
            continue
        each = counts(res)
        by[part.name] = {"count": part.count, "what": part.what, "category": part.category, "each": each,
                         "total": {k: each[k] * part.count for k in KEYS}, "carry": res["carry"],
                         "seconds": res["seconds"], "cached": res["cached"], "key": res["key"],
                         "lut_mapper": part.lut_mapper, **part.extra}
        if convert_s > 5:
            by[part.name]["rtlil_convert_seconds"] = round(convert_s, 1)
        for k in KEYS:
            total[k] += each[k] * part.count
        if log:
            log(f"  {part.name} x{part.count}: " + ", ".join(f"{k} {each[k]:g}" for k in KEYS)
                + f" ({res['seconds']:.0f} s{', cached' if res['cached'] else ''})")
        if limit:
            for k in KEYS:
                if k in limit and total[k] > limit[k]:
                    raise DoesNotFit(k, total[k], limit[k], {n: d["total"][k] for n, d in by.items()},
                                     skipped + [p.name for p in order[i + 1:]])
    return {"totals": total, "by_part": by, "not_counted": skipped, "seconds": round(time.monotonic() - t0, 1),
            "script": res["script"].replace("read_rtlil design.il; ", "") + " (per part)" if res else ""}
