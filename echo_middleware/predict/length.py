"""Output-length prediction for shortest-job-first scheduling (SSJF, arXiv 2404.08509).

A scheduler that serves short jobs first needs each job's length before it runs. Two cheap signals exist:

- **Neighbours.** The example store already retrieved the past requests most similar to this one, and each carries
  the length of its answer (``Candidate.example.response_tokens``) and how far it is (``Candidate.distance``). A
  distance-weighted mean of their log lengths is a free prediction, good when the neighbours are close.
- **Request features.** Prompt length, a few lexical cues (a ``who/when`` question vs. ``write/explain``), an
  optional task label and, optionally, the request's embedding feed a small ridge regressor in log space.

The regressor also sees the neighbour statistics, so it *learns* how much to trust them (close, agreeing
neighbours get weight; far or absent ones do not) instead of a hand-set blend. It learns online: each finished
request is one :meth:`LengthPredictor.observe` call that updates the sufficient statistics ``XᵀX`` and ``Xᵀy``
exactly (optionally with forgetting), refitting every ``refit_every`` observations. Its uncertainty is honest:
the spread of its own errors on requests it had not yet seen (prequential), widened when neighbours disagree.

Example:
    .. code-block:: python

        predictor = LengthPredictor(PredictConfig())
        guess = predictor.predict(text, candidates, embedding=vector, prompt_tokens=42, task="chat")
        ...  # schedule with guess.tokens, then, once the answer is known:
        predictor.observe(guess, actual_tokens=usage.completion_tokens)
"""

from __future__ import annotations

import json
import logging
import math
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from echo_middleware.config import PredictConfig
from echo_middleware.errors import ConfigError, EmbeddingMismatch
from echo_middleware.types import Candidate

logger = logging.getLogger(__name__)

PredictionSource = Literal["prior", "neighbours", "model"]
TASK_BUCKETS = 16
"""Task labels are hashed into this many one-hot slots (no vocabulary to maintain)."""
Z_80 = 1.2816
"""Standard normal quantile of 0.9: ``low``/``high`` span the central 80% of a log-normal."""
_ERROR_ALPHA = 0.05
_WH = re.compile(r"^\s*(who|whom|whose|what|when|where|which|how (many|much|old|long|far|tall))\b", re.I)
_LONG_CUES = re.compile(
    r"\b(write|explain|describe|compose|essay|story|blog|article|outline|list|draft|implement|program|code|"
    r"step[- ]by[- ]step|elaborate|compare|summari[sz]e|discuss|analy[sz]e|design|plan)\b",
    re.I,
)
_CODE = re.compile(r"```|\bdef \w+\(|\bclass \w+|\bfunction\b|[{};]\s*$", re.M)
_HAND_FEATURES = (
    "bias",
    "log_prompt_tokens",
    "log_words",
    "log_lines",
    "digit_fraction",
    "ends_with_question",
    "wh_question",
    "long_form_cue",
    "code",
    "nb_present",
    "nb_mean_log",
    "nb_mean_log_x_closeness",
    "nb_std_log",
    "nb_min_distance",
    "nb_log_weight",
)


@dataclass(frozen=True)
class LengthPrediction:
    """A predicted output length with its uncertainty.

    Attributes:
        tokens: Predicted output tokens (the median of the predictive distribution; use it to order jobs).
        log_std: Uncertainty: standard deviation of ``log(1 + tokens)``.
        low: 10th percentile of the predicted length.
        high: 90th percentile of the predicted length.
        source: ``prior`` (nothing known yet), ``neighbours`` (their lengths only) or ``model`` (the regressor).
        neighbours: How many retrieved examples contributed.
        features: The feature vector, kept so :meth:`LengthPredictor.observe` can learn from this request.
    """

    tokens: float
    log_std: float
    low: float
    high: float
    source: PredictionSource
    neighbours: int
    features: np.ndarray = field(repr=False, compare=False)

    @property
    def relative_spread(self) -> float:
        """``high / low``: near 1 when sure, large when unsure (a hedging or routing signal)."""
        return (1 + self.high) / (1 + self.low)


@dataclass(frozen=True)
class LengthSample:
    """A past request with its true output length, for :meth:`LengthPredictor.fit`."""

    text: str
    actual_tokens: int
    candidates: Sequence[Candidate] = ()
    embedding: Sequence[float] | np.ndarray | None = None
    prompt_tokens: int | None = None
    task: str | None = None


@dataclass
class _ErrorStats:
    """Exponentially weighted mean squared error of one prediction source, in log space."""

    mse: float = 1.0
    n: int = 0

    def update(self, sq_err: float) -> None:
        alpha = max(_ERROR_ALPHA, 1.0 / (self.n + 1))
        self.mse = sq_err if self.n == 0 else (1 - alpha) * self.mse + alpha * sq_err
        self.n += 1


