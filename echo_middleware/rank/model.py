"""A small logistic model over named features: the utility ranker's proxy model.

Why logistic regression and not a cross-encoder: the ranker runs on every request, on CPU, next to two language
models that already use every core. Twenty dot products take microseconds, the weights fit in a JSON file that
a reviewer can read, and an online update is one gradient step. The features (:mod:`echo_middleware.rank.features`)
carry the lexical and usage signals a cross-encoder would have to learn from far more data than we have.

Labels are soft (an agreement score in [0, 1]), so the model is fitted by Newton's method on the cross-entropy of
soft targets, with an L2 penalty; online updates are SGD steps with an L2 pull towards the shipped weights, so a
burst of unusual traffic cannot drag the model far from what was trained offline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from echo_middleware.errors import ConfigError
from echo_middleware.rank.features import FEATURE_NAMES


def sigmoid(z: np.ndarray) -> np.ndarray:
    """The logistic function, safe for large |z|."""
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _columns(features: Sequence[str]) -> np.ndarray:
    unknown = [f for f in features if f not in FEATURE_NAMES]
    if unknown:
        raise ConfigError(
            f"ranker weights name features {unknown} that this version does not compute "
            f"(known: {', '.join(FEATURE_NAMES)}); retrain the ranker with benchmarks/train_ranker.py"
        )
    return np.array([FEATURE_NAMES.index(f) for f in features], dtype=np.int64)


@dataclass
class LogisticModel:
    """``p = sigmoid(((x - mean) / scale) . coef + intercept)`` over the named columns of the feature matrix.

    ``lower``/``upper`` (the training range of each feature, optional) clip inputs before use: a linear model
    extrapolates without limit, and a feature far outside what it was fitted on (a 900-token RAG prompt where the
    training requests were one-line questions) would otherwise swing the logit by more than any real signal.
    """

    features: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    updates: int = 0
    lower: np.ndarray | None = None
    upper: np.ndarray | None = None
    _cols: np.ndarray = field(init=False, repr=False)
    _anchor: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.features = tuple(self.features)
        self._cols = _columns(self.features)
        n = len(self.features)
        self.mean = np.asarray(self.mean, dtype=np.float64).reshape(n)
        self.scale = np.where(np.asarray(self.scale, dtype=np.float64).reshape(n) > 1e-9, self.scale, 1.0)
        self.coef = np.asarray(self.coef, dtype=np.float64).reshape(n)
        self.intercept = float(self.intercept)
        if self.lower is not None:
            self.lower = np.asarray(self.lower, dtype=np.float64).reshape(n)
        if self.upper is not None:
            self.upper = np.asarray(self.upper, dtype=np.float64).reshape(n)
        self._anchor = np.concatenate([self.coef, [self.intercept]])

    # ------------------------------------------------------------------------------------------ use

    def _design(self, x_full: np.ndarray) -> np.ndarray:
        x_full = np.atleast_2d(np.asarray(x_full, dtype=np.float64))
        if x_full.shape[1] != len(FEATURE_NAMES):
            raise ValueError(f"expected {len(FEATURE_NAMES)} feature columns, got {x_full.shape[1]}")
        raw = x_full[:, self._cols]
        if self.lower is not None or self.upper is not None:
            raw = np.clip(raw, self.lower, self.upper)
        return (raw - self.mean) / self.scale

    def predict(self, x_full: np.ndarray) -> np.ndarray:
        """Probabilities for each row of a full feature matrix (columns in ``FEATURE_NAMES`` order)."""
        if len(x_full) == 0:
            return np.zeros(0)
        return sigmoid(self._design(x_full) @ self.coef + self.intercept)

    def contributions(self, x_row: np.ndarray) -> dict[str, float]:
        """Each feature's share of one row's logit: why a candidate scored as it did."""
        z = self._design(x_row)[0] * self.coef
        return {name: float(v) for name, v in zip(self.features, z, strict=True)}

    # --------------------------------------------------------------------------------------- learn

    def partial_fit(self, x_full: np.ndarray, y: Sequence[float] | np.ndarray, lr: float, l2: float = 0.01) -> None:
        """One SGD step on the soft-label cross-entropy, pulled towards the weights the model was loaded with."""
        if lr <= 0 or len(x_full) == 0:
            return
        x = self._design(x_full)
        target = np.clip(np.asarray(y, dtype=np.float64), 0.0, 1.0)
        err = sigmoid(x @ self.coef + self.intercept) - target
        grad_w = x.T @ err / len(err) + l2 * (self.coef - self._anchor[:-1])
        grad_b = float(err.mean()) + l2 * (self.intercept - self._anchor[-1])
        self.coef = self.coef - lr * grad_w
        self.intercept = self.intercept - lr * grad_b
        self.updates += len(err)

    @classmethod
    def fit(
        cls,
        x_full: np.ndarray,
        y: Sequence[float] | np.ndarray,
        features: Sequence[str] = FEATURE_NAMES,
        *,
        l2: float = 1.0,
        sample_weight: Sequence[float] | np.ndarray | None = None,
        iterations: int = 50,
        signs: Mapping[str, int] | None = None,
    ) -> LogisticModel:
        """Fit by Newton's method on soft labels in [0, 1] (standardised features, L2 on the weights only).

        ``signs`` constrains weights whose direction is known (``{"entity_mismatch": -1, "similarity": +1}``).
        With a few hundred labelled pairs and correlated features, an unconstrained fit can give a trap signal
        the wrong sign and score "same template, other entity" above a true paraphrase. Constraints are kept by
        an active set: a feature whose weight comes out with the wrong sign is pinned at zero and the others are
        refitted, until every constrained weight agrees (at most one refit per constrained feature).
        """
        signs = dict(signs or {})
        unknown = sorted(set(signs) - set(features))
        if unknown or any(v not in (-1, 1) for v in signs.values()):
            raise ValueError(f"signs must map fitted features to -1 or +1; got {signs} (unknown: {unknown})")
        pinned: set[int] = set()
        while True:
            model = cls._fit(
                x_full, y, features, l2=l2, sample_weight=sample_weight, iterations=iterations, pinned=pinned
            )
            wrong = [
                i
                for i, name in enumerate(model.features)
                if i not in pinned and name in signs and model.coef[i] * signs[name] < -1e-12
            ]
            if not wrong:
                return model
            # pin the worst offender first: pinning it may fix the others
            pinned.add(max(wrong, key=lambda i: abs(model.coef[i])))

    @classmethod
    def _fit(
        cls,
        x_full: np.ndarray,
        y: Sequence[float] | np.ndarray,
        features: Sequence[str],
        *,
        l2: float,
        sample_weight: Sequence[float] | np.ndarray | None,
        iterations: int,
        pinned: set[int],
    ) -> LogisticModel:
        x_full = np.atleast_2d(np.asarray(x_full, dtype=np.float64))
        target = np.clip(np.asarray(y, dtype=np.float64), 0.0, 1.0)
        if len(target) != len(x_full) or len(target) == 0:
            raise ValueError(f"fit needs one label per row: {len(x_full)} rows, {len(target)} labels")
        cols = _columns(features)
        raw = x_full[:, cols]
        mean = raw.mean(axis=0)
        scale = raw.std(axis=0)
        scale = np.where(scale > 1e-9, scale, 1.0)
        x = np.hstack([(raw - mean) / scale, np.ones((len(raw), 1))])
        x[:, sorted(pinned)] = 0.0  # a pinned feature cannot move the fit; its L2 term keeps its weight at 0
        weight = np.ones(len(x)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        theta = np.zeros(x.shape[1])
        base = float(np.clip(np.average(target, weights=weight), 1e-3, 1 - 1e-3))
        theta[-1] = np.log(base / (1 - base))
        penalty = np.full(x.shape[1], l2)
        penalty[-1] = 0.0
        for _ in range(iterations):
            p = sigmoid(x @ theta)
            grad = x.T @ (weight * (p - target)) + penalty * theta
            hess = (x * (weight * p * (1 - p))[:, None]).T @ x + np.diag(penalty + 1e-9)
            step = np.linalg.solve(hess, grad)
            theta -= step
            if float(np.abs(step).max()) < 1e-8:
                break
        return cls(
            tuple(features), mean, scale, theta[:-1], float(theta[-1]), lower=raw.min(axis=0), upper=raw.max(axis=0)
        )

    # ---------------------------------------------------------------------------------------- save

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (features, standardisation, weights)."""
        return {
            "features": list(self.features),
            "mean": [round(float(v), 8) for v in self.mean],
            "scale": [round(float(v), 8) for v in self.scale],
            "coef": [round(float(v), 8) for v in self.coef],
            "intercept": round(float(self.intercept), 8),
            "updates": int(self.updates),
            **({"lower": [round(float(v), 8) for v in self.lower]} if self.lower is not None else {}),
            **({"upper": [round(float(v), 8) for v in self.upper]} if self.upper is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LogisticModel:
        """The model :meth:`to_dict` described; raises ConfigError on a malformed description."""
        try:
            features = tuple(data["features"])
            n = len(features)
            parts = {k: np.asarray(data[k], dtype=np.float64) for k in ("mean", "scale", "coef")}
            bounds = {k: np.asarray(data[k], dtype=np.float64) for k in ("lower", "upper") if k in data}
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"ranker weights are malformed ({exc}): retrain with benchmarks/train_ranker.py") from exc
        if any(v.shape != (n,) for v in (*parts.values(), *bounds.values())):
            raise ConfigError(f"ranker weights are malformed: mean/scale/coef/lower/upper must each have {n} values")
        return cls(
            features,
            parts["mean"],
            parts["scale"],
            parts["coef"],
            float(data["intercept"]),
            int(data.get("updates", 0)),
            lower=bounds.get("lower"),
            upper=bounds.get("upper"),
        )


__all__ = ["LogisticModel", "sigmoid"]
