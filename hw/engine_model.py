"""A behavioural cycle model of the engine (``hw.engine.Engine``), kept beside the RTL as Amaranth keeps
models beside its library components: for any command stream, the cycle each command is accepted and
each of its output beats leaves, when no stream stalls (every input beat offered as soon as the engine
can take it, ``out.ready`` always high). ``tests/hw/test_engine_model.py`` holds it equal to the RTL's
own cycle counts in simulation; ``sim.estimate`` builds its throughput estimates on it.

The rules, read off the RTL (docs/engine.md, "Cycle behaviour"):

* a command is accepted when the engine is idle and its pipeline empty: at cycle 0 for the first, one
  cycle after the previous command's last tile entered the output bank for the next;
* the activation load takes one cycle per word (``tokens x words_per_token``, 2 x k_beats words per
  token in 2:4 mode), then, ``stages(p).seq`` cycle(s) later (the sequencer's op queue), one op
  (token, weight beat) issues per cycle, ``tiles x k_beats x tokens``
  (x 2 in ``multiplier_style: dsp`` for a 2:4 command, whose beats run as two half-beat ops, and for
  4-bit codes, QK, PV and a ``wide`` DENSE command, whose beats run as two digit ops:
  ``hw.engine_parts.beat_ops``);
* an op reaches the bank stage ``pipe_drain(p)`` cycles after its issue (``hw.engine_parts.stages``:
  the buffer, the array, the group stage, the accumulators, the requantizers); a tile's last-beat ops enter the output bank there.
  The last token arms the bank once the old tile's last beat leaves (this cycle or before); until
  then the whole pipeline stalls (the only stall when no stream stalls: a tile of more tokens than
  the next command needs cycles to load and compute);
* the armed bank sends one beat per token on the following cycles into the output register, which
  puts it on ``out`` ``out_latency(p)`` cycles later.

``Command`` is one ``cmd`` beat (``hw.engine.layouts()["cmd"]``); ``Op`` describes an operation by its
shape (K, N) as the estimator and compiler see it and ``op_command`` lowers it to its command.
"""

from __future__ import annotations

from dataclasses import dataclass

from .engine_parts import TILE_BITS, Mode, beat_ops, max_reduction, stages
from .params import EngineParams

__all__ = ["Command", "CommandTiming", "EngineCommandError", "Op", "MODES", "timeline", "command_cycles",
           "check_command", "op_beats", "op_command", "op_cycles", "sequence_cycles", "ops_cycles",
           "CMD_CYCLES", "pipe_drain", "out_latency", "RESET_CYCLES"]

MODES = ("dense", "sparse", "qk", "pv")
#: the command beat's own cycle
CMD_CYCLES = 1


def pipe_drain(p: EngineParams) -> int:
    """Cycles from an op's issue to the bank stage (through the accumulators and the requantizers into
    the output bank): the RTL's own stage count, ``hw.engine_parts.stages(p).drain``."""
    return stages(p).drain


def out_latency(p: EngineParams) -> int:
    """Cycles from a beat leaving the output bank to ``out`` (the output register,
    ``hw.engine_parts.stages(p).out``)."""
    return stages(p).out

#: the first command after reset starts one cycle late: the testbenches' first cycle is the reset's
RESET_CYCLES = 1


class EngineCommandError(ValueError):
    """A command or operation the engine cannot run; the message names the field and the limit."""


@dataclass(frozen=True)
class Command:
    """One ``cmd`` beat: ``mode`` (``Mode`` or its value), ``tokens``, ``k_beats`` (weight beats per row
    tile per token), ``group_beats`` (weight beats per scale group), ``tiles`` (row tiles of pe_rows
    outputs), ``requant`` (one ``rq`` beat per tile follows), ``wide`` (DENSE: 4-bit weight codes)."""

    mode: int
    tokens: int
    k_beats: int
    group_beats: int
    tiles: int
    requant: bool = False
    wide: bool = False

    def words_per_token(self) -> int:
        return 2 * self.k_beats if self.mode == Mode.SPARSE else self.k_beats


