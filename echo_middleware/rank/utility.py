"""The utility ranker (a learned proxy over pair features) and the similarity-only baseline.

Both are logistic models over :mod:`~echo_middleware.rank.features`; they differ in what they may look at.
:class:`UtilityRanker` sees every feature (lexical overlap, entity and number mismatches, negation, the example's
measured utility and offload successes, ...); :class:`SimilarityRanker` sees only the embedding similarity, i.e.
it is plain nearest-neighbour selection with its similarity mapped to a probability on the same training data,
which makes it the fair baseline the benchmark compares against.

The trained weights ship in ``echo_middleware/data/ranker.json``, made by ``benchmarks/train_ranker.py`` (see
``docs/architecture.md``). ``rank.model_path`` points at another file of the same format; ``rank.state_path``
keeps the online-updated weights across restarts.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from echo_middleware.config import RankConfig
from echo_middleware.errors import ConfigError
from echo_middleware.rank.base import Ranker
from echo_middleware.rank.features import RankQuery
from echo_middleware.rank.model import LogisticModel
from echo_middleware.types import Candidate

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = "echo-middleware/ranker@1"
DEFAULT_BUNDLE = "ranker.json"
"""File name of the shipped weights inside ``echo_middleware/data``."""

_PRIORS: dict[str, dict[str, Any]] = {
    # Used only when no weights file can be read (a source checkout before training): similarity decides, with
    # the obvious corrections. Logged as a warning, never silently.
    "utility": {
        "features": ["similarity", "entity_mismatch", "exact_repeat", "mean_utility"],
        "mean": [0.0, 0.0, 0.0, 0.5],
        "scale": [1.0, 1.0, 1.0, 1.0],
        "coef": [10.0, -3.0, 2.0, 2.0],
        "intercept": -8.0,
    },
    "similarity": {"features": ["similarity"], "mean": [0.0], "scale": [1.0], "coef": [10.0], "intercept": -8.0},
}


def read_bundle(path: str | os.PathLike[str] | None = None) -> dict[str, Any] | None:
    """The ranker bundle at ``path`` (default: the shipped one), or None when the default is absent.

    Raises:
        ConfigError: ``path`` was given and cannot be read, or the file is not a ranker bundle.
    """
    try:
        if path is None:
            ref = resources.files("echo_middleware").joinpath("data", DEFAULT_BUNDLE)
            if not ref.is_file():
                return None
            text = ref.read_text(encoding="utf-8")
            where = f"echo_middleware/data/{DEFAULT_BUNDLE}"
        else:
            where = str(path)
            text = Path(path).read_text(encoding="utf-8")
        data = json.loads(text)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"rank.model_path={path!s}: cannot read ranker weights ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
        raise ConfigError(
            f"{where} is not a ranker bundle (format {BUNDLE_FORMAT!r}): make one with benchmarks/train_ranker.py"
        )
    return data


def write_bundle(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    """Write a bundle atomically (a crash leaves the old file or the new one, never half of one)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"format": BUNDLE_FORMAT, **data}, fh, indent=1)
            fh.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a bundle is package data that every user must read
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LearnedRanker(Ranker):
    """A ranker whose utility is a :class:`LogisticModel` read from a bundle section named :attr:`name`.

    Args:
        config: The rank settings (weights file, online learning rate, state file).
        model: Use these weights instead of reading a file (tests, the training script).
        calibration: Held-out (predicted, measured) pairs to ship with ``model``.

    Weights load on first use, not in ``__init__``.
    """

    name: ClassVar[str] = "learned"

    def __init__(
        self,
        config: RankConfig | None = None,
        *,
        model: LogisticModel | None = None,
        calibration: Sequence[tuple[float, float]] | None = None,
    ) -> None:
        self.config = config or RankConfig()
        self._model = model
        self._calibration = [(float(p), float(q)) for p, q in (calibration or [])]
        self._meta: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._dirty = False
        self.source = "given" if model is not None else ""

    @property
    def model(self) -> LogisticModel:
        """The logistic model (loaded on first use)."""
        if self._model is None:
            with self._lock:
                if self._model is None:
                    self._load()
        assert self._model is not None  # noqa: S101  (_load sets it or raises)
        return self._model

    def _load(self) -> None:
        state = self.config.state_path
        for path, what in ((state, "state"), (self.config.model_path, "model")):
            if path is not None and (what == "model" or Path(path).is_file()):
                bundle = read_bundle(path)
                self._take(bundle, str(path))
                return
        bundle = read_bundle(None)
        if bundle is None:
            logger.warning("no trained ranker weights found; the %s ranker uses an untrained prior", self.name)
            self._model = LogisticModel.from_dict(_PRIORS[self.name])
            self.source = "prior"
            return
        self._take(bundle, f"echo_middleware/data/{DEFAULT_BUNDLE}")

    def _take(self, bundle: dict[str, Any] | None, where: str) -> None:
        section = (bundle or {}).get("rankers", {}).get(self.name)
        if not isinstance(section, dict) or "model" not in section:
            raise ConfigError(f"{where} has no '{self.name}' ranker: retrain it with benchmarks/train_ranker.py")
        self._model = LogisticModel.from_dict(section["model"])
        if not self._calibration:
            self._calibration = [(float(p), float(q)) for p, q in section.get("calibration", [])]
        self._meta = {k: v for k, v in (bundle or {}).items() if k not in ("rankers", "format")}
        self.source = where
        logger.debug("%s ranker loaded from %s (%d features)", self.name, where, len(self._model.features))

    def score(self, query: RankQuery, candidates: Sequence[Candidate], features: np.ndarray) -> np.ndarray:
        """Utilities from the logistic model over the feature rows."""
        return self.model.predict(features)

    @property
    def calibration(self) -> list[tuple[float, float]]:
        """Held-out (predicted quality, measured agreement) pairs shipped with the weights."""
        _ = self.model
        return list(self._calibration)

    def observe(self, rows: np.ndarray, labels: Sequence[float]) -> None:
        """One online SGD step (``rank.learning_rate``) towards the measured agreements."""
        if self.config.learning_rate <= 0 or len(labels) == 0:
            return
        with self._lock:
            self.model.partial_fit(np.asarray(rows), labels, lr=self.config.learning_rate)
            self._dirty = True

    def save(self) -> None:
        """Write the online-updated weights to ``rank.state_path`` (no-op without one or without updates)."""
        path = self.config.state_path
        if path is None or not self._dirty:
            return
        with self._lock:
            data = {
                **self._meta,
                "rankers": {self.name: {"model": self.model.to_dict(), "calibration": self._calibration}},
            }
            self._dirty = False
        write_bundle(path, data)
        logger.info("%s ranker state saved to %s", self.name, path)


