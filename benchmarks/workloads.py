"""Replayable request traces built from real public data: short-answer QA, math and open instructions.

A trace is what an in-context cache sees in production, scaled down: a **warm-up** history that the large model
answers (the store fills with those pairs), then a held-out **eval** stream in which later requests resemble
earlier ones. The recipe (``benchmarks/data/README.md`` and ``/docs/benchmarks.md``):

- Requests are grouped by task type (an EntityQuestions relation, an NQ question word, the first word of a GSM8K
  problem, an MT-Bench category, a fow-cache category). Each next request picks a type by a Zipf law (``s``
  ~ 1.0; types with more questions in the data rank as more popular), then that type's next unused item.
- An item with a second wording (EntityQuestions paraphrase pairs) schedules its twin later with probability
  ``paraphrase_p``, a quarter to one and a quarter warm-up lengths later, so the twin usually lands in the eval
  stream while the first wording is in the store. In the ``traps`` workload (fow-cache pairs) every pair's second
  wording is asked, at a random place in the eval stream; pairs whose answers differ (negation, swapped entity,
  other number or date, other scope) are **traps**: a plain semantic cache answers them with their twin's answer.
- ``repeat_p`` of requests re-issue an earlier request verbatim.
- Arrivals are Poisson at a rate (or gamma with a coefficient of variation > 1 for bursts); every draw comes from
  a seeded generator, so the same arguments give the same trace.

Each eval item carries a ``kind``: ``fresh`` (nothing like it came before), ``paraphrase`` (a second wording of an
earlier request with the same answer), ``repeat`` (verbatim) or ``trap`` (looks like an earlier request, needs
another answer). Results are reported split by kind: a small model cannot answer long-tail facts it has never
seen, even with examples; gains come from paraphrases, repeats and same-template tasks.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

DATA = Path(__file__).parent / "data"

Kind = Literal["fresh", "paraphrase", "repeat", "trap"]
Metric = Literal["short", "numeric", "open"]
WORKLOADS = ("qa", "math", "open", "traps")
KINDS: tuple[Kind, ...] = ("fresh", "paraphrase", "repeat", "trap")

QA_SYSTEM = "Answer the question with a short phrase only (a name, place or date). Do not explain."
MATH_SYSTEM = (
    "Solve the math word problem. Reason in a few short steps, then write the final answer as a number on "
    "the last line in the form '#### <number>'."
)
OPEN_SYSTEM = "You are a helpful assistant. Answer clearly and concisely."


@dataclass(frozen=True)
class Item:
    """One request of a trace, with what it is scored against.

    Attributes:
        id: Position-stable id in the trace (``qa-0042``).
        workload: ``qa``, ``math``, ``open`` or ``traps``.
        source: The dataset it comes from (``entityquestions``, ``nq_open``, ``gsm8k``, ``mt_bench``, ``fow_cache``).
        task: Its task type (relation, question word, category): what the Zipf law draws.
        kind: ``fresh``, ``paraphrase``, ``repeat`` or ``trap`` (see the module docstring).
        phase: ``warmup`` (answered by the large model, fills the store) or ``eval`` (scored).
        system: The system prompt (the same for every item of a workload).
        prompt: The user's request.
        answers: Gold answers: aliases for QA, the final number for math, reference answers (may be empty) for
            open text.
        metric: How the answer is scored: ``short`` (exact match / F1), ``numeric``, ``open`` (ROUGE-L, embedding
            similarity and a judge).
        max_tokens: Most tokens the answer may take.
        twin: Id of the earlier item this one resembles (paraphrase, repeat, trap), else None.
        category: Finer label (fow-cache category such as ``negation``; MT-Bench category).
        source_id: The item's key in its dataset, so a paraphrase and its twin can be matched back.
    """

    id: str
    workload: str
    source: str
    task: str
    kind: Kind
    phase: Literal["warmup", "eval"]
    system: str
    prompt: str
    answers: tuple[str, ...]
    metric: Metric
    max_tokens: int
    twin: str | None = None
    category: str = ""
    source_id: str = ""


@dataclass(frozen=True)
class _Entry:
    """A dataset item before it is placed in a trace; ``second`` is its other wording, if it has one."""

    source: str
    task: str
    prompt: str
    answers: tuple[str, ...]
    source_id: str
    category: str = ""
    second: str | None = None
    second_answers: tuple[str, ...] | None = None
    trap: bool = False
    forced_twin: bool = False


@dataclass
class Trace:
    """A workload's warm-up history and eval stream, and the arguments that made it."""

    workload: str
    warmup: list[Item]
    eval: list[Item]
    seed: int
    params: dict[str, float | int | str] = field(default_factory=dict)

    @property
    def items(self) -> list[Item]:
        """Warm-up then eval, in arrival order."""
        return [*self.warmup, *self.eval]

    def by_id(self) -> dict[str, Item]:
        """Every item by its id (to look up a twin)."""
        return {item.id: item for item in self.items}

    def kinds(self) -> dict[str, int]:
        """How many eval items there are of each kind."""
        counts = dict.fromkeys(KINDS, 0)
        for item in self.eval:
            counts[item.kind] += 1
        return counts

    def to_json(self) -> dict[str, object]:
        """A JSON-able description (written next to the results, so a run can be audited)."""
        return {
            "workload": self.workload,
            "seed": self.seed,
            "params": self.params,
            "kinds": self.kinds(),
            "warmup": [item.__dict__ for item in self.warmup],
            "eval": [item.__dict__ for item in self.eval],
        }


