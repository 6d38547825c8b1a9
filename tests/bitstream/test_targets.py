# amaranth: UnusedElaboratable=no
"""The generated U280 build plans, checked as text (Vivado and v++ are not installed here): structure,
part, ports, constraints and connectivity of both targets for ci-small; the build folder's cache and
atomicity; the clear errors of `accllm build`. No Yosys synthesis here (test_utilization.py has that)."""

import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from bitstream import build as B
from bitstream import vitis as VT
from bitstream import vivado as VV
from bitstream.kernel import AcceleratorKernel
from bitstream.platform import PART, U280Platform
from hw.params import EngineParams, TargetParams

CI_SMALL = EngineParams()  # the defaults are configs/hw/ci-small.yaml (tests/accllm checks the YAML)
AXI4 = ("awvalid", "awready", "awaddr", "awlen", "awsize", "awburst", "wvalid", "wready", "wdata", "wstrb",
        "wlast", "bvalid", "bready", "bresp", "arvalid", "arready", "araddr", "arlen", "arsize", "arburst",
        "rvalid", "rready", "rdata", "rresp", "rlast")
LITE = ("awvalid", "awready", "awaddr", "wvalid", "wready", "wdata", "wstrb", "bvalid", "bready", "bresp",
        "arvalid", "arready", "araddr", "rvalid", "rready", "rdata", "rresp")


def module_ports(verilog: str, name: str) -> dict[str, tuple[str, int]]:
    """Port -> (direction, width) of module ``name`` in Amaranth/Yosys Verilog."""
    m = re.search(rf"^module {re.escape(name)}\(.*?\);\n(.*?)^endmodule", verilog, re.S | re.M)
    assert m, f"module {name} not found"
    out = {}
    for d, lo_hi, port in re.findall(r"^\s*(input|output|inout)\s+(?:\[(\d+):0\]\s+)?(\S+?);", m.group(1), re.M):
        out[port] = (d, int(lo_hi) + 1 if lo_hi else 1)
    return out


def instance_conns(verilog: str, cell: str) -> dict[str, str]:
    """Port -> connected expression of the instance of ``cell`` (the first one)."""
    m = re.search(rf"^\s*{re.escape(cell)} (?:#\(.*?\)\s*)?\S+ \((.*?)\);", verilog, re.S | re.M)
    assert m, f"no instance of {cell}"
    return dict(re.findall(r"\.(\w+)\((.*?)\),?\n", m.group(1) + "\n"))


def top_module(verilog: str, name: str) -> str:
    m = re.search(rf"^module {re.escape(name)}\(.*?\);\n(.*?)^endmodule", verilog, re.S | re.M)
    assert m, f"module {name} not found"
    return m.group(1)


def net_widths(body: str) -> dict[str, int]:
    """Net -> width of the wires, regs and ports declared in a module body."""
    return {n: int(hi) + 1 if hi else 1 for hi, n in
            re.findall(r"^\s*(?:wire|reg|input|output)\s+(?:\[(\d+):0\]\s+)?([\w$]+)\s*(?:=.*)?;", body, re.M)}


def instances(body: str, cells) -> dict[str, tuple[str, dict[str, str]]]:
    """Instance name -> (cell, port -> connected expression) of every instance of ``cells``."""
    out = {}
    for cell in cells:
        for name, conns in re.findall(rf"^\s*{re.escape(cell)} (?:#\(.*?\)\s*)?(\S+) \((.*?)\);", body, re.S | re.M):
            out[name] = (cell, dict(re.findall(r"\.(\w+)\((.*?)\),?\n", conns + "\n")))
    return out


def ip_configs(tcl: str) -> dict[str, dict]:
    """``create_ip -name IP ... -module_name M`` + ``set_property -dict [list CONFIG.K {V} ...] [get_ips M]``
    -> {M: {"ip": IP, "config": {K: V}}}."""
    out = {mod: {"ip": ip, "config": {}} for ip, mod in
           re.findall(r"^create_ip -name (\S+) .*?-module_name (\S+)", tcl, re.M)}
    for body, mod in re.findall(r"set_property -dict \[list (.*?)\]\s*\\?\s*\[get_ips (\S+)\]", tcl, re.S):
        out[mod]["config"].update(re.findall(r"CONFIG\.(\w+) \{([^}]*)\}", body))
    return out


#: the HBM IP's AXI3 port fields (PG276 port list, AXI_<nn>_<FIELD>), written out here rather than taken
#: from bitstream.vivado so a field the generator leaves off is seen
PG276_FIELDS = ("araddr", "arburst", "arid", "arlen", "arsize", "arvalid", "arready", "awaddr", "awburst", "awid",
                "awlen", "awsize", "awvalid", "awready", "wdata", "wstrb", "wlast", "wvalid", "wready", "bid",
                "bresp", "bvalid", "bready", "rdata", "rid", "rlast", "rresp", "rvalid", "rready")
