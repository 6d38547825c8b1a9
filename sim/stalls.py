"""Stall profiles of the engine testbenches: how each stream endpoint of the testbench (the input
sources and the output sink) holds back, selectable by name (``SimParams.stall_profile``,
``accllm simulate engine --stall-profile``).

Every endpoint runs a two-state chain, one step per cycle: ``go`` -> ``stalled`` with probability
``enter``, ``stalled`` -> ``stalled`` with probability ``stay``. ``enter == stay == p`` is a memoryless
stall with probability p per cycle (the old single ``stall_probability``); ``stay`` close to 1 gives
bursts of mean length ``1 / (1 - stay)`` cycles. A stalled source does not raise ``valid`` (a raised
``valid`` is held until the beat is taken); a stalled sink holds ``ready`` low.

Why profiles: with the same probability on every stream the engine is starved by its inputs and its
internal stall (the output bank full) almost never fires; stall bugs then pass. ``hazard`` (output
ready 20 % of cycles, inputs always valid) is the directed profile that keeps the pipeline full
against a slow consumer.
"""

from __future__ import annotations

from dataclasses import dataclass

STREAMS = ("cmd", "act", "weight", "scale", "rq", "out")
INPUTS = STREAMS[:-1]


@dataclass(frozen=True)
class Chain:
    enter: float  # P(stalled next cycle | going now)
    stay: float   # P(stalled next cycle | stalled now)

    @property
    def fraction(self) -> float:
        """Long-run fraction of stalled cycles."""
        return 0.0 if self.enter == 0 else self.enter / (self.enter + 1.0 - self.stay)


NEVER = Chain(0.0, 0.0)


def _b(p: float) -> Chain:
    return Chain(p, p)


#: name -> (description, function of stall_probability p giving a Chain per stream)
PROFILES = {
    "uniform": ("every stream stalls with probability stall_probability per cycle",
                lambda p: {s: _b(p) for s in STREAMS}),
    "none": ("no stream ever stalls", lambda p: {s: NEVER for s in STREAMS}),
    "input-only": ("the input streams stall with stall_probability; the output never",
                   lambda p: {**{s: _b(p) for s in INPUTS}, "out": NEVER}),
    "output-only": ("the output stalls with stall_probability; the inputs never",
                    lambda p: {**{s: NEVER for s in INPUTS}, "out": _b(p)}),
    "hazard": ("directed: output ready on 20 % of cycles, inputs never stalled (stall_probability unused)",
               lambda p: {**{s: NEVER for s in INPUTS}, "out": _b(0.8)}),
    "asymmetric": ("a different memoryless stall per stream: cmd 0.5, act 0.1, weight 0.05, scale 0.6, "
                   "rq 0.4, out 0.7 (stall_probability unused)",
                   lambda p: {"cmd": _b(0.5), "act": _b(0.1), "weight": _b(0.05), "scale": _b(0.6),
                              "rq": _b(0.4), "out": _b(0.7)}),
    "bursty": ("bursts: inputs stall in runs of mean 8 cycles (about 30 % of cycles), the output in runs "
               "of mean 20 (about 70 %) (stall_probability unused)",
               lambda p: {**{s: Chain(0.054, 0.875) for s in INPUTS}, "out": Chain(0.117, 0.95)}),
    "weight-bursts": ("directed: the weight stream stalls before about half of its beats, in runs of mean "
                      "32 cycles, every other stream never (stall_probability unused): the sequencer's op "
                      "queue holds a command's last ops while the pipeline drains and the next command "
                      "is offered",
                      lambda p: {**{s: NEVER for s in STREAMS}, "weight": Chain(0.5, 31 / 32)}),
}
PROFILE_NAMES = tuple(PROFILES)


def profile(name: str, stall_probability: float = 0.25) -> dict[str, Chain]:
    """The Chain of every stream for profile ``name``; an unknown name is refused with the choices."""
    if name not in PROFILES:
        raise ValueError(f"stall profile {name!r}: choose from {', '.join(PROFILE_NAMES)}")
    if not 0.0 <= stall_probability <= 0.95:
        raise ValueError(f"stall_probability {stall_probability} outside 0..0.95")
    return PROFILES[name][1](stall_probability)


def threshold(p: float) -> int:
    """p as a 16-bit threshold: a uniform 16-bit draw below it happens with probability p."""
    return min(65535, int(round(p * 65536)))
