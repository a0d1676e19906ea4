"""The ranker interface: score each retrieved candidate's utility for this request, best first.

A ranker answers one question per candidate: *if this past (request, answer) pair is put in the small model's
prompt, how likely is the small model's answer to agree with what the large model would say?* That probability is
the candidate's ``utility``; the offload policy reads the best selected utility as its predicted quality, so a
ranker also ships the held-out (predicted, measured) pairs its threshold is calibrated on.

Rankers are looked up by name (``rank.kind``) in :data:`echo_middleware.rank.RANKERS`, like RouteLLM's routers.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from echo_middleware.rank.features import RankQuery, pair_features
from echo_middleware.types import Candidate

logger = logging.getLogger(__name__)


@dataclass
class Ranking:
    """Candidates ranked for one request: best first, each with its utility, and the feature rows behind them.

    The feature rows are kept so that an outcome observed later (a shadow check, a probe) updates the ranker with
    exactly what it saw when it ranked, not with features recomputed against another candidate list.
    """

    candidates: list[Candidate]
    features: np.ndarray = field(repr=False)

    def row(self, example_id: str) -> np.ndarray | None:
        """The feature row of one ranked example, or None when it was not ranked here."""
        for i, cand in enumerate(self.candidates):
            if cand.example.id == example_id:
                return self.features[i]
        return None


class Ranker(abc.ABC):
    """Scores the utility of candidate examples for a request."""

    name: ClassVar[str] = "ranker"

    @abc.abstractmethod
    def score(self, query: RankQuery, candidates: Sequence[Candidate], features: np.ndarray) -> np.ndarray:
        """Utilities in [0, 1], one per candidate, from the feature matrix of :func:`pair_features`."""

    def rank(self, query: RankQuery, candidates: Sequence[Candidate]) -> Ranking:
        """Score the candidates and sort them best first (ties: the nearer one first)."""
        if not candidates:
            return Ranking([], np.zeros((0, 0)))
        features = pair_features(query, candidates)
        utilities = np.clip(self.score(query, candidates, features), 0.0, 1.0)
        order = sorted(range(len(candidates)), key=lambda i: (-float(utilities[i]), float(candidates[i].distance)))
        ranked = [candidates[i].model_copy(update={"utility": float(utilities[i])}) for i in order]
        return Ranking(ranked, features[order])

    @property
    def calibration(self) -> list[tuple[float, float]]:
        """Held-out (predicted quality, measured agreement) pairs that came with the ranker; may be empty."""
        return []

    def observe(self, rows: np.ndarray, labels: Sequence[float]) -> None:  # noqa: B027  (learning is optional)
        """Learn from measured outcomes: feature rows of used examples and the agreement they led to."""

    def save(self) -> None:  # noqa: B027  (persistence is optional)
        """Persist what was learned online (when the ranker is configured to)."""


__all__ = ["Ranker", "Ranking"]