@dataclass(frozen=True)
class CommandTiming:
    """When a command ran (cycles from the first command's acceptance, or from reset): ``accept``
    (its cmd beat taken), ``first_issue``, ``last_issue``, ``out`` (the cycle of each output beat, tile
    by tile, token by token), ``stall_cycles`` (cycles its ops were held by the output bank)."""

    accept: int
    first_issue: int
    last_issue: int
    out: tuple[int, ...]
    stall_cycles: int

    @property
    def last_out(self) -> int:
        return self.out[-1]


def check_command(p: EngineParams, c: Command, where: str = "") -> None:
    """Refuse a command the RTL would run wrongly, naming the field."""
    at = f"{where}: " if where else ""
    kb_max = max_reduction(p) // p.pe_lanes
    if c.mode not in tuple(Mode):
        raise EngineCommandError(f"{at}mode {c.mode!r} is not one of {', '.join(m.name for m in Mode)}")
    if not 1 <= c.tokens <= p.mm_tokens:
        raise EngineCommandError(f"{at}tokens = {c.tokens}: must be 1..engine.mm_tokens = {p.mm_tokens}")
    if not 1 <= c.k_beats <= kb_max:
        raise EngineCommandError(f"{at}k_beats = {c.k_beats}: must be 1..{kb_max} "
                                 f"(max(max_reduction_len, max_keys) / pe_lanes)")
    if not 1 <= c.group_beats <= c.k_beats or c.k_beats % c.group_beats:
        raise EngineCommandError(f"{at}group_beats = {c.group_beats} must divide k_beats = {c.k_beats}")
    if not 1 <= c.tiles < 1 << TILE_BITS:
        raise EngineCommandError(f"{at}tiles = {c.tiles}: must be 1..{(1 << TILE_BITS) - 1}")
    if c.wide and c.mode != Mode.DENSE:
        raise EngineCommandError(f"{at}wide (4-bit weight codes) is a DENSE field: {Mode(c.mode).name} codes "
                                 f"are 2-bit (SPARSE) or always 4-bit (QK, PV)")
    words = c.tokens * c.words_per_token()
    if words * p.pe_lanes > p.act_buffer_bytes:
        raise EngineCommandError(f"{at}{c.tokens} tokens x {c.words_per_token()} words of {p.pe_lanes} bytes "
                                 f"exceed engine.act_buffer_bytes = {p.act_buffer_bytes}")


def timeline(p: EngineParams, commands: list[Command], from_reset: bool = False) -> list[CommandTiming]:
    """Each command's ``CommandTiming`` when the commands run back to back and no stream stalls."""
    out = []
    accept = RESET_CYCLES if from_reset else 0
    bank_arm, bank_tokens = None, 0  # the tile in the output bank: the cycle it was armed, its tokens
    for i, c in enumerate(commands):
        check_command(p, c, f"command {i}")
        T, kb, h = c.tokens, c.k_beats, beat_ops(p, c.mode, c.wide)
        # after the cmd beat, the load and the sequencer's op queue (stages(p).seq)
        first_issue = accept + CMD_CYCLES + T * c.words_per_token() + stages(p).seq
        delay = 0  # stall cycles so far in this command
        beats = []
        for tile in range(c.tiles):
            # nominal S3 cycle of the tile's last-beat (last-half) op for token 0, after the stalls so far
            s3 = first_issue + (tile * kb + kb - 1) * T * h + (h - 1) * T + pipe_drain(p) + delay
            # The tile's tokens reach S3 on consecutive cycles; the last arms the bank once the old
            # tile's last beat leaves (this cycle or before). Token t < T - 1 must also wait for the
            # old token t, but never does here: within a command the old tile has the same tokens and
            # left k_beats x tokens cycles earlier, and a new command's token t reaches S3 at least
            # its load (>= tokens words) + 4 cycles after the old tile was armed, after old token t.
            arm = s3 + T - 1
            if bank_arm is not None:
                arm = max(arm, bank_arm + bank_tokens)
            delay = arm - (first_issue + (tile * kb + kb - 1) * T * h + (h - 1) * T + pipe_drain(p) + T - 1)
            beats += [arm + 1 + out_latency(p) + t for t in range(T)]
            bank_arm, bank_tokens = arm, T
        last_issue = first_issue + c.tiles * kb * T * h - 1 + delay
        out.append(CommandTiming(accept, first_issue, last_issue, tuple(beats), delay))
        accept = bank_arm + 1  # idle with an empty pipeline once the last tile entered the bank
    return out


