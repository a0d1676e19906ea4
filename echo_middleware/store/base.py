"""The example store's interface and its pure policy: tenant names, input limits, value, dedupe and TTL.

An example store keeps past requests with good answers (the memory of in-context caching), one isolated
collection per tenant. Everything here is free of Chroma so it can be tested as plain logic; the Chroma
implementation is :class:`echo_middleware.store.chroma.ChromaExampleStore` (exported as ``ExampleStore``).

Management policy, in one place:

- **Value** of an example = utility x recency x hits (:func:`example_value`). Utility is the mean of the utilities
  the ranker reported when the example was used, shrunk towards a prior of 0.5 while there are few of them;
  recency halves every ``recency_half_life_s`` since last use; hits count as ``log2(2 + hits)``, so the tenth hit
  matters less than the first. Eviction removes the lowest values first.
- **TTL**: an example older than ``ttl_s`` (since it was *created*: facts change, and a stale answer is still stale
  when it is popular) is never returned by ``query`` and is removed by ``evict``.
- **Dedupe**: a new request within ``dedupe_distance`` (cosine) of a stored one, and worded the same up to case,
  punctuation, filler words and typos (:func:`same_wording`, unless ``dedupe_guard`` is off), merges into it; the
  better answer (:func:`better_answer`) is kept and the usage statistics are summed (:func:`merge_examples`).
"""

from __future__ import annotations

import math
import os
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from echo_middleware.errors import ConfigError
from echo_middleware.types import Candidate, Example, Message

TENANT_PATTERN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_-]{0,62}[A-Za-z0-9])?$")
"""1-64 characters: letters, digits, ``_`` and ``-``, starting and ending with a letter or digit."""

UTILITY_PRIOR = 0.5
"""The utility assumed for an example nobody has scored yet."""
UTILITY_PRIOR_WEIGHT = 2.0
"""How many observations the prior is worth: two scores of 1.0 give a utility of 0.75, not 1.0."""


def validate_tenant(tenant: object) -> str:
    """Return ``tenant`` when it is a valid tenant name, else raise a ConfigError that says what is allowed.

    Names become part of a collection name (``<prefix><tenant>``), so only characters every Chroma deployment
    accepts are allowed, and a name cannot start with ``_`` (reserved for the store's own collections).
    """
    if not isinstance(tenant, str) or not TENANT_PATTERN.match(tenant):
        raise ConfigError(
            f"tenant={tenant!r} is not a valid tenant name: use 1-64 letters, digits, '_' or '-', starting and "
            "ending with a letter or digit (e.g. 'acme' or 'team-42')"
        )
    return tenant


def validate_text(value: object, field: str, max_chars: int) -> str:
    """Return ``value`` when it is a non-blank string of at most ``max_chars`` characters, else raise ConfigError."""
    if not isinstance(value, str):
        raise ConfigError(f"{field} must be a string, not {type(value).__name__}")
    if not value.strip():
        raise ConfigError(f"{field} is empty or blank: an example needs text to embed and to show")
    if len(value) > max_chars:
        raise ConfigError(
            f"{field} has {len(value)} characters, more than store.max_text_chars={max_chars}: shorten it or raise "
            "the limit (ECHO_STORE__MAX_TEXT_CHARS)"
        )
    return value


def validate_utility(value: float | None, field: str) -> float | None:
    """A utility is None (unknown) or a finite number in [0, 1]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not 0 <= value <= 1:
        raise ConfigError(f"{field}={value!r} must be a number in [0, 1] or None")
    return float(value)


def mean_utility(example: Example) -> float:
    """The example's utility, shrunk towards :data:`UTILITY_PRIOR` while it has few observations."""
    return (example.utility_sum + UTILITY_PRIOR * UTILITY_PRIOR_WEIGHT) / (example.utility_n + UTILITY_PRIOR_WEIGHT)


def example_values(
    created_at: np.ndarray,
    last_used: np.ndarray,
    hits: np.ndarray,
    utility_sum: np.ndarray,
    utility_n: np.ndarray,
    now: float,
    half_life_s: float,
) -> np.ndarray:
    """Utility x recency x hits of many examples at once (arrays of equal length): what eviction keeps.

    Utility is the mean reported utility shrunk towards :data:`UTILITY_PRIOR`; recency halves every
    ``half_life_s`` seconds since the last use (or creation); hits count as ``log2(2 + hits)``. Always > 0.
    """
    created = np.asarray(created_at, dtype=np.float64)
    used = np.maximum(np.asarray(last_used, dtype=np.float64), created)
    idle = np.maximum(0.0, now - used)
    recency = np.power(0.5, idle / half_life_s)
    hit_factor = np.log2(2.0 + np.maximum(0.0, np.asarray(hits, dtype=np.float64)))
    utility = (np.asarray(utility_sum, dtype=np.float64) + UTILITY_PRIOR * UTILITY_PRIOR_WEIGHT) / (
        np.asarray(utility_n, dtype=np.float64) + UTILITY_PRIOR_WEIGHT
    )
    return np.maximum(utility, 1e-6) * recency * hit_factor


