"""The ``vitis`` target: the accelerator kernel (``bitstream.kernel.AccelKernel``) as an RTL kernel for
the Alveo U280 XRT shell — Verilog, ``kernel.xml``, the ``package_xo`` Tcl, the ``v++ --link``
configuration and a build script.

Conventions followed (UG1393, "RTL Kernels"): clock ``ap_clk``, active-low reset ``ap_rst_n``,
``interrupt``, one AXI4-Lite slave ``s_axi_control`` with the ``ap_ctrl_hs`` register map (ap_ctrl at
0x00, GIE 0x04, IER 0x08, ISR 0x0C, arguments from 0x10: ``bitstream.kernel.OFFSETS``) and one AXI4
master per buffer argument. Each master goes to its own HBM pseudo-channel (``HBM_MAP``), so the five
streams never contend for one channel.

Nothing here was run through Vivado or v++ on this machine (neither is installed); the generated text
is checked by tests/bitstream/test_targets.py.
"""

from __future__ import annotations

from hw.params import EngineParams, TargetParams

from .axi import REG_AP_CTRL, REG_GIE, REG_IER, REG_ISR
from .kernel import IN_STREAMS, OFFSETS, STREAMS, AccelKernel
from .platform import PART

__all__ = ["KERNEL_NAME", "INSTANCE", "XRT_PLATFORM", "HBM_MAP", "kernel_xml", "package_tcl",
           "link_config", "files"]

KERNEL_NAME = "accllm_kernel"
INSTANCE = "accllm_1"
# The U280's current XRT platform (shell); a user with another one passes PLATFORM=... to build.sh.
XRT_PLATFORM = "xilinx_u280_gen3x16_xdma_1_202211_1"
HBM_MAP = {s: i for i, s in enumerate(STREAMS)}  # stream -> HBM pseudo-channel
VENDOR, LIBRARY, VERSION = "accllm", "kernel", "1.0"


def kernel_xml(k: AccelKernel) -> str:
    ports = ['      <port name="s_axi_control" mode="slave" range="0x1000" dataWidth="32" '
             'portType="addressable" base="0x0"/>']
    for s in STREAMS:
        ports.append(f'      <port name="m_axi_{s}" mode="master" range="0xFFFFFFFFFFFFFFFF" '
                     f'dataWidth="{k.dw}" portType="addressable" base="0x0"/>')
    args = []
    for i, (name, (off, bits)) in enumerate(OFFSETS.items()):
        s, what = name.rsplit("_", 1)
        if what == "ptr":
            args.append(f'      <arg name="{name}" addressQualifier="1" id="{i}" port="m_axi_{s}" '
                        f'size="0x8" offset="0x{off:03X}" type="void*" hostOffset="0x0" hostSize="0x8"/>')
        else:
            args.append(f'      <arg name="{name}" addressQualifier="0" id="{i}" port="s_axi_control" '
                        f'size="0x4" offset="0x{off:03X}" type="uint" hostOffset="0x0" hostSize="0x4"/>')
    return "\n".join([
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<root versionMajor="1" versionMinor="6">',
        f'  <kernel name="{KERNEL_NAME}" language="ip_c" vlnv="{VENDOR}:{LIBRARY}:{KERNEL_NAME}:{VERSION}" '
        f'attributes="" preferredWorkGroupSizeMultiple="0" workGroupSize="1" interrupt="true" '
        f'hwControlProtocol="ap_ctrl_hs">',
        "    <ports>", *ports, "    </ports>",
        "    <args>", *args, "    </args>",
        "  </kernel>",
        "</root>", ""])


