"""The compiler (hw/compile.py): a tiny quantized Llama compiled for the ci-small engine and run on the
machine model (hw/machine.py) generates the golden model's and the torch integer path's tokens, with
every traced tensor equal to the golden trace; chunked prefill equals token-by-token; the Λ cache's
memory is the same however many tokens are generated; what the accelerator cannot run is refused by
name before anything runs."""

import copy

import numpy as np
import pytest

from accllm.config import load_hw
from compile_models import build_artifact, golden_traces, integer_model, prompt_ids
from hw.compile import CompileError, check_program, compile_generation
from hw.isa import Instr, Op
from hw.machine import run
from hw.params import AccelParams, EngineParams
from quant import golden as G
from quant.integer import generate_against_golden

ACCEL = AccelParams(mem_word_bits=256, spad_words=8192)


@pytest.fixture(scope="module")
def engine():
    return load_hw("ci-small").engine


@pytest.fixture(scope="module")
def dense_art(tmp_path_factory):
    return build_artifact(tmp_path_factory.mktemp("dense"))


@pytest.fixture(scope="module")
def sparse_art(tmp_path_factory):
    return build_artifact(tmp_path_factory.mktemp("sparse"), "w2a8kv4-sparse24")


def _generate(art, engine, accel, sinks, window, prompt, n, trace="layers", torch_path=True):
    model, spec = integer_model(art, sinks, window)
    c = compile_generation(spec, engine, accel, prompt, n, trace=trace)
    r = run(c, engine, accel)
    tokens = c.read_tokens(r.mem)
    gold, traces = golden_traces(spec, prompt, n)
    assert gold == G.generate(spec, prompt, n)
    assert tokens == gold, (tokens, gold)
    got = c.read_trace(r.mem)
    assert got, "nothing traced"
    assert G.first_mismatch({k: traces[k] for k in got}, got) is None
    if torch_path:
        both = generate_against_golden(model, prompt, n)
        assert both["equal"] and both["tokens_torch_integer"] == tokens
    return c, r, got


@pytest.mark.parametrize("sinks,window,n", [(2, 6, 20), (0, 6, 12), (0, None, 8)])
def test_dense_w2_tokens_equal_golden_and_torch(dense_art, engine, sinks, window, n):
    """Λ with sinks past the window (prompt 5 + 19 decode steps: 16 tokens past S + W = 8), Λ without
    sinks, full attention."""
    c, r, got = _generate(dense_art, engine, ACCEL, sinks, window, prompt_ids(5), n)
    layers = len(integer_model(dense_art, sinks, window)[1].layers)
    assert f"prefill/layer{layers - 1}.out" in got and f"step{n - 1}/logits" in got
    assert f"step{n - 1}/next_token" in got and "step1/final_norm" in got
    # the lm_head (320 rows) runs in chunks of 128 rows, the widest other linear: 3 per step
    assert sum(i.op == Op.ENGINE and "lm_head rows" in i.note for i in c.program) == 3 * n
    cyc = c.read_cycles(r.mem)
    assert cyc["prefill"] > 0 and len(cyc["per_token"]) == n - 1 and min(cyc["per_token"]) > 0


def test_sparse_24_tokens_equal_golden_and_torch(sparse_art, engine):
    model, spec = integer_model(sparse_art, 2, 6)
    assert spec.layers[0].linears["q_proj"].mask is not None
    c, _, _ = _generate(sparse_art, engine, ACCEL, 2, 6, prompt_ids(6, seed=4), 14)
    assert any(i.op == Op.ENGINE and (i.flags & 3) == 1 for i in c.program)  # SPARSE commands emitted


