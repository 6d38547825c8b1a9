"""bitstream/depth.py: the logic-depth walk, on hand-written netlists with exactly known depth and on
real Yosys netlists of small designs whose depth is known by construction (one Yosys run, ~25 s)."""

import pytest
from amaranth.hdl import Module, Signal

from bitstream.depth import BUDGET, DepthError, check_budget, synthesize_netlist, walk


# --- hand-written netlists: the walk's rules, exactly ---------------------------------------------
def _cell(t, conns, params=None, dirs=None):
    c = {"type": t, "connections": conns, "parameters": params or {}}
    if dirs:
        c["port_directions"] = dirs
    return c


def _net(cells, ports=None):
    return {"modules": {"top": {"ports": ports or {}, "cells": cells}}}


def _ff(name, d, q):
    return {name: _cell("FDRE", {"C": [1], "CE": ["1"], "R": ["0"], "D": [d], "Q": [q]})}


def _lut(name, ins, out):
    return {name: _cell(f"LUT{len(ins)}", {**{f"I{i}": [b] for i, b in enumerate(ins)}, "O": [out]})}


def test_lut_chain_between_flops():
    # FF(10) -> LUT -> LUT -> CARRY4 -> LUT -> FF(20); a side path FF(11) -> LUT -> FF(21)
    cells = {**_ff("r0", 5, 10), **_ff("r1", 6, 11), **_lut("l0", [10], 12), **_lut("l1", [12, 11], 13),
             "c0": _cell("CARRY4", {"CI": ["0"], "CYINIT": ["0"], "DI": [13, "0", "0", "0"],
                                    "S": [13, "0", "0", "0"], "O": [14, 40, 41, 42], "CO": [43, 44, 45, 46]}),
             **_lut("l2", [14], 15), **_ff("r2", 15, 20), **_lut("l3", [11], 16), **_ff("r3", 16, 21)}
    r = walk(_net(cells), "top")
    assert r["max_levels"] == 3 and r["max_carry"] == 1
    assert r["levels_path"] == ["FDRE r0", "l0", "l1", "c0", "l2", "FDRE r2"]
    assert r["path"] == r["levels_path"] and r["path_carry"] == 1
    assert r["estimate_ns"] == pytest.approx(BUDGET.overhead_ns + 3 * BUDGET.lut_net_ns + BUDGET.carry_ns)
    assert r["unregistered"] == [] and not check_budget(r)


def test_ports_are_path_ends_and_starts():
    cells = {**_lut("l0", [2, 3], 4), **_lut("l1", [4], 5)}
    ports = {"a": {"direction": "input", "bits": [2, 3]}, "y": {"direction": "output", "bits": [5]}}
    r = walk(_net(cells, ports), "top")
    assert r["max_levels"] == 2 and r["levels_path"] == ["port a", "l0", "l1", "port y"]


def _dsp(name, a, b, p, **regs):
    dirs = {"A": "input", "B": "input", "CLK": "input", "P": "output"}
    params = {k: format(v, "032b") for k, v in regs.items()}
    return {name: _cell("DSP48E2", {"A": [a], "B": [b], "CLK": [1], "P": [p]}, params, dirs)}


def test_dsp_registers():
    full = {**_ff("ra", 2, 10), **_ff("rb", 3, 11), **_dsp("d", 10, 11, 12, AREG=1, BREG=1, MREG=1, PREG=1),
            **_lut("l", [12], 13), **_ff("rp", 13, 14)}
    r = walk(_net(full), "top")
    assert r["unregistered"] == [] and r["max_levels"] == 1 and r["path_dsp"] == 0
    assert r["path"][0] == "DSP48E2 d.P"
    # All registers off: the DSP is a combinational stage between the flops, and it is reported.
    bare = {**_ff("ra", 2, 10), **_ff("rb", 3, 11), **_dsp("d", 10, 11, 12, AREG=0, BREG=0, MREG=0, PREG=0),
            **_lut("l", [12], 13), **_ff("rp", 13, 14)}
    r = walk(_net(bare), "top")
    assert r["unregistered"] == [{"cell": "d", "type": "DSP48E2", "missing": ["AREG", "BREG", "MREG", "PREG"]}]
    assert r["path_dsp"] == 1 and r["path"] == ["FDRE ra", "d", "l", "FDRE rp"]
    assert any("DSP48E2 d has no" in p for p in check_budget(r))
    # Inputs registered, P not: P starts one DSP stage after the internal register.
    half = {**_dsp("d", 2, 3, 12, AREG=1, BREG=1, MREG=0, PREG=0), **_lut("l", [12], 13), **_ff("rp", 13, 14)}
    r = walk(_net(half), "top")
    assert r["unregistered"][0]["missing"] == ["MREG", "PREG"] and r["path_dsp"] == 1


