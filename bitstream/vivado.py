"""The ``vivado`` target: a standalone U280 project (no XRT shell) — Tcl, XDC, Verilog, build and run
scripts — made by ``U280Platform.build(top, do_build=False)`` plus our own Tcl for the IP.

``U280Top`` holds the same top as the ``vitis`` target, the whole accelerator
(``bitstream.kernel.AcceleratorKernel`` around ``hw.accel.AxiAccelerator``), inside a board-level wrapper:

* clocking: SYSCLK0 (100 MHz LVDS) -> IBUFDS -> BUFG = HBM reference and APB clock; an MMCME4_BASE makes
  the accelerator clock (``clock_mhz``, 225 MHz by default) -> BUFG = the ``sync`` domain of the kernel,
  of the AXI converters and of the HBM AXI ports (one clock: no clock-domain crossing);
* reset: SW1 (CPU_RESET_FPGA, active low) or a lost MMCM lock resets ``sync`` (Amaranth's
  ResetSynchronizer); the kernel is held in reset until both HBM stacks report their APB initialisation
  complete (``apb_complete_0/1``, PG276);
* memory: one chain of Xilinx IP per accelerator master (``m_axi_mem<p>``, ``m_axi_aux``, AXI4,
  ``accelerator.mem_word_bits`` wide, bursts up to ``axi_max_burst``) to one AXI3 slave port of the HBM
  IP ``hbm_0`` (256 bits, bursts of at most 16 beats, PG276): ``axi_dwidth_converter`` (AXI4,
  ``mem_word_bits`` -> 256, long bursts split; left out when the word is already 256 bits) ->
  ``axi_protocol_converter`` (AXI4 -> AXI3, TRANSLATION_MODE 2: bursts over 16 beats split) ->
  ``axi_register_slice`` (AXI3, every channel fully registered, a timing break in front of the HBM hard
  block) -> ``SAXI_<n>`` (``hbm_saxi``: ``mem<p>`` on the port of its own pseudo-channel p, ``aux`` on
  the next free port). The HBM's AXI switch is on (PG276: "full memory space access from all AXI
  ports"), so ``aux`` reaches every channel; pseudo-channel q is bytes q * 256 MiB ... (q + 1) * 256
  MiB - 1 of the HBM's 33-bit space, and a user points ``mem<q>_ptr`` there (``address_map``,
  ``memory.json``, ``run_hw.tcl``); a ``mem<p>`` master then only ever talks to its own channel's
  controller;
* control: a JTAG-to-AXI master (``jtag_axi_0``, PG174, AXI4-Lite) drives the kernel's control slave
  (the ``ap_ctrl_hs`` map of the ``vitis`` kernel), so a user loads the pointers and starts the kernel
  from Vivado's hardware manager (``run_hw.tcl``: ``create_hw_axi_txn``; README);
* HBM_CATTRIP carries DRAM_0_STAT_CATTRIP | DRAM_1_STAT_CATTRIP (UG1314, bitstream/platform.py).

The IP names and properties are AMD's: PG059 "AXI Interconnect" (AXI Data Width Converter, AXI Protocol
Converter: "AXI4-to-AXI3 Converter", TRANSLATION_MODE), PG373 "AXI Register Slice" (REG_* 1 = Full),
PG276 "AXI High Bandwidth Memory Controller", PG174 "JTAG to AXI Master". Nothing here was run through
Vivado on this machine (it is not installed); the generated text is checked by
tests/bitstream/test_targets.py.
"""

from __future__ import annotations

import json

from amaranth.hdl import Cat, ClockDomain, ClockSignal, Const, Elaboratable, Instance, Module, ResetSignal, Signal
from amaranth.lib import io
from amaranth.lib.cdc import ResetSynchronizer

from hw.params import AccelParams, EngineParams, TargetParams

from .axi import REG_AP_CTRL
from .kernel import AcceleratorKernel, hbm_channels
from .platform import BITSTREAM_PROPERTIES, POWER_BUDGET_W, SYSCLK_MHZ, U280Platform

