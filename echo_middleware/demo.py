"""The quickstart demo: what `make demo` and `echo-middleware demo` run.

It builds the pipeline on embedded defaults (a local Chroma store, the bundled small and large models on the
local engine), asks a few questions the store has never seen (the large model answers them and they become
examples), then asks them again word for word and in other words. A repeat is answered by the small model with
the stored example in its prompt; a rewording goes wherever the ranker's predicted quality and the calibrated
threshold send it (the shipped ranker was trained on short factual QA, so on coding questions it is cautious and
keeps most rewordings on the large model). Each answer is printed with its decision, so you can see why.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

from echo_middleware.types import EchoRequest, Message, SamplingParams

FIRST_ASKED = (
    "How do I reverse a list in Python?",
    "How can I read a text file line by line in Python?",
    "What does the `git stash` command do?",
)
ASKED_AGAIN = (
    "What is the way to reverse a Python list?",
    "In Python, how do I go through a text file one line at a time?",
    "What does `git stash` do?",
)


def _line(text: str, width: int = 100) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def run_demo(
    small: str | None = None,
    large: str | None = None,
    backend: str | None = None,
    store_path: str | None = None,
) -> int:
    """Run the quickstart and print every answer with its decision; returns a process exit code."""
    from echo_middleware._sync import run_sync
    from echo_middleware.pipeline import EchoPipeline

    overrides: dict[str, Any] = {}
    for role, model in (("small", small), ("large", large)):
        section: dict[str, Any] = {}
        if model:
            section["model"] = model
        if backend:
            section["backend"] = backend
        if section:
            overrides[role] = section
    store_dir = store_path or tempfile.mkdtemp(prefix="echo-demo-store-")
    overrides["store"] = {"path": store_dir}

    print(f"echo-middleware demo  (store: {store_dir})")
    print("starting the engines and loading the models; the first start takes a minute or two ...")
    began = time.monotonic()
    pipeline = EchoPipeline.from_defaults(**overrides)
    params = SamplingParams(max_tokens=96, temperature=0.0)
    try:
        run_sync(pipeline.start())
        print(
            f"ready in {time.monotonic() - began:.0f} s: large={pipeline.large_engine.name}, "
            f"small={pipeline.small_engine.name}\n"
        )
        phases = (
            ("new questions", FIRST_ASKED),
            ("asked again, word for word", FIRST_ASKED),
            ("asked again, in other words", ASKED_AGAIN),
        )
        for phase, questions in phases:
            print(f"== {phase} ==")
            for question in questions:
                result = pipeline.generate(
                    EchoRequest(messages=[Message(role="user", content=question)], params=params)
                )
                d = result.decision
                route = "OFFLOADED to small" if d.offloaded else "large model"
                print(f"Q: {question}")
                print(f"   -> {route} ({d.engine}) in {sum(d.stage_s.values()):.1f} s: {d.reason}")
                for ex in d.examples:
                    utility = "-" if ex.utility is None else f"{ex.utility:.2f}"
                    print(f"      example {ex.id}: distance {ex.distance:.3f}, utility {utility}")
                print(f"   A: {_line(result.text)}\n")
    finally:
        pipeline.close_sync()
    print(f"done in {time.monotonic() - began:.0f} s")
    return 0