def test_bram_output_register():
    def bram(reg):
        return {"m": _cell("RAMB36E2", {"CLKARDCLK": [1], "ADDRARDADDR": [2], "DOUTADOUT": [10]},
                           {"DOA_REG": format(reg, "032b"), "DOB_REG": format(0, "032b")},
                           {"CLKARDCLK": "input", "ADDRARDADDR": "input", "DOUTADOUT": "output"}),
                **_lut("l", [10], 11), **_ff("r", 11, 12), **_ff("ra", 13, 2)}
    r = walk(_net(bram(1)), "top")
    assert r["unregistered"] == [] and r["path"][0] == "RAMB36E2 m.DOUTADOUT"
    r0 = walk(_net(bram(0)), "top")
    assert r0["unregistered"] == [{"cell": "m", "type": "RAMB36E2", "missing": ["DOA_REG"]}]
    assert r0["estimate_ns"] == pytest.approx(r["estimate_ns"] + BUDGET.bram_co_ns)


def test_registers_in_fabric_next_to_a_dsp_or_bram():
    """Flip-flops straight on a bare DSP48E2's inputs and straight after its P (or after a RAM's data
    out): registered in fabric (``fabric_registered``, no budget problem), still timed as a DSP stage
    or the RAM's clock-to-out. One LUT in between on either side and the cell is unregistered."""
    bare = {**_ff("ra", 2, 10), **_ff("rb", 3, 11), **_dsp("d", 10, 11, 12, AREG=0, BREG=0, MREG=0, PREG=0),
            **_ff("rp", 12, 14)}
    r = walk(_net(bare), "top")
    assert r["unregistered"] == [] and [u["cell"] for u in r["fabric_registered"]] == ["d"]
    assert r["path_dsp"] == 1 and r["path"] == ["FDRE ra", "d", "FDRE rp"] and check_budget(r) == []
    logic_after = {**bare, **_ff("rp", 13, 14), **_lut("l", [12], 13)}
    r = walk(_net(logic_after), "top")
    assert [u["cell"] for u in r["unregistered"]] == ["d"] and r["fabric_registered"] == []
    logic_before = {**bare, **_lut("l", [9], 10), **_ff("ra", 2, 9)}
    r = walk(_net(logic_before), "top")
    assert [u["cell"] for u in r["unregistered"]] == ["d"]
    ram = {"m": _cell("RAMB36E2", {"CLKARDCLK": [1], "ADDRARDADDR": [2], "DOUTADOUT": [10]},
                      {"DOA_REG": format(0, "032b"), "DOB_REG": format(0, "032b")},
                      {"CLKARDCLK": "input", "ADDRARDADDR": "input", "DOUTADOUT": "output"}),
           **_ff("r", 10, 12), **_ff("ra", 13, 2)}
    r = walk(_net(ram), "top")
    assert r["unregistered"] == [] and [u["cell"] for u in r["fabric_registered"]] == ["m"]
    assert r["estimate_ns"] == pytest.approx(BUDGET.overhead_ns + BUDGET.bram_co_ns)
    r = walk(_net({**ram, **_lut("l", [10], 11), **_ff("r", 11, 12)}), "top")
    assert [u["cell"] for u in r["unregistered"]] == ["m"]


def test_bad_netlists_are_named():
    with pytest.raises(DepthError, match="cell types the depth walk does not know: MYSTERY"):
        walk(_net({"x": _cell("MYSTERY", {"I": [2], "O": [3]}, dirs={"I": "input", "O": "output"})}), "top")
    loop = {**_lut("a", [3], 2), **_lut("b", [2], 3), **_ff("r", 3, 4)}
    with pytest.raises(DepthError, match="combinational loop"):
        walk(_net(loop), "top")
    with pytest.raises(DepthError, match="module 'nope' not in the netlist"):
        walk(_net({}), "nope")


