"""The Alveo U280 as an Amaranth 0.5 ``XilinxPlatform`` (part xcu280-fsvh2892-2L-e).

Every pin and I/O standard below is from Xilinx's "AU280 HBM - Master XDC", revision 2.04 of 09 Dec 2020
(alveo-u280-xdc.zip, readme v2.04; the file is mirrored publicly, e.g. in github.com/bsc-loca/100gb-ethernet,
``xdc/ethernet_test_alveo280.xdc``), cited per resource as [XDC]. The HBM_CATTRIP rule is from UG1314
(Alveo U280 Data Center Accelerator Card User Guide), quoted in that XDC: the satellite controller
shuts the card down if HBM_CATTRIP floats or goes high; with the HBM IP in the design it must carry
DRAM_0_STAT_CATTRIP | DRAM_1_STAT_CATTRIP, without it, a constant 0.

amaranth-boards has no Alveo board, so the project carries this one.
"""

from __future__ import annotations

from amaranth.build import Attrs, Clock, DiffPairs, Pins, PinsN, Resource
from amaranth.vendor import XilinxPlatform

__all__ = ["U280Platform", "PART", "SYSCLK_MHZ", "BITSTREAM_PROPERTIES", "U280_RESOURCES"]

PART = "xcu280-fsvh2892-2L-e"
SYSCLK_MHZ = 100.0  # [XDC] clock tree: SI53340 fan-out of a 100.000 MHz oscillator to SYSCLK0..3

# [XDC] "Bitstream generation" block (SPIx4 configuration flash, 1.8 V configuration bank)
BITSTREAM_PROPERTIES = [
    ("CONFIG_VOLTAGE", "1.8"),
    ("BITSTREAM.CONFIG.CONFIGFALLBACK", "Enable"),
    ("BITSTREAM.GENERAL.COMPRESS", "TRUE"),
    ("CONFIG_MODE", "SPIx4"),
    ("BITSTREAM.CONFIG.SPI_BUSWIDTH", "4"),
    ("BITSTREAM.CONFIG.CONFIGRATE", "63.8"),
    ("BITSTREAM.CONFIG.EXTMASTERCCLK_EN", "disable"),
    ("BITSTREAM.CONFIG.SPI_FALL_EDGE", "YES"),
    ("BITSTREAM.CONFIG.UNUSEDPIN", "Pullup"),
    ("BITSTREAM.CONFIG.SPI_32BIT_ADDR", "Yes"),
]
POWER_BUDGET_W = 160  # [XDC] set_operating_conditions -design_power_budget 160


class U280Platform(XilinxPlatform):
    """Alveo U280. Resources: ``sysclk`` 0, 1, 3 (100 MHz LVDS), ``cpu_reset`` (SW1, active low),
    ``hbm_cattrip`` (output to the satellite controller, pulled down). The engine's clock is not a pin:
    ``bitstream.vivado.U280Top`` makes it from ``sysclk`` 0 with an MMCM, so there is no default clock
    (``default_clk`` is None) and the top level builds its own ``sync`` domain."""

    device = "xcu280"
    package = "fsvh2892"
    speed = "2L-e"
    default_clk = None
    default_rst = None

    resources = [
        # [XDC] SYS_CLK0_P BJ43 / SYS_CLK0_N BJ44, LVDS, bank 65 (VCC1V2): "System Clock for first DDR4
        # MIG interface and HBM Interfaces". DQS_BIAS TRUE: "No external BIAS on AC coupled LVDS clock
        # inputs to 1.2V bank so this constraint is added to recenter LVDS signal".
        Resource("sysclk", 0, DiffPairs("BJ43", "BJ44", dir="i"), Clock(SYSCLK_MHZ * 1e6),
                 Attrs(IOSTANDARD="LVDS", DQS_BIAS="TRUE")),
        # [XDC] SYS_CLK1_P BH6 / SYS_CLK1_N BJ6, LVDS, bank 69 (VCC1V2), DQS_BIAS TRUE.
        Resource("sysclk", 1, DiffPairs("BH6", "BJ6", dir="i"), Clock(SYSCLK_MHZ * 1e6),
                 Attrs(IOSTANDARD="LVDS", DQS_BIAS="TRUE")),
        # [XDC] SYS_CLK3_P G31 / SYS_CLK3_N F31, LVDS, bank 75 (VCC1V8): "BANK 75 100Mhz Input clock".
        Resource("sysclk", 3, DiffPairs("G31", "F31", dir="i"), Clock(SYSCLK_MHZ * 1e6),
                 Attrs(IOSTANDARD="LVDS")),
        # [XDC] CPU_RESET_FPGA L30, LVCMOS18, bank 75: SW1 push button, "active low reset input".
        Resource("cpu_reset", 0, PinsN("L30", dir="i"), Attrs(IOSTANDARD="LVCMOS18")),
        # [XDC] HBM_CATTRIP D32, LVCMOS18, bank 75, PULLDOWN TRUE (rev 2.04: "Added pulldown constraint
        # to CATTRIP signal incase design does not use it").
        Resource("hbm_cattrip", 0, Pins("D32", dir="o"), Attrs(IOSTANDARD="LVCMOS18", PULLDOWN="TRUE")),
    ]
    connectors = []

    def __init__(self, *, toolchain: str = "Vivado"):
        super().__init__(toolchain=toolchain)

# Device totals of the xcu280 (../shared/ANCHORS.md, "Alveo U280": 1,303,680 LUTs, ~2.6M FFs, 2,016
# BRAM36, 960 URAM288, 9,024 DSP48E2); the FF count is 2 per LUT of the CLB.
U280_RESOURCES = {"lut": 1_303_680, "ff": 2_607_360, "dsp": 9_024, "bram36": 2_016, "uram": 960}
