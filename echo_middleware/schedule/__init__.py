"""Pipeline stage: schedule. One :class:`Scheduler` per engine orders its work.

Shortest predicted job first with aging (SSJF), earliest deadline first for requests with SLOs, bounded queues
with back-pressure, cancellation that reaches the engine, hedged requests over two engines, and per-class
speculation advice (AdaServe). See ``docs/scheduling.md``.
"""

from echo_middleware.schedule.hedge import HedgeResult, hedge
from echo_middleware.schedule.metrics import FinishedRequest, SchedulerMetrics
from echo_middleware.schedule.scheduler import Scheduler, queue_rank
from echo_middleware.schedule.speculation import (
    SpeculationDecision,
    SpeculationPolicy,
    speculation_hint,
    speculation_scope,
)

POLICIES = ("fcfs", "sjf", "slo")
"""The queue orders :func:`queue_rank` knows (``schedule.policy``)."""

__all__ = [
    "POLICIES",
    "FinishedRequest",
    "HedgeResult",
    "Scheduler",
    "SchedulerMetrics",
    "SpeculationDecision",
    "SpeculationPolicy",
    "hedge",
    "queue_rank",
    "speculation_hint",
    "speculation_scope",
]
