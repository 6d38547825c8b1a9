"""Verilog of a large design with its repeated sub-components written once: the u280 engine's 256
array rows (and its 256 group rows, accumulator rows and requantizers) become one Verilog module each,
instantiated 256 times, instead of 256 flattened copies that Amaranth's netlist builder and Yosys must
process one by one (a flat ``verilog.convert`` of the u280 accelerator ran 46 minutes without output).

    text = hierarchical_verilog(kernel, "accllm_kernel", kernel.ports, classes)

The top is converted with every instance of ``classes`` an ``Instance`` of a module of its own
(``bitstream.blackbox``'s black-box naming: ``bb_<Class>``, ``bb_<Class>_1`` for a variant with other
ports), then one instance of each such module is converted on its own under that name and the texts
are joined. Instances that share a module must be the same design: same class, same ports and the
same construction parameters (``_fingerprint``); a variant gets a module of its own. A module's ports
are its ``wiring`` signature plus the ``clk`` / ``rst`` Amaranth adds for its ``sync`` domain, which the
instances connect to the parent's ``sync`` domain; a sub-component using another clock domain is refused
(its name in the error).

While a ``Hierarchy`` is active, a memory whose initial contents are all zero is written without them
(``omit_zero_init``): Amaranth 0.5 emits every bit of every memory's init as its own constant net
(``back.rtlil.ModuleEmitter.emit_memory``), 64 Mbit for the u280's 2^20 x 64-bit scratchpad, which
Yosys then writes as a million ``initial`` assignments. Measured here on a 64-bit memory alone: 65,536
words took 34 s to RTLIL (4 MB) and 53 s through Yosys, 16,384 words 9 s and 6 s. The FPGA's block and
UltraRAM start at zero after configuration anyway (UltraRAM cannot be initialised at all), so for the
Vivado / Vitis plans nothing is lost; a simulation of this Verilog starts such memories at X.
"""

from __future__ import annotations

import dataclasses
import re

from .blackbox import _component_ports, silence

__all__ = ["Hierarchy", "omit_zero_init", "hierarchical_verilog", "repeated_engine_classes", "HierarchyError"]


class HierarchyError(ValueError):
    """A sub-component that cannot be written as a module of its own."""


def _fingerprint(obj) -> tuple:
    """The construction parameters of a component: its plain attributes (numbers, strings, parameter
    dataclasses, tuples of them); signals and sub-components are left out (the ports say those)."""
    out = []
    for k, v in sorted(vars(obj).items()):
        if isinstance(v, (bool, int, float, str)) or v is None:
            out.append((k, v))
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            out.append((k, repr(v)))
        elif isinstance(v, tuple) and all(isinstance(x, (bool, int, float, str)) for x in v):
            out.append((k, v))
    return tuple(out)


def repeated_engine_classes(engine_params) -> set[type]:
    """The engine's sub-component classes with more than one instance (``bitstream.engine_resources.
    engine_instances``, read from the real top: ArrayRow, GroupRow, AccRow, Requantizer, ...)."""
    from .engine_resources import engine_instances
    return {type(d["design"]) for d in engine_instances(engine_params).values() if d["count"] > 1}


def _module_ports(text: str, name: str, backend: str) -> list[str]:
    """The port names of module ``name`` in Verilog or RTLIL text."""
    if backend == "rtlil":
        m = re.search(rf"^module \\{re.escape(name)}\n(.*?)^end\n", text, re.S | re.M)
        if m:
            return re.findall(r"^\s*wire (?:width \d+ )?(?:input|output|inout) \d+\s+(?:signed\s+)?\\(\S+)",
                              m.group(1), re.M)
    else:
        m = re.search(rf"^module {re.escape(name)}\((.*?)\);", text, re.S | re.M)
        if m:
            # an escaped identifier (``\final `` : Amaranth escapes names that are Verilog keywords) is the
            # name without its backslash
            return [p.strip().removeprefix("\\").strip() for p in m.group(1).split(",") if p.strip()]
    raise HierarchyError(f"module {name} not found in its own conversion")


def _emit_memory_unless_zero(self, cell_idx, cell):
    if any(cell.init):
        return _ORIG_EMIT_MEMORY(self, cell_idx, cell)
    return None  # all zero: no $meminit_v2 (module docstring)


_ORIG_EMIT_MEMORY = None


