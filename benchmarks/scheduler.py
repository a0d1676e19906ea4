"""Scheduler benchmark: FCFS vs shortest-job-first with predicted and with true lengths, on a real mixed trace.

What is real and what is simulated:

- **Real requests and lengths.** The trace mixes four public datasets copied in ``benchmarks/data/`` (licences
  beside them): GSM8K problems (worked solutions), NQ-open and EntityQuestions (short factoid answers) and the
  MT-Bench questions that have GPT-4 reference answers (both turns). A request's true output length is its
  reference answer's length in tokens of the Qwen2.5 tokenizer (the default models' tokenizer).
- **Real predictor.** :class:`echo_middleware.predict.LengthPredictor` is trained on the first half of each
  source and predicts the held-out half from request features, the task label and the answer lengths of the
  nearest training requests (all-MiniLM-L6-v2 embeddings, exact cosine kNN); its MAE and Spearman on the
  held-out requests are reported, next to simpler baselines.
- **Real scheduler.** :class:`echo_middleware.schedule.Scheduler`, unchanged, with default settings apart from
  the policy and ``max_concurrency``.
- **Simulated engine and clock.** Service times come from a discrete-event simulation of a continuous-batching
  engine (``benchmarks/_sim.py``) whose step time per batch size and prefill time per token were *measured* on
  this machine by ``benchmarks/calibrate_engine.py`` (transformers ``generate`` of Qwen2.5-Coder-0.5B). The
  event loop runs on virtual time, so an hour of traffic replays in seconds, deterministically.

Arrivals are Poisson at several loads, given as a share of the engine's estimated capacity (the highest at or
above saturation); every policy sees the same arrivals. Each request gets a priority class at random
(interactive 30%, standard 50%, batch 20%) with an SLO in units of the full-batch step time ``S``: interactive
``ttft_s = 20 S``, standard ``latency_s = 400 S``, batch ``latency_s = 2000 S``.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/scheduler.py`` (about a minute; writes
``benchmarks/results/scheduler.{json,md,png}``).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import random
import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from _sim import SimulatedEngine, VirtualTimeLoop

from echo_middleware.config import PredictConfig, ScheduleConfig
from echo_middleware.predict import LengthPredictor, LengthSample, length_errors
from echo_middleware.schedule import FinishedRequest, Scheduler
from echo_middleware.types import SLO, Candidate, EngineRequest, Example, PriorityClass, SamplingParams

DATA = Path(__file__).parent / "data"
RESULTS = Path(__file__).parent / "results"
SOURCES = ("gsm8k", "nq_open", "entityquestions", "mt_bench")
CLASSES: tuple[PriorityClass, ...] = ("interactive", "standard", "batch")
CLASS_SHARE = (0.3, 0.5, 0.2)
POLICIES = {
    "fcfs": ("fcfs", "none"),
    "sjf_predicted": ("sjf", "predicted"),
    "sjf_oracle": ("sjf", "true"),
    "slo_predicted": ("slo", "predicted"),
}
"""Result key -> (schedule.policy, which lengths the scheduler is given)."""


@dataclass
class Item:
    id: str
    source: str
    text: str
    """The last user turn: what is embedded and what the predictor reads."""
    prompt_tokens: int
    true_tokens: int


# ------------------------------------------------------------------------------------------ data


def token_counter() -> tuple[Callable[[str], int], str]:
    """The Qwen2.5 tokenizer when the bundled model is fetched, else a regex word/punctuation count (stated)."""
    try:
        from tokenizers import Tokenizer

        from echo_middleware.models import model_path

        tok = Tokenizer.from_file(str(model_path("qwen2.5-coder-0.5b-instruct") / "tokenizer.json"))
        return (lambda s: len(tok.encode(s, add_special_tokens=False).ids)), "Qwen2.5 tokenizer"
    except Exception as exc:
        logging.warning("Qwen tokenizer unavailable (%s): counting words and punctuation instead", exc)
        pattern = re.compile(r"\w+|[^\w\s]")
        return (lambda s: len(pattern.findall(s))), "regex words+punctuation (fallback)"


def _jsonl(path: Path) -> list[dict[str, object]]:
    with path.open() as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_items(count: Callable[[str], int]) -> list[Item]:
    items: list[Item] = []
    for i, row in enumerate(_jsonl(DATA / "gsm8k" / "test.jsonl")):
        q, a = str(row["question"]), str(row["answer"])
        items.append(Item(f"gsm8k-{i}", "gsm8k", q, count(q), count(a)))
    for i, row in enumerate(_jsonl(DATA / "nq_open" / "NQ-open.dev.jsonl")):
        q, a = str(row["question"]), str(row["answer"][0])  # type: ignore[index]
        items.append(Item(f"nq-{i}", "nq_open", q, count(q), count(a)))
    for i, row in enumerate(_jsonl(DATA / "entityquestions" / "dev_250_per_relation.jsonl")):
        q, a = str(row["question"]), str(row["answers"][0])  # type: ignore[index]
        items.append(Item(f"eq-{i}", "entityquestions", q, count(q), count(a)))
    questions = {row["question_id"]: row for row in _jsonl(DATA / "mt_bench" / "mt_bench_question.jsonl")}
    for row in _jsonl(DATA / "mt_bench" / "mt_bench_reference_answer_gpt-4.jsonl"):
        qid = row["question_id"]
        turns = questions[qid]["turns"]  # type: ignore[index]
        answers = row["choices"][0]["turns"]  # type: ignore[index]
        conversation = ""
        for t, (q, a) in enumerate(zip(turns, answers, strict=False)):
            conversation += q
            items.append(Item(f"mt-{qid}-{t}", "mt_bench", q, count(conversation), count(a)))
            conversation += "\n\n" + a + "\n\n"
    return items


def split(items: list[Item], train_n: int, test_n: int, seed: int) -> tuple[list[Item], list[Item]]:
    """Per source: a random first part to train on and a disjoint held-out part (MT-Bench split by question)."""
    rng = random.Random(seed)
    train, test = [], []
    for source in SOURCES:
        pool = [it for it in items if it.source == source]
        if source == "mt_bench":  # both turns of a question stay on the same side
            qids = sorted({it.id.split("-")[1] for it in pool})
            rng.shuffle(qids)
            held = set(qids[: len(qids) // 2])
            test += [it for it in pool if it.id.split("-")[1] in held]
            train += [it for it in pool if it.id.split("-")[1] not in held]
            continue
        rng.shuffle(pool)
        train += pool[:train_n]
        test += pool[train_n : train_n + test_n]
    return train, test


# ------------------------------------------------------------------------------------------ prediction


def embed(texts: Sequence[str], cache: Path | None = None) -> np.ndarray:
    """all-MiniLM-L6-v2 embeddings (unit norm); with ``cache``, reused across runs when the texts are the same."""
    key = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
    cached = cache / f"embeddings-{key}.npy" if cache is not None else None
    if cached is not None and cached.exists():
        return np.load(cached)
    from sentence_transformers import SentenceTransformer

    from echo_middleware.models import model_path

    model = SentenceTransformer(str(model_path("all-minilm-l6-v2")), device="cpu")
    vectors = np.asarray(
        model.encode(list(texts), batch_size=64, normalize_embeddings=True, show_progress_bar=True), dtype=np.float32
    )
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.save(cached, vectors)
    return vectors


def neighbours(
    query: np.ndarray, base: np.ndarray, base_items: list[Item], k: int, exclude_self: bool
) -> list[list[Candidate]]:
    """Exact cosine kNN (what Chroma's HNSW approximates); distance = 1 - cosine, as Chroma reports it."""
    sims = query @ base.T
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    top = np.argsort(-sims, axis=1)[:, :k]
    out = []
    for row, idx in enumerate(top):
        out.append(
            [
                Candidate(
                    example=Example(request=base_items[j].text, response="", response_tokens=base_items[j].true_tokens),
                    distance=float(1.0 - sims[row, j]),
                )
                for j in idx
            ]
        )
    return out


def evaluate_predictor(
    train: list[Item], test: list[Item], emb_train: np.ndarray, emb_test: np.ndarray, seed: int
) -> tuple[np.ndarray, dict[str, object]]:
    """Train on ``train`` (in a shuffled order, online), predict ``test``; errors of ours and of baselines."""
    cfg = PredictConfig()
    k = cfg.neighbours
    cand_train = neighbours(emb_train, emb_train, train, k, exclude_self=True)
    cand_test = neighbours(emb_test, emb_train, train, k, exclude_self=False)
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)

    def fitted(use_task: bool, use_neighbours: bool) -> LengthPredictor:
        p = LengthPredictor(cfg)
        p.fit(
            LengthSample(
                text=train[i].text,
                actual_tokens=train[i].true_tokens,
                candidates=cand_train[i] if use_neighbours else (),
                embedding=emb_train[i],
                prompt_tokens=train[i].prompt_tokens,
                task=train[i].source if use_task else None,
            )
            for i in order
        )
        return p

    def predict_all(p: LengthPredictor, use_task: bool, use_neighbours: bool) -> np.ndarray:
        return np.array(
            [
                p.predict(
                    it.text,
                    cand_test[j] if use_neighbours else (),
                    embedding=emb_test[j],
                    prompt_tokens=it.prompt_tokens,
                    task=it.source if use_task else None,
                ).tokens
                for j, it in enumerate(test)
            ]
        )

    actual = np.array([it.true_tokens for it in test], dtype=float)
    ours = predict_all(fitted(True, True), True, True)
    variants: dict[str, np.ndarray] = {
        "ours (neighbours + regressor, task label)": ours,
        "ours without task label": predict_all(fitted(False, True), False, True),
        "ours without neighbours": predict_all(fitted(True, False), True, False),
    }
    nb_only = LengthPredictor(PredictConfig(min_observations=10**9))  # never trusts a regressor
    variants["neighbours only (weighted mean)"] = np.array(
        [nb_only.predict(it.text, cand_test[j]).tokens for j, it in enumerate(test)]
    )
    by_source_median = {s: float(np.median([it.true_tokens for it in train if it.source == s])) for s in SOURCES}
    variants["task median"] = np.array([by_source_median[it.source] for it in test])
    variants["global median"] = np.full(len(test), float(np.median([it.true_tokens for it in train])))

    report: dict[str, object] = {"n_train": len(train), "n_test": len(test), "k_neighbours": k, "variants": {}}
    sources = np.array([it.source for it in test])
    for name, pred in variants.items():
        entry: dict[str, object] = {"all": length_errors(pred, actual)}
        for s in SOURCES:
            mask = sources == s
            entry[s] = length_errors(pred[mask], actual[mask])
        report["variants"][name] = entry  # type: ignore[index]
    return ours, report


