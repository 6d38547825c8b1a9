"""hw.beats: the one bit packer of engine beats (testbench streams and the memory image)."""

import numpy as np

from hw import beats
from hw.engine import layouts
from hw.params import EngineParams


def test_pack_le_is_pack_reversed_and_unpacks_back():
    p = EngineParams(pe_rows=4, pe_lanes=8)
    rng = np.random.default_rng(3)
    for name, lay in layouts(p).items():
        vals = {f: rng.integers(-(1 << 40), 1 << 40, size=(5, c)) for f, _, _, c in beats.fields(lay)}
        # rails: all ones and zeros in the first two beats
        for f, _, ew, c in beats.fields(lay):
            vals[f][0] = (1 << ew) - 1
            vals[f][1] = 0
        be, le = beats.pack(lay, vals, 5), beats.pack_le(lay, vals, 5)
        assert np.array_equal(le, be[:, ::-1]), name
        back = beats.unpack_le(lay, le)
        for f, off, ew, c in beats.fields(lay):
            assert np.array_equal(back[f], vals[f] & ((1 << ew) - 1)), (name, f)
            # the field sits where the layout says: bit `off` of beat 0 is the field's bit 0
            bit0 = (int.from_bytes(le[0].tobytes(), "little") >> off) & ((1 << ew) - 1)
            assert bit0 == int(vals[f][0, 0]) & ((1 << ew) - 1), (name, f)
    padded = beats.pack_le(layouts(p)["scale"], {"s": np.ones((2, 4)), "m": -np.ones((2, 4))}, 2, nbytes=32)
    assert padded.shape == (2, 32) and not padded[:, 8:].any()
