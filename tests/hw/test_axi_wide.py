# amaranth: UnusedElaboratable=no
"""The engine's wide weight read on the AXI top (hw/axi.py WideReadStriper inside AxiMemorySystem,
AccelParams.weight_lanes = mem_ports, one-word stripes) in Amaranth simulation against
sim/axi_sim.AxiSlaveSim with stalls that differ per port (one port nearly free, one bursty, one slow to
take addresses, one at the default rates) while read port 0 and the aux port run jobs on the same ports:
every wide job's words arrive once, in job order, in exactly the transfers of hw.memory.wide_transfers;
each port issues exactly the bursts of wide_port_jobs + read_bursts (and rd0's of stripe_chunks); the
narrow ports' words are still right. A hang is a failure (the bench's cycle budget). Each planted bug of
sim/formal_accel.AXI_BUGS of kind "wide" fails it."""

from __future__ import annotations

import numpy as np
import pytest

import hw.axi as axi_mod
from hw.axi import read_bursts, stripe_chunks, stripe_map, wide_port_jobs
from hw.memory import wide_transfers
from hw.params import AccelParams
from sim.axi_sim import AxiSlaveSim

from test_axi import ReadMaster, run

WIDE = AccelParams(mem_word_bits=64, spad_words=256, mem_ports=4, mem_stripe_words=1, mem_channel_bytes=1 << 14,
                   axi_max_burst=16, axi_outstanding=2, weight_lanes=4)
#: per-port stalls: (enter, stay) pairs are bursty chains, floats independent per cycle
BUS_STALL = {"mem0": {"r": 0.05, "ar": 0.0}, "mem1": {"r": (0.2, 0.9)}, "mem2": {"ar": 0.7, "r": 0.3},
             "aux": {"r": (0.1, 0.6)}}


class WideMaster(ReadMaster):
    """Drives a wide read port: jobs (addr, count, beat) one after another, data taken with a random
    ready; ``transfers`` collects (n, words) as they arrive."""

    def __init__(self, port, jobs, rng, lanes, W, p_ready=0.8):
        super().__init__(port, [(a, n) for a, n, _ in jobs], rng, p_ready)
        self.beats, self.lanes, self.W, self.transfers = [b for _, _, b in jobs], lanes, W, []

    def drive(self, ctx):
        super().drive(ctx)
        if self.i < len(self.jobs):
            ctx.set(self.port.req.payload.beat, self.beats[self.i])

    def sample(self, ctx):
        if ctx.get(self.port.req.valid) and ctx.get(self.port.req.ready):
            self.owed += self.jobs[self.i][1]
            self.i += 1
        if ctx.get(self.port.data.valid) and ctx.get(self.port.data.ready):
            n = ctx.get(self.port.data.payload.n)
            assert 1 <= n <= min(self.owed, self.lanes), f"a transfer of {n} words with {self.owed} owed"
            self.owed -= n
            w, m = ctx.get(self.port.data.payload.words), (1 << self.W) - 1
            self.transfers.append((n, [(w >> (self.W * i)) & m for i in range(n)]))


def test_wide_models():
    assert wide_transfers(13, 4, 5) == [4, 1, 4, 1, 3]
    assert wide_transfers(8, 4, 1) == [1] * 8
    assert wide_transfers(7, 8, 89) == [7]
    with pytest.raises(ValueError, match="each must be >= 1"):
        wide_transfers(0, 4, 5)
    # each word of a job on exactly one port, at stripe_map's place, every port's job contiguous
    C = WIDE.mem_channel_words
    for a, n in ((0, 1), (3, 9), (5, 2), (6, 64)):
        got = {}
        for p, w, k in wide_port_jobs(a, n, 4, C):
            for i in range(k):
                got[w + i] = p
        assert sorted(got) == sorted(stripe_map(x, 4, 1, C)[1] for x in range(a, a + n))


def test_bad_wide_configs_are_refused():
    import dataclasses
    assert dict(dataclasses.replace(WIDE, mem_stripe_words=4).problems())["mem_stripe_words"].startswith("4 with")
    assert "set weight_lanes to mem_ports" in dict(dataclasses.replace(WIDE, weight_lanes=2).problems())["weight_lanes"]
    with pytest.raises(ValueError, match="needs mem_ports = weight_lanes"):
        axi_mod.AxiMemorySystem(dataclasses.replace(WIDE, mem_ports=1))


