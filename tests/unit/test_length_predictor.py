"""LengthPredictor: neighbours before it has learned, online learning, uncertainty, persistence; the error metrics.

The learning tests use synthetic requests whose true length follows a known rule, so "it learned" is checkable.
The real-data evaluation (MAE and Spearman on held-out requests) is in benchmarks/scheduler.py.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from echo_middleware.config import PredictConfig
from echo_middleware.errors import EmbeddingMismatch
from echo_middleware.predict import LengthPredictor, LengthSample, length_errors, spearman
from echo_middleware.types import Candidate, Example


def cand(tokens: int, distance: float) -> Candidate:
    return Candidate(example=Example(request="q", response="a", response_tokens=tokens), distance=distance)


def test_before_learning_it_uses_distance_weighted_neighbours() -> None:
    p = LengthPredictor(PredictConfig(distance_scale=0.1))
    near_long = p.predict("Describe the history of Rome.", [cand(400, 0.05), cand(10, 0.5)])
    assert near_long.source == "neighbours"
    assert near_long.neighbours == 2
    assert 200 < near_long.tokens < 400  # the near neighbour dominates (weight e^-0.5 vs e^-5)
    near_short = p.predict("Describe the history of Rome.", [cand(400, 0.5), cand(10, 0.05)])
    assert near_short.tokens < 20


def test_neighbours_too_far_are_ignored_and_the_prior_is_used() -> None:
    p = LengthPredictor(PredictConfig(max_distance=0.3, default_tokens=100))
    guess = p.predict("hello", [cand(5, 0.9)])
    assert guess.source == "prior"
    assert guess.neighbours == 0
    assert guess.tokens == pytest.approx(100, rel=1e-6)
    assert guess.low < guess.tokens < guess.high


def test_disagreeing_neighbours_widen_the_interval() -> None:
    p = LengthPredictor()
    agree = p.predict("x", [cand(100, 0.1), cand(110, 0.1), cand(95, 0.1)])
    disagree = p.predict("x", [cand(5, 0.1), cand(100, 0.1), cand(900, 0.1)])
    assert disagree.log_std > agree.log_std
    assert disagree.relative_spread > agree.relative_spread


def _synthetic(n: int, seed: int) -> list[LengthSample]:
    """Factoid questions are short, 'write'/'explain' requests long, and longer prompts get longer answers."""
    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        kind = rng.choice(["qa", "essay", "math"])
        words = rng.randint(5, 60)
        if kind == "qa":
            text, base = "Who wrote " + "word " * words + "?", 4
        elif kind == "essay":
            text, base = "Write an essay about " + "word " * words, 300
        else:
            text, base = "Tom has 3 apples and 4 pears. " + "word " * words, 60 + 2 * words
        actual = max(1, round(base * math.exp(rng.gauss(0, 0.2))))
        samples.append(LengthSample(text=text, actual_tokens=actual, prompt_tokens=words + 5, task=kind))
    return samples


def test_it_learns_online_and_ranks_held_out_requests() -> None:
    train, test = _synthetic(300, seed=1), _synthetic(200, seed=2)
    p = LengthPredictor(PredictConfig(min_observations=20, use_embedding=False)).fit(train)
    assert p.observations == 300
    preds = [p.predict(s.text, prompt_tokens=s.prompt_tokens, task=s.task) for s in test]
    assert all(g.source == "model" for g in preds)
    errs = length_errors([g.tokens for g in preds], [s.actual_tokens for s in test])
    prior = length_errors([128.0] * len(test), [s.actual_tokens for s in test])
    assert errs["spearman"] > 0.85
    assert errs["mae"] < prior["mae"] / 3
    # prequential error of the model is much smaller than the 1.0 it starts from
    assert p.errors()["model"]["mse_log"] < 0.3


def test_it_learns_how_much_to_trust_neighbours() -> None:
    # Every request looks the same; only the neighbours carry the length (as for paraphrases in the store).
    rng = random.Random(3)

    def sample() -> tuple[LengthSample, int]:
        true = rng.choice([5, 50, 500])
        return LengthSample(text="same text", actual_tokens=true, candidates=[cand(true, 0.05)]), true

    p = LengthPredictor(PredictConfig(min_observations=10, use_embedding=False))
    p.fit(s for s, _ in (sample() for _ in range(200)))
    for true in (5, 50, 500):
        guess = p.predict("same text", [cand(true, 0.05)])
        assert guess.source == "model"
        assert guess.tokens == pytest.approx(true, rel=0.25)


def test_embeddings_are_features_and_their_dimension_is_checked() -> None:
    rng = np.random.default_rng(0)
    short_dir, long_dir = rng.normal(size=16), rng.normal(size=16)

    def emb(base: np.ndarray) -> np.ndarray:
        v = base + 0.1 * rng.normal(size=16)
        return v / np.linalg.norm(v)

    p = LengthPredictor(PredictConfig(min_observations=10, ridge=0.1))
    samples = []
    for i in range(120):
        is_long = i % 2 == 0
        samples.append(LengthSample("req", 400 if is_long else 8, embedding=emb(long_dir if is_long else short_dir)))
    p.fit(samples)
    assert p.predict("req", embedding=emb(long_dir)).tokens > 10 * p.predict("req", embedding=emb(short_dir)).tokens
    assert len(p.feature_names()) == len(p.predict("req", embedding=emb(long_dir)).features)
    with pytest.raises(EmbeddingMismatch, match="16-d"):
        p.predict("req", embedding=np.ones(8))


def test_save_and_load_give_the_same_predictions(tmp_path: object) -> None:
    from pathlib import Path

    p = LengthPredictor(PredictConfig(min_observations=5, use_embedding=False)).fit(_synthetic(60, seed=4))
    path = p.save(Path(str(tmp_path)) / "length.npz")
    q = LengthPredictor.load(path, PredictConfig(min_observations=5, use_embedding=False))
    for s in _synthetic(10, seed=5):
        a = p.predict(s.text, prompt_tokens=s.prompt_tokens, task=s.task)
        b = q.predict(s.text, prompt_tokens=s.prompt_tokens, task=s.task)
        assert a.tokens == pytest.approx(b.tokens)
        assert a.log_std == pytest.approx(b.log_std)
    assert q.observations == 60


def test_observing_a_negative_length_is_refused() -> None:
    from echo_middleware.errors import ConfigError

    p = LengthPredictor()
    with pytest.raises(ConfigError, match="actual_tokens"):
        p.observe(p.predict("x"), -1)


def test_forgetting_follows_a_drifting_workload() -> None:
    cfg = PredictConfig(min_observations=5, use_embedding=False, forgetting=0.95, refit_every=1)
    p = LengthPredictor(cfg)
    p.fit([LengthSample("same", 10, task="t")] * 100)
    p.fit([LengthSample("same", 300, task="t")] * 100)
    assert p.predict("same", task="t").tokens == pytest.approx(300, rel=0.1)


# ------------------------------------------------------------------------------------------ metrics


def test_spearman_and_mae() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([4, 3, 2, 1], [10, 20, 30, 40]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 2], [1, 2, 3, 4]) == pytest.approx(0.894, abs=1e-3)  # ties get mean ranks
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    errs = length_errors([10, 20, 30], [12, 20, 25])
    assert errs["mae"] == pytest.approx(7 / 3)
    assert errs["median_ae"] == 2
    with pytest.raises(ValueError, match="one prediction per actual"):
        length_errors([1, 2], [1])
