"""Parameters of FPGA builds and open-source resource estimates."""

from __future__ import annotations

from dataclasses import dataclass

from quant.schema import param


@dataclass
class BuildParams:
    out_dir: str = param("build/bitstream", "where build plans and reports go")
    yosys_family: str = param("xcup", "synth_xilinx -family for estimates (UltraScale+)", choices=["xcup"])
    yosys_uram: bool = param(True, "let Yosys infer URAM288 (synth_xilinx -uram)")
    run_vivado: bool = param(False, "run Vivado if found (otherwise only write the build plan)")
