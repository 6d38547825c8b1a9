"""The accelerator's external-memory ports (``docs/isa.md``, "Memory system").

Memory is word-addressed, words of ``AccelParams.mem_word_bits`` (W) bits. Every port is a pair of
``amaranth.lib.stream`` channels seen from the accelerator (the master):

* read port (``MemReadSignature``): ``req`` (out) carries a job ``addr`` (first word) and ``count``
  (words, >= 1); ``data`` (in) returns the ``count`` words of each accepted job in order, one W-bit
  beat per transfer. Jobs may be issued before the previous job's data has arrived (any number
  outstanding, the memory throttles with ``req.ready``); data of successive jobs is not interleaved.
* write port (``MemWriteSignature``): ``req`` (out) carries one word: ``addr``, ``data`` and byte
  strobes ``strb`` (bit i: bits [8i, 8i+8) of ``data`` are written, the other bytes of the word keep
  their value); ``resp`` (in) returns one beat per accepted write, in order, once that write is done
  (``resp.payload`` 0 = OKAY). The controller counts outstanding writes and finishes an instruction
  only when every write it issued has been answered, so a later read never overtakes a write.

An AXI4 master is a thin layer on either: a read job is split into INCR bursts (``bitstream/axi.py``
``AxiReader``: AR/R), a write is one beat of an AW/W pair (or a burst of consecutive words) and B is
``resp``. ``BeatGather`` turns W-bit words into a payload of any width (``ceil(width / W)`` words per
payload, bit 0 of the payload at bit 0 of the first word, as ``bitstream/axi.py`` lays buffers out).
"""

from __future__ import annotations

from amaranth.hdl import Module, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["ADDR_BITS", "COUNT_BITS", "read_request_layout", "write_request_layout", "MemReadSignature",
           "MemWriteSignature", "BeatGather", "words_for"]

ADDR_BITS = 32
COUNT_BITS = 32
RESP_BITS = 2


def words_for(bits: int, word_bits: int) -> int:
    """Memory words one payload of ``bits`` bits takes."""
    return -(-bits // word_bits)


def read_request_layout() -> data.StructLayout:
    return data.StructLayout({"addr": ADDR_BITS, "count": COUNT_BITS})


def write_request_layout(word_bits: int) -> data.StructLayout:
    return data.StructLayout({"addr": ADDR_BITS, "data": word_bits, "strb": word_bits // 8})


class MemReadSignature(wiring.Signature):
    """One read port, from the master's side (``req`` out, ``data`` in)."""

    def __init__(self, word_bits: int):
        self.word_bits = word_bits
        super().__init__({"req": Out(stream.Signature(read_request_layout())),
                          "data": In(stream.Signature(word_bits))})


class MemWriteSignature(wiring.Signature):
    """One write port, from the master's side (``req`` out, ``resp`` in)."""

    def __init__(self, word_bits: int):
        self.word_bits = word_bits
        super().__init__({"req": Out(stream.Signature(write_request_layout(word_bits))),
                          "resp": In(stream.Signature(RESP_BITS))})


class BeatGather(wiring.Component):
    """``words`` (W-bit stream in) -> ``beats`` (``width``-bit stream out), ``ceil(width / W)`` words
    per beat, the first word in the low bits. With one word per beat it is a wire (no added cycle)."""

    def __init__(self, word_bits: int, width: int):
        self.word_bits, self.width = word_bits, width
        self.n = words_for(width, word_bits)
        super().__init__({"words": In(stream.Signature(word_bits)), "beats": Out(stream.Signature(width))})

    def elaborate(self, platform):
        m = Module()
        W, n = self.word_bits, self.n
        if n == 1:
            m.d.comb += [self.beats.valid.eq(self.words.valid), self.words.ready.eq(self.beats.ready),
                         self.beats.payload.eq(self.words.payload[:self.width])]
            return m
        buf = Signal(W * n)
        k = Signal(range(n + 1))
        full = Signal()
        m.d.comb += [self.beats.valid.eq(full), self.beats.payload.eq(buf[:self.width]),
                     self.words.ready.eq(~full)]
        with m.If(self.words.valid & ~full):
            m.d.sync += [buf.eq((buf >> W) | (self.words.payload << (W * (n - 1)))), k.eq(k + 1)]
            with m.If(k == n - 1):
                m.d.sync += [full.eq(1), k.eq(0)]
        with m.If(self.beats.valid & self.beats.ready):
            m.d.sync += full.eq(0)
        return m
