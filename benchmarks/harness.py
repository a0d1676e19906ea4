"""The benchmark harness: every system answers the same traces on the same engines, in one run.

What one run does, per workload (``qa``, ``math``, ``open``, ``traps``):

1. builds the trace (:mod:`workloads`): a warm-up history and a held-out eval stream;
2. has the large model answer the warm-up history once (cached on disk between runs: these answers are the
   store's contents, not a measurement);
3. for each system (:mod:`systems`), fills its memory with the warm-up pairs, then answers every eval request
   alone, in trace order, timing it (its **service time**) and counting its engine calls; background learning a
   request causes is drained before the next request is timed, and counted as idle-time work;
4. scores every answer (:mod:`scoring`): against gold answers, against the large model's answer, and with the
   large model as judge (open text, traps);
5. replays the eval stream's Poisson arrivals at several rates over the measured service times
   (:mod:`replay`), FCFS for every system and shortest-predicted-job-first for the echo variants;
6. writes ``results.json``, ``results.md``, plots and ``summary.json`` (:mod:`report`).

Engines are loaded once per configuration: the default engines (speculation as configured) serve every system;
``echo-nospec`` runs on a second pair of engines with speculation off.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from replay import Job, capacity_rps, simulate, summarize
from scoring import FALLBACK_PRIMARY, PRIMARY, Judge, mean, percentile, retention, score_item
from systems import (
    AlwaysLarge,
    AlwaysSmall,
    EngineSet,
    MeteredEngine,
    Outcome,
    PipelineSystem,
    SemanticCache,
    System,
    engine_request,
)
from tqdm import tqdm
from workloads import KINDS, WORKLOADS, Item, Trace, arrivals, build_trace, describe

logger = logging.getLogger("echo_bench")

SYSTEMS = (
    "always-large",
    "always-small",
    "semantic-cache",
    "similarity-examples",
    "echo",
    "echo-fcfs",
    "echo-nospec",
    "echo-similarity",
)
"""Every system the harness knows. ``echo-fcfs`` is echo's run replayed first-come-first-served (no extra
generation); ``echo-nospec`` is echo on engines with speculative decoding off; ``echo-similarity`` is echo with
the similarity-only ranker (same routing): the utility ranker's contribution alone."""
DEFAULT_SYSTEMS = SYSTEMS[:-1]
"""What a run compares unless ``--system`` says otherwise (``echo-similarity`` costs a run more; ask for it)."""
SUMMARY_SYSTEMS = ("always-large", "always-small", "semantic-cache", "similarity-examples", "echo")
SJF_SYSTEMS = ("echo", "echo-nospec", "echo-similarity")
"""Replayed shortest-predicted-job-first (the pipeline predicts lengths); the others first-come-first-served."""

FULL_SIZES = {"qa": (60, 40), "math": (12, 8), "open": (12, 8), "traps": (24, 24)}
"""(warm-up, eval) requests per workload in a full run, sized to finish in about 30 minutes on 2 CPU cores."""
QUICK_SIZES = {"qa": (6, 4), "math": (3, 2), "open": (3, 2), "traps": (4, 4)}
QUICK_MAX_TOKENS = {"qa": 16, "math": 48, "open": 32, "traps": 24}
QUICK_SEED = 7
"""The quick mode's default seed: its tiny slices then hold paraphrases (qa), traps and controls (traps), so CI
exercises every kind."""
DEFAULT_RATES = (0.5, 0.8, 1.2)
"""Arrival rates as multiples of always-large's capacity on the same workload (so they mean the same load on
any machine): light, busy, overloaded."""
HEADLINE_RATE = 0.8
REPLAY_SEEDS = 20
"""Each rate is replayed over this many Poisson arrival sequences and the figures averaged: with tens of requests
one sequence's luck (a burst early on) would otherwise move p90 by more than the systems differ."""


