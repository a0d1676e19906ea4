"""EchoLM in one run: utility-ranked vs similarity-only examples against always-large, on real questions.

Workload (``benchmarks/data``, licences beside each file): EntityQuestions paraphrase pairs (MIT) and NQ-open
(CC BY-SA 3.0), entity pairs with ``index % 4 != 0`` (the ranker was trained on the others). A **warm-up** of
first wordings is answered by the large model and stored in each arm's example store; then an **eval** stream
mixes second wordings of warmed-up questions (paraphrase), verbatim repeats, fresh questions of the same relation
templates (another entity: similar wording, another answer) and fresh NQ questions. Every eval request is scored
against its gold answers (an alias inside the answer) and against the always-large answer (agreement).

Arms, each answering every eval request, interleaved request by request so the machine's load hits all alike:

- ``always-large``: the large model answers everything (the reference);
- ``echo-utility``: :class:`EchoPipeline` as shipped: the learned utility ranker, calibrated routing;
- ``echo-similarity``: the same pipeline with ``rank.kind="similarity"`` (nearest examples first, similarity
  mapped to a probability and calibrated the same way).

Both echo arms store the large answers they produce during eval (learning is on); shadow checks and probes are
off so that background work does not blur the latency comparison (they are exercised in the tests). Requests run
one at a time (the transformers engine serves one generation at a time), so throughput is requests per second of
busy time, and the throughput ratio is always-large's total time over the arm's.

Run::

    .venv/bin/python benchmarks/echo_bench.py                       # Qwen2.5-Coder 0.5B small, 1.5B large
    .venv/bin/python benchmarks/echo_bench.py --quick               # a few requests, smoke test
    .venv/bin/python benchmarks/echo_bench.py --small smollm2-135m-instruct --large qwen2.5-coder-0.5b-instruct

Results: ``benchmarks/results/echo.json`` and ``benchmarks/results/echo.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_ranker import QA_SYSTEM, Generator  # noqa: E402

from echo_middleware.config import EngineConfig  # noqa: E402
from echo_middleware.learn.quality import agreement, gold_score  # noqa: E402
from echo_middleware.types import EchoRequest, EngineRequest, Generation, Message, SamplingParams, Usage  # noqa: E402

logger = logging.getLogger("echo_bench")
DATA = ROOT / "benchmarks" / "data"
RESULTS = ROOT / "benchmarks" / "results"
ARMS = ("always-large", "echo-utility", "echo-similarity")


@dataclass(frozen=True)
class Item:
    """One request of the trace."""

    id: str
    text: str
    answers: tuple[str, ...]
    kind: str  # warmup | paraphrase | repeat | fresh-template | fresh-open


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def build_trace(seed: int, warmup: int, evals: int) -> tuple[list[Item], list[Item]]:
    """Warm-up and eval items (eval mix: 50% paraphrase, 15% repeat, 25% fresh template, 10% fresh open)."""
    rng = random.Random(seed)
    pairs = [r for i, r in enumerate(_jsonl(DATA / "entityquestions" / "paraphrase_pairs_dev.jsonl")) if i % 4]
    nq = [r for i, r in enumerate(_jsonl(DATA / "nq_open" / "NQ-open.dev.jsonl")) if i % 4]
    rng.shuffle(pairs)
    rng.shuffle(nq)
    warm = [Item(f"w{i}", r["question"], tuple(r["answers"]), "warmup") for i, r in enumerate(pairs[:warmup])]
    n_para = round(evals * 0.5)
    n_repeat = round(evals * 0.15)
    n_open = round(evals * 0.10)
    n_fresh = evals - n_para - n_repeat - n_open
    eval_items: list[Item] = []
    for i in rng.sample(range(warmup), min(n_para, warmup)):
        r = pairs[i]
        eval_items.append(Item(f"p{i}", r["paraphrase"], tuple(r["answers_paraphrase"] or r["answers"]), "paraphrase"))
    for i in rng.sample(range(warmup), min(n_repeat, warmup)):
        eval_items.append(Item(f"r{i}", warm[i].text, warm[i].answers, "repeat"))
    fresh = pairs[warmup : warmup + n_fresh]
    eval_items += [Item(f"f{i}", r["question"], tuple(r["answers"]), "fresh-template") for i, r in enumerate(fresh)]
    eval_items += [Item(f"o{i}", r["question"], tuple(r["answer"]), "fresh-open") for i, r in enumerate(nq[:n_open])]
    rng.shuffle(eval_items)
    return warm, eval_items


def messages(item: Item) -> list[Message]:
    return [Message(role="system", content=QA_SYSTEM), Message(role="user", content=item.text)]


@dataclass
class Answer:
    """One arm's answer to one eval item."""

    arm: str
    item: str
    kind: str
    text: str
    seconds: float
    offloaded: bool
    gold: float
    agreement_with_large: float = 1.0
    predicted_quality: float | None = None
    threshold: float | None = None
    examples: int = 0
    reason: str = ""
    stage_s: dict[str, float] = field(default_factory=dict)


