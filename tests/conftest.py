"""Shared test set-up: model hubs are offline.

Full public-domain novels are found through ACCLLM_TEXT_DIR (CI: ../shared/data/text, set by
`make test`; read by quant.loading.default_text_dir); without it the package's own excerpts are used."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