class LengthPredictor:
    """Predicts output tokens from retrieved neighbours' answer lengths and an online ridge regressor.

    Args:
        config: The ``predict`` settings section.

    The feature layout is fixed by the first call: when ``use_embedding`` is on and that call passes an
    embedding, embeddings are features from then on (a later embedding of another dimension raises
    :class:`~echo_middleware.errors.EmbeddingMismatch`; a missing one counts as zeros).
    """

    def __init__(self, config: PredictConfig | None = None) -> None:
        self.config = config or PredictConfig()
        self._embed_dim: int | None = None
        self._dim: int | None = None
        self._xtx: np.ndarray | None = None
        self._xty: np.ndarray | None = None
        self._weights: np.ndarray | None = None
        self._n = 0
        self._since_fit = 0
        self._y_sum = 0.0
        self._y_sq = 0.0
        self._errors: dict[str, _ErrorStats] = {
            "prior": _ErrorStats(),
            "neighbours": _ErrorStats(),
            "model": _ErrorStats(),
        }

    # ---------------------------------------------------------------------------------- features

    @property
    def observations(self) -> int:
        """Finished requests learned from."""
        return self._n

    def feature_names(self) -> list[str]:
        """Names of the feature vector's entries (after the first prediction fixed the layout)."""
        names = [*_HAND_FEATURES, *(f"task_{i}" for i in range(TASK_BUCKETS))]
        return names + [f"emb_{i}" for i in range(self._embed_dim or 0)]

    def features(
        self,
        text: str,
        candidates: Sequence[Candidate] = (),
        *,
        embedding: Sequence[float] | np.ndarray | None = None,
        prompt_tokens: int | None = None,
        task: str | None = None,
    ) -> tuple[np.ndarray, dict[str, float]]:
        """The feature vector of one request, and the neighbour statistics it contains."""
        cfg = self.config
        words = text.split()
        n_prompt = prompt_tokens if prompt_tokens is not None else max(1, len(text) // 4)
        digits = sum(c.isdigit() for c in text)
        hand = [
            1.0,
            math.log1p(n_prompt),
            math.log1p(len(words)),
            math.log1p(text.count("\n") + 1),
            digits / max(1, len(text)),
            float(text.rstrip().endswith("?")),
            float(bool(_WH.search(text))),
            float(bool(_LONG_CUES.search(text))),
            float(bool(_CODE.search(text))),
        ]
        nb = self._neighbour_stats(candidates)
        if nb["count"] > 0:
            closeness = math.exp(-nb["min_distance"] / cfg.distance_scale)
            hand += [
                1.0,
                nb["mean_log"],
                nb["mean_log"] * closeness,
                nb["std_log"],
                nb["min_distance"],
                math.log1p(nb["weight"]),
            ]
        else:
            hand += [0.0, 0.0, 0.0, 0.0, cfg.max_distance, 0.0]
        tasks = np.zeros(TASK_BUCKETS)
        if task:
            tasks[zlib.crc32(task.encode()) % TASK_BUCKETS] = 1.0
        parts = [np.asarray(hand), tasks]
        if self._dim is None:  # the first call fixes the layout
            if cfg.use_embedding and embedding is not None:
                self._embed_dim = len(embedding)
            self._dim = len(hand) + TASK_BUCKETS + (self._embed_dim or 0)
        if self._embed_dim:
            if embedding is None:
                vec = np.zeros(self._embed_dim)
            else:
                vec = np.asarray(embedding, dtype=float).reshape(-1)
                if len(vec) != self._embed_dim:
                    raise EmbeddingMismatch(
                        f"LengthPredictor was built on {self._embed_dim}-d embeddings but got {len(vec)}-d: use the "
                        "same embedder, or start a new predictor (delete predict.model_path)"
                    )
            parts.append(vec * math.sqrt(self._embed_dim))  # unit-norm vectors: entries of order 1, like the rest
        return np.concatenate(parts), nb

    def _neighbour_stats(self, candidates: Sequence[Candidate]) -> dict[str, float]:
        cfg = self.config
        usable = sorted(
            (c for c in candidates if c.distance <= cfg.max_distance and c.example.response_tokens > 0),
            key=lambda c: c.distance,
        )[: cfg.neighbours]
        if not usable:
            return {"count": 0, "mean_log": 0.0, "std_log": 0.0, "min_distance": cfg.max_distance, "weight": 0.0}
        logs = np.array([math.log1p(c.example.response_tokens) for c in usable])
        dist = np.array([max(0.0, c.distance) for c in usable])
        w = np.exp(-dist / cfg.distance_scale)
        mean = float(np.sum(w * logs) / np.sum(w))
        std = float(math.sqrt(np.sum(w * (logs - mean) ** 2) / np.sum(w)))
        return {
            "count": len(usable),
            "mean_log": mean,
            "std_log": std,
            "min_distance": float(dist[0]),
            "weight": float(w.sum()),
        }

    # ---------------------------------------------------------------------------------- predict / learn

    def predict(
        self,
        text: str,
        candidates: Sequence[Candidate] = (),
        *,
        embedding: Sequence[float] | np.ndarray | None = None,
        prompt_tokens: int | None = None,
        task: str | None = None,
    ) -> LengthPrediction:
        """Predict the output length of a request.

        Args:
            text: The request as text (the last user turn, or the whole prompt).
            candidates: Retrieved examples; their ``response_tokens`` and ``distance`` are used.
            embedding: The request's embedding (a regressor feature when ``use_embedding``).
            prompt_tokens: Prompt length in tokens; estimated from characters when None.
            task: An optional task label the application knows (endpoint, tool, template).
        """
        x, nb = self.features(text, candidates, embedding=embedding, prompt_tokens=prompt_tokens, task=task)
        count = int(nb["count"])
        source: PredictionSource
        weights = self._current_weights() if self._n >= self.config.min_observations else None
        if weights is not None:
            mu = float(x @ weights)
            source = "model"
        elif count:
            mu = nb["mean_log"]
            source = "neighbours"
        else:
            mu = self._y_sum / self._n if self._n else math.log1p(self.config.default_tokens)
            source = "prior"
        var = self._errors[source].mse
        if count:
            var = 0.5 * var + 0.5 * nb["std_log"] ** 2  # neighbours that disagree widen the interval
        sigma = math.sqrt(max(var, 1e-6))
        mu = max(mu, 0.0)
        return LengthPrediction(
            tokens=max(1.0, math.expm1(mu)),
            log_std=sigma,
            low=max(0.0, math.expm1(mu - Z_80 * sigma)),
            high=math.expm1(mu + Z_80 * sigma),
            source=source,
            neighbours=count,
            features=x,
        )

    def observe(self, prediction: LengthPrediction, actual_tokens: int) -> None:
        """Learn from a finished request: the features it was predicted from and its true output length."""
        if actual_tokens < 0:
            raise ConfigError(f"actual_tokens={actual_tokens} is negative: pass the completion's token count")
        y = math.log1p(actual_tokens)
        self._errors[prediction.source].update((math.log1p(prediction.tokens) - y) ** 2)
        x = prediction.features
        if self._xtx is None or self._xty is None:
            self._xtx = np.zeros((len(x), len(x)))
            self._xty = np.zeros(len(x))
        if len(x) != len(self._xty):
            raise EmbeddingMismatch(f"prediction has {len(x)} features, the predictor {len(self._xty)}")
        f = self.config.forgetting
        if f < 1.0:
            self._xtx *= f
            self._xty *= f
        self._xtx += np.outer(x, x)
        self._xty += x * y
        self._n += 1
        self._y_sum += y
        self._y_sq += y * y
        self._since_fit += 1

    def fit(self, samples: Iterable[LengthSample]) -> LengthPredictor:
        """Learn from past requests in order (each is predicted before it is learned, so errors stay honest)."""
        for s in samples:
            guess = self.predict(
                s.text, s.candidates, embedding=s.embedding, prompt_tokens=s.prompt_tokens, task=s.task
            )
            self.observe(guess, s.actual_tokens)
        self._refit_if_due(force=True)
        return self

    def _current_weights(self) -> np.ndarray | None:
        self._refit_if_due()
        return self._weights

    def _refit_if_due(self, force: bool = False) -> None:
        if self._xtx is None or self._xty is None:
            return
        if not force and self._weights is not None and self._since_fit < self.config.refit_every:
            return
        penalty = np.full(len(self._xty), self.config.ridge)
        penalty[0] = 1e-6  # the intercept is not shrunk
        self._weights = np.linalg.solve(self._xtx + np.diag(penalty), self._xty)
        self._since_fit = 0

    def errors(self) -> dict[str, dict[str, float]]:
        """Running squared log error of each prediction source, as seen on requests not yet learned from."""
        return {k: {"mse_log": v.mse, "n": float(v.n)} for k, v in self._errors.items()}

    # ---------------------------------------------------------------------------------- persistence

    def save(self, path: str | Path | None = None) -> Path:
        """Write the learned state (sufficient statistics, error stats) to ``path`` or ``predict.model_path``."""
        target = Path(path or self.config.model_path or "")
        if not str(target):
            raise ConfigError("LengthPredictor.save needs a path: pass one or set predict.model_path")
        if self._xtx is None or self._xty is None:
            raise ConfigError("LengthPredictor.save: nothing learned yet (call observe or fit first)")
        target.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "n": self._n,
            "embed_dim": self._embed_dim,
            "dim": self._dim,
            "y_sum": self._y_sum,
            "y_sq": self._y_sq,
            "errors": {k: [v.mse, v.n] for k, v in self._errors.items()},
        }
        with target.open("wb") as fh:
            np.savez(fh, xtx=self._xtx, xty=self._xty, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
        return target

    @classmethod
    def load(cls, path: str | Path, config: PredictConfig | None = None) -> LengthPredictor:
        """A predictor with the state :meth:`save` wrote."""
        with np.load(Path(path)) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            predictor = cls(config)
            predictor._xtx, predictor._xty = data["xtx"], data["xty"]
        predictor._n, predictor._embed_dim, predictor._dim = meta["n"], meta["embed_dim"], meta["dim"]
        predictor._y_sum, predictor._y_sq = meta["y_sum"], meta["y_sq"]
        for k, (mse, n) in meta["errors"].items():
            predictor._errors[k] = _ErrorStats(mse=mse, n=n)
        predictor._refit_if_due(force=True)
        return predictor