# ------------------------------------------------------------------------------------------ data loading


def _jsonl(path: Path) -> Iterator[dict]:  # type: ignore[type-arg]
    if not path.exists():
        raise FileNotFoundError(
            f"benchmark data {path} is missing: the benchmarks read the copies in benchmarks/data/ "
            "(see benchmarks/data/README.md for where each file comes from)"
        )
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def ranker_training_row(index: int) -> bool:
    """Whether row ``index`` of the EntityQuestions paraphrase pairs or of NQ-open trained the shipped ranker.

    ``benchmarks/train_ranker.py`` learns from the rows with ``index % 4 == 0`` of both files; the benchmarks
    leave them out, so the ranker is never scored on what it was fitted to.
    """
    return index % 4 == 0


def _qa_entries(data: Path) -> list[_Entry]:
    """EntityQuestions (paraphrase pairs first, then the per-relation dev questions) and NQ-open.

    Rows the shipped ranker was trained on are left out (:func:`ranker_training_row`).
    """
    entries: list[_Entry] = []
    seen: set[str] = set()
    for i, row in enumerate(_jsonl(data / "entityquestions" / "paraphrase_pairs_dev.jsonl")):
        seen.update((row["question"], row["paraphrase"]))
        if ranker_training_row(i):
            continue
        entries.append(
            _Entry(
                source="entityquestions",
                task=f"eq:{row['relation']}",
                prompt=row["question"],
                answers=tuple(row["answers"]),
                source_id=f"eqp:{row['question']}",
                second=row["paraphrase"],
                second_answers=tuple(row["answers_paraphrase"]),
            )
        )
    for row in _jsonl(data / "entityquestions" / "dev_250_per_relation.jsonl"):
        if row["question"] in seen:
            continue
        seen.add(row["question"])
        entries.append(
            _Entry(
                source="entityquestions",
                task=f"eq:{row['relation']}",
                prompt=row["question"],
                answers=tuple(row["answers"]),
                source_id=f"eq:{row['question']}",
            )
        )
    for i, row in enumerate(_jsonl(data / "nq_open" / "NQ-open.dev.jsonl")):
        if ranker_training_row(i):
            continue
        question = row["question"].strip()
        if not question.endswith("?"):
            question += "?"
        entries.append(
            _Entry(
                source="nq_open",
                task="nq",
                prompt=question[0].upper() + question[1:],
                answers=tuple(row["answer"]),
                source_id=f"nq:{row['question']}",
            )
        )
    return entries


def _math_entries(data: Path) -> list[_Entry]:
    """GSM8K test problems; the gold answer is the number after ``####``."""
    entries = []
    for i, row in enumerate(_jsonl(data / "gsm8k" / "test.jsonl")):
        final = row["answer"].rsplit("####", 1)[-1].strip().replace(",", "")
        entries.append(
            _Entry(
                source="gsm8k",
                task=f"gsm:{row['question'].split()[0].lower()}",
                prompt=row["question"],
                answers=(final,),
                source_id=f"gsm8k:{i}",
            )
        )
    return entries


