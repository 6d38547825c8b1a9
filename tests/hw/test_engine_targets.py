"""benchmarks/results/engine_targets.json (issue 10's throughput targets at u280, from the engine's cycle
model) is what benchmarks/engine_targets.py computes from today's model and u280 config: a change to
either (a beat's op count, the pipeline's depth, the config) without re-running it fails here."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import engine_targets as bench  # noqa: E402

RESULT = REPO / "benchmarks/results/engine_targets.json"


def test_recorded_targets_are_todays_model(tmp_path):
    out = tmp_path / "t.json"
    assert bench.main(["--out", str(out)]) == 0
    fresh, recorded = json.loads(out.read_text()), json.loads(RESULT.read_text())
    assert fresh == recorded
    # reported as measured, met or not
    assert recorded["targets_met"]["attention_80_percent"] == all(r["of_peak"] >= 0.8 for r in recorded["attention"])
    assert recorded["targets_met"]["decode_keeps_up_with_hbm"] == all(
        r["array_bytes_per_cycle"] >= recorded["hbm"]["bytes_per_cycle"] for r in recorded["decode"])
