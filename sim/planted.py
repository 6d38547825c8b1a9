"""Planted bugs: the audit's (issue 10) engine bugs, each as a text patch applied to a *copy* of the
engine's RTL (``hw/engine.py`` and its sub-components ``hw/engine_parts.py``, copied together into a
package of their own so the copy of ``engine.py`` builds the copied parts). The committed RTL never contains them; the checkers
(tests/hw, tests/sim, tests/hw/test_formal.py) are shown to catch each one (tests/hw/test_planted.py,
docs/engine.md "Planted bugs").

A patch names the exact text it replaces; if the RTL changes so that the text is gone, ``load``
fails loudly instead of silently testing the unmodified engine.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

HW = Path(__file__).resolve().parent.parent / "hw"
ENGINE_SOURCE = HW / "engine.py"
#: the engine's RTL files: copied together, relative imports between them kept, others made absolute
ENGINE_FILES = ("engine.py", "engine_parts.py", "array_slice.py", "engine_dsp.py")

#: name -> (what the bug is, original text, replacement, the file under hw/ it is planted in)
BUGS = {
    "bram_enable": (
        "the activation banks' read enable ignores the stall (the read word moves on while S1 is held)",
        "m.d.comb += buf.r_en.eq(~stall)",
        "m.d.comb += buf.r_en.eq(1)",
        "engine.py",
    ),
    "out_bank_overwrite": (
        "a finished tile overwrites the output bank's token that is on the output but not yet taken",
        "m.d.comb += left.eq(pending & ~Mux(out_fire, e_oh, 0))",
        "m.d.comb += left.eq(pending & ~e_oh)",
        "engine_parts.py",
    ),
    "no_hold_on_stall": (
        "the pipeline's stage registers (valid, tags, weight and scale beats) load on every cycle, stall or not (an op is lost: a hang)",
        "        with m.If(~stall):\n            for k in range(1, D + 1):",
        "        with m.If(1):\n            for k in range(1, D + 1):",
        "engine.py",
    ),
    "round_up_shift_gt8": (
        "the requantizer adds 1 before the shift when shift > 8",
        'summed.eq(z["prod"] + half)',
        'summed.eq(z["prod"] + half + (z["shift"] > 8))',
        "engine_parts.py",
    ),
    "out_duplicate": (
        "not from the audit, for the formal beat count: the output bank stays armed after its last "
        "token went out, so the tile's beats are sent again",
        "m.d.sync += [ob_busy.eq(0), ob_e.eq(0), e_oh.eq(1)]",
        "m.d.sync += [ob_e.eq(0), e_oh.eq(1)]",
        "engine_parts.py",
    ),
    "rq_row0": (
        "not from the audit, for the per-row requantization: every row requantized with row 0's mult",
        "rq.mult.eq(acc.mult)",
        "rq.mult.eq(accs[0].mult)",
        "engine.py",
    ),
    "acc_24_bits": (
        "the row accumulators are 24 bits instead of acc_bits",
        'acc = Array(Signal(signed(ACC), name=f"acc_t{tk}")',
        'acc = Array(Signal(signed(24), name=f"acc_t{tk}")',
        "engine_parts.py",
    ),
    # the 225 MHz pipeline (issue 10 item 2): local flow control and the stage registers
    "skid_pop_ignores_ready": (
        "the output register lets its head go whether or not out.ready is high (a beat dropped when "
        "ready falls)",
        "m.d.comb += [pop.eq(self.out.valid & self.out.ready), self.room.eq(room),",
        "m.d.comb += [pop.eq(self.out.valid), self.room.eq(room),",
        "engine_parts.py",
    ),
    "skid_full_overwrite": (
        "the output register takes a beat while it holds two (the second one is overwritten)",
        "m.d.sync += [count.eq(count + 1), room.eq(count == 0)]",
        "m.d.sync += [count.eq(count + 1), room.eq(count != 2)]",
        "engine_parts.py",
    ),
    "requant_not_held": (
        "the requantizers' pipeline registers load during a stall (a held op's value moves on)",
        "                if self.pipelined:\n                    with m.If(self.en):",
        "                if self.pipelined:\n                    with m.If(1):",
        "engine_parts.py",
    ),
    "group_not_held": (
        "the group stage's product registers load during a stall",
        "        with m.If(self.load):\n            m.d.sync += [pt_r.eq(ptot)",
        "        with m.If(1):\n            m.d.sync += [pt_r.eq(ptot)",
        "engine_parts.py",
    ),
    "rq_buffer_lost": (
        "the rq pipeline register takes a new beat while it still holds one not yet used",
        "m.d.comb += [self.rq.ready.eq(~rq_full | rq_take), rq_fire.eq(self.rq.valid & (~rq_full | rq_take))]",
        "m.d.comb += [self.rq.ready.eq(1), rq_fire.eq(self.rq.valid)]",
        "engine.py",
    ),
    # the lean engine (requantizer: false; tests/hw/test_engine_lean.py catches it)
    "lean_bank_late": (
        "the lean engine's bank stage one cycle after the accumulators (a requantizer stage left in the "
        "count): the bank takes the next op's sum",
        "requant=REQUANT_STAGES if p.requantizer else 0, out=1)",
        "requant=REQUANT_STAGES if p.requantizer else 1, out=1)",
        "engine_parts.py",
    ),
    # the sequencer's op queue (stages(p).seq): the stall reaches the queue, not the counters
    "queue_room_kept": (
        "the sequencer's op queue keeps its room after the second entry is filled (a third op overwrites it)",
        "m.d.sync += [q_count.eq(q_count + 1), q_room.eq(q_count == 0), q_valid.eq(1)]",
        "m.d.sync += [q_count.eq(q_count + 1), q_room.eq(1), q_valid.eq(1)]",
        "engine_parts.py",
    ),
    "queue_head_kept": (
        "the op queue's head stays when it issues with a second op behind it (the head op issues twice, "
        "the second is lost)",
        "m.d.sync += [q_count.eq(q_count - 1), head.eq(second), q_room.eq(1), q_valid.eq(q_count == 2)]",
        "m.d.sync += [q_count.eq(q_count - 1), q_room.eq(1), q_valid.eq(q_count == 2)]",
        "engine_parts.py",
    ),
    "queue_not_empty": (
        "the sequencer takes the next command while its op queue still holds ops of the last one",
        "m.d.comb += empty.eq(self.pipe_empty & q_empty)",
        "m.d.comb += empty.eq(self.pipe_empty)",
        "engine_parts.py",
    ),
    # multiplier_style: dsp (hw/engine_dsp.py; tests/hw/test_engine_dsp.py catches each)
    "dsp_field_offset": (
        "the dsp array packs the rows' codes 9 bits apart while it reads the fields 10 bits apart",
        "slots = [Cat(dig[r][lane], Const(0, FIELD_BITS - DIGIT_BITS))",
        "slots = [Cat(dig[r][lane], Const(0, FIELD_BITS - DIGIT_BITS - 1))",
        "engine_dsp.py",
    ),
    "dsp_no_correction": (
        "the dsp array leaves out the -128 * sum(c) correction of the offset packing",
        "m.d.comb += corr.eq(ls - (lc_s << OFFSET_SHIFT))",
        "m.d.comb += corr.eq(ls)",
        "engine_dsp.py",
    ),
    "dsp_pass1_unshifted": (
        "the dsp array adds a 4-bit beat's high-digit pass (op 1) without its shift by 2 (KV4, W4)",
        "self.p[r].eq(Mux(digit_s, corr << DIGIT_BITS, corr))",
        "self.p[r].eq(corr)",
        "engine_dsp.py",
    ),
    "dsp_sum_a_twice": (
        "the dsp array sends sum(a) (P·V: the zero row) with both ops of a 4-bit beat, counting it twice",
        "Mux(digit_s, 0, self.a_shared)",
        "self.a_shared",
        "engine_dsp.py",
    ),
    "dsp_w4_one_pass": (
        "the sequencer ignores the command's wide bit: a W4 dense beat runs one op, its high digits dropped",
        "two_ops.eq((c.mode != Mode.DENSE) | c.wide),",
        "two_ops.eq(c.mode != Mode.DENSE),",
        "engine_parts.py",
    ),
    "dsp_kept_sum_pair": (
        "the dsp array's 2:4 pair sums add a group's first kept activation twice (sum of kept activations wrong)",
        "acts[4 * q + i] + acts[4 * q + j]",
        "acts[4 * q + i] + acts[4 * q + i]",
        "engine_dsp.py",
    ),
    "dsp_ab_not_held": (
        "the dsp array's DSP48E2 A/B and M registers load during a stall (a held op's operands and product move on)",
        "            with m.If(en):\n                m.d.sync += [packed.eq(Cat(*slots))",
        "            with m.If(1):\n                m.d.sync += [packed.eq(Cat(*slots))",
        "engine_dsp.py",
    ),
    "dsp_digit_undelayed": (
        "the dsp array's digit flag (op 1 of a 4-bit beat) reaches the row sums without the op's delay: "
        "another op's shift and sum(a) are applied",
        'digit_s = _delay(m, digit, en, DSP_ARRAY_STAGES - 1, "digit")',
        "digit_s = digit",
        "engine_dsp.py",
    ),
    "dsp_half_swapped": (
        "the dsp array expands the other half of a 2:4 beat than the activations the op reads",
        "m.d.comb += hsel.eq(self.half)",
        "m.d.comb += hsel.eq(~self.half)",
        "engine_dsp.py",
    ),
}

_loaded: dict[str, object] = {}


def _local(text: str) -> str:
    """Relative imports of modules outside ``ENGINE_FILES`` made absolute (``from .mult`` ->
    ``from hw.mult``); those between the engine's files stay relative (the copies import each other)."""
    keep = {f.removesuffix(".py") for f in ENGINE_FILES}
    lines = []
    for line in text.splitlines(keepends=True):
        if line.startswith("from .") and line[len("from ."):].split()[0] not in keep:
            line = "from hw." + line[len("from ."):]
        lines.append(line)
    return "".join(lines)