class omit_zero_init:
    """Context: Amaranth's RTLIL (and so Verilog) backend leaves out all-zero memory inits."""

    def __enter__(self):
        global _ORIG_EMIT_MEMORY
        from amaranth.back import rtlil
        self._saved = rtlil.ModuleEmitter.emit_memory
        if _ORIG_EMIT_MEMORY is None:
            _ORIG_EMIT_MEMORY = self._saved
        rtlil.ModuleEmitter.emit_memory = _emit_memory_unless_zero
        return self

    def __exit__(self, *exc):
        from amaranth.back import rtlil
        rtlil.ModuleEmitter.emit_memory = self._saved
        return False


class Hierarchy:
    """While active (``with Hierarchy(classes) as h:``), every conversion of a design turns the
    instances of ``classes`` into instances of modules written once; ``h.verilog()`` is those modules'
    Verilog, to append to the converted top (module docstring)."""

    def __init__(self, classes, backend: str = "verilog"):
        if backend not in ("verilog", "rtlil"):
            raise ValueError(f"backend {backend!r}: verilog or rtlil")
        self.backend = backend
        self.classes = sorted(set(classes), key=lambda c: c.__name__)
        self.modules: dict[str, tuple] = {}   # module name -> (key, representative instance)
        self.texts: dict[str, str] = {}       # module name -> its Verilog
        self.extra: dict[str, list[str]] = {}  # module name -> its clk / rst ports
        self._saved: dict = {}
        self._real: dict = {}

    def _module_of(self, obj) -> str:
        from amaranth.back import rtlil, verilog
        listed = _component_ports(obj)
        key = (type(obj), tuple((n, len(v), i) for n, v, i in listed), _fingerprint(obj))
        base = f"bb_{getattr(obj, 'part_name', type(obj).__name__)}"
        bb, n = base, 0
        while bb in self.modules and self.modules[bb][0] != key:
            n += 1
            bb = f"{base}_{n}"
        if bb not in self.modules:
            self.modules[bb] = (key, obj)
            cls = type(obj)
            cls.elaborate = self._real[cls]  # the representative is converted with its own elaborate
            try:
                conv = verilog.convert if self.backend == "verilog" else rtlil.convert
                text = conv(obj, name=bb, emit_src=False)
            finally:
                cls.elaborate = self._hook
            sig = {p for p, _, _ in listed}
            others = [p for p in _module_ports(text, bb, self.backend) if p not in sig]
            bad = [p for p in others if p not in ("clk", "rst")]
            if bad:
                raise HierarchyError(f"{type(obj).__qualname__} ({bb}): ports {bad} are neither its signature "
                                     f"nor the sync domain's clk/rst; it cannot be a module of its own here")
            self.texts[bb], self.extra[bb] = text, others
        return bb

    def _instance(self, obj):
        from amaranth.hdl import ClockSignal, Instance, Module, ResetSignal
        silence(obj)
        bb = self._module_of(obj)
        kw = {("i_" if inp else "o_") + pname: v for pname, v, inp in _component_ports(obj)}
        if "clk" in self.extra[bb]:
            kw["i_clk"] = ClockSignal("sync")
        if "rst" in self.extra[bb]:
            kw["i_rst"] = ResetSignal("sync")
        m = Module()
        m.submodules.inst = Instance(bb, **kw)
        return m

    def __enter__(self):
        h = self
        self._zero = omit_zero_init().__enter__()

        def hook(obj, platform):
            return h._instance(obj)
        self._hook = hook
        for cls in self.classes:
            self._saved[cls] = cls.__dict__.get("elaborate")
            self._real[cls] = cls.elaborate
            cls.elaborate = hook
        return self

    def __exit__(self, *exc):
        for cls, fn in self._saved.items():
            if fn is None:
                del cls.elaborate
            else:
                cls.elaborate = fn
        self._zero.__exit__(*exc)
        return False

    def text(self) -> str:
        """The modules' text (Verilog or RTLIL, the backend's), one after the other."""
        return "".join(self.texts[bb] for bb in sorted(self.texts))


def hierarchical_verilog(design, name: str, ports: list, classes, backend: str = "verilog") -> str:
    """Verilog (or RTLIL) of ``design`` (top module ``name``, ``ports`` as for ``verilog.convert``) with
    every instance of ``classes`` a module written once (module docstring)."""
    from amaranth.back import rtlil, verilog
    with Hierarchy(classes, backend) as h:
        conv = verilog.convert if backend == "verilog" else rtlil.convert
        top = conv(design, name=name, ports=ports)
    return top + h.text()
