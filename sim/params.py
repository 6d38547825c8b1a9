"""Parameters of simulation runs (co-simulation and, later, the performance model)."""

from __future__ import annotations

from dataclasses import dataclass

from quant.schema import param

from .stalls import PROFILE_NAMES


@dataclass
class SimParams:
    simulator: str = param("amaranth", "which simulator runs the engine",
                           choices=["amaranth", "verilator", "icarus"])
    cases: int = param(50, "random cases per run", min=1, max=1_000_000)
    seed: int = param(0, "random seed for cases and stalls", min=0)
    stall_probability: float = param(0.25, "chance a stream endpoint stalls on a cycle", min=0.0, max=0.95)
    stall_profile: str = param("uniform", "how each stream stalls (sim/stalls.py): uniform, none, input-only, "
                               "output-only, hazard, asymmetric, bursty", choices=list(PROFILE_NAMES))
    watchdog_cycles: int = param(2000, "a run fails, naming the cycle and the stopped stream, after this many "
                                 "cycles without a beat on any stream", min=50, max=10_000_000)
    waves: bool = param(False, "write a waveform (also WAVES=1 in the environment)")
    build_dir: str = param("build/sim", "each run gets its own folder below this")
