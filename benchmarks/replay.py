"""Latency under load from measured service times: a discrete-event replay of a trace's arrivals.

Why a replay and not only wall-clock runs: on the benchmark machine (2 CPU cores, the transformers engine, one
generation at a time) a request's service time does not depend on the arrival rate, only its waiting time does.
So each system answers the eval stream once, alone, and every request's measured wall time (embedding,
retrieval, ranking, generation, storing) is its service time; this module then replays Poisson arrivals at any
rate over those service times, in one queue per server, in the order the scheduler would pick. The ordering is
the product's own: :func:`echo_middleware.schedule.queue_rank` (``fcfs`` or ``sjf`` with aging on the pipeline's
predicted output length).

Servers: ``shared`` (default) puts every job of a system on one server, because on a 2-core CPU the small and
the large model cannot usefully run at the same time; ``separate`` gives each route (large, small, cache) its own
server, as on a machine with one accelerator per model (optimistic here, reported only when asked for).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

from scoring import percentile

from echo_middleware.config import ScheduleConfig
from echo_middleware.schedule import queue_rank


@dataclass(frozen=True)
class Job:
    """One request as the replay sees it."""

    id: str
    arrival: float
    service_s: float
    predicted_tokens: float | None = None
    server: str = "shared"
    background: bool = False
    """Idle-time work (the learner's): served only when no user request waits, left out of latencies."""


@dataclass(frozen=True)
class Done:
    """When a job started and finished."""

    id: str
    arrival: float
    start: float
    finish: float
    server: str
    background: bool = False

    @property
    def latency(self) -> float:
        """Seconds from arrival to the end of the answer."""
        return self.finish - self.arrival

    @property
    def wait(self) -> float:
        """Seconds spent queued."""
        return self.start - self.arrival


def simulate(jobs: Sequence[Job], policy: str = "fcfs", config: ScheduleConfig | None = None) -> list[Done]:
    """Replay ``jobs`` non-preemptively, one at a time per server, in ``policy`` order.

    Args:
        jobs: The requests with their arrival times and service times.
        policy: ``fcfs`` or ``sjf`` (SSJF with aging, as the scheduler ranks); a job without a prediction ranks
            as its arrival (FCFS among those).
        config: Supplies ``aging_s`` and ``class_delay_s`` for ``sjf`` (default: the package defaults).

    Returns:
        One :class:`Done` per job, in the order they finished.
    """
    if policy not in ("fcfs", "sjf"):
        raise ValueError(f"policy={policy!r}: the replay knows fcfs and sjf")
    config = config or ScheduleConfig()
    done: list[Done] = []
    by_server: dict[str, list[Job]] = {}
    for job in jobs:
        if job.service_s < 0 or math.isnan(job.service_s):
            raise ValueError(f"job {job.id} has service_s={job.service_s}: must be >= 0")
        by_server.setdefault(job.server, []).append(job)
    for server, queue in by_server.items():
        queue = sorted(queue, key=lambda j: j.arrival)
        waiting: list[tuple[int, float, float, int, Job]] = []
        now, i = 0.0, 0
        while i < len(queue) or waiting:
            if not waiting and i < len(queue) and queue[i].arrival > now:
                now = queue[i].arrival
            while i < len(queue) and queue[i].arrival <= now:
                job = queue[i]
                if policy == "sjf" and job.predicted_tokens is not None:
                    rank = queue_rank(
                        "sjf",
                        arrival=job.arrival,
                        predicted_tokens=job.predicted_tokens,
                        slo=None,
                        config=config,
                        tokens_per_s=1.0,
                    )
                else:
                    rank = job.arrival
                heapq.heappush(waiting, (int(job.background), rank, job.arrival, i, job))
                i += 1
            *_, job = heapq.heappop(waiting)
            start = max(now, job.arrival)
            now = start + job.service_s
            done.append(Done(job.id, job.arrival, start, now, server, job.background))
    done.sort(key=lambda d: d.finish)
    return done


def summarize(done: Sequence[Done]) -> dict[str, float]:
    """Throughput (user requests completed per second, first arrival to last finish) and latency percentiles.

    Background jobs take server time (they can delay a user's request) but are not requests: they are left out.
    """
    done = [d for d in done if not d.background]
    if not done:
        return {"n": 0, "throughput_rps": math.nan, "p50_latency_s": math.nan, "p90_latency_s": math.nan}
    span = max(d.finish for d in done) - min(d.arrival for d in done)
    latencies = [d.latency for d in done]
    return {
        "n": len(done),
        "throughput_rps": len(done) / span if span > 0 else math.inf,
        "p50_latency_s": percentile(latencies, 50),
        "p90_latency_s": percentile(latencies, 90),
        "p99_latency_s": percentile(latencies, 99),
        "mean_wait_s": sum(d.wait for d in done) / len(done),
    }


def capacity_rps(service_times: Sequence[float], *, extra_s: float = 0.0) -> float:
    """Saturation throughput of one server: requests per second of busy time (all requests queued at once).

    ``extra_s`` is other work charged to the same server (the learner's idle-time work, when it is counted).
    """
    busy = sum(service_times) + extra_s
    return len(service_times) / busy if busy > 0 else math.inf
