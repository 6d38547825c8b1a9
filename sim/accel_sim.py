"""Simulation of the whole accelerator (``hw.accel.Accelerator``) running a program from a memory image.

``run_accelerator(engine, accel, image, simulator=...)`` loads ``image`` (uint8, the memory's bytes,
word i = bytes [i*W/8, (i+1)*W/8) little-endian) into a memory model behind the accelerator's three
memory ports, pulses ``start``, runs until ``done`` and returns the final memory, the cycle count and
the error register (``hw.controller.AccelError``).

The memory model (the same behaviour in both implementations; docs/isa.md, "Memory system"):

* each read port queues up to ``QUEUE`` jobs; a job accepted in cycle c delivers its first word no
  earlier than c + ``mem_latency``, then one word per cycle at most (``words_per_cycle`` <= 1 thins
  that out with a credit counter), in job order;
* a write is applied when accepted; its response comes ``mem_latency`` cycles later (in order);
* every channel endpoint the memory drives stalls by a chain of ``sim.stalls`` (``stall_profile``):
  read port 0's ``req.ready`` by the profile's ``cmd`` chain, its ``data.valid`` by ``weight``, read
  port 1's by ``rq`` and ``scale``, the write port's ``req.ready`` by ``act`` and ``resp.valid`` by
  ``out`` (so ``asymmetric`` and ``bursty`` stall each channel differently);
* an access outside the image raises ``MemoryRangeError`` (port, address, the instruction);
* a watchdog: no progress (no beat on any port or engine stream, no spad access) for
  ``watchdog_cycles`` raises ``AccelHang`` naming the cycle, pc, opcode, controller state and every
  port's handshake.

Amaranth: the model is a Python testbench (one coroutine, one step per cycle). Verilator and Icarus:
the model is Verilog (``MEM_MODEL``) around the accelerator's Verilog, the image loaded with
``$readmemh`` and the final memory written with ``$writememh``; Verilator is built once per design
(a C++ main loop, no VPI) into ``build/accel/<hash>/`` and each run gets its own folder with the image,
the plusargs (latency, stall thresholds, seeds, watchdog) and the results.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hw.controller import CTRL_STATES, AccelError
from hw.isa import Op
from hw.params import AccelParams, EngineParams

from .stalls import profile, threshold

SIMULATORS = ("amaranth", "verilator", "icarus")
QUEUE = 4
WATCHDOG = 5000
#: memory channel -> the sim.stalls stream whose chain stalls it
CHANNEL_CHAINS = {"rd0_req": "cmd", "rd0_data": "weight", "rd1_req": "rq", "rd1_data": "scale",
                  "wr_req": "act", "wr_resp": "out"}


@dataclass
class AccelRun:
    mem: np.ndarray     # final memory, uint8, same size as the image
    cycles: int         # the accelerator's cycle counter at done
    error: int          # hw.controller.AccelError
    wall_s: float
    instrs: int         # instructions executed (pc of the HALT or failing instruction + 1)
    pc: int = 0
    op: int = 0
    run_dir: str | None = None
    sim_cycles: int = 0  # simulated clock cycles including reset and the final drain

    @property
    def error_name(self) -> str:
        try:
            return AccelError(self.error).name
        except ValueError:
            return f"error {self.error}"


class AccelHang(RuntimeError):
    pass


class MemoryRangeError(RuntimeError):
    pass


def _op_name(op: int) -> str:
    try:
        return Op(op).name
    except ValueError:
        return f"opcode {op}"


def image_words(image: np.ndarray, word_bits: int) -> list[int]:
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 1:
        raise ValueError(f"image: expected a 1-D uint8 array, got {img.dtype} with shape {img.shape}")
    nb = word_bits // 8
    if img.size % nb:
        raise ValueError(f"image: {img.size} bytes is not a whole number of {word_bits}-bit memory words "
                         f"({nb} bytes); pad it to a multiple of {nb}")
    if img.size == 0:
        raise ValueError("image: empty (the program starts at word 0)")
    return [int.from_bytes(img[i:i + nb].tobytes(), "little") for i in range(0, img.size, nb)]


def words_image(words: list[int], word_bits: int) -> np.ndarray:
    nb = word_bits // 8
    return np.frombuffer(b"".join(int(w).to_bytes(nb, "little") for w in words), np.uint8).copy()


class _Chain:
    def __init__(self, rng, chain):
        self.rng, self.chain, self.stalled = rng, chain, False

    def step(self) -> bool:
        self.stalled = bool(self.rng.random() < (self.chain.stay if self.stalled else self.chain.enter))
        return self.stalled


def _check_args(simulator, mem_latency, words_per_cycle, watchdog_cycles, stall_profile):
    if simulator not in SIMULATORS:
        raise ValueError(f"simulator {simulator!r}: choose from {', '.join(SIMULATORS)}")
    if not 1 <= int(mem_latency) <= 4096:
        raise ValueError(f"mem_latency {mem_latency}: must be 1..4096 cycles")
    if not 0.0 < float(words_per_cycle) <= 1.0:
        raise ValueError(f"words_per_cycle {words_per_cycle}: must be in (0, 1] (one port moves at most "
                         f"one word per cycle)")
    if int(watchdog_cycles) < 16:
        raise ValueError(f"watchdog_cycles {watchdog_cycles}: must be at least 16")
    profile(stall_profile)


def run_accelerator(engine: EngineParams, accel: AccelParams, image: np.ndarray, *, simulator: str = "amaranth",
                    stall_profile: str = "asymmetric", seed: int = 0, mem_latency: int = 8,
                    words_per_cycle: float = 1.0, run_dir=None, watchdog_cycles: int = WATCHDOG,
                    units=None, max_cycles: int = 50_000_000, accel_factory=None) -> AccelRun:
    """Run the program in ``image`` (it starts at mem word 0) to HALT or an error; see the module doc."""
    _check_args(simulator, mem_latency, words_per_cycle, watchdog_cycles, stall_profile)
    words = image_words(image, accel.mem_word_bits)
    if simulator == "amaranth":
        return _run_amaranth(engine, accel, words, stall_profile, seed, int(mem_latency), float(words_per_cycle),
                             int(watchdog_cycles), units, max_cycles, accel_factory)
    return _run_verilog(engine, accel, words, simulator, stall_profile, seed, int(mem_latency),
                        float(words_per_cycle), run_dir, int(watchdog_cycles), units, max_cycles, accel_factory)


# ---------------------------------------------------------------------------------------------------
# Amaranth: the memory model as a Python testbench
# ---------------------------------------------------------------------------------------------------
def _make_accel(engine, accel, units, accel_factory):
    if accel_factory is not None:
        return accel_factory(engine, accel, units)
    from hw.accel import Accelerator
    return Accelerator(engine, accel, units)


def _run_amaranth(engine, accel, words, stall_profile, seed, latency, wpc, watchdog, units, max_cycles,
                  accel_factory) -> AccelRun:
    from amaranth.sim import Simulator

    dut = _make_accel(engine, accel, units, accel_factory)
    chains = profile(stall_profile)
    rng = np.random.default_rng(seed)
    ch = {name: _Chain(np.random.default_rng(rng.integers(1 << 32)), chains[st])
          for name, st in CHANNEL_CHAINS.items()}
    mem = list(words)
    depth = len(mem)
    out: dict = {}

    async def bench(ctx):
        rports = [dut.mem_rd0, dut.mem_rd1]
        queues = [deque(), deque()]        # (first cycle, addr, count)
        credit = [0.0, 0.0]
        wresp = deque()                    # cycle the response may go
        cycle = 0
        idle = 0
        ctx.set(dut.start, 1)
        await ctx.tick()
        ctx.set(dut.start, 0)
        while True:
            cycle += 1
            # ---- what the memory offers this cycle ----
            offers = []
            for pi, port in enumerate(rports):
                q = queues[pi]
                credit[pi] = min(1.0, credit[pi] + wpc)
                req_ready = (not ch[f"rd{pi}_req"].step()) and len(q) < QUEUE
                dstall = ch[f"rd{pi}_data"].step()
                dvalid = bool(q) and q[0][0] <= cycle and not dstall and credit[pi] >= 1.0 - 1e-9
                ctx.set(port.req.ready, req_ready)
                ctx.set(port.data.valid, dvalid)
                if dvalid:
                    ctx.set(port.data.payload, mem[q[0][1]])
                offers.append((req_ready, dvalid))
            w_ready = not ch["wr_req"].step()
            rstall = ch["wr_resp"].step()
            r_valid = bool(wresp) and wresp[0] <= cycle and not rstall
            ctx.set(dut.mem_wr.req.ready, w_ready)
            ctx.set(dut.mem_wr.resp.valid, r_valid)
            # ---- what the accelerator does ----
            moved = False
            for pi, port in enumerate(rports):
                req_ready, dvalid = offers[pi]
                q = queues[pi]
                if req_ready and ctx.get(port.req.valid):
                    addr, count = ctx.get(port.req.payload.addr), ctx.get(port.req.payload.count)
                    if count < 1 or addr + count > depth:
                        raise MemoryRangeError(
                            f"read port {pi}: job of {count} words at word {addr} outside the memory of "
                            f"{depth} words (pc {ctx.get(dut.pc)}, {_op_name(ctx.get(dut.op))})")
                    q.append([cycle + latency, addr, count])
                    moved = True
                if dvalid and ctx.get(port.data.ready):
                    credit[pi] -= 1.0
                    q[0][1] += 1
                    q[0][2] -= 1
                    if q[0][2] == 0:
                        q.popleft()
                        if q:
                            q[0][0] = max(q[0][0], cycle + 1)
                    moved = True
            if w_ready and ctx.get(dut.mem_wr.req.valid):
                addr = ctx.get(dut.mem_wr.req.payload.addr)
                if addr >= depth:
                    raise MemoryRangeError(
                        f"write port: word {addr} outside the memory of {depth} words (pc {ctx.get(dut.pc)}, "
                        f"{_op_name(ctx.get(dut.op))})")
                data = ctx.get(dut.mem_wr.req.payload.data)
                strb = ctx.get(dut.mem_wr.req.payload.strb)
                bm = 0
                for b in range(accel.mem_word_bits // 8):
                    if strb >> b & 1:
                        bm |= 0xFF << (8 * b)
                mem[addr] = (mem[addr] & ~bm) | (data & bm)
                wresp.append(cycle + latency)
                moved = True
            if r_valid and ctx.get(dut.mem_wr.resp.ready):
                wresp.popleft()
                moved = True
            if ctx.get(dut.done):
                out.update(cycles=ctx.get(dut.cycles), error=ctx.get(dut.error), pc=ctx.get(dut.pc),
                           op=ctx.get(dut.op), sim_cycles=cycle)
                return
            idle = 0 if (moved or ctx.get(dut.progress)) else idle + 1
            if idle >= watchdog or cycle >= max_cycles:
                ports = {f"rd{pi}": dict(req_valid=ctx.get(p.req.valid), req_ready=offers[pi][0],
                                         data_valid=offers[pi][1], data_ready=ctx.get(p.data.ready),
                                         jobs_queued=len(queues[pi]))
                         for pi, p in enumerate(rports)}
                ports["wr"] = dict(req_valid=ctx.get(dut.mem_wr.req.valid), req_ready=w_ready,
                                   resp_valid=r_valid, responses_owed=len(wresp))
                raise AccelHang(_hang_message("amaranth", cycle, watchdog, ctx.get(dut.pc), ctx.get(dut.op),
                                              ctx.get(dut.state), ports, cycle >= max_cycles))
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    t0 = time.perf_counter()
    sim.run()
    wall = time.perf_counter() - t0
    return AccelRun(words_image(mem, accel.mem_word_bits), int(out["cycles"]), int(out["error"]), wall,
                    int(out["pc"]) + 1, int(out["pc"]), int(out["op"]), None, int(out["sim_cycles"]))


def _hang_message(sim, cycle, limit, pc, op, state, ports, budget=False) -> str:
    st = CTRL_STATES[state] if 0 <= state < len(CTRL_STATES) else str(state)
    stuck = []
    for name, p in ports.items():
        if p.get("req_valid") and not p.get("req_ready"):
            stuck.append(f"{name} request not accepted")
        if p.get("jobs_queued") and not p.get("data_ready") and p.get("data_valid"):
            stuck.append(f"{name} data offered and not taken")
        if p.get("responses_owed") and not p.get("resp_valid"):
            stuck.append(f"{name} responses owed")
    desc = "; ".join(f"{k}: " + " ".join(f"{a}={int(b)}" for a, b in v.items()) for k, v in ports.items())
    why = (f"cycle budget of {cycle} cycles exhausted" if budget else
           f"no progress for {limit} cycles")
    return (f"accelerator hang ({sim}): {why} at cycle {cycle}; pc {pc} ({_op_name(op)}), controller "
            f"state {st}; {', '.join(stuck) or 'no port is being refused'} ({desc})")


# ---------------------------------------------------------------------------------------------------
# Memory images for directed programs (tests, benchmarks)
# ---------------------------------------------------------------------------------------------------
def pack_elements(values, w: int, word_bits: int) -> list[int]:
    """Elements (any ints, their low ``w`` bits taken) packed little-endian into words (``hw.isa``)."""
    x = 0
    for i, v in enumerate(np.asarray(values, dtype=object).reshape(-1).tolist()):
        x |= (int(v) & ((1 << w) - 1)) << (i * w)
    n = -(-len(np.asarray(values).reshape(-1)) * w // word_bits)
    return [(x >> (word_bits * j)) & ((1 << word_bits) - 1) for j in range(n)]


def read_elements(mem: np.ndarray, word_bits: int, addr: int, n: int, w: int, signed: bool = False) -> np.ndarray:
    """``n`` elements of ``w`` bits from mem word ``addr`` on (``mem``: the image bytes)."""
    nb = word_bits // 8
    nwords = -(-n * w // word_bits)
    x = int.from_bytes(np.asarray(mem[addr * nb:(addr + nwords) * nb], np.uint8).tobytes(), "little")
    out = []
    for i in range(n):
        v = (x >> (i * w)) & ((1 << w) - 1)
        if signed and v >> (w - 1):
            v -= 1 << w
        out.append(v)
    return np.array(out, dtype=np.int64 if (signed or w < 64) else np.uint64)


class ImageBuilder:
    """A memory image: the program at word 0, data regions placed by word address."""

    def __init__(self, accel: AccelParams):
        self.W = accel.mem_word_bits
        self.words: dict[int, int] = {}

    def place(self, addr: int, words: list[int]) -> int:
        for j, wv in enumerate(words):
            if addr + j in self.words:
                raise ValueError(f"image: word {addr + j} placed twice")
            self.words[addr + j] = int(wv)
        return len(words)

    def elements(self, addr: int, values, w: int) -> int:
        return self.place(addr, pack_elements(values, w, self.W))

    def program(self, program) -> int:
        from hw.isa import encode_program
        return self.place(0, encode_program(list(program), self.W))

    def image(self, total_words: int | None = None) -> np.ndarray:
        n = max(self.words) + 1 if total_words is None else total_words
        if self.words and max(self.words) >= n:
            raise ValueError(f"image: word {max(self.words)} beyond the {n} words asked for")
        return words_image([self.words.get(i, 0) for i in range(n)], self.W)