@dataclasses.dataclass
class BenchConfig:
    """Everything one run depends on (written into the results)."""

    workloads: list[str]
    out: Path
    quick: bool = False
    systems: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_SYSTEMS))
    large: str = "qwen2.5-coder-1.5b-instruct"
    small: str = "qwen2.5-coder-0.5b-instruct"
    backend: str = "transformers"
    dtype: str = "auto"
    speculative: str = "auto"
    sizes: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    max_tokens: dict[str, int] = dataclasses.field(default_factory=dict)
    seed: int = 0
    rates: tuple[float, ...] = DEFAULT_RATES
    headline_rate: float = HEADLINE_RATE
    semantic_threshold: float = 0.8
    semantic_impl: str = "auto"
    judge: bool = True
    headline: str = ""
    command: str = ""
    use_cache: bool = True
    progress: bool = True
    trace_knobs: dict[str, float] = dataclasses.field(default_factory=dict)
    """Overrides of :func:`workloads.build_trace`'s ``repeat_p``, ``paraphrase_p``, ``zipf_s`` for every workload
    (sweep how much of the traffic resembles earlier traffic)."""
    live: list[str] = dataclasses.field(default_factory=list)
    """Systems also run live (concurrently, wall clock) at the headline rate, to check the replay."""

    def size(self, workload: str) -> tuple[int, int]:
        """(warm-up, eval) requests of ``workload``."""
        if workload in self.sizes:
            return self.sizes[workload]
        return (QUICK_SIZES if self.quick else FULL_SIZES)[workload]

    def tokens(self, workload: str) -> int | None:
        """Answer budget override of ``workload`` (None: the workload's own)."""
        if workload in self.max_tokens:
            return self.max_tokens[workload]
        return QUICK_MAX_TOKENS[workload] if self.quick else None


# ------------------------------------------------------------------------------------------ engines


def _engine_config(model: str, backend: str, dtype: str, speculative: str) -> Any:
    from echo_middleware.config import EngineConfig, SpeculativeOptions

    return EngineConfig(
        backend=backend,  # type: ignore[arg-type]
        model=model,
        dtype=dtype,  # type: ignore[arg-type]
        speculative=SpeculativeOptions(method=speculative),  # type: ignore[arg-type]
        # The benchmark measures how long generations take; on a busy shared CPU a short answer of the 1.5B
        # model has taken over 5 minutes, so the engine's own timeout must not cut measurements short.
        timeout_s=4 * 3600.0,
    )


async def start_engines(config: BenchConfig, speculative: str, label: str) -> EngineSet:
    """Build and start the large and small engine, metered."""
    from echo_middleware.engines import create_engine

    large = create_engine(
        _engine_config(config.large, config.backend, config.dtype, speculative), name=f"large:{config.large}"
    )
    small = create_engine(
        _engine_config(config.small, config.backend, config.dtype, speculative), name=f"small:{config.small}"
    )
    began = time.monotonic()
    await large.start()
    await small.start()
    logger.info("engines %s started in %.0f s", label, time.monotonic() - began)
    return EngineSet(MeteredEngine(large, "large"), MeteredEngine(small, "small"), label=label)


def _speculates(engines: EngineSet) -> bool:
    """Whether either default engine runs speculative decoding (``auto`` leaves it off for transformers on CPU;
    then ``echo-nospec`` is ``echo`` on the same engines and needs no second pair)."""
    return any(
        status.enabled
        for engine in (engines.large.inner, engines.small.inner)
        for key, status in engine.features.items()
        if key.startswith("speculative")
    )


async def close_engines(engines: EngineSet) -> None:
    """Close the wrapped engines (the meters own nothing)."""
    for engine in (engines.large.inner, engines.small.inner):
        await engine.close()


def engine_features(engines: EngineSet) -> dict[str, Any]:
    """What each engine turned on (speculation, KV cache), as the engines report it."""
    return {
        role: {k: v.model_dump() for k, v in engine.inner.features.items()}
        for role, engine in (("large", engines.large), ("small", engines.small))
    }


