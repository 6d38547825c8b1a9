"""The ``vivado`` target: a standalone U280 project (no XRT shell) — Tcl, XDC, Verilog, build script —
made by ``U280Platform.build(top, do_build=False)`` plus our own Tcl for the IP.

``U280Top`` is the accelerator kernel (``bitstream.kernel.AccelKernel``: the engine and its AXI masters)
inside a real board-level wrapper:

* clocking: SYSCLK0 (100 MHz LVDS) -> IBUFDS -> BUFG = HBM reference and APB clock; an MMCME4_BASE makes
  the engine clock (``clock_mhz``, 225 MHz by default) -> BUFG = the ``sync`` domain of the kernel and
  the HBM AXI ports (one clock: no clock-domain crossing);
* reset: SW1 (CPU_RESET_FPGA, active low) or a lost MMCM lock resets ``sync`` (Amaranth's
  ResetSynchronizer); the kernel is held in reset until both HBM stacks report their APB initialisation
  complete (``apb_complete_0/1``, PG276);
* memory: the HBM IP ``hbm_0`` (created and configured by ``ip.tcl``), one AXI3 slave port per kernel
  master, ``SAXI_00`` ... (stream order ``bitstream.kernel.STREAMS``), switch off: port n's window is
  pseudo-channel n, addresses n * 256 MiB ... (n + 1) * 256 MiB - 1;
* control: a JTAG-to-AXI master (``jtag_axi_0``, PG174, AXI4-Lite) drives the kernel's control slave, so
  a user starts the kernel from Vivado's hardware manager (``create_hw_axi_txn``, README);
* HBM_CATTRIP carries DRAM_0_STAT_CATTRIP | DRAM_1_STAT_CATTRIP (UG1314, bitstream/platform.py).

Nothing here was run through Vivado on this machine (it is not installed); the generated text is
checked by tests/bitstream/test_targets.py.
"""

from __future__ import annotations

from amaranth.hdl import ClockDomain, ClockSignal, Const, Elaboratable, Instance, Module, ResetSignal, Signal
from amaranth.lib import io
from amaranth.lib.cdc import ResetSynchronizer

from hw.params import EngineParams, TargetParams

from .kernel import STREAMS, AccelKernel
from .platform import BITSTREAM_PROPERTIES, POWER_BUDGET_W, SYSCLK_MHZ, U280Platform

__all__ = ["U280Top", "mmcm_settings", "ip_tcl", "plan", "TOP_NAME", "HBM_PC_BYTES"]

TOP_NAME = "accllm_u280"
HBM_PC_BYTES = 256 << 20  # 8 GB / 32 pseudo-channels (ANCHORS.md: 8 GB HBM2 in 32 PCs of 256 MB)
HBM_ADDR_BITS = 33        # AXI_xx_ARADDR[32:0] of the HBM IP (PG276 port list)
HBM_LEN_BITS = 4          # AXI3: AXI_xx_ARLEN[3:0]
HBM_ID_BITS = 6
# UltraScale+ MMCM VCO range (DS923, "MMCM Switching Characteristics": F_VCOMIN 800 MHz, F_VCOMAX
# 1600 MHz for the -2 speed grades); the M, D, O steps are UG572's (M, O fractional in 1/8).
VCO_MIN_MHZ, VCO_MAX_MHZ = 800.0, 1600.0


#: the HBM IP's W, B and R channel ports of one AXI port, with their direction seen from the IP
#: (i_ an input of the IP, driven by our master; o_ an output), named as the master's bus names them
HBM_WBR_PORTS = (("i", "WDATA"), ("i", "WSTRB"), ("i", "WLAST"), ("i", "WVALID"), ("o", "WREADY"),
                 ("o", "BRESP"), ("o", "BVALID"), ("i", "BREADY"),
                 ("o", "RDATA"), ("o", "RRESP"), ("o", "RLAST"), ("o", "RVALID"), ("i", "RREADY"))


