"""The shape-only compile (hw/compile.py ``shape_spec`` + ``weights=False``) and the compile of one part
of a program (``compile_decode_step``, ``compile_prefill_chunk``): on the tiny Llamas of compile_models,
a model given by its config.json shape and its recipe's formats alone compiles to the real compile's
program instruction for instruction, with the same memory regions; one decode step (or prefill chunk)
compiled alone is the whole program's step, instruction for instruction up to where its memory regions
lie, and the controller's cycle model times each of its instructions the same."""

import dataclasses
import re

import pytest

from accllm.config import load_recipe
from compile_models import integer_model, prompt_ids
from hw.compile import CompileError, compile_decode_step, compile_generation, compile_prefill_chunk, shape_spec
from hw.controller_model import MemTiming, program_timeline
from hw.isa import Op
from hw.params import AccelParams
from sim.estimate import ArtifactFormat, load_model, model_spec
import test_compile as _tc

engine, dense_art, sparse_art = _tc.engine, _tc.dense_art, _tc.sparse_art  # the compiler tests' fixtures

ACCEL = AccelParams(mem_word_bits=256, spad_words=8192)
#: the fields that hold memory word addresses, per opcode (hw/isa.py); every other field is a spad
#: address, a count or an immediate
MEM_FIELDS = {Op.LOAD: ("a",), Op.STORE: ("d",), Op.SCATTER: ("d",), Op.MARK: ("d",), Op.ENGINE: ("c", "e")}


def shape_only(art, sinks, window):
    """The artifact's model by its shape alone: config.json (sim.estimate.load_model) and the formats its
    recipe stores (ArtifactFormat), the Λ setting as given."""
    m = load_model(str(art / "config.json"))
    fmt = ArtifactFormat.from_recipe(load_recipe(str(art / "recipe.yaml")))
    return model_spec(m, dataclasses.replace(fmt, sinks=sinks if window is not None else 0, window=window))


def first_divergence(a, b, delta=0, region=None, step=None):
    """None, or (index, what) of the first instruction where programs a and b differ: every field and the
    note (with ``step`` = (x, y), a's notes' step name x read as y); memory-address fields of b compared
    after adding ``delta`` words (or, with ``region``, mapped through region(word, side) on both sides)."""
    if len(a) != len(b):
        n = min(len(a), len(b))
        for i in range(n):
            d = _differ(a[i], b[i], delta, region, step)
            if d:
                return i, d
        return n, f"lengths {len(a)} != {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        d = _differ(x, y, delta, region, step)
        if d:
            return i, d
    return None


def _differ(x, y, delta, region, step):
    nx, ny = x.note, y.note
    if step:  # the step's own name and token slot (tokens[k]) in its notes
        nx, ny = (re.sub(r"tokens\[\d+\]", "tokens[k]", v) for v in (nx.replace(step[0], step[1]), ny))
    if x.op != y.op or nx != ny:
        return f"{x!r} != {y!r}"
    mem = MEM_FIELDS.get(x.op, ())
    if x.op == Op.ENGINE and (x.flags & 3) == 3:
        mem = ("c",)  # P.V reads no scale beats: e is 0
    for f in dataclasses.fields(x):
        if f.name == "note":
            continue
        vx, vy = getattr(x, f.name), getattr(y, f.name)
        if f.name in mem:
            ok = region(vx, 0) == region(vy, 1) if region else vx == vy + delta
        else:
            ok = vx == vy
        if not ok:
            return f"field {f.name}: {x!r} != {y!r}"
    return None


@pytest.mark.parametrize("which,sinks,window", [("dense", 2, 6), ("dense", 0, None), ("sparse", 2, 6)])
def test_shape_only_program_equals_the_real_compile(dense_art, sparse_art, engine, which, sinks, window):
    art = dense_art if which == "dense" else sparse_art
    _, spec = integer_model(art, sinks, window)
    ss = shape_only(art, sinks, window)
    prompt = prompt_ids(5)
    for trace in ("none", "layers"):
        real = compile_generation(spec, engine, ACCEL, prompt, 4, trace=trace)
        shp = compile_generation(ss, engine, ACCEL, prompt, 4, trace=trace, weights=False)
        assert shp.image is None and real.image is not None
        assert first_divergence(real.program, shp.program) is None, first_divergence(real.program, shp.program)
        assert shp.regions == real.regions and shp.spad == real.spad and shp.trace == real.trace
        assert shp.steps == real.steps and shp.step_bytes() == real.step_bytes()
    if which == "sparse":
        assert any(i.op == Op.ENGINE and (i.flags & 3) == 1 for i in shp.program)


def _step_range(c, name):
    (_, first, count), = [s for s in c.steps if s[0] == name]
    return first, count


