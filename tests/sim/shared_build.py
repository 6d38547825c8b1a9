"""The one accelerator every whole-accelerator Verilator test runs on: the ci-small engine and
accelerator sections with every unit. A Verilator build of the accelerator costs minutes (it is cached
in build/accel by content), so the directed programs, the units through the top, the cycle model and
the model proof share this design instead of each building its own variant."""

from accllm.config import load_hw

_CFG = load_hw("ci-small")
ENGINE = _CFG.engine
ACCEL = _CFG.accelerator
UNITS = None  # every unit of hw/sfu/registry.py