CONST = re.compile(r"^\d+'[hbd][0-9a-fA-F_]+$")


def expr_width(expr: str | None, widths: dict[str, int]) -> int | None:
    """Bits of a port connection as Yosys writes it: ``net``, ``net[hi:lo]``, ``net[i]``, ``N'h..``."""
    if expr is None:
        return None
    if CONST.match(expr):
        return int(expr.split("'")[0])
    m = re.fullmatch(r"(\\?\S+?) ?\[(\d+)(?::(\d+))?\]", expr)
    if m:
        return int(m.group(2)) - int(m.group(3) if m.group(3) else m.group(2)) + 1
    return widths.get(expr)


def vivado_problems(f: dict[str, str], accel) -> list[str]:
    """Everything wrong with the ``vivado`` plan's memory path, as text: each accelerator master
    traced net by net from the kernel's port through the converter IP to one HBM port, every hop's
    fields connected one to one with the widths and protocols the IP is configured for, the HBM port
    the one of the master's pseudo-channel, the clocks and resets shared, the address map and the
    pointers run_hw.tcl writes covering each channel."""
    from bitstream.kernel import hbm_channels
    from hw.axi import port_names
    probs = []
    body = top_module(f[f"{VV.TOP_NAME}.v"], VV.TOP_NAME)
    widths = net_widths(body)
    ips = ip_configs(f["ip.tcl"])
    conv = {mod: c for mod, c in ips.items() if c["ip"] in ("axi_dwidth_converter", "axi_protocol_converter",
                                                            "axi_register_slice")}
    insts = instances(body, list(conv))
    hbm = instance_conns(body, "hbm_0")
    bufgs = instances(body, ["BUFG"])
    sync_clk = bufgs["bufg_sync"][1]["O"] if "bufg_sync" in bufgs else None
    hbm_port_of = {}  # HBM port -> ARADDR net
    for key, net in hbm.items():
        m = re.fullmatch(r"AXI_(\d\d)_ARADDR", key)
        if m:
            hbm_port_of[int(m.group(1))] = net
    amap = json.loads(f["memory.json"])["address_map"]
    saxi_on = {int(i) for i, v in re.findall(r"CONFIG\.USER_SAXI_(\d\d) \{(\w+)\}", f["ip.tcl"]) if v == "true"}
    chans = hbm_channels(accel)
    used = set()
    for n in port_names(accel):
        # the first hop: the instance whose slave address is the kernel's port
        net, proto, dw, where = f"m_axi_{n}_araddr[32:0]", "AXI4", accel.mem_word_bits, f"m_axi_{n}"
        prev_m = None
        split = accel.axi_max_burst <= VV.HBM_MAX_BURST
        seen, resets = 0, set()
        while True:
            nxt = [(i, c, cn) for i, (c, cn) in insts.items() if cn.get("s_axi_araddr") == net]
            if not nxt:
                break
            if len(nxt) > 1:
                probs.append(f"{where}: {net} drives {len(nxt)} converters")
            inst, cell, cn = nxt[0]
            seen += 1
            cfg = conv[cell]["config"]
            ip = conv[cell]["ip"]
            if prev_m is not None:
                for fld, ex in prev_m.items():
                    if cn.get(f"s_axi_{fld}") != ex:
                        probs.append(f"{where} -> {inst}: m_axi_{fld} = {ex} but s_axi_{fld} = {cn.get(f's_axi_{fld}')}")
                for k, ex in cn.items():
                    if k.startswith("s_axi_") and k[6:] not in prev_m and not CONST.match(ex) and \
                            k[6:] not in VV.FROM_SLAVE:
                        probs.append(f"{inst}: {k} = {ex}, driven by nothing upstream")
            clk = cn.get("aclk", cn.get("s_axi_aclk"))
            if clk != sync_clk:
                probs.append(f"{inst}: clock {clk}, not the accelerator's {sync_clk}")
            resets.add(cn.get("aresetn", cn.get("s_axi_aresetn")))
            s_w, m_w = expr_width(cn.get("s_axi_wdata"), widths), expr_width(cn.get("m_axi_wdata"), widths)
            if s_w != dw:
                probs.append(f"{inst}: slave data {s_w} bits, its master ({where}) has {dw}")
            if ip == "axi_dwidth_converter":
                if cfg.get("PROTOCOL") != proto:
                    probs.append(f"{inst}: PROTOCOL {cfg.get('PROTOCOL')} on a {proto} link")
                if int(cfg["SI_DATA_WIDTH"]) != s_w or int(cfg["MI_DATA_WIDTH"]) != m_w:
                    probs.append(f"{inst}: configured {cfg['SI_DATA_WIDTH']} -> {cfg['MI_DATA_WIDTH']}, wired {s_w} -> {m_w}")
                if int(cfg.get("MAX_SPLIT_BEATS", 256)) <= VV.HBM_MAX_BURST:
                    split = True
            elif ip == "axi_protocol_converter":
                if cfg["SI_PROTOCOL"] != proto:
                    probs.append(f"{inst}: SI_PROTOCOL {cfg['SI_PROTOCOL']} on a {proto} link")
                if int(cfg["DATA_WIDTH"]) != s_w or s_w != m_w:
                    probs.append(f"{inst}: DATA_WIDTH {cfg['DATA_WIDTH']}, wired {s_w} -> {m_w}")
                proto = cfg["MI_PROTOCOL"]
                if proto == "AXI3" and int(cfg["TRANSLATION_MODE"]) == 2:
                    split = True
            else:
                if cfg["PROTOCOL"] != proto or int(cfg["DATA_WIDTH"]) != s_w or s_w != m_w:
                    probs.append(f"{inst}: {cfg['PROTOCOL']} {cfg['DATA_WIDTH']} bits on a {proto} {s_w}-bit link")
            alen = expr_width(cn.get("m_axi_arlen"), widths)
            if alen != (8 if proto == "AXI4" else 4):
                probs.append(f"{inst}: m_axi_arlen {alen} bits on {proto}")
            prev_m = {k[6:]: ex for k, ex in cn.items() if k.startswith("m_axi_")}
            net, dw, where = cn.get("m_axi_araddr"), m_w, inst
        if not seen:
            probs.append(f"m_axi_{n}: connected to no converter")
            continue
        ports = [p for p, a in hbm_port_of.items() if a == net]
        if len(ports) != 1:
            probs.append(f"m_axi_{n}: its last converter ({where}) reaches {len(ports)} HBM ports")
            continue
        port = ports[0]
        used.add(port)
        pre = f"AXI_{port:02d}_"
        if proto != "AXI3" or dw != VV.HBM_DATA_BITS:
            probs.append(f"m_axi_{n}: arrives at {pre} as {proto} {dw} bits, the HBM port is AXI3 256 bits")
        if not split:
            probs.append(f"m_axi_{n}: bursts up to {accel.axi_max_burst} beats are never split to 16")
        for fld in PG276_FIELDS:
            ex = prev_m.get(fld)
            got = hbm.get(pre + fld.upper())
            if fld in ("arid", "awid"):
                ok = got is not None and got.replace(" ", "").endswith(f",{ex}}}")
            elif fld in ("bid", "rid"):
                ok = got is not None
            else:
                ok = got == ex
            if not ok:
                probs.append(f"{where} -> hbm {pre}{fld.upper()}: {ex} vs {got}")
        if resets != {hbm.get(pre + "ARESET_N")}:
            probs.append(f"m_axi_{n}: converter resets {sorted(map(str, resets))}, the HBM port's {hbm.get(pre + 'ARESET_N')}")
        if hbm.get(pre + "ACLK") != sync_clk:
            probs.append(f"{pre}ACLK = {hbm.get(pre + 'ACLK')}, not the accelerator's clock {sync_clk}")
        # the port and the address map: mem<p> on its own pseudo-channel's port, pointed there
        a = amap.get(n, {})
        if a.get("saxi") != port:
            probs.append(f"m_axi_{n}: wired to SAXI_{port:02d}, address map says {a.get('saxi')}")
        pcs = chans[n]
        if n != "aux" and port != pcs[0]:
            probs.append(f"m_axi_{n}: on SAXI_{port:02d}, its channel is pseudo-channel {pcs[0]}")
        want = [[q * VV.HBM_PC_BYTES, q * VV.HBM_PC_BYTES + accel.mem_channel_bytes] for q in pcs]
        if a.get("windows") != want:
            probs.append(f"m_axi_{n}: windows {a.get('windows')}, want {want}")
        # mem<p>_ptr: its pseudo-channel's base; aux_ptr 0 (aux through the channel pointers)
        base = 0 if n == "aux" else pcs[0] * VV.HBM_PC_BYTES
        off = json.loads(f["memory.json"])["args"][f"{n}_ptr"]["offset"]
        lo = re.search(rf"^wr {n}_ptr_lo ([0-9a-f]+) ([0-9a-f]+)$", f["run_hw.tcl"], re.M)
        hi = re.search(rf"^wr {n}_ptr_hi ([0-9a-f]+) ([0-9a-f]+)$", f["run_hw.tcl"], re.M)
        if not (lo and hi and int(lo.group(1), 16) == off and int(hi.group(1), 16) == off + 4
                and int(lo.group(2), 16) | int(hi.group(2), 16) << 32 == base == a.get("ptr")):
            probs.append(f"run_hw.tcl: {n}_ptr not written with {base:#x} at {off:#x}")
    if used != saxi_on:
        probs.append(f"HBM ports wired {sorted(used)}, enabled in ip.tcl {sorted(saxi_on)}")
    if "CONFIG.USER_SWITCH_ENABLE_00 {TRUE}" not in f["ip.tcl"] or "CONFIG.USER_SWITCH_ENABLE_01 {TRUE}" not in f["ip.tcl"]:
        probs.append("the HBM switch is off: aux cannot reach every channel")
    return probs


