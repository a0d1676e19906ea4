"""Tokens/s of the three engines (vLLM in-process, OpenAI API -> vllm serve, transformers), speculation on vs off.

Run (about 30 minutes on 2 CPU cores with the default Qwen2.5-Coder-0.5B)::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/engine_speed.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/engine_speed.py --model smollm2-135m-instruct --runs 1  # quick

What is measured, the same way for every engine, through the :class:`~echo_middleware.engines.base.Engine`
protocol (so tokenisation, streaming and detokenisation are in the numbers):

- 8 chat prompts, greedy, ``--max-tokens`` new tokens each. Four are ``copy`` prompts whose answers copy text from
  the prompt (in-context examples, a rewrite, code to annotate, JSON to YAML): what n-gram prompt lookup can
  draft from. Four are ``free`` prompts (a story, an explanation, new code, a list) where it finds little.
- One run sends the four ``copy`` prompts at once, waits for all, then the four ``free`` ones: an engine that
  batches (vLLM) decodes them together, the transformers engine queues them and decodes one at a time (that is
  what it does in production too). tokens/s = completion tokens / wall time of the group (prefill included).
- One warm-up run (shorter answers) is not counted; the median of ``--runs`` runs is reported.
- Speculation is n-gram prompt lookup (4 tokens per step, n-grams of 1-4 tokens) vs off; greedy output must not
  change, and each row says for how many prompts the text equals the ``off`` text.

Each engine runs alone (vLLM engines are started and shut down one after another). Writes
``benchmarks/results/engine_speed.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from tqdm.auto import tqdm

from echo_middleware.config import EngineConfig
from echo_middleware.engines.base import Engine
from echo_middleware.errors import ModelNotFound
from echo_middleware.models import model_path
from echo_middleware.types import EngineRequest, Generation, Message, SamplingParams

RESULTS = Path(__file__).parent / "results"
ENGINES = ("vllm", "openai", "transformers")
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}
"""The same n-gram prompt lookup for every engine."""

_EXAMPLES = (
    "Answered questions from our help desk:\n\n"
    "Q: How do I reverse a list in Python?\n"
    "A: Use slicing, `items[::-1]`, to get a reversed copy, or call `items.reverse()` to reverse the list in place. "
    "Slicing leaves the original list unchanged; `reverse()` returns None.\n\n"
    "Q: How do I remove duplicates from a list but keep the order?\n"
    "A: Use `list(dict.fromkeys(items))`. Dictionaries keep insertion order since Python 3.7, so the first "
    "occurrence of every item stays where it was.\n\n"
    "Q: How do I read a file line by line?\n"
    "A: Open it in a `with` block and iterate over the file object: `with open(path) as f: for line in f: ...`. "
    "Each line keeps its trailing newline; strip it with `line.rstrip('\\n')`.\n\n"
)
_CHECKLIST = (
    "The deployment checklist has four steps. First, run the database migrations on a staging copy and compare "
    "the row counts. Second, build the container image with the release tag and push it to the registry. Third, "
    "roll the new image out to one canary instance and watch its error rate for ten minutes. Fourth, roll it out "
    "to the remaining instances in batches of five, pausing between batches."
)
_CODE = """def moving_average(values, window):
    if window <= 0:
        raise ValueError("window must be positive")
    averages = []
    total = 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        if index >= window - 1:
            averages.append(total / window)
    return averages"""
_JSON = (
    '{"service": "billing", "replicas": 3, "image": "registry.local/billing:2.4.1", '
    '"env": {"DATABASE_URL": "postgres://billing@db/billing", "LOG_LEVEL": "info"}, '
    '"ports": [8080, 9090], "healthcheck": {"path": "/healthz", "interval_s": 10}}'
)
PROMPTS: dict[str, list[str]] = {
    "copy": [
        _EXAMPLES + "Using the answers above, answer this question: How do I remove duplicates from a list but keep "
        "the order?",
        f"Here is a checklist:\n\n{_CHECKLIST}\n\nRewrite the checklist above as a numbered list, keeping every "
        "sentence word for word.",
        f"Add type hints to this function and return the whole function:\n\n```python\n{_CODE}\n```",
        f"Convert this JSON to YAML:\n\n{_JSON}",
    ],
    "free": [
        "Write a short story about a lighthouse keeper who finds a message in a bottle.",
        "Explain to a ten-year-old why the sky is blue.",
        "Write a Python function that checks whether a string is a palindrome, with a docstring and tests.",
        "Give five tips for preparing for a job interview.",
    ],
}


def _requests(max_tokens: int, tag: str) -> dict[str, list[EngineRequest]]:
    return {
        group: [
            EngineRequest(
                request_id=f"{tag}-{group}-{i}",
                messages=[Message(role="user", content=text)],
                params=SamplingParams(max_tokens=max_tokens),
            )
            for i, text in enumerate(texts)
        ]
        for group, texts in PROMPTS.items()
    }


async def _run_group(engine: Engine, requests: Sequence[EngineRequest]) -> tuple[list[Generation], float]:
    began = time.perf_counter()
    results = await asyncio.gather(*(engine.generate(r) for r in requests))
    return list(results), time.perf_counter() - began


async def _measure(engine: Engine, *, max_tokens: int, runs: int, bar: Any) -> dict[str, Any]:
    """Warm-up, then ``runs`` runs of (copy group, free group); medians of tokens/s."""
    for group in _requests(min(16, max_tokens), "warm").values():
        await _run_group(engine, group)
    per_run: list[dict[str, Any]] = []
    texts: dict[str, str] = {}
    for run in range(runs):
        record: dict[str, Any] = {}
        for group, requests in _requests(max_tokens, f"run{run}").items():
            results, wall = await _run_group(engine, requests)
            tokens = sum(r.usage.completion_tokens for r in results)
            record[group] = {
                "tokens": tokens,
                "wall_s": wall,
                "tok_s": tokens / wall,
                "ttft_s": statistics.median(r.timings.ttft_s or 0.0 for r in results),
                "latency_s": statistics.mean(r.timings.total_s for r in results),
            }
            if run == 0:
                texts.update({f"{group}-{i}": r.text for i, r in enumerate(results)})
            bar.update(1)
        record["all"] = {
            "tokens": record["copy"]["tokens"] + record["free"]["tokens"],
            "wall_s": record["copy"]["wall_s"] + record["free"]["wall_s"],
        }
        record["all"]["tok_s"] = record["all"]["tokens"] / record["all"]["wall_s"]
        per_run.append(record)
        with contextlib.suppress(Exception):
            record["loadavg"] = os.getloadavg()[0]
    summary = {
        group: {
            "tok_s": statistics.median(r[group]["tok_s"] for r in per_run),
            "tok_s_runs": [round(r[group]["tok_s"], 2) for r in per_run],
            "tokens": per_run[0][group]["tokens"],
        }
        for group in ("copy", "free", "all")
    }
    for group in ("copy", "free"):
        summary[group]["ttft_s"] = statistics.median(r[group]["ttft_s"] for r in per_run)
        summary[group]["latency_s"] = statistics.median(r[group]["latency_s"] for r in per_run)
    return {"summary": summary, "runs": per_run, "texts": texts}


# ------------------------------------------------------------------------------------ engines


def _config(backend: str, model: str, speculative: str, **extra: Any) -> EngineConfig:
    spec: dict[str, Any] = dict(NGRAM) if speculative == "ngram" else {"method": "off"}
    return EngineConfig(
        backend=backend,  # type: ignore[arg-type]
        model=model,
        speculative=spec,  # type: ignore[arg-type]
        kv_cache_dtype="auto",
        max_num_seqs=8,
        max_model_len=4096,
        start_timeout_s=900,
        timeout_s=900,  # a shared, loaded machine can stall a step for minutes (memory pressure)
        **extra,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _libiomp() -> str | None:
    candidate = Path(sys.prefix) / "lib" / "libiomp5.so"
    return str(candidate) if candidate.is_file() else None


@contextlib.asynccontextmanager
async def vllm_server(model: str, speculative: str, log: Path) -> AsyncIterator[str]:
    """A ``python -m vllm.entrypoints.openai.api_server`` for ``model`` (CPU settings as in docs/engines.md)."""
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_path(model)),
        "--served-model-name",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enforce-eager",
        "--dtype",
        "float32",
        "--max-model-len",
        "4096",
        "--max-num-seqs",
        "8",
        "--kv-cache-memory-bytes",
        str(2 * 2**30),
        "--scheduling-policy",
        "priority",
    ]
    if speculative == "ngram":
        command += [
            "--speculative-config",
            json.dumps(
                {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}
            ),
        ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if (lib := _libiomp()) is not None and "libiomp" not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = f"{lib}:{env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else lib
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            *command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 900
        async with httpx.AsyncClient() as client:
            while True:
                if process.returncode is not None:
                    raise RuntimeError(f"vLLM server exited with {process.returncode}; see {log}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"http://127.0.0.1:{port}/health", timeout=2)).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"vLLM server not healthy after 900 s; see {log}")
                await asyncio.sleep(2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout=30)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await asyncio.wait_for(process.wait(), timeout=10)


async def bench_engine(
    backend: str, model: str, speculative: str, *, max_tokens: int, runs: int, bar: Any, logs: Path
) -> dict[str, Any]:
    """Start one engine, measure it, shut it down; one result row."""
    began = time.perf_counter()
    row: dict[str, Any] = {"engine": backend, "speculative": speculative, "model": model}
    if backend == "openai":
        from echo_middleware.engines.openai import OpenAIEngine

        async with vllm_server(model, speculative, logs / f"vllm-serve-{speculative}.log") as base_url:
            engine: Engine = OpenAIEngine(_config("openai", model, speculative, base_url=base_url))
            async with engine:
                row["start_s"] = time.perf_counter() - began
                row.update(await _measure(engine, max_tokens=max_tokens, runs=runs, bar=bar))
                row["features"] = {k: v.model_dump() for k, v in engine.features.items()}
        row["settings"] = "vllm serve --enforce-eager --dtype float32 (+ libiomp5 LD_PRELOAD)"
        return row
    if backend == "vllm":
        from echo_middleware.engines.vllm import VLLMEngine

        engine = VLLMEngine(_config("vllm", model, speculative))
    else:
        from echo_middleware.engines.transformers import TransformersEngine

        # One torch thread, as vLLM's worker binds one core: OpenMP threads on shared, busy cores slow it ~10x.
        engine = TransformersEngine(_config("transformers", model, speculative, cpu_threads=1))
    async with engine:
        row["start_s"] = time.perf_counter() - began
        row.update(await _measure(engine, max_tokens=max_tokens, runs=runs, bar=bar))
        row["features"] = {k: v.model_dump() for k, v in engine.features.items()}
        if backend == "vllm":
            stats = engine.stats  # type: ignore[attr-defined]
            row["spec_acceptance_rate"] = stats.spec_acceptance_rate
            row["prefix_cache_hit_rate"] = stats.prefix_cache_hit_rate
            row["settings"] = (
                f"AsyncLLM {engine.engine_args['dtype']}, enforce_eager={engine.engine_args['enforce_eager']}"  # type: ignore[attr-defined]
            )
        else:
            dtype, device = engine._dtype_name, engine._device  # type: ignore[attr-defined]
            row["settings"] = f"transformers {dtype} on {device}, batch size 1, 1 torch thread"
    return row


# ------------------------------------------------------------------------------------ report


def compare_texts(rows: list[dict[str, Any]]) -> None:
    """For each speculating row, on how many prompts greedy output equals the same engine's ``off`` output."""
    off = {r["engine"]: r["texts"] for r in rows if r["speculative"] == "off" and "texts" in r}
    for row in rows:
        ref = off.get(row["engine"])
        if row["speculative"] == "off" or ref is None or "texts" not in row:
            continue
        same = sum(row["texts"].get(k) == v for k, v in ref.items())
        row["same_text_as_off"] = f"{same}/{len(ref)}"


