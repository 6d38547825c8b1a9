# amaranth: UnusedElaboratable=no
"""The u280 engine configuration (256 x 32 PEs) elaborates and converts to RTLIL.

Conversion of the full array (8,192 products) takes about 4.5 CPU-minutes and 2.1 GB in Amaranth's
netlist builder (docs/engine.md), so the full conversion is marked slow; the fast test elaborates the
whole array and checks the payload layouts built from the configuration."""

import pytest
from amaranth.hdl import Fragment, Shape

from accllm.config import load_hw
from hw.engine import Engine, check_params, layouts


def test_u280_elaborates():
    p = load_hw("u280").engine
    check_params(p)
    lay = layouts(p)
    assert Shape.cast(lay["weight"]).width == p.pe_rows * p.pe_lanes * 4 + p.pe_rows * p.pe_lanes // 2 * 3 \
        + p.pe_lanes * 4
    assert Shape.cast(lay["out"]).width == p.pe_rows * p.acc_bits
    e = Engine(p)
    assert set(e.signature.members) == {"cmd", "act", "weight", "scale", "rq", "out", "busy"}
    assert Shape.cast(lay["rq"]).width == p.pe_rows * (16 + 6)  # per-row mult and shift
    frag = Fragment.get(e, None)  # runs elaborate(): the whole 256 x 32 array is built
    assert frag is not None


@pytest.mark.slow
def test_u280_converts_to_rtlil():
    from amaranth.back import rtlil

    p = load_hw("u280").engine
    text = rtlil.convert(Engine(p), name="engine")
    assert "module \\engine" in text
    for port in ("weight__payload", "out__payload", "cmd__ready"):
        assert port in text
