"""cocotb test of the accelerator kernel (``bitstream.kernel.AccelKernel``) against cocotbext-axi's AXI
models: one ``AxiRam`` per AXI4 master (as one HBM pseudo-channel each) with random stalls on every
channel, and an ``AxiLiteMaster`` playing the host through XRT's register map. Run by
``bitstream.kernel_sim.simulate_kernel``, which writes the job (KERNEL_JOB, JSON) and reads the result
(KERNEL_RESULT, JSON) to compare it with the integer reference."""

import itertools
import json
import os
import random

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, Timer
from cocotbext.axi import AxiBus, AxiLiteBus, AxiLiteMaster, AxiRam

BASE = 0x1000
AP_CTRL = 0x00


def _pauses(rng, p):
    return itertools.cycle([int(rng.random() < p) for _ in range(97)])


@cocotb.test()
async def kernel_job(dut):
    job = json.loads(open(os.environ["KERNEL_JOB"]).read())
    rng = random.Random(job["seed"])
    dut.ap_rst_n.value = 0
    cocotb.start_soon(Clock(dut.ap_clk, 10, unit="ns").start())
    host = AxiLiteMaster(AxiLiteBus.from_prefix(dut, "s_axi_control"), dut.ap_clk, dut.ap_rst_n,
                         reset_active_level=False)
    rams = {}
    for s in job["streams"]:
        ram = AxiRam(AxiBus.from_prefix(dut, f"m_axi_{s}"), dut.ap_clk, dut.ap_rst_n,
                     reset_active_level=False, size=job["ram_bytes"])
        p = job["stall_probability"]
        if p:
            for ch in (ram.read_if.ar_channel, ram.read_if.r_channel, ram.write_if.aw_channel,
                       ram.write_if.w_channel, ram.write_if.b_channel):
                ch.set_pause_generator(_pauses(rng, p))
        rams[s] = ram
    await ClockCycles(dut.ap_clk, 5)
    dut.ap_rst_n.value = 1
    await ClockCycles(dut.ap_clk, 2)
    for s, data in job["inputs"].items():
        rams[s].write(BASE, bytes.fromhex(data))
    for name, (off, bits) in job["offsets"].items():
        s, what = name.rsplit("_", 1)
        value = BASE if what == "ptr" else job["beats"][s]
        await host.write(off, value.to_bytes(bits // 8, "little"))
    back = {name: int.from_bytes((await host.read(off, bits // 8)).data, "little")
            for name, (off, bits) in job["offsets"].items()}
    status_before = int.from_bytes((await host.read(AP_CTRL, 4)).data, "little")
    t_start = cocotb.utils.get_sim_time("ns")
    await host.write(AP_CTRL, (1).to_bytes(4, "little"))
    polls = 0
    while True:
        st = int.from_bytes((await host.read(AP_CTRL, 4)).data, "little")
        polls += 1
        if st & 2 or polls > job["max_polls"]:
            break
        await ClockCycles(dut.ap_clk, 20)
    cycles = int((cocotb.utils.get_sim_time("ns") - t_start) // 10)
    after = int.from_bytes((await host.read(AP_CTRL, 4)).data, "little")
    out = {s: rams[s].read(BASE, job["out_bytes"][s]).hex() for s in job["outputs"]}
    await Timer(1, unit="ns")
    with open(os.environ["KERNEL_RESULT"], "w") as f:
        json.dump({"status": st, "status_before": status_before, "status_after": after,
                   "done": bool(st & 2), "cycles": cycles, "args_read_back": back, "outputs": out}, f)