__all__ = ["U280Top", "mmcm_settings", "ip_tcl", "plan", "files", "TOP_NAME", "HBM_PC_BYTES", "hbm_saxi",
           "address_map", "axi_fields", "IP_MODULES"]

TOP_NAME = "accllm_u280"
HBM_PC_BYTES = 256 << 20  # 8 GB / 32 pseudo-channels (ANCHORS.md: 8 GB HBM2 in 32 PCs of 256 MB)
HBM_PCS = 32              # pseudo-channels = AXI slave ports of the HBM IP, both stacks (PG276)
HBM_ADDR_BITS = 33        # AXI_xx_ARADDR[32:0] of the HBM IP (PG276 port list)
HBM_DATA_BITS = 256       # AXI_xx_WDATA[255:0]: "16 independent 256-bit ports" per stack (PG276)
HBM_ID_BITS = 6           # AXI_xx_ARID[5:0]: "64 AXI IDs support per port" (PG276)
HBM_MAX_BURST = 16        # AXI3: AXI_xx_ARLEN[3:0]
KERNEL_ID_BITS = 1        # hw.axi.axi_master_ports' default: the masters use ID 0
# UltraScale+ MMCM VCO range (DS923, "MMCM Switching Characteristics": F_VCOMIN 800 MHz, F_VCOMAX
# 1600 MHz for the -2 speed grades); the M, D, O steps are UG572's (M, O fractional in 1/8).
VCO_MIN_MHZ, VCO_MAX_MHZ = 800.0, 1600.0
#: the module names ip.tcl gives the converter IP (one configuration each, instantiated per master)
IP_MODULES = {"dwidth": "accllm_axi_dwidth", "protocol": "accllm_axi4_to_axi3", "slice": "accllm_axi3_slice"}

#: AXI fields driven by the slave (everything else is driven by the master)
FROM_SLAVE = frozenset({"awready", "wready", "bid", "bresp", "bvalid", "arready", "rid", "rdata", "rresp",
                        "rlast", "rvalid"})
#: the HBM port's fields (PG276 port list, ``AXI_<nn>_<FIELD>``); AXI3 without lock, cache, prot, qos, WID
HBM_FIELDS = ("araddr", "arburst", "arid", "arlen", "arsize", "arvalid", "arready",
              "awaddr", "awburst", "awid", "awlen", "awsize", "awvalid", "awready",
              "wdata", "wstrb", "wlast", "wvalid", "wready", "bid", "bresp", "bvalid", "bready",
              "rdata", "rid", "rlast", "rresp", "rvalid", "rready")


class VivadoError(ValueError):
    """A target setting the Vivado plan cannot honour."""


def axi_fields(protocol: str, data_bits: int, addr_bits: int, id_bits: int) -> dict[str, int]:
    """Field -> width of one AXI4 or AXI3 interface as the Xilinx infrastructure IP (PG059) names its
    ports ``s_axi_<field>`` / ``m_axi_<field>``: AXI3 has 4-bit AxLEN, 2-bit AxLOCK, WID and no AxREGION
    (IHI 0022); ``id_bits`` 0: no ID fields."""
    if protocol not in ("AXI4", "AXI3"):
        raise ValueError(f"protocol {protocol!r}: AXI4 or AXI3")
    a4 = protocol == "AXI4"
    out: dict[str, int] = {}
    for ch in ("aw", "ar"):
        out.update({f"{ch}id": id_bits, f"{ch}addr": addr_bits, f"{ch}len": 8 if a4 else 4, f"{ch}size": 3,
                    f"{ch}burst": 2, f"{ch}lock": 1 if a4 else 2, f"{ch}cache": 4, f"{ch}prot": 3})
        if a4:
            out[f"{ch}region"] = 4
        out.update({f"{ch}qos": 4, f"{ch}valid": 1, f"{ch}ready": 1})
    if not a4:
        out["wid"] = id_bits
    out.update(wdata=data_bits, wstrb=data_bits // 8, wlast=1, wvalid=1, wready=1, bid=id_bits, bresp=2,
               bvalid=1, bready=1, rid=id_bits, rdata=data_bits, rresp=2, rlast=1, rvalid=1, rready=1)
    return {f: w for f, w in out.items() if w > 0}


