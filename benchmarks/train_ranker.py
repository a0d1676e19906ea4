"""Train the shipped utility ranker (``echo_middleware/data/ranker.json``) from outcomes on a public workload.

Reproducible: fixed seed, fixed data split, greedy decoding; every generation is cached on disk (``--cache``), so
a rerun (or a refit with other options) costs nothing but the fit.

What it does (``docs/architecture.md`` explains why):

1. **Workload** from ``benchmarks/data`` (EntityQuestions paraphrase pairs, MIT; NQ-open, CC BY-SA 3.0): a *pool*
   of past requests and a set of *queries*: second wordings of pooled questions (paraphrases: the example's
   answer carries over), verbatim repeats, fresh questions of the same relation templates (same wording,
   another entity: the classic trap of similarity) and fresh NQ questions. Only entity pairs with
   ``index % 4 == 0`` are used here; the benchmark (``benchmarks/echo_bench.py``) uses the others.
2. **Answers**: the large model answers every pooled request and every query (the reference).
3. **Labels**: for each query, its ``--candidates`` nearest pooled requests (real embedder, cosine) are put one at
   a time into the small model's prompt as a prior turn; the label is the agreement of that answer with the large
   model's answer to the query (:func:`echo_middleware.learn.quality.agreement`). The small model also answers
   without any example, for the "with vs without" report.
4. **Usage features** as the online pipeline would have them: each pooled example's utility statistics are the
   labels it earned on *other* queries where it was the nearest candidate (leave-one-out), so ``mean_utility``
   carries what record_use would have recorded.
5. **Fit** a logistic model on every feature (``utility``) and on similarity alone (``similarity``, the
   baseline), and report held-out metrics by 5-fold cross-fitting grouped by query.
6. **Calibration pairs**: with cross-fitted utilities, each query's selected examples (utility >=
   ``rank.min_utility``, at most ``rank.max_examples``) are put together in the small model's prompt; (best
   utility, measured agreement) is one held-out pair. A query with nothing selected gives (best utility, its best
   candidate's label): it is never offloaded, but retention is a share of all requests, so it counts in the
   denominator. The policy calibrates its threshold on these pairs at start.

Run (about 1.5 hours on two busy cores, far less on free ones; the cache makes reruns instant)::

    .venv/bin/python benchmarks/train_ranker.py              # writes echo_middleware/data/ranker.json
    .venv/bin/python benchmarks/train_ranker.py --quick      # a small smoke run, writes nothing by default
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from echo_middleware.config import RankConfig  # noqa: E402
from echo_middleware.learn.quality import agreement  # noqa: E402
from echo_middleware.rank.features import CONTEXT_KEY, FEATURE_NAMES, RankQuery, context_hash, pair_features  # noqa: E402
from echo_middleware.rank.model import LogisticModel  # noqa: E402
from echo_middleware.rank.utility import write_bundle  # noqa: E402
from echo_middleware.types import Candidate, Example, Message  # noqa: E402

logger = logging.getLogger("train_ranker")

DATA = ROOT / "benchmarks" / "data"
OUT = ROOT / "echo_middleware" / "data" / "ranker.json"
TABLE = ROOT / "benchmarks" / "results" / "ranker_training.jsonl"
QA_SYSTEM = "Answer the question with a short phrase only (a name, place or date). Do not explain."
"""The same system prompt as the benchmarks' QA workload: short answers keep CPU runs affordable."""