def _p(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarise(answers: Sequence[Answer], target: float) -> dict[str, Any]:
    by_arm: dict[str, list[Answer]] = defaultdict(list)
    for a in answers:
        by_arm[a.arm].append(a)
    base = by_arm["always-large"]
    base_gold = statistics.fmean(a.gold for a in base)
    base_time = sum(a.seconds for a in base)
    out: dict[str, Any] = {}
    for arm, rows in by_arm.items():
        gold = statistics.fmean(a.gold for a in rows)
        total = sum(a.seconds for a in rows)
        lat = [a.seconds for a in rows]
        kinds: dict[str, Any] = {}
        for kind in sorted({a.kind for a in rows}):
            sub = [a for a in rows if a.kind == kind]
            base_sub = [a for a in base if a.kind == kind]
            base_kind_gold = statistics.fmean(a.gold for a in base_sub)
            kinds[kind] = {
                "n": len(sub),
                "offload_rate": statistics.fmean(a.offloaded for a in sub),
                "gold_accuracy": statistics.fmean(a.gold for a in sub),
                "gold_retention": (statistics.fmean(a.gold for a in sub) / base_kind_gold) if base_kind_gold else None,
                "agreement_with_large": statistics.fmean(a.agreement_with_large for a in sub),
                "mean_latency_s": statistics.fmean(a.seconds for a in sub),
            }
        out[arm] = {
            "n": len(rows),
            "offload_rate": statistics.fmean(a.offloaded for a in rows),
            "gold_accuracy": gold,
            "gold_retention": gold / base_gold if base_gold else None,
            "agreement_with_large": statistics.fmean(a.agreement_with_large for a in rows),
            "meets_target": (gold / base_gold >= target) if base_gold else None,
            "latency_mean_s": statistics.fmean(lat),
            "latency_p50_s": _p(lat, 0.5),
            "latency_p90_s": _p(lat, 0.9),
            "latency_ratio_mean": statistics.fmean(lat) / statistics.fmean(a.seconds for a in base),
            "latency_ratio_p50": _p(lat, 0.5) / _p([a.seconds for a in base], 0.5),
            "throughput_rps": len(rows) / total,
            "throughput_ratio": base_time / total,
            "by_kind": kinds,
        }
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from echo_middleware.embed import create_embedder
    from echo_middleware.engines.transformers import TransformersEngine
    from echo_middleware.pipeline import EchoPipeline

    warm, evals = build_trace(args.seed, args.warmup, args.evals)
    logger.info(
        "trace: %d warm-up, %d eval (%s)",
        len(warm),
        len(evals),
        {k: sum(1 for i in evals if i.kind == k) for k in sorted({i.kind for i in evals})},
    )

    # Warm-up answers (not measured): batched greedy generation by the large model, cached on disk.
    warm_gen = Generator(args.large, args.cache, batch_size=8, max_tokens=args.max_tokens, dtype=args.dtype)
    warm_answers = warm_gen.generate([messages(i) for i in warm], "warm-up answers")
    warm_gen._lm = None

    def engine_config(model: str) -> EngineConfig:
        return EngineConfig(
            backend="transformers",
            model=model,
            dtype=args.dtype,
            speculative={"method": "off"},
            kv_cache_dtype="auto",
            max_model_len=4096,
        )

    large = TransformersEngine(engine_config(args.large), name=f"large:{args.large}")
    small = TransformersEngine(engine_config(args.small), name=f"small:{args.small}")
    embedder = create_embedder()
    began = time.monotonic()
    await large.start()  # one after the other: transformers' loading is not thread-safe
    await small.start()
    logger.info("engines started in %.0f s", time.monotonic() - began)

    tmp = tempfile.TemporaryDirectory(prefix="echo-bench-")
    pipelines: dict[str, EchoPipeline] = {}
    for arm, kind in (("echo-utility", "utility"), ("echo-similarity", "similarity")):
        pipelines[arm] = EchoPipeline.from_defaults(
            large=large,
            small=small,
            embedder=embedder,
            seed=args.seed,
            store={"path": Path(tmp.name) / arm},
            rank={"kind": kind},
            route={"target_retention": args.target},
            learn={"shadow_rate": 0.0, "probe_rate": 0.0},
        )
    for arm, pipe in pipelines.items():
        await pipe.start()
        if pipe.learner is None:
            raise RuntimeError(f"{arm}: the pipeline started without a learner (store unavailable?)")
        for item, text in zip(warm, warm_answers, strict=True):
            request = EchoRequest(
                messages=messages(item), params=SamplingParams(max_tokens=args.max_tokens), offload="never"
            )
            generation = Generation(
                request_id=request.request_id,
                text=text,
                finish_reason="stop",
                usage=Usage(),
                engine=large.name,
                model=large.model,
            )
            await pipe.learner.store_answer(pipe.settings.tenant, request, generation)
        logger.info(
            "%s: %d examples stored; threshold %s",
            arm,
            await pipe.store.count(pipe.settings.tenant),
            pipe.policy.threshold(),
        )

    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    answers: list[Answer] = []
    large_text: dict[str, str] = {}
    for item in tqdm(evals, desc="eval (3 arms per request)", unit="req"):
        t0 = time.monotonic()
        gen = await large.generate(EngineRequest(messages=messages(item), params=params))
        seconds = time.monotonic() - t0
        large_text[item.id] = gen.text
        answers.append(
            Answer("always-large", item.id, item.kind, gen.text, seconds, False, gold_score(gen.text, item.answers))
        )
        for arm, pipe in pipelines.items():
            t0 = time.monotonic()
            result = await pipe.agenerate(EchoRequest(messages=messages(item), params=params))
            seconds = time.monotonic() - t0
            d = result.decision
            answers.append(
                Answer(
                    arm,
                    item.id,
                    item.kind,
                    result.text,
                    seconds,
                    d.offloaded,
                    gold_score(result.text, item.answers),
                    agreement(result.text, gen.text, question=item.text),
                    d.predicted_quality,
                    d.threshold,
                    len(d.examples),
                    d.reason,
                    d.stage_s,
                )
            )
    for pipe in pipelines.values():
        await pipe.close()
    await large.close()
    await small.close()
    tmp.cleanup()
    summary = summarise(answers, args.target)
    return {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "loadavg_end": os.getloadavg()},
        "models": {"small": args.small, "large": args.large, "engine": "transformers", "dtype": args.dtype},
        "trace": {
            "warmup": len(warm),
            "eval": len(evals),
            "kinds": {k: sum(1 for i in evals if i.kind == k) for k in sorted({i.kind for i in evals})},
        },
        "summary": summary,
        "ranker_latency": ranker_latency(),
        "answers": [asdict(a) for a in answers],
    }


