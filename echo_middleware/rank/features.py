"""Features of (request, candidate example) pairs for the utility ranker.

Similarity is one feature among many, not the score: a request and a stored example can be close in embedding
space and still be a trap ("Where was Ann Smith born?" vs "Where was Ann Smyth born?", "Cancel my plan" vs
"Don't cancel my plan", the same word problem with other numbers). The features below let a tiny model see the
difference between "same question in other words" (useful: the answer carries over) and "same template, other
entity" (misleading when the small model copies the answer), and they carry what the pipeline has learned about
each example (its measured utility in past prompts, its offload successes).

Every feature is a cheap function of two short strings and the example's counters: computing them for 20
candidates takes well under a millisecond. :data:`FEATURE_NAMES` fixes their order; the trained weights file
names its features, so a file made for another list is refused instead of silently misread.

===========================  ===============================================================================
feature                      meaning
===========================  ===============================================================================
similarity                   cosine similarity of the embeddings (1 - retrieval distance)
similarity_gap               best similarity among the candidates minus this one's (0 for the nearest)
exact_repeat                 1 when the normalised request texts are equal
token_jaccard                Jaccard overlap of the two requests' word sets
request_coverage             share of the request's content words that the example's request contains
entity_mismatch              1 - Jaccard of salient tokens (names, numbers, rare words); 0 when neither has any
number_mismatch              1 when the requests mention different numbers
negation_mismatch            1 when one request is negated and the other is not
template_prefix              share of leading words the two requests have in common (same question template)
length_ratio                 |log(words of example request / words of request)|
response_length              log(1 + words of the example's response) / 5
response_covers_entities     share of the request's salient tokens that the example's *response* mentions
sim_x_entity_match           similarity * (1 - entity_mismatch): close *and* about the same thing
stored_quality               the example's quality signal (0.5 when unknown)
mean_utility                 the example's measured utility in past prompts, shrunk towards 0.5
log_uses                     log(1 + times its utility was measured) / 3
log_offload_successes        log(1 + offloads it enabled that passed a check) / 3
same_context                 1 same system prompt, 0 another, 0.5 unknown
request_has_number           1 when the request contains a digit (arithmetic is harder for small models)
request_length               log(1 + words of the request) / 4
===========================  ===============================================================================
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from echo_middleware.learn.quality import normalize_answer
from echo_middleware.types import Candidate, Message

FEATURE_NAMES: tuple[str, ...] = (
    "similarity",
    "similarity_gap",
    "exact_repeat",
    "token_jaccard",
    "request_coverage",
    "entity_mismatch",
    "number_mismatch",
    "negation_mismatch",
    "template_prefix",
    "length_ratio",
    "response_length",
    "response_covers_entities",
    "sim_x_entity_match",
    "stored_quality",
    "mean_utility",
    "log_uses",
    "log_offload_successes",
    "same_context",
    "request_has_number",
    "request_length",
)

CONTEXT_KEY = "context_hash"
"""Metadata key under which an example keeps the hash of the system prompt it was answered under."""

_WORD = re.compile(r"[\w'’]+", re.UNICODE)
_DIGITS = re.compile(r"\d+(?:[.,]\d+)*")
_NEGATIONS = frozenset(
    {
        "not",
        "no",
        "never",
        "don't",
        "doesn't",
        "didn't",
        "isn't",
        "aren't",
        "won't",
        "can't",
        "cannot",
        "without",
        "avoid",
        "stop",
        "shouldn't",
        "wasn't",
        "weren't",
        "nor",
        "none",
    }
)
_STOP_TEXT = (
    "a an the of in on at to for from by with and or is are was were be been being it its this that these "
    "those as he she they him her them his hers their i you we me my your our us which who whom whose "
    "what when where why how do does did can could should would will shall may might must have has had "
    "not no there here than then so if about into over under up down out any some all each other such "
    "only own same too very just "
)
_STOP = frozenset(_STOP_TEXT.split())
_UTILITY_PRIOR = 0.5
_UTILITY_PRIOR_WEIGHT = 2.0


def context_hash(messages: Sequence[Message]) -> str:
    """A short hash of the system prompt(s) of a conversation ("" when there is none).

    Examples answered under one system prompt ("answer in French") can mislead under another, so the ranker
    compares the hashes instead of storing whole system prompts in every example.
    """
    system = "\n".join(m.content for m in messages if m.role == "system")
    if not system:
        return ""
    return hashlib.sha256(system.encode()).hexdigest()[:16]


def request_text(messages: Sequence[Message]) -> str:
    """The text a conversation is retrieved and ranked by: its last user turn (or last turn of any role)."""
    for message in reversed(messages):
        if message.role == "user":
            return message.content
    return messages[-1].content if messages else ""


@dataclass(frozen=True)
class RankQuery:
    """What the ranker knows about the request: its text and the hash of its system prompt."""

    text: str
    context: str = ""

    @classmethod
    def from_messages(cls, messages: Sequence[Message]) -> RankQuery:
        """The query of a conversation: its last user turn and the hash of its system prompt."""
        return cls(text=request_text(messages), context=context_hash(messages))


@dataclass(frozen=True)
class _TextInfo:
    norm_words: tuple[str, ...]
    words: frozenset[str]
    content: frozenset[str]
    salient: frozenset[str]
    numbers: frozenset[str]
    negated: bool


def _salient(text: str) -> set[str]:
    """Names, numbers and rare-looking words: the tokens that decide *what* a request is about."""
    out: set[str] = set()
    raw = _WORD.findall(text)
    for i, token in enumerate(raw):
        low = token.lower()
        if low in _STOP:
            continue
        has_digit = any(ch.isdigit() for ch in token)
        is_name = token[:1].isupper() and i > 0  # capitalised inside the sentence
        is_rare = len(token) >= 9  # long words are rare words
        if has_digit or is_name or is_rare:
            out.add(low)
    return out


def _info(text: str) -> _TextInfo:
    norm = normalize_answer(text).split()
    words = frozenset(norm)
    lowered = {w.lower() for w in _WORD.findall(text)}
    return _TextInfo(
        norm_words=tuple(norm),
        words=words,
        content=frozenset(w for w in words if w not in _STOP),
        salient=frozenset(normalize_answer(s) for s in _salient(text)) - {""},
        numbers=frozenset(n.replace(",", "") for n in _DIGITS.findall(text)),
        negated=bool(lowered & _NEGATIONS) or "n't" in text.lower(),
    )


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _prefix_share(a: tuple[str, ...], b: tuple[str, ...]) -> float:
    n = min(len(a), len(b))
    if n == 0:
        return 0.0
    same = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        same += 1
    return same / n


def pair_features(query: RankQuery, candidates: Sequence[Candidate]) -> np.ndarray:
    """The feature matrix (one row per candidate, columns in :data:`FEATURE_NAMES` order)."""
    rows = np.zeros((len(candidates), len(FEATURE_NAMES)), dtype=np.float64)
    if not candidates:
        return rows
    q = _info(query.text)
    sims = [1.0 - float(c.distance) for c in candidates]
    best = max(sims)
    q_has_number = float(bool(q.numbers))
    q_len = math.log1p(len(q.norm_words)) / 4
    for i, cand in enumerate(candidates):
        ex = cand.example
        e = _info(ex.request)
        sim = sims[i]
        entity_mismatch = 1.0 - _jaccard(q.salient, e.salient) if (q.salient or e.salient) else 0.0
        response_words = set(normalize_answer(ex.response).split())
        covers = len(q.salient & response_words) / len(q.salient) if q.salient else 0.0
        uses = max(0, ex.utility_n)
        mean_utility = (ex.utility_sum + _UTILITY_PRIOR * _UTILITY_PRIOR_WEIGHT) / (uses + _UTILITY_PRIOR_WEIGHT)
        ctx = ex.metadata.get(CONTEXT_KEY)
        same_context = 0.5 if ctx is None else float(ctx == query.context)
        rows[i] = (
            sim,
            best - sim,
            float(q.norm_words == e.norm_words),
            _jaccard(q.words, e.words),
            len(q.content & e.content) / len(q.content) if q.content else 0.0,
            entity_mismatch,
            float(q.numbers != e.numbers),
            float(q.negated != e.negated),
            _prefix_share(q.norm_words, e.norm_words),
            abs(math.log((len(e.norm_words) + 1) / (len(q.norm_words) + 1))),
            math.log1p(len(ex.response.split())) / 5,
            covers,
            sim * (1.0 - entity_mismatch),
            0.5 if ex.quality is None else float(ex.quality),
            min(1.0, max(0.0, mean_utility)),
            math.log1p(uses) / 3,
            math.log1p(max(0, ex.offload_successes)) / 3,
            same_context,
            q_has_number,
            q_len,
        )
    return rows


__all__ = ["CONTEXT_KEY", "FEATURE_NAMES", "RankQuery", "context_hash", "pair_features", "request_text"]
