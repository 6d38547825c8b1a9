# amaranth: UnusedElaboratable=no
"""hw/axi.py in Amaranth simulation against sim/axi_sim.AxiSlaveSim (random, asymmetric stalls on every
channel the slave drives; it checks the 4 KiB rule, burst lengths and WLAST as it runs): the read
adapter's AR bursts equal its model (``read_bursts``) and every word arrives once, in order; the write
adapter's AW/W beats equal ``write_beats`` and every write is answered once, BRESP passed through; the
memory system (``AxiMemorySystem``, 4 striped ports + aux) issues per port exactly the bursts of
``stripe_chunks`` + ``read_bursts`` and its reads and writes land at ``stripe_map``'s addresses; an
RRESP/BRESP error reaches ``error``/``read_fault``/``resp``."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from amaranth.sim import Simulator

import hw.axi as axi_mod
from hw.axi import read_bursts, stripe_chunks, stripe_map, write_beats
from hw.params import AccelParams
from sim.axi_sim import AxiSlaveSim


class ReadMaster:
    """Drives a ``hw.memory`` read port: jobs one after another (valid held, payload stable), data
    taken with a random ready; ``words`` collects what arrived."""

    def __init__(self, port, jobs, rng, p_ready=0.7):
        self.port, self.jobs, self.rng, self.p = port, list(jobs), rng, p_ready
        self.i, self.words, self.owed = 0, [], 0

    def drive(self, ctx):
        if self.i < len(self.jobs):
            a, n = self.jobs[self.i]
            ctx.set(self.port.req.valid, 1)
            ctx.set(self.port.req.payload.addr, a)
            ctx.set(self.port.req.payload.count, n)
        else:
            ctx.set(self.port.req.valid, 0)
        ctx.set(self.port.data.ready, int(self.rng.random() < self.p))

    def sample(self, ctx):
        if ctx.get(self.port.req.valid) and ctx.get(self.port.req.ready):
            self.owed += self.jobs[self.i][1]
            self.i += 1
        if ctx.get(self.port.data.valid) and ctx.get(self.port.data.ready):
            assert self.owed > 0, "a read word delivered that no job asked for"
            self.owed -= 1
            self.words.append(ctx.get(self.port.data.payload))

    def done(self):
        return self.i == len(self.jobs) and self.owed == 0


class WriteMaster:
    def __init__(self, port, writes, rng, p_ready=0.8):
        self.port, self.writes, self.rng, self.p = port, list(writes), rng, p_ready
        self.i, self.resps = 0, []

    def drive(self, ctx):
        if self.i < len(self.writes):
            a, d, s = self.writes[self.i]
            ctx.set(self.port.req.valid, 1)
            ctx.set(self.port.req.payload.addr, a)
            ctx.set(self.port.req.payload.data, d)
            ctx.set(self.port.req.payload.strb, s)
        else:
            ctx.set(self.port.req.valid, 0)
        ctx.set(self.port.resp.ready, int(self.rng.random() < self.p))

    def sample(self, ctx):
        if ctx.get(self.port.req.valid) and ctx.get(self.port.req.ready):
            self.i += 1
        if ctx.get(self.port.resp.valid) and ctx.get(self.port.resp.ready):
            self.resps.append(ctx.get(self.port.resp.payload))
            assert len(self.resps) <= self.i, "a write response for no accepted write"

    def done(self):
        return self.i == len(self.writes) and len(self.resps) == len(self.writes)


def run(dut, slave, masters, flags=(), max_cycles=60000):
    """Clock until every master is done and the slave idle; ``flags``: 1-bit outputs whose pulses are
    counted (returned)."""
    counts = {id(f): 0 for f in flags}

    async def bench(ctx):
        for cycle in range(max_cycles):
            for mm in masters:
                mm.drive(ctx)
            slave.step(ctx, cycle)
            for mm in masters:
                mm.sample(ctx)
            for f in flags:
                counts[id(f)] += ctx.get(f)
            if all(mm.done() for mm in masters) and slave.idle():
                return
            await ctx.tick()
        raise AssertionError(f"not done after {max_cycles} cycles (a hang)")

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    return [counts[id(f)] for f in flags]


def test_read_bursts_model_splits_at_4k_and_at_the_burst_limit():
    # 256-bit words: 128 per 4 KiB; a job from word 120 of 200 words: 8 to the boundary, 128, 64
    assert read_bursts(120, 200, 256) == [(3840, 8), (4096, 128), (8192, 64)]
    # 64-bit words: 512 per 4 KiB, so the 256-beat limit cuts first
    assert read_bursts(0, 600, 64) == [(0, 256), (2048, 256), (4096, 88)]
    assert read_bursts(0, 40, 256, max_burst=16) == [(0, 16), (512, 16), (1024, 8)]
    for a, n, w, mb in [(5, 1000, 64, 256), (127, 3, 256, 16), (1, 300, 512, 256)]:
        bursts = read_bursts(a, n, w, mb)
        assert sum(k for _, k in bursts) == n
        for addr, k in bursts:
            assert k <= mb and addr // 4096 == (addr + k * w // 8 - 1) // 4096


def test_stripe_map_is_a_bijection_and_the_identity_for_one_port():
    seen = set()
    for a in range(4096):
        p, w = stripe_map(a, 4, 8, 1 << 12)
        assert w // (1 << 12) == p and p == (a // 8) % 4
        seen.add(w)
    assert len(seen) == 4096
    assert all(stripe_map(a, 1, 16, 1 << 20) == (0, a) for a in range(0, 100000, 7))
    assert stripe_chunks(6, 20, 4, 8, 1 << 12) == [(0, 6, 2), (1, 4096, 8), (2, 8192, 8), (3, 12288 + 0, 2)]
    with pytest.raises(ValueError, match="mem_channel_bytes"):
        stripe_map(1 << 20, 2, 16, 1 << 12)


def _read_jobs(rng, W, n_jobs, span):
    bnd = 4096 // (W // 8)
    jobs = []
    for _ in range(n_jobs):
        a = int(rng.integers(0, span)) if rng.random() < 0.5 else int(rng.integers(1, 4)) * bnd - int(rng.integers(0, 6))
        jobs.append((max(0, a), int(rng.choice([1, 2, 3, 7, 16, 100, 300, 600]))))
    return jobs


@pytest.mark.parametrize("W, max_burst", [(64, 256), (256, 256), (256, 16)])
def test_read_adapter_bursts_equal_the_model_and_every_word_arrives_once(W, max_burst, mod=axi_mod):
    rng = np.random.default_rng(W + max_burst)
    dut = mod.AxiReadAdapter(W, "m_axi_t", max_burst=max_burst, outstanding=3)
    slave = AxiSlaveSim({"t": dut.bus}, W, seed=1, latency=5, max_burst=max_burst)
    nb = W // 8
    jobs = _read_jobs(rng, W, 12, 3000)
    top = max(a + n for a, n in jobs)
    words = [int(x) for x in rng.integers(0, 1 << 62, top)]
    slave.write_words(0, words)
    mm = ReadMaster(dut.mem, jobs, rng)
    (errors,) = run(dut, slave, [mm], [dut.error])
    want = [words[a + i] for a, n in jobs for i in range(n)]
    assert len(mm.words) == len(want)
    bad = [i for i, (x, y) in enumerate(zip(mm.words, want)) if x != y]
    assert not bad, f"word {bad[0]} of the reads differs: {mm.words[bad[0]]:#x} != {want[bad[0]]:#x}"
    assert slave.ars["t"] == [(ad, k, 0) for a, n in jobs for ad, k in read_bursts(a, n, W, max_burst)]
    assert errors == 0
    assert all(ad % nb == 0 for ad, _, _ in slave.ars["t"])


def test_read_adapter_pulses_error_on_slverr():
    W = 256
    rng = np.random.default_rng(3)
    dut = axi_mod.AxiReadAdapter(W, "m_axi_t", outstanding=2)
    slave = AxiSlaveSim({"t": dut.bus}, W, seed=2, bad={32 * 10, 32 * 11})
    mm = ReadMaster(dut.mem, [(8, 5), (20, 3)], rng)
    (errors,) = run(dut, slave, [mm], [dut.error])
    assert errors == 2 and len(mm.words) == 8


def test_write_adapter_beats_equal_the_model_and_every_write_is_answered(mod=axi_mod):
    W = 128
    rng = np.random.default_rng(5)
    dut = mod.AxiWriteAdapter(W, "m_axi_t", outstanding=3)
    bad = {16 * 40}
    slave = AxiSlaveSim({"t": dut.bus}, W, seed=4, latency=6, bad=bad)
    writes = [(int(rng.integers(0, 64)), int(rng.integers(0, 1 << 62)) << 60 | int(rng.integers(0, 1 << 60)),
               int(rng.integers(1, 1 << 16))) for _ in range(60)] + [(40, 123, 0xFFFF)]
    mm = WriteMaster(dut.mem, writes, rng)
    (errors,) = run(dut, slave, [mm], [dut.error])
    assert len(mm.resps) == len(writes)
    assert mm.resps[-1] != 0 and errors == sum(1 for a, _, _ in writes if a * 16 in bad) and \
        sum(1 for r in mm.resps if r) == errors
    model = [bt for a, d, s in writes for bt in write_beats(a, d, s, W)]
    assert [(ad, ln) for ad, ln, _ in slave.aws["t"]] == [(ad, ln + 1) for ad, ln, _, _, _ in model]
    applied = [(a * 16, d, s) for a, d, s in writes if a * 16 not in bad]
    assert slave.writes["t"] == applied
    # the final memory: each write's strobed bytes, in order
    mem = {}
    for a, d, s in writes:
        if a * 16 in bad:
            continue
        mask = sum(0xFF << (8 * k) for k in range(16) if s >> k & 1)
        mem[a] = (mem.get(a, 0) & ~mask) | (d & mask)
    assert all(slave.read_word(a * 16) == v for a, v in mem.items())


MS = AccelParams(mem_word_bits=64, spad_words=256, mem_ports=4, mem_stripe_words=4, mem_channel_bytes=1 << 14,
                 axi_max_burst=16, axi_outstanding=2)


@pytest.mark.parametrize("accel", [MS, dataclasses.replace(MS, mem_ports=1)], ids=["4 ports", "1 port"])
def test_memory_system_streams_a_job_from_every_port_at_the_mapped_addresses(accel, mod=axi_mod):
    W, N, S, C = accel.mem_word_bits, accel.mem_ports, accel.mem_stripe_words, accel.mem_channel_words
    nb = W // 8
    rng = np.random.default_rng(N)
    dut = mod.AxiMemorySystem(accel)
    slave = AxiSlaveSim(dut.buses, W, seed=7, latency=7, max_burst=accel.axi_max_burst)
    n_words = 1024
    words = [int(x) for x in rng.integers(0, 1 << 62, n_words)]
    for a, v in enumerate(words):
        slave.write_words(stripe_map(a, N, S, C)[1] * nb, [v])
    rd0 = [(int(rng.integers(0, 900)), int(rng.integers(1, 90))) for _ in range(10)] + [(0, 96)]
    rd1 = [(int(rng.integers(0, 1000)), int(rng.integers(1, 20))) for _ in range(10)]
    writes = [(int(rng.integers(n_words, 2 * n_words)), int(rng.integers(0, 1 << 62)), 0xFF) for _ in range(40)]
    m0, m1, mw = ReadMaster(dut.rd0, rd0, rng), ReadMaster(dut.rd1, rd1, rng), WriteMaster(dut.wr, writes, rng)
    (faults,) = run(dut, slave, [m0, m1, mw], [dut.read_fault])
    assert faults == 0 and mw.resps == [0] * len(writes)
    assert m0.words == [words[a + i] for a, n in rd0 for i in range(n)]
    assert m1.words == [words[a + i] for a, n in rd1 for i in range(n)]
    # per port: exactly the model's bursts, in order
    want = {f"mem{p}": [] for p in range(N)}
    for a, n in rd0:
        for p, w, k in stripe_chunks(a, n, N, S, C):
            want[f"mem{p}"] += [(ad, bl, 0) for ad, bl in read_bursts(w, k, W, accel.axi_max_burst)]
    want["aux"] = [(ad, bl, 0) for a, n in rd1 for _, w, k in stripe_chunks(a, n, N, S, C)
                   for ad, bl in read_bursts(w, k, W, accel.axi_max_burst)]
    for name in want:
        assert slave.ars[name] == want[name], name
    # the long job (96 words) came from every port
    if N > 1:
        assert all(any(ad // nb // C == p for ad, _, _ in slave.ars[f"mem{p}"]) for p in range(N))
    for a, d, _ in writes:
        p, w = stripe_map(a, N, S, C)
        assert (w * nb, d, 0xFF) in slave.writes[f"mem{p}"]
    last = {}
    for a, d, _ in writes:
        last[a] = d
    assert all(slave.read_word(stripe_map(a, N, S, C)[1] * nb) == d for a, d in last.items())


def test_memory_system_read_fault_and_write_error_reach_the_accelerator_side():
    accel = MS
    W, N, S, C = accel.mem_word_bits, accel.mem_ports, accel.mem_stripe_words, accel.mem_channel_words
    nb = W // 8
    rng = np.random.default_rng(9)
    dut = axi_mod.AxiMemorySystem(accel)
    bad_rd = stripe_map(13, N, S, C)[1] * nb
    bad_wr = stripe_map(2000, N, S, C)[1] * nb
    slave = AxiSlaveSim(dut.buses, W, seed=8, bad={bad_rd, bad_wr})
    m0 = ReadMaster(dut.rd0, [(10, 8)], rng)
    mw = WriteMaster(dut.wr, [(1999, 1, 0xFF), (2000, 2, 0xFF), (2001, 3, 0xFF)], rng)
    (faults,) = run(dut, slave, [m0, mw], [dut.read_fault])
    assert faults == 1 and len(m0.words) == 8
    assert mw.resps == [0, 2, 0]


@pytest.mark.slow  # 69 s at load 15: compiles the tiny decoder
def test_a_compiled_layers_weights_stream_from_every_port(tmp_path):
    """How the compiler's regions map onto ports (docs/isa.md, "Memory system"): the whole word space is
    striped, so every weight region of at least ports x stripe words has words on every port, each
    port's share within one stripe of an even split (a layer's weight stream draws on all at once)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from compile_models import build_artifact, integer_model, prompt_ids

    from accllm.config import load_hw
    from hw.compile import compile_generation
    cfg = load_hw("ci-small")
    accel = dataclasses.replace(cfg.accelerator, mem_ports=4, mem_stripe_words=16, mem_channel_bytes=1 << 20)
    _, spec = integer_model(build_artifact(tmp_path), 2, 6)
    comp = compile_generation(spec, cfg.engine, accel, prompt_ids(4, seed=3), 2)
    N, S, C = accel.mem_ports, accel.mem_stripe_words, accel.mem_channel_words
    checked = 0
    for name, (lo, words) in comp.regions.items():
        if not name.endswith(".weight") or words < N * S:
            continue
        share = np.bincount([stripe_map(a, N, S, C)[0] for a in range(lo, lo + words)], minlength=N)
        assert share.min() > 0 and share.max() - share.min() <= S, (name, share)
        checked += 1
    assert checked >= 10
    # the image fits the channels: every word has a place, no two the same
    n = comp.image.size // (accel.mem_word_bits // 8)
    assert len({stripe_map(a, N, S, C)[1] for a in range(n)}) == n


