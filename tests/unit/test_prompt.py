"""Prompt assembly: examples as prior turns, best first, within the small model's context window."""

from __future__ import annotations

from pipeline_fakes import ScriptedEngine

from echo_middleware.rank.prompt import assemble_prompt, select_examples
from echo_middleware.types import Candidate, Example, Message


def ex(request: str, response: str, utility: float = 0.9) -> Candidate:
    return Candidate(example=Example(request=request, response=response), distance=0.1, utility=utility)


def engine(window: int) -> ScriptedEngine:
    return ScriptedEngine("small", lambda r: "", window=window)  # a token is a word


CONVERSATION = [Message(role="system", content="Be brief."), Message(role="user", content="where is paris")]


async def test_examples_become_prior_turns_after_the_system_prompt_with_the_best_nearest_the_question() -> None:
    best, second = ex("capital of france", "paris"), ex("capital of spain", "madrid")
    out = await assemble_prompt(CONVERSATION, [best, second], engine(4096), max_new_tokens=16)
    assert [(m.role, m.content) for m in out.messages] == [
        ("system", "Be brief."),
        ("user", "capital of spain"),
        ("assistant", "madrid"),
        ("user", "capital of france"),
        ("assistant", "paris"),
        ("user", "where is paris"),
    ]
    assert out.used == [best, second]
    assert out.skipped == []


async def test_budget_counts_with_the_engine_tokenizer_and_skips_what_does_not_fit() -> None:
    long = ex("tell me everything", " ".join(["word"] * 60))
    short = ex("capital of spain", "madrid")
    # conversation: reserve 48 + (2 + 8) + (3 + 8) = 69; answer 16 -> budget 100 - 85 = 15 for examples
    # the long example costs 3 + 60 + 16 = 79 (skipped), the short one 3 + 1 + 16 = 20: over 15, skipped too
    out = await assemble_prompt(CONVERSATION, [long, short], engine(100), max_new_tokens=16)
    assert out.used == []
    assert out.skipped == [long, short]
    assert out.budget_tokens == 15
    # with 5 more tokens of room the short one fits, the long one still not
    out = await assemble_prompt(CONVERSATION, [long, short], engine(105), max_new_tokens=16)
    assert out.used == [short]
    assert out.skipped == [long]
    assert out.prompt_tokens == 69 + 20
    assert out.messages[-1] == CONVERSATION[-1]


async def test_no_room_at_all_keeps_the_conversation_unchanged() -> None:
    out = await assemble_prompt(CONVERSATION, [ex("a", "b")], engine(10), max_new_tokens=16)
    assert out.messages == CONVERSATION
    assert out.used == []
    assert out.budget_tokens == 0


def test_select_examples_by_utility_and_count() -> None:
    ranked = [ex("a", "1", 0.9), ex("b", "2", 0.7), ex("c", "3", 0.4), ex("d", "4", 0.8)]
    assert [c.example.request for c in select_examples(ranked, 0.5, 2)] == ["a", "b"]
    assert [c.example.request for c in select_examples(ranked, 0.75, 4)] == ["a", "d"]
    assert select_examples(ranked, 0.95, 4) == []
    assert select_examples(ranked, 0.0, 0) == []
