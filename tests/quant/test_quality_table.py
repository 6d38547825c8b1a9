"""benchmarks/quality.py's join mode (``--rows '' --include ...``), on the recorded 16k-token results: each
row's ratio is paired with the float row of its own text, context and attention (runs on two text files
whose first 16k tokens agree are joined in benchmarks/results/quality16k_all.md), and
``--include-min-tokens`` leaves the 4k-token screen rows out."""

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import quality as bench  # noqa: E402

RES = REPO / "benchmarks/results"


def _ppl(r):
    return math.exp(sum(r["window_nll"]) / sum(r["window_tokens"]))


def test_join_pairs_each_row_with_the_float_of_its_own_text(tmp_path, capsys):
    out = tmp_path / "joined"
    assert bench.main(["--rows", "", "--include", str(RES / "quality16k_e2e.json"),
                            "--include", str(RES / "quality16k_recon.json"),
                            "--include", str(RES / "quality16k.json"),
                            "--include-min-tokens", "16000", "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert all(r["tokens"] >= 16000 for r in rows)
    assert "gptq-long-lambda left out (4094 tokens" in capsys.readouterr().out
    floats = {r["text_sha256"]: r for r in rows if r["row"] == "float" and r["seq_len"] == 512}
    assert len(floats) == 2  # one per text file, both kept
    assert len({r["row"] for r in rows if r["row"] == "recon"}) == 1 and sum(r["row"] == "recon" for r in rows) == 2
    for r in rows:
        if r["row"].startswith("float") or r["seq_len"] != 512:
            continue
        ref = floats[r["text_sha256"]]
        assert r["ratio"] == pytest.approx(_ppl(r) / _ppl(ref), rel=1e-12), r["row"]  # the texts differ by 1e-7
    md = out.with_suffix(".md").read_text()
    assert "[text pride-and-prejudice.txt dfc684d4]" in md and "[text eval-pride-and-prejudice.txt 22586498]" in md


def test_every_row_names_a_recipe_that_loads():
    """Each quantized row's recipe is a built-in one or benchmarks/recipes/NAME.yaml (quality.recipe_source),
    and loads: a typo in a row or a recipe file fails here, not hours into a run. Planted: the e2e120-emma
    row's recipe misspelt (failed)."""
    from accllm.config import load_recipe

    names = {r[1].split(":")[0] for k, r in bench.ROWS.items() if r[1] not in (None, "peer")}
    assert {"w2a8kv4-recon-e2e120-lr05", "w2a8kv4-recon-e2e120-emma"} <= names
    for name in sorted(names):
        rec = load_recipe(bench.recipe_source(name))
        assert rec.name == name, (name, rec.name)