@pytest.fixture(scope="module")
def two_port_accel():
    """The ci-small accelerator with two striped ports and 512-bit words (configs/hw/ci-small.yaml has
    one port of 256 bits), so the per-channel pointers, the HBM map and the width converters are seen
    with more than one channel; both targets are generated from it."""
    import dataclasses

    from accllm.config import load_hw
    cfg = load_hw("ci-small")
    return cfg.engine, dataclasses.replace(cfg.accelerator, mem_ports=2, mem_word_bits=512)


@pytest.fixture(scope="module")
def vivado_plan(two_port_accel):
    engine, accel = two_port_accel
    return VV.files(engine, TargetParams(), accel)


@pytest.fixture(scope="module")
def vivado_files(vivado_plan):
    return vivado_plan[0]


@pytest.fixture(scope="module")
def vitis_kernel(two_port_accel):
    engine, accel = two_port_accel
    return VT.files(engine, TargetParams(), accel)


@pytest.fixture(scope="module")
def vitis_files(vitis_kernel):
    return vitis_kernel[0]


# ---------------------------------------------------------------------------------------------------
def test_platform_part_and_pins():
    plat = U280Platform()
    assert plat._part == PART == "xcu280-fsvh2892-2L-e" and plat.family == "ultrascaleplus"
    res = {(r.name, r.number): r for r in plat.resources.values()}
    assert set(res) == {("sysclk", 0), ("sysclk", 1), ("sysclk", 3), ("cpu_reset", 0), ("hbm_cattrip", 0)}


