# amaranth: UnusedElaboratable=no
"""hw.memory.BeatGather: words in, beats out, the first word in the low bits, under stalls on both
sides; and the u280's weight gather (89 words of 512 bits -> a 45,184-bit beat) converts to RTLIL
(its shift by a Python int once made a cell wider than Amaranth's 65,536-bit limit)."""

import random

from amaranth.back import rtlil
from amaranth.sim import Simulator

from accllm.config import load_hw
from hw.engine import layouts
from hw.memory import BeatGather, words_for
from amaranth.lib import data


def test_u280_weight_gather_converts():
    cfg = load_hw("u280")
    W = cfg.accelerator.mem_word_bits
    width = data.Layout.cast(layouts(cfg.engine)["weight"]).size
    g = BeatGather(W, width)
    assert g.n == words_for(width, W) == 89
    text = rtlil.convert(g, name="top", emit_src=False)
    assert "module \\top" in text


def gather(word_bits, width, n_beats, seed=0):
    rng = random.Random(seed)
    dut = BeatGather(word_bits, width)
    words = [rng.getrandbits(word_bits) for _ in range(n_beats * dut.n)]
    got = []

    async def bench(ctx):
        i = 0
        for _ in range(40 * len(words) + 100):
            ctx.set(dut.words.valid, i < len(words) and rng.random() < 0.7)
            ctx.set(dut.words.payload, words[i] if i < len(words) else 0)
            ctx.set(dut.beats.ready, rng.random() < 0.5)
            await ctx.delay(1e-9)
            if ctx.get(dut.words.valid) and ctx.get(dut.words.ready):
                i += 1
            if ctx.get(dut.beats.valid) and ctx.get(dut.beats.ready):
                got.append(ctx.get(dut.beats.payload))
            await ctx.tick()
            if len(got) == n_beats:
                return

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    want = [sum(w << (word_bits * j) for j, w in enumerate(words[b * dut.n:(b + 1) * dut.n])) % (1 << width)
            for b in range(n_beats)]
    return got, want


def test_beats_are_the_words_low_bits_first():
    for word_bits, width in ((8, 20), (16, 33), (8, 8 * 5)):
        got, want = gather(word_bits, width, 6)
        assert got == want, (word_bits, width)