# ------------------------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class Request:
    """A pooled request or a query."""

    id: str
    text: str
    kind: str  # pool | paraphrase | repeat | fresh-template | fresh-open
    source: str
    twin: str | None = None  # the pooled request it rewords or repeats


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def build_workload(seed: int, scale: float) -> tuple[list[Request], list[Request]]:
    """The pool and the queries (see the module docstring); ``scale`` shrinks every count for quick runs."""
    rng = random.Random(seed)
    pairs = [row for i, row in enumerate(_jsonl(DATA / "entityquestions" / "paraphrase_pairs_dev.jsonl")) if i % 4 == 0]
    rng.shuffle(pairs)
    nq = [row for i, row in enumerate(_jsonl(DATA / "nq_open" / "NQ-open.dev.jsonl")) if i % 4 == 0]
    rng.shuffle(nq)

    def n(count: int) -> int:
        return max(2, round(count * scale))

    n_pool, n_para, n_repeat, n_fresh = n(70), n(40), n(10), n(25)
    n_nq_pool, n_nq_query = n(15), n(10)
    pool = [Request(f"eq-{i}", row["question"], "pool", "entityquestions") for i, row in enumerate(pairs[:n_pool])]
    queries: list[Request] = []
    for i, row in enumerate(pairs[:n_para]):
        queries.append(Request(f"eq-{i}-para", row["paraphrase"], "paraphrase", "entityquestions", f"eq-{i}"))
    for i in rng.sample(range(n_pool), n_repeat):
        queries.append(Request(f"eq-{i}-repeat", pool[i].text, "repeat", "entityquestions", pool[i].id))
    for i, row in enumerate(pairs[n_pool : n_pool + n_fresh]):
        queries.append(Request(f"eq-fresh-{i}", row["question"], "fresh-template", "entityquestions"))
    pool += [Request(f"nq-{i}", row["question"], "pool", "nq_open") for i, row in enumerate(nq[:n_nq_pool])]
    queries += [
        Request(f"nq-fresh-{i}", row["question"], "fresh-open", "nq_open")
        for i, row in enumerate(nq[n_nq_pool : n_nq_pool + n_nq_query])
    ]
    return pool, queries


# ----------------------------------------------------------------------------------------- generation


def _key(model: str, messages: Sequence[Message], max_tokens: int) -> str:
    payload = json.dumps([model, max_tokens, [m.model_dump() for m in messages]], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


class Generator:
    """Greedy batched generation with a model's chat template, cached on disk by (model, messages, max_tokens).

    Offline labelling uses transformers' batched ``generate`` (left padding) because it is several times faster on
    CPU than one request at a time; it applies the same chat template and greedy decoding as the transformers
    engine, so answers match the engine's up to numerics.
    """

    def __init__(self, model: str, cache: Path, *, batch_size: int, max_tokens: int, dtype: str) -> None:
        self.model = model
        self.cache_path = cache
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.dtype = dtype
        self._cache: dict[str, str] = {}
        if cache.is_file():
            for row in _jsonl(cache):
                self._cache[row["key"]] = row["text"]
        self._tok: Any = None
        self._lm: Any = None
        self.generated = 0

    def _load(self) -> None:
        if self._lm is not None:
            return
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from echo_middleware.models import model_path

        folder = model_path(self.model)
        self._tok = AutoTokenizer.from_pretrained(folder)
        self._tok.padding_side = "left"
        self._lm = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, self.dtype)).eval()

    def generate(self, conversations: Sequence[Sequence[Message]], desc: str) -> list[str]:
        keys = [_key(self.model, c, self.max_tokens) for c in conversations]
        todo = sorted({k: c for k, c in zip(keys, conversations, strict=True) if k not in self._cache}.items())
        if todo:
            self._load()
            # similar lengths together: less padding
            todo.sort(key=lambda kv: sum(len(m.content) for m in kv[1]))
            with self.cache_path.open("a", encoding="utf-8") as out:
                for start in tqdm(range(0, len(todo), self.batch_size), desc=f"{desc} ({self.model})", unit="batch"):
                    chunk = todo[start : start + self.batch_size]
                    texts = self._batch([c for _, c in chunk])
                    for (key, _), text in zip(chunk, texts, strict=True):
                        self._cache[key] = text
                        out.write(json.dumps({"key": key, "model": self.model, "text": text}) + "\n")
                    out.flush()
                    self.generated += len(chunk)
        return [self._cache[k] for k in keys]

    def _batch(self, conversations: Sequence[Sequence[Message]]) -> list[str]:
        import torch

        tok = self._tok
        prompts = [
            tok.apply_chat_template([m.model_dump() for m in c], add_generation_prompt=True, tokenize=False)
            for c in conversations
        ]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        with torch.inference_mode():
            out = self._lm.generate(**enc, max_new_tokens=self.max_tokens, do_sample=False, pad_token_id=pad)
        new = out[:, enc["input_ids"].shape[1] :]
        return [tok.decode(row, skip_special_tokens=True).strip() for row in new]


