"""The accelerator's instruction set: opcodes, fields and their encoding, defined once.

Read by the compiler (``hw/compile.py``), the machine model (``hw/machine.py``), the controller RTL
(``hw/controller.py``) and the special-function units (``hw/sfu/``); ``docs/isa.md`` describes it for
people. This module is the contract: an instruction means exactly what its ``Op`` docstring below says,
and every implementation (numpy model, Amaranth, Verilog) computes that, element for element.

Machine state
-------------
* ``mem``: external memory (HBM), words of ``AccelParams.mem_word_bits`` bits, word-addressed. Packed
  elements of ``w`` bits (4, 8, 16, 32 or 64) lie little-endian: element ``i`` of a region starting at
  word ``a`` occupies bits ``[i*w, (i+1)*w)`` of the concatenation ``mem[a] | mem[a+1] << W | ...``.
* ``spad``: the on-chip scratchpad, ``AccelParams.spad_words`` signed 64-bit elements, one tensor
  element per word, tensors row-major. Every special-function unit reads and writes only the spad.
* the engine (``hw/engine.py``), driven by ``ENGINE``: activations from the spad, weight and scale
  beats from ``mem``, accumulators back to the spad.
* a cycle counter (``MARK``).

One instruction runs at a time, in program order; an instruction starts when the previous one has
finished (its last spad and mem writes done). No instruction's source and destination spad ranges
overlap (the compiler checks it; the units need not handle it).

Encoding
--------
An instruction is ``INSTR_BITS`` = 512 bits, fields at fixed offsets for every opcode (``FIELDS``, first
at bit 0), stored in ``INSTR_BITS / mem_word_bits`` consecutive memory words. Unused fields are 0.
``a``..``h`` are addresses (spad element index or mem word index, as the opcode says), ``n m k s`` counts
or strides, ``i0`` a 64-bit signed immediate, ``w`` an element width, ``flags`` per-opcode bits.
"""

from __future__ import annotations

from dataclasses import dataclass, fields as dc_fields
from enum import IntEnum

__all__ = ["Op", "Instr", "FIELDS", "INSTR_BITS", "ENGINE_MODE_MASK", "FLAG_SIGNED", "FLAG_INDEXED",
           "FLAG_NEG", "FLAG_W4", "ELEMENT_BITS", "encode", "decode", "encode_program", "decode_program",
           "instr_layout", "UNIT_OPS", "ISAError"]

INSTR_BITS = 512

#: (name, bits) in order from bit 0
FIELDS: tuple[tuple[str, int], ...] = (
    ("op", 8), ("flags", 8), ("w", 8), ("rsvd", 8),
    ("a", 32), ("b", 32), ("c", 32), ("d", 32), ("e", 32), ("f", 32), ("g", 32), ("h", 32),
    ("n", 32), ("m", 32), ("k", 32), ("s", 32),
    ("i0", 64),
)
_SIGNED_FIELDS = {"i0"}
assert sum(b for _, b in FIELDS) <= INSTR_BITS

#: element widths LOAD, STORE and SCATTER move
ELEMENT_BITS = (4, 8, 16, 32, 64)

# flags
FLAG_SIGNED = 1 << 0    # LOAD: sign-extend elements
FLAG_INDEXED = 1 << 1   # LOAD: the mem address is a + spad[b] * s
FLAG_NEG = 1 << 2       # SCATTER: store -v instead of v
ENGINE_MODE_MASK = 0b11  # ENGINE: flags[1:0] = hw.engine.Mode (DENSE, SPARSE, QK, PV)
FLAG_W4 = 1 << 2        # ENGINE, DENSE only: the weight codes are 4-bit (the W4 lm_head); else 2-bit


class ISAError(ValueError):
    pass


class Op(IntEnum):
    """Opcodes. Each docstring is the instruction's meaning (T = ``m`` rows, N = ``n`` elements per row
    unless it says otherwise; tensors are compact row-major in the spad)."""

    NOP = 0
    HALT = 1
    MARK = 2
    LOAD = 3
    STORE = 4
    SCATTER = 5
    ENGINE = 6
    EMBED = 8
    RMSNORM = 9
    QUANT_ACT = 10
    RESCALE = 11
    ROPE = 12
    QUANT_KV = 13
    LOGITS = 14
    SOFTMAX_EXP = 15
    PV_WEIGHTS = 16
    PV_OUT = 17
    SILU_MUL = 18
    RESID_ADD = 19
    ARGMAX = 20


