"""Directed programs for the accelerator's tests and benchmarks (``sim.accel_sim``): each builder
returns ``(image, checks)``; ``checks`` lists ``(word, n, w, signed, expected)`` regions of the final
memory, the expected values computed from ``quant.reference`` (ENGINE, units) or from the ISA text
(LOAD/STORE/SCATTER), not from the RTL."""

from __future__ import annotations

import numpy as np
from amaranth.lib import data as data_layout

from hw.engine import Mode, layouts
from hw.isa import FLAG_INDEXED, FLAG_NEG, FLAG_SIGNED, INSTR_BITS, Instr, Op
from hw.memory import words_for
from hw.params import AccelParams, EngineParams
from quant import reference as ref

from .accel_sim import ImageBuilder, read_elements
from .engine_check import make_case, pack, to_ints

ENGINE_MODES = {"dense": Mode.DENSE, "sparse": Mode.SPARSE, "qk": Mode.QK, "pv": Mode.PV}


class Layout:
    """Sequential allocation of memory words after the program."""

    def __init__(self, accel: AccelParams, n_instrs: int):
        self.W = accel.mem_word_bits
        self.next = n_instrs * (INSTR_BITS // self.W)

    def take(self, words: int) -> int:
        at = self.next
        self.next += max(1, words)
        return at

    def take_elements(self, n: int, w: int) -> int:
        return self.take(words_for(n * w, self.W))


def check_memory(mem: np.ndarray, accel: AccelParams, checks) -> list[str]:
    """Mismatching regions, each named with its first differing element (empty: all equal)."""
    bad = []
    for addr, n, w, signed, exp in checks:
        got = [int(v) for v in read_elements(mem, accel.mem_word_bits, addr, n, w, signed).tolist()]
        exp = [_wrap(v, w, signed) for v in np.asarray(exp, dtype=object).reshape(-1).tolist()]
        if len(exp) != n:
            raise ValueError(f"check at word {addr}: {len(exp)} expected values for {n} elements")
        diff = [i for i in range(n) if got[i] != exp[i]]
        if diff:
            i = diff[0]
            bad.append(f"word {addr} ({n} x {w}-bit): element {i} is {got[i]}, expected {exp[i]} "
                       f"({len(diff)} of {n} differ)")
    return bad


def _wrap(v, w, signed):
    v = int(v) & ((1 << w) - 1)
    if signed and v >> (w - 1):
        v -= 1 << w
    return v


def load_store_program(accel: AccelParams, seed: int, widths=(4, 8, 16, 32, 64), n: int | None = None,
                       indexed: bool = True):
    """For each width and signedness: LOAD n elements (rails and random values) into the spad, STORE
    them back with the same width and also as 64-bit words (showing the extension); one LOAD per width
    indexed (A = a + spad[b] * s). Checks every stored region."""
    rng = np.random.default_rng(seed)
    prog, checks, data = [], [], []
    W = accel.mem_word_bits
    n_instr = 1 + len(widths) * 2 * 3 + 3
    lay = Layout(accel, n_instr)
    spad_at = 0
    for w in widths:
        for signed in (False, True):
            cnt = n if n is not None else int(rng.integers(1, 3 * W // w + 3))
            lo, hi = (-(1 << (w - 1)), (1 << (w - 1)) - 1) if signed else (0, (1 << w) - 1)
            vals = [int(x) for x in rng.integers(0, 1 << 62, cnt)]
            vals = [lo + (v % (hi - lo + 1)) for v in vals]
            for k, r in enumerate((lo, hi, 0, -1 if signed else 1)):
                if k < cnt:
                    vals[(k * 7) % cnt] = r
            src = lay.take_elements(cnt, w)
            data.append((src, vals, w))
            flags = FLAG_SIGNED if signed else 0
            if indexed and signed and w == widths[-1]:
                # index in spad: spad[idx] * s + a = src
                idx_at = spad_at
                spad_at += 1
                idx_src = lay.take_elements(1, 64)
                stride = 3
                base = src - 5 * stride
                data.append((idx_src, [5], 64))
                prog.append(Instr(Op.LOAD, w=64, a=idx_src, d=idx_at, n=1))
                prog.append(Instr(Op.LOAD, flags=flags | FLAG_INDEXED, w=w, a=base, b=idx_at, s=stride,
                                  d=spad_at, n=cnt))
            else:
                prog.append(Instr(Op.LOAD, flags=flags, w=w, a=src, d=spad_at, n=cnt))
            same = lay.take_elements(cnt, w)
            wide = lay.take_elements(cnt, 64)
            prog.append(Instr(Op.STORE, w=w, a=spad_at, d=same, n=cnt))
            prog.append(Instr(Op.STORE, w=64, a=spad_at, d=wide, n=cnt))
            checks.append((same, cnt, w, signed, vals))
            checks.append((wide, cnt, 64, True, [_wrap(v, w, signed) for v in vals]))
            spad_at += cnt
    mark = lay.take(1)
    prog.append(Instr(Op.MARK, d=mark, n=7))
    prog.append(Instr(Op.HALT))
    ib = ImageBuilder(accel)
    ib.program(prog)
    for addr, vals, w in data:
        ib.elements(addr, vals, w)
    if spad_at > accel.spad_words:
        raise ValueError(f"load_store_program needs {spad_at} spad words")
    return ib.image(lay.next + 2), checks, {"mark": mark, "program": prog}


def scatter_cases(W: int) -> list[tuple]:
    """The default SCATTER cases of ``scatter_program`` (w, m, n, e, f, k, neg) for W-bit words."""
    return [
        (4, 1, 2 * W // 4, 0, 0, 4, False),           # every nibble of two words
        (4, 3, 5, 8, 2 * W + 4, 12, True),            # 2-D, nibbles 12 bits apart, negated, rows 2W+4 apart
        (4, 2, 3, W - 4, W, W, False),                # the top nibble of successive words (word edge)
        (8, 2, 4, 0, 8 * 5, 8, True),
        (16, 2, 3, W - 16, W, 2 * W, False),
        (32, 1, 4, 32, 0, W, True),
        (64, 2, 2, W - 64, 2 * W, W, False),
    ]


def scatter_stream_cases(W: int) -> list[tuple]:
    """SCATTER cases for its row streams (tests/hw/test_scatter_cycles.py), beyond ``scatter_cases``."""
    return [
        (4, 1, 16, 4, 0, W // 4, False),        # V codes: 4 fields per word, 4 words in one stream
        (4, 3, 6, 8, 3 * W, 4, False),          # K codes: a short row per word, rows words apart
        (8, 2, 12, 0, 96, 8, True),             # row 1 starts in row 0's last word (kept cached)
        (8, 3, 4, 8, 16, W, False),             # rows interleave the same words (read waits for writes)
        (16, 1, 3, 16, 0, 3 * W, False),        # fields three words apart (two stream words passed over)
        (4, 2, 5, 0, 8, 0, False),              # k = 0: every field of a row in one place (the last wins)
        (4, 1, 2, W - 8, 0, 4, True),           # the word's two top nibbles, negated
        (8, 2, 3, 4, 32, 16, False),            # bytes off the byte boundary (e): read, not write-only
        (4, 1, 3, 4, 0, 2 * W + 8, False),      # nibbles two words apart (stream words passed over)
        (16, 2, 2, 12, W + 4, 24, True),        # the same for 16-bit fields, rows W + 4 apart
    ]


def scatter_program(accel: AccelParams, seed: int, cases: list[tuple] | None = None):
    """SCATTER cases: nibbles with a stride, FLAG_NEG, a 2-D pattern (rows of fields f bits apart),
    fields at the word's low and high edges, 8/16/32/64-bit fields; the rest of every word keeps its
    (random) bits. Expected from the ISA text, on a copy of the memory in Python. ``cases``: (w, m, n,
    e, f, k, neg) tuples in place of ``scatter_cases``."""
    rng = np.random.default_rng(seed)
    W = accel.mem_word_bits
    cases = scatter_cases(W) if cases is None else cases
    lay = Layout(accel, 3 * len(cases) + 1)
    prog, data, checks = [], [], []
    spad_at = 0
    regions = []
    for ci, (w, m, n, e, f, k, neg) in enumerate(cases):
        vals = rng.integers(-(1 << 62), 1 << 62, m * n)
        vals[:2] = [-1, 1 << 62]
        src = lay.take_elements(m * n, 64)
        data.append((src, vals, 64))
        top = e + (m - 1) * f + (n - 1) * k + w
        nwords = -(-top // W)
        dst = lay.take(nwords)
        init = [int(x) for x in rng.integers(0, 1 << 62, nwords * W // 32)]
        init_words = [sum((init[j * (W // 32) + q] & 0xFFFFFFFF) << (32 * q) for q in range(W // 32))
                      for j in range(nwords)]
        regions.append((dst, init_words))
        prog.append(Instr(Op.LOAD, w=64, a=src, d=spad_at, n=m * n))
        prog.append(Instr(Op.SCATTER, flags=FLAG_NEG if neg else 0, w=w, a=spad_at, b=n, d=dst, e=e, f=f,
                          k=k, m=m, n=n))
        # expected
        x = 0
        for j, wv in enumerate(init_words):
            x |= wv << (W * j)
        for o in range(m):
            for i in range(n):
                v = int(vals[o * n + i])
                v = -v if neg else v
                pos = e + o * f + i * k
                fm = ((1 << w) - 1) << pos
                x = (x & ~fm) | ((v & ((1 << w) - 1)) << pos)
        checks.append((dst, nwords * W // 32, 32, False,
                       [(x >> (32 * q)) & 0xFFFFFFFF for q in range(nwords * W // 32)]))
        spad_at += m * n
    prog.append(Instr(Op.HALT))
    ib = ImageBuilder(accel)
    ib.program(prog)
    for addr, vals, w in data:
        ib.elements(addr, vals, w)
    for dst, init_words in regions:
        ib.place(dst, init_words)
    return ib.image(lay.next + 1), checks, {"program": prog}


def _recompute(mode: str, inputs: dict, a: np.ndarray) -> np.ndarray:
    if mode.startswith("dense"):
        return ref.w2a8_linear(a, inputs["codes"], inputs["scales"], inputs["mins"], inputs["group_size"])
    if mode.startswith("sparse"):
        return ref.w2a8_sparse_linear(a, inputs["kept"], inputs["meta"], inputs["scales"], inputs["mins"],
                                      inputs["group_size"])
    if mode == "qk":
        return ref.qk_scores(a, inputs["k_codes"], inputs["k_zero"])
    return ref.pv_product(a, inputs["v_codes"], inputs["v_zero"])


def engine_program(p: EngineParams, accel: AccelParams, mode: str, seed: int, *, tokens: int = 1,
                   k_beats: int = 2, n: int | None = None, group_beats: int | None = None, b: int | None = None,
                   i0: int | None = None, g: int = 0, h: int | None = None, gap: int = 0, edge=None, count: int = 1):
    """``count`` ENGINE instructions of ``mode`` (dense, sparse, qk, pv) on a case of
    ``sim.engine_check.make_case``: activations LOADed into the spad with row stride ``b`` (``b`` < K:
    the tail is the zero fill), the output region pre-filled with a sentinel, rows ``g <= r < h``
    written with token stride ``i0``, weight tiles ``gap`` words apart (f = n*WB + gap), the result
    STOREd as 64-bit words. Expected: ``quant.reference`` on the case's operands."""
    rng = np.random.default_rng(seed)
    name = {"dense": "dense_mv" if tokens == 1 else "dense_mm", "sparse": "sparse_mv" if tokens == 1 else "sparse_mm",
            "qk": "qk", "pv": "pv"}[mode]
    lay_e = layouts(p)
    W = accel.mem_word_bits
    WB = words_for(data_layout.Layout.cast(lay_e["weight"]).size, W)
    SB = words_for(data_layout.Layout.cast(lay_e["scale"]).size, W)
    prog, data, checks = [], [], []
    lay = Layout(accel, 5 * count + 1)
    spad_at = 0
    ib = ImageBuilder(accel)
    for c in range(count):
        case = make_case(p, name, rng, edge=edge, k_beats=k_beats, n=n, tokens=tokens, group_beats=group_beats,
                         requant=False)
        T, N = case.tokens, case.rows
        a = case.inputs["a"].copy()
        K = a.shape[1]
        bb = K if b is None else min(b, K)
        if bb < K:
            a[:, bb:] = 0
        exp = _recompute(mode, case.inputs, a)
        hh = N if h is None else min(h, N)
        stride = (N + 3) if i0 is None else i0
        # activations in the spad
        act_src = lay.take_elements(T * bb, 8)
        data.append((act_src, a[:, :bb].reshape(-1), 8))
        a_at = spad_at
        spad_at += T * bb
        prog.append(Instr(Op.LOAD, flags=FLAG_SIGNED, w=8, a=act_src, d=a_at, n=T * bb))
        # sentinel output region
        out_n = (T - 1) * stride + N
        sent = rng.integers(-(1 << 40), 1 << 40, out_n)
        sent_src = lay.take_elements(out_n, 64)
        data.append((sent_src, sent, 64))
        d_at = spad_at
        spad_at += out_n
        prog.append(Instr(Op.LOAD, w=64, a=sent_src, d=d_at, n=out_n))
        # weight and scale beats
        wb = case.beats["weight"]
        nb = len(wb["codes"])
        wints = to_ints(pack(lay_e["weight"], wb, nb))
        F = k_beats * WB + gap
        tiles = case.tiles
        w_at = lay.take(tiles * F)
        for ti in range(tiles):
            for bi in range(k_beats):
                v = wints[ti * k_beats + bi]
                ib.place(w_at + ti * F + bi * WB, [(v >> (W * q)) & ((1 << W) - 1) for q in range(WB)])
            for gq in range(gap):
                ib.place(w_at + ti * F + k_beats * WB + gq, [int(x) for x in rng.integers(0, 1 << 62, 1)])
        s_at = 0
        if mode != "pv":
            sb = case.beats["scale"]
            ns = len(sb["s"])
            sints = to_ints(pack(lay_e["scale"], sb, ns))
            s_at = lay.take(ns * SB)
            for si, v in enumerate(sints):
                ib.place(s_at + si * SB, [(v >> (W * q)) & ((1 << W) - 1) for q in range(SB)])
        gb = int(case.beats["cmd"]["group_beats"][0][0])
        prog.append(Instr(Op.ENGINE, flags=int(ENGINE_MODES[mode]), a=a_at, b=bb, c=w_at, d=d_at, e=s_at,
                          f=F if gap else 0, g=g, h=hh, m=T, n=k_beats, k=gb, s=tiles, i0=stride))
        out_at = lay.take_elements(out_n, 64)
        prog.append(Instr(Op.STORE, w=64, a=d_at, d=out_at, n=out_n))
        expect = sent.copy()
        for t in range(T):
            for r in range(g, hh):
                expect[t * stride + r] = exp[t, r]
        checks.append((out_at, out_n, 64, True, expect))
    prog.append(Instr(Op.HALT))
    ib.program(prog)
    for addr, vals, w in data:
        ib.elements(addr, vals, w)
    if spad_at > accel.spad_words:
        raise ValueError(f"engine_program needs {spad_at} spad words, the spad has {accel.spad_words}")
    return ib.image(lay.next + 1), checks, {"program": prog}


def resid_program(accel: AccelParams, seed: int, T: int = 3, N: int = 37):
    """RESID_ADD through the top: two T x N FX tensors with rail values, their saturating sum STOREd."""
    from quant.formats import FX
    rng = np.random.default_rng(seed)
    x = rng.integers(FX.min, FX.max + 1, (T, N))
    y = rng.integers(FX.min, FX.max + 1, (T, N))
    x[0, :4] = [FX.max, FX.min, FX.max, 0]
    y[0, :4] = [FX.max, FX.min, 1, FX.min]
    exp = ref.residual_add(x, y).reshape(-1)
    lay = Layout(accel, 5)
    xa, ya = lay.take_elements(T * N, 64), lay.take_elements(T * N, 64)
    oa = lay.take_elements(T * N, 64)
    prog = [Instr(Op.LOAD, flags=FLAG_SIGNED, w=64, a=xa, d=0, n=T * N),
            Instr(Op.LOAD, flags=FLAG_SIGNED, w=64, a=ya, d=T * N, n=T * N),
            Instr(Op.RESID_ADD, a=0, b=T * N, d=2 * T * N, m=T, n=N),
            Instr(Op.STORE, w=64, a=2 * T * N, d=oa, n=T * N), Instr(Op.HALT)]
    ib = ImageBuilder(accel)
    ib.program(prog)
    ib.elements(xa, x.reshape(-1), 64)
    ib.elements(ya, y.reshape(-1), 64)
    return ib.image(lay.next + 1), [(oa, T * N, 64, True, exp)], {"program": prog}


def repeated_engine_program(p: EngineParams, accel: AccelParams, repeats: int, seed: int = 0, *, mode: str = "dense",
                            tokens: int = 2, k_beats: int = 64, n: int = 64):
    """A long program for simulation speed: one ``engine_program`` case whose ENGINE instruction runs
    ``repeats`` times (same operands, the same outputs rewritten), then its STORE. Checks as for one."""
    img, checks, info = engine_program(p, accel, mode, seed, tokens=tokens, k_beats=k_beats, n=n)
    prog = info["program"]
    eng = [ins for ins in prog if ins.op == Op.ENGINE]
    assert len(eng) == 1
    at = prog.index(eng[0])
    long = prog[:at] + eng * repeats + prog[at + 1:]
    W = accel.mem_word_bits
    iw = INSTR_BITS // W
    data_start = len(prog) * iw
    words = list(np.frombuffer(img.tobytes(), np.uint8).reshape(-1, W // 8))
    ib = ImageBuilder(accel)
    # the program starts at word 0 and has no jumps: the data moves up by the added instructions and
    # the addresses of the memory operands move with it
    shift = (len(long) - len(prog)) * iw
    fixed = []
    for ins in long:
        c = Instr(**{k: getattr(ins, k) for k in ("op", "flags", "w", "rsvd", "a", "b", "c", "d", "e", "f", "g",
                                                  "h", "n", "m", "k", "s", "i0")})
        if c.op == Op.LOAD:
            c.a += shift
        elif c.op == Op.STORE:
            c.d += shift
        elif c.op == Op.ENGINE:
            c.c += shift
            if mode != "pv":
                c.e += shift
        fixed.append(c)
    ib.program(fixed)
    for j, row in enumerate(words[data_start:]):
        ib.place(len(long) * iw + j, [int.from_bytes(bytes(row), "little")])
    checks = [(a + shift, cnt, w, sg, exp) for a, cnt, w, sg, exp in checks]
    return ib.image(), checks, {"program": fixed}


def short_instrs_program(accel: AccelParams, seed: int, count: int = 8):
    """Instructions shorter than a memory latency (LOADs of zero elements, SCATTERs of no field)
    between real LOADs and STOREs: the next instruction's prefetch is still in flight when the
    current one ends (the controller must wait for it)."""
    rng = np.random.default_rng(seed)
    lay = Layout(accel, 3 * count + 1)
    prog, checks, data = [], [], []
    for i in range(count):
        vals = rng.integers(-128, 128, 5)
        src, dst = lay.take_elements(5, 8), lay.take_elements(5, 16)
        data.append((src, vals))
        prog += [Instr(Op.LOAD, flags=FLAG_SIGNED, w=8, a=src, d=8 * i, n=5),
                 Instr(Op.LOAD, w=8, a=src, d=0, n=0) if i % 2 else Instr(Op.SCATTER, w=4, a=0, d=src, m=0, n=1),
                 Instr(Op.STORE, w=16, a=8 * i, d=dst, n=5)]
        checks.append((dst, 5, 16, True, vals))
    prog.append(Instr(Op.HALT))
    ib = ImageBuilder(accel)
    ib.program(prog)
    for addr, vals in data:
        ib.elements(addr, vals, 8)
    return ib.image(lay.next + 1), checks, {"program": prog}
