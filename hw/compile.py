"""The compiler: an integer model (``quant.golden.Spec``) and an engine configuration -> one program and
one memory image that generate tokens greedily on the accelerator (``hw/isa.py``), checked before they
are returned. ``docs/isa.md`` describes the image, the KV cache layout and how a step is compiled.

* One instruction stream: MARK, the prefill (the prompt in chunks of up to ``engine.mm_tokens``
  tokens), MARK, then one decode step per further token (each followed by a MARK), HALT. Every step is
  compiled for its positions (static key counts, slots, RoPE positions).
* Token ids come from memory: the prompt from the ``prompt`` region, each later step's id from the
  ``tokens`` word the previous step's ARGMAX result was STOREd to; the embedding row and its (mult,
  shift) pair are LOADed indexed by that id.
* Linears: QUANT_ACT -> ENGINE (DENSE or SPARSE; the W4 lm_head is DENSE with 4-bit codes) -> RESCALE
  with the rows' multipliers LOADed. Attention one token at a time: the token's K and V are quantized
  and SCATTERed into the cache before its query reads the cache; QK as one or two ENGINE runs (sink
  slots with the query rotated at min(n, S+W-1), ring slots at n), LOGITS, SOFTMAX_EXP, PV_WEIGHTS,
  ENGINE PV, PV_OUT.
* The KV cache (per layer and KV head) is laid out as the engine's beats: K as QK weight beats (rows =
  slots) with one scale beat per tile (s = 1, m = -zero), V as PV weight beats (rows = channels, lanes =
  slots, zero-points in the ``zero`` lanes) with a tile stride, ranges as 32-bit elements per slot.
  Capacity: sinks + window (Λ) or the program's whole length (full attention).

Traced tensors (``Compiled.trace``): name -> (first word, golden shape, bits, signed). Each row of the
tensor (its last axis; a 1-D tensor's every element) starts at a word boundary, rows consecutive;
``read_trace`` undoes it. The prefill traces its layers' outputs (and with ``trace="all"`` every
per-token tensor it stores); the lm_head runs on the prompt's last token only, so the prefill's
``final_norm``, ``logits`` and ``next_token`` (golden shape (T, ...)) are not traced: the first token
is checked by ``read_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from quant import formats as F
from quant import golden as G
from quant import reference as R

from . import beats as B
from .engine import Mode, TILE_BITS, layouts
from .isa import (FLAG_INDEXED, FLAG_NEG, FLAG_SIGNED, FLAG_W4, INSTR_BITS, ISAError, Instr, Op, encode, encode_program)
from .params import AccelParams, EngineParams

__all__ = ["CompileError", "Compiled", "compile_generation", "compile_decode_step", "compile_prefill_chunk",
           "shape_spec", "check_program", "accesses", "lower_linear", "weight_beat_fields", "scale_beat_fields",
           "TRACE_MODES"]

TRACE_MODES = ("none", "layers", "all")
NO_CLAMP = (1 << 32) - 1  # ROPE's h when positions are not clamped


class CompileError(ValueError):
    """A model, configuration, prompt or program the accelerator cannot run; ``where`` names the place
    ("layer 3 mlp.down_proj", "prompt", "spad", "engine", ...)."""

    def __init__(self, where: str, message: str):
        self.where = where
        super().__init__(f"{where}: {message}")


@dataclass
class Compiled:
    engine: EngineParams
    accel: AccelParams
    program: list[Instr]  # also encoded into image at word 0
    image: np.ndarray | None  # uint8, the whole initial memory, length a multiple of mem_word_bits/8;
    #                           None for a shape-only compile (``weights=False``: no data, only the sizes)
    regions: dict[str, tuple[int, int]]  # name -> (first word, words)
    trace: dict[str, tuple[int, tuple, int, bool]]  # golden-style name -> (word, shape, bits, signed)
    marks: list[tuple[str, int]]  # ("start", word), ("prefill", word), ("step1", word), ...
    spad: dict[str, tuple[int, int]] = field(default_factory=dict)  # spad buffer -> (first element, size)
    steps: list[tuple[str, int, int]] = field(default_factory=list)  # (step, first instr, instr count)
    new_tokens: int = 0

    @property
    def word_bytes(self) -> int:
        return self.accel.mem_word_bits // 8

    def _elements(self, mem, word: int, n: int, bits: int, signed: bool) -> np.ndarray:
        wb = self.word_bytes
        raw = np.asarray(mem, np.uint8)[word * wb: word * wb + -(-n * bits // 8)]
        if bits == 4:
            nib = np.stack([raw & 15, raw >> 4], axis=1).reshape(-1)[:n].astype(np.int64)
            return np.where(nib >= 8, nib - 16, nib) if signed else nib
        return raw.view(f"<{'i' if signed else 'u'}{bits // 8}").astype(np.int64)

    def read_tokens(self, mem) -> list[int]:
        lo, _ = self.regions["tokens"]
        return [int(self._elements(mem, lo + i, 1, 32, False)[0]) for i in range(self.new_tokens)]

    def read_trace(self, mem) -> dict[str, np.ndarray]:
        out = {}
        W = self.accel.mem_word_bits
        for name, (word, shape, bits, signed) in self.trace.items():
            rows, x = _rows(shape)
            rw = -(-x * bits // W)
            arr = np.stack([self._elements(mem, word + r * rw, x, bits, signed) for r in range(rows)]) \
                if rows else np.zeros((0, x), np.int64)
            out[name] = arr.reshape(shape)
        return out

    def read_cycles(self, mem) -> dict:
        vals = {label: int(self._elements(mem, w, 1, 64, False)[0]) for label, w in self.marks}
        labels = [lb for lb, _ in self.marks]
        per = [vals[labels[i]] - vals[labels[i - 1]] for i in range(2, len(labels))]
        return {"prefill": vals["prefill"] - vals["start"], "per_token": per}

    def step_bytes(self) -> dict[str, int]:
        """Bytes each step reads from and writes to memory (whole words: weight and scale beats, the KV
        cache, loads, stores; a SCATTER reads and writes each word its fields touch), from the program's
        instructions (``accesses``); instruction fetch not included."""
        return {name: sum(self.instr_bytes(ins) for ins in self.program[first:first + count])
                for name, first, count in self.steps}

    def instr_bytes(self, ins: Instr) -> int:
        """Bytes one instruction reads from and writes to memory, as ``step_bytes`` counts them."""
        wb = self.word_bytes
        if ins.op == Op.SCATTER:  # read-modify-write of the words its fields touch
            return 2 * len(_scatter_words(ins, self.accel.mem_word_bits)) * wb
        if ins.op == Op.LOAD and ins.flags & FLAG_INDEXED:  # one row, wherever its index puts it
            return -(-ins.n * ins.w // self.accel.mem_word_bits) * wb
        acc = accesses(ins, self.engine, self.accel)
        return sum(hi - lo for lo, hi in acc["mem_r"] + acc["mem_w"]) * wb

    def decode_bytes_per_token(self) -> int:
        per = [v for k, v in self.step_bytes().items() if k.startswith("step")]
        return int(round(sum(per) / len(per))) if per else 0


def _scatter_words(ins: Instr, W: int) -> set[int]:
    o, i = np.meshgrid(np.arange(ins.m), np.arange(ins.n), indexing="ij")
    return set(((ins.d * W + ins.e + o * ins.f + i * ins.k) // W).reshape(-1).tolist())


def _rows(shape: tuple) -> tuple[int, int]:
    if len(shape) == 1:
        return int(shape[0]), 1
    return int(np.prod(shape[:-1])), int(shape[-1])


# ---------------------------------------------------------------------------------------------------
# memory image
# ---------------------------------------------------------------------------------------------------
class _Mem:
    """Regions laid out word-aligned from word ``base`` on, each with its initial bytes (or zeros).
    ``shape_only``: the same regions and sizes, no bytes packed (the values' shapes alone are read)."""

    def __init__(self, word_bits: int, shape_only: bool = False):
        self.shape_only = shape_only
        self.W = word_bits
        self.WB = word_bits // 8
        self.regions: dict[str, tuple[int, int]] = {}
        self.data: dict[str, np.ndarray] = {}
        self.top = 0

    def add(self, name: str, words: int, data: np.ndarray | None = None) -> int:
        if name in self.regions:
            raise AssertionError(f"region {name} twice")
        self.regions[name] = (self.top, int(words))
        if data is not None and not self.shape_only:
            d = np.asarray(data, np.uint8).reshape(-1)
            assert d.size <= words * self.WB, name
            self.data[name] = d
        self.top += int(words)
        return self.regions[name][0]

    def elements(self, name: str, values, bits: int) -> int:
        """A region of packed ``bits``-bit elements (little-endian)."""
        n = int(np.size(values))
        data = None if self.shape_only else _pack_elements(values, bits)
        return self.add(name, max(1, -(-n * bits // self.W)), data)

    def rows(self, name: str, values, bits: int) -> tuple[int, int]:
        """A 2-D array, each row starting at a word: -> (first word, words per row)."""
        nr, nc = np.shape(values)
        rw = -(-nc * bits // self.W)
        buf = None
        if not self.shape_only:
            v = np.asarray(values, np.int64)
            buf = np.zeros((nr, rw * self.WB), np.uint8)
            for r in range(nr):
                p = _pack_elements(v[r], bits)
                buf[r, :p.size] = p
        return self.add(name, max(1, nr * rw), buf), rw


def _pack_elements(v: np.ndarray, bits: int) -> np.ndarray:
    v = np.asarray(v, np.int64).reshape(-1)
    if bits == 4:
        nib = (v & 15).astype(np.uint8)
        if nib.size % 2:
            nib = np.concatenate([nib, np.zeros(1, np.uint8)])
        return nib[0::2] | (nib[1::2] << 4)
    return (v & ((1 << bits) - 1) if bits < 64 else v).astype(f"<u{bits // 8}").view(np.uint8)


# ---------------------------------------------------------------------------------------------------
# linears as engine beats
# ---------------------------------------------------------------------------------------------------
@dataclass
class LoweredLinear:
    mode: Mode
    n: int  # output rows
    k: int  # inputs
    k_beats: int
    group_beats: int
    tiles: int
    weight: np.ndarray | None  # (tiles * k_beats, beat bytes) little-endian beats; None: shape only
    scale: np.ndarray | None  # (tiles * groups, beat bytes)
    bits: int = 2  # weight code bits (4: the W4 lm_head, a DENSE command with FLAG_W4)

    @property
    def flags(self) -> int:
        """The ENGINE instruction's flags: the mode, and FLAG_W4 for 4-bit codes."""
        return int(self.mode) | (FLAG_W4 if self.bits == 4 else 0)

    @property
    def scale_beats(self) -> int:
        """One scale beat per (tile, group)."""
        return self.tiles * (self.k_beats // self.group_beats)


def weight_beat_fields(engine: EngineParams, codes, k_beats: int, *, meta=None, zero=None) -> dict[str, np.ndarray]:
    """The weight stream's beats (fields of ``layouts(engine)["weight"]``) for rows of lane codes: rows
    padded to whole tiles of pe_rows with zero codes; beat ``ti * k_beats + bi`` carries
    ``codes[ti*R:(ti+1)*R, bi*L:(bi+1)*L]`` row-major (``[row*lanes + lane]``), the rows' 2:4 patterns
    ``meta[.., bi*L/2:(bi+1)*L/2]`` likewise, and ``zero[bi*L:(bi+1)*L]`` in its zero lanes (P.V: each
    key's zero-point, the same in every tile). codes: (N, k_beats * L) (2:4: the kept codes)."""
    Rr, L = engine.pe_rows, engine.pe_lanes
    c = np.asarray(codes, np.int64)
    n = c.shape[0]
    tiles = -(-n // Rr)
    kl = k_beats * L
    if c.shape[1] != kl:
        raise ValueError(f"codes {c.shape}: need {kl} lane codes per row ({k_beats} beats of {L})")
    pad = np.zeros((tiles * Rr, kl), np.int64)
    pad[:n] = c
    nb = tiles * k_beats
    out = {"codes": pad.reshape(tiles, Rr, k_beats, L).transpose(0, 2, 1, 3).reshape(nb, Rr * L)}
    mpad = np.zeros((tiles * Rr, kl // 2), np.int64)
    if meta is not None:
        mpad[:n] = np.asarray(meta, np.int64)
    out["meta"] = mpad.reshape(tiles, Rr, k_beats, L // 2).transpose(0, 2, 1, 3).reshape(nb, Rr * L // 2)
    z = np.zeros(kl, np.int64) if zero is None else np.asarray(zero, np.int64).reshape(kl)
    out["zero"] = np.tile(z.reshape(k_beats, L), (tiles, 1))
    return out


def scale_beat_fields(engine: EngineParams, s, m, *, pad_s: int = 0) -> dict[str, np.ndarray]:
    """The scale stream's beats: rows padded to whole tiles (s = ``pad_s``, m = 0), then the scale-group
    transpose: one beat per (tile, group), tile-major, holding that group's s and m of the tile's rows."""
    Rr = engine.pe_rows
    s, m = np.asarray(s, np.int64), np.asarray(m, np.int64)
    n, ng = s.shape
    tiles = -(-n // Rr)
    sp = np.full((tiles * Rr, ng), pad_s, np.int64)
    mp = np.zeros((tiles * Rr, ng), np.int64)
    sp[:n], mp[:n] = s, m
    return {"s": sp.reshape(tiles, Rr, ng).transpose(0, 2, 1).reshape(tiles * ng, Rr),
            "m": mp.reshape(tiles, Rr, ng).transpose(0, 2, 1).reshape(tiles * ng, Rr)}


def lower_linear(lin: G.Linear, engine: EngineParams, accel: AccelParams, where: str,
                 pack: bool = True) -> LoweredLinear:
    """A quantized linear as the engine's weight and scale beats (tile ti, beat bi at ti*k_beats + bi;
    scale beats tile-major, one per group), refusing by name what the engine config cannot run.
    ``pack=False``: the same checks and geometry, no beats (a shape-only compile reads no weights)."""
    Rr, L = engine.pe_rows, engine.pe_lanes
    if lin.bias_fx is not None:
        raise CompileError(where, "has a bias: the ISA has no bias add (RESCALE is the linear's last step)")
    n, k = lin.shape
    sparse = lin.mask is not None
    if sparse and lin.bits != 2:
        raise CompileError(where, f"2:4 sparse with {lin.bits}-bit codes: the engine's 2:4 mode multiplies "
                                  f"2-bit codes only (docs/engine.md)")
    if lin.bits not in (2, 4):
        raise CompileError(where, f"{lin.bits}-bit codes: the engine's code lanes take 2- or 4-bit codes")
    per = 2 * L if sparse else L
    what = "2:4 beat (2 * pe_lanes inputs)" if sparse else "beat (pe_lanes inputs)"
    if k % per:
        raise CompileError(where, f"K = {k} inputs is not whole {what} of {per}: pad the model or choose "
                                  f"pe_lanes dividing {k // (2 if sparse else 1)}")
    if lin.group_size % per:
        raise CompileError(where, f"group of {lin.group_size} inputs is not whole {what} of {per}")
    if k > engine.max_reduction_len:
        raise CompileError(where, f"K = {k} inputs exceeds engine.max_reduction_len = {engine.max_reduction_len}")
    kb, gb = k // per, lin.group_size // per
    tiles = -(-n // Rr)
    if tiles >= 1 << TILE_BITS:
        raise CompileError(where, f"{n} rows need {tiles} row tiles, beyond the command's {TILE_BITS}-bit field")
    mode = Mode.SPARSE if sparse else Mode.DENSE
    if not pack:
        return LoweredLinear(mode, n, k, kb, gb, tiles, None, None, lin.bits)
    lay = layouts(engine)
    bw = {s: -(-B.width(lay[s]) // accel.mem_word_bits) * accel.mem_word_bits // 8 for s in ("weight", "scale")}
    if sparse:
        kept, md = R.compress_24(np.where(lin.mask, lin.codes, 0), lin.mask, 2)
        wf = weight_beat_fields(engine, kept, kb, meta=md)
    else:
        wf = weight_beat_fields(engine, lin.codes, kb)
    weight = B.pack_le(lay["weight"], wf, tiles * kb, bw["weight"])
    sc = scale_beat_fields(engine, lin.scales, lin.mins)
    scale = B.pack_le(lay["scale"], sc, len(sc["s"]), bw["scale"])
    return LoweredLinear(mode, n, k, kb, gb, tiles, weight, scale, lin.bits)


# ---------------------------------------------------------------------------------------------------
# what each instruction touches (the program check, the machine's and the RTL's memory comparison)
# ---------------------------------------------------------------------------------------------------
_BEAT_WORDS: dict[tuple, tuple[int, int]] = {}


def _beat_words(engine: EngineParams, W: int) -> tuple[int, int]:
    """Memory words of one weight beat and one scale beat (``layouts`` builds Amaranth layouts: once per
    configuration, not once per instruction)."""
    key = (tuple(vars(engine).items()), W)
    if key not in _BEAT_WORDS:
        lay = layouts(engine)
        _BEAT_WORDS[key] = (-(-B.width(lay["weight"]) // W), -(-B.width(lay["scale"]) // W))
    return _BEAT_WORDS[key]


def accesses(ins: Instr, engine: EngineParams, accel: AccelParams, index_max: int | None = None) -> dict:
    """{"spad_r", "spad_w", "mem_r", "mem_w"}: lists of [lo, hi) ranges (spad elements, mem words).
    An indexed LOAD's mem range is for indices 0..index_max (None: not known, left out)."""
    W = accel.mem_word_bits
    wbw, sbw = _beat_words(engine, W)
    op = Op(ins.op)
    T, N = ins.m, ins.n
    r: list = []
    w: list = []
    mr: list = []
    mw: list = []
    if op == Op.MARK:
        mw.append((ins.d, ins.d + 1))
    elif op == Op.LOAD:
        words = -(-N * ins.w // W)
        if ins.flags & FLAG_INDEXED:
            r.append((ins.b, ins.b + 1))
            if index_max is not None:
                mr.append((ins.a, ins.a + index_max * ins.s + words))
        else:
            mr.append((ins.a, ins.a + words))
        w.append((ins.d, ins.d + N))
    elif op == Op.STORE:
        r.append((ins.a, ins.a + N))
        mw.append((ins.d, ins.d + -(-N * ins.w // W)))
    elif op == Op.SCATTER:
        if T and N:
            last = ins.a + (T - 1) * ins.b + N
            r.append((ins.a, max(last, ins.a + N)))
            lo = ins.d * W + ins.e
            hi = lo + (T - 1) * ins.f + (N - 1) * ins.k + ins.w
            mw.append((lo // W, -(-hi // W)))
    elif op == Op.ENGINE:
        r.append((ins.a, ins.a + T * ins.b))
        F = ins.f if ins.f else N * wbw
        mr.append((ins.c, ins.c + (ins.s - 1) * F + N * wbw))
        if (ins.flags & 3) != Mode.PV:
            mr.append((ins.e, ins.e + ins.s * (N // max(ins.k, 1)) * sbw))
        for t in range(T):
            w.append((ins.d + t * ins.i0 + ins.g, ins.d + t * ins.i0 + ins.h))
    elif op == Op.EMBED:
        r += [(ins.a, ins.a + T * N), (ins.b, ins.b + 2 * T)]
        w.append((ins.d, ins.d + T * N))
    elif op == Op.RMSNORM:
        r += [(ins.a, ins.a + T * N), (ins.b, ins.b + N)]
        w.append((ins.d, ins.d + T * N))
    elif op == Op.QUANT_ACT:
        r.append((ins.a, ins.a + T * N))
        w += [(ins.d, ins.d + T * N), (ins.e, ins.e + T)]
    elif op == Op.RESCALE:
        r += [(ins.a, ins.a + T * N), (ins.b, ins.b + T), (ins.c, ins.c + N), (ins.g, ins.g + N)]
        w.append((ins.d, ins.d + T * N))
    elif op == Op.ROPE:
        r += [(ins.a, ins.a + T * ins.k * N), (ins.b, ins.b + N // 2)]
        w.append((ins.d, ins.d + T * ins.k * N))
    elif op == Op.QUANT_KV:
        r.append((ins.a, ins.a + T * N))
        w += [(ins.d, ins.d + T * N), (ins.e, ins.e + T), (ins.f, ins.f + T)]
    elif op == Op.LOGITS:
        r += [(ins.a, ins.a + T * N), (ins.b, ins.b + T), (ins.c, ins.c + N)]
        w.append((ins.d, ins.d + T * N))
    elif op == Op.SOFTMAX_EXP:
        r.append((ins.a, ins.a + T * N))
        w.append((ins.d, ins.d + T * N))
    elif op == Op.PV_WEIGHTS:
        r += [(ins.a, ins.a + T * N), (ins.b, ins.b + N)]
        w += [(ins.d, ins.d + T * N), (ins.e, ins.e + T), (ins.f, ins.f + T)]
    elif op == Op.PV_OUT:
        r += [(ins.a, ins.a + T * N), (ins.b, ins.b + T), (ins.c, ins.c + T)]
        w.append((ins.d, ins.d + T * N))
    elif op in (Op.SILU_MUL, Op.RESID_ADD):
        r += [(ins.a, ins.a + T * N), (ins.b, ins.b + T * N)]
        w.append((ins.d, ins.d + T * N))
    elif op == Op.ARGMAX:
        r.append((ins.a, ins.a + T * N))
        w.append((ins.d, ins.d + T))
    return {"spad_r": r, "spad_w": w, "mem_r": mr, "mem_w": mw}


def check_program(program: list[Instr], engine: EngineParams, accel: AccelParams, mem_words: int,
                  regions: dict[str, tuple[int, int]] | None = None, index_max: int | None = None) -> None:
    """Refuse a program the accelerator must not run: a field that does not fit its encoding, a spad or
    mem range outside the scratchpad or the memory, an instruction whose spad source and destination
    overlap, a write into the program's own words, an ENGINE command beyond the configuration. The
    error names the instruction (index and the compiler's note)."""
    p = engine
    prog_words = len(program) * (INSTR_BITS // accel.mem_word_bits)
    if len(program) > accel.max_program_instrs:
        raise CompileError("program", f"{len(program)} instructions exceed accel.max_program_instrs = "
                                      f"{accel.max_program_instrs}")
    if not program or program[-1].op != Op.HALT:
        raise CompileError("program", "does not end with HALT")
    for idx, ins in enumerate(program):
        where = f"instruction {idx} ({ins.note or ins.op.name})"
        try:
            encode(ins)
        except ISAError as exc:
            raise CompileError(where, str(exc)) from exc
        if ins.op in (Op.LOAD, Op.STORE, Op.SCATTER) and ins.w not in (4, 8, 16, 32, 64):
            raise CompileError(where, f"element width {ins.w} is not one of 4, 8, 16, 32, 64")
        if ins.op == Op.ENGINE:
            mode = Mode(ins.flags & 3)
            per = 2 * p.pe_lanes if mode == Mode.SPARSE else p.pe_lanes
            if not 1 <= ins.m <= p.mm_tokens:
                raise CompileError(where, f"{ins.m} tokens outside 1..engine.mm_tokens = {p.mm_tokens}")
            if ins.m * ins.n * per > p.act_buffer_bytes:
                raise CompileError(where, f"{ins.m} tokens x {ins.n * per} inputs = {ins.m * ins.n * per} bytes "
                                          f"exceed engine.act_buffer_bytes = {p.act_buffer_bytes}")
            limit = (p.max_head_dim if mode == Mode.QK else p.max_keys if mode == Mode.PV else p.max_reduction_len)
            if ins.n * per > max(limit, per):
                what = {Mode.QK: "max_head_dim", Mode.PV: "max_keys"}.get(mode, "max_reduction_len")
                raise CompileError(where, f"{ins.n * per} inputs exceed engine.{what} = {limit}")
            if ins.b > ins.n * per:
                raise CompileError(where, f"{ins.b} inputs per token exceed the {ins.n * per} of {ins.n} beats")
            if ins.flags & FLAG_W4 and mode != Mode.DENSE:
                raise CompileError(where, f"FLAG_W4 (4-bit weight codes) in {mode.name} mode: DENSE only")
            if mode != Mode.PV and (ins.k < 1 or ins.n % ins.k):
                raise CompileError(where, f"group of {ins.k} beats does not divide {ins.n} beats")
            if not 0 <= ins.g <= ins.h <= ins.s * p.pe_rows:
                raise CompileError(where, f"row filter [{ins.g}, {ins.h}) outside the {ins.s * p.pe_rows} rows")
        acc = accesses(ins, engine, accel, index_max)
        for lo, hi in acc["spad_r"] + acc["spad_w"]:
            if lo < 0 or hi > accel.spad_words:
                raise CompileError(where, f"spad range [{lo}, {hi}) outside the scratchpad of {accel.spad_words} "
                                          f"words")
        for lo, hi in acc["mem_r"] + acc["mem_w"]:
            if lo < 0 or hi > mem_words:
                raise CompileError(where, f"mem words [{lo}, {hi}) outside the memory image of {mem_words} words")
        for lo, hi in acc["mem_w"]:
            if lo < prog_words:
                raise CompileError(where, f"writes mem words [{lo}, {hi}) inside the program (words 0..{prog_words})")
        for rlo, rhi in acc["spad_r"]:
            for wlo, whi in acc["spad_w"]:
                if rlo < whi and wlo < rhi and rhi > rlo and whi > wlo:
                    raise CompileError(where, f"source spad [{rlo}, {rhi}) overlaps destination [{wlo}, {whi})")


# ---------------------------------------------------------------------------------------------------
# the compiler
# ---------------------------------------------------------------------------------------------------
class _Spad:
    def __init__(self, words: int):
        self.words = words
        self.bufs: dict[str, tuple[int, int]] = {}
        self.top = 0

    def __call__(self, name: str, size: int) -> int:
        size = max(1, int(size))
        self.bufs[name] = (self.top, size)
        self.top += size
        return self.bufs[name][0]

    def check(self):
        if self.top > self.words:
            at = 0
            for name, (lo, size) in self.bufs.items():
                if lo + size > self.words:
                    at = name
                    break
            raise CompileError("spad", f"buffer {at!r} ({self.bufs[at][1]} words at {self.bufs[at][0]}) does not "
                                       f"fit: the program's buffers need {self.top} words, accel.spad_words = "
                                       f"{self.words}")


LINEAR_ORDER = (("attn", "q_proj"), ("attn", "k_proj"), ("attn", "v_proj"), ("attn", "o_proj"),
                ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


class _Compiler:
    def __init__(self, spec: G.Spec, engine: EngineParams, accel: AccelParams, prompt_ids, new_tokens: int,
                 trace: str, *, weights: bool = True, parts: set[str] | None = None):
        """weights=False: a shape-only compile (same lowering, checks and layout; no bytes packed).
        parts: emit only these parts of the program ("prefill@C0" for the prefill chunk at position C0,
        "prefill_head", "stepK"), every MARK and the HALT kept; None emits everything."""
        self.spec, self.p, self.a = spec, engine, accel
        self.weights = bool(weights)
        self.parts = None if parts is None else set(parts)
        self.prompt = [int(t) for t in prompt_ids]
        self.new_tokens = int(new_tokens)
        self.trace_mode = trace
        self.W = accel.mem_word_bits
        lay = layouts(engine)
        self.lay = lay
        self.wbw = -(-B.width(lay["weight"]) // self.W)
        self.sbw = -(-B.width(lay["scale"]) // self.W)
        self.check_model()
        self.layout_memory()
        self.layout_spad()

    # ------------------------------------------------------------------ refusals
    def check_model(self):
        s, p, a = self.spec, self.p, self.a
        from .engine import check_params
        try:
            check_params(p)
        except ValueError as exc:
            raise CompileError("engine", str(exc)) from exc
        for key, msg in a.problems():
            raise CompileError(f"accel.{key}", msg)
        if self.W not in (64, 128, 256, 512) or INSTR_BITS % self.W:
            raise CompileError("accel.mem_word_bits", f"{self.W} does not divide the {INSTR_BITS}-bit instruction")
        if self.trace_mode not in TRACE_MODES:
            raise CompileError("trace", f"{self.trace_mode!r}: choose from {', '.join(TRACE_MODES)}")
        if not self.prompt:
            raise CompileError("prompt", "is empty: the prefill needs at least one token")
        if self.new_tokens < 1:
            raise CompileError("new_tokens", f"{self.new_tokens}: generate at least one token")
        bad = [t for t in self.prompt if not 0 <= t < s.vocab]
        if bad:
            raise CompileError("prompt", f"token id {bad[0]} outside the vocabulary 0..{s.vocab - 1}")
        d, L = s.head_dim, p.pe_lanes
        if d > p.max_head_dim:
            raise CompileError("attention", f"head_dim {d} exceeds engine.max_head_dim = {p.max_head_dim}")
        if d % L:
            raise CompileError("attention", f"head_dim {d} is not a multiple of engine.pe_lanes = {L} (Q.K beats)")
        if s.n_heads % s.n_kv:
            raise CompileError("attention", f"{s.n_kv} KV heads do not divide {s.n_heads} heads")
        std = R.rope_params(np.zeros(1), 1.0)[1]
        if not np.array_equal(np.asarray(s.rope_table, np.int64), std):
            raise CompileError("rope", "the RoPE table is not the standard one (attention scaling != 1): ROPE "
                                       "uses the hardware's table of scaling 1")
        # positions and the cache
        self.positions = len(self.prompt) + self.new_tokens - 1  # tokens embedded
        last = self.positions - 1
        if last > F.ROPE_MAX_POSITION:
            raise CompileError("prompt", f"position {last} beyond RoPE's {F.ROPE_MAX_POSITION}")
        if s.window is None:
            if s.max_positions is not None and self.positions > s.max_positions:
                raise CompileError("prompt", f"{len(self.prompt)} prompt tokens + {self.new_tokens - 1} decode steps "
                                             f"= {self.positions} positions exceed the model's {s.max_positions} "
                                             f"without Λ-attention")
            self.cap = self.positions
        else:
            self.cap = s.sinks + s.window
        if self.cap > p.max_keys:
            raise CompileError("attention", f"the KV cache holds up to {self.cap} keys, beyond engine.max_keys = "
                                            f"{p.max_keys}: shorten the prompt/generation or use Λ-attention")
        lay = self.lay
        co, cw, _ = B.field_offset(lay["weight"], "codes")
        zo, zw, _ = B.field_offset(lay["weight"], "zero")
        mo, mw_, _ = B.field_offset(lay["scale"], "m")
        if co % 4 or zo % 4 or mo % 8 or cw != 4 or zw != 4 or mw_ != 8:
            raise CompileError("engine", f"beat fields at bit offsets codes {co}, zero {zo}, m {mo}: SCATTER needs "
                                         f"4-bit fields on nibbles and the 8-bit m on bytes")
        self.codes_off, self.zero_off, self.m_off = co, zo, mo
        self.lowered = {}
        for i, lay_ in enumerate(s.layers):
            for grp, nm in LINEAR_ORDER:
                where = f"layer {i} {grp}.{nm}"
                self.lowered[(i, nm)] = self._lower(lay_.linears[nm], where)
        self.lowered[("lm_head",)] = self._lower(s.lm_head, "lm_head")

    def _lower(self, lin, where):
        lw = lower_linear(lin, self.p, self.a, where, pack=self.weights)
        per = 2 * self.p.pe_lanes if lw.mode == Mode.SPARSE else self.p.pe_lanes
        T = min(self.p.mm_tokens, len(self.prompt))
        if T * lw.k_beats * per > self.p.act_buffer_bytes:
            raise CompileError(where, f"{T} tokens x {lw.k_beats * per} inputs exceed engine.act_buffer_bytes = "
                                      f"{self.p.act_buffer_bytes}")
        return lw

    # ------------------------------------------------------------------ memory
    def layout_memory(self):
        s, p = self.spec, self.p
        m = _Mem(self.W, shape_only=not self.weights)
        self.mem = m
        # the program goes first; its length is known only after emission: regions are relative here
        m.rows("prompt", np.array(self.prompt, np.int64)[:, None], 32)  # one id per word
        m.add("tokens", self.new_tokens)
        m.add("marks", self.new_tokens + 1)
        self.r_emb, self.emb_rw = m.rows("embed.codes", s.embed_codes, 8)
        ms = np.stack([s.embed_mult, s.embed_shift], axis=1)
        self.r_embms, rw = m.rows("embed.mult_shift", ms, 32)
        assert rw == 1
        m.elements("rope.theta", s.rope_theta, 64)
        for i, lay in enumerate(s.layers):
            m.elements(f"layer{i}.attn_norm.g", lay.attn_norm.g, 32)
            m.elements(f"layer{i}.mlp_norm.g", lay.mlp_norm.g, 32)
            for _, nm in LINEAR_ORDER:
                self._linear_regions(f"layer{i}.{nm}", self.lowered[(i, nm)], lay.linears[nm])
        m.elements("final_norm.g", s.final_norm.g, 32)
        self._linear_regions("lm_head", self.lowered[("lm_head",)], s.lm_head)
        # the KV cache, per layer and KV head
        Rr, L, d = p.pe_rows, p.pe_lanes, s.head_dim
        self.k_tiles = -(-self.cap // Rr)
        self.k_beats = d // L
        self.v_tiles = -(-d // Rr)
        self.v_beats = -(-self.cap // L)  # beats per V tile (lanes = slots)
        ones = None if m.shape_only else B.pack_le(
            self.lay["scale"], {"s": np.ones((self.k_tiles, Rr), np.int64), "m": np.zeros((self.k_tiles, Rr), np.int64)},
            self.k_tiles, self.sbw * m.WB)
        for i in range(len(s.layers)):
            for g in range(s.n_kv):
                c = f"layer{i}.kv{g}"
                m.add(f"{c}.k", self.k_tiles * self.k_beats * self.wbw)
                m.add(f"{c}.k_scale", self.k_tiles * self.sbw, ones)
                m.add(f"{c}.v", self.v_tiles * self.v_beats * self.wbw)
                m.add(f"{c}.k_range", -(-self.cap * 32 // self.W))
                m.add(f"{c}.v_range", -(-self.cap * 32 // self.W))
        self.trace: dict[str, tuple[int, tuple, int, bool]] = {}

    def _linear_regions(self, name, lw: LoweredLinear, lin):
        m = self.mem
        m.add(f"{name}.weight", lw.tiles * lw.k_beats * self.wbw, lw.weight)
        m.add(f"{name}.scale", lw.scale_beats * self.sbw, lw.scale)
        m.elements(f"{name}.row_mult", lin.row_mult, 32)
        m.elements(f"{name}.row_shift", lin.row_shift, 32)

    def trace_region(self, name: str, shape: tuple, bits: int, signed: bool) -> int:
        rows, x = _rows(shape)
        rw = -(-x * bits // self.W)
        word = self.mem.add(f"trace.{name}", max(1, rows * rw))
        self.trace[name] = (word, tuple(int(v) for v in shape), bits, signed)
        return word

    # ------------------------------------------------------------------ spad
    def layout_spad(self):
        s, p = self.spec, self.p
        T = min(p.mm_tokens, len(self.prompt))
        self.Tmax = T
        H, d, nh, nkv = s.hidden, s.head_dim, s.n_heads, s.n_kv
        inter = s.layers[0].linears["gate_proj"].shape[0] if s.layers else H
        kmax = max([H, nh * d, inter])
        nmax = max([lw.n for key, lw in self.lowered.items() if key != ("lm_head",)] or [H])
        # the lm_head runs in chunks of rows (whole tiles, whole words of 32-bit row multipliers) so that
        # only the logits, not its accumulators and multipliers, need the whole vocabulary in the spad
        align = int(np.lcm(p.pe_rows, max(1, self.W // 32)))
        self.head_rows = max(align, (nmax // align) * align)
        sp = _Spad(self.a.spad_words)
        self.sp = sp
        b = {}
        b["ids"] = sp("ids", T)
        b["emb_codes"] = sp("emb_codes", T * H)
        b["emb_ms"] = sp("emb_ms", 2 * T)
        b["x"] = sp("x", T * H)
        b["h"] = sp("h", T * H)
        b["xn"] = sp("xn", T * H)
        b["a"] = sp("a", T * kmax)
        b["amax"] = sp("amax", T)
        b["acc"] = sp("acc", max(T * nmax, min(self.head_rows, s.vocab)))
        b["rm"] = sp("row_mult", max(nmax, min(self.head_rows, s.vocab)))
        b["rs"] = sp("row_shift", max(nmax, min(self.head_rows, s.vocab)))
        b["gamma"] = sp("gamma", H)
        b["theta"] = sp("theta", d // 2)
        b["q"] = sp("q", T * nh * d)
        b["k"] = sp("k", T * nkv * d)
        b["v"] = sp("v", T * nkv * d)
        b["qr"] = sp("q_rot", T * nh * d)
        b["qa"] = sp("q_codes", T * nh * d)
        b["qamax"] = sp("q_amax", T * nh)
        b["qs"] = sp("q_sink_rot", T * nh * d)
        b["qsa"] = sp("q_sink_codes", T * nh * d)
        b["qsamax"] = sp("q_sink_amax", T * nh)
        b["kr"] = sp("k_rot", T * nkv * d)
        b["kc"] = sp("k_codes", T * nkv * d)
        b["kz"] = sp("k_zero", T * nkv)
        b["krg"] = sp("k_range", T * nkv)
        b["vc"] = sp("v_codes", T * nkv * d)
        b["vz"] = sp("v_zero", T * nkv)
        b["vrg"] = sp("v_range", T * nkv)
        b["krange"] = sp("cache_k_range", self.cap)
        b["vrange"] = sp("cache_v_range", self.cap)
        b["qk"] = sp("qk_acc", self.k_tiles * p.pe_rows)
        b["z"] = sp("logits_z", self.cap)
        b["e"] = sp("softmax_e", self.cap)
        b["pa"] = sp("p_codes", self.cap)
        b["wmax"] = sp("wmax", 1)
        b["esum"] = sp("esum", 1)
        b["pv"] = sp("pv_acc", self.v_tiles * p.pe_rows)
        b["o"] = sp("attn_out", T * nh * d)
        b["y"] = sp("linear_out", T * max(H, inter))
        b["gate"] = sp("gate", T * inter)
        b["up"] = sp("up", T * inter)
        b["act"] = sp("silu_mul", T * inter)
        b["fn"] = sp("final_norm", H)
        b["logits"] = sp("logits", s.vocab)
        b["tok"] = sp("next_token", 1)
        self.b = b
        sp.check()

    # ------------------------------------------------------------------ emission
    def emit(self, base: int) -> list[Instr]:
        """The whole program, with every region shifted by ``base`` words (the program's own length)."""
        self.base = base
        self.prog: list[Instr] = []
        self.marks: list[tuple[str, int]] = []
        self.steps: list[tuple[str, int, int]] = []
        self.stored: set[str] = set()
        self._mark("start", 0)
        p0 = len(self.prog)
        # prefill, in chunks
        P = len(self.prompt)
        for c0 in range(0, P, self.Tmax):
            if not self._part(f"prefill@{c0}"):
                continue
            T = min(self.Tmax, P - c0)
            self._embed_chunk("prefill", c0, T, from_prompt=True)
            self._layers("prefill", c0, T, P)
        if self._part("prefill_head"):
            self._head("prefill", (P - 1) % self.Tmax, 0)  # the last prompt token's row of the last chunk
        self._mark("prefill", 1)
        self.steps.append(("prefill", p0, len(self.prog) - p0))
        for k in range(1, self.new_tokens):
            if not self._part(f"step{k}"):
                continue
            p0 = len(self.prog)
            n = P + k - 1  # the position of the token this step embeds (the previous step's output)
            self._embed_chunk(f"step{k}", n, 1, from_prompt=False, token_index=k - 1)
            self._layers(f"step{k}", n, 1, 1)
            self._head(f"step{k}", 0, k)
            self._mark(f"step{k}", k + 1)
            self.steps.append((f"step{k}", p0, len(self.prog) - p0))
        self.prog.append(Instr(Op.HALT, note="end"))
        return self.prog

    def _part(self, name: str) -> bool:
        return self.parts is None or name in self.parts

    def R(self, name: str) -> int:
        return self.base + self.mem.regions[name][0]

    def I(self, op, note="", **kw):  # noqa: E743 - one letter, used on every line below
        self.prog.append(Instr(op, note=note, **kw))

    def _mark(self, label: str, slot: int):
        word = self.R("marks") + slot
        self.marks.append((label, word))
        self.I(Op.MARK, f"mark {label}", d=word, n=slot)

    def _store_trace(self, step: str, name: str, buf: int, rows: int, x: int, bits: int, signed: bool,
                     row0: int, total_rows: int, one_d: bool = False):
        full = f"{step}/{name}"
        if full not in self.trace:
            shape = (total_rows,) if one_d else (total_rows, x)
            self.trace_region(full, shape, bits, signed)
        word = self.base + self.trace[full][0]
        rw = -(-x * bits // self.W)
        if (x * bits) % self.W == 0:
            self.I(Op.STORE, f"trace {full}", a=buf, d=word + row0 * rw, n=rows * x, w=bits)
        else:
            for r in range(rows):
                self.I(Op.STORE, f"trace {full}", a=buf + r * x, d=word + (row0 + r) * rw, n=x, w=bits)

    def _want(self, level: str) -> bool:
        return self.trace_mode == "all" or (self.trace_mode == "layers" and level == "layers")

    def _embed_chunk(self, step, c0, T, from_prompt, token_index=None):
        s, b = self.spec, self.b
        H = s.hidden
        for t in range(T):
            src = self.R("prompt") + c0 + t if from_prompt else self.R("tokens") + token_index
            self.I(Op.LOAD, f"{step} token id", a=src, d=b["ids"] + t, n=1, w=32)
            self.I(Op.LOAD, f"{step} embedding row", flags=FLAG_INDEXED | FLAG_SIGNED, a=self.R("embed.codes"),
                   b=b["ids"] + t, s=self.emb_rw, d=b["emb_codes"] + t * H, n=H, w=8)
            self.I(Op.LOAD, f"{step} embedding mult/shift", flags=FLAG_INDEXED | FLAG_SIGNED,
                   a=self.R("embed.mult_shift"), b=b["ids"] + t, s=1, d=b["emb_ms"] + 2 * t, n=2, w=32)
        self.I(Op.EMBED, f"{step} embed", a=b["emb_codes"], b=b["emb_ms"], d=b["x"], m=T, n=H)
        if self._want("all"):
            self._store_trace(step, "embed", b["x"], T, H, 32, True, c0 if step == "prefill" else 0,
                              self._rows_of(step))

    def _rows_of(self, step):
        return len(self.prompt) if step == "prefill" else 1

    def _linear(self, step, where, name, key, inp_codes, amax, T, out, trace_name, row0):
        """ENGINE + RESCALE of a linear whose input codes and amax are already in the spad."""
        lw = self.lowered[key]
        b = self.b
        self.I(Op.ENGINE, f"{step} {where}", flags=lw.flags, a=inp_codes, b=lw.k, m=T, n=lw.k_beats,
               k=lw.group_beats, s=lw.tiles, c=self.R(f"{name}.weight"), e=self.R(f"{name}.scale"), d=b["acc"],
               i0=lw.n, g=0, h=lw.n)
        self.I(Op.LOAD, f"{step} {where} row_mult", flags=FLAG_SIGNED, a=self.R(f"{name}.row_mult"), d=b["rm"],
               n=lw.n, w=32)
        self.I(Op.LOAD, f"{step} {where} row_shift", flags=FLAG_SIGNED, a=self.R(f"{name}.row_shift"), d=b["rs"],
               n=lw.n, w=32)
        self.I(Op.RESCALE, f"{step} {where} rescale", a=b["acc"], b=amax, c=b["rm"], g=b["rs"], d=out, m=T, n=lw.n)
        if self._want("all"):
            rows = self._rows_of(step)
            self._store_trace(step, f"{trace_name}.acc", b["acc"], T, lw.n, 32, True, row0, rows)
            self._store_trace(step, f"{trace_name}.y", out, T, lw.n, 32, True, row0, rows)

    def _quant(self, step, where, src, T, K, trace_names, row0):
        b = self.b
        self.I(Op.QUANT_ACT, f"{step} {where} quantize", a=src, d=b["a"], e=b["amax"], m=T, n=K)
        if self._want("all"):
            rows = self._rows_of(step)
            for tn in trace_names:
                self._store_trace(step, f"{tn}.a", b["a"], T, K, 8, True, row0, rows)
                self._store_trace(step, f"{tn}.amax", b["amax"], T, 1, 32, False, row0, rows, one_d=True)

    def _norm(self, step, where, region, src, dst, T, norm):
        H = self.spec.hidden
        self.I(Op.LOAD, f"{step} {where} gamma", flags=FLAG_SIGNED, a=self.R(region), d=self.b["gamma"], n=H, w=32)
        self.I(Op.RMSNORM, f"{step} {where}", a=src, b=self.b["gamma"], d=dst, m=T, n=H, i0=int(norm.eps_term))

    def _layers(self, step, c0, T, rows):
        s, b = self.spec, self.b
        H, d, nh, nkv = s.hidden, s.head_dim, s.n_heads, s.n_kv
        row0 = c0 if step == "prefill" else 0
        lam = s.window is not None
        S = s.sinks if lam else 0
        self.I(Op.LOAD, f"{step} rope theta", a=self.R("rope.theta"), d=b["theta"], n=d // 2, w=64)
        for i, lay in enumerate(s.layers):
            L_ = f"layer {i}"
            pre = f"layer{i}"
            self._norm(step, f"{L_} attn_norm", f"layer{i}.attn_norm.g", b["x"], b["xn"], T, lay.attn_norm)
            if self._want("all"):
                self._store_trace(step, f"{pre}.attn_norm", b["xn"], T, H, 32, True, row0, rows)
            self._quant(step, f"{L_} attn.qkv", b["xn"], T, H,
                        [f"{pre}.attn.{x}" for x in ("q_proj", "k_proj", "v_proj")], row0)
            for nm, out in (("q_proj", b["q"]), ("k_proj", b["k"]), ("v_proj", b["v"])):
                self._linear(step, f"{L_} attn.{nm}", f"layer{i}.{nm}", (i, nm), b["a"], b["amax"], T, out,
                             f"{pre}.attn.{nm}", row0)
            # RoPE and the quantizers, for the whole chunk (every quantizer is per token and head)
            self.I(Op.ROPE, f"{step} {L_} attn.q rope", a=b["q"], b=b["theta"], d=b["qr"], m=T, k=nh, n=d, i0=c0,
                   h=NO_CLAMP)
            self.I(Op.ROPE, f"{step} {L_} attn.k rope", a=b["k"], b=b["theta"], d=b["kr"], m=T, k=nkv, n=d, i0=c0,
                   h=NO_CLAMP)
            self.I(Op.QUANT_ACT, f"{step} {L_} attn.q quantize", a=b["qr"], d=b["qa"], e=b["qamax"], m=T * nh, n=d)
            if lam and S:
                self.I(Op.ROPE, f"{step} {L_} attn.q sink rope", a=b["q"], b=b["theta"], d=b["qs"], m=T, k=nh, n=d,
                       i0=c0, h=S + s.window - 1)
                self.I(Op.QUANT_ACT, f"{step} {L_} attn.q sink quantize", a=b["qs"], d=b["qsa"], e=b["qsamax"],
                       m=T * nh, n=d)
            self.I(Op.QUANT_KV, f"{step} {L_} attn.k quantize", a=b["kr"], d=b["kc"], e=b["kz"], f=b["krg"],
                   m=T * nkv, n=d)
            self.I(Op.QUANT_KV, f"{step} {L_} attn.v quantize", a=b["v"], d=b["vc"], e=b["vz"], f=b["vrg"],
                   m=T * nkv, n=d)
            for t in range(T):
                self._attend(step, i, c0 + t, t)
            if self._want("all"):
                self._store_trace(step, f"{pre}.attn.pv_out", b["o"], T, nh * d, 32, True, row0, rows)
            self._quant(step, f"{L_} attn.o_proj", b["o"], T, nh * d, [f"{pre}.attn.o_proj"], row0)
            self._linear(step, f"{L_} attn.o_proj", f"layer{i}.o_proj", (i, "o_proj"), b["a"], b["amax"], T, b["y"],
                         f"{pre}.attn.o_proj", row0)
            self.I(Op.RESID_ADD, f"{step} {L_} resid_attn", a=b["x"], b=b["y"], d=b["h"], m=T, n=H)
            if self._want("all"):
                self._store_trace(step, f"{pre}.resid_attn", b["h"], T, H, 32, True, row0, rows)
            self._norm(step, f"{L_} mlp_norm", f"layer{i}.mlp_norm.g", b["h"], b["xn"], T, lay.mlp_norm)
            if self._want("all"):
                self._store_trace(step, f"{pre}.mlp_norm", b["xn"], T, H, 32, True, row0, rows)
            inter = lay.linears["gate_proj"].shape[0]
            self._quant(step, f"{L_} mlp.gate_up", b["xn"], T, H, [f"{pre}.mlp.gate_proj", f"{pre}.mlp.up_proj"], row0)
            for nm, out in (("gate_proj", b["gate"]), ("up_proj", b["up"])):
                self._linear(step, f"{L_} mlp.{nm}", f"layer{i}.{nm}", (i, nm), b["a"], b["amax"], T, out,
                             f"{pre}.mlp.{nm}", row0)
            self.I(Op.SILU_MUL, f"{step} {L_} mlp.silu_mul", a=b["gate"], b=b["up"], d=b["act"], m=T, n=inter)
            if self._want("all"):
                self._store_trace(step, f"{pre}.mlp.silu_mul", b["act"], T, inter, 32, True, row0, rows)
            self._quant(step, f"{L_} mlp.down_proj", b["act"], T, inter, [f"{pre}.mlp.down_proj"], row0)
            self._linear(step, f"{L_} mlp.down_proj", f"layer{i}.down_proj", (i, "down_proj"), b["a"], b["amax"], T,
                         b["y"], f"{pre}.mlp.down_proj", row0)
            self.I(Op.RESID_ADD, f"{step} {L_} out", a=b["h"], b=b["y"], d=b["x"], m=T, n=H)
            if self._want("layers"):
                self._store_trace(step, f"{pre}.out", b["x"], T, H, 32, True, row0, rows)

    def _attend(self, step, i, n, t):
        """Token t of the chunk (position n) of layer i: its K and V into the cache, then its query."""
        s, b, p = self.spec, self.b, self.p
        Rr, L, W = p.pe_rows, p.pe_lanes, self.W
        d, nh, nkv = s.head_dim, s.n_heads, s.n_kv
        rep = nh // nkv
        lam = s.window is not None
        S = s.sinks if lam else 0
        slot = int(R.cache_slot(n, s.sinks, s.window)) if lam else n
        filled = min(n + 1, self.cap)  # slots 0..filled-1 hold exactly the keys visible to position n
        wbits = self.wbw * W
        note = f"{step} layer {i} attn"
        for g in range(nkv):
            c = f"layer{i}.kv{g}"
            row = t * nkv + g
            # K codes: tile slot//R, row slot%R, beats over head_dim
            ti, r = divmod(slot, Rr)
            self.I(Op.SCATTER, f"{note} kv{g} k codes -> slot {slot}", a=b["kc"] + row * d, b=L, m=self.k_beats,
                   n=L, w=4, d=self.R(f"{c}.k") + ti * self.k_beats * self.wbw, e=self.codes_off + r * L * 4,
                   f=wbits, k=4)
            self.I(Op.SCATTER, f"{note} kv{g} k zero -> slot {slot}", flags=FLAG_NEG, a=b["kz"] + row, m=1, n=1,
                   w=8, d=self.R(f"{c}.k_scale") + ti * self.sbw, e=self.m_off + r * 8)
            self.I(Op.SCATTER, f"{note} kv{g} k range -> slot {slot}", a=b["krg"] + row, m=1, n=1, w=32,
                   d=self.R(f"{c}.k_range"), e=slot * 32)
            # V codes: channel c = tile*R + row, lane slot%L of beat slot//L in every channel tile
            bi, lane = divmod(slot, L)
            vbase = self.R(f"{c}.v") + bi * self.wbw
            tstride = self.v_beats * wbits
            full, rem = divmod(d, Rr)
            if full:
                self.I(Op.SCATTER, f"{note} kv{g} v codes -> slot {slot}", a=b["vc"] + row * d, b=Rr, m=full, n=Rr,
                       w=4, d=vbase, e=self.codes_off + lane * 4, f=tstride, k=L * 4)
            if rem:
                self.I(Op.SCATTER, f"{note} kv{g} v codes (last tile) -> slot {slot}", a=b["vc"] + row * d + full * Rr,
                       b=Rr, m=1, n=rem, w=4, d=vbase + full * self.v_beats * self.wbw, e=self.codes_off + lane * 4,
                       f=tstride, k=L * 4)
            self.I(Op.SCATTER, f"{note} kv{g} v zero -> slot {slot}", a=b["vz"] + row, b=0, m=self.v_tiles, n=1, w=4,
                   d=vbase, e=self.zero_off + lane * 4, f=tstride)
            self.I(Op.SCATTER, f"{note} kv{g} v range -> slot {slot}", a=b["vrg"] + row, m=1, n=1, w=32,
                   d=self.R(f"{c}.v_range"), e=slot * 32)
        for g in range(nkv):
            c = f"layer{i}.kv{g}"
            self.I(Op.LOAD, f"{note} kv{g} k ranges", a=self.R(f"{c}.k_range"), d=b["krange"], n=filled, w=32)
            self.I(Op.LOAD, f"{note} kv{g} v ranges", a=self.R(f"{c}.v_range"), d=b["vrange"], n=filled, w=32)
            for h in range(g * rep, (g + 1) * rep):
                hn = f"{note} head {h}"
                qrow = t * nh + h
                ns = min(S, filled)  # sink slots filled
                qk_common = dict(flags=int(Mode.QK), b=d, m=1, n=self.k_beats, k=self.k_beats)
                if ns:
                    self.I(Op.ENGINE, f"{hn} qk sinks", a=b["qsa"] + qrow * d, s=-(-ns // Rr), c=self.R(f"{c}.k"),
                           e=self.R(f"{c}.k_scale"), d=b["qk"], g=0, h=ns, **qk_common)
                    self.I(Op.LOGITS, f"{hn} logits sinks", a=b["qk"], b=b["qsamax"] + qrow, c=b["krange"], d=b["z"],
                           m=1, n=ns, k=s.softmax_mult, s=s.softmax_shift)
                if filled > S:
                    ts = S // Rr
                    tiles = -(-filled // Rr) - ts
                    self.I(Op.ENGINE, f"{hn} qk window", a=b["qa"] + qrow * d, s=tiles,
                           c=self.R(f"{c}.k") + ts * self.k_beats * self.wbw, e=self.R(f"{c}.k_scale") + ts * self.sbw,
                           d=b["qk"] + ts * Rr, g=S - ts * Rr, h=filled - ts * Rr, **qk_common)
                    self.I(Op.LOGITS, f"{hn} logits window", a=b["qk"] + S, b=b["qamax"] + qrow, c=b["krange"] + S,
                           d=b["z"] + S, m=1, n=filled - S, k=s.softmax_mult, s=s.softmax_shift)
                self.I(Op.SOFTMAX_EXP, f"{hn} softmax", a=b["z"], d=b["e"], m=1, n=filled)
                self.I(Op.PV_WEIGHTS, f"{hn} pv weights", a=b["e"], b=b["vrange"], d=b["pa"], e=b["wmax"], f=b["esum"],
                       m=1, n=filled)
                kb = -(-filled // L)
                self.I(Op.ENGINE, f"{hn} pv", flags=int(Mode.PV), a=b["pa"], b=filled, m=1, n=kb, k=kb,
                       s=self.v_tiles, c=self.R(f"{c}.v"), f=self.v_beats * self.wbw, d=b["pv"], g=0, h=d)
                self.I(Op.PV_OUT, f"{hn} pv out", a=b["pv"], b=b["wmax"], c=b["esum"], d=b["o"] + qrow * d, m=1, n=d)

    def _head(self, step, t_last, k):
        """Final norm, lm_head and argmax of the chunk's row t_last; the id STOREd to tokens[k]."""
        s, b = self.spec, self.b
        H = s.hidden
        self._norm(step, "final_norm", "final_norm.g", b["x"] + t_last * H, b["fn"], 1, s.final_norm)
        traced = step != "prefill" and self.trace_mode != "none"
        if traced:
            self._store_trace(step, "final_norm", b["fn"], 1, H, 32, True, 0, 1)
        self._quant(step, "lm_head", b["fn"], 1, H, ["lm_head"] if step != "prefill" else [], 0)
        lw = self.lowered[("lm_head",)]
        self._linear_head(step, lw, traced)
        self.I(Op.ARGMAX, f"{step} argmax", a=b["logits"], d=b["tok"], m=1, n=s.vocab)
        if traced:
            self._store_trace(step, "logits", b["logits"], 1, s.vocab, 32, True, 0, 1)
            self._store_trace(step, "next_token", b["tok"], 1, 1, 32, True, 0, 1, one_d=True)
        self.I(Op.STORE, f"{step} token -> tokens[{k}]", a=b["tok"], d=self.R("tokens") + k, n=1, w=32)

    def _linear_head(self, step, lw, traced):
        """The lm_head on the last token, in chunks of ``head_rows`` rows: ENGINE over the chunk's tiles,
        its row multipliers LOADed, RESCALE into the chunk's slice of the logits."""
        b = self.b
        want = self.trace_mode == "all" and step != "prefill"  # no lm_head.* traces for the prefill
        V = lw.n
        ng = lw.k_beats // lw.group_beats
        for r0 in range(0, V, self.head_rows):
            rows = min(self.head_rows, V - r0)
            t0 = r0 // self.p.pe_rows
            note = f"{step} lm_head" + (f" rows {r0}..{r0 + rows - 1}" if rows < V else "")
            self.I(Op.ENGINE, note, flags=lw.flags, a=b["a"], b=lw.k, m=1, n=lw.k_beats, k=lw.group_beats,
                   s=-(-rows // self.p.pe_rows), c=self.R("lm_head.weight") + t0 * lw.k_beats * self.wbw,
                   e=self.R("lm_head.scale") + t0 * ng * self.sbw, d=b["acc"], i0=rows, g=0, h=rows)
            w0 = r0 * 32 // self.W
            self.I(Op.LOAD, f"{note} row_mult", flags=FLAG_SIGNED, a=self.R("lm_head.row_mult") + w0, d=b["rm"],
                   n=rows, w=32)
            self.I(Op.LOAD, f"{note} row_shift", flags=FLAG_SIGNED, a=self.R("lm_head.row_shift") + w0, d=b["rs"],
                   n=rows, w=32)
            self.I(Op.RESCALE, f"{note} rescale", a=b["acc"], b=b["amax"], c=b["rm"], g=b["rs"], d=b["logits"] + r0,
                   m=1, n=rows)
            if want:
                full = f"{step}/lm_head.acc"
                if full not in self.trace:
                    self.trace_region(full, (1, V), 32, True)
                self.I(Op.STORE, f"trace {full}", a=b["acc"], d=self.base + self.trace[full][0] + w0, n=rows, w=32)
        if want:
            self._store_trace(step, "lm_head.y", b["logits"], 1, V, 32, True, 0, 1)


def compile_generation(spec: G.Spec, engine: EngineParams, accel: AccelParams, prompt_ids: list[int],
                       new_tokens: int, *, trace: str = "layers", weights: bool = True,
                       parts: set[str] | None = None) -> Compiled:
    """The program and memory image that prefill ``prompt_ids`` and generate ``new_tokens`` tokens
    greedily (``quant.golden.generate``), checked (``check_program``) before it is returned.
    trace: "none" | "layers" (each step's layerI.out; each decode step's final_norm, logits, next_token)
    | "all" (every per-token tensor the program computes in the golden model's layout).
    weights=False: shape-only (``shape_spec``): the same program, regions and checks, no image (None).
    parts: only these parts of the program (``_Compiler``): every timing of a part is the same as in the
    whole program (the instructions differ only by the program's length in their memory addresses)."""
    c = _Compiler(spec, engine, accel, prompt_ids, new_tokens, trace, weights=weights, parts=parts)
    iw = INSTR_BITS // accel.mem_word_bits
    n_instr = len(c.emit(0))  # the first pass sizes the program (and allocates the trace regions)
    prog_words = n_instr * iw
    program = c.emit(prog_words)  # the second, with every region after the program
    assert len(program) == n_instr
    regions = {"program": (0, prog_words)}
    regions.update({k: (v[0] + prog_words, v[1]) for k, v in c.mem.regions.items()})
    total = prog_words + c.mem.top
    image = None
    if weights:
        image = np.zeros(total * c.mem.WB, np.uint8)
        words = encode_program(program, accel.mem_word_bits)
        wb = c.mem.WB
        prog_bytes = b"".join(int(w).to_bytes(wb, "little") for w in words)
        image[:len(prog_bytes)] = np.frombuffer(prog_bytes, np.uint8)
        for name, data in c.mem.data.items():
            lo = regions[name][0] * wb
            image[lo:lo + data.size] = data
    check_program(program, engine, accel, total, regions, index_max=spec.vocab - 1)
    tr = {k: (v[0] + prog_words, v[1], v[2], v[3]) for k, v in c.trace.items()}
    return Compiled(engine, accel, program, image, regions, tr, list(c.marks), dict(c.sp.bufs), list(c.steps),
                    new_tokens=c.new_tokens)


def compile_decode_step(spec: G.Spec, engine: EngineParams, accel: AccelParams, position: int, *,
                        weights: bool = True, trace: str = "none") -> Compiled:
    """One decode step alone: the step that embeds the token at ``position`` after ``position`` tokens
    (the cache filled as a whole generation leaves it: Λ's sinks + window, or ``position`` + 1 slots
    with full attention), without the prefill's instructions: MARK, MARK, the step (``steps[-1]``,
    "step1"), its MARK, HALT. It is the last step of ``compile_generation`` with a prompt of
    ``position`` tokens and 2 new tokens; the prompt ids are 0 (a step's instructions never depend on
    them; its token id is LOADed from the ``tokens`` word)."""
    if position < 1:
        raise CompileError("position", f"{position}: a decode step follows at least one prompt token")
    return compile_generation(spec, engine, accel, [0] * int(position), 2, trace=trace, weights=weights,
                              parts={"step1"})


def compile_prefill_chunk(spec: G.Spec, engine: EngineParams, accel: AccelParams, start: int | None, prompt: int,
                          *, weights: bool = True, head: bool = False, trace: str = "none") -> Compiled:
    """The prefill chunk at positions ``start`` .. of a ``prompt``-token prompt alone (``start`` a
    multiple of the chunk, min(engine.mm_tokens, prompt); None: no chunk), with the prefill's lm_head if
    ``head``: MARK, the part (``steps[0]``, "prefill"), MARK, HALT, as ``compile_generation`` emits it
    for that prompt."""
    T = min(engine.mm_tokens, int(prompt))
    if start is not None and not (0 <= start < prompt and start % max(T, 1) == 0):
        raise CompileError("start", f"{start}: a chunk starts at a multiple of {T} below the prompt's {prompt} tokens")
    parts = ({f"prefill@{start}"} if start is not None else set()) | ({"prefill_head"} if head else set())
    return compile_generation(spec, engine, accel, [0] * int(prompt), 1, trace=trace, weights=weights, parts=parts)


def shape_spec(*, hidden: int, intermediate: int, layers: int, n_heads: int, n_kv: int, head_dim: int, vocab: int,
               bits: int, group_size: int, sparse: bool, lm_head_bits: int, lm_head_group: int | None = None,
               sinks: int = 0, window: int | None = None, max_positions: int | None = None,
               rms_norm_eps: float = 1e-6) -> G.Spec:
    """A ``quant.golden.Spec`` of a model's shape and formats with no weights: every array a read-only
    zero-stride view (``np.broadcast_to``: no memory however large the model), the scalars the program's
    instructions carry computed as ``quant.model.integer_spec`` computes them (RMSNorm's eps_term from
    the eps and hidden size, the softmax multiplier from head_dim, the standard RoPE table). Compile it
    with ``weights=False``; the instructions are the real compile's (tests/hw/test_compile_shape.py)."""
    def z(shape, dt):
        return np.broadcast_to(np.zeros((), dt), tuple(int(v) for v in shape))

    def lin(name, n, k, b, g, sp):
        return G.Linear(name, z((n, k), np.uint8), z((n, k // g), np.uint8), z((n, k // g), np.int8), int(g), int(b),
                        np.broadcast_to(np.ones((), bool), (n, k)) if sp else None, z((n,), np.int64), z((n,), np.int64))

    if min(hidden, intermediate, layers, n_heads, n_kv, head_dim, vocab, group_size) < 1:
        raise CompileError("model", "every dimension of the shape must be at least 1")
    for what, k in (("hidden", hidden), ("intermediate", intermediate), ("heads x head_dim", n_heads * head_dim)):
        if k % group_size:
            raise CompileError("model", f"{what} = {k} is not a multiple of the group size {group_size}")
    eps_term = R.rmsnorm_params(np.ones(1), rms_norm_eps, hidden)[1]

    def norm():
        return G.Norm(z((hidden,), np.int64), eps_term)

    shapes = {"q_proj": (n_heads * head_dim, hidden), "k_proj": (n_kv * head_dim, hidden),
              "v_proj": (n_kv * head_dim, hidden), "o_proj": (hidden, n_heads * head_dim),
              "gate_proj": (intermediate, hidden), "up_proj": (intermediate, hidden), "down_proj": (hidden, intermediate)}
    lays = [G.Layer(norm(), norm(), {nm: lin(f"layers.{i}.{nm}", n, k, bits, group_size, sparse)
                                     for nm, (n, k) in shapes.items()}) for i in range(layers)]
    hg = lm_head_group or group_size
    mc, sc = R.softmax_params(head_dim)
    return G.Spec(hidden=hidden, n_heads=n_heads, n_kv=n_kv, head_dim=head_dim, layers=lays, final_norm=norm(),
                  lm_head=lin("lm_head", vocab, hidden, lm_head_bits, hg, False),
                  embed_codes=z((vocab, hidden), np.int8), embed_mult=z((vocab,), np.int64),
                  embed_shift=z((vocab,), np.int64), rope_theta=z((head_dim // 2,), np.int64),
                  rope_table=R.rope_params(np.zeros(1), 1.0)[1], softmax_mult=mc, softmax_shift=sc,
                  sinks=sinks if window is not None else 0, window=window, max_positions=max_positions).check()
