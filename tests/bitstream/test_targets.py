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
from bitstream.kernel import IN_STREAMS, OFFSETS, STREAMS
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


@pytest.fixture(scope="module")
def vivado_files():
    p, top = VV.plan(CI_SMALL, TargetParams())
    return {n: (c if isinstance(c, str) else c.decode()) for n, c in p.files.items()}


@pytest.fixture(scope="module")
def vitis_kernel():
    """The ci-small accelerator with two striped ports (configs/hw/ci-small.yaml has one), so the
    per-channel pointers and the HBM map are seen with more than one channel."""
    import dataclasses

    from accllm.config import load_hw
    cfg = load_hw("ci-small")
    accel = dataclasses.replace(cfg.accelerator, mem_ports=2)
    return VT.files(cfg.engine, TargetParams(), accel)


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


def test_vivado_top_and_connectivity(vivado_files):
    v = vivado_files[f"{VV.TOP_NAME}.v"]
    ports = module_ports(v, VV.TOP_NAME)
    assert ports == {"sysclk_0__p": ("input", 1), "sysclk_0__n": ("input", 1),
                     "cpu_reset_0__io": ("input", 1), "hbm_cattrip_0__io": ("output", 1)}
    assert re.search(r"^\s*IBUFDS ", v, re.M) and re.search(r"^\s*BUFG ", v, re.M)
    mmcm = re.search(r"MMCME4_BASE #\((.*?)\) mmcm", v, re.S).group(1)
    assert ".CLKFBOUT_MULT_F(9.0)" in mmcm and ".CLKOUT0_DIVIDE_F(4.0)" in mmcm
    assert ".DIVCLK_DIVIDE(32'd1)" in mmcm and ".CLKIN1_PERIOD(10.0)" in mmcm
    hbm = instance_conns(v, "hbm_0")
    for n, s in enumerate(STREAMS):
        pre = f"AXI_{n:02d}_"
        for ch in ("AR", "AW"):
            if s in IN_STREAMS and ch == "AR" or s not in IN_STREAMS and ch == "AW":
                assert hbm[f"{pre}{ch}ADDR"] == f"m_axi_{s}_{ch.lower()}addr[32:0]", (s, ch, hbm[f"{pre}{ch}ADDR"])
                assert hbm[f"{pre}{ch}LEN"].endswith("[3:0]")  # AXI3: the low 4 bits of our AxLEN
        for sig in ("ACLK", "ARESET_N", "RREADY", "BREADY", "RVALID", "RDATA", "WDATA", "WVALID", "WREADY"):
            assert f"{pre}{sig}" in hbm, f"{pre}{sig} not connected"
    assert not any(k.startswith(f"AXI_{len(STREAMS):02d}_") for k in hbm)
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


def test_vivado_ip_tcl(vivado_files):
    ip = vivado_files["ip.tcl"]
    assert "create_ip -name hbm -vendor xilinx.com -library ip -version 1.0 -module_name hbm_0" in ip
    saxi = dict(re.findall(r"CONFIG\.USER_SAXI_(\d\d) \{(\w+)\}", ip))
    assert len(saxi) == 32 and [k for k, v in saxi.items() if v == "true"] == \
        [f"{i:02d}" for i in range(len(STREAMS))]
    assert "CONFIG.USER_AXI_CLK_FREQ {225}" in ip and "CONFIG.USER_HBM_REF_CLK_0 {100}" in ip
    assert "CONFIG.USER_HBM_DENSITY {8GB}" in ip and "CONFIG.USER_HBM_STACK {2}" in ip
    assert "create_ip -name jtag_axi" in ip and "CONFIG.PROTOCOL {2}" in ip


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
                assert w == k.accel.mem_word_bits == 256
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
        assert p.get("mode") == "master" and p.get("dataWidth") == "256"
    args = [a for a in k.find("args")]
    assert [a.get("name") for a in args] == ["mem0_ptr", "mem1_ptr"]
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
    assert mem["mem_ports"] == 2 and mem["word_bits"] == 256 and mem["hbm"] == sp
    assert {n: a["port"] for n, a in mem["args"].items()} == {"mem0_ptr": "m_axi_mem0", "mem1_ptr": "m_axi_mem1"}


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