# ------------------------------------------------------------------------------------------ warm-up


def _cache_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("echo-middleware")) / "bench"


async def warmup_answers(trace: Trace, engines: EngineSet, config: BenchConfig) -> list[tuple[Item, Any]]:
    """The large model's answers to the warm-up history (from the disk cache when the same run was made)."""
    from echo_middleware.types import Generation, Usage

    cache_file = _cache_dir() / f"warmup-{_slug(config.large)}-{config.dtype}.jsonl"
    cached: dict[str, dict[str, Any]] = {}
    if config.use_cache and cache_file.exists():
        for line in cache_file.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                cached[row["key"]] = row
    pairs = []
    bar = tqdm(trace.warmup, desc=f"{trace.workload}: warm-up answers", disable=not config.progress, leave=False)
    for item in bar:
        key = _warm_key(item, config.large)
        row = cached.get(key)
        if row is None:
            try:
                generation = await engines.large.generate(engine_request(item))
            except Exception:  # a missing warm-up pair is a smaller store, not a failed run
                logger.exception("warm-up answer to %s failed; the store goes without it", item.id)
                continue
            row = {
                "key": key,
                "text": generation.text,
                "finish_reason": generation.finish_reason,
                "prompt_tokens": generation.usage.prompt_tokens,
                "completion_tokens": generation.usage.completion_tokens,
            }
            cached[key] = row
            if config.use_cache:  # written at once: an interrupted run keeps what it generated
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                with cache_file.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(row) + "\n")
        pairs.append(
            (
                item,
                Generation(
                    request_id=item.id,
                    text=row["text"],
                    finish_reason=row["finish_reason"],
                    usage=Usage(prompt_tokens=row["prompt_tokens"], completion_tokens=row["completion_tokens"]),
                    engine=engines.large.name,
                    model=config.large,
                ),
            )
        )
    return pairs


def _warm_key(item: Item, model: str) -> str:
    blob = json.dumps([model, item.system, item.prompt, item.max_tokens])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in text)


# ------------------------------------------------------------------------------------------ systems


def make_system(name: str, engines: EngineSet, embedder: Any, config: BenchConfig) -> System:
    """Build one system on ``engines``."""
    if name == "always-large":
        return AlwaysLarge(engines)
    if name == "always-small":
        return AlwaysSmall(engines)
    if name == "semantic-cache":
        return SemanticCache(engines, embedder, config.semantic_threshold, config.semantic_impl)
    if name == "similarity-examples":
        return PipelineSystem(
            engines,
            name,
            # Every retrieved neighbour counts (min_utility 0): examples by similarity alone, nearest first.
            overrides={"rank": {"kind": "similarity", "min_utility": 0.0}},
            offload="always",
            embedder=embedder,
            seed=config.seed,
            description="every request to the small model with the nearest stored examples (no routing)",
        )
    if name == "echo-similarity":
        return PipelineSystem(
            engines,
            name,
            overrides={"rank": {"kind": "similarity"}},
            embedder=embedder,
            seed=config.seed,
            description="echo-middleware pipeline with the similarity-only ranker (same calibrated routing)",
        )
    if name in ("echo", "echo-nospec"):
        return PipelineSystem(
            engines,
            name,
            embedder=embedder,
            seed=config.seed,
            description="echo-middleware pipeline: utility ranking, calibrated routing, learning"
            + (", speculation off" if name == "echo-nospec" else ""),
        )
    raise ValueError(f"system {name!r} is unknown: use one of {', '.join(SYSTEMS)}")


