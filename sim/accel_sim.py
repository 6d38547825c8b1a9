"""Simulation of the whole accelerator (``hw.accel.Accelerator``) running a program from a memory image.

``run_accelerator(engine, accel, image, simulator=...)`` loads ``image`` (uint8, the memory's bytes,
word i = bytes [i*W/8, (i+1)*W/8) little-endian) into a memory model behind the accelerator's three
memory ports, pulses ``start``, runs until ``done`` and returns the final memory, the cycle count and
the error register (``hw.controller.AccelError``).

The memory model (the same behaviour in both implementations; docs/isa.md, "Memory system"):

* each read port queues up to ``QUEUE`` jobs; a job accepted in cycle c delivers its first word no
  earlier than c + ``mem_latency``, then one word per cycle at most (``words_per_cycle`` <= 1 thins
  that out with a credit counter), in job order; the wide weight port (``mem_rdw``, when
  ``accel.weight_lanes`` > 1) the same with one transfer of ``hw.memory.wide_transfers``
  words in place of each word (its own stall chains ``rdw_req``/``rdw_data``);
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
import os
import resource
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
MIN_DEPTH_LOG2 = 16
WATCHDOG = 5000
#: memory channel -> the sim.stalls stream whose chain stalls it
CHANNEL_CHAINS = {"rd0_req": "cmd", "rd0_data": "weight", "rd1_req": "rq", "rd1_data": "scale",
                  "wr_req": "act", "wr_resp": "out", "rdw_req": "cmd", "rdw_data": "weight"}


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
    cpu_s: float = 0.0   # CPU seconds of the simulation (the simulator process, or this one for Amaranth)

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
    img = _check_image(image, word_bits)
    nb = word_bits // 8
    return [int.from_bytes(img[i:i + nb].tobytes(), "little") for i in range(0, img.size, nb)]


_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", np.uint8)
_HEX_VALUE = np.full(256, 255, np.uint8)
_HEX_VALUE[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)
_HEX_VALUE[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16, dtype=np.uint8)


def _check_image(image: np.ndarray, word_bits: int) -> np.ndarray:
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 1:
        raise ValueError(f"image: expected a 1-D uint8 array, got {img.dtype} with shape {img.shape}")
    nb = word_bits // 8
    if img.size % nb:
        raise ValueError(f"image: {img.size} bytes is not a whole number of {word_bits}-bit memory words "
                         f"({nb} bytes); pad it to a multiple of {nb}")
    if img.size == 0:
        raise ValueError("image: empty (the program starts at word 0)")
    return img


def image_hex(image: np.ndarray, word_bits: int) -> bytes:
    """The ``$readmemh`` text of ``image``: one word a line, most significant digit first (what
    ``"".join(f"{w:0{W // 4}x}\\n" for w in image_words(image, W))`` gives, in numpy: a SmolLM2 image of
    5.5 M words takes seconds instead of minutes and no Python integer per word)."""
    img = _check_image(image, word_bits)
    nb = word_bits // 8
    be = img.reshape(-1, nb)[:, ::-1]
    out = np.empty((be.shape[0], 2 * nb + 1), np.uint8)
    out[:, 0:2 * nb:2] = _HEX_DIGITS[be >> 4]
    out[:, 1:2 * nb:2] = _HEX_DIGITS[be & 15]
    out[:, -1] = ord("\n")
    return out.tobytes()


def hex_image(text: bytes, word_bits: int, n_words: int) -> np.ndarray | None:
    """The first ``n_words`` words of a ``$writememh`` file as image bytes, or None when the file is not
    plain lines of exactly ``word_bits / 4`` hex digits (comments, addresses, x/z digits: the caller
    then parses it line by line)."""
    hexw = word_bits // 4
    line = hexw + 1
    if len(text) < n_words * line:
        return None
    arr = np.frombuffer(text, np.uint8, count=n_words * line).reshape(n_words, line)
    if not (arr[:, -1] == ord("\n")).all():
        return None
    nib = _HEX_VALUE[arr[:, :hexw]]
    if (nib == 255).any():
        return None
    be = (nib[:, 0::2] << 4) | nib[:, 1::2]
    return np.ascontiguousarray(be[:, ::-1]).reshape(-1)


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
    if simulator == "amaranth":
        words = image_words(image, accel.mem_word_bits)
        return _run_amaranth(engine, accel, words, stall_profile, seed, int(mem_latency), float(words_per_cycle),
                             int(watchdog_cycles), units, max_cycles, accel_factory)
    # the Verilog memory model takes the image as $readmemh text, made from the bytes in numpy
    return _run_verilog(engine, accel, _check_image(image, accel.mem_word_bits), simulator, stall_profile, seed, int(mem_latency),
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

    wide = accel.weight_lanes > 1
    W = accel.mem_word_bits
    mask = (1 << W) - 1

    async def bench(ctx):
        rports = [dut.mem_rd0, dut.mem_rd1]
        queues = [deque(), deque()]        # (first cycle, addr, count)
        credit = [0.0, 0.0]
        wq = deque()                       # wide port: [first cycle, addr, count, beat, word of the job]
        wcredit = 0.0
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
            if wide:
                wcredit = min(1.0, wcredit + wpc)
                w_req_ready = (not ch["rdw_req"].step()) and len(wq) < QUEUE
                w_dstall = ch["rdw_data"].step()
                w_dvalid = bool(wq) and wq[0][0] <= cycle and not w_dstall and wcredit >= 1.0 - 1e-9
                ctx.set(dut.mem_rdw.req.ready, w_req_ready)
                ctx.set(dut.mem_rdw.data.valid, w_dvalid)
                if w_dvalid:
                    _, wa, wc, wb, wj = wq[0]
                    wn = min(accel.weight_lanes, wb - wj % wb, wc - wj)
                    ctx.set(dut.mem_rdw.data.payload.n, wn)
                    ctx.set(dut.mem_rdw.data.payload.words,
                            sum((mem[wa + i] & mask) << (W * i) for i in range(wn)))
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
            if wide:
                if w_req_ready and ctx.get(dut.mem_rdw.req.valid):
                    addr, count = ctx.get(dut.mem_rdw.req.payload.addr), ctx.get(dut.mem_rdw.req.payload.count)
                    beat = ctx.get(dut.mem_rdw.req.payload.beat)
                    if count < 1 or beat < 1 or addr + count > depth:
                        raise MemoryRangeError(
                            f"wide read port: job of {count} words (beat {beat}) at word {addr} outside the "
                            f"memory of {depth} words (pc {ctx.get(dut.pc)}, {_op_name(ctx.get(dut.op))})")
                    wq.append([cycle + latency, addr, count, beat, 0])
                    moved = True
                if w_dvalid and ctx.get(dut.mem_rdw.data.ready):
                    wcredit -= 1.0
                    wq[0][1] += wn
                    wq[0][4] += wn
                    if wq[0][4] == wq[0][2]:
                        wq.popleft()
                        if wq:
                            wq[0][0] = max(wq[0][0], cycle + 1)
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
    t0, c0 = time.perf_counter(), time.process_time()
    sim.run()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return AccelRun(words_image(mem, accel.mem_word_bits), int(out["cycles"]), int(out["error"]), wall,
                    int(out["pc"]) + 1, int(out["pc"]), int(out["op"]), None, int(out["sim_cycles"]), cpu)


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


# ---------------------------------------------------------------------------------------------------
# Verilator / Icarus: the memory model in Verilog around the accelerator's Verilog
# ---------------------------------------------------------------------------------------------------
MEM_MODEL = r"""`timescale 1ns/1ps
// Generated by sim/accel_sim.py: the memory model behind the accelerator's ports (see the module
// docstring there). Plusargs: +image= +out= +status= +latency= +wpc= (words per cycle x 65536)
// +watchdog= +budget= +seed= and one +st_<channel>_enter= / +st_<channel>_stay= per channel
// (16-bit thresholds of its stall chain).
module harness(input clk /*verilator public_flat_rw*/);
  localparam W = {W};
  localparam DEPTH = {depth};
  localparam QD = {queue};
  localparam RD = 64;
  reg [W-1:0] mem [0:DEPTH-1];
  reg [1023:0] f_image, f_out, f_status;
  integer latency, wpc, watchdog, seed, fh, i, nwords;
  reg [63:0] budget;
  reg [63:0] cyc;
  reg [31:0] idle;
  reg [3:0] rst_cnt;
  wire rst = rst_cnt != 0;
  reg start;
  reg finished;

  wire done, progress;
  wire [7:0] error, op;
  wire [63:0] cycles;
  wire [31:0] pc;
  wire [{state_w}:0] state;
{chan_decls}
  accel dut(.clk(clk), .rst(rst), .start(start), .done(done), .error(error), .cycles(cycles), .pc(pc),
            .op(op), .state(state), .progress(progress),
{port_conns});

  initial begin
    if (!$value$plusargs("image=%s", f_image)) f_image = "image.hex";
    if (!$value$plusargs("out=%s", f_out)) f_out = "out.hex";
    if (!$value$plusargs("status=%s", f_status)) f_status = "status.txt";
    if (!$value$plusargs("latency=%d", latency)) latency = 8;
    if (!$value$plusargs("wpc=%d", wpc)) wpc = 65536;
    if (!$value$plusargs("watchdog=%d", watchdog)) watchdog = 5000;
    if (!$value$plusargs("budget=%d", budget)) budget = 64'd50000000;
    if (!$value$plusargs("seed=%d", seed)) seed = 1;
    if (!$value$plusargs("words=%d", nwords)) nwords = DEPTH;
{chan_args}
    $readmemh(f_image, mem);
    rst_cnt = 4'd4; start = 0; finished = 0; cyc = 0; idle = 0;
  end

  wire any_fire = progress{any_fire};
  always @(posedge clk) begin
    cyc <= cyc + 1;
    if (rst_cnt != 0) rst_cnt <= rst_cnt - 1;
    start <= (rst_cnt == 1);
    idle <= any_fire ? 0 : idle + 1;
    if (!finished && !rst && done && !start) begin
      finished <= 1;
      $writememh(f_out, mem, 0, nwords - 1);
      fh = $fopen(f_status, "w");
      $fwrite(fh, "done %0d %0d %0d %0d %0d\n", cycles, error, pc, op, cyc);
      $fclose(fh);
      $finish;
    end
    if (!finished && !rst && (idle >= watchdog || cyc >= budget)) begin
      finished <= 1;
      fh = $fopen(f_status, "w");
      $fwrite(fh, "hang %0d %0d %0d %0d %0d %0d\n", cyc, idle >= watchdog, pc, op, state, watchdog);
{hang_status}
      $fclose(fh);
      $finish;
    end
  end
{chan_logic}
endmodule
"""

RD_PORT = r"""
  // ---------------- read port {p} ----------------
  reg [63:0] q{p}_time [0:QD-1];
  reg [31:0] q{p}_addr [0:QD-1];
  reg [31:0] q{p}_cnt [0:QD-1];
  reg [2:0] q{p}_head, q{p}_tail, q{p}_n;
  reg [17:0] cr{p};
  wire rq{p}_fire = rd{p}_req_valid & rd{p}_req_ready;
  wire rd{p}_fire = rd{p}_data_valid & rd{p}_data_ready;
  wire [31:0] rq{p}_addr = rd{p}_req_payload[31:0];
  wire [31:0] rq{p}_cnt = rd{p}_req_payload[63:32];
  wire [31:0] h{p}_addr = q{p}_addr[q{p}_head[1:0]];
  assign rd{p}_req_ready = !st_rd{p}_req && (q{p}_n < QD) && !rst;
  assign rd{p}_data_valid = (q{p}_n != 0) && (q{p}_time[q{p}_head[1:0]] <= cyc) && !st_rd{p}_data
                            && (cr{p} >= 18'd65536) && !rst;
  assign rd{p}_data_payload = mem[h{p}_addr < DEPTH ? h{p}_addr : 0];
  always @(posedge clk) begin
    if (rst) begin
      q{p}_head <= 0; q{p}_tail <= 0; q{p}_n <= 0; cr{p} <= 0;
    end else begin
      cr{p} <= (cr{p} - (rd{p}_fire ? 18'd65536 : 18'd0) + wpc[17:0] > 18'd65536) ? 18'd65536
               : cr{p} - (rd{p}_fire ? 18'd65536 : 18'd0) + wpc[17:0];
      if (rq{p}_fire) begin
        if (rq{p}_cnt == 0 || {{32'd0, rq{p}_addr}} + rq{p}_cnt > nwords) begin
          fh = $fopen(f_status, "w");
          $fwrite(fh, "range read {p} %0d %0d %0d %0d %0d\n", rq{p}_addr, rq{p}_cnt, pc, op, nwords);
          $fclose(fh);
          $finish;
        end
        q{p}_time[q{p}_tail[1:0]] <= cyc + latency;
        q{p}_addr[q{p}_tail[1:0]] <= rq{p}_addr;
        q{p}_cnt[q{p}_tail[1:0]] <= rq{p}_cnt;
        q{p}_tail <= q{p}_tail + 1;
      end
      if (rd{p}_fire) begin
        if (q{p}_cnt[q{p}_head[1:0]] == 1) begin
          q{p}_head <= q{p}_head + 1;
          // the next job's first word comes no earlier than the next cycle
        end else begin
          q{p}_addr[q{p}_head[1:0]] <= h{p}_addr + 1;
          q{p}_cnt[q{p}_head[1:0]] <= q{p}_cnt[q{p}_head[1:0]] - 1;
        end
      end
      q{p}_n <= q{p}_n + (rq{p}_fire ? 1 : 0) - ((rd{p}_fire && q{p}_cnt[q{p}_head[1:0]] == 1) ? 1 : 0);
    end
  end
"""

RDW_PORT = r"""
  // ---------------- wide weight port (accel.weight_lanes = L words per transfer) ----------------
  localparam L = {lanes};
  reg [63:0] qw_time [0:QD-1];
  reg [31:0] qw_addr [0:QD-1];
  reg [31:0] qw_cnt [0:QD-1];
  reg [15:0] qw_beat [0:QD-1];
  reg [15:0] qw_k [0:QD-1];
  reg [2:0] qw_head, qw_tail, qw_n;
  reg [17:0] crw;
  integer jw;
  wire rqw_fire = rdw_req_valid & rdw_req_ready;
  wire rdw_fire = rdw_data_valid & rdw_data_ready;
  wire [31:0] rqw_addr = rdw_req_payload[31:0];
  wire [31:0] rqw_cnt = rdw_req_payload[63:32];
  wire [15:0] rqw_beat = rdw_req_payload[79:64];
  wire [1:0] hw_i = qw_head[1:0];
  wire [31:0] hw_addr = qw_addr[hw_i];
  wire [31:0] hw_cnt = qw_cnt[hw_i];
  wire [31:0] hw_left_b = {16'd0, qw_beat[hw_i] - qw_k[hw_i]};
  wire [31:0] hw_m = hw_left_b < hw_cnt ? hw_left_b : hw_cnt;
  wire [31:0] hw_n = hw_m < L ? hw_m : L;
  reg [L*W-1:0] hw_words;
  always @* begin
    for (jw = 0; jw < L; jw = jw + 1)
      hw_words[jw * W +: W] = (jw < hw_n && hw_addr + jw < DEPTH) ? mem[hw_addr + jw] : {W{1'b0}};
  end
  assign rdw_req_ready = !st_rdw_req && (qw_n < QD) && !rst;
  assign rdw_data_valid = (qw_n != 0) && (qw_time[hw_i] <= cyc) && !st_rdw_data && (crw >= 18'd65536) && !rst;
  assign rdw_data_payload = {hw_n[{nbits}-1:0], hw_words};
  always @(posedge clk) begin
    if (rst) begin
      qw_head <= 0; qw_tail <= 0; qw_n <= 0; crw <= 0;
    end else begin
      crw <= (crw - (rdw_fire ? 18'd65536 : 18'd0) + wpc[17:0] > 18'd65536) ? 18'd65536
             : crw - (rdw_fire ? 18'd65536 : 18'd0) + wpc[17:0];
      if (rqw_fire) begin
        if (rqw_cnt == 0 || rqw_beat == 0 || {32'd0, rqw_addr} + rqw_cnt > nwords) begin
          fh = $fopen(f_status, "w");
          $fwrite(fh, "range read w %0d %0d %0d %0d %0d\n", rqw_addr, rqw_cnt, pc, op, nwords);
          $fclose(fh);
          $finish;
        end
        qw_time[qw_tail[1:0]] <= cyc + latency;
        qw_addr[qw_tail[1:0]] <= rqw_addr;
        qw_cnt[qw_tail[1:0]] <= rqw_cnt;
        qw_beat[qw_tail[1:0]] <= rqw_beat;
        qw_k[qw_tail[1:0]] <= 0;
        qw_tail <= qw_tail + 1;
      end
      if (rdw_fire) begin
        if (hw_cnt == hw_n) begin
          qw_head <= qw_head + 1;
        end else begin
          qw_addr[hw_i] <= hw_addr + hw_n;
          qw_cnt[hw_i] <= hw_cnt - hw_n;
          qw_k[hw_i] <= (hw_n == hw_left_b) ? 16'd0 : qw_k[hw_i] + hw_n[15:0];
        end
      end
      qw_n <= qw_n + (rqw_fire ? 1 : 0) - ((rdw_fire && hw_cnt == hw_n) ? 1 : 0);
    end
  end
"""

WR_PORT = r"""
  // ---------------- write port ----------------
  reg [63:0] b_time [0:RD-1];
  reg [6:0] b_head, b_tail, b_n;
  wire wr_fire = wr_req_valid & wr_req_ready;
  wire b_fire = wr_resp_valid & wr_resp_ready;
  wire [31:0] w_addr = wr_req_payload[31:0];
  wire [W-1:0] w_data = wr_req_payload[32 +: W];
  wire [W/8-1:0] w_strb = wr_req_payload[32 + W +: W/8];
  assign wr_req_ready = !st_wr_req && (b_n < RD) && !rst;
  assign wr_resp_valid = (b_n != 0) && (b_time[b_head[5:0]] <= cyc) && !st_wr_resp && !rst;
  assign wr_resp_payload = 2'd0;
  always @(posedge clk) begin
    if (rst) begin
      b_head <= 0; b_tail <= 0; b_n <= 0;
    end else begin
      if (wr_fire) begin
        if (w_addr >= nwords) begin
          fh = $fopen(f_status, "w");
          $fwrite(fh, "range write 0 %0d 1 %0d %0d %0d\n", w_addr, pc, op, nwords);
          $fclose(fh);
          $finish;
        end else begin
          for (i = 0; i < W / 8; i = i + 1)
            if (w_strb[i]) mem[w_addr][8 * i +: 8] <= w_data[8 * i +: 8];
        end
        b_time[b_tail[5:0]] <= cyc + latency;
        b_tail <= b_tail + 1;
      end
      if (b_fire) b_head <= b_head + 1;
      b_n <= b_n + (wr_fire ? 1 : 0) - (b_fire ? 1 : 0);
    end
  end
"""

CHAIN_DECL = r"""
  reg [31:0] rnd_{c};
  reg st_{c};
  integer en_{c}, sy_{c};"""

CHAIN = r"""
  wire [31:0] x1_{c} = rnd_{c} ^ (rnd_{c} << 13);
  wire [31:0] x2_{c} = x1_{c} ^ (x1_{c} >> 17);
  always @(posedge clk) begin
    if (rst) begin
      rnd_{c} <= 32'd{seed} ^ seed; st_{c} <= 0;
    end else begin
      rnd_{c} <= x2_{c} ^ (x2_{c} << 5);
      st_{c} <= st_{c} ? (rnd_{c}[15:0] < sy_{c}) : (rnd_{c}[15:0] < en_{c});
    end
  end
"""

TB_ICARUS = """`timescale 1ns/1ps
module tb;
  reg clk = 0;
  always #5 clk = ~clk;
  harness h(.clk(clk));