def conversation(text: str, examples: Sequence[tuple[str, str]] = ()) -> list[Message]:
    """System prompt, examples (given best first) as prior turns with the best last, then the request: what the
    pipeline sends (:func:`echo_middleware.rank.prompt.assemble_prompt`)."""
    turns = [Message(role="system", content=QA_SYSTEM)]
    for request, response in reversed(examples):
        turns += [Message(role="user", content=request), Message(role="assistant", content=response)]
    return [*turns, Message(role="user", content=text)]


# ------------------------------------------------------------------------------------------ training


@dataclass
class Row:
    """One (query, candidate) outcome."""

    query: Request
    candidate: Request
    example: Example
    distance: float
    small_with: str
    label: float
    features: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)


SIGNS: dict[str, int] = {
    "similarity": 1,
    "similarity_gap": -1,
    "exact_repeat": 1,
    "request_coverage": 1,
    "sim_x_entity_match": 1,
    "response_covers_entities": 1,
    "entity_mismatch": -1,
    "number_mismatch": -1,
    "negation_mismatch": -1,
}
"""Weights whose direction is known before any data: closeness and coverage help; being farther than the nearest
candidate, or a mismatch in names, numbers or negation, hurts. A few hundred labelled pairs over correlated features
can flip a trap signal; the constraint keeps the fit from learning that "same template, other entity" is good (see
:meth:`LogisticModel.fit`)."""


def signs_for(features: Sequence[str]) -> dict[str, int]:
    """The sign constraints that apply to ``features``."""
    return {f: s for f, s in SIGNS.items() if f in features}


def cross_fit(
    x: np.ndarray, y: np.ndarray, groups: np.ndarray, features: Sequence[str], folds: int, seed: int, l2: float
) -> np.ndarray:
    """Out-of-fold predictions, folds grouped by query (a query's candidates are never split)."""
    unique = np.unique(groups)
    rng = np.random.default_rng(seed)
    rng.shuffle(unique)
    fold_of = {g: i % folds for i, g in enumerate(unique)}
    which = np.array([fold_of[g] for g in groups])
    pred = np.zeros(len(y))
    for k in range(folds):
        test = which == k
        model = LogisticModel.fit(x[~test], y[~test], features, l2=l2, signs=signs_for(features))
        pred[test] = model.predict(x[test])
    return pred


def auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve (probability a positive outranks a negative; ties count half)."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def log_loss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--large", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--candidates", type=int, default=3, help="nearest pooled requests labelled per query")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--l2", type=float, default=4.0, help="L2 penalty (4: best held-out log loss on the shipped data)"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="shrink every count (0.2 for a smoke run)")
    parser.add_argument("--quick", action="store_true", help="--scale 0.2 and write nothing unless --out is given")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "echo-middleware" / "train_ranker.jsonl")
    parser.add_argument("--out", type=Path, default=None, help=f"bundle to write (default {OUT.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    scale = 0.2 if args.quick else args.scale
    out_path = args.out if args.out is not None else (None if args.quick else OUT)
    args.cache.parent.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    rank_cfg = RankConfig()

    pool, queries = build_workload(args.seed, scale)
    logger.info(
        "workload: %d pooled requests, %d queries (%s)",
        len(pool),
        len(queries),
        dict(sorted(_count(q.kind for q in queries).items())),
    )

    large = Generator(args.large, args.cache, batch_size=args.batch_size, max_tokens=args.max_tokens, dtype=args.dtype)
    small = Generator(args.small, args.cache, batch_size=args.batch_size, max_tokens=args.max_tokens, dtype=args.dtype)
    pool_answers = dict(
        zip([r.id for r in pool], large.generate([conversation(r.text) for r in pool], "pool"), strict=True)
    )
    query_answers = dict(
        zip([q.id for q in queries], large.generate([conversation(q.text) for q in queries], "queries"), strict=True)
    )
    large._lm = None  # free the large model's memory before the small one loads

    from echo_middleware.embed import create_embedder

    embedder = create_embedder()
    pool_vec = embedder.embed([r.text for r in pool])
    query_vec = embedder.embed([q.text for q in queries])
    sims = query_vec @ pool_vec.T

    context = context_hash(conversation("x")[:1])
    pairs: list[tuple[Request, Request, float]] = []
    for qi, query in enumerate(queries):
        order = np.argsort(-sims[qi])[: args.candidates]
        pairs += [(query, pool[j], float(1.0 - sims[qi, j])) for j in order]
    with_answers = small.generate(
        [conversation(q.text, [(c.text, pool_answers[c.id])]) for q, c, _ in pairs], "small with one example"
    )
    without = dict(
        zip(
            [q.id for q in queries],
            small.generate([conversation(q.text) for q in queries], "small without examples"),
            strict=True,
        )
    )
    labels = [
        agreement(a, query_answers[q.id], question=q.text) for (q, _, _), a in zip(pairs, with_answers, strict=True)
    ]

    # Leave-one-out usage statistics of each pooled example: what record_use would have accumulated. Online, an
    # example's utility is measured where it was *used*, i.e. where it ranked first, so only those count here.
    earned: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for k, ((q, c, _), label) in enumerate(zip(pairs, labels, strict=True)):
        if k % args.candidates == 0:  # pairs are in nearest-first order per query
            earned[c.id].append((q.id, label))

    rows: list[Row] = []
    for (q, c, dist), answer, label in zip(pairs, with_answers, labels, strict=True):
        others = [v for qid, v in earned[c.id] if qid != q.id]
        example = Example(
            id=c.id,
            request=c.text,
            response=pool_answers[c.id],
            quality=1.0,
            utility_sum=float(sum(others)),
            utility_n=len(others),
            hits=len(others),
            metadata={CONTEXT_KEY: context},
        )
        rows.append(Row(q, c, example, dist, answer, label))
    # features per query over its whole candidate list (similarity_gap needs the list)
    by_query: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_query[row.query.id].append(i)
    for idx in by_query.values():
        query = rows[idx[0]].query
        cands = [Candidate(example=rows[i].example, distance=rows[i].distance) for i in idx]
        feats = pair_features(RankQuery(query.text, context), cands)
        for i, f in zip(idx, feats, strict=True):
            rows[i].features = f

    x = np.vstack([r.features for r in rows])
    y = np.array([r.label for r in rows])
    groups = np.array([r.query.id for r in rows])
    models = {
        "utility": FEATURE_NAMES,
        "similarity": ("similarity",),
    }
    report: dict[str, Any] = {}
    bundle_rankers: dict[str, Any] = {}
    oof: dict[str, np.ndarray] = {}
    for name, feats in models.items():
        oof[name] = cross_fit(x, y, groups, feats, folds=5, seed=args.seed, l2=args.l2)
    # selection per query with out-of-fold utilities; multi-example prompts are generated
    selections: dict[str, list[tuple[Request, list[int], float]]] = {}
    multi: list[list[Message]] = []
    for name in models:
        chosen = []
        for idx in by_query.values():
            ranked = sorted(idx, key=lambda i: (-oof[name][i], rows[i].distance))
            picked = [i for i in ranked if oof[name][i] >= rank_cfg.min_utility][: rank_cfg.max_examples]
            if picked:
                chosen.append((rows[idx[0]].query, picked, float(oof[name][picked[0]])))
                if len(picked) > 1:
                    multi.append(
                        conversation(
                            rows[idx[0]].query.text,
                            [(rows[i].candidate.text, pool_answers[rows[i].candidate.id]) for i in picked],
                        )
                    )
        selections[name] = chosen
    multi_answers = dict(
        zip(
            [_key(args.small, m, args.max_tokens) for m in multi],
            small.generate(multi, "small with selected examples"),
            strict=True,
        )
    )

    for name, feats in models.items():
        final = LogisticModel.fit(x, y, feats, l2=args.l2, signs=signs_for(feats))
        # each query's top-ranked candidate by out-of-fold utility (nearest first on ties)
        best = {qid: max(idx, key=lambda i: (oof[name][i], -rows[i].distance)) for qid, idx in by_query.items()}
        calibration = []
        measured_by_kind: dict[str, list[float]] = defaultdict(list)
        for query, picked, best in selections[name]:
            if len(picked) == 1:
                measured = rows[picked[0]].label
            else:
                conv = conversation(
                    query.text, [(rows[i].candidate.text, pool_answers[rows[i].candidate.id]) for i in picked]
                )
                answer = multi_answers[_key(args.small, conv, args.max_tokens)]
                measured = agreement(answer, query_answers[query.id], question=query.text)
            calibration.append((round(best, 6), round(float(measured), 6)))
            measured_by_kind[query.kind].append(measured)
        # Retention is a share of *all* requests (route/calibration.py): a query with no usable example is answered
        # by the large model at any threshold, so it belongs in the denominator too. Its pair is its best
        # cross-fitted utility (below rank.min_utility, so never offloaded) and what its best candidate measured.
        selected = {query.id for query, _, _ in selections[name]}
        for qid, best_i in best.items():
            if qid not in selected:
                calibration.append((round(float(oof[name][best_i]), 6), round(float(rows[best_i].label), 6)))
        top1 = [rows[best_i].label for best_i in best.values()]
        metrics = {
            "rows": len(y),
            "queries": len(by_query),
            "auc_label_ge_0.5": auc(oof[name], y >= 0.5),
            "log_loss": log_loss(oof[name], y),
            "mean_label_of_top_ranked": float(np.mean(top1)),
            "queries_with_selected_examples": len(selections[name]),
            "mean_agreement_of_selected": (
                float(np.mean([q for _, q in calibration[: len(selections[name])]])) if selections[name] else None
            ),
        }
        report[name] = metrics
        bundle_rankers[name] = {"model": final.to_dict(), "calibration": calibration, "metrics": metrics}
        logger.info("%s: %s", name, json.dumps(metrics))
        logger.info(
            "%s weights: %s", name, {f: round(float(c), 3) for f, c in zip(final.features, final.coef, strict=True)}
        )

    oracle = float(np.mean([max(rows[i].label for i in idx) for idx in by_query.values()]))
    no_example = float(np.mean([agreement(without[q.id], query_answers[q.id], question=q.text) for q in queries]))
    by_kind = {
        kind: {
            "queries": len(qs),
            "agreement_without_examples": float(
                np.mean([agreement(without[q.id], query_answers[q.id], question=q.text) for q in qs])
            ),
            "agreement_best_single_example": float(np.mean([max(rows[i].label for i in by_query[q.id]) for q in qs])),
        }
        for kind, qs in _group(queries).items()
    }
    meta = {
        "created_by": "benchmarks/train_ranker.py",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "cache"},
        "small_model": args.small,
        "large_model": args.large,
        "workload": {
            "data": [
                "benchmarks/data/entityquestions/paraphrase_pairs_dev.jsonl (MIT)",
                "benchmarks/data/nq_open/NQ-open.dev.jsonl (CC BY-SA 3.0)",
            ],
            "split": "rows with index % 4 == 0 (the benchmark uses the others)",
            "pool": len(pool),
            "queries": _count(q.kind for q in queries),
            "system_prompt": QA_SYSTEM,
            "max_tokens": args.max_tokens,
        },
        "label": "agreement of the small model's answer (one example in its prompt) with the large model's answer",
        "agreement_oracle_best_candidate": oracle,
        "agreement_without_examples": no_example,
        "by_kind": by_kind,
        "seconds": round(time.monotonic() - began, 1),
    }
    logger.info("oracle %.3f, without examples %.3f; by kind: %s", oracle, no_example, json.dumps(by_kind))
    TABLE.parent.mkdir(parents=True, exist_ok=True)
    if out_path is not None:
        write_bundle(out_path, {**meta, "rankers": bundle_rankers})
        with TABLE.open("w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(
                    json.dumps(
                        {
                            "query": r.query.text,
                            "query_kind": r.query.kind,
                            "candidate": r.candidate.text,
                            "candidate_answer": pool_answers[r.candidate.id],
                            "distance": round(r.distance, 6),
                            "large_answer": query_answers[r.query.id],
                            "small_with_example": r.small_with,
                            "small_without": without[r.query.id],
                            "label": round(r.label, 6),
                        }
                    )
                    + "\n"
                )
        logger.info("wrote %s and %s in %.0f s", out_path, TABLE, time.monotonic() - began)
    else:
        logger.info("quick run: nothing written (%.0f s)", time.monotonic() - began)
    print(
        json.dumps(
            {
                "metrics": report,
                **{k: meta[k] for k in ("agreement_oracle_best_candidate", "agreement_without_examples", "by_kind")},
            },
            indent=1,
        )
    )
    return 0


def _count(values: Iterator[str] | Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for v in values:
        out[v] += 1
    return dict(out)


def _group(queries: Sequence[Request]) -> dict[str, list[Request]]:
    out: dict[str, list[Request]] = defaultdict(list)
    for q in queries:
        out[q.kind].append(q)
    return dict(out)


if __name__ == "__main__":
    raise SystemExit(main())
