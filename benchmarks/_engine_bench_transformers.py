"""Decode speed of the transformers engine, with and without speculation, through the engine itself.

:func:`bench_transformers` is importable (``benchmarks/engine_speed.py`` can put its rows beside vLLM's); run this
file, or ``benchmarks/transformers_speed.py``, for a table and ``benchmarks/results/transformers_speed.json``.

Every run is greedy with ``max_tokens`` new tokens through :class:`TransformersEngine` (so the queue, streaming
and detokenisation are in the number); tokens/s is completion tokens over the whole request time (prefill
included), the median of ``repeats`` runs after one warm-up. Two prompts: ``copy`` asks for text the prompt
already holds (what in-context examples make likely, where prompt lookup finds drafts) and ``free`` asks for new
text (where it finds little). Speculation must not change greedy output: each row says whether its text equals
the ``off`` row's.
"""

from __future__ import annotations

import asyncio
import os
import statistics
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from echo_middleware.config import EngineConfig
from echo_middleware.engines.transformers import TransformersEngine
from echo_middleware.types import EngineRequest, Message, SamplingParams

_PARAGRAPH = (
    "The deployment checklist has four steps. First, run the database migrations on a staging copy and compare "
    "the row counts. Second, build the container image with the release tag and push it to the registry. Third, "
    "roll the new image out to one canary instance and watch its error rate for ten minutes. Fourth, roll it out "
    "to the remaining instances in batches of five, pausing between batches."
)
PROMPTS: dict[str, list[Message]] = {
    "copy": [
        Message(
            role="user",
            content=f"Here is a checklist:\n\n{_PARAGRAPH}\n\nRewrite the checklist above as a numbered list, "
            "keeping every sentence word for word.",
        )
    ],
    "free": [Message(role="user", content="Write a short story about a lighthouse keeper who finds a message.")],
}


async def _bench_one(
    model: str,
    method: str,
    *,
    max_tokens: int,
    repeats: int,
    dtype: str,
    num_speculative_tokens: int,
    draft_model: str | None,
    cpu_threads: int | None,
    models_dir: str | os.PathLike[str] | None,
    bar: Any,
) -> list[dict[str, Any]]:
    speculative: dict[str, Any] = {"method": method, "num_speculative_tokens": num_speculative_tokens}
    if method == "draft":
        speculative["draft_model"] = draft_model
    config = EngineConfig(
        backend="transformers",
        model=model,
        dtype=dtype,  # type: ignore[arg-type]
        speculative=speculative,  # type: ignore[arg-type]
        kv_cache_dtype="auto",
        enable_prefix_caching=False,
        cpu_threads=cpu_threads,
    )
    rows = []
    async with TransformersEngine(config, models_dir=models_dir, name=f"{model}/{method}") as engine:
        for prompt_name, messages in PROMPTS.items():
            request = EngineRequest(messages=messages, params=SamplingParams(max_tokens=max_tokens))
            await engine.generate(request.model_copy(update={"request_id": f"warm-{prompt_name}"}))
            runs = []
            for i in range(repeats):
                result = await engine.generate(request.model_copy(update={"request_id": f"{prompt_name}-{i}"}))
                runs.append(result)
                bar.update(1)
            rates = [r.usage.completion_tokens / r.timings.total_s for r in runs]
            rows.append(
                {
                    "model": model,
                    "speculative": method,
                    "prompt": prompt_name,
                    "dtype": engine._dtype_name,
                    "device": engine._device,
                    "cpu_threads": cpu_threads,
                    "tok_s": statistics.median(rates),
                    "tok_s_runs": rates,
                    "ttft_s": statistics.median(r.timings.ttft_s or 0.0 for r in runs),
                    "completion_tokens": runs[0].usage.completion_tokens,
                    "prompt_tokens": runs[0].usage.prompt_tokens,
                    "text": runs[0].text,
                    "features": {k: v.model_dump() for k, v in engine.features.items()},
                }
            )
    return rows


def bench_transformers(
    models: Sequence[str] = ("smollm2-135m-instruct",),
    *,
    methods: Sequence[str] = ("off", "ngram"),
    max_tokens: int = 64,
    repeats: int = 3,
    dtype: str = "auto",
    num_speculative_tokens: int = 4,
    draft_model: str | None = None,
    cpu_threads: int | None = None,
    models_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Measure greedy decode speed per model x speculation method x prompt; one row each (see module doc)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    total = len(models) * len(methods) * len(PROMPTS) * repeats
    rows: list[dict[str, Any]] = []
    with tqdm(total=total, desc="transformers speed", unit="run", disable=not progress) as bar:
        for model in models:
            for method in methods:
                rows += asyncio.run(
                    _bench_one(
                        model,
                        method,
                        max_tokens=max_tokens,
                        repeats=repeats,
                        dtype=dtype,
                        num_speculative_tokens=num_speculative_tokens,
                        draft_model=draft_model,
                        cpu_threads=cpu_threads,
                        models_dir=models_dir,
                        bar=bar,
                    )
                )
    reference = {(r["model"], r["prompt"]): r["text"] for r in rows if r["speculative"] == "off"}
    for row in rows:
        ref = reference.get((row["model"], row["prompt"]))
        row["same_text_as_off"] = None if ref is None else row["text"] == ref
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Side by side: one line per model and prompt, one tokens/s column per speculation method."""
    methods = list(dict.fromkeys(r["speculative"] for r in rows))
    header = f"{'model':32} {'prompt':6} {'dtype':9} " + " ".join(f"{m + ' tok/s':>12}" for m in methods)
    header += "  same text as off"
    lines = [header, "-" * len(header)]
    keys = list(dict.fromkeys((r["model"], r["prompt"]) for r in rows))
    for model, prompt in keys:
        mine = {r["speculative"]: r for r in rows if r["model"] == model and r["prompt"] == prompt}
        first = next(iter(mine.values()))
        cells = " ".join(f"{mine[m]['tok_s']:12.1f}" if m in mine else f"{'-':>12}" for m in methods)
        same = ", ".join(f"{m}={mine[m]['same_text_as_off']}" for m in methods if m != "off" and m in mine)
        lines.append(f"{model:32} {prompt:6} {first['dtype']:9} {cells}  {same}")
    return "\n".join(lines)


if __name__ == "__main__":
    import runpy
    from pathlib import Path

    runpy.run_path(str(Path(__file__).with_name("transformers_speed.py")), run_name="__main__")