# --- real Yosys netlists ---------------------------------------------------------------------------
def _add_xor_chain(n: int, w: int, registered: bool):
    """n - 1 stages of ``acc = (acc + x_i) ^ y_i`` between registered inputs and a registered output.
    Each stage is one LUT (the xor folded into the next adder's propagate LUT) and one carry chain;
    the carry chain is a box to the LUT mapper, so the stages cannot be merged: n - 1 stage LUTs
    plus the last xor, n LUT levels, when ``registered`` is False. With every stage registered a
    path is the propagate LUT, the carry chain and the xor LUT in front of the flip-flop: 2."""
    m = Module()
    xs = [Signal(w, name=f"x{i}") for i in range(n)]
    ys = [Signal(w, name=f"y{i}") for i in range(n)]
    regs = [Signal(w, name=f"r{i}") for i in range(2 * n)]
    m.d.sync += [r.eq(v) for r, v in zip(regs, xs + ys)]
    acc = regs[0]
    for i in range(1, n):
        nxt = Signal(w, name=f"s{i}")
        (m.d.sync if registered else m.d.comb).__iadd__(nxt.eq((acc + regs[i])[:w] ^ regs[n + i]))
        acc = nxt
    o = Signal(w, name="o")
    m.d.sync += o.eq(acc)
    return m, xs + ys + [o]


def _adder_tree(n: int, w: int):
    """A registered adder tree: every sum is a flip-flop, so each path is one LUT and one carry chain."""
    m = Module()
    level = [Signal(w, name=f"x{i}") for i in range(n)]
    ports = list(level)
    k = 0
    while len(level) > 1:
        nxt = []
        for i in range(0, len(level), 2):
            s = Signal(len(level[i]) + 1, name=f"t{k}_{i}")
            m.d.sync += s.eq(level[i] + level[i + 1])
            nxt.append(s)
        level, k = nxt, k + 1
    return m, ports + level


@pytest.fixture(scope="module")
def netlist():
    top = Module()
    ports = []
    designs = {"tree": _adder_tree(8, 8), "chain6": _add_xor_chain(6, 8, False),
               "chain12": _add_xor_chain(12, 8, False), "chain12r": _add_xor_chain(12, 8, True)}
    for name, (m, p) in designs.items():
        top.submodules[name] = m
        for s in p:
            s.name = f"{name}_{s.name}"
        ports += p
    net, info = synthesize_netlist(top, ports=ports, flatten=False, cache=False)
    return net


def test_registered_adder_tree(netlist):
    r = walk(netlist, "top.tree")
    # 8-bit inputs: the widest sum (10 bits) is 3 CARRY4 cells; one LUT per path.
    assert r["max_levels"] == 1 and r["max_carry"] == 3, r
    assert r["path"][0].startswith("FDRE") and r["path"][-1].startswith("FDRE")
    assert r["flip_flops"] == 4 * 9 + 2 * 10 + 11 and not check_budget(r)


def test_known_chain_depth(netlist):
    assert walk(netlist, "top.chain6")["max_levels"] == 6
    r = walk(netlist, "top.chain12r")
    assert r["max_levels"] == 2 and r["max_carry"] == 2, r


def test_budget_flags_the_deep_path(netlist):
    ok = walk(netlist, "top.chain6")
    deep = walk(netlist, "top.chain12")
    assert deep["max_levels"] == 12 > BUDGET.max_levels
    assert not check_budget(ok)
    problems = check_budget(deep)
    assert problems and "12 LUT levels" in problems[0] and "budget 8" in problems[0], problems


def test_cli_walks_a_netlist_and_refuses_bad_input(tmp_path, capsys):
    import json
    from bitstream.depth import main
    good = tmp_path / "n.json"
    good.write_text(json.dumps(_net({**_ff("r0", 5, 10), **_lut("l0", [10], 11), **_ff("r1", 11, 12)})))
    assert main([str(good)]) == 0
    assert json.loads(capsys.readouterr().out)["max_levels"] == 1
    assert main([str(tmp_path / "missing.json")]) == 2
    assert "no netlist at" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    assert main([str(bad)]) == 2
    assert "is not JSON" in capsys.readouterr().err
    deep = tmp_path / "deep.json"
    chain = {**_ff("r0", 5, 100)}
    for i in range(10):
        chain.update(_lut(f"l{i}", [100 + i], 101 + i))
    chain.update(_ff("r1", 110, 200))
    deep.write_text(json.dumps(_net(chain)))
    assert main([str(deep)]) == 1
    assert "over budget: 10 LUT levels" in capsys.readouterr().err