async def run_interleaved(
    systems: dict[str, System], trace: Trace, pairs: Sequence[tuple[Item, Any]], config: BenchConfig
) -> dict[str, list[Outcome]]:
    """Warm every system up, then let all of them answer each eval request back to back.

    Interleaving (rather than one system after the other) spreads whatever else the machine is doing over every
    system alike: a shared machine that gets busier halfway through the run slows all systems, not only the ones
    measured last. The order within a request rotates, so no system always goes first.
    """
    for system in systems.values():
        await system.warm(pairs)
    names = list(systems)
    outcomes: dict[str, list[Outcome]] = {name: [] for name in names}
    bar = tqdm(trace.eval, desc=f"{trace.workload}: {len(names)} systems", disable=not config.progress, leave=False)
    for k, item in enumerate(bar):
        for name in names[k % len(names) :] + names[: k % len(names)]:
            try:
                outcome = await systems[name].answer(item)
            except Exception as exc:  # one failed request is a result, not the end of the run
                logger.exception("%s failed on %s", name, item.id)
                outcome = Outcome(item.id, "", "error", 0.0, error=f"{type(exc).__name__}: {exc}")
            outcomes[name].append(outcome)
    return outcomes


async def run_live(
    system: System, trace: Trace, pairs: Sequence[tuple[Item, Any]], times: Sequence[float], config: BenchConfig
) -> dict[str, Any]:
    """Send the eval stream to a fresh system at its arrival times, concurrently, and time each answer.

    This is the check on the replay: the same arrivals, but real concurrency (the pipeline's schedulers, the
    engine's queue, background learning in whatever idle time there is) and the wall clock.
    """
    await system.warm(pairs)
    loop = asyncio.get_running_loop()
    start = loop.time()
    bar = tqdm(total=len(times), desc=f"{trace.workload}: {system.name} live", disable=not config.progress, leave=False)

    async def one(item: Item, at: float) -> tuple[Outcome, float, float]:
        delay = start + at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        arrived = loop.time()
        try:
            outcome = await system._answer(item)
        except Exception as exc:  # reported, not raised: one failure does not end the run
            outcome = Outcome(item.id, "", "error", 0.0, error=f"{type(exc).__name__}: {exc}")
        bar.update()
        return outcome, arrived - start, loop.time() - start

    done = await asyncio.gather(*(one(item, at) for item, at in zip(trace.eval, times, strict=True)))
    bar.close()
    await system.settle()
    latencies = [finish - arrived for _, arrived, finish in done]
    span = max(finish for *_, finish in done) - min(arrived for _, arrived, _ in done)
    return {
        "n": len(done),
        "errors": sum(1 for o, *_ in done if o.error),
        "throughput_rps": len(done) / span if span > 0 else math.nan,
        "p50_latency_s": percentile(latencies, 50),
        "p90_latency_s": percentile(latencies, 90),
        "offload_rate": sum(1 for o, *_ in done if o.route in ("small", "cache")) / max(1, len(done)),
        "max_lateness_s": max(arrived - at for (_, arrived, _), at in zip(done, times, strict=True)),
    }


# ------------------------------------------------------------------------------------------ scoring


async def score_all(
    traces: dict[str, Trace],
    outcomes: dict[str, dict[str, list[Outcome]]],
    embedder: Any,
    judge: Judge | None,
    config: BenchConfig,
) -> None:
    """Fill ``outcome.scores`` for every system and item (reference-based measures, then the judge)."""
    for workload, trace in traces.items():
        by_id = trace.by_id()
        large = {o.item_id: o.text for o in outcomes[workload].get("always-large", [])}
        jobs = [(name, o) for name, rows in outcomes[workload].items() for o in rows]
        for _, outcome in jobs:
            item = by_id[outcome.item_id]
            outcome.scores.update(score_item(item, outcome.text, large.get(item.id), embedder))
        if judge is None or trace.eval[0].metric != "open":
            continue
        bar = tqdm(jobs, desc=f"{workload}: judging", disable=not config.progress, leave=False)
        for name, outcome in bar:
            item = by_id[outcome.item_id]
            if outcome.error:
                continue
            if PRIMARY[workload] == "judge":
                rating = await judge.rate(item.prompt, outcome.text, item.answers[0] if item.answers else None)
                if rating is not None:
                    outcome.scores["judge"] = rating
            if workload == "traps" and item.twin is not None and item.kind in ("trap", "paraphrase"):
                twin = by_id[item.twin]
                verdict = await judge.fits(item.prompt, twin.prompt, outcome.text, seed=f"{item.id}:{name}")
                if verdict is not None:
                    outcome.scores["fits_twin_only"] = float(verdict == "twin")
                    outcome.scores["fits_own"] = float(verdict in ("own", "both"))