endmodule
"""

VERILATOR_MAIN = r"""#include "Vharness.h"
#include "verilated.h"
int main(int argc, char** argv) {
    VerilatedContext* ctx = new VerilatedContext;
    ctx->commandArgs(argc, argv);
    Vharness* top = new Vharness{ctx};
    top->clk = 0;
    top->eval();
    while (!ctx->gotFinish()) {
        top->clk = 1; top->eval();
        top->clk = 0; top->eval();
    }
    top->final();
    delete top;
    delete ctx;
    return 0;
}
"""

CHANNELS = ("rd0_req", "rd0_data", "rd1_req", "rd1_data", "wr_req", "wr_resp")
WIDE_CHANNELS = ("rdw_req", "rdw_data")  # only in a harness for accel.weight_lanes > 1


def harness_verilog(accel: AccelParams, depth: int) -> str:
    from amaranth.lib import data

    from hw.controller import CTRL_STATES as STATES
    from hw.memory import read_request_layout, write_request_layout
    W = accel.mem_word_bits
    rq_w = data.Layout.cast(read_request_layout()).size
    wq_w = data.Layout.cast(write_request_layout(W)).size
    decls, conns = [], []
    for p in (0, 1):
        decls.append(f"  wire rd{p}_req_valid, rd{p}_req_ready, rd{p}_data_valid, rd{p}_data_ready;\n"
                     f"  wire [{rq_w - 1}:0] rd{p}_req_payload;\n  wire [{W - 1}:0] rd{p}_data_payload;")
        conns.append(f"            .mem_rd{p}__req__valid(rd{p}_req_valid), .mem_rd{p}__req__ready(rd{p}_req_ready), "
                     f".mem_rd{p}__req__payload(rd{p}_req_payload),\n"
                     f"            .mem_rd{p}__data__valid(rd{p}_data_valid), .mem_rd{p}__data__ready(rd{p}_data_ready), "
                     f".mem_rd{p}__data__payload(rd{p}_data_payload)")
    decls.append(f"  wire wr_req_valid, wr_req_ready, wr_resp_valid, wr_resp_ready;\n"
                 f"  wire [{wq_w - 1}:0] wr_req_payload;\n  wire [1:0] wr_resp_payload;")
    conns.append("            .mem_wr__req__valid(wr_req_valid), .mem_wr__req__ready(wr_req_ready), "
                 ".mem_wr__req__payload(wr_req_payload),\n"
                 "            .mem_wr__resp__valid(wr_resp_valid), .mem_wr__resp__ready(wr_resp_ready), "
                 ".mem_wr__resp__payload(wr_resp_payload)")
    wide = accel.weight_lanes > 1
    channels = CHANNELS + (WIDE_CHANNELS if wide else ())
    if wide:
        from hw.memory import wide_data_layout, wide_request_layout
        wq_w = data.Layout.cast(wide_request_layout()).size
        wd_w = data.Layout.cast(wide_data_layout(W, accel.weight_lanes)).size
        decls.append(f"  wire rdw_req_valid, rdw_req_ready, rdw_data_valid, rdw_data_ready;\n"
                     f"  wire [{wq_w - 1}:0] rdw_req_payload;\n  wire [{wd_w - 1}:0] rdw_data_payload;")
        conns.append("            .mem_rdw__req__valid(rdw_req_valid), .mem_rdw__req__ready(rdw_req_ready), "
                     ".mem_rdw__req__payload(rdw_req_payload),\n"
                     "            .mem_rdw__data__valid(rdw_data_valid), .mem_rdw__data__ready(rdw_data_ready), "
                     ".mem_rdw__data__payload(rdw_data_payload)")
    args, logic = [], []
    for ci, c in enumerate(channels):
        args.append(f'    if (!$value$plusargs("st_{c}_enter=%d", en_{c})) en_{c} = 0;\n'
                    f'    if (!$value$plusargs("st_{c}_stay=%d", sy_{c})) sy_{c} = 0;')
        decls.append(CHAIN_DECL.replace("{c}", c))
        logic.append(CHAIN.replace("{c}", c).replace("{seed}", str(0x9E3779B1 * (ci + 1) & 0x7FFFFFFF | 1)))
    logic += [RD_PORT.replace("{p}", "0"), RD_PORT.replace("{p}", "1"), WR_PORT]
    fires = " || rq0_fire || rd0_fire || rq1_fire || rd1_fire || wr_fire || b_fire"
    hang = [f'      $fwrite(fh, "rd{p} %0d %0d %0d %0d %0d\\n", rd{p}_req_valid, rd{p}_req_ready, '
            f'rd{p}_data_valid, rd{p}_data_ready, q{p}_n);' for p in (0, 1)]
    if wide:
        logic.append(RDW_PORT.replace("{lanes}", str(accel.weight_lanes))
                     .replace("{nbits}", str(wd_w - W * accel.weight_lanes)))
        fires += " || rqw_fire || rdw_fire"
        hang.append('      $fwrite(fh, "rdw %0d %0d %0d %0d %0d\\n", rdw_req_valid, rdw_req_ready, '
                    'rdw_data_valid, rdw_data_ready, qw_n);')
    hang.append('      $fwrite(fh, "wr %0d %0d %0d %0d\\n", wr_req_valid, wr_req_ready, wr_resp_valid, b_n);')
    text = MEM_MODEL
    for key, val in {"{W}": str(W), "{depth}": str(depth), "{queue}": str(QUEUE),
                     "{state_w}": str(max(1, (len(STATES) - 1).bit_length()) - 1),
                     "{chan_decls}": "\n".join(decls), "{port_conns}": ",\n".join(conns),
                     "{chan_args}": "\n".join(args), "{any_fire}": fires, "{hang_status}": "\n".join(hang),
                     "{chan_logic}": "".join(logic)}.items():
        text = text.replace(key, val)
    return text


def _source_digest() -> str:
    """A digest of the RTL's Python sources (hw/), so a cached Verilog build follows code changes."""
    h = hashlib.sha1()
    root = Path(__file__).resolve().parent.parent / "hw"
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