def _open_entries(data: Path) -> list[_Entry]:
    """MT-Bench first turns, with GPT-4's reference answer where one exists (30 of 80)."""
    references: dict[int, str] = {}
    for row in _jsonl(data / "mt_bench" / "mt_bench_reference_answer_gpt-4.jsonl"):
        references[row["question_id"]] = row["choices"][0]["turns"][0]
    entries = []
    for row in _jsonl(data / "mt_bench" / "mt_bench_question.jsonl"):
        ref = references.get(row["question_id"])
        entries.append(
            _Entry(
                source="mt_bench",
                task=f"mt:{row['category']}",
                prompt=row["turns"][0],
                answers=(ref,) if ref else (),
                source_id=f"mt_bench:{row['question_id']}",
                category=row["category"],
            )
        )
    return entries


def _trap_entries(data: Path) -> list[_Entry]:
    """fow-cache question pairs: 300 that share an answer (controls) and 300 traps that do not."""
    entries = []
    for row in _jsonl(data / "fow_cache" / "pairs.jsonl"):
        entries.append(
            _Entry(
                source="fow_cache",
                task=f"fow:{row['category']}",
                prompt=row["a"],
                answers=(),
                source_id=f"fow:{row['id']}",
                category=row["category"],
                second=row["b"],
                second_answers=(),
                trap=not row["same_answer"],
                forced_twin=True,
            )
        )
    return entries


_SPEC: dict[str, tuple[str, Metric, int]] = {
    "qa": (QA_SYSTEM, "short", 24),
    "math": (MATH_SYSTEM, "numeric", 256),
    "open": (OPEN_SYSTEM, "open", 160),
    "traps": (OPEN_SYSTEM, "open", 96),
}

DEFAULTS: dict[str, dict[str, float]] = {
    "qa": {"zipf_s": 1.0, "paraphrase_p": 1.0, "repeat_p": 0.03},
    "math": {"zipf_s": 1.0, "paraphrase_p": 0.5, "repeat_p": 0.03},
    "open": {"zipf_s": 1.0, "paraphrase_p": 0.5, "repeat_p": 0.03},
    # Every category equally often: the point is to count false reuse per trap category, with controls.
    "traps": {"zipf_s": 0.0, "paraphrase_p": 1.0, "repeat_p": 0.0},
}
"""Per-workload trace knobs (the recipe's values); ``build_trace`` arguments override them."""


def load_entries(workload: str, data: Path = DATA) -> list[_Entry]:
    """Every dataset item of a workload, grouped later by ``task``."""
    loaders = {"qa": _qa_entries, "math": _math_entries, "open": _open_entries, "traps": _trap_entries}
    if workload not in loaders:
        raise ValueError(f"workload={workload!r} is unknown: use one of {', '.join(WORKLOADS)}")
    return loaders[workload](data)


# ------------------------------------------------------------------------------------------ trace building


def zipf_weights(n: int, s: float) -> list[float]:
    """Unnormalised Zipf weights ``1 / rank**s`` for ranks 1..n."""
    return [1.0 / (rank**s) for rank in range(1, n + 1)]


