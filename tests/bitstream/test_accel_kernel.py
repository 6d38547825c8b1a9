# amaranth: UnusedElaboratable=no
"""bitstream.kernel.AcceleratorKernel (the whole accelerator as an XRT RTL kernel) in Amaranth
simulation: a host writes one buffer pointer per channel over AXI4-Lite and sets ap_start; the program
(fetched through the kernel's address translation from the buffers, sim/axi_sim.AxiSlaveSim with
stalls) writes MARK words on both striped channels and halts; ap_done is read back (three times: a
second start from the halted state, a third with ``aux_ptr`` set), each MARK word is in its channel's
buffer at the pointer plus its offset in the channel, and nothing is written anywhere else; the aux
master's reads (the instruction prefetch) go through the channel pointers while ``aux_ptr`` is 0 and
to the aux buffer once it is set. Planted bugs seen failing it: the channel bits left in the
translated address; ``aux_ptr`` ignored (aux always through the channel pointers). (ap_done taken from a held done without seeing it fall first passes
here: the controller leaves DONE the cycle after start unless a prefetch is draining.)"""

import dataclasses

import pytest
from amaranth.sim import Simulator

from accllm.config import load_hw
from bitstream.axi import REG_AP_CTRL
from bitstream.kernel import AcceleratorKernel
from hw.axi import stripe_map
from hw.isa import Instr, Op, encode_program
from sim.axi_sim import AxiSlaveSim

PTRS = {"mem0_ptr": 0x3000_0000, "mem1_ptr": 0x0120_0000}  # 4 KiB aligned, channel 1's below channel 0's


def _lite_write(ctx, bus, addr, data):
    ctx.set(bus["awaddr"], addr)
    ctx.set(bus["wdata"], data)
    ctx.set(bus["wstrb"], 0xF)
    ctx.set(bus["awvalid"], 1)
    ctx.set(bus["wvalid"], 1)
    ctx.set(bus["bready"], 1)


async def _lite(ctx, bus, op, addr, data=0):
    """One AXI4-Lite write (op 'w') or read ('r'); returns the read data."""
    if op == "w":
        _lite_write(ctx, bus, addr, data)
        while True:
            await ctx.tick()
            if ctx.get(bus["bvalid"]):
                break
            ctx.set(bus["awvalid"], int(not ctx.get(bus["awready"]) and ctx.get(bus["awvalid"])))
        ctx.set(bus["awvalid"], 0)
        ctx.set(bus["wvalid"], 0)
        await ctx.tick()
        return None
    ctx.set(bus["araddr"], addr)
    ctx.set(bus["arvalid"], 1)
    ctx.set(bus["rready"], 1)
    await ctx.tick()
    ctx.set(bus["arvalid"], 0)
    while not ctx.get(bus["rvalid"]):
        await ctx.tick()
    v = ctx.get(bus["rdata"])
    await ctx.tick()
    return v


AUX_PTR = 0x5000_0000  # the aux buffer of the third run: every channel end to end from here


def test_program_runs_through_the_kernel_at_the_host_pointers():
    cfg = load_hw("ci-small")
    accel = dataclasses.replace(cfg.accelerator, mem_ports=2, mem_stripe_words=4, mem_channel_bytes=1 << 16)
    k = AcceleratorKernel(cfg.engine, accel, own_domain=False)  # the simulator's sync domain
    W = accel.mem_word_bits
    cw = accel.mem_channel_words
    marks = [40, 44, 51]  # stripes 10, 11, 12: ports 0, 1, 0
    prog = [Instr(Op.MARK, d=d) for d in marks] + [Instr(Op.HALT)]
    words = encode_program(prog, W)
    slave = AxiSlaveSim(k.buses, W, seed=3)
    nb = W // 8

    def physical(word):
        p, flat = stripe_map(word, accel.mem_ports, accel.mem_stripe_words, cw)
        return PTRS[f"mem{p}_ptr"] + (flat - p * cw) * nb

    def in_aux_buffer(word):  # aux_ptr set: the flat AXI address (channel q at q * channel bytes) from AUX_PTR
        return AUX_PTR + stripe_map(word, accel.mem_ports, accel.mem_stripe_words, cw)[1] * nb

    for i, w in enumerate(words):
        slave.write_words(physical(i), [w])
        slave.write_words(in_aux_buffer(i), [w])  # the same program in the aux buffer of run 2
    offsets = k.control.offsets
    assert list(offsets) == ["mem0_ptr", "mem1_ptr", "aux_ptr"] and offsets["aux_ptr"] == (0x20, 64)
    ctl = k.control.bus
    state = {}

    async def host(ctx):
        for name, value in PTRS.items():
            off, _ = offsets[name]
            await _lite(ctx, ctl, "w", off, value & 0xFFFF_FFFF)
            await _lite(ctx, ctl, "w", off + 4, value >> 32)
        # three runs: the second start is taken from the accelerator's DONE state; the third with
        # aux_ptr set, so the prefetch reads the aux buffer
        for run in range(3):
            if run == 2:
                off, _ = offsets["aux_ptr"]
                await _lite(ctx, ctl, "w", off, AUX_PTR & 0xFFFF_FFFF)
                await _lite(ctx, ctl, "w", off + 4, AUX_PTR >> 32)
                assert await _lite(ctx, ctl, "r", off) == AUX_PTR & 0xFFFF_FFFF  # reads back
                state["aux_reads_before"] = len(slave.ars["aux"])
            await _lite(ctx, ctl, "w", REG_AP_CTRL, 1)
            for _ in range(400):
                v = await _lite(ctx, ctl, "r", REG_AP_CTRL)
                if v & 2:
                    state[f"writes{run}"] = sum(len(w) for w in slave.writes.values())
                    break
                for _ in range(20):
                    await ctx.tick()
            else:
                raise AssertionError(f"run {run}: ap_done never rose")
            state[f"ctrl{run}"] = v
        state["ctrl"] = v

    async def memory(ctx):
        cycle = 0
        while "ctrl" not in state and cycle < 150_000:
            slave.step(ctx, cycle)
            await ctx.tick()
            cycle += 1

    sim = Simulator(k)
    sim.add_clock(1e-8)
    sim.add_testbench(host)
    sim.add_testbench(memory)
    sim.run()
    assert "ctrl" in state, "the kernel never finished"
    for run in range(3):
        assert not state[f"ctrl{run}"] & 0x10, f"run {run}: error bit set: ap_ctrl = {state[f'ctrl{run}']:#x}"
    # ap_done only once each run's MARK words were written
    assert [state[f"writes{r}"] for r in range(3)] == [len(marks) * r for r in (1, 2, 3)], state
    written = {a for n in slave.writes for a, _, _ in slave.writes[n]}
    assert written == {physical(d) for d in marks}, (sorted(map(hex, written)), [hex(physical(d)) for d in marks])
    for d in marks:
        assert 0 < slave.read_word(physical(d)) < 10_000  # the cycle counter at that MARK
    # the marks went out on the port of their stripe
    ports = {n for n in slave.writes if slave.writes[n]}
    assert ports == {"mem0", "mem1"}
    # aux (the prefetch): through the channel pointers while aux_ptr is 0, from the aux buffer after
    aux = slave.ars["aux"]
    first, last = aux[:state["aux_reads_before"]], aux[state["aux_reads_before"]:]
    assert first and last, (len(first), len(last))
    program = range(len(words))
    assert {a for a, _, _ in first} <= {physical(i) for i in program}, [hex(a) for a, _, _ in first]
    assert {a for a, _, _ in last} <= {in_aux_buffer(i) for i in program}, [hex(a) for a, _, _ in last]
