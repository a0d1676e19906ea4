"""Real texts for the store benchmark, and their embeddings cached on disk.

Sources (copied into ``benchmarks/data/`` with their licences, see ``benchmarks/data/README.md``):

- NQ-open dev: 3,610 real search questions with short answers (CC BY-SA 3.0).
- EntityQuestions dev: 5,970 factoid questions, and 2,270 questions worded two ways (MIT).
- GSM8K test: 1,319 math word problems and their worked solutions (MIT).

Together they hold about 21k distinct real texts (questions, paraphrases, and the single lines of the GSM8K
solutions). A store of 100k needs more, so the pool is built in three honest tiers, in this order:

1. ``single``: each distinct real text once (questions, paraphrases, solution lines).
2. ``qa``: a question followed by its gold answer (``"<question> <answer>"``), the way a stored Q/A pair reads.
3. ``pair``: two different real questions joined by a space, as a request asking two things at once; drawn at
   random (fixed seed) without repeats until the pool is large enough.

So the 1k and 10k stores hold only real single texts; at 100k about a fifth are single texts, a tenth Q/A and the
rest pairs of real questions. The query set (never inserted) is the second wording of 500 EntityQuestions
paraphrase pairs, whose first wording is in the pool (the in-context-caching case), plus 500 NQ questions held out.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data"
SEED = 20240611
_CALC = re.compile(r"<<[^>]*>>")


@dataclass(frozen=True)
class Corpus:
    """The insert pool and the held-out queries, each text with the tier it came from."""

    texts: list[str]
    kinds: list[str]
    answers: list[str]
    queries: list[str]

    def composition(self, n: int) -> dict[str, int]:
        """How many of the first ``n`` pool texts come from each tier."""
        counts: dict[str, int] = {}
        for kind in self.kinds[:n]:
            counts[kind] = counts.get(kind, 0) + 1
        return counts


def _jsonl(path: Path) -> Iterator[dict]:  # type: ignore[type-arg]
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def build_corpus(size: int) -> Corpus:
    """The first ``size`` texts of the pool (tiers in order) and the 1,000 held-out queries."""
    rng = random.Random(SEED)
    nq = list(_jsonl(DATA / "nq_open" / "NQ-open.dev.jsonl"))
    eq = list(_jsonl(DATA / "entityquestions" / "dev_250_per_relation.jsonl"))
    para = list(_jsonl(DATA / "entityquestions" / "paraphrase_pairs_dev.jsonl"))
    gsm = list(_jsonl(DATA / "gsm8k" / "test.jsonl"))
    rng.shuffle(nq)
    rng.shuffle(para)

    queries = [p["paraphrase"] for p in para[:500]] + [q["question"] for q in nq[:500]]
    seen = {_norm(q) for q in queries}
    qa_sources: list[tuple[str, str]] = []
    singles: list[tuple[str, str]] = []

    def take(text: str, answer: str) -> None:
        text = " ".join(text.split())
        if text and _norm(text) not in seen:
            seen.add(_norm(text))
            singles.append((text, answer))

    for p in para[:500]:  # their first wording must be in the store: these are what the queries should find
        take(p["question"], p["answers"][0])
    for q in nq[500:]:
        take(q["question"], q["answer"][0])
        qa_sources.append((q["question"], q["answer"][0]))
    for q in eq:
        take(q["question"], q["answers"][0])
        qa_sources.append((q["question"], q["answers"][0]))
    for p in para[500:]:
        take(p["question"], p["answers"][0])
        take(p["paraphrase"], p["answers_paraphrase"][0])
        qa_sources.append((p["question"], p["answers"][0]))
    for g in gsm:
        solution, _, final = g["answer"].rpartition("####")
        take(g["question"], final.strip())
        for line in _CALC.sub("", solution).splitlines():
            take(line, final.strip())
    rng.shuffle(singles)
    pool = [(t, "single", a) for t, a in singles]

    if len(pool) < size:
        rng.shuffle(qa_sources)
        for question, answer in qa_sources:
            text = f"{' '.join(question.split())} {answer}"
            if _norm(text) not in seen:
                seen.add(_norm(text))
                pool.append((text, "qa", answer))
            if len(pool) >= size:
                break
    if len(pool) < size:
        questions = [t for t, _ in singles if t.endswith("?") or t[:1].islower()]
        while len(pool) < size:
            a, b = rng.sample(questions, 2)
            text = f"{a} {b}"
            if _norm(text) not in seen:
                seen.add(_norm(text))
                pool.append((text, "pair", ""))
    pool = pool[:size]
    return Corpus(
        texts=[t for t, _, _ in pool],
        kinds=[k for _, k, _ in pool],
        answers=[a for _, _, a in pool],
        queries=queries,
    )


def cached_embeddings(
    texts: Sequence[str],
    embed: Callable[[Sequence[str]], np.ndarray],
    cache_dir: Path,
    *,
    chunk: int = 2048,
    progress: str = "embed",
) -> np.ndarray:
    """Embeddings of ``texts``; each text is embedded once and kept in ``cache_dir`` across runs.

    The cache is a set of chunks: ``emb_<hash>.npy`` (vectors) beside ``emb_<hash>.json`` (their texts). Every
    cached text is reused whatever list it came in, so a run over 1k texts reuses what a 100k run embedded.
    """
    from tqdm import tqdm

    cache_dir.mkdir(parents=True, exist_ok=True)
    known: dict[str, np.ndarray] = {}
    for names_path in sorted(cache_dir.glob("emb_*.json")):
        vectors_path = names_path.with_suffix(".npy")
        if not vectors_path.is_file():
            continue
        names = json.loads(names_path.read_text(encoding="utf-8"))
        vectors = np.load(vectors_path)
        if len(names) == len(vectors):
            known.update(zip(names, vectors, strict=True))
    missing = [t for t in dict.fromkeys(texts) if t not in known]
    starts = range(0, len(missing), chunk)
    for start in tqdm(starts, desc=progress, unit="chunk", disable=len(starts) < 2):
        block = missing[start : start + chunk]
        vectors = np.asarray(embed(block), dtype=np.float32)
        key = hashlib.sha256("\x00".join(block).encode()).hexdigest()[:24]
        vectors_tmp = cache_dir / f".emb_{key}.npy"
        np.save(vectors_tmp, vectors)
        (cache_dir / f"emb_{key}.json").write_text(json.dumps(block), encoding="utf-8")
        vectors_tmp.replace(cache_dir / f"emb_{key}.npy")
        known.update(zip(block, vectors, strict=True))
    if not texts:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack([known[t] for t in texts]).astype(np.float32, copy=False)