def package_tcl() -> str:
    """Vivado Tcl: package the Verilog as an IP with the kernel's interfaces and register map, then
    ``package_xo``."""
    assoc = "\n".join(f"ipx::associate_bus_interfaces -busif m_axi_{s} -clock ap_clk $core" for s in STREAMS)
    regs = [("CTRL", REG_AP_CTRL, 32, None), ("GIER", REG_GIE, 32, None), ("IP_IER", REG_IER, 32, None),
            ("IP_ISR", REG_ISR, 32, None)]
    for name, (off, bits) in OFFSETS.items():
        s, what = name.rsplit("_", 1)
        regs.append((name, off, bits, f"m_axi_{s}" if what == "ptr" else None))
    reg_lines = []
    for name, off, bits, busif in regs:
        reg_lines.append(f"set reg [ipx::add_register {name} $block]")
        reg_lines.append(f"set_property address_offset 0x{off:03X} $reg")
        reg_lines.append(f"set_property size {bits} $reg")
        if busif:
            reg_lines.append(f"set_property value {busif} [ipx::add_register_parameter ASSOCIATED_BUSIF $reg]")
    regs_tcl = "\n".join(reg_lines)
    return f"""# accllm: package {KERNEL_NAME} as a Vitis RTL kernel (bitstream/vitis.py; UG1393 "RTL Kernels")
# usage: vivado -mode batch -source package_kernel.tcl
set part {PART}
create_project -force kernel_pack ./kernel_pack -part $part
add_files -norecurse {KERNEL_NAME}.v
set_property top {KERNEL_NAME} [current_fileset]
update_compile_order -fileset sources_1
ipx::package_project -root_dir ./ip -vendor {VENDOR} -library {LIBRARY} -taxonomy /KernelIP -import_files -set_current false
ipx::unload_core ./ip/component.xml
ipx::edit_ip_in_project -upgrade true -name tmp_edit_project -directory ./ip ./ip/component.xml
set core [ipx::current_core]
set_property core_revision 1 $core
set_property sdx_kernel true $core
set_property sdx_kernel_type rtl $core
set_property vitis_drc {{ctrl_protocol ap_ctrl_hs}} $core
set_property ipi_drc {{ignore_freq_hz true}} $core
# interfaces (inferred from the port names m_axi_<stream>_* and s_axi_control_*) and their clock
ipx::associate_bus_interfaces -busif s_axi_control -clock ap_clk $core
{assoc}
ipx::associate_bus_interfaces -clock ap_clk -reset ap_rst_n $core
# the control register map (the same offsets as kernel.xml and bitstream.kernel.OFFSETS)
set mm [ipx::add_memory_map -quiet s_axi_control $core]
set_property slave_memory_map_ref s_axi_control [ipx::get_bus_interfaces s_axi_control -of_objects $core]
set block [ipx::add_address_block -quiet reg0 $mm]
set_property range 0x1000 $block
{regs_tcl}
ipx::create_xgui_files $core
ipx::update_checksums $core
ipx::check_integrity -kernel $core
ipx::save_core $core
close_project -delete
package_xo -force -xo_path ./{KERNEL_NAME}.xo -kernel_name {KERNEL_NAME} -ip_directory ./ip -kernel_xml ./kernel.xml
"""


def link_config(target: TargetParams) -> str:
    lines = ["# accllm: v++ --link configuration (bitstream/vitis.py): one HBM pseudo-channel per master",
             "[connectivity]", f"nk={KERNEL_NAME}:1:{INSTANCE}"]
    lines += [f"sp={INSTANCE}.m_axi_{s}:HBM[{pc}]" for s, pc in HBM_MAP.items()]
    lines += ["", "[clock]", f"freqHz={int(round(target.clock_mhz * 1e6))}:{INSTANCE}.ap_clk", ""]
    return "\n".join(lines)


def build_sh() -> str:
    return f"""#!/bin/sh
# accllm: package the RTL kernel and link it into an xclbin (needs Vivado and v++ on PATH; README)
set -e
cd "$(dirname "$0")"
: ${{PLATFORM:={XRT_PLATFORM}}}
vivado -mode batch -log package_kernel.log -source package_kernel.tcl
v++ --link --target hw --platform "$PLATFORM" --config connectivity.cfg -o {KERNEL_NAME}.xclbin {KERNEL_NAME}.xo
"""


def files(params: EngineParams, target: TargetParams | None = None) -> tuple[dict[str, str], AccelKernel]:
    """The ``vitis`` target's files (name -> text) and the kernel they were made from."""
    from amaranth.back import verilog

    target = target or TargetParams()
    if len(STREAMS) > target.hbm_channels:
        raise ValueError(f"target.hbm_channels = {target.hbm_channels}: the kernel needs one pseudo-channel "
                         f"per stream, {len(STREAMS)}")
    k = AccelKernel(params)
    text = verilog.convert(k, name=KERNEL_NAME, ports=k.ports)
    return {f"{KERNEL_NAME}.v": text, "kernel.xml": kernel_xml(k), "package_kernel.tcl": package_tcl(),
            "connectivity.cfg": link_config(target), "build.sh": build_sh(),
            "streams.json": _streams_json(k)}, k


def _streams_json(k: AccelKernel) -> str:
    import json

    return json.dumps({"data_width": k.dw, "streams": {
        s: {"direction": "in" if s in IN_STREAMS else "out", "payload_bits": k.widths[s],
            "words_per_beat": k.words[s], "hbm_pc": HBM_MAP[s],
            "ptr_offset": OFFSETS[f"{s}_ptr"][0], "beats_offset": OFFSETS[f"{s}_beats"][0]}
        for s in STREAMS}}, indent=1) + "\n"
