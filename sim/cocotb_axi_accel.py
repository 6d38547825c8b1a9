"""cocotb test of the accelerator's AXI4 top (``hw.accel.AxiAccelerator``) against cocotbext-axi 0.1.28:
one ``AxiRam`` per AXI master port (``m_axi_mem<p>`` and ``m_axi_aux``), all sharing one memory (the
flat AXI space; port p's channel at ``p * mem_channel_bytes``), random pauses on every channel with a
different probability per channel kind (asymmetric), the image placed by ``hw.axi.stripe_map``, a
watchdog on the accelerator's ``activity`` counter. Run by ``sim.axi_sim.run_axi_accelerator``, which
writes the job (AXI_ACCEL_JOB, JSON) and reads the result (JSON next to it, memory as .npy)."""

import itertools
import json
import os
import random

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, First, RisingEdge
from cocotbext.axi import AxiBus, AxiRam

CHECK = 512  # cycles between watchdog looks (each look costs Python time)


def _pauses(rng, p):
    return itertools.cycle([int(rng.random() < p) for _ in range(rng.choice([89, 97, 101, 103]))])


def _planted(ram, bad_read: set, bad_write: set):
    """Reads / writes of these byte addresses raise inside the RAM model: cocotbext-axi answers them
    SLVERR (axi_slave.py: RRESP / BRESP)."""
    rd, wr = ram.read_if._read, ram.write_if._write

    async def _read(address, length):
        if address in bad_read:
            raise ValueError(f"planted read error at {address:#x}")
        return await rd(address, length)

    async def _write(address, data):
        if address in bad_write:
            raise ValueError(f"planted write error at {address:#x}")
        return await wr(address, data)
    ram.read_if._read, ram.write_if._write = _read, _write


@cocotb.test()
async def axi_accel_program(dut):
    from hw.axi import stripe_map

    job = json.loads(open(os.environ["AXI_ACCEL_JOB"]).read())
    rng = random.Random(job["seed"])
    W, N, S, C = job["word_bits"], job["ports"], job["stripe_words"], job["channel_words"]
    nb = W // 8
    dut.rst.value = 1
    dut.start.value = 0
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    shared, rams = None, {}
    stall = job["stall"]
    for name in job["port_names"]:
        ram = AxiRam(AxiBus.from_prefix(dut, f"m_axi_{name}"), dut.clk, dut.rst, size=N * C * nb, mem=shared)
        shared = ram.mem
        chans = {"ar": ram.read_if.ar_channel, "r": ram.read_if.r_channel, "aw": ram.write_if.aw_channel,
                 "w": ram.write_if.w_channel, "b": ram.write_if.b_channel}
        for kind, ch in chans.items():
            if stall.get(kind):
                ch.set_pause_generator(_pauses(rng, stall[kind]))
        _planted(ram, set(job["bad_read"]), set(job["bad_write"]))
        rams[name] = ram
    ram = rams[job["port_names"][0]]
    image = np.load(job["image"])
    n_words = image.size // nb
    for s in range(0, n_words, S):
        _, w = stripe_map(s, N, S, C)
        ram.write(w * nb, image[s * nb:(s + S) * nb].tobytes())
    await ClockCycles(dut.clk, 5)
    dut.rst.value = 0
    await ClockCycles(dut.clk, 2)
    dut.start.value = 1
    await RisingEdge(dut.clk)
    dut.start.value = 0
    t0 = cocotb.utils.get_sim_time("ns")
    last, still, status = -1, 0, "done"
    while True:
        await First(RisingEdge(dut.done), ClockCycles(dut.clk, CHECK))
        if int(dut.done.value):
            break
        act = int(dut.activity.value)
        still = still + CHECK if act == last else 0
        last = act
        cyc = int((cocotb.utils.get_sim_time("ns") - t0) // 10)
        if still >= job["watchdog"] or cyc >= job["max_cycles"]:
            status = "hang" if still >= job["watchdog"] else "budget"
            break
    res = {"status": status, "cycles": int(dut.cycles.value), "error": int(dut.error.value),
           "pc": int(dut.pc.value), "op": int(dut.op.value),
           "sim_cycles": int((cocotb.utils.get_sim_time("ns") - t0) // 10)}
    if status != "done":
        hs = {}
        for name in job["port_names"]:
            for ch in ("ar", "r", "aw", "w", "b"):
                hs[f"{name}.{ch}"] = (int(getattr(dut, f"m_axi_{name}_{ch}valid").value),
                                      int(getattr(dut, f"m_axi_{name}_{ch}ready").value))
        res["handshakes"] = hs
    out = bytearray(n_words * nb)
    for s in range(0, n_words, S):
        _, w = stripe_map(s, N, S, C)
        k = min(S, n_words - s)
        out[s * nb:(s + k) * nb] = ram.read(w * nb, k * nb)
    np.save(job["out"], np.frombuffer(bytes(out), np.uint8))
    with open(job["result"], "w") as f:
        json.dump(res, f)
