"""Shared test set-up: offline model hubs, and where public-domain texts are found.

ACCLLM_TEXT_DIR (CI: ../shared/data/text, set by `make test`) points at full novels; without it the
package's own excerpts are used."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def text_dir() -> Path | None:
    d = os.environ.get("ACCLLM_TEXT_DIR", "")
    if d and Path(d).is_dir():
        return Path(d)
    shared = REPO.parent / "shared" / "data" / "text"
    return shared if shared.is_dir() else None
