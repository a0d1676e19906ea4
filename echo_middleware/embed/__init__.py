"""Pipeline stage 1, embed: request text to a unit vector (local sentence model, batched, LRU-cached).

Nothing here loads a model at import time; :class:`SentenceEmbedder` loads on its first use.
"""

from __future__ import annotations

import os

from echo_middleware.config import EmbedConfig
from echo_middleware.embed.base import Embedder, LRUCache
from echo_middleware.embed.sentence import SentenceEmbedder

__all__ = ["Embedder", "LRUCache", "SentenceEmbedder", "create_embedder"]


def create_embedder(config: EmbedConfig | None = None, models_dir: str | os.PathLike[str] | None = None) -> Embedder:
    """The embedder the settings describe (today: always a local sentence-transformers model).

    Args:
        config: The ``embed`` section of the settings; None: defaults (all-MiniLM-L6-v2).
        models_dir: Where bundled models live; None: ``$ECHO_MODELS_DIR`` or the user's cache dir.
    """
    return SentenceEmbedder(config if config is not None else EmbedConfig(), models_dir=models_dir)
