"""Check draft-model speculation and seeded sampling through VLLMEngine (not in the test suite: it starts engines).

Run::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/vllm_draft_check.py                       # SmolLM2 drafts for itself
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/vllm_draft_check.py \\
        --model qwen2.5-coder-1.5b-instruct --draft qwen2.5-coder-0.5b-instruct         # the real pair (slower)

Starts, one after the other: the model with ``speculative.method="draft"``, then the model with speculation off.
Checks that the draft engine reports ``speculative_draft`` enabled, that vLLM proposed and accepted draft tokens,
that greedy answers are identical with and without the draft, and whether seeded sampling repeats itself with and
without speculation. Writes ``benchmarks/results/vllm_draft_check.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from echo_middleware.config import EngineConfig
from echo_middleware.engines.vllm import VLLMEngine
from echo_middleware.types import EngineRequest, Message, SamplingParams

RESULTS = Path(__file__).parent / "results"
PROMPTS = [
    "What is the capital of France?",
    "Name three colours.",
    "Rewrite as a numbered list, word for word: First, stop the service. Second, back up the database. "
    "Third, upgrade the package. Fourth, start the service again.",
]


def _request(text: str, **params: Any) -> EngineRequest:
    return EngineRequest(
        messages=[Message(role="user", content=text)], params=SamplingParams(**{"max_tokens": 48, **params})
    )


async def _run(config: EngineConfig) -> dict[str, Any]:
    began = time.perf_counter()
    async with VLLMEngine(config, name=f"vllm/{config.speculative.method}") as engine:
        start_s = time.perf_counter() - began
        greedy = [(await engine.generate(_request(p))).text for p in PROMPTS]
        seeded = [
            (await engine.generate(_request("Tell me a story.", temperature=0.9, seed=7, max_tokens=24))).text
            for _ in range(2)
        ]
        await asyncio.sleep(0.5)  # let the last scheduler stats arrive
        return {
            "start_s": start_s,
            "features": {k: v.model_dump() for k, v in engine.features.items()},
            "greedy": greedy,
            "seeded_repeats": seeded[0] == seeded[1],
            "spec_draft_tokens": engine.stats.spec_draft_tokens,
            "spec_accepted_tokens": engine.stats.spec_accepted_tokens,
            "acceptance_rate": engine.stats.spec_acceptance_rate,
        }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--draft", default=None, help="draft model (default: the model itself)")
    parser.add_argument("--out", type=Path, default=RESULTS / "vllm_draft_check.json")
    args = parser.parse_args()
    common: dict[str, Any] = {
        "backend": "vllm",
        "model": args.model,
        "kv_cache_dtype": "auto",
        "max_model_len": 2048,
        "cpu_kv_cache_space_gib": 1,
    }
    draft = await _run(
        EngineConfig(
            **common,
            speculative={"method": "draft", "draft_model": args.draft or args.model, "num_speculative_tokens": 3},
        )
    )
    plain = await _run(EngineConfig(**common, speculative={"method": "off"}))
    report = {
        "model": args.model,
        "draft_model": args.draft or args.model,
        "draft_enabled": draft["features"]["speculative_draft"]["enabled"],
        "draft_detail": draft["features"]["speculative_draft"]["detail"],
        "draft_tokens_proposed": draft["spec_draft_tokens"],
        "draft_tokens_accepted": draft["spec_accepted_tokens"],
        "acceptance_rate": draft["acceptance_rate"],
        "greedy_identical": draft["greedy"] == plain["greedy"],
        "seeded_sampling_repeats_with_draft": draft["seeded_repeats"],
        "seeded_sampling_repeats_without_speculation": plain["seeded_repeats"],
        "start_s": {"draft": draft["start_s"], "off": plain["start_s"]},
        "answers": {"draft": draft["greedy"], "off": plain["greedy"]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "answers"}, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    asyncio.run(main())
