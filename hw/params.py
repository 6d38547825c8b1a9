"""The engine's parameters: the single source of truth read by the RTL, the performance model, the
testbenches and (later) the compiler. Units are in the key names. The integer numerics
(``quant.reference``) do not depend on any of these: they only decide how fast it is computed."""

from __future__ import annotations

from dataclasses import dataclass

from quant.formats import linear_acc_bound, qk_acc_bound, pv_acc_bound, signed_bits_for
from quant.schema import param


@dataclass
class EngineParams:
    pe_rows: int = param(4, "output rows computed in parallel (one dot product each)", min=1, max=4096)
    pe_lanes: int = param(8, "multipliers per row: inputs (dense) or kept weights (2:4) per cycle",
                          min=2, max=1024)
    mm_tokens: int = param(2, "prefill: tokens that share each fetched weight (matrix-matrix mode)",
                           min=1, max=64)
    acc_bits: int = param(32, "accumulator width in bits", min=8, max=64)
    max_reduction_len: int = param(4096, "longest dot product (inputs, head_dim or keys) supported",
                                   min=4, max=1 << 20)
    max_head_dim: int = param(128, "largest attention head dimension", min=4, max=1024)
    max_keys: int = param(4096, "largest attention span (sinks + window) for P·V", min=1, max=1 << 20)
    multiplier_style: str = param("lut", "how 8x2/8x4-bit products are built (docs/arithmetic.md)",
                                  choices=["lut", "dsp"])
    act_buffer_bytes: int = param(8192, "on-chip activation buffer (int8 inputs of one operation)",
                                  min=64, max=1 << 26)
    requantizer: bool = param(True, "build the per-row requantizers and the rq stream (hw.engine_parts."
                              "Requantizer); false: the lean engine, whose commands must not requantize "
                              "(the accelerator's controller never asks: RESCALE does it, docs/engine.md)")

    @property
    def macs_per_cycle(self) -> int:
        return self.pe_rows * self.pe_lanes

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.pe_lanes % 2:
            out.append(("pe_lanes", f"must be even (2:4 mode feeds two kept weights per group of "
                                    f"four), got {self.pe_lanes}"))
        if self.max_reduction_len % self.pe_lanes:
            out.append(("max_reduction_len", f"{self.max_reduction_len} is not a multiple of "
                                             f"pe_lanes = {self.pe_lanes}"))
        for key, bound, what in (
            ("max_reduction_len", linear_acc_bound(self.max_reduction_len), "W2xA8 linear"),
            ("max_head_dim", qk_acc_bound(self.max_head_dim), "Q.K^T"),
            ("max_keys", pv_acc_bound(self.max_keys), "P.V"),
        ):
            need = signed_bits_for(bound)
            if need > self.acc_bits:
                out.append(("acc_bits", f"{self.acc_bits} bits cannot hold the {what} bound {bound} "
                                        f"for {key} = {getattr(self, key)}: need {need} bits "
                                        f"(docs/numerics.md, accumulators)"))
        longest = max(self.max_reduction_len, self.max_keys)
        if self.act_buffer_bytes < longest * self.mm_tokens:
            out.append(("act_buffer_bytes", f"{self.act_buffer_bytes} bytes cannot hold mm_tokens x "
                        f"max(max_reduction_len, max_keys) = {self.mm_tokens * longest} int8 inputs"))
        if self.act_buffer_bytes % (2 * self.pe_lanes):
            out.append(("act_buffer_bytes", f"{self.act_buffer_bytes} is not a multiple of 2 * pe_lanes "
                                            f"= {2 * self.pe_lanes} (two banks of pe_lanes bytes)"))
        if self.max_keys % self.pe_lanes:
            out.append(("max_keys", f"{self.max_keys} is not a multiple of pe_lanes = {self.pe_lanes}"))
        if self.multiplier_style not in ("lut", "dsp"):
            out.append(("multiplier_style", f"{self.multiplier_style!r}: the engine builds 'lut' "
                        f"(hw/engine_parts.py) or 'dsp' (hw/engine_dsp.py; docs/arithmetic.md)"))
        if self.multiplier_style == "dsp" and self.pe_lanes % 4:
            out.append(("pe_lanes", f"multiplier_style 'dsp' runs a 2:4 beat as two halves of pe_lanes / 4 "
                                    f"whole groups of four (hw/engine_dsp.py): pe_lanes must be a multiple "
                                    f"of 4, got {self.pe_lanes}"))
        if self.max_head_dim > self.max_reduction_len:
            out.append(("max_head_dim", f"{self.max_head_dim} exceeds max_reduction_len "
                                        f"= {self.max_reduction_len}"))
        return out


