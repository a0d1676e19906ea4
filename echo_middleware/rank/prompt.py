"""Choosing the examples for the small model's prompt and fitting them into its context window.

Examples become prior turns of the conversation (``user``: the past request, ``assistant``: its answer), after any
system prompt and before the conversation itself, with the **best example last**, right before the question: small
models lean on the most recent turn (with an unrelated example last, SmolLM2 copies its answer), and putting the
most similar demonstration nearest the query is also what works best for in-context examples in general (Liu et
al., 2022, "What Makes Good In-Context Examples for GPT-3?"). They are rendered by the small model's own
chat template (the engine applies it), so the model sees them exactly as it sees a real earlier exchange.

The budget is counted with the small model's tokenizer (``engine.count_tokens``): the context window minus the
conversation, the answer's ``max_tokens``, a per-turn allowance for the template's markers and a fixed reserve for
a default system prompt the template may add. An example that does not fit is skipped and the next (shorter) one
is tried, so one long example cannot crowd out several short useful ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from echo_middleware.engines.base import Engine
from echo_middleware.types import Candidate, Message

TURN_OVERHEAD_TOKENS = 8
"""Tokens a chat template adds around one turn (``<|im_start|>user\\n ... <|im_end|>\\n`` is 5 in Qwen)."""
TEMPLATE_RESERVE_TOKENS = 48
"""Tokens kept for what a template adds once (Qwen adds a default system prompt of about 30 tokens)."""


def select_examples(ranked: Sequence[Candidate], min_utility: float, max_examples: int) -> list[Candidate]:
    """The usable examples: utility at least ``min_utility``, best first, at most ``max_examples``."""
    chosen = [c for c in ranked if c.utility is not None and c.utility >= min_utility]
    return chosen[:max_examples]


@dataclass(frozen=True)
class AssembledPrompt:
    """The small model's messages and what went into them."""

    messages: list[Message]
    used: list[Candidate]
    skipped: list[Candidate]
    prompt_tokens: int
    budget_tokens: int


async def assemble_prompt(
    messages: Sequence[Message],
    examples: Sequence[Candidate],
    engine: Engine,
    max_new_tokens: int,
    *,
    turn_overhead: int = TURN_OVERHEAD_TOKENS,
    reserve: int = TEMPLATE_RESERVE_TOKENS,
) -> AssembledPrompt:
    """Put ``examples`` (given best first) as prior turns, best last, before the conversation, within the budget.

    Args:
        messages: The request's conversation; its system messages stay first.
        examples: Candidate examples, best first.
        engine: The engine that will answer (its tokenizer and context window are used).
        max_new_tokens: Tokens kept free for the answer.
        turn_overhead: Template tokens counted per turn.
        reserve: Template tokens counted once.

    Returns:
        The messages to send and which examples made it in (``used``: best first, as given). When the
        conversation alone does not fit, no example is added (the engine reports the overflow as it would
        without examples).
    """
    system = [m for m in messages if m.role == "system"]
    rest = [m for m in messages if m.role != "system"]
    base = reserve
    for message in messages:
        base += await engine.count_tokens(message.content) + turn_overhead
    budget = engine.context_window - max_new_tokens - base
    used: list[Candidate] = []
    skipped: list[Candidate] = []
    turns: list[Message] = []
    spent = 0
    for cand in examples:
        ex = cand.example
        cost = await engine.count_tokens(ex.request) + await engine.count_tokens(ex.response) + 2 * turn_overhead
        if spent + cost > budget:
            skipped.append(cand)
            continue
        spent += cost
        used.append(cand)
        turns[:0] = [Message(role="user", content=ex.request), Message(role="assistant", content=ex.response)]
    return AssembledPrompt(
        messages=[*system, *turns, *rest],
        used=used,
        skipped=skipped,
        prompt_tokens=base + spent,
        budget_tokens=max(0, budget),
    )


__all__ = ["AssembledPrompt", "assemble_prompt", "select_examples"]