def test_vivado_project_structure(vivado_files):
    f = vivado_files
    name = VV.TOP_NAME
    assert {f"{name}.tcl", f"{name}.xdc", f"{name}.v", f"build_{name}.sh", "ip.tcl"} <= set(f)
    tcl = f[f"{name}.tcl"]
    assert f"create_project -force -name {name} -part {PART}" in tcl
    # the IP is created after the sources are read and before synthesis, and the bitstream is written
    i_read, i_ip, i_synth = tcl.index("read_xdc"), tcl.index("source {ip.tcl}"), tcl.index("synth_design")
    assert i_read < i_ip < i_synth and f"synth_design -top {name}" in tcl
    assert "write_bitstream" in tcl and "route_design" in tcl
    assert f"-source {name}.tcl" in f[f"build_{name}.sh"]


def test_vivado_constraints(vivado_files):
    xdc = vivado_files[f"{VV.TOP_NAME}.xdc"]

    def props(port):
        return dict(re.findall(rf'set_property (\S+) "?([^"\s]+)"? \[get_ports "{re.escape(port)}"\]', xdc))
    # [XDC] AU280 master XDC rev 2.04: SYSCLK0 BJ43/BJ44 LVDS (+ DQS_BIAS), CPU_RESET_FPGA L30,
    # HBM_CATTRIP D32 LVCMOS18 pulled down
    assert props("sysclk_0__p") == {"LOC": "BJ43", "IOSTANDARD": "LVDS", "DQS_BIAS": "TRUE"}
    assert props("sysclk_0__n")["LOC"] == "BJ44" and props("sysclk_0__n")["IOSTANDARD"] == "LVDS"
    assert props("cpu_reset_0__io") == {"LOC": "L30", "IOSTANDARD": "LVCMOS18"}
    assert props("hbm_cattrip_0__io") == {"LOC": "D32", "IOSTANDARD": "LVCMOS18", "PULLDOWN": "TRUE"}
    assert re.search(r"create_clock -name sysclk_0__p -period 10\.0 ", xdc)
    assert "set_property CONFIG_MODE SPIx4 [current_design]" in xdc
    assert "set_property BITSTREAM.CONFIG.SPI_BUSWIDTH 4 [current_design]" in xdc


