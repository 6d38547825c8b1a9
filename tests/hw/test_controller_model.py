"""hw.controller_model's refusals and bookkeeping (its agreement with the RTL: tests/sim/test_cycle_model.py)."""

import pytest

from accllm.config import load_hw
from hw import controller_model as CM
from hw.isa import Instr, Op

CI = load_hw("ci-small")


@pytest.mark.parametrize("kw,word", [({"latency": 0}, "latency"), ({"words_per_cycle": 0.0}, "words_per_cycle"),
                                     ({"words_per_cycle": 1.5}, "words_per_cycle")])
def test_bad_memory_is_named(kw, word):
    with pytest.raises(CM.CycleModelError, match=word):
        CM.MemTiming(**kw)


def test_timeline_of_a_small_program():
    """LOAD/STORE/MARK/HALT: the rules of the module docstring, the prefetch bound for short ones."""
    L, IW = 8, 2
    prog = [Instr(Op.MARK, d=100), Instr(Op.LOAD, a=50, d=0, n=20, w=8), Instr(Op.STORE, a=0, d=60, n=40, w=8),
            Instr(Op.LOAD, a=50, d=0, n=0, w=8), Instr(Op.MARK, d=101), Instr(Op.HALT)]
    tl = CM.program_timeline(prog, CI.engine, CI.accelerator, CM.MemTiming(L))
    assert tl.decode[0] == L + IW
    assert tl.cycles[:5] == [max(L + 2 + 4, L + IW + 2), 2 + L + 20 + 4, 40 + 2 + L + 2 + 4, L + IW + 2,
                             L + 2 + 4]
    assert tl.marks == {100: tl.decode[0] + 2, 101: tl.decode[4] + 2} and tl.total == tl.decode[5] + 1
    with pytest.raises(CM.CycleModelError, match="NOP: not run by a client"):
        CM.busy_cycles(Instr(Op.NOP), CI.engine, CI.accelerator)