def markdown(record: dict[str, Any]) -> str:
    rows = record["rows"]
    lines = [
        "# Engine speed: tokens/s, speculation off vs n-gram",
        "",
        f"Model `{record['model']}`, {record['max_tokens']} new tokens, greedy, median of {record['runs']} runs "
        f"(after a warm-up). Machine: {record['machine']['cpus']} CPUs, {record['machine']['platform']}. "
        f"Command: `{record['command']}`. Wall time {record['wall_s'] / 60:.1f} min.",
        "",
        "Each run: 4 `copy` prompts at once (answers copy the prompt: in-context examples, a rewrite, code, "
        "JSON to YAML), then 4 `free` prompts at once. tokens/s = completion tokens / wall time of the group.",
        "",
        "| engine | speculative | all tok/s | copy tok/s | free tok/s | copy TTFT s | free TTFT s | start s | "
        "same text as off | acceptance |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['engine']} | {row['speculative']} | error: {row['error']} |||||||")
            continue
        s = row["summary"]
        acceptance = row.get("spec_acceptance_rate")
        lines.append(
            f"| {row['engine']} | {row['speculative']} | {s['all']['tok_s']:.1f} | {s['copy']['tok_s']:.1f} | "
            f"{s['free']['tok_s']:.1f} | {s['copy']['ttft_s']:.2f} | {s['free']['ttft_s']:.2f} | "
            f"{row['start_s']:.0f} | {row.get('same_text_as_off', '-')} | "
            f"{'-' if acceptance is None else f'{acceptance:.0%}'} |"
        )
    lines += ["", "Per-run tokens/s (all prompts), with the machine's 1-minute load average after each run:", ""]
    for row in rows:
        if "summary" in row:
            loads = [round(r.get("loadavg", float("nan")), 1) for r in row.get("runs", [])]
            rates = row["summary"]["all"]["tok_s_runs"]
            lines.append(f"- {row['engine']} / {row['speculative']}: {rates}, load {loads}")
    lines += ["", "Settings:", ""]
    for row in rows:
        lines.append(f"- {row['engine']} / {row['speculative']}: {row.get('settings', '-')}")
    if record.get("notes"):
        lines += ["", *record["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="bundled model name or folder")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--speculative", nargs="+", default=["off", "ngram"], choices=["off", "ngram"])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "engine_speed.json")
    parser.add_argument(
        "--update", action="store_true", help="keep the other rows of an existing --out file (re-run some rows)"
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        model_path(args.model)
    except ModelNotFound as exc:
        sys.exit(str(exc))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    logs = args.out.parent / "logs"
    logs.mkdir(exist_ok=True)
    previous: dict[str, Any] = json.loads(args.out.read_text()) if args.update and args.out.is_file() else {}
    began = time.perf_counter()
    rows: list[dict[str, Any]] = []
    jobs = [(engine, spec) for engine in args.engines for spec in args.speculative]
    with tqdm(total=len(jobs) * args.runs * 2, desc="engine speed", unit="group") as bar:
        for engine, spec in jobs:
            bar.set_postfix_str(f"{engine}/{spec}")
            try:
                rows.append(
                    asyncio.run(
                        bench_engine(
                            engine, args.model, spec, max_tokens=args.max_tokens, runs=args.runs, bar=bar, logs=logs
                        )
                    )
                )
            except Exception as exc:  # one engine failing must not lose the others' numbers
                rows.append({"engine": engine, "speculative": spec, "error": f"{type(exc).__name__}: {exc}"})
                print(f"{engine}/{spec} failed: {exc}", file=sys.stderr)
            table = write(args, rows, previous, time.perf_counter() - began)  # after every row: nothing is lost
    print(table)


def write(args: argparse.Namespace, rows: list[dict[str, Any]], previous: dict[str, Any], wall_s: float) -> str:
    """Write the JSON and Markdown results (merged with ``previous`` rows not re-run); return the table."""
    done = {(r["engine"], r["speculative"]) for r in rows}
    kept = [r for r in previous.get("rows", []) if (r["engine"], r["speculative"]) not in done]
    merged = sorted(kept + rows, key=lambda r: (ENGINES.index(r["engine"]), ["off", "ngram"].index(r["speculative"])))
    compare_texts(merged)
    command = " ".join(["python", *sys.argv])
    if previous.get("command"):
        command += f" (other rows from: {previous['command']})"
    record = {
        "command": command,
        "model": args.model,
        "max_tokens": args.max_tokens,
        "runs": args.runs,
        "wall_s": wall_s + previous.get("wall_s", 0.0),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
        "rows": merged,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    table = markdown(record)
    args.out.with_suffix(".md").write_text(table)
    return table


if __name__ == "__main__":
    main()