class VivadoError(ValueError):
    """A target setting the Vivado plan cannot honour."""


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
    """The board-level top of the ``vivado`` target (module docstring)."""

    def __init__(self, params: EngineParams, target: TargetParams | None = None):
        self.p = params
        self.t = target or TargetParams()
        self.kernel = AccelKernel(params, data_width=256, addr_width=64, own_domain=False)
        self.mmcm = mmcm_settings(SYSCLK_MHZ, self.t.clock_mhz)
        if len(STREAMS) > self.t.hbm_channels:
            raise VivadoError(f"target.hbm_channels = {self.t.hbm_channels}: the kernel needs one "
                              f"pseudo-channel per stream, {len(STREAMS)}")

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
        hbm_rst_n = Signal()  # the HBM's AXI ports leave reset when the clock is up, before the kernel
        m.submodules.hbm_reset_sync = ResetSynchronizer(rst_buf.i | ~locked, domain="hbm_axi")
        m.domains.hbm_axi = ClockDomain("hbm_axi")
        m.d.comb += [ClockSignal("hbm_axi").eq(ClockSignal("sync")), hbm_rst_n.eq(~ResetSignal("hbm_axi"))]

        # HBM: ports SAXI_00.. for the kernel's masters (AXI4 -> the controller's AXI3: our bursts are at
        # most 16 beats, so ARLEN/AWLEN's low 4 bits are the whole length)
        hbm = {"i_HBM_REF_CLK_0": clk100, "i_HBM_REF_CLK_1": clk100,
               "i_APB_0_PCLK": clk100, "i_APB_1_PCLK": clk100,
               "i_APB_0_PRESET_N": ~rst_buf.i, "i_APB_1_PRESET_N": ~rst_buf.i,
               "o_apb_complete_0": apb0, "o_apb_complete_1": apb1}
        cat0, cat1 = Signal(), Signal()
        hbm["o_DRAM_0_STAT_CATTRIP"] = cat0
        hbm["o_DRAM_1_STAT_CATTRIP"] = cat1
        m.d.comb += cattrip_buf.o.eq(cat0 | cat1)
        for n, s_name in enumerate(STREAMS):
            b = k.masters[s_name].bus
            pre = f"AXI_{n:02d}_"
            hbm[f"i_{pre}ACLK"] = ClockSignal("sync")
            hbm[f"i_{pre}ARESET_N"] = hbm_rst_n
            for ch in ("ar", "aw"):
                C = ch.upper()
                hbm[f"i_{pre}{C}ADDR"] = b[f"{ch}addr"][:HBM_ADDR_BITS]
                hbm[f"i_{pre}{C}LEN"] = b[f"{ch}len"][:HBM_LEN_BITS]
                hbm[f"i_{pre}{C}ID"] = Const(0, HBM_ID_BITS)
                hbm[f"i_{pre}{C}SIZE"] = b[f"{ch}size"]
                hbm[f"i_{pre}{C}BURST"] = b[f"{ch}burst"]
                hbm[f"i_{pre}{C}VALID"] = b[f"{ch}valid"]
                hbm[f"o_{pre}{C}READY"] = b[f"{ch}ready"]
            for d, sig in HBM_WBR_PORTS:  # the W, B and R channels, one to one
                hbm[f"{d}_{pre}{sig}"] = b[sig.lower()]
            hbm[f"i_{pre}WDATA_PARITY"] = Const(0, 32)
            m.d.comb += [b["rid"].eq(0), b["bid"].eq(0)]
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


def ip_tcl(target: TargetParams) -> str:
    """Tcl that creates and configures the IP ``U280Top`` instantiates (sourced after the sources are
    read, before synthesis). Property names as in public Vivado designs for the U280/U50 HBM IP
    (xilinx.com:ip:hbm:1.0) and PG174's JTAG-to-AXI master (PROTOCOL 2 = AXI4-Lite)."""
    n = len(STREAMS)
    saxi = " \\\n    ".join(f"CONFIG.USER_SAXI_{i:02d} {{{'true' if i < n else 'false'}}}" for i in range(32))
    clk = f"{target.clock_mhz:g}"
    return f"""# accllm: IP of the {TOP_NAME} top (bitstream/vivado.py)
# HBM: both stacks (8 GB, 32 pseudo-channels of 256 MiB); SAXI_00..{n - 1:02d} carry the kernel's
# masters ({', '.join(STREAMS)}), the rest are disabled; switch off (each port addresses its own PC).
create_ip -name hbm -vendor xilinx.com -library ip -version 1.0 -module_name hbm_0
set_property -dict [list \\
    CONFIG.USER_HBM_DENSITY {{8GB}} \\
    CONFIG.USER_HBM_STACK {{2}} \\
    CONFIG.USER_HBM_REF_CLK_0 {{{SYSCLK_MHZ:g}}} \\
    CONFIG.USER_HBM_REF_CLK_1 {{{SYSCLK_MHZ:g}}} \\
    CONFIG.USER_APB_EN {{false}} \\
    CONFIG.USER_AXI_CLK_FREQ {{{clk}}} \\
    CONFIG.USER_AXI_CLK1_FREQ {{{clk}}} \\
    CONFIG.USER_SWITCH_ENABLE_00 {{FALSE}} \\
    CONFIG.USER_SWITCH_ENABLE_01 {{FALSE}} \\
    CONFIG.USER_XSDB_INTF_EN {{FALSE}} \\
    {saxi} \\
] [get_ips hbm_0]
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


def extra_xdc() -> str:
    lines = ["# accllm: [XDC] = Xilinx AU280 HBM Master XDC rev 2.04 (bitstream/platform.py)",
             f"set_operating_conditions -design_power_budget {POWER_BUDGET_W}"]
    lines += [f"set_property {k} {v} [current_design]" for k, v in BITSTREAM_PROPERTIES]
    return "\n".join(lines)


def plan(params: EngineParams, target: TargetParams | None = None):
    """The Amaranth build plan (``amaranth.build.run.BuildPlan``) of the ``vivado`` target plus
    ``ip.tcl``; nothing is run."""
    target = target or TargetParams()
    top = U280Top(params, target)
    platform = U280Platform()
    p = platform.build(top, name=TOP_NAME, do_build=False,
                       script_after_read="source {ip.tcl}",
                       add_constraints=extra_xdc())
    p.add_file("ip.tcl", ip_tcl(target))
    return p, top
