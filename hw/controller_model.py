"""A behavioural cycle model of the accelerator's controller (``hw.controller``) beside the RTL, for a
memory that never stalls (``sim.accel_sim``'s model with stall profile ``none``): a read job accepted
in cycle c delivers its first word at c + ``latency``, then one word per cycle (``words_per_cycle`` < 1
thins that out: word j of a job no earlier than ``j / words_per_cycle`` cycles after its first); a write
is accepted at once and answered ``latency`` cycles later.

The rules, read off the RTL (``docs/isa.md``, "Controller"; ``tests/sim/test_cycle_model.py`` holds
whole compiled programs to the RTL's MARK counts under Verilator):

* the first instruction is fetched on read port 0 (``INSTR_BITS / W`` words): the controller decodes
  it at cycle ``latency + IW``; every later one is prefetched on read port 1 while the previous one
  executes: the request leaves in the GO cycle, the instruction is decodable ``latency + IW`` cycles
  later. An instruction a client runs for ``busy`` cycles (high from the cycle after GO) takes
  ``max(busy + 4, latency + IW + 2)`` cycles from its DECODE to the next DECODE (DECODE, GO, WAIT
  until busy falls, NEXT); NOP refetches (``latency + IW + 2``), HALT stops the counter one cycle on.
* MemOps (``busy_cycles``): LOAD ``2 + latency + n`` (+1 indexed; the words' arrival with
  ``words_per_cycle`` < 1), STORE ``n + words + latency + 2`` (one element per cycle, one bubble per
  word written, then the last write's answer), MARK ``latency + 2`` (the counter it stores is the
  value at DECODE + 2), SCATTER row by row (``scatter_busy``): one read job per row streaming the
  row's words, two cycles per field, a write-back per word left.
* ENGINE: 18 cycles of checks and the restoring division of k_beats by group_beats, then the streams
  (``engine_run``): activations one spad element per cycle (``pe_lanes + 1`` cycles per beat), the
  weight jobs (one per tile, at most ``QUEUE`` outstanding; with ``weight_lanes`` > 1 on the wide port,
  a beat's ``ceil(words / weight_lanes)`` transfers in place of its words) and the scale job from memory, the
  engine's issue, pipeline and output bank as ``hw.engine_model`` states them, and the output beats
  written to the spad one row per cycle (``pe_rows + 1`` cycles per beat).
* special-function units: their own ``cycles`` model (``hw.sfu.registry``).

``program_timeline`` gives every instruction's DECODE cycle and its cycles, the value each MARK writes
and the total the accelerator's ``cycles`` counter shows at ``done``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .engine import Mode, beat_ops, layouts
from .engine_model import out_latency, pipe_drain
from .engine_parts import stages
from .isa import ENGINE_MODE_MASK, FLAG_INDEXED, FLAG_W4, INSTR_BITS, UNIT_OPS, Instr, Op
from .params import AccelParams, EngineParams

__all__ = ["MemTiming", "busy_cycles", "engine_run", "weight_transfers_per_beat", "scatter_busy", "program_timeline", "Timeline", "timing_key",
           "CycleModelError", "ENGINE_SETUP", "QUEUE"]

#: jobs a read port of the memory model accepts before it throttles (``sim.accel_sim.QUEUE``)
QUEUE = 4
#: ENGINE's cycles before its streams run: CHECK (1) and the 16-step division plus its last state (17)
ENGINE_SETUP = 18


class CycleModelError(ValueError):
    """An instruction the model cannot time (no unit model, a memory parameter out of range)."""


@dataclass(frozen=True)
class MemTiming:
    """The memory the model assumes: never stalls, ``latency`` cycles to a job's first word (and to a
    write's answer), ``words_per_cycle`` (0, 1] per read port."""

    latency: int = 8
    words_per_cycle: float = 1.0

    def __post_init__(self):
        if not 1 <= int(self.latency) <= 4096:
            raise CycleModelError(f"latency {self.latency}: must be 1..4096 cycles")
        if not 0.0 < float(self.words_per_cycle) <= 1.0:
            raise CycleModelError(f"words_per_cycle {self.words_per_cycle}: must be in (0, 1]")

    def gap(self, j: int) -> int:
        """Cycles from a job's first word to its word j at this port's rate."""
        return j if self.words_per_cycle >= 1.0 else int(-(-j // self.words_per_cycle))


def _words(bits: int, W: int) -> int:
    return -(-bits // W)


class _ReadPort:
    """Read jobs on one port: at most QUEUE outstanding, words in order, the next job's first word no
    earlier than the cycle after the previous job's last one."""

    def __init__(self, mem: MemTiming):
        self.mem = mem
        self.jobs: list[list] = []   # [accept, count, first word's cycle or None, last word's cycle or None]

    def accept(self, want: int) -> int:
        """Cycle a job wanted at ``want`` is accepted (a free queue slot: QUEUE jobs back finished)."""
        t = want
        if self.jobs:
            t = max(t, self.jobs[-1][0] + 1)
        if len(self.jobs) >= QUEUE:
            old = self.jobs[-QUEUE]
            if old[3] is None:
                raise AssertionError("a job's slot asked before its words were delivered")
            t = max(t, old[3] + 1)
        return t


def weight_transfers_per_beat(engine: EngineParams, accel: AccelParams) -> int:
    """What the weight port moves per weight beat, one per cycle at most: the beat's words on read port 0,
    or with ``weight_lanes`` > 1 its transfers on the wide port (``hw.memory.wide_transfers``:
    ``ceil(words / weight_lanes)``)."""
    from . import beats as B
    words = _words(B.width(layouts(engine)["weight"]), accel.mem_word_bits)
    return -(-words // accel.weight_lanes)


def engine_run(ins: Instr, engine: EngineParams, accel: AccelParams, mem: MemTiming) -> int:
    """ENGINE's busy cycles: ``ENGINE_SETUP`` plus the RUN state (from the cycle the streams start to
    the one after the last output row is written)."""
    p, W, Lat = engine, accel.mem_word_bits, mem.latency
    lay = layouts(p)
    from . import beats as B
    WB = weight_transfers_per_beat(p, accel)
    SB = _words(B.width(lay["scale"]), W)
    R, Ln = p.pe_rows, p.pe_lanes
    mode = Mode(ins.flags & ENGINE_MODE_MASK)
    T, kb, gb, tiles = ins.m, ins.n, ins.k, ins.s
    wpt = 2 * kb if mode == Mode.SPARSE else kb
    need_scale = mode != Mode.PV
    # activations: one element per cycle, a beat every pe_lanes + 1 cycles; the cmd beat at cycle 0,
    # the engine takes the last word at (Ln + 1) * words and issues from the next cycle after its op
    # queue (stages(p).seq)
    first_issue = (Ln + 1) * T * wpt + 1 + stages(p).seq

    # weight words: one job of kb * WB words per tile on read port 0; scale words: one job on port 1
    def word_stream(jobs_words: list[int]):
        return {"jobs": jobs_words}

    # state of the weight stream
    w_acc: list[int] = []          # accept cycle of each tile's job
    w_last: list[int | None] = []  # cycle its last word was delivered
    w_prev_word = None             # delivery cycle of the previous weight word
    w_gather_free = 0              # the gather can take a word from this cycle (WB > 1)

    def w_job_accept(j: int) -> int:
        t = 0 if j == 0 else w_acc[j - 1] + 1
        if j >= QUEUE:
            t = max(t, w_last[j - QUEUE] + 1)
        return t

    s_acc = 0
    s_prev_word = None
    s_gather_free = 0
    s_word_index = 0

    def deliver(first_ok: int, j_in_job: int, job_first: int, prev_word, ready_from: int) -> int:
        """Delivery cycle of a word: its job's first word + its rate gap, after the previous word,
        and once the consumer can take it."""
        t = max(job_first + mem.gap(j_in_job), ready_from)
        if prev_word is not None:
            t = max(t, prev_word + 1)
        return max(t, first_ok)

    def deliver_beat(words: int, j0: int, job_first: int, prev_word, ready_from: int) -> int:
        """Delivery cycle of the last of a beat's ``words`` words (job words j0 .. j0 + words - 1),
        ``deliver`` word by word in closed form: after the first, word k comes at max(previous + 1,
        job_first + gap(j0 + k)); the gap grows by at least one per word (words_per_cycle <= 1), so
        the last is max(first + words - 1, job_first + gap(j0 + words - 1))."""
        first = deliver(0, j0, job_first, prev_word, ready_from)
        return first if words == 1 else max(first + words - 1, job_first + mem.gap(j0 + words - 1))

    issue = first_issue - 1  # the cycle of the previous op's issue
    delay_from = 0           # extra cycles stalls added so far (part of ``issue``)
    bank_free = None         # the cycle the bank's tile's last beat left (into the output register)
    pops: list[int] = []     # the cycle each output beat was taken
    out_free = 0             # the streamer takes an output beat from this cycle
    last_accept = 0
    n_groups = kb // gb if need_scale else 0
    s_job_first = None
    for ti in range(tiles):
        j = ti
        acc = w_job_accept(j)
        w_acc.append(acc)
        w_last.append(None)
        job_first = acc + Lat
        wi = 0  # word within the job
        for b in range(kb):
            # the weight beat's words (WB of them) arrive; with WB > 1 the gather holds one beat
            w_prev_word = deliver_beat(WB, wi, job_first, w_prev_word, w_gather_free if WB > 1 else 0)
            wi += WB
            if WB > 1:
                w_valid = w_prev_word + 1
            else:
                w_valid = w_prev_word  # a wire: the word is taken when the beat is
            s_valid = None
            if need_scale and (b + 1) % gb == 0:
                if s_job_first is None:
                    s_acc = 0
                    s_job_first = s_acc + Lat
                s_prev_word = deliver_beat(SB, s_word_index, s_job_first, s_prev_word, s_gather_free if SB > 1 else 0)
                s_word_index += SB
                s_valid = s_prev_word + 1 if SB > 1 else s_prev_word
            # T ops (x beat_ops: two ops of a 2:4 or 4-bit beat in dsp style) issue on consecutive
            # cycles once the beats are valid
            t0 = max(issue + 1, w_valid, s_valid if s_valid is not None else 0)
            last = t0 + T * beat_ops(p, mode, ins.flags & FLAG_W4) - 1
            if b == kb - 1:
                arm = last + pipe_drain(p)
                if bank_free is not None and arm < bank_free:
                    stall = bank_free - arm
                    arm = bank_free
                    last += stall  # the pipeline stalls: every later op issues that much later
                    delay_from += stall
                # output beats: one per token leaves the bank into the output register (two entries:
                # room while beat n - 2 has gone out before this cycle) and is taken from it, one
                # out_latency later at the earliest, when the streamer is free
                q = arm
                for t in range(T):
                    q = max(q + 1, pops[-2] + 1 if len(pops) >= 2 else 0)
                    a = max(q + out_latency(p), out_free, pops[-1] + 1 if pops else 0)
                    pops.append(a)
                    out_free = a + R + 1
                last_accept = a
                bank_free = q
            issue = last
            # the beat is taken with its last token's op: a WB > 1 gather is free the next cycle (the
            # wide gather in that very cycle: hw.memory.WideBeatGather)
            if WB > 1:
                w_gather_free = last + (0 if accel.weight_lanes > 1 else 1)
            else:
                w_prev_word = max(w_prev_word, last)  # the word leaves the memory when taken
            if s_valid is not None:
                if SB > 1:
                    s_gather_free = last + 1
                else:
                    s_prev_word = max(s_prev_word, last)
        w_last[j] = w_prev_word
    del n_groups, word_stream, delay_from
    # the last beat's rows: R cycles of writes, then the RUN state sees o_ti == tiles
    run = last_accept + R + 2
    return ENGINE_SETUP + run


def scatter_busy(ins: Instr, accel: AccelParams, mem: MemTiming) -> int:
    """SCATTER's busy cycles (``hw.controller.MemOps``, states X_*), row by row: X_ROW writes back a
    cached word the row does not start in; X_JOB issues one read job for the row's words not cached
    (the run from its first field's word to its last's), once every write is answered unless all
    those words lie above every word written back so far; then per field a spad read (X_RD) and a check
    (X_CHK): a field in the cached word is patched, one in a later word writes the dirty word back (X_WB)
    and takes the stream's words up to its own (X_SDATA, one per cycle, the first ``latency`` cycles
    after the job). Fields of whole bytes at byte boundaries read nothing: their word starts empty and
    the strobes keep every other byte. At the end the last word is written back and its answer awaited."""
    W, Lat = accel.mem_word_bits, mem.latency
    if ins.m == 0 or ins.n == 0:
        return 2  # DRAIN only (nothing outstanding)
    lgW = W.bit_length() - 1
    span = (ins.n - 1) * ins.k
    # whole bytes only: no word is read (the strobes keep every other byte)
    wonly = ins.w >= 8 and ins.e % 8 == 0 and ins.k % 8 == 0 and ins.f % 8 == 0
    cache, dirty = None, False
    drained = 0           # cycle from which no write is outstanding
    wr_hi = None          # highest word written back so far
    t = 0                 # the cycle of the row's X_ROW (busy starts at 0)

    def write_back(c: int):
        nonlocal drained, wr_hi, cache, dirty
        drained = c + Lat + 1
        wr_hi = cache if wr_hi is None else max(wr_hi, cache)
        cache, dirty = None, False

    for o in range(ins.m):
        prow = (ins.d << lgW) + ins.e + o * ins.f
        wf, wl = prow >> lgW, (prow + span) >> lgW
        keep = cache == wf
        if cache is not None and not keep:
            if dirty:
                write_back(t)           # X_ROW: accepted at once
            cache, dirty = None, False
        lo = wf + (1 if keep else 0)
        tj = t + 1                      # X_JOB
        if wonly or lo > wl:
            t = tj + 1
            job = None
        else:
            a = tj if (wr_hi is not None and lo > wr_hi) else max(tj, drained)
            job = (a, lo)               # accepted at a, its first word lo
            t = a + 1
        sword, prev = lo, None          # the stream's next word, the cycle the last one was taken
        for i in range(ins.n):
            word = (prow + i * ins.k) >> lgW
            chk = t + 1                 # X_RD at t, X_CHK at chk
            if cache != word:
                s = chk + 1
                if cache is not None and dirty:
                    write_back(s)       # X_WB
                    s += 1
                if wonly:               # X_SDATA: the word starts empty, one cycle
                    s += 1
                    job = None
                a, lo0 = job if job is not None else (None, None)
                while job is not None:  # X_SDATA
                    avail = a + Lat + mem.gap(sword - lo0)
                    taken = max(s, avail, prev + 1 if prev is not None else 0)
                    prev, s = taken, taken + 1
                    sword += 1
                    if sword - 1 == word:
                        break
                cache = word
                chk = s                 # X_CHK again, now a hit
            dirty = True
            t = chk + 1
    # X_FLUSH at t: the dirty word written back, then DRAIN until answered
    write_back(t)
    return max(t + 1, drained) + 1


def busy_cycles(ins: Instr, engine: EngineParams, accel: AccelParams, mem: MemTiming | None = None,
                unit_models: dict | None = None) -> int:
    """Cycles the client that runs ``ins`` holds ``busy`` high (from the cycle after GO)."""
    mem = mem or MemTiming()
    Lat = mem.latency
    op = Op(ins.op)
    W = accel.mem_word_bits
    if op == Op.LOAD:
        if ins.n == 0:
            return 2
        nw = _words(ins.n * ins.w, W)
        epw = W // ins.w
        # element k of word j: no earlier than the word's arrival, one element per cycle
        t = -1
        for j in range(nw):
            arrive = Lat + mem.gap(j)
            first = max(t + 1, arrive)
            t = first + min(epw, ins.n - j * epw) - 1
        return 2 + (1 if ins.flags & FLAG_INDEXED else 0) + t + 1
    if op == Op.STORE:
        if ins.n == 0:
            return 2
        nw = _words(ins.n * ins.w, W)
        return ins.n + nw + max(Lat + 1, 2) + 1
    if op == Op.MARK:
        return Lat + 2
    if op == Op.SCATTER:
        return scatter_busy(ins, accel, mem)
    if op == Op.ENGINE:
        return engine_run(ins, engine, accel, mem)
    if op in UNIT_OPS:
        models = unit_models if unit_models is not None else _unit_models()
        model = models.get(op)
        if model is None:
            raise CycleModelError(f"{op.name}: no special-function unit with a cycle model in hw.sfu.registry")
        return int(model(ins, accel))
    raise CycleModelError(f"{op.name}: not run by a client")


def _unit_models() -> dict:
    from .sfu.registry import available_units
    return {op: getattr(cls, "cycles", None) for op, cls in available_units().items()}


@dataclass
class Timeline:
    """``decode[i]``: the cycle instruction i is decoded; ``cycles[i]``: to the next decode (HALT: 1);
    ``marks``: the value each MARK writes, by its destination word; ``total``: the ``cycles`` counter
    at ``done``; ``busy[i]``: the cycles its client is busy (``busy_cycles``; HALT and NOP 0)."""

    decode: list[int] = field(default_factory=list)
    cycles: list[int] = field(default_factory=list)
    busy: list[int] = field(default_factory=list)
    marks: dict[int, int] = field(default_factory=dict)
    total: int = 0


def instr_period(ins: Instr, engine: EngineParams, accel: AccelParams, mem: MemTiming,
                 unit_models: dict | None = None) -> int:
    """Cycles from ``ins``'s DECODE to the next instruction's DECODE (the prefetching controller)."""
    return _period_busy(ins, engine, accel, mem, unit_models)[0]


def _period_busy(ins, engine, accel, mem, unit_models) -> tuple[int, int]:
    """(``instr_period``, the client's busy cycles; 0 for HALT and NOP, which no client runs)."""
    IW = INSTR_BITS // accel.mem_word_bits
    op = Op(ins.op)
    if op == Op.HALT:
        return 1, 0
    refetch = mem.latency + mem.gap(IW - 1) + 1 + 2
    if op == Op.NOP:
        return refetch, 0
    b = busy_cycles(ins, engine, accel, mem, unit_models)
    return max(b + 4, refetch), b


#: per opcode, the fields holding memory word addresses that no cycle rule reads (LOAD/STORE/MARK time
#: the words' count only; ENGINE its counts and mode; SCATTER's word misses depend on d only through
#: d * mem_word_bits, a whole number of words): an instruction's period is the same whatever they hold
ADDRESS_ONLY_FIELDS = {Op.LOAD: ("a",), Op.STORE: ("d",), Op.MARK: ("d",), Op.SCATTER: ("d",),
                       Op.ENGINE: ("c", "e", "f")}
_TIMED_FIELDS = ("op", "flags", "w", "a", "b", "c", "d", "e", "f", "g", "h", "n", "m", "k", "s", "i0")


def timing_key(ins: Instr) -> tuple:
    """The instruction's fields with ``ADDRESS_ONLY_FIELDS`` blanked (its note dropped): two instructions
    with the same key have the same period (``program_timeline`` times each key once)."""
    skip = ADDRESS_ONLY_FIELDS.get(Op(ins.op), ())
    return tuple(0 if f in skip else getattr(ins, f) for f in _TIMED_FIELDS)


def program_timeline(program: list[Instr], engine: EngineParams, accel: AccelParams,
                     mem: MemTiming | None = None, *, memo: bool = True) -> Timeline:
    """The model's timeline of a straight-line program (every compiled program is one) run to HALT.
    memo: time each ``timing_key`` once (a 7B decode step repeats its layers' instructions 32 times);
    ``memo=False`` times every instruction (tests/hw/test_compile_shape.py: the same timeline)."""
    mem = mem or MemTiming()
    IW = INSTR_BITS // accel.mem_word_bits
    models = _unit_models()
    tl = Timeline()
    seen: dict[tuple, tuple[int, int]] = {}
    t = mem.latency + mem.gap(IW - 1) + 1  # the first fetch: requested at cycle 0
    for ins in program:
        tl.decode.append(t)
        if memo:
            key = timing_key(ins)
            cb = seen.get(key)
            if cb is None:
                cb = seen[key] = _period_busy(ins, engine, accel, mem, models)
        else:
            cb = _period_busy(ins, engine, accel, mem, models)
        c = cb[0]
        tl.cycles.append(c)
        tl.busy.append(cb[1])
        if ins.op == Op.MARK:
            tl.marks[ins.d] = t + 2
        t += c
        if ins.op == Op.HALT:
            break
    tl.total = t
    return tl
