"""Planted bugs: the audit's (issue 10) engine bugs, each as a text patch applied to a *copy* of
``hw/engine.py`` loaded as its own module. The committed RTL never contains them; the checkers
(tests/hw, tests/sim, tests/hw/test_formal.py) are shown to catch each one (tests/hw/test_planted.py,
docs/engine.md "Planted bugs").

A patch names the exact text it replaces; if the RTL changes so that the text is gone, ``load``
fails loudly instead of silently testing the unmodified engine.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

ENGINE_SOURCE = Path(__file__).resolve().parent.parent / "hw" / "engine.py"

#: name -> (what the bug is, original text, replacement)
BUGS = {
    "bram_enable": (
        "the activation banks' read enable ignores the stall (the read word moves on while S1 is held)",
        "m.d.comb += [rps[i].addr.eq(widx >> 1), rps[i].en.eq(~stall)]",
        "m.d.comb += [rps[i].addr.eq(widx >> 1), rps[i].en.eq(1)]",
    ),
    "out_bank_overwrite": (
        "a finished tile overwrites the output bank's token that is on the output but not yet taken",
        "may_write = ~ob_busy | (t3 >= ob_tokens) | (t3 < ob_e) | ((t3 == ob_e) & out_fire)",
        "may_write = ~ob_busy | (t3 >= ob_tokens) | (t3 < ob_e) | (t3 == ob_e)",
    ),
    "no_hold_on_stall": (
        "the S1 pipeline registers load on every cycle, stall or not (the op in S1 is lost: a hang)",
        "        with m.If(~stall):\n            m.d.sync += [\n                s1_valid.eq(issue),",
        "        with m.If(1):\n            m.d.sync += [\n                s1_valid.eq(issue),",
    ),
    "round_up_shift_gt8": (
        "the requantizer adds 1 before the shift when shift > 8",
        "summed.eq(self.acc * self.mult + half)",
        "summed.eq(self.acc * self.mult + half + (self.shift > 8))",
    ),
    "out_duplicate": (
        "not from the audit, for the formal beat count: the output bank stays armed after its last "
        "token went out, so the tile's beats are sent again",
        "m.d.sync += [ob_busy.eq(0), ob_e.eq(0)]",
        "m.d.sync += [ob_e.eq(0)]",
    ),
    "rq_row0": (
        "not from the audit, for the per-row requantization: every row requantized with row 0's mult",
        "rq.mult.eq(ob_mult[r])",
        "rq.mult.eq(ob_mult[0])",
    ),
    "acc_24_bits": (
        "the row accumulators are 24 bits instead of acc_bits",
        'acc = [Array(Signal(signed(ACC), name=f"acc_t{tk}_r{r}")',
        'acc = [Array(Signal(signed(24), name=f"acc_t{tk}_r{r}")',
    ),
}

_loaded: dict[str, object] = {}


def source(name: str) -> str:
    """hw/engine.py with bug ``name`` planted (relative imports made absolute)."""
    if name not in BUGS:
        raise ValueError(f"planted bug {name!r}: choose from {', '.join(BUGS)}")
    _, old, new = BUGS[name]
    text = ENGINE_SOURCE.read_text()
    if text.count(old) != 1:
        raise RuntimeError(f"planted bug {name!r}: the text it replaces occurs {text.count(old)} times in "
                           f"{ENGINE_SOURCE} (expected once): update sim/planted.py to the new RTL")
    return text.replace(old, new).replace("from .", "from hw.")


def load(name: str):
    """The module of a copy of hw/engine.py with bug ``name`` planted (``.Engine``, ``.Requantizer``)."""
    if name in _loaded:
        return _loaded[name]
    folder = Path(tempfile.mkdtemp(prefix=f"planted-{name}-"))
    path = folder / f"engine_planted_{name}.py"
    path.write_text(source(name))
    modname = f"_accllm_planted_{name}"
    spec = importlib.util.spec_from_file_location(modname, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[modname] = mod  # dataclasses/enums look their module up while the body runs
    spec.loader.exec_module(mod)
    _loaded[name] = mod
    return mod