def test_vivado_top_and_connectivity(vivado_plan, two_port_accel):
    f, top = vivado_plan
    accel = two_port_accel[1]
    v = f[f"{VV.TOP_NAME}.v"]
    ports = module_ports(v, VV.TOP_NAME)
    assert ports == {"sysclk_0__p": ("input", 1), "sysclk_0__n": ("input", 1),
                     "cpu_reset_0__io": ("input", 1), "hbm_cattrip_0__io": ("output", 1)}
    assert re.search(r"^\s*IBUFDS ", v, re.M) and re.search(r"^\s*BUFG ", v, re.M)
    mmcm = re.search(r"MMCME4_BASE #\((.*?)\) mmcm", v, re.S).group(1)
    assert ".CLKFBOUT_MULT_F(9.0)" in mmcm and ".CLKOUT0_DIVIDE_F(4.0)" in mmcm
    assert ".DIVCLK_DIVIDE(32'd1)" in mmcm and ".CLKIN1_PERIOD(10.0)" in mmcm
    # the same top as the vitis target: the whole accelerator, with its masters mem0, mem1, aux
    assert isinstance(top.kernel, AcceleratorKernel) and top.kernel.port_names == ["mem0", "mem1", "aux"]
    for mod in ("engine", "ctrl", "unit_rmsnorm", "memsys"):
        assert re.search(rf"^module \\{VV.TOP_NAME}\.kernel\.accel\.\S*\b{mod}\s", v, re.M), mod
    assert vivado_problems(f, accel) == []
    body = top_module(v, VV.TOP_NAME)
    # one chain of three IP per master (512 -> 256 bits, AXI4 -> AXI3, a register slice)
    assert sorted(instances(body, list(VV.IP_MODULES.values()))) == sorted(
        f"{s}_{n}" for s in ("dw", "pc", "rs") for n in top.kernel.port_names)
    hbm = instance_conns(body, "hbm_0")
    assert not any(k.startswith("AXI_03_") for k in hbm)
    assert {"HBM_REF_CLK_0", "HBM_REF_CLK_1", "DRAM_0_STAT_CATTRIP", "DRAM_1_STAT_CATTRIP",
            "apb_complete_0", "apb_complete_1"} <= set(hbm)
    jt = instance_conns(v, "jtag_axi_0")
    for sig in LITE:
        # the control slave takes address and data together: awready and wready are one net, which
        # Yosys names after either
        same = {"s_axi_control_awready", "s_axi_control_wready"} if sig in ("awready", "wready") else \
            {f"s_axi_control_{sig}"}
        if sig in ("bresp", "rresp"):
            same.add("2'h0")  # always OKAY: a constant
        assert jt[f"m_axi_{sig}"] in same, sig


def _without_instance(v: str, name: str) -> str:
    out, n = re.subn(rf"^\s*\S+ (?:#\(.*?\)\s*)?{re.escape(name)} \(.*?\);\n", "", v, count=1, flags=re.S | re.M)
    assert n == 1, name
    return out


PLANTED = {
    # a master left unconnected: mem1's protocol converter missing, its width converter leads nowhere
    "unconnected": lambda f: {f"{VV.TOP_NAME}.v": _without_instance(f[f"{VV.TOP_NAME}.v"], "pc_mem1")},
    # a width mismatch: the width converter configured for 128-bit HBM ports
    "width": lambda f: {"ip.tcl": f["ip.tcl"].replace("CONFIG.MI_DATA_WIDTH {256}", "CONFIG.MI_DATA_WIDTH {128}")},
    # a wrong pseudo-channel: mem0 and mem1 on each other's HBM ports
    "pseudo_channel": lambda f: {f"{VV.TOP_NAME}.v": f[f"{VV.TOP_NAME}.v"].replace(".AXI_00_", ".AXI_XX_")
                                 .replace(".AXI_01_", ".AXI_00_").replace(".AXI_XX_", ".AXI_01_")},
    # the AXI3 side left at AXI4 (no protocol conversion, no burst split)
    "protocol": lambda f: {"ip.tcl": f["ip.tcl"].replace("CONFIG.MI_PROTOCOL {AXI3}", "CONFIG.MI_PROTOCOL {AXI4}")},
    # a pointer run_hw.tcl writes off its channel
    "pointer": lambda f: {"run_hw.tcl": re.sub(r"^(wr mem1_ptr_lo \S+) 10000000$", r"\1 00000000", f["run_hw.tcl"],
                                               flags=re.M)},
}


@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_vivado_checker_catches_planted_bugs(vivado_files, two_port_accel, bug):
    """Each bug the connectivity check is for, planted in the generated text, is reported."""
    planted = {**vivado_files, **PLANTED[bug](vivado_files)}
    assert planted != vivado_files, "the planted edit matched nothing"
    assert vivado_problems(planted, two_port_accel[1]), bug


