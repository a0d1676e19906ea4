"""Calibrating the offload threshold to a target quality retention.

The router predicts the quality ``p`` of the small model's answer (with its examples) and offloads when ``p``
clears a threshold ``t``. Which ``t``? The one that keeps a chosen share of the large model's quality, measured on
held-out requests where both answers are known: for each held-out request ``i`` we have the prediction ``p_i`` and
the measured quality ``q_i`` of the small answer relative to the large one (agreement with it, so the large model
itself scores 1). Routing with threshold ``t`` keeps

    retention(t) = (sum of q_i over offloaded i (p_i >= t)  +  count of the others) / n

of always-large quality. The calibrated threshold is the lowest ``t`` such that ``retention >= target`` holds at
``t`` and at every higher threshold: the most offloading the target allows, without relying on a lucky tail. When
no threshold reaches the target, nothing is offloaded (``t = 1``).

**Finite-sample guard** (``conformal=True``, the default; conformal risk control, Angelopoulos et al. 2022). The
threshold above is chosen on the same ``n`` pairs it is judged on, so it is optimistic: with the 85 shipped pairs
it promised 97 % and kept 94 % (agreement) on 120 new requests (``benchmarks/results/echo_no_guard.md``). Each request's
loss ``(1 - q_i)`` if offloaded is in [0, 1] and falls as ``t`` rises, so requiring

    (sum of the losses at t + 1) / (n + 1)  <=  1 - target,   i.e.  retention(t) * n / (n + 1) >= target

keeps the *expected* retention on a new, exchangeable request at or above the target. It needs at least
``1 / (1 - target) - 1`` pairs to offload anything (32 at 97 %), and relaxes as online outcomes accumulate.

The same held-out pairs ship with the ranker's weights, and the router keeps adding pairs it measures online
(shadow checks of offloads, probes of large answers), so the threshold follows the workload it actually sees.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Sequence

import numpy as np

NO_OFFLOAD = 1.0
"""The threshold when no threshold keeps the target (utilities are below 1, so nothing is offloaded)."""


def retention_curve(pairs: Sequence[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each candidate threshold (the distinct predictions, descending): retention and offload share.

    Returns:
        ``(thresholds, retention, offload_rate)``, each one value per distinct prediction, highest first.
    """
    if not pairs:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    arr = np.asarray(pairs, dtype=np.float64)
    order = np.argsort(-arr[:, 0], kind="stable")
    p, q = arr[order, 0], np.clip(arr[order, 1], 0.0, 1.0)
    n = len(p)
    # Offloading the top j requests loses sum(1 - q) over them.
    lost = np.cumsum(1.0 - q)
    # Thresholds are the distinct predictions; offloading at threshold p[j] offloads everything >= p[j].
    last_of_group = np.r_[p[1:] != p[:-1], True]
    idx = np.nonzero(last_of_group)[0]
    thresholds = p[idx]
    retention = 1.0 - lost[idx] / n
    offload_rate = (idx + 1) / n
    return thresholds, retention, offload_rate


def calibrate_threshold(
    pairs: Sequence[tuple[float, float]], target_retention: float, *, conformal: bool = True
) -> float:
    """The lowest threshold whose retention on ``pairs`` is at least ``target_retention`` (see module doc).

    Args:
        pairs: Held-out ``(predicted quality, measured quality relative to the large model)`` pairs.
        target_retention: The share of always-large quality to keep, in (0, 1].
        conformal: Count retention on ``n`` pairs as ``n / (n + 1)`` of itself (the finite-sample guard), so that
            the target holds in expectation on new requests.

    Returns:
        The threshold, or :data:`NO_OFFLOAD` when no threshold keeps the target (or there are no pairs).
    """
    thresholds, retention, _ = retention_curve(pairs)
    if conformal:
        retention = retention * len(pairs) / (len(pairs) + 1)
    ok = np.nonzero(retention >= target_retention - 1e-12)[0]
    if len(ok) == 0:
        return NO_OFFLOAD
    # retention falls as more is offloaded, but not monotonically (a late q=1 raises it again): take the lowest
    # threshold whose *every* higher threshold also keeps the target, so routing never relies on a lucky tail.
    bad = np.nonzero(retention < target_retention - 1e-12)[0]
    first_bad = int(bad[0]) if len(bad) else len(thresholds)
    if first_bad == 0:
        return NO_OFFLOAD
    return float(thresholds[first_bad - 1])


class Calibrator:
    """The held-out pairs and the outcomes measured online, and the threshold they give.

    Shipped pairs come first; online outcomes are appended to a window of ``window`` pairs that pushes the
    oldest out. Thread-safe (outcomes arrive from background checks).
    """

    def __init__(self, pairs: Iterable[tuple[float, float]] = (), *, window: int = 2000) -> None:
        self._pairs: deque[tuple[float, float]] = deque(((float(p), float(q)) for p, q in pairs), maxlen=window)
        self._lock = threading.Lock()
        self._cache: dict[tuple[float, bool], float] = {}
        self.observed = 0

    def __len__(self) -> int:
        return len(self._pairs)

    def observe(self, predicted: float, measured: float) -> None:
        """Add one measured outcome."""
        with self._lock:
            self._pairs.append((float(predicted), float(min(1.0, max(0.0, measured)))))
            self._cache.clear()
            self.observed += 1

    def threshold(self, target_retention: float, *, conformal: bool = True) -> float:
        """The calibrated threshold for ``target_retention`` on the pairs known now (cached until the next one)."""
        with self._lock:
            cached = self._cache.get((target_retention, conformal))
            if cached is None:
                cached = calibrate_threshold(list(self._pairs), target_retention, conformal=conformal)
                self._cache[(target_retention, conformal)] = cached
            return cached

    def pairs(self) -> list[tuple[float, float]]:
        """A copy of the pairs (shipped and observed)."""
        with self._lock:
            return list(self._pairs)


__all__ = ["NO_OFFLOAD", "Calibrator", "calibrate_threshold", "retention_curve"]
