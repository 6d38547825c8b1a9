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

from amaranth.hdl import Cat, Module, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["ADDR_BITS", "COUNT_BITS", "read_request_layout", "write_request_layout", "MemReadSignature",
           "MemWriteSignature", "BeatGather", "words_for", "BEAT_BITS", "wide_request_layout", "wide_data_layout",
           "MemWideReadSignature", "wide_transfers", "WideBeatGather"]

ADDR_BITS = 32
COUNT_BITS = 32
RESP_BITS = 2
BEAT_BITS = 16


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


def wide_request_layout() -> data.StructLayout:
    """A wide read job: ``count`` words from word ``addr``, delivered in transfers that never cross a
    multiple of ``beat`` words counted from the job's first word (``wide_transfers``)."""
    return data.StructLayout({"addr": ADDR_BITS, "count": COUNT_BITS, "beat": BEAT_BITS})


def wide_data_layout(word_bits: int, lanes: int) -> data.StructLayout:
    """One transfer of a wide read: ``n`` (1..lanes) words in job order, the first in ``words``' low bits."""
    return data.StructLayout({"words": word_bits * lanes, "n": range(lanes + 1)})


class MemWideReadSignature(wiring.Signature):
    """A wide read port, from the master's side: ``req`` (out, ``wide_request_layout``), ``data`` (in,
    ``wide_data_layout``): each accepted job's words in order, up to ``lanes`` per transfer, in the
    transfers ``wide_transfers`` lists (a transfer ends at a beat boundary or the job's end). Jobs may be
    issued before earlier data has arrived; the memory throttles with ``req.ready``."""

    def __init__(self, word_bits: int, lanes: int):
        self.word_bits, self.lanes = word_bits, lanes
        super().__init__({"req": Out(stream.Signature(wide_request_layout())),
                          "data": In(stream.Signature(wide_data_layout(word_bits, lanes)))})


def wide_transfers(count: int, lanes: int, beat: int) -> list[int]:
    """The behavioural model of a wide read job's transfers: the words of each, in order. Every
    transfer takes ``min(lanes, words left in the beat, words left in the job)`` words."""
    if count < 1 or lanes < 1 or beat < 1:
        raise ValueError(f"wide read of {count} words, {lanes} lanes, beat {beat}: each must be >= 1")
    out, j = [], 0
    while j < count:
        n = min(lanes, beat - j % beat, count - j)
        out.append(n)
        j += n
    return out


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
            # the new word enters at the top, the older ones move down one word: a Cat, not
            # ``payload << (W * (n - 1))``, whose shift by a Python int Amaranth widens by 2**16 - 1 bits
            # for a shift amount of 16 bits (a cell over its 65,536-bit limit at the u280's 89 words)
            m.d.sync += [buf.eq(Cat(buf[W:], self.words.payload)), k.eq(k + 1)]
            with m.If(k == n - 1):
                m.d.sync += [full.eq(1), k.eq(0)]
        with m.If(self.beats.valid & self.beats.ready):
            m.d.sync += full.eq(0)
        return m


class WideBeatGather(wiring.Component):
    """``words`` (transfers of a ``MemWideReadSignature`` whose job's ``beat`` is this beat's word
    count) -> ``beats`` (``width``-bit stream out): ``ceil(ceil(width / W) / lanes)`` transfers per beat,
    transfer t's words at words ``t * lanes ..`` of the beat (every transfer but a beat's last is full,
    ``wide_transfers``). One beat buffered: a beat's last transfer makes it valid the next cycle; while it
    waits no transfer is taken, except in the cycle it leaves (the next beat's first transfer goes into
    slot 0 as the full beat is read out). With one transfer per beat it is a wire."""

    def __init__(self, word_bits: int, lanes: int, width: int):
        self.word_bits, self.lanes, self.width = word_bits, lanes, width
        self.n = words_for(width, word_bits)
        self.transfers = -(-self.n // lanes)
        super().__init__({"words": In(stream.Signature(wide_data_layout(word_bits, lanes))),
                          "beats": Out(stream.Signature(width))})

    def elaborate(self, platform):
        m = Module()
        W, L, X = self.word_bits, self.lanes, self.transfers
        src = self.words.payload.words
        if X == 1:
            m.d.comb += [self.beats.valid.eq(self.words.valid), self.words.ready.eq(self.beats.ready),
                         self.beats.payload.eq(src[:self.width])]
            return m
        slots = [Signal(W * L, name=f"slot{t}") for t in range(X)]
        t = Signal(range(X + 1))
        full = Signal()
        # a transfer is taken in the cycle the full beat leaves too (unlike BeatGather: no bubble)
        m.d.comb += [self.beats.valid.eq(full), self.beats.payload.eq(Cat(*slots)[:self.width]),
                     self.words.ready.eq(~full | self.beats.ready)]
        with m.If(self.words.valid & self.words.ready):
            with m.Switch(t):
                for i in range(X):
                    with m.Case(i):
                        m.d.sync += slots[i].eq(src)
            m.d.sync += t.eq(t + 1)
            with m.If(t == X - 1):
                m.d.sync += [full.eq(1), t.eq(0)]
        with m.If(self.beats.valid & self.beats.ready):
            m.d.sync += full.eq(0)
        return m