def build_trace(
    workload: str,
    n_warmup: int,
    n_eval: int,
    *,
    seed: int = 0,
    zipf_s: float | None = None,
    paraphrase_p: float | None = None,
    repeat_p: float | None = None,
    twin_gap: tuple[float, float] = (0.25, 1.25),
    max_tokens: int | None = None,
    data: Path = DATA,
) -> Trace:
    """Build a workload's trace: ``n_warmup`` warm-up requests, then ``n_eval`` eval requests.

    Args:
        workload: ``qa``, ``math``, ``open`` or ``traps``.
        n_warmup: Requests in the warm-up history (the store fills from them).
        n_eval: Requests in the held-out, scored stream.
        seed: Seeds every random draw; the same arguments give the same trace.
        zipf_s: Exponent of the Zipf law over task types (0: uniform); None: the workload's default
            (:data:`DEFAULTS`), as for the next two.
        paraphrase_p: Chance that an item with a second wording schedules it later (fow-cache pairs: always).
        repeat_p: Chance that a request re-issues an earlier one verbatim.
        twin_gap: A twin is due ``uniform(lo, hi) * n_warmup`` requests after its first wording (at least 1).
        max_tokens: Overrides the workload's answer budget (qa 24, math 256, open 160, traps 96).
        data: Folder with the dataset copies.

    Returns:
        The trace; ``trace.kinds()`` says how many eval items are fresh, paraphrase, repeat and trap.
    """
    if workload not in DEFAULTS:
        raise ValueError(f"workload={workload!r} is unknown: use one of {', '.join(WORKLOADS)}")
    knobs = DEFAULTS[workload]
    zipf_s = knobs["zipf_s"] if zipf_s is None else zipf_s
    paraphrase_p = knobs["paraphrase_p"] if paraphrase_p is None else paraphrase_p
    repeat_p = knobs["repeat_p"] if repeat_p is None else repeat_p
    if n_warmup < 0 or n_eval < 1:
        raise ValueError(f"n_warmup={n_warmup} and n_eval={n_eval}: need n_warmup >= 0 and n_eval >= 1")
    for name, p in (("paraphrase_p", paraphrase_p), ("repeat_p", repeat_p)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name}={p} must be within [0, 1]")
    system, metric, default_tokens = _SPEC[workload]
    entries = load_entries(workload, data)
    rng = random.Random(f"{workload}:{seed}")

    groups: dict[str, list[_Entry]] = {}
    for entry in entries:
        groups.setdefault(entry.task, []).append(entry)
    for task in groups:
        rng.shuffle(groups[task])
    # Types with more questions in the data are taken to be more popular (ties broken by name): a fixed,
    # documented order, so a seed changes which items are drawn but not which types dominate.
    tasks = sorted(groups, key=lambda t: (-len(groups[t]), t))
    weights = zipf_weights(len(tasks), zipf_s)
    cursor = dict.fromkeys(tasks, 0)

    total = n_warmup + n_eval
    lo, hi = twin_gap
    gap_lo, gap_hi = max(1, round(lo * n_warmup)), max(1, round(hi * n_warmup))
    tokens = max_tokens or default_tokens
    pending: list[tuple[int, int, Item]] = []  # (due position, tie-break, twin item)
    placed: list[Item] = []
    order = 0

    def make(position: int, entry: _Entry, kind: Kind, prompt: str, answers: tuple[str, ...], twin: str | None):
        return Item(
            id=f"{workload}-{position:04d}",
            workload=workload,
            source=entry.source,
            task=entry.task,
            kind=kind,
            phase="warmup" if position < n_warmup else "eval",
            system=system,
            prompt=prompt,
            answers=answers,
            metric=metric,
            max_tokens=tokens,
            twin=twin,
            category=entry.category,
            source_id=entry.source_id + ("#2" if kind in ("paraphrase", "trap") else ""),
        )

    entry_of: dict[str, _Entry] = {}
    while len(placed) < total:
        position = len(placed)
        pending.sort()
        if pending and pending[0][0] <= position:
            _, _, twin_item = pending.pop(0)
            placed.append(replace(twin_item, id=f"{workload}-{position:04d}", phase=_phase(position, n_warmup)))
            continue
        if placed and rng.random() < repeat_p:
            earlier = placed[rng.randrange(len(placed))]
            placed.append(
                replace(
                    earlier,
                    id=f"{workload}-{position:04d}",
                    kind="repeat",
                    phase=_phase(position, n_warmup),
                    twin=earlier.id,
                )
            )
            continue
        available = [i for i, t in enumerate(tasks) if cursor[t] < len(groups[t])]
        if not available:
            break
        pick = rng.choices(available, weights=[weights[i] for i in available])[0]
        task = tasks[pick]
        entry = groups[task][cursor[task]]
        cursor[task] += 1
        item = make(position, entry, "fresh", entry.prompt, entry.answers, None)
        placed.append(item)
        entry_of[item.id] = entry
        if entry.second is not None and (entry.forced_twin or rng.random() < paraphrase_p):
            if entry.forced_twin:  # fow-cache pairs: the second wording is always asked, in the eval stream
                due = rng.randint(max(position + 1, n_warmup), max(position + 1, total - 1))
            else:
                due = position + rng.randint(gap_lo, gap_hi)
            if due < total:
                kind: Kind = "trap" if entry.trap else "paraphrase"
                twin = make(due, entry, kind, entry.second, entry.second_answers or entry.answers, item.id)
                pending.append((due, order, twin))
                order += 1
    warmup, evals = placed[:n_warmup], placed[n_warmup:]
    return Trace(
        workload=workload,
        warmup=warmup,
        eval=evals,
        seed=seed,
        params={
            "n_warmup": n_warmup,
            "n_eval": n_eval,
            "zipf_s": zipf_s,
            "paraphrase_p": paraphrase_p,
            "repeat_p": repeat_p,
            "twin_gap": f"{lo}-{hi}",
            "max_tokens": tokens,
        },
    )


