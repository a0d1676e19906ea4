"""SLO-aware speculation (AdaServe, arXiv 2501.12162): how much speculative decoding each request should get.

Speculative decoding cuts one request's latency but spends extra verification work per step. An interactive
request with a tight SLO wants it; a batch job does not, least of all when the engine is saturated and that work
would be better spent on throughput. :class:`SpeculationPolicy` turns a request's SLO and the engine's load into a
:class:`SpeculationDecision`.

Engines differ in what they can do with a decision, so the policy is *advice* the engine layer consults:

- **transformers** generates one request at a time, so it can honour the decision per request (pass or drop
  ``prompt_lookup_num_tokens`` / ``assistant_model`` in that request's ``generate`` call).
- **vLLM** (in-process or server) fixes ``speculative_config`` when the engine starts; it cannot switch per
  request. There the policy is realised by *routing*: run one engine with speculation and one without and send
  each class where its decision points, or accept the engine-wide setting and record the decision.

The scheduler publishes the decision for the request it is running in a context variable, read with
:func:`speculation_hint` from inside an engine's ``_stream`` (it runs in the scheduler's task, so the value is
there without changing :class:`~echo_middleware.types.EngineRequest`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping

from pydantic import BaseModel

from echo_middleware.config import SpeculationConfig
from echo_middleware.types import SLO, EngineLoad, FeatureStatus

_HINT: contextvars.ContextVar[SpeculationDecision | None] = contextvars.ContextVar("echo_speculation", default=None)


class SpeculationDecision(BaseModel):
    """Whether to speculate for one request, with how many tokens per step, and why."""

    enabled: bool
    num_tokens: int = 0
    reason: str = ""


class SpeculationPolicy:
    """Per priority class: speculate always, only while the engine has room, or never.

    Args:
        config: The ``schedule.speculation`` settings.
        features: The engine's :attr:`~echo_middleware.engines.base.Engine.features`; when none of its
            ``speculative*`` features is enabled, every decision is off ("the engine cannot speculate").
        engine_tokens: Tokens per step the engine was configured with (used when ``config.num_tokens`` is None).

    Example:
        .. code-block:: python

            policy = SpeculationPolicy(SpeculationConfig(), engine.features, engine_tokens=4)
            decision = policy.for_request(SLO(priority="batch"), engine.load())
            decision.enabled  # False: batch requests do not speculate by default
    """

    def __init__(
        self,
        config: SpeculationConfig | None = None,
        features: Mapping[str, FeatureStatus] | None = None,
        *,
        engine_tokens: int = 4,
    ) -> None:
        self.config = config or SpeculationConfig()
        self.features = dict(features) if features is not None else None
        self.engine_tokens = engine_tokens

    def engine_can_speculate(self) -> bool:
        """Whether the engine reported an enabled speculative feature (True when features are unknown)."""
        if self.features is None:
            return True
        return any(k.startswith("speculative") and v.enabled for k, v in self.features.items())

    def for_request(self, slo: SLO | None, load: EngineLoad) -> SpeculationDecision:
        """The decision for a request with ``slo`` (None: standard class) on an engine under ``load``."""
        klass = slo.priority if slo is not None else "standard"
        mode = getattr(self.config, klass)
        tokens = self.config.num_tokens or self.engine_tokens
        if not self.engine_can_speculate():
            return SpeculationDecision(enabled=False, reason="the engine has no speculative decoding enabled")
        if mode == "never":
            return SpeculationDecision(enabled=False, reason=f"{klass} requests never speculate")
        if mode == "always":
            return SpeculationDecision(enabled=True, num_tokens=tokens, reason=f"{klass} requests always speculate")
        util = load.utilisation
        if util >= self.config.saturation:
            return SpeculationDecision(
                enabled=False,
                reason=f"engine saturated (utilisation {util:.2f} >= {self.config.saturation:g}): {klass} gives it up",
            )
        return SpeculationDecision(
            enabled=True, num_tokens=tokens, reason=f"engine has room (utilisation {util:.2f}): {klass} speculates"
        )


def speculation_hint() -> SpeculationDecision | None:
    """The speculation decision for the request the current task is running (None outside a scheduler)."""
    return _HINT.get()


@contextlib.contextmanager
def speculation_scope(decision: SpeculationDecision | None) -> Iterator[None]:
    """Publish ``decision`` to :func:`speculation_hint` while the block runs."""
    token = _HINT.set(decision)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):  # reset from another context (a generator closed elsewhere)
            _HINT.reset(token)
