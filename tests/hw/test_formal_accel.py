# amaranth: UnusedElaboratable=no
"""Formal proofs of the controller and the memory system (issue 12, item 8; sim/formal_accel.py, the flow
of sim/formal.py): bounded from reset with every input free except the stated assumptions. P1 valid/ready
rules on the memory ports, P2 no read word lost or duplicated and every write answered / issued once,
P3 every address the one the instruction's fields name (hw.compile.accesses), P4 the engine streams.
Each property is shown to fail on a planted bug (sim/formal_accel.BUGS) at the assertion meant for it.

Configs: MemOps with 64-bit memory words (AccelParams(mem_word_bits=64, spad_words=256): the narrowest
word, so STORE/LOAD runs of several words fit in few steps); the Controller with 256-bit words (two words
per instruction, so the fetch's beat count is exercised) and max_program_instrs=16; EngineStreamer with
the smallest engine (tests/hw/test_formal.py SMALL)."""

import re

import pytest

from hw.isa import Op
from hw.params import AccelParams, EngineParams
from formal_tools import require_tools
from sim import formal
from sim import formal_accel as fa

A64 = AccelParams(mem_word_bits=64, spad_words=256)
A256 = AccelParams(mem_word_bits=256, spad_words=256, max_program_instrs=16)
SMALL = EngineParams(pe_rows=1, pe_lanes=2, mm_tokens=2, acc_bits=24, max_reduction_len=4, max_head_dim=4,
                     max_keys=4, act_buffer_bytes=64)
#: steps from reset per opcode: MARK is done by step 4; a STORE / LOAD of two words by step 7; a
#: SCATTER's first fill by step 5 (each further step costs more than the last)
DEPTH = {Op.MARK: 6, Op.STORE: 8, Op.LOAD: 8, Op.SCATTER: 6}
CTRL_DEPTH = 8     # two fetches (IW = 2 words each) and a dispatch
STREAMER_DEPTH = 22  # the scale-count divider alone takes 17 cycles before RUN


def _ctrl_module(bug):
    if bug is None:
        import hw.controller as mod
        return mod
    return fa.load_controller(bug)


def _memops(tmp_path, op, bug=None):
    spec = fa.MemOpsSpec(_ctrl_module(bug).MemOps(A64), ops=[op])
    return formal.prove(spec, spec.ports, DEPTH[op], tmp_path, "memops")


def _controller(tmp_path, bug=None):
    dispatch = {Op.LOAD: 0, Op.STORE: 0, Op.SCATTER: 0, Op.MARK: 0, Op.ENGINE: 1}
    spec = fa.ControllerSpec(_ctrl_module(bug).Controller(SMALL, A256, dispatch, 2))
    return formal.prove(spec, spec.ports, CTRL_DEPTH, tmp_path, "ctrl")


def _streamer(tmp_path, bug=None):
    spec = fa.StreamerSpec(_ctrl_module(bug).EngineStreamer(SMALL, A64))
    return formal.prove(spec, spec.ports, STREAMER_DEPTH, tmp_path, "streamer", timeout=600)


def _failed_line(r) -> str:
    src = fa.__file__
    lines = open(src).read().splitlines()
    failed = [int(n) for n in re.findall(rf"Assert failed in top: {re.escape(src)}:(\d+)", r.log)]
    assert failed, r.log[-1500:]
    return lines[failed[0] - 1]


@pytest.mark.parametrize("op", [Op.MARK, Op.STORE, Op.LOAD, Op.SCATTER], ids=lambda o: o.name)
def test_memops_handshakes_counts_and_addresses(tmp_path, op):
    require_tools()
    r = _memops(tmp_path, op)
    assert r.passed, r.log[-2000:]


@pytest.mark.parametrize("bug, op, line", [
    ("store_ignores_ready", Op.STORE, "Assert(val == pay)"),               # P1: payload moved while stalled
    ("store_same_word_twice", Op.STORE, "Assert(wq.payload.addr == (ins.d + writes)"),  # P2: written twice
    ("mark_no_drain", Op.MARK, "Assert(wowed == 0)"),                      # P2: finished, write unanswered
    ("load_count_plus_one", Op.LOAD, "Assert(rq.payload.count == nwords)"),  # P3: burst count off by one
    ("scatter_word_off_by_one", Op.SCATTER, "Assert(rq.payload.addr + rq.payload.count <= ((hi + W - 1) >> lgW))"),  # P3
])
def test_memops_proofs_find_planted_bugs(tmp_path, bug, op, line):
    require_tools()
    r = _memops(tmp_path, op, bug)
    assert not r.passed, f"{bug} passed the MemOps properties to depth {DEPTH[op]}"
    assert line in _failed_line(r), (_failed_line(r), r.log[-1500:])


def test_controller_fetch_and_dispatch(tmp_path):
    require_tools()
    r = _controller(tmp_path)
    assert r.passed, r.log[-2000:]


@pytest.mark.parametrize("bug, line", [
    ("fetch_one_word_short", "Assert(beat == IW)"),  # P2: decoded after too few words
    ("prefetch_wrong_pc", "Assert(c.mpf.req.payload.addr =="),  # P3: prefetch of the wrong instruction
    ("fetch_skips_ready", "Assert(stream.valid)"),        # P1: request dropped before the handshake
])
def test_controller_proofs_find_planted_bugs(tmp_path, bug, line):
    require_tools()
    r = _controller(tmp_path, bug)
    assert not r.passed, f"{bug} passed the controller properties to depth {CTRL_DEPTH}"
    assert line in _failed_line(r), (_failed_line(r), r.log[-1500:])


@pytest.mark.slow
@pytest.mark.heavy  # the streamer's depth-22 proofs: minutes each
def test_streamer_engine_streams(tmp_path):
    """P1/P3/P4 on ENGINE's streamer (measured 264 s at depth 22 on this machine, two proofs running)."""
    require_tools()
    r = _streamer(tmp_path)
    assert r.passed, r.log[-2000:]


@pytest.mark.slow
@pytest.mark.heavy  # the streamer's depth-22 proofs: minutes each
@pytest.mark.parametrize("bug, line", [
    ("tile_stride_ignored", "Assert(u.wrd.req.payload.addr == (h.c + wjobs * F)"),   # P3: step 20, 45 s
    ("weight_drop_on_stall", "Assert(stream.valid)"),     # P1/P4: weight beat replaced while stalled, 117 s
    ("w4_flag_dropped", "Assert(cp.wide == (h.flags & FLAG_W4).any())"),  # P4: the command's wide bit
    ("requant_sent", "Assert(cp.requant == 0)"),  # P4: what lets u280 build the lean engine
])
def test_streamer_proofs_find_planted_bugs(tmp_path, bug, line):
    """act_ignores_ready and out_beat_dropped (sim/formal_accel.BUGS) are not reached by depth 22:
    a deeper run is needed (not in CI: each step past 20 costs about a minute)."""
    require_tools()
    r = _streamer(tmp_path, bug)
    assert not r.passed, f"{bug} passed the streamer properties to depth {STREAMER_DEPTH}"
    assert line in _failed_line(r), (_failed_line(r), r.log[-1500:])