def test_vivado_ip_tcl(vivado_files, two_port_accel):
    ip = vivado_files["ip.tcl"]
    assert "create_ip -name hbm -vendor xilinx.com -library ip -version 1.0 -module_name hbm_0" in ip
    saxi = dict(re.findall(r"CONFIG\.USER_SAXI_(\d\d) \{(\w+)\}", ip))
    assert len(saxi) == 32 and [k for k, v in saxi.items() if v == "true"] == ["00", "01", "02"]
    assert "CONFIG.USER_AXI_CLK_FREQ {225}" in ip and "CONFIG.USER_HBM_REF_CLK_0 {100}" in ip
    assert "CONFIG.USER_HBM_DENSITY {8GB}" in ip and "CONFIG.USER_HBM_STACK {2}" in ip
    assert "create_ip -name jtag_axi" in ip and "CONFIG.PROTOCOL {2}" in ip
    cfg = ip_configs(ip)
    assert cfg[VV.IP_MODULES["dwidth"]]["config"] == {
        "PROTOCOL": "AXI4", "SI_DATA_WIDTH": "512", "MI_DATA_WIDTH": "256", "ADDR_WIDTH": "33", "SI_ID_WIDTH": "1",
        "FIFO_MODE": "0", "ACLK_ASYNC": "0", "MAX_SPLIT_BEATS": "16"}
    assert cfg[VV.IP_MODULES["protocol"]]["ip"] == "axi_protocol_converter"
    assert cfg[VV.IP_MODULES["slice"]]["config"]["REG_W"] == "1"
    # the IP is created before synthesis, after the sources (the project Tcl sources ip.tcl)
    i_ip = ip.index("create_ip -name axi_protocol_converter")
    assert i_ip < ip.index("generate_target all")


def test_vivado_256_bit_words_need_no_width_converter():
    """At 256 bits (ci-small as configured) the chain is protocol converter + register slice only."""
    from accllm.config import load_hw
    cfg = load_hw("ci-small")
    assert cfg.accelerator.mem_word_bits == VV.HBM_DATA_BITS
    assert list(VV.ip_config(cfg.accelerator)) == [VV.IP_MODULES["protocol"], VV.IP_MODULES["slice"]]
    assert VV.hbm_saxi(cfg.accelerator) == {"mem0": 0, "aux": 1}
    import dataclasses
    with pytest.raises(VV.VivadoError, match="mem_channel_bytes = 0x20000000: a channel must fit one HBM"):
        VV.U280Top(cfg.engine, TargetParams(), dataclasses.replace(cfg.accelerator, mem_channel_bytes=1 << 29))
    with pytest.raises(VV.VivadoError, match="mem_ports = 32: the 32 striped masters and aux need 33 HBM"):
        VV.U280Top(cfg.engine, TargetParams(), dataclasses.replace(cfg.accelerator, mem_ports=32))


def test_mmcm_settings():
    for f in (225.0, 200.0, 300.0, 250.0, 150.0):
        s = VV.mmcm_settings(100.0, f)
        assert VV.VCO_MIN_MHZ <= s["vco_mhz"] <= VV.VCO_MAX_MHZ
        assert abs(100.0 * s["CLKFBOUT_MULT_F"] / s["DIVCLK_DIVIDE"] / s["CLKOUT0_DIVIDE_F"] - f) < 1e-9
    assert VV.mmcm_settings(100.0, 225.0) == {"DIVCLK_DIVIDE": 1, "CLKFBOUT_MULT_F": 9.0,
                                              "CLKOUT0_DIVIDE_F": 4.0, "vco_mhz": 900.0, "f_out_mhz": 225.0}
    with pytest.raises(VV.VivadoError, match="clock_mhz = 1.0: no MMCM setting"):
        VV.mmcm_settings(100.0, 1.0)  # below VCO_MIN / 128


# ---------------------------------------------------------------------------------------------------
def test_vitis_kernel_ports(vitis_kernel):
    vitis_files, k = vitis_kernel
    ports = module_ports(vitis_files[f"{VT.KERNEL_NAME}.v"], VT.KERNEL_NAME)
    outs = {"awvalid", "awaddr", "awlen", "awsize", "awburst", "wvalid", "wdata", "wstrb", "wlast", "bready",
            "arvalid", "araddr", "arlen", "arsize", "arburst", "rready"}
    assert k.port_names == ["mem0", "mem1", "aux"]
    for n in k.port_names:
        for sig in AXI4:
            d, w = ports[f"m_axi_{n}_{sig}"]
            assert d == ("output" if sig in outs else "input"), (n, sig, d)
            if sig in ("awaddr", "araddr"):
                assert w == 64
            if sig in ("wdata", "rdata"):
                assert w == k.accel.mem_word_bits == 512
    assert not [p for p in ports if p.startswith("m_axi_") and p.split("_")[2] not in k.port_names]
    lite_out = {"awready", "wready", "bvalid", "bresp", "arready", "rvalid", "rdata", "rresp"}
    for sig in LITE:
        d, w = ports[f"s_axi_control_{sig}"]
        assert d == ("output" if sig in lite_out else "input"), sig
    assert ports["s_axi_control_awaddr"][1] == 12 and ports["s_axi_control_wdata"][1] == 32
    assert ports["ap_clk"] == ("input", 1) and ports["ap_rst_n"] == ("input", 1)
    assert ports["interrupt"] == ("output", 1)
    # the whole accelerator is inside: the engine, the controller, the units, the AXI adapters
    v = vitis_files[f"{VT.KERNEL_NAME}.v"]
    for mod in ("engine", "ctrl", "unit_rmsnorm", "unit_argmax", "memsys", "streamer"):
        assert re.search(rf"^module \\{VT.KERNEL_NAME}\.accel\.\S*\b{mod}\s", v, re.M), mod