_DOCS = {
    Op.NOP: "Nothing.",
    Op.HALT: "Stop: the controller raises ``done`` and executes nothing more.",
    Op.MARK: "mem[d] = the cycle counter (cycles since start, in the low 64 bits; the word's other bits 0). "
             "``n`` is a label the compiler records beside the address (not used by the hardware).",
    Op.LOAD: "For i < n: spad[d + i] = element i (``w`` bits; sign-extended if FLAG_SIGNED else zero-"
             "extended) of the mem region at word A, where A = a, or with FLAG_INDEXED A = a + spad[b] * s.",
    Op.STORE: "The n elements spad[a + i], each truncated to its low ``w`` bits, packed into the mem words "
              "from d on; whole words are written (the last word's unused high bits are 0).",
    Op.SCATTER: "Read-modify-write of packed fields: for o < m, i < n: v = spad[a + o*b + i] (negated with "
                "FLAG_NEG), its low ``w`` bits written at bit position d*W + e + o*f + i*k of mem (W = "
                "mem_word_bits; a field never straddles a word). Every other bit of mem is unchanged.",
    Op.ENGINE: "One engine command (hw/engine.py, docs/engine.md), mode = flags[1:0], no requantization; "
               "DENSE weight codes are 4-bit with FLAG_W4 (the command's ``wide``), else 2-bit (a code above 3 is "
               "refused); FLAG_W4 is refused in the other modes (SPARSE codes are 2-bit, QK/PV codes 4-bit). "
               "tokens T = m, k_beats = n, group_beats = k, tiles = s. Activations: token t's K_tok inputs "
               "(K_tok = n*pe_lanes, or 2*n*pe_lanes in SPARSE) are spad[a + t*b + j] for j < b and 0 for "
               "b <= j < K_tok. Weight beats: tile ti, beat bi from mem word c + ti*F + bi*WB where WB = "
               "weight-beat words and F = f if f else n*WB. Scale beats (not PV): from mem word e on, "
               "consecutive (SB words each), in the engine's order. Outputs: accumulator of token t, row r "
               "(r = ti*pe_rows + lane row) to spad[d + t*i0 + r] when g <= r < h; other rows dropped.",
    Op.EMBED: "For t < m, i < n: spad[d + t*n + i] = saturate_FX(shift_round(spad[a + t*n + i] * "
              "spad[b + 2t], spad[b + 2t + 1])) (reference.embed_lookup with the row's mult and shift).",
    Op.RMSNORM: "spad[d..] (T x N) = reference.rmsnorm(x = spad[a..] (T x N), g = spad[b..b+N), eps_term = i0).",
    Op.QUANT_ACT: "codes, amax = reference.quantize_activations(spad[a..] (T x N)); codes to spad[d..] "
                  "(T x N), amax to spad[e..e+T).",
    Op.RESCALE: "spad[d..] (T x N) = reference.rescale_linear(acc = spad[a..] (T x N), row_mult = spad[c..c+N), "
                "row_shift = spad[g..g+N), *reference.token_multiplier(amax = spad[b..b+T))), with the "
                "effective shift clipped to 0..62 as the reference does.",
    Op.ROPE: "x = spad[a..] as (T, k heads, D = n); positions p_t = min(i0 + t, h); cos, sin = "
             "reference.rope_cos_sin(p, theta = spad[b..b+D/2), the standard table (scaling 1)); "
             "spad[d..] = reference.rope_rotate(x per head, cos, sin), same shape.",
    Op.QUANT_KV: "codes, zero, range = reference.quantize_kv(spad[a..] (T x N)); codes to spad[d..] (T x N), "
                 "zero to spad[e..e+T), range to spad[f..f+T).",
    Op.LOGITS: "spad[d..] (T x N) = reference.attention_logits(acc = spad[a..] (T x N), q_amax = spad[b..b+T), "
               "k_range = spad[c..c+N), mult = k, shift = s).",
    Op.SOFTMAX_EXP: "spad[d..] (T x N) = reference.softmax_exp(z = spad[a..] (T x N)) (every key visible).",
    Op.PV_WEIGHTS: "pa, wmax, esum = reference.pv_weights(e = spad[a..] (T x N), v_range = spad[b..b+N)); pa "
                   "to spad[d..] (T x N), wmax to spad[e..e+T), esum to spad[f..f+T).",
    Op.PV_OUT: "spad[d..] (T x N) = reference.pv_output(acc = spad[a..] (T x N), wmax = spad[b..b+T), "
               "esum = spad[c..c+T)).",
    Op.SILU_MUL: "spad[d + i] = reference.silu_mul(spad[a + i], spad[b + i]) for i < T*N.",
    Op.RESID_ADD: "spad[d + i] = reference.residual_add(spad[a + i], spad[b + i]) for i < T*N.",
    Op.ARGMAX: "spad[d + t] = reference.argmax_first(spad[a + t*N .. a + t*N + N)) for t < T.",
}
for _op, _doc in _DOCS.items():
    _op.__doc__ = _doc

