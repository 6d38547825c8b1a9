"""A measurement harness, not part of the engine: ``ArraySlice`` exposes a slice of the engine's array
(``hw.engine_parts.pair_candidates`` + ``pe_pair``, exactly the logic ``Candidates`` and ``ArrayRow``
build) with every input and product a top-level port and no registers, so ``benchmarks/resources.py``
can price one product and ``tests/hw/test_engine_amaranth.py`` can test the cell per 2:4 pattern."""

from __future__ import annotations

from amaranth.hdl import Elaboratable, Module, Signal, signed

from quant.formats import ACT

from .engine_parts import CODE_BITS, META_BITS, pair_candidates, pe_pair

__all__ = ["ArraySlice"]


class ArraySlice(Elaboratable):
    """``rows`` rows x ``2 * pairs`` lanes of the engine's array, every input and product a port."""

    def __init__(self, rows: int, pairs: int):
        self.rows, self.pairs = rows, pairs
        self.q = [[Signal(signed(ACT.bits), name=f"q{p}_{i}") for i in range(4)] for p in range(pairs)]
        self.dense = [Signal(signed(ACT.bits), name=f"a{lane}") for lane in range(2 * pairs)]
        self.is_sparse = Signal()
        self.meta = [[Signal(META_BITS, name=f"meta{r}_{p}") for p in range(pairs)] for r in range(rows)]
        self.codes = [[Signal(CODE_BITS, name=f"code{r}_{lane}") for lane in range(2 * pairs)]
                      for r in range(rows)]
        self.prods = [[Signal(signed(ACT.bits + CODE_BITS), name=f"prod{r}_{lane}") for lane in range(2 * pairs)]
                      for r in range(rows)]

    @property
    def ports(self) -> list:
        return ([s for g in self.q for s in g] + self.dense + [self.is_sparse]
                + [s for row in self.meta for s in row] + [s for row in self.codes for s in row]
                + [s for row in self.prods for s in row])

    def elaborate(self, platform):
        m = Module()
        hi_enable = Signal()
        m.d.comb += hi_enable.eq(~self.is_sparse)
        cand = [pair_candidates(m, self.q[p], self.dense[2 * p], self.dense[2 * p + 1], self.is_sparse, p)
                for p in range(self.pairs)]
        for r in range(self.rows):
            for p in range(self.pairs):
                pp, _ = pe_pair(m, cand[p], self.meta[r][p], self.codes[r][2 * p:2 * p + 2],
                                self.is_sparse, hi_enable, r, p)
                m.d.comb += [self.prods[r][2 * p].eq(pp[0]), self.prods[r][2 * p + 1].eq(pp[1])]
        return m