VERILOG_FIXES = 1  # bump when the post-processing below changes (part of the cache key)


def accel_verilog(engine, accel, units, simulator, accel_factory=None, cache_dir=None) -> str:
    """The accelerator's Verilog (module ``accel``), cached by parameters and RTL sources."""
    from amaranth.back import verilog

    from hw.accel import resolve_units
    # the classes, not only the opcodes: a planted or replaced unit must not hit the genuine unit's cache
    unit_names = sorted(f"{op.name}={cls.__module__}.{cls.__qualname__}" for op, cls in resolve_units(units).items())
    key = hashlib.sha1(repr((VERILOG_FIXES, engine, accel, unit_names, simulator, _source_digest(),
                             getattr(accel_factory, "__name__", None))).encode()).hexdigest()[:16]
    cache = Path(cache_dir or "build/accel") / "verilog"
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"accel-{key}.v"
    if accel_factory is None and path.exists():
        return path.read_text()
    text = verilog.convert(_make_accel(engine, accel, units, accel_factory), name="accel")
    if simulator == "icarus":
        import re
        text, _ = re.subn(r"(reg (\\\$auto\$verilog_backend\.cc:\d+:dump_module\$\d+ ) = 0;)",
                          r"\1\n  initial #1 \2 = 1;", text)
        # Icarus 11 rejects an attribute in front of an empty statement (yosys writes one for an
        # empty branch of a full case); the attribute is only a synthesis hint
        text = text.replace("(* full_case = 32'd1 *)", "")
    if accel_factory is None:
        path.write_text(text)
    return text