#: opcodes executed by a special-function unit (the rest by the controller itself)
UNIT_OPS = (Op.EMBED, Op.RMSNORM, Op.QUANT_ACT, Op.RESCALE, Op.ROPE, Op.QUANT_KV, Op.LOGITS,
            Op.SOFTMAX_EXP, Op.PV_WEIGHTS, Op.PV_OUT, Op.SILU_MUL, Op.RESID_ADD, Op.ARGMAX)


@dataclass
class Instr:
    op: int = 0
    flags: int = 0
    w: int = 0
    rsvd: int = 0
    a: int = 0
    b: int = 0
    c: int = 0
    d: int = 0
    e: int = 0
    f: int = 0
    g: int = 0
    h: int = 0
    n: int = 0
    m: int = 0
    k: int = 0
    s: int = 0
    i0: int = 0
    #: not encoded: a human label the compiler attaches (layer, operation), for mismatch reports
    note: str = ""

    def __post_init__(self):
        self.op = Op(self.op)

    def __repr__(self):
        used = {f.name: getattr(self, f.name) for f in dc_fields(self)
                if f.name not in ("op", "note") and getattr(self, f.name)}
        body = " ".join(f"{k}={v}" for k, v in used.items())
        return f"{self.op.name} {body}" + (f"  # {self.note}" if self.note else "")


def _check_field(name: str, bits: int, value: int) -> int:
    if name in _SIGNED_FIELDS:
        if not -(1 << (bits - 1)) <= value < (1 << (bits - 1)):
            raise ISAError(f"field {name} = {value} does not fit {bits} signed bits")
        return value & ((1 << bits) - 1)
    if not 0 <= value < (1 << bits):
        raise ISAError(f"field {name} = {value} does not fit {bits} unsigned bits")
    return value


def encode(ins: Instr) -> int:
    """The instruction as an INSTR_BITS-bit integer (field ``op`` at bit 0)."""
    word, at = 0, 0
    for name, bits in FIELDS:
        word |= _check_field(name, bits, int(getattr(ins, name))) << at
        at += bits
    return word


def decode(word: int) -> Instr:
    vals, at = {}, 0
    for name, bits in FIELDS:
        v = (word >> at) & ((1 << bits) - 1)
        if name in _SIGNED_FIELDS and v >> (bits - 1):
            v -= 1 << bits
        vals[name] = v
        at += bits
    try:
        return Instr(**vals)
    except ValueError as exc:
        raise ISAError(f"unknown opcode {vals['op']}") from exc


def instr_words(mem_word_bits: int) -> int:
    return INSTR_BITS // mem_word_bits


def encode_program(program: list[Instr], mem_word_bits: int) -> list[int]:
    """Memory words of a program, INSTR_BITS / mem_word_bits words per instruction (low bits first)."""
    n = instr_words(mem_word_bits)
    mask = (1 << mem_word_bits) - 1
    out = []
    for ins in program:
        v = encode(ins)
        out.extend((v >> (mem_word_bits * j)) & mask for j in range(n))
    return out


def decode_program(words: list[int], mem_word_bits: int) -> list[Instr]:
    n = instr_words(mem_word_bits)
    out = []
    for i in range(0, len(words) - n + 1, n):
        v = 0
        for j in range(n):
            v |= int(words[i + j]) << (mem_word_bits * j)
        out.append(decode(v))
    return out


def instr_layout():
    """The instruction as an Amaranth ``data.StructLayout`` (the controller's decoded register and the
    units' ``instr`` port); field order and widths from ``FIELDS``."""
    from amaranth.hdl import signed, unsigned
    from amaranth.lib import data

    return data.StructLayout({name: (signed(bits) if name in _SIGNED_FIELDS else unsigned(bits))
                              for name, bits in FIELDS})