@pytest.mark.slow
@pytest.mark.parametrize("bug, check, caught", [
    ("ar_ignores_4k", "read", "crosses a 4 KiB boundary"),
    ("ar_skips_a_beat", "read", "differs"),
    # the hang case waits out a 60,000-cycle hang budget (most of this test's 1,000 s at load 15): heavy
    pytest.param("req_taken_before_w", "write", "hang", marks=pytest.mark.heavy),
    ("aw_sent_twice", "write", ""),
    ("merge_drops_word", "memsys", ""),
    ("chunk_crosses_stripe", "memsys", ""),
])
def test_planted_axi_bugs_fail_these_tests(bug, check, caught):
    """The simulation checks above count: each planted bug of sim/formal_accel.AXI_BUGS (a patched copy
    of hw/axi.py) makes the test meant for it fail (with the message given, where one is)."""
    from sim.formal_accel import load_axi
    mod = load_axi(bug)
    with pytest.raises(AssertionError) as e:
        if check == "read":
            test_read_adapter_bursts_equal_the_model_and_every_word_arrives_once(64, 256, mod)
        elif check == "write":
            test_write_adapter_beats_equal_the_model_and_every_write_is_answered(mod)
        else:
            test_memory_system_streams_a_job_from_every_port_at_the_mapped_addresses(MS, mod)
    assert caught in str(e.value)