def test_vitis_kernel_xml(vitis_kernel):
    vitis_files, kern = vitis_kernel
    offsets = kern.control.offsets
    root = ET.fromstring(vitis_files["kernel.xml"])
    k = root.find("kernel")
    assert k.get("name") == VT.KERNEL_NAME and k.get("hwControlProtocol") == "ap_ctrl_hs"
    ports = {p.get("name"): p for p in k.find("ports")}
    assert ports["s_axi_control"].get("mode") == "slave" and ports["s_axi_control"].get("range") == "0x1000"
    assert set(ports) == {"s_axi_control", "m_axi_mem0", "m_axi_mem1", "m_axi_aux"}
    for n in kern.port_names:
        p = ports[f"m_axi_{n}"]
        assert p.get("mode") == "master" and p.get("dataWidth") == "512"
    args = [a for a in k.find("args")]
    assert [a.get("name") for a in args] == ["mem0_ptr", "mem1_ptr", "aux_ptr"]
    offs = sorted(int(a.get("offset"), 16) for a in args)
    assert offs[0] == 0x10 and len(set(offs)) == len(offs)
    for a in args:
        off, size = int(a.get("offset"), 16), int(a.get("size"), 16)
        assert (off, size * 8) == tuple(offsets[a.get("name")]) and off % size == 0
        assert a.get("addressQualifier") == "1" and a.get("type") == "void*"
        assert a.get("port") == "m_axi_" + a.get("name")[:-4]
    # the package Tcl declares the same register map and every master's clock
    tcl = vitis_files["package_kernel.tcl"]
    regs = dict(re.findall(r"ipx::add_register (\w+) \$block\]\nset_property address_offset (0x[0-9A-F]+)", tcl))
    assert {n: int(o, 16) for n, o in regs.items() if n in offsets} == {n: o for n, (o, _) in offsets.items()}
    assert regs["CTRL"] == "0x000"
    for n in kern.port_names:
        assert f"ipx::associate_bus_interfaces -busif m_axi_{n} -clock ap_clk $core" in tcl
    assert f"package_xo -force -xo_path ./{VT.KERNEL_NAME}.xo -kernel_name {VT.KERNEL_NAME}" in tcl
    assert f"-part {PART}" in tcl or f"set part {PART}" in tcl


def test_vitis_link_config(vitis_files):
    cfg = vitis_files["connectivity.cfg"]
    assert "[connectivity]" in cfg and f"nk={VT.KERNEL_NAME}:1:{VT.INSTANCE}" in cfg
    sp = dict(re.findall(rf"^sp={VT.INSTANCE}\.(\w+):(HBM\[[\d:]+\])$", cfg, re.M))
    # channel p of the striped space on pseudo-channel p (hw.axi.stripe_map), the aux port on both
    assert sp == {"m_axi_mem0": "HBM[0]", "m_axi_mem1": "HBM[1]", "m_axi_aux": "HBM[0:1]"}
    assert f"freqHz=225000000:{VT.INSTANCE}.ap_clk" in cfg
    assert "--config connectivity.cfg" in vitis_files["build.sh"] and "v++ --link" in vitis_files["build.sh"]
    mem = json.loads(vitis_files["memory.json"])
    assert mem["mem_ports"] == 2 and mem["word_bits"] == 512 and mem["hbm"] == sp
    assert {n: a["port"] for n, a in mem["args"].items()} == {"mem0_ptr": "m_axi_mem0", "mem1_ptr": "m_axi_mem1",
                                                                      "aux_ptr": "m_axi_aux"}


# ---------------------------------------------------------------------------------------------------
def test_plan_cache_and_atomic_write(tmp_path):
    files = {"a.tcl": "puts a\n", "b.sh": "echo b\n"}
    tools = {"amaranth": "0.5.10"}
    m1 = B.write_plan(tmp_path, "vivado", files, tools)
    assert not m1["cached"] and (tmp_path / "vivado" / "manifest.json").exists()
    assert os.access(tmp_path / "vivado" / "b.sh", os.X_OK)
    m2 = B.write_plan(tmp_path, "vivado", files, tools)
    assert m2["cached"] and m2["key"] == m1["key"]
    # another tool version, or a file edited by hand, is a rebuild
    assert not B.write_plan(tmp_path, "vivado", files, {"amaranth": "0.5.11"})["cached"]
    (tmp_path / "vivado" / "a.tcl").write_text("edited\n")
    m3 = B.write_plan(tmp_path, "vivado", files, {"amaranth": "0.5.11"})
    assert not m3["cached"] and (tmp_path / "vivado" / "a.tcl").read_text() == "puts a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left over