def ranker_latency(k: int = 20, repeats: int = 200) -> dict[str, float]:
    """Milliseconds to featurise and score ``k`` candidates with the shipped utility ranker (median, p90)."""
    from echo_middleware.rank import RankQuery, UtilityRanker
    from echo_middleware.types import Candidate, Example

    pairs = list(_jsonl(DATA / "entityquestions" / "paraphrase_pairs_dev.jsonl"))[: k + 1]
    query = RankQuery(pairs[0]["paraphrase"])
    candidates = [
        Candidate(example=Example(request=r["question"], response=r["answers"][0]), distance=0.1 + 0.01 * i)
        for i, r in enumerate(pairs[1:])
    ]
    ranker = UtilityRanker()
    ranker.rank(query, candidates)  # load the weights
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ranker.rank(query, candidates)
        times.append((time.perf_counter() - t0) * 1000)
    return {"k": k, "median_ms": _p(times, 0.5), "p90_ms": _p(times, 0.9)}


def _f(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [
        "# EchoLM benchmark: utility-ranked vs similarity-only examples against always-large",
        "",
        f"Small `{result['models']['small']}`, large `{result['models']['large']}` on the transformers engine "
        f"({result['models']['dtype']}), {result['machine']['cpus']} CPUs (load average at the end "
        f"{result['machine']['loadavg_end'][0]:.1f}). Trace: {result['trace']['warmup']} warm-up, "
        f"{result['trace']['eval']} eval requests {result['trace']['kinds']}. Target retention "
        f"{result['args']['target']:.0%}. Command: `.venv/bin/python benchmarks/echo_bench.py "
        f"--warmup {result['args']['warmup']} --evals {result['args']['evals']} --small {result['models']['small']} "
        f"--large {result['models']['large']}`.",
        "",
        "| arm | offload rate | gold accuracy | quality retention (gold) | agreement with always-large | "
        "latency p50 (s) | latency ratio (mean) | throughput ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        a = s[arm]
        lines.append(
            f"| {arm} | {a['offload_rate']:.0%} | {a['gold_accuracy']:.3f} | {_f(a['gold_retention'], '.3f')} | "
            f"{a['agreement_with_large']:.3f} | {a['latency_p50_s']:.2f} | {a['latency_ratio_mean']:.2f} | "
            f"{a['throughput_ratio']:.2f}x |"
        )
    lines += [
        "",
        "By kind (offload rate / gold accuracy / agreement with always-large):",
        "",
        "| kind | " + " | ".join(ARMS) + " |",
        "|---|" + "---|" * len(ARMS),
    ]
    kinds = sorted(s["always-large"]["by_kind"])
    for kind in kinds:
        cells = []
        for arm in ARMS:
            k = s[arm]["by_kind"][kind]
            cells.append(f"{k['offload_rate']:.0%} / {k['gold_accuracy']:.2f} / {k['agreement_with_large']:.2f}")
        lines.append(f"| {kind} (n={s['always-large']['by_kind'][kind]['n']}) | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--large", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--warmup", type=int, default=120)
    parser.add_argument("--evals", type=int, default=120)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--target", type=float, default=0.97, help="route.target_retention")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="12 warm-up and 8 eval requests; writes *_quick files")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "echo-middleware" / "echo_bench.jsonl")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.quick:
        args.warmup, args.evals = 12, 8
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    args.cache.parent.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    result = asyncio.run(run(args))
    result["seconds"] = round(time.monotonic() - began, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "echo_quick" if args.quick else "echo"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
