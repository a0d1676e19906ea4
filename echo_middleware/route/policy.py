"""The offload policy: answer with the small model and its examples, or with the large model?

The policy predicts the quality of the small model's answer as the utility of the best example selected for its
prompt (the ranker's estimate that the small model, shown that example, answers as the large model would), and
offloads when the prediction clears a threshold:

- **Calibrated**: the threshold is the lowest one that keeps ``route.target_retention`` of always-large quality
  on held-out outcomes (:mod:`~echo_middleware.route.calibration`); ``route.threshold`` fixes it instead.
- **Load-aware** (IC-Cache): when the large engine has more requests than slots, the bar drops by
  ``load_bias * tanh(load_gamma * overload)``, where ``overload = utilisation - 1``. Only requests whose latency
  needs it get the bias: a request whose SLO the large engine's queue would miss gets all of it, one whose SLO
  would still be met gets none, and requests without an SLO get their class's share (``class_bias_weight``:
  interactive 1, standard 0.5, batch 0: batch work can wait for the large model).
- **Conservative**: requests the small model cannot be judged on (tool calls, structured output:
  ``EchoRequest.requires_large``) and requests without a usable example are not offloaded, unless forced with
  ``offload="always"``; ``offload="never"`` always goes to the large model.

Every decision carries a one-line reason a user can read in the response metadata.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from echo_middleware.config import RouteConfig
from echo_middleware.route.calibration import NO_OFFLOAD, Calibrator
from echo_middleware.types import Candidate, EchoRequest, EngineLoad

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouteDecision:
    """The policy's answer for one request.

    Attributes:
        offload: Answer with the small model.
        reason: Why, in one line.
        predicted_quality: Predicted quality of the small answer (best selected utility); None without examples.
        threshold: The bar it had to clear, after the load bias.
        base_threshold: The bar before the load bias.
        load_bias: How much the bar was lowered for load.
        forced: The request's ``offload`` mode decided, not the prediction.
        possible: The small model may answer this request at all (used when the large model fails).
    """

    offload: bool
    reason: str
    predicted_quality: float | None = None
    threshold: float | None = None
    base_threshold: float | None = None
    load_bias: float = 0.0
    forced: bool = False
    possible: bool = False


class OffloadPolicy:
    """Decides offloading from predicted quality, a calibrated threshold, the large engine's load and the SLO.

    Args:
        config: Route settings.
        calibration: Held-out (predicted, measured) pairs; None: the pipeline hands over the ranker's pairs.

    Instantiate / Invoke:
        .. code-block:: python

            policy = OffloadPolicy(RouteConfig(target_retention=0.97), calibration=pairs)
            decision = policy.decide(request, selected_candidates, large_engine.load())
            print(decision.offload, decision.reason)
    """

    def __init__(
        self, config: RouteConfig | None = None, *, calibration: Iterable[tuple[float, float]] | None = None
    ) -> None:
        self.config = config or RouteConfig()
        self.calibrator = Calibrator(calibration or (), window=self.config.calibration_window)
        self._has_calibration = calibration is not None

    def attach_calibration(self, pairs: Iterable[tuple[float, float]]) -> None:
        """Use these held-out pairs when the policy was built without its own (the ranker's shipped pairs)."""
        if self._has_calibration:
            return
        for p, q in pairs:
            self.calibrator.observe(p, q)
        self.calibrator.observed = 0
        self._has_calibration = True

    # ------------------------------------------------------------------------------------- parts

    def threshold(self) -> tuple[float, str]:
        """The offload threshold before load bias, and where it comes from."""
        cfg = self.config
        if cfg.threshold is not None:
            return cfg.threshold, "fixed by route.threshold"
        n = len(self.calibrator)
        if n < cfg.min_calibration:
            return cfg.default_threshold, f"default: only {n} outcomes known (< route.min_calibration)"
        value = self.calibrator.threshold(cfg.target_retention, conformal=cfg.conformal)
        if value >= NO_OFFLOAD:
            return NO_OFFLOAD, f"no threshold keeps {cfg.target_retention:.0%} retention on {n} outcomes"
        guard = ", conformal" if cfg.conformal else ""
        return value, f"calibrated for {cfg.target_retention:.0%} retention on {n} outcomes{guard}"

    def load_bias(self, request: EchoRequest, load: EngineLoad | None) -> tuple[float, str]:
        """How much to lower the bar for this request given the large engine's load, and why.

        The bias is ``load_bias * tanh(load_gamma * overload) * weight`` with ``overload = utilisation - 1``;
        ``weight`` is 1 when the request's SLO would be missed on the large engine's queue, 0 when it would be met,
        and the priority class's ``class_bias_weight`` without an SLO.
        """
        cfg = self.config
        if load is None or cfg.load_bias <= 0:
            return 0.0, ""
        overload = load.utilisation - 1.0
        if overload <= 0:
            return 0.0, ""
        slo = request.slo
        weight: float
        why: str
        if slo is not None and (slo.latency_s is not None or slo.ttft_s is not None):
            slots = max(1, load.max_concurrency)
            ahead = load.waiting + load.running
            if load.tokens_per_s > 0:
                service = request.params.max_tokens / load.tokens_per_s
                wait = ahead / slots * service
                estimates = []
                if slo.ttft_s is not None:
                    estimates.append((wait, slo.ttft_s, "ttft"))
                if slo.latency_s is not None:
                    estimates.append((wait + service, slo.latency_s, "latency"))
                missed = [(e, s, k) for e, s, k in estimates if e > s]
                if missed:
                    e, s, k = missed[0]
                    weight, why = 1.0, f"large queue ~{e:.1f} s > {k} SLO {s:g} s"
                else:
                    weight, why = 0.0, "SLO met on the large queue"
            else:
                weight, why = 1.0, "SLO at risk (large engine speed unknown)"
        else:
            priority = slo.priority if slo is not None else "standard"
            weight = float(cfg.class_bias_weight.get(priority, 0.5))
            why = f"{priority} class weight {weight:g}"
        bias = cfg.load_bias * math.tanh(cfg.load_gamma * overload) * weight
        return bias, f"large utilisation {load.utilisation:.1f}, {why}"

    @staticmethod
    def predict_quality(selected: Sequence[Candidate]) -> float | None:
        """Predicted quality of the small model's answer with these examples: the best one's utility."""
        utilities = [c.utility for c in selected if c.utility is not None]
        return max(utilities) if utilities else None

    # ------------------------------------------------------------------------------------- decide

    def decide(
        self,
        request: EchoRequest,
        selected: Sequence[Candidate],
        large_load: EngineLoad | None = None,
        *,
        best_utility: float | None = None,
        note: str = "",
    ) -> RouteDecision:
        """Offload or not, with the reason.

        Args:
            request: The request (mode, requires_large, SLO, max_tokens).
            selected: The examples that would go into the small model's prompt (utility set, best first).
            large_load: The large engine's load now (None: unknown, no load bias).
            best_utility: The best utility among all ranked candidates (for the "no usable example" reason).
            note: Why there are no candidates at all (e.g. the store is down), for the reason.
        """
        cfg = self.config
        predicted = self.predict_quality(selected)
        mode = request.offload
        has_examples = bool(selected)
        possible = not request.requires_large and (has_examples or cfg.offload_without_examples)
        if mode == "never":
            return RouteDecision(
                False, "offload='never': the large model answers", predicted, forced=True, possible=possible
            )
        if mode == "always":
            what = f"{len(selected)} example(s)" if has_examples else "no examples"
            shown = "" if predicted is None else f", predicted quality {predicted:.2f}"
            return RouteDecision(
                True,
                f"offload='always': the small model answers with {what}{shown}",
                predicted,
                forced=True,
                possible=True,
            )
        if request.requires_large:
            return RouteDecision(
                False, "the request needs the large model (tool calls or structured output)", predicted, possible=False
            )
        base, source = self.threshold()
        bias, bias_why = self.load_bias(request, large_load)
        effective = max(0.0, base - bias)
        load_text = f", lowered by {bias:.3f} for load ({bias_why})" if bias > 0 else ""
        if not has_examples:
            if not cfg.offload_without_examples:
                if best_utility is not None:
                    why = f"no usable example (best utility {best_utility:.2f} < rank.min_utility)"
                else:
                    why = note or "no similar past request in the store"
                return RouteDecision(
                    False, f"{why}: the large model answers", None, effective, base, bias, possible=False
                )
            predicted = 0.0 if predicted is None else predicted
        assert predicted is not None  # noqa: S101  (set above when there are no examples)
        if predicted >= effective and effective < NO_OFFLOAD:
            reason = (
                f"predicted quality {predicted:.2f} >= threshold {effective:.2f} ({source}{load_text}): "
                f"the small model answers with {len(selected)} example(s)"
            )
            return RouteDecision(True, reason, predicted, effective, base, bias, possible=True)
        reason = f"predicted quality {predicted:.2f} < threshold {effective:.2f} ({source}{load_text})"
        return RouteDecision(False, reason, predicted, effective, base, bias, possible=possible)

    def observe(self, predicted: float, measured: float) -> None:
        """Add a measured outcome (shadow check or probe) to the calibration window."""
        self.calibrator.observe(predicted, measured)


__all__ = ["OffloadPolicy", "RouteDecision"]