def source(name: str) -> str:
    """The text of the engine file bug ``name`` lives in, with the bug planted."""
    if name not in BUGS:
        raise ValueError(f"planted bug {name!r}: choose from {', '.join(BUGS)}")
    _, old, new, file = BUGS[name]
    path = HW / file
    text = path.read_text()
    if text.count(old) != 1:
        raise RuntimeError(f"planted bug {name!r}: the text it replaces occurs {text.count(old)} times in "
                           f"{path} (expected once): update sim/planted.py to the new RTL")
    return text.replace(old, new)


def scratch_dir(prefix: str) -> Path:
    """A fresh folder for a planted copy's source files, removed when the process exits (the copies are
    imported once and not read again; without this every test run left its folders in the temp dir)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def load(name: str):
    """The ``engine`` module of a copy of the engine's files with bug ``name`` planted (``.Engine``,
    ``.Requantizer`` and the sub-components, all from the copy)."""
    if name in _loaded:
        return _loaded[name]
    planted_text = source(name)
    file = BUGS[name][3]
    folder = scratch_dir(f"planted-{name}-")
    pkg = f"_accllm_planted_{name}"
    (folder / pkg).mkdir()
    (folder / pkg / "__init__.py").write_text("")
    for f in ENGINE_FILES:
        text = planted_text if f == file else (HW / f).read_text()
        (folder / pkg / f).write_text(_local(text))
    spec = importlib.util.spec_from_file_location(pkg, folder / pkg / "__init__.py",
                                                  submodule_search_locations=[str(folder / pkg)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[pkg] = package  # dataclasses/enums look their module up while the body runs
    spec.loader.exec_module(package)
    mod = importlib.import_module(f"{pkg}.engine")
    _loaded[name] = mod
    return mod
