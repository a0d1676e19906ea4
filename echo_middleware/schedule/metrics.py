"""What a scheduler measured: queue wait, time to first token, job completion time and SLO attainment per class.

AdaServe's point is that averages hide the class that suffers, so everything is kept per priority class
(``interactive``, ``standard``, ``batch``) as well as overall. Percentiles come from the most recent
``window`` requests of each class, so memory stays bounded on a long-running server.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from echo_middleware.types import PriorityClass

Outcome = Literal["ok", "cancelled", "timeout", "rejected", "error"]


@dataclass(frozen=True)
class FinishedRequest:
    """One request's life in a scheduler, as handed to ``on_finish`` callbacks and kept in the metrics.

    Times are seconds on the scheduler's clock, measured from when ``submit``/``stream`` was called.
    """

    request_id: str
    priority_class: PriorityClass
    outcome: Outcome
    predicted_tokens: float
    completion_tokens: int = 0
    queue_wait_s: float = 0.0
    ttft_s: float | None = None
    jct_s: float = 0.0
    has_slo: bool = False
    slo_met: bool | None = None
    """None when the request had no SLO or was cancelled by its client (neither a hit nor a miss)."""
    speculation: bool | None = None


@dataclass
class _ClassStats:
    window: int
    outcomes: Counter[str] = field(default_factory=Counter)
    slo_total: int = 0
    slo_met: int = 0
    queue_wait: deque[float] = field(init=False)
    ttft: deque[float] = field(init=False)
    jct: deque[float] = field(init=False)

    def __post_init__(self) -> None:
        self.queue_wait = deque(maxlen=self.window)
        self.ttft = deque(maxlen=self.window)
        self.jct = deque(maxlen=self.window)

    def add(self, rec: FinishedRequest) -> None:
        self.outcomes[rec.outcome] += 1
        if rec.slo_met is not None:
            self.slo_total += 1
            self.slo_met += int(rec.slo_met)
        if rec.outcome == "rejected":
            return
        self.queue_wait.append(rec.queue_wait_s)
        if rec.outcome == "ok":
            self.jct.append(rec.jct_s)
            if rec.ttft_s is not None:
                self.ttft.append(rec.ttft_s)

    def summary(self) -> dict[str, object]:
        return {
            "requests": sum(self.outcomes.values()),
            "outcomes": dict(self.outcomes),
            "slo_requests": self.slo_total,
            "slo_attainment": (self.slo_met / self.slo_total) if self.slo_total else None,
            "queue_wait_s": _describe(self.queue_wait),
            "ttft_s": _describe(self.ttft),
            "jct_s": _describe(self.jct),
        }


def _describe(values: deque[float]) -> dict[str, float] | None:
    if not values:
        return None
    x = np.fromiter(values, dtype=float)
    return {
        "mean": float(x.mean()),
        "p50": float(np.percentile(x, 50)),
        "p90": float(np.percentile(x, 90)),
        "p99": float(np.percentile(x, 99)),
        "max": float(x.max()),
    }


class SchedulerMetrics:
    """Counters and recent samples of one scheduler, per priority class and overall."""

    def __init__(self, window: int = 10_000) -> None:
        self.window = window
        self._classes: dict[str, _ClassStats] = {}
        self._all = _ClassStats(window)

    def record(self, rec: FinishedRequest) -> None:
        """Add one finished (or refused, or cancelled) request."""
        self._classes.setdefault(rec.priority_class, _ClassStats(self.window)).add(rec)
        self._all.add(rec)

    def snapshot(self) -> dict[str, object]:
        """``{"all": {...}, "by_class": {"interactive": {...}, ...}}`` with counts, attainment and percentiles."""
        return {"all": self._all.summary(), "by_class": {k: v.summary() for k, v in sorted(self._classes.items())}}

    def slo_attainment(self, priority_class: PriorityClass | None = None) -> float | None:
        """Share of requests with an SLO that met it (None when there were none)."""
        stats = self._all if priority_class is None else self._classes.get(priority_class)
        if stats is None or not stats.slo_total:
            return None
        return stats.slo_met / stats.slo_total
