"""The embedder's own logic (validation, batching, LRU, normalisation) on a deterministic stand-in model."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from echo_middleware.config import EmbedConfig
from echo_middleware.embed import Embedder, LRUCache, SentenceEmbedder, create_embedder
from echo_middleware.errors import ConfigError, ModelError, ModelNotFound


class CountingEmbedder(Embedder):
    """Vectors from a hash of the text (not normalised on purpose); records every batch it is asked for."""

    def __init__(self, dim: int = 8, **kw: int) -> None:
        super().__init__(**kw)
        self._d = dim
        self.batches: list[list[str]] = []
        self.broken: str | None = None

    @property
    def name(self) -> str:
        return "counting"

    @property
    def dim(self) -> int:
        return self._d

    def _encode(self, texts: list[str]) -> np.ndarray:
        self.batches.append(list(texts))
        if self.broken == "shape":
            return np.ones((len(texts), self._d + 1))
        if self.broken == "nan":
            return np.full((len(texts), self._d), np.nan)
        out = np.stack([np.random.default_rng(abs(hash(t)) % 2**32).normal(size=self._d) * 7 for t in texts])
        return out.astype(np.float64)


def test_vectors_are_unit_length_float32_in_input_order() -> None:
    emb = CountingEmbedder()
    vectors = emb.embed(["a", "b", "c"])
    assert vectors.dtype == np.float32
    assert vectors.shape == (3, 8)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    again = CountingEmbedder(cache_size=0).embed(["c", "a"])
    assert np.allclose(again, vectors[[2, 0]])


def test_batches_and_deduplicates_within_a_call() -> None:
    emb = CountingEmbedder(batch_size=2, cache_size=0)
    vectors = emb.embed(["x", "y", "x", "z", "y"])
    assert emb.batches == [["x", "y"], ["z"]]
    assert np.array_equal(vectors[0], vectors[2])
    assert np.array_equal(vectors[1], vectors[4])


def test_lru_serves_repeats_without_the_model() -> None:
    emb = CountingEmbedder(cache_size=2)
    first = emb.embed(["p", "q"])
    assert emb.embed(["q", "p"]).tolist() == first[[1, 0]].tolist()
    assert len(emb.batches) == 1
    emb.embed(["r"])  # the cache holds [q, p]: r evicts q, the least recently used
    emb.batches.clear()
    emb.embed(["p"])
    emb.embed(["q"])
    assert emb.batches == [["q"]]
    assert emb.cache.hits >= 3


def test_cached_vectors_cannot_be_changed_by_callers() -> None:
    emb = CountingEmbedder()
    out = emb.embed(["k"])
    out[0, 0] = 123.0
    assert emb.embed(["k"])[0, 0] != 123.0


def test_lru_cache_bounds() -> None:
    cache = LRUCache(2)
    for i in range(5):
        cache.put(str(i), np.full(3, i, dtype=np.float32))
    assert len(cache) == 2
    assert cache.get("0") is None
    assert cache.get("4") is not None
    off = LRUCache(0)
    off.put("a", np.ones(2))
    assert off.get("a") is None
    with pytest.raises(ConfigError):
        LRUCache(-1)


@pytest.mark.parametrize("bad", [["ok", ""], ["   "], ["ok", 3]])
def test_bad_texts_are_refused(bad: list[object]) -> None:
    emb = CountingEmbedder()
    with pytest.raises(ConfigError, match=r"texts\[\d\]"):
        emb.embed(bad)  # type: ignore[arg-type]
    assert emb.batches == []


def test_a_bare_string_is_refused() -> None:
    with pytest.raises(ConfigError, match="list"):
        CountingEmbedder().embed("one text")


def test_empty_input_gives_an_empty_matrix() -> None:
    assert CountingEmbedder().embed([]).shape == (0, 8)


@pytest.mark.parametrize(("broken", "match"), [("shape", "length"), ("nan", "NaN")])
def test_a_misbehaving_model_is_caught(broken: str, match: str) -> None:
    emb = CountingEmbedder()
    emb.broken = broken
    with pytest.raises(ModelError, match=match):
        emb.embed(["x"])
    assert len(emb.cache) == 0


async def test_aembed_runs_off_the_loop() -> None:
    emb = CountingEmbedder()
    results = await asyncio.gather(*(emb.aembed([f"t{i}"]) for i in range(8)))
    assert all(r.shape == (1, 8) for r in results)


def test_sentence_embedder_is_lazy_and_names_its_model(tmp_path: object) -> None:
    emb = create_embedder(EmbedConfig(model="all-minilm-l6-v2"), models_dir=tmp_path)  # type: ignore[arg-type]
    assert isinstance(emb, SentenceEmbedder)
    assert not emb.loaded
    assert emb.name == "sentence-transformers/all-minilm-l6-v2"
    with pytest.raises(ModelNotFound, match="models fetch all-minilm-l6-v2"):
        emb.embed(["needs the model"])
    folder = SentenceEmbedder(EmbedConfig(model="/srv/models/my-encoder"))
    assert folder.name == "sentence-transformers/my-encoder"
