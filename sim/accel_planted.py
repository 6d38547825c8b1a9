"""Planted bugs in the controller (``hw/controller.py``), each a text patch applied to a *copy* of the
module, wired into a copy of ``hw/accel.py``; the committed RTL never contains them. The accelerator
tests (tests/hw/test_controller.py) show each is caught. A patch whose text is gone from the RTL fails
loudly instead of silently testing the unmodified controller."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from .planted import scratch_dir

HW = Path(__file__).resolve().parent.parent / "hw"

#: name -> (what the bug is, original text, replacement)
BUGS = {
    "store_ignores_ready": (
        "a stall ignored: STORE counts its word as written while the write port is not ready",
        "with m.If(flush & mwr.req.ready):",
        "with m.If(flush):",
    ),
    "store_strobe_top_byte": (
        "a wrong strobe: STORE's writes leave the word's top byte unwritten",
        "all_strb = Const(2**(W // 8) - 1, W // 8)",
        "all_strb = Const(2**(W // 8 - 1) - 1, W // 8)",
    ),
    "row_filter_off_by_one": (
        "ENGINE writes row h as well (g <= r <= h)",
        "(row >= ins.g) & (row < ins.h)",
        "(row >= ins.g) & (row <= ins.h)",
    ),
    "out_beat_dropped": (
        "a dropped beat: the output capture takes a new engine beat while the previous one is still being "
        "written to the spad (the earlier beat is lost)",
        "m.d.comb += self.out.ready.eq(running & ~o_full)",
        "m.d.comb += self.out.ready.eq(running & (~o_full | (o_lr == 0)))",
    ),
    "load_ignores_valid": (
        "a stall ignored: LOAD writes an element whether or not the memory word has arrived",
        "have.eq((left != 0) | mrd.data.valid)",
        "have.eq(1)",
    ),
    "tile_stride_ignored": (
        "ENGINE reads the weight tiles back to back, ignoring the tile stride f",
        "w_addr.eq(w_addr + w_stride)",
        "w_addr.eq(w_addr + ins.n * WB)",
    ),
    "no_zero_fill": (
        "ENGINE reads activations past b instead of the zero fill",
        "from_spad = a_p < ins.b",
        "from_spad = a_p < ktok",
    ),
    "scatter_neg_ignored": (
        "SCATTER ignores FLAG_NEG",
        "m.d.comb += v.eq(Mux((ins.flags & FLAG_NEG).any(), -rd.data, rd.data))",
        "m.d.comb += v.eq(rd.data)",
    ),
    "scatter_skip_unchecked": (
        "a stale word written back: SCATTER caches the row stream's next word for a field in a later word "
        "without checking it is the field's (the word before it patched and written in its place)",
        "                    with m.If(saddr == word_of):",
        "                    with m.If(1):",
    ),
    "scatter_strobe_last_field": (
        "a field lost when two fields share a word: SCATTER's strobes cover only the last field patched",
        "dirty.eq(dirty | bytes_hit)",
        "dirty.eq(bytes_hit)",
    ),
    "scatter_bytes_unaligned": (
        "a field's neighbour lost: SCATTER writes byte-wide fields without reading their word even off the "
        "byte boundary (the bits beside them in their bytes zeroed)",
        "(wbits >= 8) & (ins.e[:3] == 0) & ",
        "(wbits >= 8) & ",
    ),
    "prefetch_not_awaited": (
        "the controller decodes the prefetch buffer while the prefetched words are still arriving",
        "                with m.Elif(pf_valid):",
        "                with m.Elif(pf_valid | pf_busy):",
    ),
}

_loaded: dict[str, object] = {}


def _load_module(modname: str, path: Path):
    spec = importlib.util.spec_from_file_location(modname, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[modname] = mod
    spec.loader.exec_module(mod)
    return mod


def patched_copy(filename: str, name: str, old: str, new: str, owner: str, tag: str):
    """A copy of ``hw/<filename>`` with ``old`` (which must occur exactly once) replaced by ``new``,
    imported as its own module: (module, folder of the copy). ``owner`` names the file whose bug table
    to update when the text is gone; ``tag`` keeps the module names of different users apart."""
    text = (HW / filename).read_text()
    if text.count(old) != 1:
        raise RuntimeError(f"planted bug {name!r}: the text it replaces occurs {text.count(old)} times in "
                           f"hw/{filename} (expected once): update {owner} to the new RTL")
    folder = scratch_dir(f"{tag}-{name}-")
    (folder / filename).write_text(text.replace(old, new).replace("from .", "from hw."))
    stem = filename.removesuffix(".py")
    return _load_module(f"_accllm_{tag.replace('-', '_')}_{stem}_{name}", folder / filename), folder


def patched_controller(name: str, old: str, new: str, owner: str, tag: str):
    """``patched_copy`` of hw/controller.py; used by ``load`` below and by sim/formal_accel.py."""
    return patched_copy("controller.py", name, old, new, owner, tag)


def load(name: str):
    """The module of a copy of hw/accel.py whose controller has bug ``name`` (``.Accelerator``)."""
    if name not in BUGS:
        raise ValueError(f"planted bug {name!r}: choose from {', '.join(BUGS)}")
    if name in _loaded:
        return _loaded[name]
    _, old, new = BUGS[name]
    ctrl, folder = patched_controller(name, old, new, "sim/accel_planted.py", "accel-planted")
    cname, aname = ctrl.__name__, f"_accllm_accel_planted_{name}"
    atext = (HW / "accel.py").read_text()
    assert atext.count("from .controller import") == 1
    atext = atext.replace("from .controller import", f"from {cname} import").replace("from .", "from hw.")
    (folder / "accel.py").write_text(atext)
    mod = _load_module(aname, folder / "accel.py")
    _loaded[name] = mod
    return mod


def factory(name: str):
    """An ``accel_factory`` for ``sim.accel_sim.run_accelerator`` building the planted accelerator."""
    return _factory(load(name), f"planted_{name}")


def _factory(mod, label: str):
    def make(engine, accel, units):
        return mod.Accelerator(engine, accel, units)
    make.__name__ = label
    return make


#: planted bugs of the wide weight path (``hw.memory.WideBeatGather``, the streamer's wide job):
#: name -> (file in hw/, what the bug is, original text, replacement); tests/hw/test_engine_wide.py
WIDE_BUGS = {
    "gather_slot_order": ("memory.py", "a beat out of order: the gather's transfers land in reversed slots",
                          "m.d.sync += slots[i].eq(src)", "m.d.sync += slots[X - 1 - i].eq(src)"),
    "gather_beat_short": ("memory.py", "a dropped transfer: a beat is complete one transfer early",
                          "            with m.If(t == X - 1):\n                m.d.sync += [full.eq(1), t.eq(0)]",
                          "            with m.If(t == X - 2):\n                m.d.sync += [full.eq(1), t.eq(0)]"),
    "job_beat_off_by_one": ("controller.py", "the wide job's beat one word long: transfers straddle beats",
                            "self.wrd.req.payload.beat.eq(WB)", "self.wrd.req.payload.beat.eq(WB + 1)"),
}
_wide_loaded: dict[str, object] = {}


def load_wide(name: str):
    """A copy of hw/accel.py built on a copy of hw/memory.py or hw/controller.py with wide-path bug
    ``name`` (``.Accelerator``); the copies import each other."""
    if name not in WIDE_BUGS:
        raise ValueError(f"planted wide-path bug {name!r}: choose from {', '.join(WIDE_BUGS)}")
    if name in _wide_loaded:
        return _wide_loaded[name]
    filename, _, old, new = WIDE_BUGS[name]
    tag = f"wide_{name}"
    mem_mod = None
    if filename == "memory.py":
        mem_mod = patched_copy("memory.py", name, old, new, "sim/accel_planted.py WIDE_BUGS", "accel-wide")[0]
    ctrl_text = (HW / "controller.py").read_text()
    if filename == "controller.py":
        if ctrl_text.count(old) != 1:
            raise RuntimeError(f"planted bug {name!r}: its text occurs {ctrl_text.count(old)} times in "
                               f"hw/controller.py (expected once): update sim/accel_planted.py WIDE_BUGS")
        ctrl_text = ctrl_text.replace(old, new)
    folder = scratch_dir(f"accel-wide-{name}-")
    if mem_mod is not None:
        ctrl_text = ctrl_text.replace("from .memory import", f"from {mem_mod.__name__} import")
    ctrl = _load_module(f"_accllm_{tag}_controller", _write(folder / "controller.py", ctrl_text))
    atext = (HW / "accel.py").read_text().replace("from .controller import", f"from {ctrl.__name__} import")
    if mem_mod is not None:
        atext = atext.replace("from .memory import", f"from {mem_mod.__name__} import")
    mod = _load_module(f"_accllm_{tag}_accel", _write(folder / "accel.py", atext.replace("from .", "from hw.")))
    _wide_loaded[name] = mod
    return mod


def _write(path: Path, text: str) -> Path:
    path.write_text(text.replace("from .", "from hw."))
    return path


def wide_factory(name: str):
    """An ``accel_factory`` building the accelerator with wide-path bug ``name``."""
    return _factory(load_wide(name), f"planted_wide_{name}")
