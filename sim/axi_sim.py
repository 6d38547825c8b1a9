"""AXI4 memory for Amaranth testbenches of ``hw/axi.py`` (the adapters, the stripers and
``AxiMemorySystem``): ``AxiSlaveSim`` plays one AXI4 slave port per bus over one shared memory (a dict
of bytes, the flat AXI space), with random stalls on every channel it drives (AR/AW/W ready, R/B
valid: each channel its own probability, so stalls are asymmetric), a latency from AR (AW + W) to the
first R beat (B), RRESP/BRESP SLVERR for addresses in ``bad``, and checks of the master's side of the
protocol as it runs: no INCR burst crosses 4 KiB, ARLEN/AWLEN within the limit, W beats carry WLAST on
a burst's last beat, no R/B beat is dropped (each one offered stays offered until taken). It records
every AR/AW burst (per bus) so a test compares them with ``hw.axi.read_bursts``/``stripe_chunks``.

Call ``step(ctx, cycle)`` once per cycle, after the master's inputs are set and before ``ctx.tick()``.
"""

from __future__ import annotations

import hashlib
import os
import resource
import time
from collections import deque
from pathlib import Path

import numpy as np

from hw.axi import AXI4_MAX_BURST, BOUNDARY, RESP_OKAY, RESP_SLVERR

__all__ = ["AxiSlaveSim", "AxiProtocolError", "run_axi_accelerator", "axi_accel_verilog", "AXI_STALLS"]


class AxiProtocolError(AssertionError):
    pass