# ------------------------------------------------------------------------------------------ simulation


def load_calibration(path: Path) -> dict[str, object]:
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/calibrate_engine.py`")
    return json.loads(path.read_text())


def step_function(calib: dict[str, object]) -> Callable[[int], float]:
    """Step time of a batch of ``b`` sequences: interpolated between the measured batch sizes, linear beyond."""
    rows = sorted(calib["decode"], key=lambda r: r["batch"])  # type: ignore[arg-type, index]
    xs = np.array([r["batch"] for r in rows], dtype=float)
    ys = np.maximum.accumulate(np.array([r["step_s"] for r in rows], dtype=float))  # more sequences never faster
    fit = calib["step_fit"]  # type: ignore[index]

    def step(b: int) -> float:
        if b <= xs[-1]:
            return float(np.interp(b, xs, ys))
        return float(ys[-1] + fit["per_seq_s"] * (b - xs[-1]))  # type: ignore[index]

    return step


def slo_of(klass: PriorityClass, full_step_s: float) -> SLO:
    if klass == "interactive":
        return SLO(ttft_s=20 * full_step_s, priority="interactive")
    if klass == "standard":
        return SLO(latency_s=400 * full_step_s, priority="standard")
    return SLO(latency_s=2000 * full_step_s, priority="batch")


async def run_trace(
    trace: list[Item],
    arrivals: np.ndarray,
    predicted: Sequence[float],
    slos: Sequence[SLO],
    config: ScheduleConfig,
    step: Callable[[int], float],
    prefill_s_per_token: float,
    batch: int,
) -> tuple[list[FinishedRequest], float]:
    records: list[FinishedRequest] = []
    engine = SimulatedEngine(
        step_s=step,
        prefill_s_per_token=prefill_s_per_token,
        lengths={it.id: (it.prompt_tokens, it.true_tokens) for it in trace},
        max_batch=batch,
    )
    scheduler = Scheduler(engine, config, on_finish=records.append)
    await engine.start()
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    for it, at, pred, slo in zip(trace, arrivals, predicted, slos, strict=True):
        delay = start + at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        request = EngineRequest(request_id=it.id, prompt=it.text, params=SamplingParams(max_tokens=1024))
        tasks.append(asyncio.create_task(scheduler.submit(request, predicted_tokens=pred, slo=slo)))
    await asyncio.gather(*tasks)
    await engine.close()
    return records, loop.time() - start


def summarise(records: list[FinishedRequest], source_of: dict[str, str]) -> dict[str, object]:
    ok = [r for r in records if r.outcome == "ok"]
    jct = np.array([r.jct_s for r in ok])
    wait = np.array([r.queue_wait_s for r in ok])
    ttft = np.array([r.ttft_s for r in ok if r.ttft_s is not None])
    with_slo = [r for r in records if r.slo_met is not None]
    by_class: dict[str, float] = {}
    for klass in CLASSES:
        sel = [r for r in with_slo if r.priority_class == klass]
        if sel:
            by_class[klass] = sum(r.slo_met for r in sel) / len(sel)  # type: ignore[misc]
    by_source = defaultdict(list)
    for r in ok:
        by_source[source_of[r.request_id]].append(r.jct_s)
    return {
        "mean_jct_s": float(jct.mean()),
        "p90_jct_s": float(np.percentile(jct, 90)),
        "p99_jct_s": float(np.percentile(jct, 99)),
        "slo_attainment": sum(r.slo_met for r in with_slo) / len(with_slo),  # type: ignore[misc]
        "slo_attainment_by_class": by_class,
        "mean_ttft_s": float(ttft.mean()),
        "mean_queue_wait_s": float(wait.mean()),
        "max_queue_wait_s": float(wait.max()),
        "mean_jct_by_source_s": {s: float(np.mean(v)) for s, v in sorted(by_source.items())},
        "completed": len(ok),
    }


# ------------------------------------------------------------------------------------------ outputs


def write_markdown(result: dict[str, object], path: Path) -> None:
    cal = result["calibration"]  # type: ignore[index]
    pred = result["predictor"]  # type: ignore[index]
    lines = [
        "# Scheduler benchmark: FCFS vs SJF (predicted / true lengths) vs SLO policy",
        "",
        f"Command: `{result['command']}` ({result['wall_s']:.0f} s wall). Service times are **simulated** by a "
        "continuous-batching engine model calibrated on a real measurement (below); requests, their true output "
        "lengths, the length predictor and the scheduler are real.",
        "",
        f"- Trace: {result['trace']['requests']} held-out requests "  # type: ignore[index]
        f"({', '.join(f'{k} {v}' for k, v in result['trace']['by_source'].items())}), "  # type: ignore[index]
        f"mean true output {result['trace']['mean_true_tokens']:.1f} tokens "  # type: ignore[index]
        f"(counted with the {result['trace']['tokenizer']}), Poisson arrivals, seed {result['seed']}.",
        f"- Engine: {result['engine']['batch']} sequences per batch; step times of {cal['model']} "  # type: ignore[index]
        f"({cal['dtype']}, {cal['torch_threads']} torch threads, {cal['machine']}, {cal['date']}): "
        + ", ".join(
            f"batch {r['batch']}: {r['step_s'] * 1000:.0f} ms/step = {r['tokens_per_s']:.1f} tok/s"
            for r in cal["decode"]
        )
        + f"; prefill {cal['prefill_s_per_token'] * 1000:.1f} ms/token "
        + ("(measured by this machine's calibration run). " if cal.get("measured") else "(reference figures). ")
        + f"Provenance: {cal['method']}. Capacity "
        f"{result['engine']['capacity_rps']:.3f} req/s (throughput with the whole trace queued at once).",  # type: ignore[index]
        f"- SLOs (S = full-batch step = {result['engine']['full_step_s']:.3f} s): interactive TTFT <= 20 S, "  # type: ignore[index]
        "standard latency <= 400 S, batch latency <= 2000 S; classes drawn 30/50/20%.",
        f"- Scheduler: `ScheduleConfig()` defaults (aging_s={result['scheduler']['aging_s']:g} s per doubling; "  # type: ignore[index]
        f"class delays {result['scheduler']['class_delay_s']} s, used by the slo policy only) with the policy "  # type: ignore[index]
        "named, max_concurrency = batch size and an unbounded queue. sjf_* = pure SSJF (lengths + aging); "
        "slo_predicted = SJF + class delays + EDF for SLO deadlines (the default policy).",
        "",
        "| load (x capacity) | req/s | policy | mean JCT s | p90 JCT s | p99 JCT s | mean TTFT s | max wait s | "
        "SLO attainment | interactive | standard | batch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for load in result["loads"]:  # type: ignore[union-attr]
        for name in POLICIES:
            r = load[name]
            c = r["slo_attainment_by_class"]
            lines.append(
                f"| {load['utilisation']:.2f} | {load['arrival_rate']:.3f} | {name} | {r['mean_jct_s']:.1f} | "
                f"{r['p90_jct_s']:.1f} | {r['p99_jct_s']:.1f} | {r['mean_ttft_s']:.1f} | {r['max_queue_wait_s']:.0f} | "
                f"{r['slo_attainment']:.3f} | {c.get('interactive', float('nan')):.3f} | "
                f"{c.get('standard', float('nan')):.3f} | {c.get('batch', float('nan')):.3f} |"
            )
    lines += [
        "",
        "Mean JCT relative to FCFS:",
        "",
        "| load | sjf_predicted | sjf_oracle | slo_predicted |",
        "|---|---|---|---|",
    ]
    for load in result["loads"]:  # type: ignore[union-attr]
        f = load["fcfs"]["mean_jct_s"]
        lines.append(
            f"| {load['utilisation']:.2f} | {load['sjf_predicted']['mean_jct_s'] / f - 1:+.1%} | "
            f"{load['sjf_oracle']['mean_jct_s'] / f - 1:+.1%} | {load['slo_predicted']['mean_jct_s'] / f - 1:+.1%} |"
        )
    sweep = result["aging_sweep"]  # type: ignore[index]
    lines += [
        "",
        f"Aging trade-off at load {sweep['runs'][0]['utilisation']:.2f} (sjf_predicted; FCFS: mean JCT "
        f"{sweep['fcfs_mean_jct_s']:.1f} s, max wait {sweep['fcfs_max_queue_wait_s']:.0f} s): more seconds per "
        "doubling is closer to pure SJF (lower mean JCT), fewer is closer to FCFS (lower worst-case wait).",
        "",
        "| aging_s | mean JCT s | vs FCFS | p90 JCT s | max wait s | SLO attainment |",
        "|---|---|---|---|---|---|",
    ]
    for run in sweep["runs"]:
        gain = run["mean_jct_s"] / sweep["fcfs_mean_jct_s"] - 1
        lines.append(
            f"| {run['aging_s']:g} | {run['mean_jct_s']:.1f} | {gain:+.1%} | "
            f"{run['p90_jct_s']:.1f} | {run['max_queue_wait_s']:.0f} | {run['slo_attainment']:.3f} |"
        )
    lines += [
        "",
        f"## Length predictor on held-out requests ({pred['n_test']} requests, trained on {pred['n_train']})",
        "",
        "| predictor | MAE tokens (all) | Spearman (all) | " + " | ".join(f"Spearman {s}" for s in SOURCES) + " |",
        "|---|---|---|" + "---|" * len(SOURCES),
    ]
    for name, entry in pred["variants"].items():
        lines.append(
            f"| {name} | {entry['all']['mae']:.1f} | {entry['all']['spearman']:.3f} | "
            + " | ".join(f"{entry[s]['spearman']:.3f}" for s in SOURCES)
            + " |"
        )
    path.write_text("\n".join(lines) + "\n")


def plot(result: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = result["loads"]  # type: ignore[assignment]
    x = [load["utilisation"] for load in loads]  # type: ignore[union-attr]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, style in zip(POLICIES, ("o-", "s-", "^--", "d-"), strict=True):
        axes[0].plot(x, [load[name]["mean_jct_s"] for load in loads], style, label=name)  # type: ignore[index]
        axes[1].plot(x, [load[name]["p90_jct_s"] for load in loads], style, label=name)  # type: ignore[index]
        axes[2].plot(x, [load[name]["slo_attainment"] for load in loads], style, label=name)  # type: ignore[index]
    for ax, title in zip(axes, ("mean JCT (s)", "p90 JCT (s)", "SLO attainment"), strict=True):
        ax.set_xlabel("offered load (x estimated capacity)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[0].legend()
    fig.suptitle("Scheduler on a real mixed trace (simulated continuous-batching engine, calibrated)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", default="0.5,0.7,0.85,0.95,1.05", help="offered load, x estimated capacity")
    parser.add_argument("--batch", type=int, default=8, help="sequences per batch = scheduler max_concurrency")
    parser.add_argument("--train-per-source", type=int, default=600)
    parser.add_argument("--test-per-source", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibration", type=Path, default=RESULTS / "engine_calibration.json")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--cache", type=Path, default=None, help="folder to keep embeddings between runs")
    parser.add_argument(
        "--aging-sweep", default="5,10,20,30,60,120", help="aging_s values tried with sjf_predicted at the top load"
    )
    parser.add_argument("--report-only", action="store_true", help="rewrite .md and .png from the .json")
    args = parser.parse_args()
    if args.report_only:
        saved = json.loads((args.out / "scheduler.json").read_text())
        write_markdown(saved, args.out / "scheduler.md")
        plot(saved, args.out / "scheduler.png")
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING)
    began = time.time()

    calib = load_calibration(args.calibration)
    count, tokenizer_name = token_counter()
    items = load_items(count)
    train, test = split(items, args.train_per_source, args.test_per_source, args.seed)
    print(f"{len(items)} requests with reference answers; train {len(train)}, held-out {len(test)}")

    emb = embed([it.text for it in train + test], args.cache)
    emb_train, emb_test = emb[: len(train)], emb[len(train) :]
    predicted, predictor_report = evaluate_predictor(train, test, emb_train, emb_test, args.seed)
    ours = predictor_report["variants"]["ours (neighbours + regressor, task label)"]["all"]  # type: ignore[index]
    print(f"predictor on held-out: MAE {ours['mae']:.1f} tokens, Spearman {ours['spearman']:.3f}")

    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(test))
    trace = [test[i] for i in order]
    pred_trace = [float(predicted[i]) for i in order]
    true_trace = [float(it.true_tokens) for it in trace]
    classes = rng.choice(len(CLASSES), size=len(trace), p=CLASS_SHARE)

    step = step_function(calib)
    prefill = float(calib["prefill_s_per_token"])  # type: ignore[arg-type]
    full_step = step(args.batch)
    slos = [slo_of(CLASSES[c], full_step) for c in classes]

    def cfg(policy: str, **extra: object) -> ScheduleConfig:
        """Defaults, apart from the policy, one slot per batch sequence and an unbounded queue."""
        return ScheduleConfig(policy=policy, max_concurrency=args.batch, max_queue=100_000, **extra)  # type: ignore[arg-type]

    mean_tokens = float(np.mean(true_trace))
    mean_prompt = float(np.mean([it.prompt_tokens for it in trace]))
    # Capacity: the throughput of the simulated engine when every request of the trace is there at once.
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        _, makespan = runner.run(
            run_trace(trace, np.zeros(len(trace)), [1.0] * len(trace), slos, cfg("fcfs"), step, prefill, args.batch)
        )
    capacity = len(trace) / makespan
    source_of = {it.id: it.source for it in trace}

    loads = [float(x) for x in args.loads.split(",")]
    sweep = [float(x) for x in args.aging_sweep.split(",") if x]

    unit_gaps = np.random.default_rng(args.seed + 1).exponential(1.0, size=len(trace))

    def arrivals_at(u: float) -> np.ndarray:
        """Poisson arrivals at ``u`` x capacity; the same draws scaled, so loads differ only in their rate."""
        gaps = unit_gaps / (u * capacity)
        return np.cumsum(gaps) - gaps[0]

    def simulate(u: float, config: ScheduleConfig, lengths: str) -> dict[str, object]:
        given = pred_trace if lengths == "predicted" else true_trace if lengths == "true" else [1.0] * len(trace)
        with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
            records, makespan = runner.run(
                run_trace(trace, arrivals_at(u), given, slos, config, step, prefill, args.batch)
            )
        return {**summarise(records, source_of), "makespan_s": makespan}

    runs: list[tuple[float, str, float | None]] = [(u, name, None) for u in loads for name in POLICIES]
    runs += [(max(loads), "sjf_predicted", a) for a in sweep]
    by_load: dict[float, dict[str, object]] = {}
    aging_sweep = []
    bar = tqdm(runs, desc="loads x policies")
    for u, name, aging in bar:
        bar.set_postfix_str(f"load {u:.2f} {name}" + (f" aging_s={aging:g}" if aging else ""))
        policy, lengths = POLICIES[name]
        if aging is None:
            entry = by_load.setdefault(u, {"arrival_rate": u * capacity, "utilisation": u})
            entry[name] = simulate(u, cfg(policy), lengths)
        else:
            aging_sweep.append({"aging_s": aging, "utilisation": u, **simulate(u, cfg(policy, aging_s=aging), lengths)})
    results = [by_load[u] for u in loads]

    result: dict[str, object] = {
        "loads": results,
        "predictor": predictor_report,
        "aging_sweep": {
            "fcfs_mean_jct_s": results[-1]["fcfs"]["mean_jct_s"],  # type: ignore[index]
            "fcfs_max_queue_wait_s": results[-1]["fcfs"]["max_queue_wait_s"],  # type: ignore[index]
            "runs": aging_sweep,
        },
        "calibration": calib,
        "engine": {
            "batch": args.batch,
            "full_step_s": full_step,
            "prefill_s_per_token": prefill,
            "capacity_rps": capacity,
            "simulated": True,
        },
        "trace": {
            "requests": len(trace),
            "by_source": {s: sum(it.source == s for it in trace) for s in SOURCES},
            "mean_true_tokens": mean_tokens,
            "mean_prompt_tokens": mean_prompt,
            "tokenizer": tokenizer_name,
            "class_share": dict(zip(CLASSES, CLASS_SHARE, strict=True)),
        },
        "scheduler": {"aging_s": ScheduleConfig().aging_s, "class_delay_s": ScheduleConfig().class_delay_s},
        "seed": args.seed,
        "command": "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/scheduler.py " + " ".join(sys.argv[1:]),
        "wall_s": time.time() - began,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scheduler.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, args.out / "scheduler.md")
    plot(result, args.out / "scheduler.png")
    for load in results:
        f = load["fcfs"]
        line = [f"load {load['utilisation']:.2f} ({load['arrival_rate']:.3f} req/s):"]
        for name in POLICIES:
            r = load[name]
            line.append(f"{name} mean {r['mean_jct_s']:.1f} p90 {r['p90_jct_s']:.1f} slo {r['slo_attainment']:.2f}")
        line.append(f"sjf_predicted vs fcfs {load['sjf_predicted']['mean_jct_s'] / f['mean_jct_s'] - 1:+.1%}")
        print(" | ".join(line))
    print(f"wrote {args.out / 'scheduler.json'}, .md, .png in {time.time() - began:.0f} s")


if __name__ == "__main__":
    main()
