"""A top level converted to RTLIL with its sub-components as black boxes, so that a synthesis counts
only the top's own cells (the glue: muxes, registers, wiring) and no sub-component is built.

    rtlil_with_black_boxes(Accelerator(ep, ap), classes)  # RTLIL text, ``bb_<Class>`` cells in it

While the top is converted, every class in ``classes`` elaborates to one ``Instance`` of a black box
(``bb_<Class>``, declared with ``attribute \\blackbox 1`` in the text) whose ports are the instance's
own: a ``wiring.Component``'s signature, or for ``amaranth.lib.memory.Memory`` its read ports (addr, en
in; data out) and write ports (addr, data, en in). The black box's outputs are free, so nothing behind
them is optimised away, and its inputs are kept, so the logic that drives them is counted.
"""

from __future__ import annotations

__all__ = ["rtlil_with_black_boxes", "silence"]


def silence(*elaboratables) -> None:
    """Mark elaboratables built only to be counted as used (Amaranth warns about unused ones), and
    those they hold in attributes (lists or dicts of them too: the engine's requantizers)."""
    from amaranth.hdl import Elaboratable
    for e in elaboratables:
        e._MustUse__silence = True
        for v in vars(e).values():
            for x in (v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else [v]):
                if isinstance(x, Elaboratable):
                    x._MustUse__silence = True


def _memory_ports(mem) -> list[tuple[str, object, bool]]:
    out = []
    for i, p in enumerate(mem.read_ports):
        out += [(f"r{i}__addr", p.addr, True), (f"r{i}__en", p.en, True), (f"r{i}__data", p.data, False)]
    for i, p in enumerate(mem.write_ports):
        out += [(f"w{i}__addr", p.addr, True), (f"w{i}__data", p.data, True), (f"w{i}__en", p.en, True)]
    return out


def _component_ports(comp) -> list[tuple[str, object, bool]]:
    from amaranth.hdl import ValueCastable
    from amaranth.lib.wiring import In
    out = []
    for path, member, value in comp.signature.flatten(comp):
        v = value.as_value() if isinstance(value, ValueCastable) else value
        out.append(("__".join(map(str, path)), v, member.flow == In))
    return out


def rtlil_with_black_boxes(design, classes, name: str = "top", ports: list | None = None) -> str:
    """RTLIL of ``design`` with every instance of ``classes`` a black box (module docstring);
    ``ports``: the top's ports when it is not a ``wiring.Component`` (``AxiAccelerator.ports``)."""
    from amaranth.back import rtlil
    from amaranth.hdl import Instance, Module
    from amaranth.lib.memory import Memory

    classes = sorted(set(classes), key=lambda c: c.__name__)  # stable text: cacheable
    stubs: dict[str, list[str]] = {}

    def black_box(self, platform):
        silence(self)
        ports, wires = {}, []
        listed = _memory_ports(self) if isinstance(self, Memory) else _component_ports(self)
        for i, (pname, v, inp) in enumerate(listed):
            ports[("i_" if inp else "o_") + pname] = v
            wires.append(f"  wire width {len(v)} {'input' if inp else 'output'} {i + 1} \\{pname}")
        # instances of one class with different ports name themselves by ``part_name`` when they have
        # one (hw.engine_dsp.DspRows of 3 and of 1 row); others with other port widths (the streamer's
        # two gathers) are black boxes of their own all the same: bb_<name>, bb_<name>_1, ...
        bb = base = f"bb_{getattr(self, 'part_name', type(self).__name__)}"
        n = 0
        while stubs.get(bb, wires) != wires:
            n += 1
            bb = f"{base}_{n}"
        stubs.setdefault(bb, wires)
        m = Module()
        m.submodules.bb = Instance(bb, **ports)
        return m

    saved = {cls: cls.__dict__.get("elaborate") for cls in classes}
    try:
        for cls in classes:
            cls.elaborate = black_box
        kw = {} if ports is None else {"ports": list(ports)}
        text = rtlil.convert(design, name=name, emit_src=False, **kw)  # location-free: cacheable
    finally:
        for cls, fn in saved.items():
            if fn is None:
                del cls.elaborate
            else:
                cls.elaborate = fn
    decl = "".join(f"attribute \\blackbox 1\nmodule \\{n}\n" + "\n".join(w) + "\nend\n" for n, w in stubs.items())
    return decl + text
