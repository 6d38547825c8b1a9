# amaranth: UnusedElaboratable=no
"""bitstream.hier: the engine's repeated rows written as modules once (what makes the u280 plans
convertible) give the same design as the flat conversion. At ci-small both are converted to RTLIL,
flattened by Yosys, checked (``check -assert``: no undriven or multiply driven net), cleaned
(``setundef -undriven -zero; opt -purge``) and their cell and memory statistics compared; the differences allowed are the instances' port wires, which flattening keeps as public
wires, and the all-zero memory inits the hierarchical text leaves out (``omit_zero_init``). Planted bugs seen failing it: the rows' reset left unconnected, and a row's output port left
off the instance."""

import re
import subprocess

import pytest

from bitstream.hier import Hierarchy, HierarchyError, hierarchical_verilog, repeated_engine_classes
from bitstream.yosys import find_yosys


def _stats(il: str, tmp_path, name: str) -> dict[str, int]:
    (tmp_path / f"{name}.il").write_text(il)
    r = subprocess.run([find_yosys(), "-q", "-p", f"read_rtlil {name}.il; hierarchy -top top; proc; flatten; "
                        f"check -assert; setundef -undriven -zero; opt -purge; tee -q -o {name}.stat stat"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stderr[-2000:]
    text = (tmp_path / f"{name}.stat").read_text()
    out = {k: int(v) for v, k in re.findall(r"^\s+(\d+)\s+(\$\w+|cells|memories|memory bits|ports|port bits)$",
                                             text, re.M)}
    assert out.get("cells", 0) > 1000, text[:2000]
    return out


@pytest.fixture(scope="module")
def ci_small():
    from accllm.config import load_hw
    return load_hw("ci-small")


def _kernel(cfg):
    from bitstream.kernel import AcceleratorKernel
    return AcceleratorKernel(cfg.engine, cfg.accelerator)


def test_repeated_classes_and_modules(ci_small):
    names = sorted(c.__name__ for c in repeated_engine_classes(ci_small.engine))
    assert names == ["AccRow", "ArrayRow", "GroupRow", "Requantizer"]
    k = _kernel(ci_small)
    v = hierarchical_verilog(k, "accllm_kernel", k.ports, repeated_engine_classes(ci_small.engine))
    mods = re.findall(r"^module (bb_\w+)\(", v, re.M)
    assert sorted(mods) == [f"bb_{n}" for n in names]  # each written once
    rows = ci_small.engine.pe_rows
    for n in names:
        insts = re.findall(rf"^\s*bb_{n} inst \((.*?)\);", v, re.M | re.S)
        assert len(insts) == rows, n  # one instance per row
        header = re.search(rf"^module bb_{n}\((.*?)\);", v, re.M | re.S).group(1)
        for clk in {"clk", "rst"} & {p.strip() for p in header.split(",")}:
            assert all(f".{clk}(" in i for i in insts), (n, clk)  # the sync domain reaches every row


@pytest.mark.heavy
def test_hierarchical_equals_flat(ci_small, tmp_path):
    from amaranth.back import rtlil
    k = _kernel(ci_small)
    flat = rtlil.convert(k, name="top", ports=k.ports, emit_src=False)
    k = _kernel(ci_small)
    hier = hierarchical_verilog(k, "top", k.ports, repeated_engine_classes(ci_small.engine), backend="rtlil")
    a, b = _stats(flat, tmp_path, "flat"), _stats(hier, tmp_path, "hier")
    # the hierarchical text leaves out all-zero memory inits (omit_zero_init): fewer $meminit_v2 cells,
    # everything else the same
    ma, mb = a.pop("$meminit_v2", 0), b.pop("$meminit_v2", 0)
    assert mb < ma and a.pop("cells") - ma == b.pop("cells") - mb
    assert a == b


def test_zero_inits_left_out_others_kept():
    """Under omit_zero_init an all-zero memory is written without an initial block, a memory with
    contents (the units' tables) keeps all of it."""
    from amaranth.back import verilog
    from amaranth.hdl import Elaboratable, Module
    from amaranth.lib.memory import Memory

    from bitstream.hier import omit_zero_init

    class Two(Elaboratable):
        def __init__(self):
            self.zero = Memory(shape=8, depth=64, init=[])
            self.table = Memory(shape=8, depth=64, init=[(3 * i + 1) % 256 for i in range(64)])
            self.ports = []
            for mem in (self.zero, self.table):
                r = mem.read_port()
                self.ports += [r.addr, r.data, r.en]
            w = self.zero.write_port()
            self.ports += [w.addr, w.data, w.en]

        def elaborate(self, platform):
            m = Module()
            m.submodules.zero, m.submodules.rom = self.zero, self.table
            return m

    with omit_zero_init():
        d = Two()
        v = verilog.convert(d, name="two", ports=d.ports)
    inits = re.findall(r"^\s*(\S+)\[(\d+)\] = 8'h([0-9a-f]+);", v, re.M)
    assert {n for n, _, _ in inits} == {"rom"}, sorted({n for n, _, _ in inits})
    assert [int(x, 16) for _, _, x in inits] == [(3 * i + 1) % 256 for i in range(64)]
    d = Two()  # outside the context: Amaranth's own behaviour, both written
    assert {n for n, _, _ in re.findall(r"^\s*(\S+)\[(\d+)\] = 8'h([0-9a-f]+);",
                                        verilog.convert(d, name="two", ports=d.ports), re.M)} == {"zero", "rom"}


def test_other_clock_domain_refused():
    from amaranth.hdl import Module
    from amaranth.lib import wiring
    from amaranth.lib.wiring import In, Out

    class Odd(wiring.Component):
        i: In(1)
        o: Out(1)

        def elaborate(self, platform):
            m = Module()
            m.d.fast += self.o.eq(self.i)
            return m

    class Top(wiring.Component):
        i: In(1)
        o: Out(1)

        def elaborate(self, platform):
            m = Module()
            m.submodules.a = a = Odd()
            m.d.comb += [a.i.eq(self.i), self.o.eq(a.o)]
            return m

    from amaranth.back import verilog
    with pytest.raises(HierarchyError, match=r"Odd \(bb_Odd\): ports \['fast_clk', 'fast_rst'\]"):
        with Hierarchy({Odd}):
            verilog.convert(Top(), name="top")
