"""quant.atomic: a file is written whole or not at all. Planted: writing straight to the target (no
temporary) fails the interrupted-write test (the half-written text is left in place of the old)."""

import json
import os

import pytest

from quant import atomic


def test_writes_whole_and_leaves_no_temporary(tmp_path):
    p = atomic.write_json(tmp_path / "sub" / "r.json", {"a": 1})
    assert json.loads(p.read_text()) == {"a": 1} and p.read_text().endswith("\n")
    assert sorted(os.listdir(p.parent)) == ["r.json"]
    assert (p.stat().st_mode & 0o777) == (0o666 & ~_umask())


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "r.txt"
    p.write_text("old\n")

    class Boom(Exception):
        pass

    real_open = open

    def failing_open(*a, **k):  # the write dies after the first chunk
        fh = real_open(*a, **k)
        real_write = fh.write

        def write(s):
            real_write(s[:3])
            raise Boom()
        fh.write = write
        return fh
    monkeypatch.setattr("builtins.open", failing_open)
    with pytest.raises(Boom):
        atomic.write_text(p, "new text\n")
    monkeypatch.undo()
    assert p.read_text() == "old\n" and sorted(os.listdir(tmp_path)) == ["r.txt"]


def test_unserializable_writes_nothing(tmp_path):
    with pytest.raises(TypeError):
        atomic.write_json(tmp_path / "r.json", {"a": object()})
    assert os.listdir(tmp_path) == []


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m
