"""The tiny compiled decoder (prefill + decode) on the accelerator's AXI4 top (hw.accel.AxiAccelerator:
two striped data ports of 256 bits, HBM-like 16-beat bursts, plus the aux port) under Verilator with
cocotb 2.1 and cocotbext-axi's AxiRam on every port, random pauses on all five channels with a
different probability per channel (sim.axi_sim.AXI_STALLS), a watchdog: the tokens equal the golden
model's and the final memory equals the machine model's, byte for byte (outside the cycle marks); an
SLVERR on a read or a write stops the machine with AccelError.MEM_READ / MEM_WRITE.

One extra Verilator build of the whole accelerator (minutes): heavy (make test-heavy)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hw"))

from compile_models import build_artifact, integer_model, prompt_ids  # noqa: E402

from accllm.config import load_hw  # noqa: E402
from hw.compile import compile_generation  # noqa: E402
from hw.controller import AccelError  # noqa: E402
from hw.isa import INSTR_BITS  # noqa: E402
from hw.machine import run as machine_run  # noqa: E402
from sim.model_check import _first_mem_difference, _without_marks, golden_run  # noqa: E402

pytest.importorskip("cocotbext.axi", reason="pip install cocotbext-axi (requirements/pinned.txt)")
pytestmark = [pytest.mark.slow, pytest.mark.heavy]

CFG = load_hw("ci-small")
ENGINE = CFG.engine
ACCEL = dataclasses.replace(CFG.accelerator, mem_ports=2, mem_stripe_words=4, mem_channel_bytes=1 << 22,
                            axi_max_burst=16, axi_outstanding=4)
#: the engine's weights on the wide read (hw.axi.WideReadStriper): one word from each of the 2 ports per
#: cycle; 64-bit words, so a ci-small weight beat (208 bits) is 4 words in 2 transfers
WIDE = dataclasses.replace(ACCEL, mem_word_bits=64, mem_stripe_words=1, weight_lanes=2)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    art = build_artifact(tmp_path_factory.mktemp("model"))
    _, spec = integer_model(art, 2, 6)
    prompt = prompt_ids(4, seed=3)
    c = compile_generation(spec, ENGINE, ACCEL, prompt, 2)
    tokens, _ = golden_run(spec, prompt, 2)
    return c, tokens, spec, prompt


@pytest.mark.parametrize("wide", [False, True], ids=["striped", "wide weights"])
def test_tiny_decoder_bit_exact_through_the_axi_ports(compiled, tmp_path, wide):
    from sim.axi_sim import run_axi_accelerator
    c, golden_tokens, spec, prompt = compiled
    accel = WIDE if wide else ACCEL
    if wide:
        c = compile_generation(spec, ENGINE, accel, prompt, 2)
    mrun = machine_run(c, ENGINE, accel)
    r = run_axi_accelerator(ENGINE, accel, c.image, seed=5, run_dir=tmp_path / "run")
    assert r.error == 0, f"stopped with {r.error_name} at instruction {r.pc} ({c.program[r.pc]!r})"
    assert c.read_tokens(r.mem) == golden_tokens == c.read_tokens(mrun.mem)
    a, b = _without_marks(c, r.mem), _without_marks(c, mrun.mem)
    assert np.array_equal(a, b), _first_mem_difference(c, r.mem, mrun.mem)
    print(f"AXI run: {r.cycles} cycles, {r.wall_s:.1f} s wall, {r.cpu_s:.1f} CPU-s, run folder {r.run_dir}")


def test_an_slverr_stops_the_machine_with_a_memory_error(compiled, tmp_path):
    from sim.axi_sim import run_axi_accelerator
    c = compiled[0]
    W = ACCEL.mem_word_bits
    iw = INSTR_BITS // W  # words per instruction
    r = run_axi_accelerator(ENGINE, ACCEL, c.image, seed=6, run_dir=tmp_path / "rd", bad_read_words=[3 * iw])
    assert r.error == AccelError.MEM_READ, r.error_name
    assert r.pc <= 3
    lo, _ = c.regions["tokens"]
    r = run_axi_accelerator(ENGINE, ACCEL, c.image, seed=7, run_dir=tmp_path / "wr", bad_write_words=[lo])
    assert r.error == AccelError.MEM_WRITE, r.error_name