def test_trace_all_equals_golden_with_other_word_widths(dense_art, engine):
    """Every stored tensor equal (trace "all"), with 64-bit memory words (a weight beat spans four words)
    and 512-bit words (one instruction per word)."""
    for bits in (64, 512):
        acc = AccelParams(mem_word_bits=bits, spad_words=8192)
        c, _, got = _generate(dense_art, engine, acc, 3, 5, prompt_ids(7, seed=2), 5, trace="all",
                              torch_path=False)
        assert "step2/layer1.attn.k_proj.acc" in got and "prefill/layer0.mlp.silu_mul" in got
        assert "prefill/embed" in got and "step4/lm_head.y" in got


def test_chunked_prefill_equals_token_by_token(dense_art):
    """mm_tokens 1, 2, 3 (chunks of the prompt through each linear): the same tokens, traces and cache."""
    _, spec = integer_model(dense_art, 2, 6)
    prompt = prompt_ids(11, seed=7)
    results = []
    for t in (1, 2, 3):
        eng = EngineParams(pe_rows=4, pe_lanes=8, mm_tokens=t, act_buffer_bytes=4096 * t)
        c = compile_generation(spec, eng, ACCEL, prompt, 4, trace="all")
        r = run(c, eng, ACCEL)
        engines = [i.m for i in c.program if i.op == Op.ENGINE and i.note.startswith("prefill layer 0 attn.q_proj")]
        assert max(engines) == t
        caches = {k: r.mem[v[0] * 32:(v[0] + v[1]) * 32] for k, v in c.regions.items() if ".kv" in k}
        results.append((c.read_tokens(r.mem), c.read_trace(r.mem), caches))
    for toks, tr, caches in results[1:]:
        assert toks == results[0][0]
        assert G.first_mismatch(results[0][1], tr) is None
        assert all(np.array_equal(caches[k], results[0][2][k]) for k in caches)


def test_lambda_cache_memory_is_constant(dense_art, engine):
    _, spec = integer_model(dense_art, 2, 6)
    sizes = []
    for n in (2, 30):
        c = compile_generation(spec, engine, ACCEL, prompt_ids(5), n, trace="none")
        sizes.append({k: v[1] for k, v in c.regions.items() if ".kv" in k})
        assert not c.trace
    assert sizes[0] == sizes[1] and sum(sizes[0].values()) > 0
    # full attention grows with the program's length instead
    _, full = integer_model(dense_art, 0, None)
    k = [compile_generation(full, engine, ACCEL, prompt_ids(5), n, trace="none").regions["layer0.kv0.v"][1]
         for n in (2, 30)]
    assert k[1] > k[0]


# ------------------------------------------------------------------ refusals
def _spec(dense_art, sinks=2, window=6):
    return integer_model(dense_art, sinks, window)[1]


def _refused(fn, where, *words):
    with pytest.raises(CompileError) as ei:
        fn()
    assert ei.value.where.startswith(where), str(ei.value)
    for w in words:
        assert w in str(ei.value), str(ei.value)
    return ei.value