class AxiSlaveSim:
    def __init__(self, buses: dict[str, dict], word_bits: int, *, seed: int = 0, latency: int = 4,
                 stall: dict[str, float] | None = None, bad: set[int] = frozenset(),
                 max_burst: int = AXI4_MAX_BURST, bus_stall: dict[str, dict] | None = None):
        self.buses, self.W, self.nb = buses, word_bits, word_bits // 8
        self.rng = np.random.default_rng(seed)
        self.latency, self.bad, self.max_burst = latency, set(bad), max_burst
        # asymmetric by default: each channel its own stall probability
        self.stall = {"ar": 0.3, "r": 0.45, "aw": 0.2, "w": 0.5, "b": 0.35}
        self.stall.update(stall or {})
        # per bus overrides (asymmetric across ports): a probability, or (enter, stay) for bursty
        # stalls (a two-state chain: stalled next cycle with probability stay once stalled)
        self.bus_stall = {n: dict(v) for n, v in (bus_stall or {}).items()}
        unknown = set(self.bus_stall) - set(buses)
        if unknown:
            raise ValueError(f"bus_stall: no bus {', '.join(sorted(unknown))} (buses: {', '.join(buses)})")
        self._stalled: dict[tuple, bool] = {}
        self.mem: dict[int, int] = {}           # byte address of a word -> word value
        self.ars = {n: [] for n in buses}       # recorded (araddr, beats, arid)
        self.aws = {n: [] for n in buses}
        self.writes = {n: [] for n in buses}    # (byte address, data, strb) in the order applied
        self._rq = {n: deque() for n in buses}  # [ready cycle, addr, beats left, id]
        self._awq = {n: deque() for n in buses}
        self._wq = {n: deque() for n in buses}
        self._bq = {n: deque() for n in buses}  # [ready cycle, resp, id]
        self._r_offer = {n: None for n in buses}
        self._b_offer = {n: None for n in buses}

    def _go(self, name: str, kind: str) -> bool:
        """Whether channel ``kind`` of bus ``name`` is not stalled this cycle."""
        p = self.bus_stall.get(name, {}).get(kind, self.stall[kind])
        if isinstance(p, tuple):
            enter, stay = p
            st = self.rng.random() < (stay if self._stalled.get((name, kind)) else enter)
            self._stalled[(name, kind)] = st
            return not st
        return self.rng.random() >= p

    # ---- memory ----
    def write_words(self, byte_addr: int, words):
        for i, w in enumerate(words):
            self.mem[byte_addr + i * self.nb] = int(w)

    def read_word(self, byte_addr: int) -> int:
        return self.mem.get(byte_addr, 0)

    def _burst_check(self, kind, name, addr, beats):
        if beats > self.max_burst:
            raise AxiProtocolError(f"{name}: {kind} burst of {beats} beats exceeds {self.max_burst}")
        if addr % self.nb:
            raise AxiProtocolError(f"{name}: {kind} address {addr:#x} not aligned to {self.nb} bytes")
        if addr // BOUNDARY != (addr + beats * self.nb - 1) // BOUNDARY:
            raise AxiProtocolError(f"{name}: {kind} burst at {addr:#x} of {beats} beats crosses a 4 KiB boundary")

    def step(self, ctx, cycle: int):
        for name, b in self.buses.items():
            self._step_read(ctx, cycle, name, b)
            self._step_write(ctx, cycle, name, b)

    def _step_read(self, ctx, cycle, name, b):
        arready = self._go(name, "ar")
        ctx.set(b["arready"], arready)
        q = self._rq[name]
        off = self._r_offer[name]
        if off is None and q and q[0][0] <= cycle and self._go(name, "r"):
            addr = q[0][1]
            resp = RESP_SLVERR if addr in self.bad else RESP_OKAY
            off = (self.read_word(addr), int(q[0][2] == 1), resp, q[0][3])
            self._r_offer[name] = off
        if off is not None:
            ctx.set(b["rvalid"], 1)
            ctx.set(b["rdata"], off[0])
            ctx.set(b["rlast"], off[1])
            ctx.set(b["rresp"], off[2])
            ctx.set(b["rid"], off[3])
        else:
            ctx.set(b["rvalid"], 0)
        if arready and ctx.get(b["arvalid"]):
            addr, beats = ctx.get(b["araddr"]), ctx.get(b["arlen"]) + 1
            if ctx.get(b["arburst"]) != 1 or 1 << ctx.get(b["arsize"]) != self.nb:
                raise AxiProtocolError(f"{name}: AR not an INCR burst of full-width beats")
            self._burst_check("read", name, addr, beats)
            self.ars[name].append((addr, beats, ctx.get(b["arid"])))
            q.append([cycle + self.latency, addr, beats, ctx.get(b["arid"])])
        if off is not None and ctx.get(b["rready"]):
            self._r_offer[name] = None
            q[0][1] += self.nb
            q[0][2] -= 1
            if q[0][2] == 0:
                q.popleft()

    def _step_write(self, ctx, cycle, name, b):
        awready = self._go(name, "aw")
        wready = self._go(name, "w")
        ctx.set(b["awready"], awready)
        ctx.set(b["wready"], wready)
        bq = self._bq[name]
        off = self._b_offer[name]
        if off is None and bq and bq[0][0] <= cycle and self._go(name, "b"):
            off = (bq[0][1], bq[0][2])
            self._b_offer[name] = off
        if off is not None:
            ctx.set(b["bvalid"], 1)
            ctx.set(b["bresp"], off[0])
            ctx.set(b["bid"], off[1])
        else:
            ctx.set(b["bvalid"], 0)
        if awready and ctx.get(b["awvalid"]):
            addr, beats = ctx.get(b["awaddr"]), ctx.get(b["awlen"]) + 1
            self._burst_check("write", name, addr, beats)
            self.aws[name].append((addr, beats, ctx.get(b["awid"])))
            self._awq[name].append([addr, beats, ctx.get(b["awid"]), False])
        if wready and ctx.get(b["wvalid"]):
            self._wq[name].append((ctx.get(b["wdata"]), ctx.get(b["wstrb"]), ctx.get(b["wlast"])))
        # a burst completes once its AW and all its W beats are in
        awq, wq = self._awq[name], self._wq[name]
        while awq and len(wq) >= awq[0][1]:
            addr, beats, wid, _ = awq.popleft()
            err = False
            for i in range(beats):
                data, strb, last = wq.popleft()
                if bool(last) != (i == beats - 1):
                    raise AxiProtocolError(f"{name}: WLAST {last} on beat {i} of a {beats}-beat burst")
                a = addr + i * self.nb
                err |= a in self.bad
                if a in self.bad:
                    continue
                old = self.read_word(a)
                mask = 0
                for k in range(self.nb):
                    if strb >> k & 1:
                        mask |= 0xFF << (8 * k)
                self.mem[a] = (old & ~mask) | (data & mask)
                self.writes[name].append((a, data, strb))
            bq.append([cycle + self.latency, RESP_SLVERR if err else RESP_OKAY, wid])
        if off is not None and ctx.get(b["bready"]):
            self._b_offer[name] = None
            bq.popleft()

    def idle(self) -> bool:
        return not any(self._rq[n] or self._awq[n] or self._wq[n] or self._bq[n] for n in self.buses)


# ---------------------------------------------------------------------------------------------------
# the whole accelerator through its AXI4 ports: Verilator + cocotb + cocotbext-axi (sim/cocotb_axi_accel.py)
# ---------------------------------------------------------------------------------------------------
#: pause probability per channel kind (each channel of each port its own pattern): asymmetric on purpose
AXI_STALLS = {"ar": 0.25, "r": 0.4, "aw": 0.15, "w": 0.5, "b": 0.3}
AXI_TOP = "axi_accel"


def axi_accel_verilog(engine, accel, units, cache_dir) -> Path:
    """The Verilog of ``hw.accel.AxiAccelerator`` (module ``axi_accel``), cached by parameters and the
    RTL's sources (``sim.accel_sim._source_digest``)."""
    from amaranth.back import verilog

    from hw.accel import AxiAccelerator, resolve_units

    from .accel_sim import _source_digest
    unit_names = sorted(f"{op.name}={cls.__module__}.{cls.__qualname__}" for op, cls in resolve_units(units).items())
    key = hashlib.sha1(repr(("axi", engine, accel, unit_names, _source_digest())).encode()).hexdigest()[:16]
    folder = Path(cache_dir) / f"axi-{key}"
    path = folder / "axi_accel.v"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        top = AxiAccelerator(engine, accel, units)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(verilog.convert(top, ports=top.ports, name=AXI_TOP))
        tmp.rename(path)
    return path


