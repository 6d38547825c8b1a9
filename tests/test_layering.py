"""The stages' import rules: data flows quant -> hw -> sim -> bitstream; no stage imports accllm."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ORDER = ["quant", "hw", "sim", "bitstream"]
ALL = ORDER + ["accllm"]


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out & set(ALL)


@pytest.mark.parametrize("stage", ORDER)
def test_stage_imports_only_upstream(stage):
    allowed = set(ORDER[: ORDER.index(stage) + 1])
    bad = {}
    for f in sorted((REPO / stage).rglob("*.py")):
        extra = _imports(f) - allowed
        if extra:
            bad[str(f.relative_to(REPO))] = sorted(extra)
    assert not bad, f"{stage} may import only {sorted(allowed)}: {bad}"


def test_no_two_test_files_share_a_basename():
    """tests/ has no __init__.py files, so pytest imports each test file by its basename: two files of one
    name in different folders break collection of the second ("import file mismatch")."""
    from collections import Counter
    from pathlib import Path

    names = Counter(p.name for p in (Path(__file__).parent).rglob("test_*.py"))
    assert not [n for n, c in names.items() if c > 1], names
