"""Scoring glue for the benchmark: answer quality per item, a local LLM judge, false reuse on traps, percentiles.

The measures themselves (exact match, token F1, containment, numeric match, ROUGE-L, embedding cosine) are the
package's own, in :mod:`echo_middleware.learn.quality`, so "quality" means the same thing to the router that
learns from it and to the benchmark that reports it. This module only decides which measure applies to which
item, and adds what needs a model: the judge.

Primary measure per workload (the one quality retention is computed from):

- ``qa``: token F1 against the best gold alias (exact match and containment are reported beside it);
- ``math``: numeric match of the final number;
- ``open``: the judge's 1-10 rating (MT-Bench's single-answer prompt, with GPT-4's reference for math, reasoning
  and coding), ROUGE-L and embedding cosine against the reference and against the large model's answer beside it;
- ``traps``: embedding cosine to the large model's answer to the same request; the trap measure is **false
  reuse**: the judge, shown both questions of a pair in random order, says the answer only fits the twin. (No
  rating here: a rating and a verdict per answer would double the judge's cost, and the verdict is the point.)
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workloads import DATA, Item

from echo_middleware.learn.quality import (
    best_over,
    contains,
    embedding_cosine,
    exact_match,
    numeric_match,
    rouge_l,
    token_f1,
)

logger = logging.getLogger(__name__)

PRIMARY = {"qa": "f1", "math": "numeric", "open": "judge", "traps": "emb_large"}
"""The measure quality retention is computed from, per workload."""
FALLBACK_PRIMARY = {"open": "emb_large"}
"""Used when the judge was turned off (``--no-judge``): similarity to the large model's answer."""


def score_item(item: Item, answer: str, large_answer: str | None, embedder: Any | None) -> dict[str, float]:
    """Reference-based scores of one answer (the judge is added separately: it needs a model).

    Args:
        item: The request, with its gold answers.
        answer: The system's answer.
        large_answer: The always-large system's answer to the same request (None when not known).
        embedder: Embeds texts for cosine similarity (``embed(list[str]) -> unit rows``); None skips it.
    """
    scores: dict[str, float] = {}
    if item.metric == "short":
        scores["em"] = best_over(answer, item.answers, exact_match)
        scores["f1"] = best_over(answer, item.answers, token_f1)
        scores["contains"] = best_over(answer, item.answers, contains)
    elif item.metric == "numeric":
        scores["numeric"] = best_over(answer, item.answers, numeric_match)
    else:
        if item.answers:
            scores["rouge_ref"] = best_over(answer, item.answers, rouge_l)
            if embedder is not None:
                scores["emb_ref"] = max(embedding_cosine(answer, ref, embedder) for ref in item.answers)
        if large_answer is not None:
            scores["rouge_large"] = rouge_l(answer, large_answer)
            if embedder is not None:
                scores["emb_large"] = embedding_cosine(answer, large_answer, embedder)
    if large_answer is not None and item.metric != "open":
        # Agreement with the large model, for every workload: how often the answer is "the same answer".
        scores["f1_large"] = token_f1(answer, large_answer)
    return scores


# ------------------------------------------------------------------------------------------ the judge


