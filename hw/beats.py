"""Engine stream beats as bits: packing field arrays into the payload layouts of ``hw.engine.layouts``
and back. One packer for everyone who builds or reads beats: the compiler (``hw/compile.py``, beats in
the memory image), the machine model (``hw/machine.py``, beats read back from memory) and the engine
testbenches (``sim/engine_check.py``, beats driven on the streams).

A layout's leaf fields are ``(name, offset, element width, count)`` (``fields``); an ``ArrayLayout`` at
the top has the single field ``""``. Element ``j`` of field ``name`` occupies bits
``[offset + j*width, offset + (j+1)*width)`` of the payload (first field at bit 0).
"""

from __future__ import annotations

import numpy as np

__all__ = ["fields", "width", "pack", "pack_le", "unpack_le", "field_offset"]


def fields(layout) -> list[tuple[str, int, int, int]]:
    """(name, offset, element width, count) for each leaf field of a payload layout."""
    from amaranth.hdl import Shape
    from amaranth.lib import data

    items = [("", 0, layout)] if isinstance(layout, data.ArrayLayout) else \
        [(name, f.offset, f.shape) for name, f in layout]
    out = []
    for name, off, shape in items:
        if isinstance(shape, data.ArrayLayout):
            out.append((name, off, Shape.cast(shape.elem_shape).width, shape.length))
        else:
            out.append((name, off, Shape.cast(shape).width, 1))
    return out


def width(layout) -> int:
    from amaranth.hdl import Shape

    return Shape.cast(layout).width


def field_offset(layout, name: str) -> tuple[int, int, int]:
    """(bit offset, element width, count) of one field."""
    for nm, off, ew, count in fields(layout):
        if nm == name:
            return off, ew, count
    raise KeyError(f"layout has no field {name!r}: {[f[0] for f in fields(layout)]}")


def _bits(layout, values: dict, n: int, nbits: int) -> np.ndarray:
    bits = np.zeros((n, nbits), np.uint8)
    for name, off, ew, count in fields(layout):
        if n == 0:
            break
        v = np.asarray(values[name], np.int64).reshape(n, count) & ((1 << ew) - 1)
        b = (v[:, :, None] >> np.arange(ew)) & 1
        bits[:, off:off + ew * count] = b.reshape(n, ew * count)
    return bits


def pack(layout, values: dict, n: int) -> np.ndarray:
    """Pack field arrays (n, count) into an (n, bytes) big-endian byte matrix of the payload width
    (the form the testbenches' hex files and ``int.from_bytes(row, "big")`` read)."""
    nbytes = (width(layout) + 7) // 8
    return np.packbits(_bits(layout, values, n, nbytes * 8)[:, ::-1], axis=1)  # MSB first


def pack_le(layout, values: dict, n: int, nbytes: int | None = None) -> np.ndarray:
    """Pack field arrays into an (n, nbytes) little-endian byte matrix (bit 0 of the payload is bit 0 of
    byte 0): the form beats take in the memory image. ``nbytes`` pads each beat (default: the width)."""
    nb = (width(layout) + 7) // 8 if nbytes is None else int(nbytes)
    if nb * 8 < width(layout):
        raise ValueError(f"{nb} bytes cannot hold a {width(layout)}-bit beat")
    return np.packbits(_bits(layout, values, n, nb * 8), axis=1, bitorder="little")


def unpack_le(layout, data_bytes: np.ndarray) -> dict[str, np.ndarray]:
    """Inverse of ``pack_le``: an (n, nbytes) little-endian byte matrix -> field arrays (n, count) of
    unsigned integers (int64; signed fields are the caller's to sign-extend)."""
    b = np.asarray(data_bytes, np.uint8)
    b = b.reshape(-1, b.shape[-1])
    bits = np.unpackbits(b, axis=1, bitorder="little").astype(np.int64)
    n = bits.shape[0]
    out = {}
    for name, off, ew, count in fields(layout):
        seg = bits[:, off:off + ew * count].reshape(n, count, ew)
        out[name] = (seg << np.arange(ew)).sum(axis=2)
    return out
