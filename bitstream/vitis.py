"""The ``vitis`` target: the whole accelerator (``bitstream.kernel.AcceleratorKernel`` around
``hw.accel.AxiAccelerator``) as an RTL kernel for the Alveo U280 XRT shell — Verilog, ``kernel.xml``,
the ``package_xo`` Tcl, the ``v++ --link`` configuration, a build script and ``memory.json`` (how a
host lays the compiled image out over the buffers).

Conventions followed (UG1393, "RTL Kernels"): clock ``ap_clk``, active-low reset ``ap_rst_n``,
``interrupt``, one AXI4-Lite slave ``s_axi_control`` with the ``ap_ctrl_hs`` register map (ap_ctrl at
0x00, GIE 0x04, IER 0x08, ISR 0x0C, arguments from 0x10: one 64-bit buffer pointer per striped
channel, ``bitstream.kernel.accel_args``) and the accelerator's AXI4 masters: ``m_axi_mem<p>`` (channel
``p`` of the striped word space, ``hw.axi.stripe_map``) to HBM pseudo-channel ``p``, ``m_axi_aux`` (the
prefetch and the scales, which read every channel) to all of them (``hbm_map``).

Nothing here was run through Vivado or v++ on this machine (neither is installed); the generated text
is checked by tests/bitstream/test_targets.py and the kernel's behaviour in Amaranth simulation by
tests/bitstream/test_accel_kernel.py.
"""

from __future__ import annotations

from hw.params import AccelParams, EngineParams, TargetParams

from .axi import REG_AP_CTRL, REG_GIE, REG_IER, REG_ISR
from .kernel import AcceleratorKernel, hbm_channels
from .platform import PART

__all__ = ["KERNEL_NAME", "INSTANCE", "XRT_PLATFORM", "hbm_map", "kernel_xml", "package_tcl",
           "link_config", "files"]

KERNEL_NAME = "accllm_kernel"
INSTANCE = "accllm_1"
# The U280's current XRT platform (shell); a user with another one passes PLATFORM=... to build.sh.
XRT_PLATFORM = "xilinx_u280_gen3x16_xdma_1_202211_1"
VENDOR, LIBRARY, VERSION = "accllm", "kernel", "1.0"


def hbm_map(k: AcceleratorKernel) -> dict[str, str]:
    """m_axi port -> the HBM pseudo-channels it reaches (``bitstream.kernel.hbm_channels``), in v++
    ``sp=`` syntax: ``mem<p>`` its own channel ``HBM[p]``, ``aux`` every striped channel."""
    out = {}
    for name, pcs in hbm_channels(k.accel).items():
        out[f"m_axi_{name}"] = f"HBM[{pcs[0]}]" if len(pcs) == 1 else f"HBM[{pcs[0]}:{pcs[-1]}]"
    return out


def _arg_port(name: str) -> str:
    return "m_axi_" + name.removesuffix("_ptr")


def kernel_xml(k: AcceleratorKernel) -> str:
    ports = ['      <port name="s_axi_control" mode="slave" range="0x1000" dataWidth="32" '
             'portType="addressable" base="0x0"/>']
    for n in k.port_names:
        ports.append(f'      <port name="m_axi_{n}" mode="master" range="0xFFFFFFFFFFFFFFFF" '
                     f'dataWidth="{k.dw}" portType="addressable" base="0x0"/>')
    args = []
    for i, (name, (off, bits)) in enumerate(k.control.offsets.items()):
        args.append(f'      <arg name="{name}" addressQualifier="1" id="{i}" port="{_arg_port(name)}" '
                    f'size="0x8" offset="0x{off:03X}" type="void*" hostOffset="0x0" hostSize="0x8"/>')
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


def package_tcl(k: AcceleratorKernel) -> str:
    """Vivado Tcl: package the Verilog as an IP with the kernel's interfaces and register map, then
    ``package_xo``."""
    assoc = "\n".join(f"ipx::associate_bus_interfaces -busif m_axi_{n} -clock ap_clk $core" for n in k.port_names)
    regs = [("CTRL", REG_AP_CTRL, 32, None), ("GIER", REG_GIE, 32, None), ("IP_IER", REG_IER, 32, None),
            ("IP_ISR", REG_ISR, 32, None)]
    for name, (off, bits) in k.control.offsets.items():
        regs.append((name, off, bits, _arg_port(name)))
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
# interfaces (inferred from the port names m_axi_<port>_* and s_axi_control_*) and their clock
ipx::associate_bus_interfaces -busif s_axi_control -clock ap_clk $core
{assoc}
ipx::associate_bus_interfaces -clock ap_clk -reset ap_rst_n $core
# the control register map (the same offsets as kernel.xml and bitstream.kernel.accel_args)
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


def link_config(target: TargetParams, k: AcceleratorKernel) -> str:
    lines = ["# accllm: v++ --link configuration (bitstream/vitis.py): m_axi_mem<p> to HBM pseudo-channel p,",
             "# m_axi_aux (the prefetch and the scales) to every striped channel",
             "[connectivity]", f"nk={KERNEL_NAME}:1:{INSTANCE}"]
    lines += [f"sp={INSTANCE}.{port}:{banks}" for port, banks in hbm_map(k).items()]
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


def files(params: EngineParams, target: TargetParams | None = None,
          accel: AccelParams | None = None) -> tuple[dict[str, str], AcceleratorKernel]:
    """The ``vitis`` target's files (name -> text) and the kernel they were made from."""
    from .hier import hierarchical_verilog, repeated_engine_classes

    target = target or TargetParams()
    accel = accel or AccelParams()
    if accel.mem_ports > target.hbm_channels:
        raise ValueError(f"accelerator.mem_ports = {accel.mem_ports} needs as many HBM pseudo-channels, but "
                         f"target.hbm_channels = {target.hbm_channels}")
    k = AcceleratorKernel(params, accel)
    # the engine's repeated rows as modules written once (bitstream/hier.py): a flat conversion of the
    # u280 accelerator builds 256 copies of each and ran 46 minutes without output
    text = hierarchical_verilog(k, KERNEL_NAME, k.ports, repeated_engine_classes(params))
    return {f"{KERNEL_NAME}.v": text, "kernel.xml": kernel_xml(k), "package_kernel.tcl": package_tcl(k),
            "connectivity.cfg": link_config(target, k), "build.sh": build_sh(),
            "memory.json": memory_json(k)}, k


def memory_json(k: AcceleratorKernel) -> str:
    """What a host needs to place the compiled memory image (``hw.compile``) in the buffers: word ``w``
    is on channel ``p`` at local word ``l`` (``hw.axi.stripe_map(w, ...)`` = (p, p * channel_words +
    l)), i.e. at byte ``l * word_bits / 8`` of the buffer whose address is argument ``mem<p>_ptr``."""
    import json

    A = k.accel
    return json.dumps({
        "word_bits": A.mem_word_bits, "mem_ports": A.mem_ports, "stripe_words": A.mem_stripe_words,
        "channel_bytes": A.mem_channel_bytes, "axi_max_burst": A.axi_max_burst,
        "args": {name: {"offset": off, "bits": bits, "port": _arg_port(name)}
                 for name, (off, bits) in k.control.offsets.items()},
        "hbm": hbm_map(k)}, indent=1) + "\n"
