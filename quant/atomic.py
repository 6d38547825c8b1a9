"""Files written whole or not at all: the text goes to a temporary name beside the target (unique per
process and call, so two runs writing the same result do not share it) and is moved into place only
when complete; on any error the temporary is removed and the target is left as it was. The one place
benchmarks, reports and build plans write their single-file outputs (``quant.artifact.atomic_dir``
does the same for artifact folders)."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

__all__ = ["write_text", "write_json"]

_calls = itertools.count()


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (parents created). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # an ordinary file (the umask's permissions, unlike mkstemp's 0600), its name new ("x")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{next(_calls)}.tmp")
    try:
        with open(tmp, "x", encoding=encoding) as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def write_json(path: str | Path, obj, indent: int = 1) -> Path:
    """``obj`` as JSON (``indent``, a final newline), written atomically; an object JSON cannot hold
    fails before anything is written."""
    return write_text(path, json.dumps(obj, indent=indent) + "\n")