def test_wide_read_streams_in_order_from_every_port_with_per_port_stalls(mod=axi_mod, seed=0):
    A = WIDE
    W, N, S, C = A.mem_word_bits, A.mem_ports, A.mem_stripe_words, A.mem_channel_words
    nb = W // 8
    rng = np.random.default_rng(seed)
    dut = mod.AxiMemorySystem(A)
    slave = AxiSlaveSim(dut.buses, W, seed=seed + 3, latency=6, max_burst=A.axi_max_burst, bus_stall=BUS_STALL)
    n_words = 1024
    words = [int(x) for x in rng.integers(0, 1 << 62, n_words)]
    for a, v in enumerate(words):
        slave.write_words(stripe_map(a, N, S, C)[1] * nb, [v])
    # beats of 5 (short last transfers, the rotation moves), 3, 1, 8 (full transfers), counts of whole
    # beats as the streamer issues them and odd ones; starts on every port
    wide = [(int(rng.integers(0, 700)), b * int(rng.integers(1, 12)), b) for b in (5, 3, 1, 8, 5, 5, 7, 4)]
    wide += [(int(rng.integers(0, 900)), int(rng.integers(1, 40)), int(rng.integers(1, 9))) for _ in range(6)]
    rd0 = [(int(rng.integers(0, 900)), int(rng.integers(1, 30))) for _ in range(6)]
    rd1 = [(int(rng.integers(0, 1000)), int(rng.integers(1, 12))) for _ in range(4)]
    mw = WideMaster(dut.rdw, wide, rng, N, W)
    m0, m1 = ReadMaster(dut.rd0, rd0, rng), ReadMaster(dut.rd1, rd1, rng)
    run(dut, slave, [mw, m0, m1], max_cycles=30000)
    want_n = [n for a, c, b in wide for n in wide_transfers(c, N, b)]
    got_n = [n for n, _ in mw.transfers]
    assert got_n == want_n, "the transfers differ from hw.memory.wide_transfers"
    got = [w for _, ws in mw.transfers for w in ws]
    want = [words[a + i] for a, c, _ in wide for i in range(c)]
    bad = next((i for i, (g, e) in enumerate(zip(got, want)) if g != e), None)
    assert got == want, f"wide words differ first at word {bad} of {len(want)}"
    assert m0.words == [words[a + i] for a, n in rd0 for i in range(n)]
    assert m1.words == [words[a + i] for a, n in rd1 for i in range(n)]
    # per port: the wide jobs' bursts and rd0's chunks' bursts (their interleaving is the arbiter's)
    want_ar = {f"mem{p}": [] for p in range(N)}
    for a, c, _ in wide:
        for p, w, k in wide_port_jobs(a, c, N, C):
            want_ar[f"mem{p}"] += [(ad, bl, 0) for ad, bl in read_bursts(w, k, W, A.axi_max_burst)]
    for a, n in rd0:
        for p, w, k in stripe_chunks(a, n, N, S, C):
            want_ar[f"mem{p}"] += [(ad, bl, 0) for ad, bl in read_bursts(w, k, W, A.axi_max_burst)]
    for name, bursts in want_ar.items():
        assert sorted(slave.ars[name]) == sorted(bursts), name
    # every port carried wide words in bursts longer than one beat (one job per port, not per word)
    assert all(max(bl for _, bl, _ in slave.ars[f"mem{p}"]) > 4 for p in range(N))


@pytest.mark.slow
@pytest.mark.parametrize("bug, caught", [
    ("wide_lanes_out_of_order", "wide words differ"),
    ("wide_port_stall_ignored", ""),
    ("wide_skid_overflows", ""),
    # waits out the bench's 30,000-cycle hang budget: heavy
    pytest.param("wide_port_job_short", "a hang", marks=pytest.mark.heavy),
])
def test_planted_wide_read_bugs_fail(bug, caught):
    from sim.formal_accel import load_axi
    with pytest.raises(AssertionError) as e:
        test_wide_read_streams_in_order_from_every_port_with_per_port_stalls(load_axi(bug))
    assert caught in str(e.value)
