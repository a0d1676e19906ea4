"""Fixtures shared by every suite: the real tiny models, fetched by `echo-middleware models fetch --test-models`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_MODEL = "smollm2-135m-instruct"
EMBEDDER = "all-minilm-l6-v2"


def _fetched(name: str) -> Path:
    from echo_middleware.errors import ModelNotFound
    from echo_middleware.models import model_path

    try:
        return model_path(name)
    except ModelNotFound as exc:
        pytest.skip(f"{exc} (make test fetches it)")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The converted SmolLM2-135M-Instruct folder: the smallest real chat model."""
    return _fetched(TINY_MODEL)


@pytest.fixture(scope="session")
def embedder_dir() -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers folder."""
    return _fetched(EMBEDDER)
