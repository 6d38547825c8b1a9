"""The interface every special-function unit has towards the controller and the scratchpad.

* ``start`` (in): high for one cycle when the controller hands the unit an instruction. ``instr`` (in,
  ``hw.isa.instr_layout()``) is valid in that cycle and held unchanged until the unit is done.
* ``busy`` (out): high from the cycle after ``start`` until the unit is done; the controller starts the
  next instruction in the first cycle ``busy`` is low. Every spad write is issued in a cycle where
  ``busy`` is high.
* ``rd0``, ``rd1``: two synchronous spad read ports: ``addr`` and ``en`` in cycle c, ``data`` (signed
  64) valid in cycle c + 1 (and held until the next ``en``). ``wr``: one write port, ``addr``, ``data``,
  ``en``: written at the end of the cycle.
* The spad has no other client while a unit runs: no arbitration, no stalls.

The behavioural cycle model ``cycles(instr, params)`` beside each unit returns the number of cycles
``busy`` is high for that instruction (exactly: the unit tests hold it to the RTL's count).
"""

from __future__ import annotations

from amaranth.hdl import signed
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..isa import instr_layout

SPAD_BITS = 64


class SpadRead(wiring.Signature):
    def __init__(self, addr_bits: int):
        super().__init__({"addr": Out(addr_bits), "en": Out(1), "data": In(signed(SPAD_BITS))})


class SpadWrite(wiring.Signature):
    def __init__(self, addr_bits: int):
        super().__init__({"addr": Out(addr_bits), "en": Out(1), "data": Out(signed(SPAD_BITS))})


class UnitSignature(wiring.Signature):
    def __init__(self, addr_bits: int):
        super().__init__({
            "start": In(1), "instr": In(instr_layout()), "busy": Out(1),
            "rd0": Out(SpadRead(addr_bits)), "rd1": Out(SpadRead(addr_bits)), "wr": Out(SpadWrite(addr_bits)),
        })


class Unit(wiring.Component):
    """The base of every special-function unit: the interface above for ``params`` (an ``AccelParams``),
    kept as ``self.params``. Subclasses give ``elaborate`` and a static ``cycles(ins, params)``."""

    def __init__(self, params):
        self.params = params
        super().__init__(UnitSignature(params.spad_addr_bits))