def _phase(position: int, n_warmup: int) -> Literal["warmup", "eval"]:
    return "warmup" if position < n_warmup else "eval"


# ------------------------------------------------------------------------------------------ arrivals


def arrivals(n: int, rate: float, *, seed: int = 0, cv: float = 1.0) -> list[float]:
    """Arrival times (seconds from 0) of ``n`` requests at ``rate`` per second.

    ``cv == 1`` is a Poisson process (exponential gaps); ``cv > 1`` draws gamma gaps with that coefficient of
    variation and the same mean, i.e. bursts.
    """
    if rate <= 0:
        raise ValueError(f"rate={rate} must be > 0 requests per second")
    if cv <= 0:
        raise ValueError(f"cv={cv} must be > 0")
    rng = random.Random(f"arrivals:{seed}:{rate}:{cv}")
    mean = 1.0 / rate
    now, times = 0.0, []
    for _ in range(n):
        if math.isclose(cv, 1.0):
            gap = rng.expovariate(rate)
        else:
            shape = 1.0 / (cv * cv)
            gap = rng.gammavariate(shape, mean / shape)
        now += gap
        times.append(now)
    return times


def messages_of(item: Item) -> list[dict[str, str]]:
    """The chat messages of an item (system prompt, then the user's request)."""
    out = []
    if item.system:
        out.append({"role": "system", "content": item.system})
    out.append({"role": "user", "content": item.prompt})
    return out


def describe(trace: Trace) -> str:
    """One line: sizes and eval kinds, for logs and the results table."""
    kinds = ", ".join(f"{k} {v}" for k, v in trace.kinds().items() if v)
    return f"{trace.workload}: {len(trace.warmup)} warm-up, {len(trace.eval)} eval ({kinds})"


def nearest_similarity(trace: Trace, embed: object, threshold: float = 0.7) -> dict[str, float]:
    """Share of eval requests whose nearest earlier request has cosine > ``threshold``, split by kind.

    The recipe's measured figures (QA 21 %, math 80 %, chat 11 % above 0.7) came from this; reported so a reader
    can compare our traces with production ones (EchoLM: > 60 % above 0.8).

    Args:
        trace: The trace.
        embed: Anything with ``embed(list[str]) -> array`` of unit rows.
        threshold: The cosine counted as "similar".
    """
    import numpy as np

    texts = [item.prompt for item in trace.items]
    vectors = np.asarray(embed.embed(texts))  # type: ignore[attr-defined]
    n_warm = len(trace.warmup)
    hits: dict[str, list[float]] = {}
    for j, item in enumerate(trace.eval, start=n_warm):
        best = float((vectors[:j] @ vectors[j]).max()) if j else 0.0
        hits.setdefault(item.kind, []).append(float(best > threshold))
        hits.setdefault("all", []).append(float(best > threshold))
    return {k: sum(v) / len(v) for k, v in hits.items()}


def select(items: Sequence[Item], kinds: Sequence[str] | None = None) -> list[Item]:
    """Items of the given kinds (all when None)."""
    return [i for i in items if kinds is None or i.kind in kinds]