def run_axi_accelerator(engine, accel, image: np.ndarray, *, seed: int = 0, stall: dict | None = None,
                        run_dir=None, watchdog_cycles: int = 20000, max_cycles: int = 20_000_000, units=None,
                        bad_read_words=(), bad_write_words=()):
    """Run the program in ``image`` on ``AxiAccelerator`` under Verilator with cocotbext-axi memories
    (``stall``: pause probability per channel kind, default ``AXI_STALLS``); ``bad_*_words``: accelerator
    words whose reads / writes the memory answers SLVERR. Returns ``sim.accel_sim.AccelRun``; a hang
    (no progress for ``watchdog_cycles``) raises ``AccelHang`` naming pc, opcode and every AXI channel's
    valid/ready."""
    import json
    import sys

    from cocotb_tools.runner import get_runner

    from hw.axi import port_names
    from hw.axi import stripe_map as smap

    from .accel_sim import AccelHang, AccelRun, _check_image, _op_name, build_cache_dir
    from .engine_check import find_simulator

    img = _check_image(image, accel.mem_word_bits)
    W, N, S, C = accel.mem_word_bits, accel.mem_ports, accel.mem_stripe_words, accel.mem_channel_words
    n_words = img.size // (W // 8)
    smap(n_words - 1, N, S, C)  # the image fits the channels (a clear error otherwise)
    find_simulator("verilator")
    cache = build_cache_dir()
    vfile = axi_accel_verilog(engine, accel, units, cache)
    rdir = Path(run_dir).resolve() if run_dir is not None else \
        (cache / "runs" / f"axi-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{seed}").resolve()
    rdir.mkdir(parents=True, exist_ok=True)
    np.save(rdir / "image.npy", img)
    for f in ("result.json", "out.npy"):
        (rdir / f).unlink(missing_ok=True)
    nb = W // 8
    job = {"seed": seed, "word_bits": W, "ports": N, "stripe_words": S, "channel_words": C,
           "port_names": port_names(accel), "stall": dict(AXI_STALLS if stall is None else stall),
           "image": str(rdir / "image.npy"), "out": str(rdir / "out.npy"), "result": str(rdir / "result.json"),
           "watchdog": int(watchdog_cycles), "max_cycles": int(max_cycles),
           "bad_read": [smap(a, N, S, C)[1] * nb for a in bad_read_words],
           "bad_write": [smap(a, N, S, C)[1] * nb for a in bad_write_words]}
    (rdir / "job.json").write_text(json.dumps(job))
    runner = get_runner("verilator")
    build_dir = vfile.parent / "build"
    saved = os.environ.get("MAKEFLAGS")
    os.environ["MAKEFLAGS"] = ((saved or "") + " CFG_CXXFLAGS_PCH_I=-include OPT_FAST=-O1").strip()
    try:
        t0 = time.perf_counter()
        runner.build(sources=[vfile], hdl_toplevel=AXI_TOP, build_dir=build_dir, build_args=["-Wno-fatal"],
                     always=False, timescale=("1ns", "1ps"), log_file=vfile.parent / "build.log")
        LAST_AXI_BUILD_SECONDS[0] = time.perf_counter() - t0
    finally:
        if saved is None:
            os.environ.pop("MAKEFLAGS", None)
        else:
            os.environ["MAKEFLAGS"] = saved
    root = str(Path(__file__).resolve().parent.parent)
    env = {"AXI_ACCEL_JOB": str(rdir / "job.json"), "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if root not in sys.path:
        sys.path.insert(0, root)
    t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    runner.test(test_module="sim.cocotb_axi_accel", hdl_toplevel=AXI_TOP, build_dir=build_dir, test_dir=rdir,
                extra_env=env, results_xml=str(rdir / "results.xml"), log_file=rdir / "sim.log")
    wall = time.perf_counter() - t0
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
    if not (rdir / "result.json").exists():
        raise RuntimeError(f"the AXI accelerator simulation in {rdir} wrote no result (see {rdir / 'sim.log'})")
    res = json.loads((rdir / "result.json").read_text())
    if res["status"] != "done":
        hs = " ".join(f"{k}={v[0]}/{v[1]}" for k, v in res["handshakes"].items())
        why = (f"no progress for {watchdog_cycles} cycles" if res["status"] == "hang"
               else f"cycle budget of {max_cycles} exhausted")
        raise AccelHang(f"AXI accelerator hang (verilator + cocotbext-axi): {why} at cycle {res['sim_cycles']}; "
                        f"pc {res['pc']} ({_op_name(res['op'])}); AXI valid/ready: {hs}; run folder {rdir}")
    mem = np.load(rdir / "out.npy")
    return AccelRun(mem, res["cycles"], res["error"], wall, res["pc"] + 1, res["pc"], res["op"], str(rdir),
                    res["sim_cycles"], cpu)


LAST_AXI_BUILD_SECONDS = [0.0]