def _link(name: str, protocol: str, data_bits: int, id_bits: int) -> dict[str, Signal]:
    """The wires between two IP cores: one named Signal per field."""
    return {f: Signal(w, name=f"{name}_{f}") for f, w in axi_fields(protocol, data_bits, HBM_ADDR_BITS,
                                                                    id_bits).items()}


def _ip_side(bus: dict, side: str) -> dict:
    """Instance keyword arguments of an IP port ``s_axi_*`` (side "s": the IP is the slave of ``bus``)
    or ``m_axi_*`` (side "m": the IP is its master)."""
    out = {}
    for f, v in bus.items():
        into_ip = (f in FROM_SLAVE) == (side == "m")
        out[("i_" if into_ip else "o_") + f"{side}_axi_{f}"] = v
    return out


def hbm_saxi(accel: AccelParams) -> dict[str, int]:
    """Accelerator master -> the HBM AXI slave port (``SAXI_<n>``) it is wired to: ``mem<p>`` to the
    port of its own pseudo-channel (``bitstream.kernel.hbm_channels``: p), ``aux`` (every channel) to
    the first port no ``mem`` master uses."""
    ch = hbm_channels(accel)
    out = {n: pcs[0] for n, pcs in ch.items() if n != "aux"}
    out["aux"] = min(set(range(HBM_PCS)) - set(out.values()))
    return out


def address_map(accel: AccelParams) -> dict[str, dict]:
    """Where each master's accesses land in the HBM's 33-bit space (global addressing, switch on):
    ``mem<p>``: pseudo-channel p, bytes p * 256 MiB ... + mem_channel_bytes, the value a host writes to
    ``mem<p>_ptr``; ``aux``: the same windows of every channel (through the kernel's translation)."""
    ch = hbm_channels(accel)
    out = {}
    for n, pcs in ch.items():
        out[n] = {"pseudo_channels": pcs, "saxi": hbm_saxi(accel)[n],
                  "windows": [[q * HBM_PC_BYTES, q * HBM_PC_BYTES + accel.mem_channel_bytes] for q in pcs]}
        # mem<p>_ptr: its pseudo-channel's base; aux_ptr 0: aux through those same pointers
        out[n]["ptr_arg"], out[n]["ptr"] = f"{n}_ptr", (0 if n == "aux" else pcs[0] * HBM_PC_BYTES)
    return out


def mmcm_settings(f_in_mhz: float, f_out_mhz: float) -> dict:
    """MMCME4 settings (D = DIVCLK_DIVIDE, M = CLKFBOUT_MULT_F, O = CLKOUT0_DIVIDE_F) making ``f_out``
    from ``f_in`` with the VCO in range: the closest frequency; among equals the smallest D, then integer
    M and O, then the lowest VCO."""
    best = None
    for d in range(1, 11):
        pfd = f_in_mhz / d
        if pfd < 10.0:  # DS923 F_PFDMIN 10 MHz
            break
        m8_lo, m8_hi = int(VCO_MIN_MHZ / pfd * 8) + 1, int(VCO_MAX_MHZ / pfd * 8)
        for m8 in range(max(m8_lo, 16), min(m8_hi, 128 * 8) + 1):
            vco = pfd * m8 / 8
            o8 = max(8, min(128 * 8, round(vco / f_out_mhz * 8)))
            out = vco / (o8 / 8)
            key = (round(abs(out - f_out_mhz), 9), d, m8 % 8 != 0, o8 % 8 != 0, vco)
            if best is None or key < best[0]:
                best = (key, {"DIVCLK_DIVIDE": d, "CLKFBOUT_MULT_F": m8 / 8, "CLKOUT0_DIVIDE_F": o8 / 8,
                              "vco_mhz": round(vco, 6), "f_out_mhz": round(out, 6)})
    if best is None or best[0][0] > 0.005 * f_out_mhz:
        raise VivadoError(f"target.clock_mhz = {f_out_mhz}: no MMCM setting from {f_in_mhz} MHz within 0.5 %")
    return best[1]