class UtilityRanker(LearnedRanker):
    """The learned proxy utility ranker: every pair feature, similarity being only one of them.

    Setup:
        ``pip install echo-middleware``; the trained weights ship with the package.

    Instantiate / Invoke:
        .. code-block:: python

            from echo_middleware.rank import RankQuery, UtilityRanker

            ranker = UtilityRanker()
            ranking = ranker.rank(RankQuery("Where was Ann Smith born?"), candidates)
            best = ranking.candidates[0].utility
    """

    name: ClassVar[str] = "utility"


class SimilarityRanker(LearnedRanker):
    """Similarity-only baseline: nearest neighbours first, their similarity mapped to a probability."""

    name: ClassVar[str] = "similarity"


RANKERS: dict[str, type[LearnedRanker]] = {"utility": UtilityRanker, "similarity": SimilarityRanker}
"""Ranker name (``rank.kind``) -> class."""


def create_ranker(config: RankConfig | None = None) -> Ranker:
    """The ranker ``config.kind`` names (cheap: weights load on first use)."""
    config = config or RankConfig()
    try:
        cls = RANKERS[config.kind]
    except KeyError:
        raise ConfigError(f"rank.kind={config.kind!r} is not a ranker: use one of {sorted(RANKERS)}") from None
    return cls(config)


__all__ = [
    "BUNDLE_FORMAT",
    "RANKERS",
    "LearnedRanker",
    "SimilarityRanker",
    "UtilityRanker",
    "create_ranker",
    "read_bundle",
    "write_bundle",
]