# ------------------------------------------------------------------------------------------ aggregation


def primary_metric(workload: str, judged: bool) -> str:
    """The measure quality retention uses for ``workload``."""
    if not judged and workload in FALLBACK_PRIMARY:
        return FALLBACK_PRIMARY[workload]
    return PRIMARY[workload]


def aggregate(
    trace: Trace, rows: dict[str, list[Outcome]], config: BenchConfig, judged: bool
) -> dict[str, dict[str, Any]]:
    """Per-system figures of one workload: quality (overall and by kind), cost, speed at each rate."""
    from echo_middleware.config import ScheduleConfig

    metric = primary_metric(trace.workload, judged)
    by_id = trace.by_id()
    large_rows = rows.get("always-large")
    if not large_rows:
        raise ValueError("always-large must run: it is the reference for quality retention and arrival rates")
    large_capacity = capacity_rps([o.service_s for o in large_rows])
    large_quality = mean([o.scores.get(metric) for o in large_rows])
    large_by_kind = {
        kind: mean([o.scores.get(metric) for o in large_rows if by_id[o.item_id].kind == kind]) for kind in KINDS
    }
    out: dict[str, dict[str, Any]] = {}
    names = list(rows)
    if "echo" in rows and "echo-fcfs" in config.systems:
        names.append("echo-fcfs")
    for name in names:
        source = rows["echo" if name == "echo-fcfs" else name]
        policy = "sjf" if name in SJF_SYSTEMS else "fcfs"
        quality = mean([o.scores.get(metric) for o in source])
        measures = sorted({k for o in source for k in o.scores})
        entry: dict[str, Any] = {
            "n": len(source),
            "errors": sum(1 for o in source if o.error),
            "policy": policy,
            "quality_metric": metric,
            "quality": quality,
            "quality_retention": retention(quality, large_quality),
            "measures": {k: mean([o.scores.get(k) for o in source]) for k in measures},
            "by_kind": {},
            "offload_rate": sum(1 for o in source if o.route in ("small", "cache")) / max(1, len(source)),
            "cache_hit_rate": sum(1 for o in source if o.route == "cache") / max(1, len(source)),
            "large_tokens_per_request": mean([float(o.large_tokens) for o in source]),
            "large_token_share": _ratio(sum(o.large_tokens for o in source), sum(o.large_tokens for o in large_rows)),
            "mean_service_s": mean([o.service_s for o in source]),
            "background_s_total": sum(o.background_s for o in source),
            "mean_examples": mean([float(o.n_examples) for o in source]),
            "mean_cpu_s": mean([o.cpu_s for o in source]),
            "mean_load1": mean([o.load1 for o in source]),
        }
        # Saturation throughput: requests per second of serving time. The learner's shadow checks and probes run
        # only while an engine is idle (and are dropped past ``learn.max_pending``), so a saturated server does
        # none of them; they are reported beside it, and the capacity as if they were charged in full.
        busy = [o.service_s for o in source]
        entry["capacity_rps"] = capacity_rps(busy)
        entry["capacity_rps_with_learning"] = capacity_rps(busy, extra_s=entry["background_s_total"])
        entry["learning_share"] = _ratio(entry["background_s_total"], sum(busy) + entry["background_s_total"])
        entry["speedup_vs_large"] = _ratio(entry["capacity_rps"], large_capacity)
        entry["speedup_vs_large_with_learning"] = _ratio(entry["capacity_rps_with_learning"], large_capacity)
        # The same from CPU seconds (this process, all threads, divided by the threads a generation uses): less
        # sensitive to other processes on a shared machine; reported beside the wall-clock figure, never instead.
        threads = _threads()
        cpu_busy = sum(o.cpu_s for o in source) / threads
        large_cpu = sum(o.cpu_s for o in large_rows) / threads
        entry["capacity_rps_cpu"] = len(source) / cpu_busy if cpu_busy > 0 else math.nan
        entry["speedup_vs_large_cpu"] = _ratio(
            entry["capacity_rps_cpu"], len(large_rows) / large_cpu if large_cpu else math.nan
        )
        for kind in KINDS:
            subset = [o for o in source if by_id[o.item_id].kind == kind]
            if not subset:
                continue
            kq = mean([o.scores.get(metric) for o in subset])
            entry["by_kind"][kind] = {
                "n": len(subset),
                "quality": kq,
                "quality_retention": retention(kq, large_by_kind[kind]),
                "offload_rate": sum(1 for o in subset if o.route in ("small", "cache")) / len(subset),
                "mean_service_s": mean([o.service_s for o in subset]),
            }
        traps = [o for o in source if by_id[o.item_id].kind == "trap"]
        if traps:
            entry["traps"] = {
                "n": len(traps),
                "false_reuse_rate": mean([o.scores.get("fits_twin_only") for o in traps]),
                "served_stored_answer_rate": sum(1 for o in traps if o.route == "cache") / len(traps),
                "offload_rate": sum(1 for o in traps if o.route in ("small", "cache")) / len(traps),
            }
        entry["load"] = {}
        for multiple in config.rates:
            rate = multiple * large_capacity
            runs = [
                summarize(simulate(_jobs(source, arrivals(len(source), rate, seed=seed)), policy, ScheduleConfig()))
                for seed in range(config.seed, config.seed + REPLAY_SEEDS)
            ]
            entry["load"][f"{multiple:g}"] = {
                "rate_rps": rate,
                "arrival_seeds": REPLAY_SEEDS,
                **{k: mean([r[k] for r in runs]) for k in runs[0]},
            }
        out[name] = entry
    return out


