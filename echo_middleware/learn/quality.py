"""Answer quality and agreement measures, shared by the learner, the ranker's training script and the benchmarks.

The pipeline never has a gold answer at run time: what it can measure is whether the small model's answer
*agrees* with the large model's answer to the same request (shadow checks, probes, the ranker's training labels).
The benchmarks measure the same functions against gold answers. Keeping both in one module keeps "quality" one
definition.

Everything here is pure Python (no model, no network) except :func:`embedding_cosine`, which takes an embedder,
and :func:`rouge_l`, which uses ``rouge-score`` when it is installed (the ``bench`` extra) and an exact
longest-common-subsequence implementation otherwise (same tokenisation, no stemming).
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation) | {"‘", "’", "“", "”", "–", "—", "…"}
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_GSM_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")
_FUNCTION_WORDS_TEXT = (
    "a an the of in on at to for from by with and or is are was were be been it its this that as he she "
    "they his her their i you we my your our which who what "
)
_FUNCTION_WORDS = frozenset(_FUNCTION_WORDS_TEXT.split())

AgreementKind = Literal["auto", "short", "numeric", "text"]
"""How :func:`agreement` compares two answers: ``auto`` picks from the reference's shape."""


def normalize_answer(text: str) -> str:
    """Lower-case, strip accents, punctuation, articles and extra whitespace (SQuAD's normalisation).

    Why: "The Eiffel Tower." and "eiffel tower" are the same answer; a metric that counts them as different
    would punish the small model for style, not substance.
    """
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).lower()
    text = "".join(ch if ch not in _PUNCT else " " for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised texts are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def contains(prediction: str, reference: str) -> float:
    """1.0 when the normalised reference appears in the normalised prediction as whole words.

    Short gold answers ("Mississauga") inside a sentence ("She was born in Mississauga, Ontario") count as right;
    this is how open-domain QA is usually scored for chatty models.
    """
    ref = normalize_answer(reference)
    if not ref:
        return 0.0
    return float(f" {ref} " in f" {normalize_answer(prediction)} ")


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall after normalisation (SQuAD F1)."""
    pred, ref = _tokens(prediction), _tokens(reference)
    if not pred and not ref:
        return 1.0
    if not pred or not ref:
        return 0.0
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def _to_float(text: str) -> float | None:
    cleaned = text.replace(",", "").replace("$", "").rstrip(".")
    try:
        return float(cleaned)
    except ValueError:
        return None


def extract_number(text: str) -> float | None:
    """The answer's number: GSM8K's ``#### N`` when present, else the last number in the text."""
    final = _GSM_FINAL.search(text)
    if final:
        return _to_float(final.group(1))
    numbers = _NUMBER.findall(text)
    for raw in reversed(numbers):
        value = _to_float(raw)
        if value is not None:
            return value
    return None


def numeric_match(prediction: str, reference: str, rel_tol: float = 1e-6) -> float:
    """1.0 when both texts end in the same number (GSM8K-style scoring), else 0.0."""
    pred, ref = extract_number(prediction), extract_number(reference)
    if pred is None or ref is None:
        return 0.0
    return float(math.isclose(pred, ref, rel_tol=rel_tol, abs_tol=1e-9))


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


_rouge_scorer: Any = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of words).

    Uses Google's ``rouge-score`` when installed; otherwise the same definition computed here, so the value is
    the same with or without the extra (``rouge-score`` tokenises lower-cased ``[a-z0-9]+`` runs, as here).
    """
    global _rouge_scorer
    if _rouge_scorer is None:
        try:
            from rouge_score import rouge_scorer

            _rouge_scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        except ImportError:
            _rouge_scorer = False
    if _rouge_scorer:
        return float(_rouge_scorer.score(reference, prediction)["rougeL"].fmeasure)
    pred = _ROUGE_TOKEN.findall(prediction.lower())
    ref = _ROUGE_TOKEN.findall(reference.lower())
    lcs = _lcs(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def embedding_cosine(prediction: str, reference: str, embedder: Any) -> float:
    """Cosine similarity of the two texts' sentence embeddings, clipped to [0, 1].

    Args:
        prediction: One answer.
        reference: The other answer.
        embedder: Anything with ``embed(list[str]) -> np.ndarray`` of normalised rows
            (:class:`~echo_middleware.embed.SentenceEmbedder`).
    """
    vectors = embedder.embed([prediction, reference])
    cosine = float((vectors[0] * vectors[1]).sum())
    return min(1.0, max(0.0, cosine))


def best_over(prediction: str, references: Iterable[str], metric: Callable[[str, str], float]) -> float:
    """The best score of ``prediction`` against any of several acceptable references (answer aliases)."""
    return max((metric(prediction, ref) for ref in references), default=0.0)


def answer_kind(reference: str) -> AgreementKind:
    """``numeric`` for answers that end in a number worth checking (GSM8K), ``short`` for short answers, else text."""
    if _GSM_FINAL.search(reference):
        return "numeric"
    words = len(reference.split())
    if words <= 12:
        return "numeric" if _NUMBER.fullmatch(reference.strip().rstrip(".")) else "short"
    return "text"


def _content(text: str, question_words: set[str]) -> str:
    """``text`` without the words it shares with the question (keeps it whole if that would empty it)."""
    words = _tokens(text)
    kept = [w for w in words if w not in question_words and w not in _FUNCTION_WORDS]
    return " ".join(kept if kept else words)


def agreement(prediction: str, reference: str, kind: AgreementKind = "auto", question: str | None = None) -> float:
    """How well ``prediction`` agrees with ``reference``, in [0, 1]: the one quality signal the pipeline learns from.

    - ``numeric``: the final numbers match (math, counts).
    - ``short``: the best of exact match, containment either way and token F1 (a short answer that says the same
      thing in a sentence still agrees).
    - ``text``: the mean of token F1 and ROUGE-L (long answers share content, not wording).

    Args:
        prediction: The answer being judged (the small model's).
        reference: The answer taken as right (the large model's, or a gold answer).
        kind: The comparison; ``auto`` picks from the reference's shape (:func:`answer_kind`).
        question: The request both answer. Chat models restate the question ("X was born in London" vs "X was
            born in Paris"); words of the question and function words are dropped from both answers before
            short answers are compared, so agreement measures the answer, not the echo of the question.
    """
    if kind == "auto":
        kind = answer_kind(reference)
        if kind == "text" and len(prediction.split()) <= 12 and len(reference.split()) <= 24:
            kind = "short"
    if kind == "numeric":
        return numeric_match(prediction, reference)
    if kind == "short":
        if question:
            asked = set(_tokens(question))
            prediction, reference = _content(prediction, asked), _content(reference, asked)
        pred_norm, ref_norm = normalize_answer(prediction), normalize_answer(reference)
        if not pred_norm or not ref_norm:
            return float(pred_norm == ref_norm)
        if pred_norm == ref_norm:
            return 1.0
        inside = contains(prediction, reference) or contains(reference, prediction)
        return max(float(inside), token_f1(prediction, reference))
    return 0.5 * (token_f1(prediction, reference) + rouge_l(prediction, reference))


def gold_score(prediction: str, answers: Sequence[str], kind: AgreementKind = "auto") -> float:
    """Score against gold answer aliases: containment of any alias for short answers, else :func:`agreement`.

    Open-domain QA gold answers are short spans ("Mississauga") while models answer in sentences, so a match is a
    gold span inside the answer; numeric answers compare the final numbers.
    """
    if not answers:
        return 0.0
    if kind == "auto":
        kind = answer_kind(answers[0])
    if kind == "numeric":
        return best_over(prediction, answers, numeric_match)
    if kind == "short":
        return best_over(prediction, answers, contains)
    return best_over(prediction, answers, lambda p, r: agreement(p, r, "text"))


__all__ = [
    "AgreementKind",
    "agreement",
    "answer_kind",
    "best_over",
    "contains",
    "embedding_cosine",
    "exact_match",
    "extract_number",
    "gold_score",
    "normalize_answer",
    "numeric_match",
    "rouge_l",
    "token_f1",
]