def example_value(example: Example, now: float, half_life_s: float) -> float:
    """:func:`example_values` of one example.

    Args:
        example: The example (its usage statistics are read).
        now: The current time (``time.time()``).
        half_life_s: Seconds after which an unused example's recency has halved.
    """
    return float(
        example_values(
            np.array([example.created_at]),
            np.array([example.last_used]),
            np.array([example.hits]),
            np.array([example.utility_sum]),
            np.array([example.utility_n]),
            now,
            half_life_s,
        )[0]
    )


def is_expired(example: Example, now: float, ttl_s: float | None) -> bool:
    """Whether the example has outlived the TTL (counted from its creation)."""
    return ttl_s is not None and now - example.created_at > ttl_s


def answer_score(example: Example) -> tuple[float, float, int, float]:
    """Sort key of an answer's quality: known quality, then utility, then offload successes, then newer."""
    quality = -1.0 if example.quality is None else example.quality
    return (quality, mean_utility(example), example.offload_successes, example.created_at)


def better_answer(a: Example, b: Example) -> Example:
    """The example with the better answer of two near-identical requests (``a`` wins ties)."""
    return b if answer_score(b) > answer_score(a) else a


def merge_examples(kept: Example, other: Example, keep_id: str) -> Example:
    """One example from two near-identical ones: the better answer, the summed usage, the older creation time.

    Args:
        kept: One of the two.
        other: The other one.
        keep_id: The id the merged example keeps (the stored one's, so references to it stay valid).
    """
    winner = better_answer(kept, other)
    return winner.model_copy(
        update={
            "id": keep_id,
            "created_at": min(kept.created_at, other.created_at),
            "last_used": max(kept.last_used, other.last_used),
            "hits": kept.hits + other.hits,
            "utility_sum": kept.utility_sum + other.utility_sum,
            "utility_n": kept.utility_n + other.utility_n,
            "offload_successes": kept.offload_successes + other.offload_successes,
            "metadata": {**other.metadata, **kept.metadata, **winner.metadata},
        }
    )


_WORD = re.compile(r"\w+", re.UNICODE)
FILLER_WORDS = frozenset({"please", "pls", "kindly", "just", "um", "uh"})
"""Words whose insertion or removal anywhere does not change what a request asks."""
EDGE_WORDS = frozenset(
    {
        *("hi", "hiya", "hello", "hey", "there", "team", "morning", "afternoon", "evening", "cheers"),
        *("thanks", "thank", "you", "many", "in", "advance", "quick", "one", "question", "sorry", "silly"),
        *("to", "bother", "but", "wondering", "just", "please", "a", "again", "so", "er", "um", "uh"),
        *("well", "ok", "okay"),
    }
)
"""Greetings and politeness that may open or close a request ("Hi team, ...", "... Thanks in advance")."""
NEGATIONS = frozenset(
    {"not", "no", "never", "none", "nor", "nothing", "without", "cannot", "cant", "dont", "doesnt", "isnt", "t"}
    | {"arent", "wont"}
)
"""Words that turn a request around: never part of a typo."""