def _jobs(source: Sequence[Outcome], times: Sequence[float]) -> list[Job]:
    """Foreground jobs at their arrival times, plus each request's background work as idle-time jobs."""
    jobs = []
    for outcome, at in zip(source, times, strict=True):
        jobs.append(Job(outcome.item_id, at, outcome.service_s, outcome.predicted_tokens))
        if outcome.background_s > 0:
            jobs.append(Job(f"{outcome.item_id}:bg", at, outcome.background_s, background=True))
    return jobs


def _threads() -> int:
    try:
        import torch

        return max(1, min(torch.get_num_threads(), os.cpu_count() or 1))
    except ImportError:
        return 1


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) and not math.isnan(a) else math.nan


SWEEP_THRESHOLDS = (0.6, 0.7, 0.8, 0.85, 0.9, 0.95)


def semantic_sweep(
    trace: Trace,
    pairs: Sequence[tuple[Item, Any]],
    large_rows: Sequence[Outcome],
    embedder: Any,
    metric: str,
    thresholds: Sequence[float] = SWEEP_THRESHOLDS,
) -> list[dict[str, float]]:
    """The semantic cache at other thresholds, replayed on the same trace without generating anything.

    At each threshold the cache sees the warm-up pairs, then the eval stream in order: a request whose nearest
    cached request (exact cosine over the same embeddings) clears the threshold gets that request's answer; a
    miss gets always-large's measured answer and is cached. Quality uses the same measure as the run for short
    answers and numbers; for open text it is embedding similarity to always-large's answer. On traps every hit
    returns another request's answer, so the hit rate on traps is the false-reuse rate, and the hit rate on the
    paraphrase controls is the rate of right reuse.
    """
    import numpy as np

    from echo_middleware.learn.quality import embedding_cosine

    large = {o.item_id: o.text for o in large_rows}
    texts = [item.prompt for item, _ in pairs] + [item.prompt for item in trace.eval]
    vectors = np.asarray(embedder.embed(texts))
    warm_answers = [g.text for _, g in pairs]
    rows = []
    for threshold in thresholds:
        keys = list(vectors[: len(pairs)])
        answers = list(warm_answers)
        hits: dict[str, list[float]] = {}
        quality = []
        large_quality = []
        for j, item in enumerate(trace.eval):
            vector = vectors[len(pairs) + j]
            best, where = -1.0, -1
            if keys:
                sims = np.asarray(keys) @ vector
                where = int(sims.argmax())
                best = float(sims[where])
            reference = large.get(item.id, "")
            hit = best >= threshold
            text = answers[where] if hit else reference
            if not hit:
                keys.append(vector)
                answers.append(reference)
            hits.setdefault(item.kind, []).append(float(hit))
            hits.setdefault("all", []).append(float(hit))
            if metric in ("f1", "numeric"):
                quality.append(score_item(item, text, None, None)[metric])
                large_quality.append(score_item(item, reference, None, None)[metric])
            else:
                quality.append(embedding_cosine(text, reference, embedder) if text and reference else 0.0)
                large_quality.append(1.0)
        q, lq = mean(quality), mean(large_quality)
        rows.append(
            {
                "threshold": threshold,
                "hit_rate": mean(hits["all"]),
                "quality": q,
                "quality_retention": retention(q, lq),
                **{f"hit_rate_{kind}": mean(v) for kind, v in hits.items() if kind != "all"},
            }
        )
    return rows