class U280Top(Elaboratable):
    """The board-level top of the ``vivado`` target (module docstring): ``kernel`` is the same
    ``AcceleratorKernel`` the ``vitis`` target packages, here in the top's ``sync`` domain."""

    def __init__(self, params: EngineParams, target: TargetParams | None = None,
                 accel: AccelParams | None = None, units=None):
        self.p = params
        self.t = target or TargetParams()
        self.accel = accel or AccelParams()
        A = self.accel
        if A.mem_ports + 1 > min(self.t.hbm_channels, HBM_PCS):
            raise VivadoError(f"accelerator.mem_ports = {A.mem_ports}: the {A.mem_ports} striped masters and "
                              f"aux need {A.mem_ports + 1} HBM AXI ports, the part has "
                              f"{min(self.t.hbm_channels, HBM_PCS)} (target.hbm_channels)")
        if A.mem_channel_bytes > HBM_PC_BYTES:
            raise VivadoError(f"accelerator.mem_channel_bytes = {A.mem_channel_bytes:#x}: a channel must fit "
                              f"one HBM pseudo-channel of {HBM_PC_BYTES:#x} bytes")
        if A.mem_word_bits % 32 or not 32 <= A.mem_word_bits <= 1024:
            raise VivadoError(f"accelerator.mem_word_bits = {A.mem_word_bits}: the AXI data width converter "
                              f"takes 32 ... 1024 bits (PG059)")
        self.kernel = AcceleratorKernel(params, A, units, own_domain=False)
        self.mmcm = mmcm_settings(SYSCLK_MHZ, self.t.clock_mhz)
        self.saxi = hbm_saxi(A)
        self.dwidth = A.mem_word_bits != HBM_DATA_BITS  # PG059: MI_DATA_WIDTH "must be different"

    def _chain(self, m: Module, n: str, rst_n) -> dict:
        """The IP between master ``n`` and its HBM port; returns the HBM side's bus (register slice MI)."""
        k = self.kernel
        kb = k.buses[n]
        clk = ClockSignal("sync")
        # the kernel's AXI4 master: 64-bit addresses into the HBM's 33 bits, the AXI4 fields it has no
        # use for constant (lock normal, cache 0b0011 normal non-cacheable bufferable, prot, region, qos 0)
        src = {}
        for f, sig in kb.items():
            src[f] = sig[:HBM_ADDR_BITS] if f in ("araddr", "awaddr") else sig
        for ch in ("aw", "ar"):
            src.update({f"{ch}lock": Const(0, 1), f"{ch}cache": Const(0b0011, 4), f"{ch}prot": Const(0, 3),
                        f"{ch}region": Const(0, 4), f"{ch}qos": Const(0, 4)})
        if self.dwidth:
            dw_m = _link(f"{n}_dw", "AXI4", HBM_DATA_BITS, 0)  # the downsizer's MI has no IDs (PG059)
            m.submodules[f"dw_{n}"] = Instance(
                IP_MODULES["dwidth"], i_s_axi_aclk=clk, i_s_axi_aresetn=rst_n,
                **_ip_side(src, "s"), **_ip_side(dw_m, "m"))
            pc_s = dict(dw_m)
            pc_s.update(awid=Const(0, KERNEL_ID_BITS), arid=Const(0, KERNEL_ID_BITS),
                        bid=Signal(KERNEL_ID_BITS, name=f"{n}_pc_bid"), rid=Signal(KERNEL_ID_BITS, name=f"{n}_pc_rid"))
        else:
            pc_s = src
        pc_m = _link(f"{n}_pc", "AXI3", HBM_DATA_BITS, KERNEL_ID_BITS)
        m.submodules[f"pc_{n}"] = Instance(IP_MODULES["protocol"], i_aclk=clk, i_aresetn=rst_n,
                                           **_ip_side(pc_s, "s"), **_ip_side(pc_m, "m"))
        rs_m = _link(f"{n}_rs", "AXI3", HBM_DATA_BITS, KERNEL_ID_BITS)
        m.submodules[f"rs_{n}"] = Instance(IP_MODULES["slice"], i_aclk=clk, i_aresetn=rst_n,
                                           **_ip_side(pc_m, "s"), **_ip_side(rs_m, "m"))
        return rs_m

    def elaborate(self, platform):
        m = Module()
        m.domains.sync = ClockDomain("sync")
        sysclk = platform.request("sysclk", 0, dir="-")
        m.submodules.sysclk_buf = clk_buf = io.Buffer("i", sysclk)
        rst_pin = platform.request("cpu_reset", 0, dir="-")
        m.submodules.rst_buf = rst_buf = io.Buffer("i", rst_pin)
        cattrip_pin = platform.request("hbm_cattrip", 0, dir="-")
        m.submodules.cattrip_buf = cattrip_buf = io.Buffer("o", cattrip_pin)

        clk100 = Signal()
        m.submodules.bufg_ref = Instance("BUFG", i_I=clk_buf.i, o_O=clk100)
        fb, clk_mmcm, locked = Signal(), Signal(), Signal()
        s = self.mmcm
        m.submodules.mmcm = Instance(
            "MMCME4_BASE",
            p_CLKIN1_PERIOD=1000.0 / SYSCLK_MHZ, p_DIVCLK_DIVIDE=s["DIVCLK_DIVIDE"],
            p_CLKFBOUT_MULT_F=s["CLKFBOUT_MULT_F"], p_CLKOUT0_DIVIDE_F=s["CLKOUT0_DIVIDE_F"],
            i_CLKIN1=clk100, i_CLKFBIN=fb, o_CLKFBOUT=fb, o_CLKOUT0=clk_mmcm, o_LOCKED=locked,
            i_RST=rst_buf.i, i_PWRDWN=Const(0, 1))
        m.submodules.bufg_sync = Instance("BUFG", i_I=clk_mmcm, o_O=ClockSignal("sync"))
        k = self.kernel
        m.submodules.kernel = k
        hbm_ready = Signal()
        apb0, apb1 = Signal(), Signal()
        m.d.comb += hbm_ready.eq(apb0 & apb1)
        # the kernel runs in ``sync``: held in reset until the MMCM locks and the HBM is initialised
        m.submodules.reset_sync = ResetSynchronizer(rst_buf.i | ~locked | ~hbm_ready, domain="sync")
        # the HBM's AXI ports, the converters and the JTAG master leave reset when the clock is up
        hbm_rst_n = Signal()
        m.submodules.hbm_reset_sync = ResetSynchronizer(rst_buf.i | ~locked, domain="hbm_axi")
        m.domains.hbm_axi = ClockDomain("hbm_axi")
        m.d.comb += [ClockSignal("hbm_axi").eq(ClockSignal("sync")), hbm_rst_n.eq(~ResetSignal("hbm_axi"))]

        hbm = {"i_HBM_REF_CLK_0": clk100, "i_HBM_REF_CLK_1": clk100,
               "i_APB_0_PCLK": clk100, "i_APB_1_PCLK": clk100,
               "i_APB_0_PRESET_N": ~rst_buf.i, "i_APB_1_PRESET_N": ~rst_buf.i,
               "o_apb_complete_0": apb0, "o_apb_complete_1": apb1}
        cat0, cat1 = Signal(), Signal()
        hbm["o_DRAM_0_STAT_CATTRIP"] = cat0
        hbm["o_DRAM_1_STAT_CATTRIP"] = cat1
        m.d.comb += cattrip_buf.o.eq(cat0 | cat1)
        for n in k.port_names:
            rs = self._chain(m, n, hbm_rst_n)
            pre = f"AXI_{self.saxi[n]:02d}_"
            hbm[f"i_{pre}ACLK"] = ClockSignal("sync")
            hbm[f"i_{pre}ARESET_N"] = hbm_rst_n
            for f in HBM_FIELDS:
                if f in ("arid", "awid"):
                    v = Cat(rs[f], Const(0, HBM_ID_BITS - KERNEL_ID_BITS))
                elif f in ("bid", "rid"):
                    v = Signal(HBM_ID_BITS, name=f"{n}_hbm_{f}")
                    m.d.comb += rs[f].eq(v[:KERNEL_ID_BITS])
                else:
                    v = rs[f]
                hbm[("o_" if f in FROM_SLAVE else "i_") + pre + f.upper()] = v
            hbm[f"i_{pre}WDATA_PARITY"] = Const(0, HBM_DATA_BITS // 8)
        m.submodules.hbm = Instance("hbm_0", **hbm)

        # control: JTAG-to-AXI (AXI4-Lite) -> the kernel's control slave
        c = k.control.bus
        jt = {"i_aclk": ClockSignal("sync"), "i_aresetn": hbm_rst_n}
        for name in ("awaddr", "araddr"):
            jt[f"o_m_axi_{name}"] = c[name]  # the IP's 32-bit address, our 12-bit window (low bits)
        for name in ("awvalid", "wvalid", "bready", "arvalid", "rready", "wdata", "wstrb"):
            jt[f"o_m_axi_{name}"] = c[name]
        for name in ("awready", "wready", "bvalid", "bresp", "arready", "rvalid", "rdata", "rresp"):
            jt[f"i_m_axi_{name}"] = c[name]
        m.submodules.jtag_axi = Instance("jtag_axi_0", **jt)
        return m


def _props(d: dict) -> str:
    return " \\\n    ".join(f"CONFIG.{k} {{{v}}}" for k, v in d.items())


def ip_config(accel: AccelParams) -> dict[str, dict]:
    """IP module -> its Xilinx IP name and CONFIG properties (one place for ip.tcl and the tests)."""
    W = accel.mem_word_bits
    out = {}
    if W != HBM_DATA_BITS:
        dw = {"PROTOCOL": "AXI4", "SI_DATA_WIDTH": W, "MI_DATA_WIDTH": HBM_DATA_BITS,
              "ADDR_WIDTH": HBM_ADDR_BITS, "SI_ID_WIDTH": KERNEL_ID_BITS, "FIFO_MODE": 0, "ACLK_ASYNC": 0}
        if W > HBM_DATA_BITS:
            dw["MAX_SPLIT_BEATS"] = HBM_MAX_BURST  # downsizer: split into AXI3-sized bursts already
        out[IP_MODULES["dwidth"]] = {"ip": "axi_dwidth_converter", "version": "2.1", "config": dw}
    out[IP_MODULES["protocol"]] = {"ip": "axi_protocol_converter", "version": "2.1", "config": {
        "SI_PROTOCOL": "AXI4", "MI_PROTOCOL": "AXI3", "TRANSLATION_MODE": 2, "READ_WRITE_MODE": "READ_WRITE",
        "DATA_WIDTH": HBM_DATA_BITS, "ADDR_WIDTH": HBM_ADDR_BITS, "ID_WIDTH": KERNEL_ID_BITS}}
    out[IP_MODULES["slice"]] = {"ip": "axi_register_slice", "version": "2.1", "config": {
        "PROTOCOL": "AXI3", "DATA_WIDTH": HBM_DATA_BITS, "ADDR_WIDTH": HBM_ADDR_BITS, "ID_WIDTH": KERNEL_ID_BITS,
        **{f"REG_{c}": 1 for c in ("AW", "AR", "W", "R", "B")}}}
    return out


def ip_tcl(target: TargetParams, accel: AccelParams | None = None) -> str:
    """Tcl that creates and configures the IP ``U280Top`` instantiates (sourced after the sources are
    read, before synthesis). HBM property names as in public Vivado designs for the U280/U50 HBM IP
    (xilinx.com:ip:hbm:1.0, PG276); the converters' from PG059 / PG373 (``ip_config``); PG174's
    JTAG-to-AXI master (PROTOCOL 2 = AXI4-Lite)."""
    accel = accel or AccelParams()
    saxi = hbm_saxi(accel)
    used = set(saxi.values())
    ports = " \\\n    ".join(f"CONFIG.USER_SAXI_{i:02d} {{{'true' if i in used else 'false'}}}"
                              for i in range(HBM_PCS))
    clk = f"{target.clock_mhz:g}"
    amap = address_map(accel)
    table = "\n".join(f"#   m_axi_{n:<6} -> SAXI_{a['saxi']:02d}  pseudo-channel(s) {a['pseudo_channels']}  "
                       + ", ".join(f"[{lo:#011x}, {hi:#011x})" for lo, hi in a["windows"]) for n, a in amap.items())
    conv = []
    for mod, c in ip_config(accel).items():
        conv.append(f"create_ip -name {c['ip']} -vendor xilinx.com -library ip -version {c['version']} "
                    f"-module_name {mod}\nset_property -dict [list \\\n    {_props(c['config'])} \\\n] [get_ips {mod}]")
    conv_tcl = "\n".join(conv)
    return f"""# accllm: IP of the {TOP_NAME} top (bitstream/vivado.py)
# HBM: both stacks (8 GB, 32 pseudo-channels of 256 MiB); the AXI switch on (global addressing, PG276:
# full memory space access from all AXI ports). Masters, ports and address windows (the kernel's
# mem<p>_ptr = the window's base, memory.json, run_hw.tcl):
{table}
create_ip -name hbm -vendor xilinx.com -library ip -version 1.0 -module_name hbm_0
set_property -dict [list \\
    CONFIG.USER_HBM_DENSITY {{8GB}} \\
    CONFIG.USER_HBM_STACK {{2}} \\
    CONFIG.USER_HBM_REF_CLK_0 {{{SYSCLK_MHZ:g}}} \\
    CONFIG.USER_HBM_REF_CLK_1 {{{SYSCLK_MHZ:g}}} \\
    CONFIG.USER_APB_EN {{false}} \\
    CONFIG.USER_AXI_CLK_FREQ {{{clk}}} \\
    CONFIG.USER_AXI_CLK1_FREQ {{{clk}}} \\
    CONFIG.USER_SWITCH_ENABLE_00 {{TRUE}} \\
    CONFIG.USER_SWITCH_ENABLE_01 {{TRUE}} \\
    CONFIG.USER_XSDB_INTF_EN {{FALSE}} \\
    {ports} \\
] [get_ips hbm_0]
# Per master (bitstream.vivado.U280Top._chain): the accelerator's AXI4 ({accel.mem_word_bits} bits, bursts up to
# {accel.axi_max_burst} beats) to the HBM's AXI3 (256 bits, at most 16 beats): width converter (PG059, left out
# at 256 bits), AXI4 -> AXI3 protocol converter (PG059 "AXI4-to-AXI3 Converter": longer bursts split),
# register slice (PG373, REG_* 1 = Full). One configuration each, instantiated once per master.
{conv_tcl}
# Control path: JTAG-to-AXI master, AXI4-Lite, 32-bit data and address (PG174)
create_ip -name jtag_axi -vendor xilinx.com -library ip -version 1.2 -module_name jtag_axi_0
set_property -dict [list CONFIG.PROTOCOL {{2}} CONFIG.M_AXI_DATA_WIDTH {{32}} CONFIG.M_AXI_ADDR_WIDTH {{32}}] \\
    [get_ips jtag_axi_0]
# Synthesize the IP with the design (no out-of-context runs in this non-project flow)
foreach ip [get_ips] {{
    set_property generate_synth_checkpoint false [get_files [get_property IP_FILE $ip]]
}}
generate_target all [get_ips]
"""


def run_hw_tcl(k: AcceleratorKernel) -> str:
    """Hardware-manager Tcl (after programming the bitstream): write each ``mem<p>_ptr`` with its
    pseudo-channel's base (``address_map``) over JTAG-to-AXI, start the kernel, poll ap_done."""
    amap = address_map(k.accel)
    lines = [f"# accllm: run {TOP_NAME} from Vivado's hardware manager (bitstream/vivado.py; README)",
             "# usage, after program_hw_devices: source run_hw.tcl  (the image must already be in HBM at",
             "# these windows: memory.json)",
             "set axi [lindex [get_hw_axis] 0]",
             "proc wr {name addr data} {",
             "    global axi",
             "    create_hw_axi_txn -force $name $axi -type write -address $addr -data $data",
             "    run_hw_axi [get_hw_axi_txns $name]",
             "}"]
    for name, (off, bits) in k.control.offsets.items():
        ptr = amap[name.removesuffix("_ptr")]["ptr"]
        lines.append(f"wr {name}_lo {off:08x} {ptr & 0xFFFF_FFFF:08x}")
        lines.append(f"wr {name}_hi {off + 4:08x} {ptr >> 32:08x}")
    lines += [f"wr ap_start {REG_AP_CTRL:08x} 00000001",
              "create_hw_axi_txn -force ap_ctrl $axi -type read -address 00000000",
              "while 1 {",
              "    run_hw_axi -quiet [get_hw_axi_txns ap_ctrl]",
              "    set v [expr 0x[get_property DATA [get_hw_axi_txns ap_ctrl]]]",
              "    if {$v & 2} break",
              "    after 10",
              "}",
              'puts [format "ap_ctrl = 0x%x (bit 4: the accelerator stopped with an error)" $v]', ""]
    return "\n".join(lines)


def extra_xdc() -> str:
    lines = ["# accllm: [XDC] = Xilinx AU280 HBM Master XDC rev 2.04 (bitstream/platform.py)",
             f"set_operating_conditions -design_power_budget {POWER_BUDGET_W}"]
    lines += [f"set_property {k} {v} [current_design]" for k, v in BITSTREAM_PROPERTIES]
    return "\n".join(lines)


def plan(params: EngineParams, target: TargetParams | None = None, accel: AccelParams | None = None,
         units=None):
    """The Amaranth build plan (``amaranth.build.run.BuildPlan``) of the ``vivado`` target plus
    ``ip.tcl``, ``run_hw.tcl`` and ``memory.json``; nothing is run."""
    from .hier import Hierarchy, repeated_engine_classes
    from .vitis import memory_json
    target = target or TargetParams()
    top = U280Top(params, target, accel, units)
    platform = U280Platform()
    # the engine's repeated rows as modules written once, appended to the top's Verilog (bitstream/hier.py)
    with Hierarchy(repeated_engine_classes(params)) as h:
        p = platform.build(top, name=TOP_NAME, do_build=False,
                           script_after_read="source {ip.tcl}",
                           add_constraints=extra_xdc())
    for name in (f"{TOP_NAME}.v", f"{TOP_NAME}.debug.v"):  # the project reads the first
        p.files[name] = p.files[name] + h.text()
    p.add_file("ip.tcl", ip_tcl(target, top.accel))
    p.add_file("run_hw.tcl", run_hw_tcl(top.kernel))
    mem = json.loads(memory_json(top.kernel))
    mem["address_map"] = address_map(top.accel)
    p.add_file("memory.json", json.dumps(mem, indent=1) + "\n")
    return p, top


def files(params: EngineParams, target: TargetParams | None = None, accel: AccelParams | None = None,
          units=None) -> tuple[dict[str, str], U280Top]:
    """The ``vivado`` target's files (name -> text) and the top they were made from."""
    p, top = plan(params, target, accel, units)
    return {n: (c if isinstance(c, str) else c.decode()) for n, c in p.files.items()}, top
