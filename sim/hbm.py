"""The Alveo U280's HBM as the estimator sees it: 32 pseudo-channels, their theoretical bandwidth, and the
fraction of it that published measurements on the board reach for a given access pattern.

Sources (docs/estimate.md, "HBM model", has the table and the reasoning):

* theoretical: 14.375 GB/s per pseudo-channel, 32 x 14.375 = 460 GB/s, 256 MB per pseudo-channel on the
  U280 (AMD UG1393, "HBM Configuration and Use", 2021.2 and 2023.1);
* long sequential reads on all channels: 425 GB/s measured on a U280 (Wang, Huang, Zhang, Alonso,
  "Shuhai: Benchmarking High Bandwidth Memory on FPGAs", FCCM 2020, abstract) = 92.4 % of 460;
* random addresses within one pseudo-channel, by transaction size: 4.75 / 9.60 / 12.62 / 13.13 /
  13.16 GB/s at 64 / 128 / 256 / 512 / 1024 bytes (AMD Vitis Tutorials XD099 2024.1, "Random Accesses",
  M0 -> PC0);
* what a whole LLM accelerator reached on the board: 65.9 % (FlightLLM, FPGA 2024; ../shared/ANCHORS.md).

The engine's weight and KV streams are long sequential reads (each linear's packed rows, each head's
cache segment), so the estimate uses the sequential figure; the FlightLLM figure is reported beside it
as what an earlier complete design achieved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PSEUDO_CHANNELS = 32
PC_BYTES = 256 * 2**20  # UG1393: 8 GB total, 256 MB pseudo-channels on the U280
PC_THEORETICAL_GBPS = 14.375  # UG1393
THEORETICAL_GBPS = PSEUDO_CHANNELS * PC_THEORETICAL_GBPS  # 460.0
SHUHAI_SEQUENTIAL_GBPS = 425.0  # Shuhai (FCCM 2020), U280, all channels
SEQUENTIAL_EFFICIENCY = SHUHAI_SEQUENTIAL_GBPS / THEORETICAL_GBPS
#: transaction bytes -> GB/s, random addresses inside one pseudo-channel (XD099 2024.1, M0 -> PC0)
RANDOM_PC_GBPS = {64: 4.75379, 128: 9.59893, 256: 12.6164, 512: 13.1338, 1024: 13.155}
FLIGHTLLM_EFFICIENCY = 0.659  # FlightLLM's achieved HBM utilisation on the U280 (ANCHORS.md)

PATTERNS = ("sequential", "random")


class HBMError(ValueError):
    """An access pattern or a footprint the HBM model cannot serve."""


def efficiency(pattern: str = "sequential", transaction_bytes: int | None = None) -> float:
    """Fraction of the theoretical bandwidth reached for ``pattern``.

    sequential: Shuhai's 425/460 for any transaction size (long bursts; the source gives one figure).
    random: XD099's per-PC measurement at ``transaction_bytes``, log-linear between the measured sizes,
    refused outside 64..1024 (no measurement there)."""
    if pattern == "sequential":
        return SEQUENTIAL_EFFICIENCY
    if pattern != "random":
        raise HBMError(f"access pattern {pattern!r}: choose one of {', '.join(PATTERNS)}")
    if transaction_bytes is None:
        raise HBMError("random access needs transaction_bytes (64..1024, the measured range)")
    sizes = sorted(RANDOM_PC_GBPS)
    if not sizes[0] <= transaction_bytes <= sizes[-1]:
        raise HBMError(f"random transactions of {transaction_bytes} bytes: measured only for "
                       f"{sizes[0]}..{sizes[-1]} bytes (XD099)")
    for lo, hi in zip(sizes, sizes[1:]):
        if lo <= transaction_bytes <= hi:
            t = (math.log2(transaction_bytes) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))
            gbps = RANDOM_PC_GBPS[lo] + t * (RANDOM_PC_GBPS[hi] - RANDOM_PC_GBPS[lo])
            return gbps / PC_THEORETICAL_GBPS
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass(frozen=True)
class HBM:
    """The HBM subsystem of the target: ``channels`` pseudo-channels out of 32, ``bandwidth_gbps``
    theoretical for all 32 (``hw.params.TargetParams``)."""

    channels: int = PSEUDO_CHANNELS
    bandwidth_gbps: float = THEORETICAL_GBPS
    pattern: str = "sequential"

    @classmethod
    def from_target(cls, target) -> "HBM":
        return cls(channels=target.hbm_channels, bandwidth_gbps=target.hbm_bandwidth_gbps)

    @property
    def theoretical_bytes_per_s(self) -> float:
        return self.bandwidth_gbps * 1e9 * self.channels / PSEUDO_CHANNELS

    @property
    def efficiency(self) -> float:
        return efficiency(self.pattern)

    @property
    def effective_bytes_per_s(self) -> float:
        return self.theoretical_bytes_per_s * self.efficiency

    @property
    def capacity_bytes(self) -> int:
        return self.channels * PC_BYTES

    def seconds(self, nbytes: float) -> float:
        return nbytes / self.effective_bytes_per_s

    def check_fits(self, nbytes: int, what: str) -> None:
        if nbytes > self.capacity_bytes:
            raise HBMError(f"{what} needs {nbytes / 2**30:.2f} GiB of HBM, the {self.channels} pseudo-channels "
                           f"hold {self.capacity_bytes / 2**30:.2f} GiB: use a smaller batch or context window")


#: the HBM IP's user ports (AMD PG276, "Raw Throughput Evaluation"): one 256-bit AXI3 port per
#: pseudo-channel, clocked at 450 MHz to match the toggle rate of a 900 MHz HBM: 256 x 450 MHz = 14.4 GB/s
AXI_PORT_BITS = 256
AXI_PORT_MHZ = 450.0


def port_words_per_cycle(word_bits: int, clock_mhz: float, pattern: str = "sequential") -> float:
    """Memory words per cycle one read port of the controller receives (``hw.controller_model.MemTiming``)
    when the port is one HBM AXI port (PG276: one per pseudo-channel) reading at ``efficiency(pattern)``
    of the pseudo-channel's theoretical 14.375 GB/s (UG1393, Shuhai), capped at one word per cycle (the
    controller's port takes at most one). 512-bit words at 225 MHz: 13.28 GB/s of 14.4 -> 0.922."""
    if word_bits < 8 or clock_mhz <= 0:
        raise HBMError(f"memory word of {word_bits} bits at {clock_mhz} MHz: not a port")
    got = PC_THEORETICAL_GBPS * 1e9 * efficiency(pattern)
    return min(1.0, got / (word_bits / 8 * clock_mhz * 1e6))