def _run_folder(base, simulator: str, seed: int) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tag = hashlib.sha1(f"{time.time_ns()}-{os.getpid()}-{seed}".encode()).hexdigest()[:6]
    d = Path(base) / f"{simulator}-{stamp}-{tag}"
    d.mkdir(parents=True, exist_ok=True)
    return d.resolve()


def _build(simulator: str, accel_v: str, harness_v: str, cache_dir) -> tuple[Path, float]:
    """Build (or reuse) the simulation binary of this Verilog; returns (binary, build seconds)."""
    from .engine_check import find_simulator
    find_simulator(simulator)
    key = hashlib.sha1((simulator + accel_v + harness_v + VERILATOR_MAIN + TB_ICARUS).encode()).hexdigest()[:16]
    bdir = (Path(cache_dir or "build/accel") / f"{simulator}-{key}").resolve()
    binary = bdir / ("obj/Vharness" if simulator == "verilator" else "sim.vvp")
    if binary.exists():
        return binary, 0.0
    tmp = bdir.with_name(bdir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "accel.v").write_text(accel_v)
    (tmp / "harness.v").write_text(harness_v)
    t0 = time.perf_counter()
    if simulator == "verilator":
        (tmp / "main.cpp").write_text(VERILATOR_MAIN)
        env = dict(os.environ)
        env["MAKEFLAGS"] = (env.get("MAKEFLAGS", "") + " CFG_CXXFLAGS_PCH_I=-include OPT_FAST=-O2").strip()
        cmd = ["verilator", "--cc", "--exe", "--build", "-O3", "-Wno-fatal", "-Wno-lint", "-Wno-style",
               "--top-module", "harness", "-Mdir", "obj", "--x-assign", "fast", "--x-initial", "fast",
               "-CFLAGS", "-O2", "harness.v", "accel.v", "main.cpp"]
    else:
        (tmp / "tb.v").write_text(TB_ICARUS)
        env = dict(os.environ)
        cmd = ["iverilog", "-g2012", "-o", "sim.vvp", "-s", "tb", "tb.v", "harness.v", "accel.v"]
    res = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
    (tmp / "build.log").write_text(res.stdout + "\n" + res.stderr)
    if res.returncode != 0:
        raise RuntimeError(f"{simulator} build failed in {tmp} (see build.log):\n{res.stderr[-3000:]}")
    shutil.rmtree(bdir, ignore_errors=True)
    tmp.rename(bdir)
    return binary, time.perf_counter() - t0