def command_cycles(p: EngineParams, commands: list[Command], from_reset: bool = False) -> list[int]:
    """Cycles of each command run back to back, from the previous command's last output beat to its
    own (the first from its acceptance, or from reset with ``from_reset``)."""
    tl = timeline(p, commands, from_reset)
    prev = 0
    res = []
    for i, ct in enumerate(tl):
        res.append(ct.last_out - (prev if i else (0 if from_reset else ct.accept)))
        prev = ct.last_out
    return res


# ---------------------------------------------------------------------------------------------------
# Operations by shape (the estimator's and the compiler's view)
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Op:
    """One engine command by its shape: ``mode``, ``tokens`` (1..mm_tokens), reduction length ``k`` in
    dense positions (keys for pv), ``n`` output rows (keys for qk, value channels for pv), ``group``
    inputs per scale, ``code_bits`` of the dense weight codes (4: the W4 lm_head)."""

    mode: str
    tokens: int
    k: int
    n: int
    group: int = 0
    name: str = ""
    code_bits: int = 2


def op_beats(p: EngineParams, op: Op) -> tuple[int, int, int]:
    """(k_beats, tiles, act words per token) of ``op``, after checking the engine can run it."""
    if op.mode not in MODES:
        raise EngineCommandError(f"engine mode {op.mode!r}: one of {', '.join(MODES)}")
    per_beat = 2 * p.pe_lanes if op.mode == "sparse" else p.pe_lanes
    where = f"{op.name or op.mode} (K = {op.k}, N = {op.n}, {op.tokens} tokens)"
    if not 1 <= op.tokens <= p.mm_tokens:
        raise EngineCommandError(f"{where}: tokens must be 1..engine.mm_tokens = {p.mm_tokens}")
    if op.k % per_beat:
        raise EngineCommandError(f"{where}: K is not a multiple of {per_beat} "
                                 f"({'2 x ' if op.mode == 'sparse' else ''}engine.pe_lanes)")
    limit = {"qk": ("max_head_dim", p.max_head_dim), "pv": ("max_keys", p.max_keys)}.get(
        op.mode, ("max_reduction_len", p.max_reduction_len))
    if op.k > limit[1]:
        raise EngineCommandError(f"{where}: K = {op.k} exceeds engine.{limit[0]} = {limit[1]}")
    if op.mode in ("dense", "sparse") and (op.group <= 0 or op.group % per_beat or op.k % op.group):
        raise EngineCommandError(f"{where}: group size {op.group} must be a multiple of {per_beat} dividing K")
    if op.mode == "pv" and op.n > p.max_head_dim:
        raise EngineCommandError(f"{where}: {op.n} value channels exceed engine.max_head_dim = {p.max_head_dim}")
    if op.tokens * op.k > p.act_buffer_bytes:
        raise EngineCommandError(f"{where}: {op.tokens} x {op.k} int8 inputs exceed engine.act_buffer_bytes = "
                                 f"{p.act_buffer_bytes}")
    kb = op.k // per_beat
    words = op.k // p.pe_lanes
    return kb, -(-op.n // p.pe_rows), words


def op_command(p: EngineParams, op: Op, requant: bool = False) -> Command:
    """The ``cmd`` beat of ``op``: Q.K^T's group is the whole head_dim, P.V has no scale groups."""
    kb, tiles, _ = op_beats(p, op)
    mode = Mode[op.mode.upper()]
    gb = kb if op.mode in ("qk", "pv") else op.group // (2 * p.pe_lanes if op.mode == "sparse" else p.pe_lanes)
    return Command(mode, op.tokens, kb, gb, tiles, requant, wide=op.mode == "dense" and op.code_bits == 4)


def op_cycles(p: EngineParams, op: Op) -> int:
    """Cycles of one command on an idle engine: from its acceptance to its last output beat."""
    return command_cycles(p, [op_command(p, op)])[0]


def sequence_cycles(p: EngineParams, ops: list[Op], from_reset: bool = False) -> list[int]:
    """Cycles of each operation run back to back, from the previous one's last output beat to its own
    (``command_cycles``)."""
    return command_cycles(p, [op_command(p, op) for op in ops], from_reset)


def ops_cycles(p: EngineParams, ops: list[Op]) -> int:
    return sum(sequence_cycles(p, ops))