# ------------------------------------------------------------------------------------------ the run


def machine() -> str:
    """A one-line description of this machine."""
    cores = os.cpu_count() or 0
    cpu = platform.processor() or platform.machine()
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        threads = torch.get_num_threads()
    except Exception:
        gpu, threads = "no GPU", cores
    return f"{cpu}, {cores} CPU cores (torch threads {threads}), {gpu}, {platform.platform()}"


async def run(config: BenchConfig) -> dict[str, Any]:
    """Run the benchmark and return the results (also written under ``config.out``)."""
    from report import write_all

    from echo_middleware.embed import create_embedder

    began = time.monotonic()
    unknown = [w for w in config.workloads if w not in WORKLOADS]
    if unknown:
        raise ValueError(f"unknown workload(s) {unknown}: use {', '.join(WORKLOADS)}")
    unknown = [s for s in config.systems if s not in SYSTEMS]
    if unknown:
        raise ValueError(f"unknown system(s) {unknown}: use {', '.join(SYSTEMS)}")
    if "always-large" not in config.systems:
        config.systems.insert(0, "always-large")
    traces = {
        w: build_trace(w, *config.size(w), seed=config.seed, max_tokens=config.tokens(w), **config.trace_knobs)
        for w in config.workloads
    }
    for trace in traces.values():
        logger.info("trace %s", describe(trace))
        print(describe(trace), flush=True)
    embedder = create_embedder()
    await asyncio.to_thread(embedder.embed, ["warm the embedder up"])

    outcomes: dict[str, dict[str, list[Outcome]]] = {w: {} for w in traces}
    features: dict[str, Any] = {}
    systems_info: dict[str, Any] = {}
    names = [s for s in config.systems if s != "echo-fcfs"]
    engine_sets: dict[str, EngineSet] = {}
    warm: dict[str, Sequence[tuple[Item, Any]]] = {}
    live: dict[str, dict[str, Any]] = {}
    unknown = [s for s in config.live if s not in SYSTEMS or s == "echo-fcfs"]
    if unknown:
        raise ValueError(f"cannot run {unknown} live: use systems among {', '.join(SYSTEMS)} (not echo-fcfs)")
    judged = False
    judge_stats: dict[str, int] = {}
    try:
        engine_sets["default"] = await start_engines(config, config.speculative, "default")
        if "echo-nospec" in names and _speculates(engine_sets["default"]):
            engine_sets["nospec"] = await start_engines(config, "off", "nospec")
        features = {label: engine_features(engines) for label, engines in engine_sets.items()}
        default = engine_sets["default"]
        for workload, trace in traces.items():
            pairs = await warmup_answers(trace, default, config)
            warm[workload] = pairs
            systems: dict[str, System] = {}
            try:
                for name in names:
                    engines = engine_sets.get("nospec", default) if name == "echo-nospec" else default
                    systems[name] = make_system(name, engines, embedder, config)
                outcomes[workload] = await run_interleaved(systems, trace, pairs, config)
            finally:
                for name, system in systems.items():
                    systems_info[name] = system.describe()
                    await system.close()
            print(f"{workload}: {len(names)} systems done ({time.monotonic() - began:.0f} s)", flush=True)
            if config.live:
                large_capacity = capacity_rps([o.service_s for o in outcomes[workload]["always-large"]])
                rate = config.headline_rate * large_capacity
                times = arrivals(len(trace.eval), rate, seed=config.seed)
                live[workload] = {}
                for name in config.live:
                    engines = engine_sets.get("nospec", default) if name == "echo-nospec" else default
                    system = make_system(name, engines, embedder, config)
                    try:
                        live[workload][name] = {"rate_rps": rate, **await run_live(system, trace, pairs, times, config)}
                    finally:
                        await system.close()
                    print(f"{workload}: {name} live done ({time.monotonic() - began:.0f} s)", flush=True)
        judge = None
        if config.judge and any(t.eval[0].metric == "open" for t in traces.values()):
            from echo_middleware.models import model_path

            judge = Judge(default.large, model_path(config.large))
        await score_all(traces, outcomes, embedder, judge, config)
        if judge is not None:
            judged = True
            judge_stats = dataclasses.asdict(judge.stats)
    finally:
        for engines in engine_sets.values():
            await close_engines(engines)

    results: dict[str, Any] = {
        "command": config.command,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "wall_s": None,
        "config": _config_json(config),
        "engines": features,
        "systems": systems_info,
        "judge": {"model": config.large if judged else None, **judge_stats},
        "workloads": {},
    }
    for workload, trace in traces.items():
        results["workloads"][workload] = {
            "trace": {"description": describe(trace), **trace.params, "kinds": trace.kinds()},
            "primary_metric": primary_metric(workload, judged),
            "systems": aggregate(trace, outcomes[workload], config, judged),
        }
        if workload in live:
            block = results["workloads"][workload]
            for name, row in live[workload].items():
                # The replay of exactly the arrivals sent live (not the average over arrival sequences).
                source = outcomes[workload].get(name)
                if source:
                    policy = "sjf" if name in SJF_SYSTEMS else "fcfs"
                    times = arrivals(len(source), row["rate_rps"], seed=config.seed)
                    replayed = summarize(simulate(_jobs(source, times), policy))
                    row["replayed"] = {k: replayed[k] for k in ("throughput_rps", "p50_latency_s", "p90_latency_s")}
            block["live"] = live[workload]
        if "semantic-cache" in config.systems:
            metric = primary_metric(workload, judged)
            results["workloads"][workload]["semantic_sweep"] = semantic_sweep(
                trace, warm[workload], outcomes[workload]["always-large"], embedder, metric
            )
    results["wall_s"] = time.monotonic() - began
    write_all(results, traces, outcomes, config)
    return results


def _config_json(config: BenchConfig) -> dict[str, Any]:
    data = dataclasses.asdict(config)
    data["out"] = str(config.out)
    data["sizes"] = {w: list(config.size(w)) for w in config.workloads}
    data["max_tokens"] = {w: config.tokens(w) for w in config.workloads}
    return data


def command_line(argv: Sequence[str] | None) -> str:
    """The command as typed (for the results)."""
    args = list(sys.argv if argv is None else ["echo-middleware", "bench", *argv])
    return " ".join(shlex.quote(a) for a in args)