def load_judge_prompts(data: Path = DATA) -> dict[str, dict[str, str]]:
    """MT-Bench's judge prompts (FastChat llm_judge), by name (``single-v1``, ``single-math-v1``, ...)."""
    prompts = {}
    with (data / "mt_bench" / "judge_prompts.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                prompts[row["name"]] = row
    return prompts


_RATING = re.compile(r"^\s*(10|[1-9])(?:\.\d+)?\s*\]?\]?")
_CHOICE = re.compile(r"^\s*\[?\[?\s*(A|B|C)\b", re.IGNORECASE)

TRAP_PROMPT = (
    "Two users asked two different questions.\n\n[Question A]\n{question_a}\n\n[Question B]\n{question_b}\n\n"
    "Here is a response:\n[The Start of Response]\n{answer}\n[The End of Response]\n\n"
    "Which question does this response answer? Reply [[A]] if it answers only question A, [[B]] if it answers "
    "only question B, and [[C]] if it fits both equally or neither."
)


@dataclass
class JudgeStats:
    """How often the judge's output could not be parsed (reported: a judge that cannot answer is no judge)."""

    calls: int = 0
    unparsed: int = 0


class Judge:
    """The large local model as a judge, with MT-Bench's prompts, reading its verdict from a forced prefix.

    A 1.5B model does not reliably follow "explain, then write [[rating]]" within a few dozen tokens, and a long
    explanation per answer would cost more CPU than the benchmark itself. So the assistant turn is pre-filled with
    ``Rating: [[`` (or ``Verdict: [[``) and the model writes only the number (or letter): greedy, a few tokens.
    That is the usual "verdict first" shortcut; it makes the judge weaker than GPT-4 with reasoning, and the
    report says so. Ratings are cached by (question, answer) so identical answers are judged once per run.

    Args:
        engine: A started engine of the judge model (the large model).
        tokenizer_folder: The judge model's Hugging Face folder (its chat template renders the prompt).
        data: Folder with ``mt_bench/judge_prompts.jsonl``.
    """

    def __init__(self, engine: Any, tokenizer_folder: Path, data: Path = DATA) -> None:
        from transformers import AutoTokenizer

        self.engine = engine
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
        self.prompts = load_judge_prompts(data)
        self.stats = JudgeStats()
        self._cache: dict[tuple[str, ...], Any] = {}

    def _render(self, system: str, user: str, prefix: str) -> str:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return str(text) + prefix

    async def _complete(self, prompt: str, max_tokens: int) -> str:
        from echo_middleware.types import EngineRequest, SamplingParams

        self.stats.calls += 1
        request = EngineRequest(prompt=prompt, params=SamplingParams(max_tokens=max_tokens, temperature=0.0))
        generation = await self.engine.generate(request)
        return str(generation.text)

    async def rate(self, question: str, answer: str, reference: str | None = None) -> float | None:
        """MT-Bench single-answer rating, 1 to 10 (None when the judge's output has no rating)."""
        key = ("rate", question, answer, reference or "")
        if key in self._cache:
            return self._cache[key]  # type: ignore[no-any-return]
        spec = self.prompts["single-math-v1" if reference else "single-v1"]
        fields = {"question": question, "answer": answer, "ref_answer_1": reference or ""}
        user = spec["prompt_template"].format(**fields)
        text = await self._complete(self._render(spec["system_prompt"], user, "Rating: [["), max_tokens=3)
        match = _RATING.match(text)
        value = float(match.group(1)) if match else None
        if value is None:
            self.stats.unparsed += 1
            logger.debug("judge rating not parsed: %r", text)
        self._cache[key] = value
        return value

    async def fits(self, own: str, twin: str, answer: str, seed: str) -> str | None:
        """Which question ``answer`` answers: ``own``, ``twin`` or ``both`` (None when unparsed).

        The two questions are shown in an order drawn from ``seed``, so a judge that prefers "A" does not favour
        either side.
        """
        key = ("fits", own, twin, answer)
        if key in self._cache:
            return self._cache[key]  # type: ignore[no-any-return]
        own_first = random.Random(seed).random() < 0.5
        qa, qb = (own, twin) if own_first else (twin, own)
        user = TRAP_PROMPT.format(question_a=qa, question_b=qb, answer=answer)
        system = "You are a careful, impartial judge."
        text = await self._complete(self._render(system, user, "Verdict: [["), max_tokens=2)
        match = _CHOICE.match(text)
        verdict: str | None = None
        if match:
            letter = match.group(1).upper()
            verdict = "both" if letter == "C" else ("own" if (letter == "A") == own_first else "twin")
        else:
            self.stats.unparsed += 1
            logger.debug("judge verdict not parsed: %r", text)
        self._cache[key] = verdict
        return verdict


# ------------------------------------------------------------------------------------------ statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def mean(values: Sequence[float | None]) -> float:
    """Mean of the known values; NaN when none is known."""
    known = [v for v in values if v is not None and not math.isnan(v)]
    return sum(known) / len(known) if known else math.nan


def retention(system_quality: float, large_quality: float) -> float:
    """quality(system) / quality(always-large); NaN when always-large scored 0 or nothing."""
    if math.isnan(system_quality) or math.isnan(large_quality) or large_quality <= 0:
        return math.nan
    return system_quality / large_quality