@pytest.mark.parametrize("sinks,window", [(2, 6), (0, None)])
def test_one_decode_step_alone_is_the_whole_programs_step(dense_art, engine, sinks, window):
    """Prompt 5, 6 new tokens: the last step embeds position 9 (Λ 2 + 6: cache full and wrapped; full
    attention: the cache holds the program's 10 positions, as the step alone sizes it)."""
    _, spec = integer_model(dense_art, sinks, window)
    prompt, n = prompt_ids(5), 6
    whole = compile_generation(spec, engine, ACCEL, prompt, n, trace="none")
    pos = len(prompt) + n - 2
    alone = compile_decode_step(spec, engine, ACCEL, pos)
    shp = compile_decode_step(shape_only(dense_art, sinks, window), engine, ACCEL, pos, weights=False)
    assert first_divergence(alone.program, shp.program) is None and alone.regions == shp.regions
    f0, cnt = _step_range(whole, f"step{n - 1}")
    a0, acnt = _step_range(alone, "step1")
    assert acnt == cnt

    def region(c):
        spans = sorted((lo, lo + w, name) for name, (lo, w) in c.regions.items() if w)

        def where(word):
            for lo, hi, name in spans:
                if lo <= word < hi:
                    # the token and MARK slots are the step's own (tokens[k-1], tokens[k], marks[k+1])
                    return (name, None) if name in ("tokens", "marks") else (name, word - lo)
            return ("outside", word)
        return where

    rw, ra = region(whole), region(alone)
    assert whole.program[f0 + cnt - 1].op == alone.program[a0 + cnt - 1].op == Op.MARK  # its slot differs
    d = first_divergence(whole.program[f0:f0 + cnt - 1], alone.program[a0:a0 + cnt - 1],
                         region=lambda w, side: (rw if side == 0 else ra)(w), step=(f"step{n - 1}", "step1"))
    assert d is None, d
    mem = MemTiming(latency=8)
    tw = program_timeline(whole.program, engine, ACCEL, mem)
    ta = program_timeline(alone.program, engine, ACCEL, mem)
    assert tw.cycles[f0:f0 + cnt] == ta.cycles[a0:a0 + acnt]
    assert whole.step_bytes()[f"step{n - 1}"] == alone.step_bytes()["step1"]


def test_one_prefill_chunk_alone_is_the_whole_programs_chunk(dense_art, engine):
    _, spec = integer_model(dense_art, 2, 6)
    prompt = prompt_ids(7)  # chunks of mm_tokens = 2 at 0, 2, 4, 6 (the last of one token)
    whole = compile_generation(spec, engine, ACCEL, prompt, 1, trace="none")
    tw = program_timeline(whole.program, engine, ACCEL, MemTiming(latency=8))
    f0 = 1  # after MARK start
    total = 0
    for start in (0, 2, 4, 6):
        alone = compile_prefill_chunk(spec, engine, ACCEL, start, len(prompt), head=start == 6)
        a0, cnt = _step_range(alone, "prefill")
        cnt -= 1  # its MARK
        d = first_divergence(whole.program[f0:f0 + cnt], alone.program[a0:a0 + cnt],
                             delta=whole.regions["program"][1] - alone.regions["program"][1])
        assert d is None, (start, d)
        ta = program_timeline(alone.program, engine, ACCEL, MemTiming(latency=8))
        assert tw.cycles[f0:f0 + cnt] == ta.cycles[a0:a0 + cnt]
        total += sum(ta.cycles[a0:a0 + cnt])
        f0 += cnt
    assert whole.program[f0].op == Op.MARK and f0 == _step_range(whole, "prefill")[1]
    assert total == sum(tw.cycles[1:f0])
    with pytest.raises(CompileError, match="start"):
        compile_prefill_chunk(spec, engine, ACCEL, 3, len(prompt))


def test_shape_only_refuses_what_the_real_compile_refuses(engine):
    """The same checks: a group that is not whole beats, a head_dim beyond the engine, named."""
    ss = shape_spec(hidden=64, intermediate=128, layers=1, n_heads=4, n_kv=2, head_dim=16, vocab=320, bits=2,
                    group_size=4, sparse=False, lm_head_bits=4, sinks=2, window=6)
    with pytest.raises(CompileError, match="group of 4 inputs"):
        compile_generation(ss, engine, ACCEL, [1, 2], 2, weights=False)
    with pytest.raises(CompileError, match="group size"):
        shape_spec(hidden=96, intermediate=128, layers=1, n_heads=4, n_kv=2, head_dim=24, vocab=320, bits=2,
                   group_size=64, sparse=False, lm_head_bits=4)


def test_shape_only_arrays_take_no_memory():
    """Llama-2-7B's shape as a Spec: every weight array a zero-stride view."""
    ss = shape_spec(hidden=4096, intermediate=11008, layers=32, n_heads=32, n_kv=32, head_dim=128, vocab=32000,
                    bits=2, group_size=64, sparse=True, lm_head_bits=4, sinks=4, window=508)
    lin = ss.layers[31].linears["down_proj"]
    assert lin.shape == (4096, 11008) and lin.codes.strides == (0, 0) and lin.mask.strides == (0, 0)
    assert ss.embed_codes.shape == (32000, 4096) and ss.embed_codes.strides == (0, 0)


def test_memoized_timeline_equals_timing_every_instruction(dense_art, sparse_art, engine):
    """program_timeline times each timing_key once: the same timeline as timing every instruction, on
    whole programs (dense and 2:4, 256- and 64-bit words, a memory at half rate)."""
    for art, accel, mem in ((dense_art, ACCEL, MemTiming(latency=8)),
                            (sparse_art, AccelParams(mem_word_bits=64, spad_words=8192),
                             MemTiming(latency=40, words_per_cycle=0.5))):
        _, spec = integer_model(art, 2, 6)
        c = compile_generation(spec, engine, accel, prompt_ids(5), 4, trace="layers")
        a = program_timeline(c.program, engine, accel, mem)
        b = program_timeline(c.program, engine, accel, mem, memo=False)
        assert a.cycles == b.cycles and a.marks == b.marks and a.total == b.total
