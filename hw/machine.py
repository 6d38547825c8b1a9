"""The machine model: the accelerator's instruction set (``hw/isa.py``) executed in numpy, exactly as each
opcode's docstring says, with ``quant.reference`` doing the arithmetic.

``run(image, engine, accel)`` fetches the program from memory word 0, one instruction at a time, and
executes it on the machine state of ``hw/isa.py``: ``mem`` (the memory image, bytes, words of
``accel.mem_word_bits`` little-endian), ``spad`` (``accel.spad_words`` int64 elements) and the engine.
The engine is modelled from its *beats*: weight and scale beats are read back from ``mem`` and decoded
with the engine's payload layouts (``hw.engine.layouts``, ``hw.beats``), and the products are formed
lane by lane as the array forms them (docs/engine.md), so a compiler that lays beats out wrongly gives
wrong numbers here, as it would on the RTL. It is what the compiler (``hw/compile.py``) is proved
against and what the RTL's final memory is compared with.

Cycles: the controller's cycle model (``hw.controller_model``: fetch and prefetch, LOAD/STORE/SCATTER/
MARK, ENGINE streaming with the engine's rules, each special-function unit's own ``cycles`` model) for a
memory that never stalls, ``mem`` (``MemTiming``: latency, words per cycle; default latency 8, one word
per cycle, as ``sim.accel_sim``'s default). ``MachineRun.cycles`` is the ``cycles`` counter the RTL
shows at ``done``, ``instr_cycles`` each instruction's cycles (DECODE to next DECODE), ``op_cycles``
per opcode and ``layer_cycles`` per layer of each step (``note_layer`` of the
instruction's compiler note, when a ``hw.compile.Compiled`` is run); each MARK stores the model's counter value. ``MachineRun.cycles`` is
None when some executed unit opcode has no model yet (MARK then stores the model without it).
``controller_cycles`` is the older rough estimate, kept for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from quant import reference as R
from quant.formats import ACT, FX, SPARSE_PATTERNS

from . import beats as B
from .engine import Mode, layouts
from .isa import (ENGINE_MODE_MASK, FLAG_INDEXED, FLAG_NEG, FLAG_SIGNED, FLAG_W4, INSTR_BITS, ISAError, Instr, Op, UNIT_OPS,
                  decode)
from .params import AccelParams, EngineParams
from . import controller_model as CM

__all__ = ["run", "MachineRun", "MachineError", "Machine", "controller_cycles", "beat_words", "note_layer"]


class MachineError(RuntimeError):
    """An instruction the machine cannot execute (out-of-range address, operand outside its format,
    accumulator overflow, no HALT within the instruction limit); names the instruction and its index."""


@dataclass
class MachineRun:
    mem: np.ndarray  # uint8, the memory after HALT
    instrs: int  # instructions executed (HALT included)
    cycles: int | None  # estimated cycles (None: some executed unit has no cycle model yet)
    per_op: dict[str, int] = field(default_factory=dict)  # opcode name -> instructions executed
    spad: np.ndarray | None = None
    instr_cycles: list[int] = field(default_factory=list)  # each executed instruction's cycles (model)
    op_cycles: dict[str, int] = field(default_factory=dict)  # opcode name -> cycles
    layer_cycles: dict[str, int] = field(default_factory=dict)  # label (note's first word) -> cycles


def beat_words(engine: EngineParams, accel: AccelParams) -> dict[str, int]:
    """Memory words one beat of each engine stream occupies (a beat starts at a word boundary)."""
    W = accel.mem_word_bits
    return {k: -(-B.width(v) // W) for k, v in layouts(engine).items()}


def controller_cycles(ins: Instr, engine: EngineParams, accel: AccelParams) -> int:
    """The machine's estimate for the controller's own operations (not measured on the RTL): one word
    per cycle for LOAD and STORE, two cycles per field for SCATTER (read-modify-write), and for ENGINE
    the activation load (tokens x K_tok / pe_lanes) plus one issue per weight beat and token plus a
    4-cycle pipeline. Everything else: 1."""
    W = accel.mem_word_bits
    op = Op(ins.op)
    if op in (Op.LOAD, Op.STORE):
        return 1 + -(-ins.n * max(ins.w, 1) // W)
    if op == Op.SCATTER:
        return 1 + 2 * ins.m * ins.n
    if op == Op.ENGINE:
        per = 2 if (ins.flags & ENGINE_MODE_MASK) == Mode.SPARSE else 1
        return ins.m * ins.n * per + ins.s * ins.n * ins.m + 4
    return 1


def note_layer(note: str) -> str:
    """The layer a compiler note names: "prefill layer 0 attn.q_proj" -> "prefill/layer0",
    "step1 lm_head chunk 2" -> "step1/lm_head", "mark start" -> "mark"."""
    w = note.split()
    if len(w) >= 3 and w[1] == "layer":
        return f"{w[0]}/layer{w[2]}"
    if len(w) >= 2:
        return f"{w[0]}/{w[1]}" if w[0] not in ("mark", "trace") else w[0]
    return w[0] if w else ""


def _unit_models() -> dict:
    try:
        from .sfu.registry import available_units
    except ImportError:  # pragma: no cover - the registry is part of the contract
        return {}
    return {op: getattr(cls, "cycles", None) for op, cls in available_units().items()}


class Machine:
    def __init__(self, image: np.ndarray, engine: EngineParams, accel: AccelParams,
                 mem: CM.MemTiming | None = None, notes: list[str] | None = None):
        self.p, self.a = engine, accel
        self.memt = mem or CM.MemTiming()
        self.notes = notes
        self.W = accel.mem_word_bits
        self.WB = self.W // 8
        self.mem = np.array(image, np.uint8, copy=True)
        if self.mem.size % self.WB:
            raise MachineError(f"memory image of {self.mem.size} bytes is not whole {self.W}-bit words")
        self.words = self.mem.size // self.WB
        self.spad = np.zeros(accel.spad_words, np.int64)
        self.lay = layouts(engine)
        self.bw = beat_words(engine, accel)
        self.cycle = 0
        self.unknown_cycles = False
        self.models = _unit_models()
        self.per_op: dict[str, int] = {}
        self.pc = 0
        self.ins: Instr | None = None
        self.index = 0

    # ------------------------------------------------------------------ helpers
    def _err(self, msg: str):
        ins = self.ins
        where = f"instruction {self.index} (word {self.pc}) {ins!r}" if ins is not None else "machine"
        raise MachineError(f"{where}: {msg}")

    def _sp(self, start: int, n: int, what: str) -> slice:
        if start < 0 or n < 0 or start + n > self.spad.size:
            self._err(f"{what}: spad[{start}..{start + n}) outside the scratchpad of {self.spad.size} words")
        return slice(start, start + n)

    def _rd(self, start: int, n: int, what: str) -> np.ndarray:
        return self.spad[self._sp(start, n, what)].copy()

    def _wr(self, start: int, values, what: str):
        v = np.asarray(values, np.int64).reshape(-1)
        self.spad[self._sp(start, v.size, what)] = v

    def _mem_bytes(self, word: int, nbytes: int, what: str) -> slice:
        lo = word * self.WB
        if word < 0 or lo + nbytes > self.mem.size:
            self._err(f"{what}: mem words [{word}..{word + -(-nbytes // self.WB)}) outside the memory of "
                      f"{self.words} words")
        return slice(lo, lo + nbytes)

    def read_elements(self, word: int, n: int, w: int, signed: bool) -> np.ndarray:
        if w not in (4, 8, 16, 32, 64):
            self._err(f"element width {w} is not one of 4, 8, 16, 32, 64")
        raw = self.mem[self._mem_bytes(word, -(-n * w // 8), "LOAD")]
        if w == 4:
            nib = np.stack([raw & 15, raw >> 4], axis=1).reshape(-1)[:n].astype(np.int64)
            return np.where(nib >= 8, nib - 16, nib) if signed else nib
        v = raw.view(f"<{'i' if signed else 'u'}{w // 8}").astype(np.int64)
        return v

    def write_elements(self, word: int, values, w: int):
        v = np.asarray(values, np.int64).reshape(-1)
        n = v.size
        nwords = -(-n * w // self.W)
        buf = np.zeros(nwords * self.WB, np.uint8)
        if w == 4:
            nib = (v & 15).astype(np.uint8)
            if n % 2:
                nib = np.concatenate([nib, np.zeros(1, np.uint8)])
            packed = nib[0::2] | (nib[1::2] << 4)
        else:
            packed = (v & ((1 << w) - 1) if w < 64 else v).astype(f"<u{w // 8}").view(np.uint8)
        buf[:packed.size] = packed
        self.mem[self._mem_bytes(word, buf.size, "STORE")] = buf

    def _beats(self, stream: str, words: np.ndarray) -> dict[str, np.ndarray]:
        nb = self.bw[stream] * self.WB
        if words.size == 0:
            return {nm: np.zeros((0, c), np.int64) for nm, _, _, c in B.fields(self.lay[stream])}
        if words.min() < 0 or (words.max() + self.bw[stream]) > self.words:
            self._err(f"ENGINE: {stream} beats at words {int(words.min())}..{int(words.max())} outside the "
                      f"memory of {self.words} words")
        idx = (words[:, None] * self.WB + np.arange(nb)[None, :])
        return B.unpack_le(self.lay[stream], self.mem[idx])

    # ------------------------------------------------------------------ the engine
    def engine(self, ins: Instr):
        p = self.p
        Rr, L = p.pe_rows, p.pe_lanes
        mode = Mode(ins.flags & ENGINE_MODE_MASK)
        T, n, gb, tiles = ins.m, ins.n, ins.k, ins.s
        if not 1 <= T <= p.mm_tokens:
            self._err(f"ENGINE: tokens {T} outside 1..mm_tokens = {p.mm_tokens}")
        if n < 1 or tiles < 1:
            self._err("ENGINE: k_beats and tiles must be >= 1")
        per = 2 * L if mode == Mode.SPARSE else L
        ktok = n * per
        if ins.b > ktok:
            self._err(f"ENGINE: {ins.b} inputs per token exceed the {ktok} the k_beats cover")
        if T * ktok > p.act_buffer_bytes:
            self._err(f"ENGINE: {T} tokens x {ktok} inputs exceed act_buffer_bytes = {p.act_buffer_bytes}")
        act = np.zeros((T, ktok), np.int64)
        act[:, :ins.b] = self._rd(ins.a, T * ins.b, "ENGINE activations").reshape(T, ins.b)
        if act.size and (act.min() < ACT.min or act.max() > ACT.max):
            self._err("ENGINE: an activation is outside int8")
        wbw = self.bw["weight"]
        F = ins.f if ins.f else n * wbw
        wwords = (ins.c + np.arange(tiles)[:, None] * F + np.arange(n)[None, :] * wbw).reshape(-1)
        wb = self._beats("weight", wwords)
        codes = wb["codes"].reshape(tiles, n, Rr, L)
        if ins.flags & FLAG_W4 and mode != Mode.DENSE:
            self._err(f"ENGINE: FLAG_W4 (4-bit weight codes) in {mode.name} mode: DENSE only")
        if mode == Mode.DENSE and not ins.flags & FLAG_W4 and codes.size and codes.max() > 3:
            self._err("ENGINE: a DENSE weight code above 3 without FLAG_W4 (2-bit codes): set FLAG_W4 for "
                      "4-bit codes")
        if mode == Mode.PV:
            zero = wb["zero"].reshape(tiles, n, L)
            x = act.reshape(T, n, L)
            pr = np.einsum("tbl,kbrl->tkr", x, codes)
            za = np.einsum("tbl,kbl->tk", x, zero)
            acc = pr - za[:, :, None]
        else:
            if gb < 1 or n % gb:
                self._err(f"ENGINE: group_beats {gb} does not divide k_beats {n}")
            ng = n // gb
            sw = ins.e + np.arange(tiles * ng) * self.bw["scale"]
            sb = self._beats("scale", sw)
            s = sb["s"].reshape(tiles, ng, Rr)
            m = sb["m"].reshape(tiles, ng, Rr)
            m = np.where(m >= 128, m - 256, m)
            if mode == Mode.SPARSE:
                meta = wb["meta"].reshape(tiles, n, Rr, L // 2)
                if meta.size and meta.max() >= len(SPARSE_PATTERNS):
                    self._err("ENGINE: a 2:4 pattern index above 5")
                pats = np.asarray(SPARSE_PATTERNS, np.int64)
                x4 = act.reshape(T, n, L // 2, 4)
                c2 = codes & 3  # the high digit is ignored in 2:4 mode
                first, second = pats[meta, 0], pats[meta, 1]  # (tiles, n, R, L/2)
                bi = np.arange(n)[None, :, None, None]
                pi = np.arange(L // 2)[None, None, None, :]
                a1 = x4[:, bi, pi, first]  # (T, tiles, n, R, L/2)
                a2 = x4[:, bi, pi, second]
                prod = (c2[None, ..., 0::2] * a1 + c2[None, ..., 1::2] * a2).sum(axis=4)  # (T, tiles, n, R)
                asum = (a1 + a2).sum(axis=4)
            else:
                x = act.reshape(T, n, L)
                prod = np.einsum("tbl,kbrl->tkbr", x, codes)
                asum = np.broadcast_to(x.sum(axis=2)[:, None, :, None], prod.shape)
            P = prod.reshape(T, tiles, ng, gb, Rr).sum(axis=3)
            A = asum.reshape(T, tiles, ng, gb, Rr).sum(axis=3)
            acc = (s[None] * P + m[None] * A).sum(axis=2)  # (T, tiles, R)
        acc = acc.reshape(T, tiles * Rr)
        lim = 1 << (p.acc_bits - 1)
        if acc.size and (acc.min() < -lim or acc.max() >= lim):
            self._err(f"ENGINE: an accumulator leaves the {p.acc_bits}-bit range")
        lo, hi = ins.g, ins.h
        if not 0 <= lo <= hi <= tiles * Rr:
            self._err(f"ENGINE: row filter {lo} <= r < {hi} outside the {tiles * Rr} rows computed")
        for t in range(T):
            self._wr(ins.d + t * ins.i0 + lo, acc[t, lo:hi], "ENGINE outputs")

    # ------------------------------------------------------------------ one instruction
    def step(self, ins: Instr) -> bool:
        op = Op(ins.op)
        T, N = ins.m, ins.n
        rd, wr = self._rd, self._wr
        if op == Op.NOP:
            pass
        elif op == Op.HALT:
            return False
        elif op == Op.MARK:
            sl = self._mem_bytes(ins.d, self.WB, "MARK")
            buf = np.zeros(self.WB, np.uint8)
            buf[:8] = np.array([self.cycle + 2], "<u8").view(np.uint8)  # the counter in MARK's M_WR
            self.mem[sl] = buf
        elif op == Op.LOAD:
            A = ins.a
            if ins.flags & FLAG_INDEXED:
                A = ins.a + int(rd(ins.b, 1, "LOAD index")[0]) * ins.s
            wr(ins.d, self.read_elements(A, N, ins.w, bool(ins.flags & FLAG_SIGNED)), "LOAD")
        elif op == Op.STORE:
            self.write_elements(ins.d, rd(ins.a, N, "STORE"), ins.w)
        elif op == Op.SCATTER:
            self.scatter(ins)
        elif op == Op.ENGINE:
            self.engine(ins)
        elif op == Op.EMBED:
            c = rd(ins.a, T * N, "EMBED codes").reshape(T, N)
            ms = rd(ins.b, 2 * T, "EMBED multipliers").reshape(T, 2)
            if ms[:, 1].min(initial=0) < 0:
                self._err("EMBED: a negative shift")
            wr(ins.d, R.saturate(R.shift_round(c * ms[:, :1], ms[:, 1:]), FX), "EMBED")
        elif op == Op.RMSNORM:
            wr(ins.d, R.rmsnorm(rd(ins.a, T * N, "RMSNORM x").reshape(T, N), rd(ins.b, N, "RMSNORM g"), ins.i0),
               "RMSNORM")
        elif op == Op.QUANT_ACT:
            codes, amax = R.quantize_activations(rd(ins.a, T * N, "QUANT_ACT").reshape(T, N))
            wr(ins.d, codes, "QUANT_ACT codes")
            wr(ins.e, amax, "QUANT_ACT amax")
        elif op == Op.RESCALE:
            tm, te = R.token_multiplier(rd(ins.b, T, "RESCALE amax"))
            y = R.rescale_linear(rd(ins.a, T * N, "RESCALE acc").reshape(T, N), rd(ins.c, N, "RESCALE row_mult"),
                                 rd(ins.g, N, "RESCALE row_shift"), tm, te)
            wr(ins.d, y, "RESCALE")
        elif op == Op.ROPE:
            heads, D = ins.k, N
            x = rd(ins.a, T * heads * D, "ROPE x").reshape(T, heads, D)
            pos = np.minimum(ins.i0 + np.arange(T), ins.h)
            # the standard table (scaling 1): the hardware's own; theta from the spad
            cos, sin = R.rope_cos_sin(pos, rd(ins.b, D // 2, "ROPE theta"), _STANDARD_ROPE_TABLE)
            y = R.rope_rotate(x.transpose(1, 0, 2), cos, sin).transpose(1, 0, 2)
            wr(ins.d, y, "ROPE")
        elif op == Op.QUANT_KV:
            codes, zero, rng = R.quantize_kv(rd(ins.a, T * N, "QUANT_KV").reshape(T, N))
            wr(ins.d, codes, "QUANT_KV codes")
            wr(ins.e, zero, "QUANT_KV zero")
            wr(ins.f, rng, "QUANT_KV range")
        elif op == Op.LOGITS:
            z = R.attention_logits(rd(ins.a, T * N, "LOGITS acc").reshape(T, N), rd(ins.b, T, "LOGITS q_amax"),
                                   rd(ins.c, N, "LOGITS k_range"), ins.k, ins.s)
            wr(ins.d, z, "LOGITS")
        elif op == Op.SOFTMAX_EXP:
            wr(ins.d, R.softmax_exp(rd(ins.a, T * N, "SOFTMAX_EXP").reshape(T, N)), "SOFTMAX_EXP")
        elif op == Op.PV_WEIGHTS:
            pa, wmax, esum = R.pv_weights(rd(ins.a, T * N, "PV_WEIGHTS e").reshape(T, N),
                                          rd(ins.b, N, "PV_WEIGHTS v_range"))
            wr(ins.d, pa, "PV_WEIGHTS pa")
            wr(ins.e, wmax, "PV_WEIGHTS wmax")
            wr(ins.f, esum, "PV_WEIGHTS esum")
        elif op == Op.PV_OUT:
            wr(ins.d, R.pv_output(rd(ins.a, T * N, "PV_OUT acc").reshape(T, N), rd(ins.b, T, "PV_OUT wmax"),
                                  rd(ins.c, T, "PV_OUT esum")), "PV_OUT")
        elif op == Op.SILU_MUL:
            wr(ins.d, R.silu_mul(rd(ins.a, T * N, "SILU_MUL gate"), rd(ins.b, T * N, "SILU_MUL up")), "SILU_MUL")
        elif op == Op.RESID_ADD:
            wr(ins.d, R.residual_add(rd(ins.a, T * N, "RESID_ADD x"), rd(ins.b, T * N, "RESID_ADD y")), "RESID_ADD")
        elif op == Op.ARGMAX:
            wr(ins.d, R.argmax_first(rd(ins.a, T * N, "ARGMAX").reshape(T, N)), "ARGMAX")
        else:  # pragma: no cover - Op() has refused unknown opcodes
            self._err(f"opcode {op!r} not modelled")
        return True

    def scatter(self, ins: Instr):
        w = ins.w
        if w not in (4, 8, 16, 32, 64):
            self._err(f"SCATTER: element width {w}")
        o, i = np.meshgrid(np.arange(ins.m), np.arange(ins.n), indexing="ij")
        src = (ins.a + o * ins.b + i).reshape(-1)
        if src.size == 0:
            return
        if src.min() < 0 or src.max() >= self.spad.size:
            self._err("SCATTER: source outside the scratchpad")
        v = self.spad[src]
        if ins.flags & FLAG_NEG:
            v = -v
        pos = (ins.d * self.W + ins.e + o * ins.f + i * ins.k).reshape(-1)
        if pos.min() < 0 or (pos.max() + w) > self.mem.size * 8:
            self._err("SCATTER: a field outside the memory")
        if np.any(pos // self.W != (pos + w - 1) // self.W):
            self._err("SCATTER: a field straddles a memory word")
        if w == 4:
            if np.any(pos % 4):
                self._err("SCATTER: 4-bit field not nibble-aligned")  # the RTL may allow it; the compiler never emits it
            byte, hi = pos // 8, (pos % 8) == 4
            nib = (v & 15).astype(np.uint8)
            for bt, h, nb in zip(byte, hi, nib):  # in order: a later field wins, as sequential writes do
                cur = self.mem[bt]
                self.mem[bt] = (cur & 0x0F) | (nb << 4) if h else (cur & 0xF0) | nb
        else:
            if np.any(pos % 8):
                self._err("SCATTER: field not byte-aligned")
            nbytes = w // 8
            vals = (v & ((1 << w) - 1) if w < 64 else v).astype(f"<u{nbytes}").view(np.uint8).reshape(-1, nbytes)
            for start, bts in zip(pos // 8, vals):
                self.mem[start:start + nbytes] = bts

    def run(self, max_instrs: int | None = None) -> MachineRun:
        limit = self.a.max_program_instrs if max_instrs is None else int(max_instrs)
        iw = INSTR_BITS // self.W
        self.pc, self.index = 0, 0
        self.cycle = self.memt.latency + self.memt.gap(iw - 1) + 1  # the first instruction's fetch
        self.instr_cycles, self.op_cycles, self.layer_cycles = [], {}, {}
        while True:
            if self.index >= limit:
                raise MachineError(f"no HALT within {limit} instructions (pc = word {self.pc})")
            sl = self._mem_bytes(self.pc, iw * self.WB, "fetch")
            try:
                ins = decode(int.from_bytes(self.mem[sl].tobytes(), "little"))
            except ISAError as exc:
                raise MachineError(f"instruction {self.index} at word {self.pc}: {exc}") from exc
            self.ins = ins
            name = ins.op.name
            self.per_op[name] = self.per_op.get(name, 0) + 1
            try:
                going = self.step(ins)
            except R.FormatError as exc:
                self._err(f"operand outside its format: {exc}")
            if ins.op in UNIT_OPS and self.models.get(ins.op) is None:
                self.unknown_cycles = True
                c = CM.instr_period(ins, self.p, self.a, self.memt, {ins.op: lambda i, a: controller_cycles(
                    i, self.p, self.a)})
            else:
                c = CM.instr_period(ins, self.p, self.a, self.memt, self.models)
            self.cycle += c
            self.instr_cycles.append(c)
            self.op_cycles[name] = self.op_cycles.get(name, 0) + c
            if self.notes is not None and self.index < len(self.notes):
                label = note_layer(self.notes[self.index]) or name
                self.layer_cycles[label] = self.layer_cycles.get(label, 0) + c
            self.index += 1
            self.pc += iw
            if not going:
                break
        return MachineRun(self.mem, self.index, None if self.unknown_cycles else self.cycle, dict(self.per_op),
                          self.spad, list(self.instr_cycles), dict(self.op_cycles), dict(self.layer_cycles))


_STANDARD_ROPE_TABLE = R.rope_params(np.zeros(1), 1.0)[1]


def run(compiled_or_image, engine: EngineParams | None = None, accel: AccelParams | None = None, *,
        max_instrs: int | None = None, mem: CM.MemTiming | None = None) -> MachineRun:
    """Execute a memory image (or a ``hw.compile.Compiled``: its image, and its program's notes label
    ``layer_cycles``) from word 0 until HALT; cycles for the memory ``mem`` (``hw.controller_model``)."""
    image = getattr(compiled_or_image, "image", compiled_or_image)
    engine = engine if engine is not None else getattr(compiled_or_image, "engine", None)
    accel = accel if accel is not None else getattr(compiled_or_image, "accel", None)
    if engine is None or accel is None:
        raise MachineError("run: an image needs its EngineParams and AccelParams")
    prog = getattr(compiled_or_image, "program", None)
    notes = [i.note for i in prog] if prog is not None else None
    return Machine(np.asarray(image, np.uint8), engine, accel, mem, notes).run(max_instrs)
