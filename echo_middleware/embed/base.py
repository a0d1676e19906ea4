"""The embedder interface: texts in, unit-length float32 vectors out, with an LRU for repeated texts.

Retrieval compares a request with stored requests by cosine similarity, so every vector is normalised here once and
the store can use plain inner products. Requests repeat (retries, the same question from many users, the replay
of a stored request), so a small in-process LRU keyed by the text saves a forward pass each time.

Subclasses implement :meth:`Embedder._encode` (raw vectors for a batch) and :attr:`Embedder.dim`; validation,
batching, de-duplication within a call, normalisation and caching live in :meth:`Embedder.embed`, one code path
for every implementation.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from echo_middleware.errors import ConfigError, ModelError


class LRUCache:
    """A thread-safe least-recently-used map from text to vector, bounded by entry count.

    Keys are 16-byte BLAKE2 digests of the text, so a cache of long prompts does not keep the prompts alive.
    Stored vectors are read-only, so a caller cannot change a cached value by writing into a result.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ConfigError(f"cache capacity={capacity} must be >= 0 (0 turns the cache off)")
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._data: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(text: str) -> bytes:
        """The cache key of ``text``."""
        return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()

    def get(self, text: str) -> np.ndarray | None:
        """The cached vector of ``text`` (marked as recently used), or None."""
        if self.capacity == 0:
            self.misses += 1
            return None
        key = self.key(text)
        with self._lock:
            vector = self._data.get(key)
            if vector is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return vector

    def put(self, text: str, vector: np.ndarray) -> None:
        """Remember ``vector`` for ``text``, dropping the least recently used entries beyond capacity."""
        if self.capacity == 0:
            return
        stored = np.array(vector, dtype=np.float32, copy=True)
        stored.setflags(write=False)
        key = self.key(text)
        with self._lock:
            self._data[key] = stored
            self._data.move_to_end(key)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        """Forget every entry (the hit and miss counters are kept)."""
        with self._lock:
            self._data.clear()


class Embedder(ABC):
    """Turns texts into unit-length float32 vectors; thread-safe; blocking ``embed`` and async ``aembed``.

    Args:
        batch_size: Texts per call of :meth:`_encode`.
        cache_size: Entries of the in-process LRU (0 turns it off).

    Example:
        >>> vectors = embedder.embed(["when was the last moon landing?"])  # doctest: +SKIP
        >>> vectors.shape, float((vectors**2).sum())  # doctest: +SKIP
        ((1, 384), 1.0)
    """

    def __init__(self, *, batch_size: int = 64, cache_size: int = 4096) -> None:
        if batch_size < 1:
            raise ConfigError(f"embed.batch_size={batch_size} must be >= 1")
        self.batch_size = batch_size
        self.cache = LRUCache(cache_size)

    @property
    @abstractmethod
    def name(self) -> str:
        """A stable name of the model behind the vectors; the store refuses to mix vectors of two names."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """Length of every vector (may load the model)."""

    @abstractmethod
    def _encode(self, texts: list[str]) -> np.ndarray:
        """Raw vectors of one batch, shape ``(len(texts), dim)``; need not be normalised."""

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length vectors of ``texts``, shape ``(len(texts), dim)``, float32, in input order.

        Raises:
            ConfigError: ``texts`` is a bare string, or holds a non-string or an empty (blank) text.
            ModelError: the model returned vectors of the wrong shape or non-finite values.
        """
        if isinstance(texts, str):
            raise ConfigError("embed() takes a sequence of texts, not one string: wrap it in a list")
        items = list(texts)
        for i, text in enumerate(items):
            if not isinstance(text, str):
                raise ConfigError(f"texts[{i}] is a {type(text).__name__}, not a str")
            if not text.strip():
                raise ConfigError(f"texts[{i}] is empty or blank: there is nothing to embed")
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)

        out: list[np.ndarray | None] = [self.cache.get(text) for text in items]
        missing: dict[str, list[int]] = {}
        for i, (text, vector) in enumerate(zip(items, out, strict=True)):
            if vector is None:
                missing.setdefault(text, []).append(i)
        if missing:
            unique = list(missing)
            for start in range(0, len(unique), self.batch_size):
                batch = unique[start : start + self.batch_size]
                vectors = self._checked(batch, self._encode(batch))
                for text, vector in zip(batch, vectors, strict=True):
                    self.cache.put(text, vector)
                    for i in missing[text]:
                        out[i] = vector
        return np.stack(out).astype(np.float32, copy=False)  # type: ignore[arg-type]

    async def aembed(self, texts: Sequence[str]) -> np.ndarray:
        """:meth:`embed` in a worker thread, so the event loop keeps serving while the model runs."""
        return await asyncio.to_thread(self.embed, list(texts))

    def as_chroma_function(self) -> Any:
        """This embedder as a Chroma ``EmbeddingFunction`` (imports chromadb).

        Chroma's default embedding function downloads an ONNX model at run time and fails offline; collections of
        the store are created with this one instead, so ``query_texts=`` and ``documents=`` without vectors embed
        with the same model as everything else.
        """
        from echo_middleware.embed.chroma_function import EchoEmbeddingFunction

        return EchoEmbeddingFunction(self)

    def _checked(self, texts: list[str], raw: Any) -> np.ndarray:
        vectors = np.asarray(raw, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(texts):
            raise ModelError(
                f"embedder {self.name!r} returned shape {vectors.shape} for {len(texts)} texts; expected "
                f"({len(texts)}, {self.dim})"
            )
        if vectors.shape[1] != self.dim:
            raise ModelError(f"embedder {self.name!r} returned vectors of length {vectors.shape[1]}, not {self.dim}")
        if not np.isfinite(vectors).all():
            raise ModelError(f"embedder {self.name!r} returned NaN or infinite values")
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, 1e-12)
