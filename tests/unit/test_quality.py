"""Agreement and quality measures shared by the learner, the ranker's training and the benchmarks."""

from __future__ import annotations

import numpy as np
import pytest

from echo_middleware.learn import quality
from echo_middleware.learn.quality import (
    agreement,
    answer_kind,
    contains,
    embedding_cosine,
    exact_match,
    extract_number,
    gold_score,
    normalize_answer,
    numeric_match,
    rouge_l,
    token_f1,
)


def test_normalize_answer_drops_case_accents_punctuation_and_articles() -> None:
    assert normalize_answer("The  Café, Paris!") == "cafe paris"
    assert normalize_answer("“An” apple’s core") == "apple s core"


def test_exact_match_and_contains() -> None:
    assert exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    assert exact_match("Eiffel", "eiffel tower") == 0.0
    assert contains("She was born in Mississauga, Ontario.", "Mississauga") == 1.0
    # whole words only: "Paris" is not inside "Parisian"
    assert contains("A Parisian artist", "Paris") == 0.0
    assert contains("anything", "") == 0.0


def test_token_f1_matches_squad_definition() -> None:
    assert token_f1("red blue", "red green") == pytest.approx(0.5)
    assert token_f1("", "") == 1.0
    assert token_f1("x", "") == 0.0
    assert token_f1("a b c", "d e") == 0.0


def test_numbers_are_read_from_gsm8k_answers_and_sentences() -> None:
    assert extract_number("She makes 9 * 2 = $18 every day.\n#### 18") == 18.0
    assert extract_number("The total is 1,250 dollars.") == 1250.0
    assert extract_number("no digits here") is None
    assert numeric_match("So the answer is 18.", "steps...\n#### 18") == 1.0
    assert numeric_match("So the answer is 17.", "#### 18") == 0.0
    assert numeric_match("none", "#### 18") == 0.0


def test_rouge_l_is_the_same_with_and_without_rouge_score(monkeypatch: pytest.MonkeyPatch) -> None:
    pairs = [("the cat sat on the mat", "the cat is on the mat"), ("a b c d", "d c b a"), ("x", "y")]
    with_package = [rouge_l(p, r) for p, r in pairs]
    monkeypatch.setattr(quality, "_rouge_scorer", False)  # force the built-in LCS
    without = [rouge_l(p, r) for p, r in pairs]
    assert with_package == pytest.approx(without)
    assert without[0] == pytest.approx(5 / 6)
    assert without[2] == 0.0


def test_agreement_ignores_the_echo_of_the_question() -> None:
    question = "Where was Alison Kreviazuk born?"
    large = "Alison Kreviazuk was born in Mississauga, Ontario, Canada."
    assert agreement("Alison Kreviazuk was born in London, England.", large, question=question) == 0.0
    assert agreement("Alison Kreviazuk was born in Mississauga.", large, question=question) == 1.0
    assert agreement("Mississauga", large, question=question) == 1.0
    # without the question, the restated subject makes a wrong answer look half right
    assert agreement("Alison Kreviazuk was born in London, England.", large) > 0.3


def test_agreement_kinds() -> None:
    assert answer_kind("work...\n#### 42") == "numeric"
    assert answer_kind("42") == "numeric"
    assert answer_kind("Mississauga") == "short"
    long_ref = " ".join(["word"] * 40)
    assert answer_kind(long_ref) == "text"
    assert agreement("The answer is 42", "lots of work\n#### 42") == 1.0
    assert agreement(long_ref, long_ref) == pytest.approx(1.0)
    assert 0.0 < agreement(" ".join(["word"] * 20), long_ref) < 1.0


def test_gold_score_uses_aliases() -> None:
    assert gold_score("It was in December 1972.", ["14 December 1972 UTC", "December 1972"]) == 1.0
    assert gold_score("It was in 1969.", ["December 1972"]) == 0.0
    assert gold_score("anything", []) == 0.0
    assert gold_score("so 18 dollars", ["#### 18"]) == 1.0


def test_embedding_cosine_clips_to_unit_interval() -> None:
    class Embedder:
        def __init__(self, vectors: np.ndarray) -> None:
            self.vectors = vectors

        def embed(self, texts: list[str]) -> np.ndarray:
            return self.vectors

    same = Embedder(np.array([[0.6, 0.8], [0.6, 0.8]]))
    opposite = Embedder(np.array([[1.0, 0.0], [-1.0, 0.0]]))
    assert embedding_cosine("a", "b", same) == pytest.approx(1.0)
    assert embedding_cosine("a", "b", opposite) == 0.0
