"""Shared test set-up: model hubs are offline.

Full public-domain novels are found through ACCLLM_TEXT_DIR (CI: ../shared/data/text, set by
`make test`; read by quant.loading.default_text_dir); without it the package's own excerpts are used."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# `make test` runs two xdist workers on two cores: one BLAS/OpenMP thread each. Two threads per
# worker oversubscribe the cores, and OpenMP's spinning barriers then made torch-heavy tests 3-4x
# slower (measured: one SmolLM2 layer 26 s with one thread, 115 s with two, on a busy machine).
os.environ.setdefault("OMP_NUM_THREADS", "1")
