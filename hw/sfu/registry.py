"""Which unit class executes each special-function opcode (``hw.isa.UNIT_OPS``): the accelerator top
instantiates one of each. Every unit class takes ``(params: AccelParams)``, has the interface of
``hw.sfu.base.UnitSignature`` and a static ``cycles(ins, params)`` behavioural cycle model."""

from __future__ import annotations

import importlib

from ..isa import Op

#: opcode -> "module:Class" below hw.sfu
UNITS: dict[Op, str] = {
    Op.RESID_ADD: "resid:ResidAdd",
    Op.EMBED: "embed:Embed",
    Op.RMSNORM: "rmsnorm:RmsNorm",
    Op.SILU_MUL: "silu:SiluMul",
    Op.ARGMAX: "argmax:Argmax",
    Op.QUANT_ACT: "quantize:QuantAct",
    Op.QUANT_KV: "quantize:QuantKV",
    Op.PV_WEIGHTS: "pv:PvWeights",
    Op.PV_OUT: "pv:PvOut",
    Op.RESCALE: "rescale:Rescale",
    Op.LOGITS: "softmax:Logits",
    Op.SOFTMAX_EXP: "softmax:SoftmaxExp",
    Op.ROPE: "rope:Rope",
}


def unit_class(op: Op):
    mod, cls = UNITS[Op(op)].split(":")
    return getattr(importlib.import_module(f"{__package__}.{mod}"), cls)


def available_units() -> dict[Op, type]:
    """The units whose modules exist (all of them once the decoder on the RTL is complete)."""
    out = {}
    for op in UNITS:
        try:
            out[op] = unit_class(op)
        except (ModuleNotFoundError, AttributeError):
            continue
    return out