def test_refusals_name_the_layer_and_tensor(dense_art, engine):
    spec = _spec(dense_art)
    p5 = prompt_ids(5)
    bias = copy.deepcopy(spec)
    bias.layers[1].linears["v_proj"].bias_fx = np.zeros(bias.layers[1].linears["v_proj"].shape[0], np.int64)
    _refused(lambda: compile_generation(bias, engine, ACCEL, p5, 2), "layer 1 attn.v_proj", "bias")
    rope = copy.deepcopy(spec)
    rope.rope_table = rope.rope_table * 3 // 4
    _refused(lambda: compile_generation(rope, engine, ACCEL, p5, 2), "rope", "scaling")
    grp = copy.deepcopy(spec)
    grp.layers[0].linears["down_proj"].group_size = 4
    _refused(lambda: compile_generation(grp, engine, ACCEL, p5, 2), "layer 0 mlp.down_proj", "group of 4")
    wide = EngineParams(pe_rows=4, pe_lanes=12, mm_tokens=2, max_reduction_len=4092, max_keys=4092,
                        act_buffer_bytes=8184, max_head_dim=120)
    _refused(lambda: compile_generation(spec, wide, ACCEL, p5, 2), "attention", "head_dim 16", "pe_lanes = 12")
    small_hd = EngineParams(pe_rows=4, pe_lanes=8, mm_tokens=2, max_head_dim=8)
    _refused(lambda: compile_generation(spec, small_hd, ACCEL, p5, 2), "attention", "max_head_dim = 8")
    short = EngineParams(pe_rows=4, pe_lanes=8, mm_tokens=2, max_reduction_len=64, max_keys=64, max_head_dim=64,
                         act_buffer_bytes=8192)
    _refused(lambda: compile_generation(spec, short, ACCEL, p5, 2), "layer 0 mlp.down_proj", "K = 128",
             "max_reduction_len = 64")
    full = _spec(dense_art, 0, None)
    _refused(lambda: compile_generation(full, short, ACCEL, prompt_ids(40), 30), "attention", "69 keys",
             "max_keys = 64")
    full.max_positions = 10
    _refused(lambda: compile_generation(full, engine, ACCEL, prompt_ids(8), 4), "prompt", "11 positions",
             "model's 10")
    _refused(lambda: compile_generation(spec, engine, ACCEL, [], 2), "prompt", "empty")
    _refused(lambda: compile_generation(spec, engine, ACCEL, [3, 320], 2), "prompt", "token id 320")
    _refused(lambda: compile_generation(spec, engine, AccelParams(mem_word_bits=256, spad_words=1024), p5, 2),
             "spad", "'acc'", "accel.spad_words = 1024")
    _refused(lambda: compile_generation(spec, engine, ACCEL, p5, 2, trace="some"), "trace")


def test_program_check_refuses_ranges_overlaps_and_engine_shapes(dense_art, engine):
    c = compile_generation(_spec(dense_art), engine, ACCEL, prompt_ids(3), 2)
    words = c.image.size // 32
    prog = list(c.program)

    def with_(ins, at=-1):
        p = list(prog)
        p.insert(len(p) - 1 if at == -1 else at, ins)
        return lambda: check_program(p, engine, ACCEL, words)

    _refused(with_(Instr(Op.LOAD, a=words - 1, d=0, n=9, w=32, note="bad load")), "instruction", "bad load",
             f"outside the memory image of {words} words")
    _refused(with_(Instr(Op.RESID_ADD, a=10, b=100, d=12, m=1, n=4, note="overlap")), "instruction", "overlaps")
    _refused(with_(Instr(Op.SILU_MUL, a=0, b=100, d=ACCEL.spad_words - 2, m=1, n=4, note="spad end")),
             "instruction", "outside the scratchpad")
    _refused(with_(Instr(Op.STORE, a=0, d=3, n=1, w=32, note="onto code")), "instruction", "inside the program")
    _refused(with_(Instr(Op.ENGINE, a=0, b=8, m=3, n=1, k=1, s=1, d=100, h=4, note="3 tokens")), "instruction",
             "3 tokens outside 1..engine.mm_tokens = 2")
    tight = EngineParams(pe_rows=4, pe_lanes=8, mm_tokens=2, max_reduction_len=64, max_keys=64, act_buffer_bytes=128)
    _refused(lambda: check_program(prog[:1] + [Instr(Op.ENGINE, a=0, b=64, m=2, n=9, k=9, s=1, d=300, h=4,
                                                     note="act buffer"), Instr(Op.HALT)], tight, ACCEL, words),
             "instruction 1 (act buffer)", "act_buffer_bytes = 128")
    _refused(with_(Instr(Op.ENGINE, a=0, b=8, m=1, n=1, k=1, s=1, d=100, g=0, h=5, note="rows")), "instruction",
             "row filter")
    _refused(lambda: check_program(prog[:-1], engine, ACCEL, words), "program", "HALT")
    _refused(with_(Instr(Op.LOAD, a=0, d=0, n=1, w=12, note="width")), "instruction", "element width 12")
    check_program(prog, engine, ACCEL, words)  # the compiled program itself passes