def test_interrupted_plan_does_not_look_complete(tmp_path, monkeypatch):
    files = {"a.tcl": "puts a\n", "b.tcl": "puts b\n"}
    real_write = Path.write_text

    def dying(self, text, *a, **k):
        if self.name == "b.tcl":
            raise KeyboardInterrupt
        return real_write(self, text, *a, **k)
    monkeypatch.setattr(Path, "write_text", dying)
    with pytest.raises(KeyboardInterrupt):
        B.write_plan(tmp_path, "vitis", files, {})
    monkeypatch.undo()
    assert not (tmp_path / "vitis").exists()  # only the temporary folder, no manifest anywhere
    assert not list(tmp_path.glob("**/manifest.json"))
    assert not B.write_plan(tmp_path, "vitis", files, {})["cached"]


def test_precheck_names_resource_and_percent():
    assert B.precheck(CI_SMALL)["percent_lut"] < 1
    huge = EngineParams(pe_rows=4096, pe_lanes=32, max_reduction_len=4096, act_buffer_bytes=65536)
    with pytest.raises(B.BuildError, match=r"4096 x 32 = 131072 multipliers needs about [\d,]+ LUTs = \d+ % "
                                           r"of the U280's 1,303,680"):
        B.precheck(huge)


def test_tool_missing_and_too_old(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(B.BuildError, match=r"--run needs vivado on PATH.*2022\.2 or later"):
        B.require_tool("vivado")
    old = tmp_path / "v++"
    old.write_text("#!/bin/sh\necho '****** v++ v2020.1 (64-bit)'\n")
    old.chmod(0o755)
    with pytest.raises(B.BuildError, match=r"v\+\+ 2020\.1 is not supported: 2022\.2 or later is wanted"):
        B.require_tool("v++")
    old.write_text("#!/bin/sh\necho '****** v++ v2023.2 (64-bit)'\n")
    assert B.require_tool("v++") == "2023.2"


def test_cli_build_vitis_plan_and_run_error(tmp_path, capsys, monkeypatch):
    from accllm.cli import main
    out = tmp_path / "out"
    assert main(["build", "--hw", "ci-small", "--out", str(out), "--target", "vitis", "--no-estimate",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["target"] == "vitis" and not summary["cached"]
    assert set(summary["files"]) == {"accllm_kernel.v", "kernel.xml", "package_kernel.tcl", "connectivity.cfg",
                                     "build.sh", "memory.json"}
    man = json.loads((out / "vitis" / "manifest.json").read_text())
    assert man["key"] == summary["key"] and "amaranth" in man["tools"]
    # --run without v++: a clear error, exit status 2, before anything is written
    monkeypatch.setenv("PATH", "/nonexistent")
    assert main(["build", "--hw", "ci-small", "--out", str(tmp_path / "o2"), "--target", "vitis", "--run"]) == 2
    err = capsys.readouterr().err
    assert "accllm build: error: --run needs v++ on PATH" in err
    assert not (tmp_path / "o2").exists()


@pytest.mark.slow  # both u280 plans converted (the whole 256-row accelerator: ~50 CPU-s each)
def test_u280_plans_as_text():
    """Both targets for the u280 config itself, 16 striped 512-bit masters and aux: the Vivado plan's
    memory path traced master by master (``vivado_problems``: converters, widths, protocols, the HBM port
    of each pseudo-channel, clocks, address map, pointers), the part, and the Vitis kernel's ports,
    arguments and HBM connectivity."""
    from accllm.config import load_hw
    cfg = load_hw("u280")
    engine, accel = cfg.engine, cfg.accelerator
    assert accel.mem_ports == 16 and accel.mem_word_bits == 512
    vv, top = VV.files(engine, cfg.target, accel)
    assert vivado_problems(vv, top.accel) == []
    assert f"create_project -force -name {VV.TOP_NAME} -part {PART}" in vv[f"{VV.TOP_NAME}.tcl"]
    vt, kern = VT.files(engine, cfg.target, accel)
    root = ET.fromstring(vt["kernel.xml"])
    ports = {p.get("name"): p for p in root.find("kernel").find("ports")}
    assert set(ports) == {"s_axi_control", "m_axi_aux"} | {f"m_axi_mem{p}" for p in range(16)}
    assert all(ports[f"m_axi_{n}"].get("dataWidth") == "512" for n in kern.port_names)
    sp = dict(re.findall(rf"^sp={VT.INSTANCE}\.(\w+):(HBM\[[\d:]+\])$", vt["connectivity.cfg"], re.M))
    assert {n: sp[n] for n in sp if n != "m_axi_aux"} == {f"m_axi_mem{p}": f"HBM[{p}]" for p in range(16)}
    assert f"module {VT.KERNEL_NAME}" in vt[f"{VT.KERNEL_NAME}.v"]
    # the repeated rows are modules of their own (bitstream/hier.py), the dsp array's among them
    assert re.search(r"^module bb_DspRows3\(", vt[f"{VT.KERNEL_NAME}.v"], re.M)