LAST_BUILD_SECONDS = [0.0]
#: seconds of the last Verilog run's phases outside the simulator process: "image_hex" (writing the
#: $readmemh file) and "out_hex" (reading the $writememh file back)
LAST_PHASE_SECONDS: dict[str, float] = {}


def build_cache_dir() -> Path:
    """Where Verilog and simulator builds are cached: $ACCLLM_ACCEL_BUILD, else build/accel in the
    repository (one build per design, shared by every run and test)."""
    env = os.environ.get("ACCLLM_ACCEL_BUILD")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "build" / "accel"


def _run_verilog(engine, accel, image, simulator, stall_profile, seed, latency, wpc, run_dir, watchdog, units,
                 max_cycles, accel_factory) -> AccelRun:
    W = accel.mem_word_bits
    n_words = image.size // (W // 8)
    # the model's depth is a build parameter: a power of two, at least MIN_DEPTH, so programs of
    # similar size share one build (range checks use the image's own size, a plusarg)
    depth = 1 << max(MIN_DEPTH_LOG2, (n_words - 1).bit_length())
    cache_dir = build_cache_dir()
    accel_v = accel_verilog(engine, accel, units, simulator, accel_factory, cache_dir)
    binary, build_s = _build(simulator, accel_v, harness_verilog(accel, depth), cache_dir)
    LAST_BUILD_SECONDS[0] = build_s
    rdir = Path(run_dir).resolve() if run_dir is not None else _run_folder(cache_dir / "runs", simulator, seed)
    rdir.mkdir(parents=True, exist_ok=True)
    t_hex = time.perf_counter()
    (rdir / "image.hex").write_bytes(image_hex(image, W))
    LAST_PHASE_SECONDS["image_hex"] = time.perf_counter() - t_hex
    for f in ("out.hex", "status.txt"):
        (rdir / f).unlink(missing_ok=True)
    chains = profile(stall_profile)
    plus = [f"+image={rdir / 'image.hex'}", f"+out={rdir / 'out.hex'}", f"+status={rdir / 'status.txt'}",
            f"+latency={latency}", f"+wpc={int(round(wpc * 65536))}", f"+watchdog={watchdog}",
            f"+budget={max_cycles}", f"+words={n_words}", f"+seed={(seed * 2654435761 + 12345) & 0x7FFFFFFF}"]
    for c in CHANNELS + (WIDE_CHANNELS if accel.weight_lanes > 1 else ()):
        ch = chains[CHANNEL_CHAINS[c]]
        plus += [f"+st_{c}_enter={threshold(ch.enter)}", f"+st_{c}_stay={threshold(ch.stay)}"]
    cmd = [str(binary)] + plus if simulator == "verilator" else ["vvp", "-n", str(binary)] + plus
    t0 = time.perf_counter()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = subprocess.run(cmd, cwd=rdir, capture_output=True, text=True)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter() - t0
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    (rdir / "sim.log").write_text(res.stdout + "\n" + res.stderr)
    status = rdir / "status.txt"
    if not status.exists():
        raise RuntimeError(f"{simulator} run in {rdir} wrote no status (exit {res.returncode}; see sim.log):\n"
                           f"{res.stderr[-2000:]}")
    lines = status.read_text().split("\n")
    head = lines[0].split()
    if head[0] == "range":
        kind, port, addr, count, pc, op, dep = head[1], head[2], *map(int, head[3:])
        where = (f"{'wide read port' if port == 'w' else f'read port {port}'}: job of {count} words at word "
                 f"{addr}") if kind == "read" else f"write port: word {addr}"
        raise MemoryRangeError(f"{where} outside the memory of {dep} words (pc {pc}, {_op_name(op)})")
    if head[0] == "hang":
        cyc, by_watchdog, pc, op, state, limit = map(int, head[1:7])
        ports = {}
        for ln in lines[1:]:
            f = ln.split()
            if not f:
                continue
            if f[0].startswith("rd"):
                ports[f[0]] = dict(zip(("req_valid", "req_ready", "data_valid", "data_ready", "jobs_queued"),
                                       map(int, f[1:])))
            else:
                ports[f[0]] = dict(zip(("req_valid", "req_ready", "resp_valid", "responses_owed"), map(int, f[1:])))
        raise AccelHang(_hang_message(simulator, cyc, limit, pc, op, state, ports, not by_watchdog))
    cycles, error, pc, op, simc = map(int, head[1:6])
    t_out = time.perf_counter()
    raw = (rdir / "out.hex").read_bytes()
    mem = hex_image(raw, W, n_words)
    if mem is None:  # not plain lines (Icarus may write comments or x digits): line by line
        out_words = []
        for ln in raw.decode().split("\n"):
            ln = ln.strip()
            if ln and not ln.startswith("//") and not ln.startswith("@"):
                out_words.append(int(ln, 16) if "x" not in ln.lower() else 0)
            if len(out_words) == n_words:
                break
        mem = words_image(out_words, W)
    LAST_PHASE_SECONDS["out_hex"] = time.perf_counter() - t_out
    return AccelRun(mem, cycles, error, wall, pc + 1, pc, op, str(rdir), simc, cpu)
