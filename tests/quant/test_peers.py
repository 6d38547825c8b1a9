"""Peer quantizers (benchmarks/peers.py, optional extra `peers`) on a tiny random Llama: each returns a
finite perplexity on the same windows as accllm's rows; without the extra, quality.py reports the row
as skipped with the install command. (The first quanto run on a machine compiles quanto's small C++
unpack extension, a one-off of about two minutes; later runs take seconds.)"""

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import peers  # noqa: E402
from tiny_llama import make_tiny_llama  # noqa: E402

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(d)  # hidden 64, intermediate 128, 2 layers: 14 projections, group 64 fits
    return d


@pytest.mark.parametrize("peer,bits,a8", [("hqq", 2, False), ("quanto", 2, True), ("quanto", 4, False)])
def test_peer_on_tiny_llama(tiny, peer, bits, a8):
    why = peers.missing(peer)
    if why:
        pytest.skip(why)
    float_ = peers.run_peer(None, str(tiny), None, seq_len=64, max_tokens=256)
    res = peers.run_peer(peer, str(tiny), None, bits=bits, activations8=a8, seq_len=64, max_tokens=256,
                         calib_samples=2, calib_seq_len=64)
    assert math.isfinite(res["perplexity"]) and res["perplexity"] > 1
    assert res["tokens"] == float_["tokens"] == 252  # 4 windows of 64 tokens, 63 predictions each
    assert res["quantized_modules"] == 14 and res["group_size"] == 64
    assert res["bits_per_weight"] == pytest.approx(bits + 32 / 64)  # codes + 16-bit scale and zero per 64
    assert res["peak_rss_bytes"] > 0 and res["seconds"] >= 0


def test_float_row_matches_accllm_float_model(tiny):
    """The peers' transformers model is the float model accllm evaluates: same tokens, same perplexity."""
    from quant.evaluate import evaluate

    ours = evaluate(str(tiny), None, seq_len=64, max_tokens=256, progress=False)
    theirs = peers.run_peer(None, str(tiny), None, seq_len=64, max_tokens=256)
    assert theirs["tokens"] == ours["tokens"]
    assert theirs["perplexity"] == pytest.approx(ours["perplexity"], rel=1e-4)


def test_missing_extra_is_a_skipped_row(tiny, tmp_path, monkeypatch):
    from benchmarks import quality

    monkeypatch.setattr(peers, "PACKAGES", {k: (d, "accllm_no_such_module_" + k)
                                            for k, (d, _) in peers.PACKAGES.items()})
    out = tmp_path / "peers"
    assert quality.main(["--model", str(tiny), "--rows", "hqq-w2,quanto-w2", "--max-tokens", "128",
                         "--short", "64", "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["row"] for r in rows] == ["hqq-w2", "quanto-w2"]
    assert all(r["perplexity"] is None and "pip install" in r["skipped"] for r in rows)
    assert "skipped" in out.with_suffix(".md").read_text()
    import torch

    assert torch.is_grad_enabled()  # main() must not switch gradients off for the rest of the process