def _typo_distance(a: str, b: str) -> int:
    """Optimal-string-alignment edit distance (a transposition counts once): how far a typo is."""
    if a == b:
        return 0
    rows = [list(range(len(b) + 1))]
    for i in range(1, len(a) + 1):
        row = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            row[j] = min(rows[-1][j] + 1, row[j - 1] + 1, rows[-1][j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                row[j] = min(row[j], rows[-2][j - 2] + 1)
        rows.append(row)
    return rows[-1][-1]


def _is_typo(a: str, b: str) -> bool:
    """One slip (a letter added, dropped, changed or two swapped) in a word of five letters or more.

    Short words (Mary / Mark, UK / US), numbers and negations never count as typos; nor do prefixes
    (safe / unsafe is two letters apart).
    """
    if any(c.isdigit() for c in a + b) or a in NEGATIONS or b in NEGATIONS or max(len(a), len(b)) < 5:
        return False
    return _typo_distance(a, b) <= 1


def same_wording(a: str, b: str) -> bool:
    """Whether two requests differ only by case, punctuation, spacing, filler words and single-word typos.

    Embedding distance alone cannot tell a retry from a trap: on the fow-cache pairs, all-MiniLM-L6-v2 puts
    "transfer from savings to current" and "from current to savings" 0.002 apart, and "every 4 hours" / "every 2
    hours" 0.012 apart. Dedupe merges two requests (and drops one answer) only when this also holds, so changed
    numbers, negations, swapped or replaced words keep their own examples.
    """
    import difflib

    left = [w.casefold() for w in _WORD.findall(a)]
    right = [w.casefold() for w in _WORD.findall(b)]
    if left == right:
        return True
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=left, b=right, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        at_edge = (i1 == 0 and j1 == 0) or (i2 == len(left) and j2 == len(right))
        ignorable = FILLER_WORDS | EDGE_WORDS if at_edge else FILLER_WORDS
        removed = [w for w in left[i1:i2] if w not in ignorable]
        added = [w for w in right[j1:j2] if w not in ignorable]
        if "".join(removed) == "".join(added):  # only filler, or "e mail" / "email"
            continue
        if len(removed) == len(added) and all(map(_is_typo, removed, added)):
            continue
        return False
    return True


def request_text(example: Example) -> str:
    """The text that is embedded for an example: its ``request``."""
    return example.request


class ReplayItem(BaseModel):
    """A request worth re-answering with the large model when it is idle (to create or improve an example)."""

    id: str
    tenant: str
    request: str
    messages: list[Message] = Field(default_factory=list)
    value: float = Field(description="Higher is replayed first.")
    pushed_at: float = Field(default_factory=time.time)


class StoreStats(BaseModel):
    """What one tenant's collection holds and how it is used."""

    tenant: str
    count: int
    capacity: int
    embedder: str = ""
    dim: int | None = None
    expired: int = 0
    never_used: int = 0
    total_hits: int = 0
    mean_utility: float | None = None
    offload_successes: int = 0
    oldest_created_at: float | None = None
    newest_created_at: float | None = None
    hnsw: dict[str, Any] = Field(default_factory=dict)
    location: str = ""


class BaseExampleStore(ABC):
    """The async interface every example store implements; see :class:`~echo_middleware.store.ExampleStore`.

    Writes are durable when they return. Reads of a tenant that was never written return nothing (they never
    create it).
    """

    @abstractmethod
    async def add(self, examples: Sequence[Example]) -> list[str]:
        """Store examples (each in its ``tenant``); returns the id each one is stored under (dedupe may merge)."""

    @abstractmethod
    async def query(self, text: str, tenant: str, k: int, *, embedding: Any = None) -> list[Candidate]:
        """The ``k`` nearest stored requests by cosine distance, ascending; expired ones are left out."""

    @abstractmethod
    async def get(self, tenant: str, ids: Sequence[str]) -> list[Example]:
        """The examples with these ids, in the given order; missing ids are skipped."""

    @abstractmethod
    async def record_use(self, tenant: str, id_utilities: dict[str, float | None], success: bool | None = None) -> int:
        """Count one use of each example (hits, last_used, utility, offload success); returns how many exist."""

    @abstractmethod
    async def update(self, example: Example) -> None:
        """Replace a stored example (by ``example.tenant`` and ``example.id``)."""

    @abstractmethod
    async def delete(self, tenant: str, ids: Sequence[str]) -> int:
        """Delete examples by id; returns how many existed."""

    @abstractmethod
    async def delete_tenant(self, tenant: str) -> int:
        """Delete a tenant and every example in it; returns how many examples it held."""

    @abstractmethod
    async def tenants(self) -> list[str]:
        """Every tenant with a collection."""

    @abstractmethod
    async def count(self, tenant: str) -> int:
        """How many examples a tenant holds."""

    @abstractmethod
    async def stats(self, tenant: str) -> StoreStats:
        """Counts and usage statistics of a tenant."""

    @abstractmethod
    async def evict(self, tenant: str) -> int:
        """Remove expired examples, then the least valuable beyond capacity; returns how many were removed."""

    @abstractmethod
    async def export_jsonl(self, tenant: str, path: str | os.PathLike[str]) -> int:
        """Write every example of a tenant to a JSONL file (atomically); returns how many."""

    @abstractmethod
    async def import_jsonl(self, path: str | os.PathLike[str], tenant: str | None = None) -> int:
        """Add the examples of a JSONL file (into ``tenant`` when given); returns how many were read."""

    @abstractmethod
    async def push_replay(
        self, tenant: str, request_text: str, messages: Sequence[Message] | None, value: float
    ) -> str:
        """Queue a request for replay with the large model; the same request again keeps the higher value."""

    @abstractmethod
    async def pop_replay(self, n: int) -> list[ReplayItem]:
        """Take the ``n`` most valuable queued replays (across tenants) off the queue."""

    @abstractmethod
    async def close(self) -> None:
        """Finish pending writes and release the store."""