@dataclass
class TargetParams:
    part: str = param("xcu280-fsvh2892-2L-e", "FPGA part", choices=["xcu280-fsvh2892-2L-e"])
    clock_mhz: float = param(225.0, "engine clock", min=1.0, max=1000.0)
    hbm_channels: int = param(32, "HBM pseudo-channels used", min=1, max=32)
    hbm_bandwidth_gbps: float = param(460.0, "theoretical HBM bandwidth in GB/s (1e9 bytes/s)",
                                      min=1.0, max=10000.0)
    hbm_efficiency: float = param(0.659, "fraction of HBM bandwidth reached (FlightLLM measured "
                                  "65.9% on U280, ../shared/ANCHORS.md)", min=0.01, max=1.0)

    @property
    def hbm_bytes_per_cycle(self) -> float:
        return self.hbm_bandwidth_gbps * 1e9 / (self.clock_mhz * 1e6)


@dataclass
class AccelParams:
    """The accelerator around the engine (``hw/isa.py``, ``docs/isa.md``): the on-chip scratchpad every
    special-function unit reads and writes, the external-memory word and the program limits. The
    compiler, the controller RTL, the machine model (``hw/machine.py``) and the testbenches read these."""

    mem_word_bits: int = param(256, "external memory word (one AXI data beat towards HBM)",
                               choices=[64, 128, 256, 512])
    spad_words: int = param(16384, "on-chip scratchpad: 64-bit signed elements every unit reads and writes",
                            min=256, max=1 << 24)
    max_program_instrs: int = param(1 << 22, "longest program the controller addresses", min=16, max=1 << 30)
    # the AXI4 top (hw.accel.AxiAccelerator, hw/axi.py; docs/isa.md "Memory system"): the U280 has 32 HBM
    # pseudo-channels of 256 MiB, each an AXI port 256 bits wide at 450 MHz or 512 bits at half that
    # (UG1393 "HBM", PG276 "AXI port details"): mem_ports of them carry the striped data
    mem_ports: int = param(1, "AXI4 master ports the word address space is striped over (HBM pseudo-channels; "
                           "one more port reads the prefetch and scales)", choices=[1, 2, 4, 8, 16, 32])
    mem_stripe_words: int = param(16, "consecutive words on one port before the next port's stripe",
                                  choices=[1, 2, 4, 8, 16, 32, 64, 128])
    mem_channel_bytes: int = param(1 << 28, "bytes of one port's channel in the flat AXI address space "
                                   "(an HBM pseudo-channel: 256 MiB, PG276)", min=1 << 12, max=1 << 33)
    axi_max_burst: int = param(256, "longest AXI4 INCR burst in beats (256: AXI4; 16 for the HBM "
                               "controller's AXI3 ports, PG276)", min=1, max=256)
    axi_outstanding: int = param(8, "AXI bursts in flight per port and direction", min=1, max=64)
    # the engine's weight stream (hw.controller.EngineStreamer, docs/isa.md "Memory system"): 1 = on read
    # port 0, one word per cycle; L > 1 = its own wide read port (hw.memory.MemWideReadSignature, up to L
    # words per cycle in order), on the AXI top one word from each of mem_ports = L ports per cycle
    # (hw.axi.WideReadStriper: needs mem_stripe_words 1, so consecutive words lie on consecutive ports)
    weight_lanes: int = param(1, "memory words per cycle the engine's weight stream reads (1: read port 0; "
                              "L > 1: a wide read port, on the AXI top one word from each of L = mem_ports ports)",
                              choices=[1, 2, 4, 8, 16, 32])

    @property
    def mem_channel_words(self) -> int:
        return self.mem_channel_bytes // (self.mem_word_bits // 8)

    @property
    def spad_addr_bits(self) -> int:
        return max(1, (self.spad_words - 1).bit_length())

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.spad_words & (self.spad_words - 1):
            out.append(("spad_words", f"{self.spad_words} is not a power of two"))
        if self.mem_channel_bytes & (self.mem_channel_bytes - 1):
            out.append(("mem_channel_bytes", f"{self.mem_channel_bytes} is not a power of two"))
        elif self.mem_channel_bytes < self.mem_stripe_words * self.mem_word_bits // 8:
            out.append(("mem_channel_bytes", f"{self.mem_channel_bytes} is smaller than one stripe "
                        f"(mem_stripe_words x mem_word_bits / 8 = {self.mem_stripe_words * self.mem_word_bits // 8})"))
        if self.weight_lanes > 1 and self.mem_ports > 1:
            if self.weight_lanes != self.mem_ports:
                out.append(("weight_lanes", f"{self.weight_lanes} with mem_ports = {self.mem_ports}: the wide "
                            f"weight read takes one word from each port per cycle, so set weight_lanes to "
                            f"mem_ports (or 1)"))
            if self.mem_stripe_words != 1:
                out.append(("mem_stripe_words", f"{self.mem_stripe_words} with weight_lanes = {self.weight_lanes}: "
                            f"the wide weight read needs consecutive words on consecutive ports "
                            f"(mem_stripe_words 1)"))
        return out
