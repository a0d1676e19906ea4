"""Our embedder as a registered Chroma ``EmbeddingFunction`` (this module imports chromadb).

Chroma persists the name and config of a collection's embedding function and rebuilds it by name when a client
opens the collection without one; registering ``echo-middleware`` lets it rebuild ours instead of falling back to
its default, which downloads ONNX weights at run time and fails offline.
"""

from __future__ import annotations

from typing import Any

from chromadb.api.types import Documents, EmbeddingFunction, Embeddings, Space
from chromadb.utils.embedding_functions import register_embedding_function

from echo_middleware.config import EmbedConfig
from echo_middleware.embed.base import Embedder

NAME = "echo-middleware"


@register_embedding_function
class EchoEmbeddingFunction(EmbeddingFunction[Documents]):
    """Adapts an :class:`~echo_middleware.embed.base.Embedder` to Chroma's protocol.

    Args:
        embedder: The embedder that makes every vector of the store.
    """

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder

    def __call__(self, input: Documents) -> Embeddings:
        """Vectors of ``input``, unit length."""
        return list(self.embedder.embed(list(input)))

    @staticmethod
    def name() -> str:
        """The name Chroma stores with the collection."""
        return NAME

    def default_space(self) -> Space:
        """Vectors are normalised and compared by cosine distance."""
        return "cosine"

    def supported_spaces(self) -> list[Space]:
        """Any space works on unit vectors; cosine is what the store uses."""
        return ["cosine", "ip", "l2"]

    def get_config(self) -> dict[str, Any]:
        """What Chroma persists to rebuild this function: the embed config (and the models dir, if given)."""
        config: dict[str, Any] = {"embedder": self.embedder.name}
        settings = getattr(self.embedder, "config", None)
        if isinstance(settings, EmbedConfig):
            config["embed"] = settings.model_dump(mode="json")
        models_dir = getattr(self.embedder, "models_dir", None)
        if models_dir is not None:
            config["models_dir"] = str(models_dir)
        return config

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> EchoEmbeddingFunction:
        """Rebuild from :meth:`get_config` (the model loads lazily, on the first call)."""
        from echo_middleware.embed.sentence import SentenceEmbedder

        embed = EmbedConfig(**config.get("embed", {}))
        return EchoEmbeddingFunction(SentenceEmbedder(embed, models_dir=config.get("models_dir")))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EchoEmbeddingFunction) and other.embedder is self.embedder

    def __hash__(self) -> int:
        return id(self.embedder)
