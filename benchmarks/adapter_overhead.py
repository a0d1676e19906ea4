"""Per-call overhead of the framework adapters: EchoChatModel / LlamaIndex EchoLLM vs calling the pipeline directly.

The same real pipeline serves both sides (SmolLM2-135M as small and large, transformers engine), with the work
per call made as small as it can be so that the adapter's share shows: ``offload="never"`` (no retrieval or
ranking), one new token, learning off (no store write). Calls alternate between the two sides so that drift in
machine load hits both equally; the table reports the median and p90 of N calls each and the median difference.

Run: ``python benchmarks/adapter_overhead.py -n 50``; writes ``benchmarks/results/adapter_overhead.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from echo_middleware.integrations.langchain import EchoChatModel
from echo_middleware.integrations.llama_index import EchoLLM
from echo_middleware.pipeline import EchoPipeline
from echo_middleware.types import EchoRequest, Message, SamplingParams

TINY = {"backend": "transformers", "model": "smollm2-135m-instruct"}
RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "Hi"


def _request() -> EchoRequest:
    return EchoRequest(
        messages=[Message(role="user", content=PROMPT)], offload="never", params=SamplingParams(max_tokens=1)
    )


def _time_sync(fn: Callable[[], Any]) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


async def _time_async(fn: Callable[[], Awaitable[Any]]) -> float:
    began = time.perf_counter()
    await fn()
    return time.perf_counter() - began


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": statistics.median(ordered) * 1e3,
        "p90_ms": ordered[int(0.9 * (len(ordered) - 1))] * 1e3,
        "n": len(ordered),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=50, help="calls per side and pair")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--json", type=Path, default=RESULTS / "adapter_overhead.json", help="results file (.md beside)"
    )
    args = parser.parse_args()

    pipeline = EchoPipeline.from_defaults(
        large=TINY,
        small=TINY,
        store={"path": tempfile.mkdtemp(prefix="echo-overhead-")},
        learn={"store_large_answers": False},
    )
    chat = EchoChatModel(pipeline=pipeline, max_tokens=1, offload="never")
    llama = EchoLLM(pipeline=pipeline, max_tokens=1, offload="never")
    pipeline.start_sync()

    sync_pairs: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
        "LangChain invoke vs pipeline.generate": (lambda: chat.invoke(PROMPT), lambda: pipeline.generate(_request())),
        "LangChain stream vs pipeline.stream": (
            lambda: list(chat.stream(PROMPT)),
            lambda: list(pipeline.stream(_request())),
        ),
        "LlamaIndex complete vs pipeline.generate": (
            lambda: llama.complete(PROMPT),
            lambda: pipeline.generate(_request()),
        ),
    }
    async_pairs: dict[str, tuple[Callable[[], Awaitable[Any]], Callable[[], Awaitable[Any]]]] = {
        "LangChain ainvoke vs pipeline.agenerate": (
            lambda: chat.ainvoke(PROMPT),
            lambda: pipeline.agenerate(_request()),
        ),
        "LlamaIndex acomplete vs pipeline.agenerate": (
            lambda: llama.acomplete(PROMPT),
            lambda: pipeline.agenerate(_request()),
        ),
    }

    results: dict[str, dict[str, Any]] = {}
    for name, (adapter, direct) in sync_pairs.items():
        for _ in range(args.warmup):
            adapter()
            direct()
        a: list[float] = []
        d: list[float] = []
        for _ in tqdm(range(args.n), desc=name, leave=False):
            a.append(_time_sync(adapter))
            d.append(_time_sync(direct))
        results[name] = {"adapter": _summary(a), "direct": _summary(d)}

    async def run_async() -> None:
        for name, (adapter, direct) in async_pairs.items():
            for _ in range(args.warmup):
                await adapter()
                await direct()
            a: list[float] = []
            d: list[float] = []
            for _ in tqdm(range(args.n), desc=name, leave=False):
                a.append(await _time_async(adapter))
                d.append(await _time_async(direct))
            results[name] = {"adapter": _summary(a), "direct": _summary(d)}

    asyncio.run(run_async())
    pipeline.close_sync()

    title = f"per-call time, median and p90 of {args.n} calls each (SmolLM2-135M, offload=never, 1 token, no learning)"
    lines = [
        "# Adapter overhead: framework adapter vs the pipeline called directly",
        "",
        f"{title}. Machine: {os.cpu_count()} CPUs, {platform.platform()}. "
        f"Command: `python benchmarks/adapter_overhead.py -n {args.n}`.",
        "",
        "| pair | adapter median ms | direct median ms | overhead ms | adapter p90 ms | direct p90 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in results.items():
        a, d = row["adapter"], row["direct"]
        row["overhead_median_ms"] = a["median_ms"] - d["median_ms"]
        lines.append(
            f"| {name} | {a['median_ms']:.1f} | {d['median_ms']:.1f} | {row['overhead_median_ms']:+.1f} "
            f"| {a['p90_ms']:.1f} | {d['p90_ms']:.1f} |"
        )
    print("\n".join(lines))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    args.json.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
