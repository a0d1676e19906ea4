"""Example store benchmark: add throughput, query p50/p99, recall@10 against exact search, memory and disk, and
``kill -9`` during a write loop (acknowledged examples lost must be 0).

Run (from the repository root; the embedder must be fetched: ``echo-middleware models fetch all-minilm-l6-v2``)::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/store_bench.py --sizes 1000 10000 100000

Options: ``--no-dedupe-eval``, ``--ef-search 32 128 512`` (HNSW search breadths to measure; the store's default is 128),
``--queries 1000``, ``--kill-trials 3``, ``--server`` (also run each size against a ``chroma run`` server),
``--cache-dir`` (where the pool's embeddings are kept between runs; default ``.echo/bench_cache/store``).
Writes ``benchmarks/results/store.json`` and ``benchmarks/results/store.md``.

What is measured, and how:

- **Texts** are real (NQ-open, EntityQuestions, GSM8K; see ``_store_data.py`` for the three tiers used to reach
  100k distinct texts: single real texts, question + gold answer, pairs of real questions).
- **Embeddings** are real all-MiniLM-L6-v2 vectors, computed once and cached; the embedder's own speed is reported
  separately (``embed_texts_per_s``), so add and query figures are the store's: each add goes through
  ``ExampleStore.add`` (validation, dedupe lookup, upsert, durable commit) with the vector looked up, not computed.
- **Add throughput**: the pool is added in calls of 1,000 examples; also the latency of a single-example add.
- **Query latency**: ``ExampleStore.query(k=10)`` for 1,000 held-out questions (the second wording of 500
  EntityQuestions paraphrase pairs whose first wording is stored, and 500 NQ questions), one caller at a time,
  given the query vector; plus end-to-end latency including embedding a never-seen query (LRU off).
- **Recall@10**: overlap of the store's top 10 with the exact top 10 (brute-force cosine over the stored vectors).
- **Memory**: resident memory a fresh process gains by opening the store with Chroma and answering 200 queries
  (the HNSW index is loaded); **disk**: the store folder's size.
- **Dedupe safety**: the 600 fow-cache question pairs (300 same-answer, 300 traps) go through the store with
  and without the wording guard; a merged trap would replace one question's answer with another's.
- **kill -9**: a child process adds examples in a loop through ``ExampleStore.add`` (real embedder) and prints each
  acknowledged id; the parent kills it with SIGKILL at a random moment, reopens the store and counts the
  acknowledged ids that are missing. Repeated ``--kill-trials`` times on the same folder.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from _store_data import build_corpus, cached_embeddings

from echo_middleware.config import EmbedConfig, StoreConfig
from echo_middleware.embed import Embedder, SentenceEmbedder
from echo_middleware.store import ExampleStore
from echo_middleware.types import Example

RESULTS = Path(__file__).parent / "results"
DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parent.parent
TENANT = "bench"
RESERVE = 200
"""Texts beyond the largest size, used for single-example adds (so they are new to every store)."""


class LookupEmbedder(Embedder):
    """The real embedder's vectors, looked up from the cached table; unknown texts go to the real model."""

    def __init__(self, real: SentenceEmbedder, table: dict[str, np.ndarray]) -> None:
        super().__init__(batch_size=100_000, cache_size=0)
        self.real = real
        self.table = table

    @property
    def name(self) -> str:
        return self.real.name

    @property
    def dim(self) -> int:
        return self.real.dim

    def _encode(self, texts: list[str]) -> np.ndarray:
        missing = [t for t in texts if t not in self.table]
        if missing:
            for text, vector in zip(missing, self.real.embed(missing), strict=True):
                self.table[text] = vector
        return np.stack([self.table[t] for t in texts])


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------------------------------- one size


def make_examples(texts: list[str], answers: list[str], start: int) -> list[Example]:
    return [
        Example(id=f"x{start + i}", tenant=TENANT, request=t, response=a or "(no short answer)")
        for i, (t, a) in enumerate(zip(texts, answers, strict=True))
    ]


async def add_all(store: ExampleStore, examples: list[Example], batch: int, progress: str) -> dict[str, Any]:
    from tqdm import tqdm

    latencies = []
    stored: list[str] = []
    began = time.perf_counter()
    for start in tqdm(range(0, len(examples), batch), desc=progress, unit="batch", leave=False):
        t0 = time.perf_counter()
        stored += await store.add(examples[start : start + batch])
        latencies.append(time.perf_counter() - t0)
    seconds = time.perf_counter() - began
    merged = sum(1 for e, s in zip(examples, stored, strict=True) if e.id != s)
    return {
        "examples": len(examples),
        "seconds": round(seconds, 2),
        "examples_per_s": round(len(examples) / seconds, 1),
        "batch": batch,
        "batch_p50_s": round(percentile(latencies, 50), 3),
        "merged_by_dedupe": merged,
        "stored_ids": stored,
    }


def exact_top10(matrix: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Indices of the 10 rows of ``matrix`` nearest to each query by cosine (brute force, in blocks)."""
    out = []
    for start in range(0, len(queries), 100):
        scores = queries[start : start + 100] @ matrix.T
        top = np.argpartition(-scores, 10, axis=1)[:, :10]
        order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
        out.append(np.take_along_axis(top, order, axis=1))
    return np.concatenate(out)


async def measure_queries(
    store: ExampleStore, queries: list[str], qvecs: np.ndarray, ids: list[str], exact: np.ndarray
) -> dict[str, Any]:
    latencies, recalls = [], []
    for text, vec, truth in zip(queries, qvecs, exact, strict=True):
        t0 = time.perf_counter()
        found = await store.query(text, TENANT, k=10, embedding=vec)
        latencies.append(time.perf_counter() - t0)
        want = {ids[i] for i in truth}
        recalls.append(len(want & {c.example.id for c in found}) / 10)
    return {
        "p50_ms": round(1000 * percentile(latencies, 50), 2),
        "p99_ms": round(1000 * percentile(latencies, 99), 2),
        "mean_ms": round(1000 * statistics.fmean(latencies), 2),
        "recall_at_10": round(statistics.fmean(recalls), 4),
        "queries": len(queries),
    }


MEMORY_PROBE = """
import json, sys, numpy as np, psutil
proc = psutil.Process()
import chromadb
from chromadb.config import Settings
q = np.load(sys.argv[3])
before = proc.memory_info().rss
if sys.argv[1] == "embedded":
    client = chromadb.PersistentClient(path=sys.argv[2], settings=Settings(anonymized_telemetry=False))
else:
    host, port = sys.argv[2].split(":")
    client = chromadb.HttpClient(host=host, port=int(port), settings=Settings(anonymized_telemetry=False))
col = client.get_collection(sys.argv[4])
for i in range(len(q)):
    col.query(query_embeddings=q[i : i + 1], n_results=10)
after = proc.memory_info().rss
print(json.dumps({"rss_before_mb": before / 2**20, "rss_after_mb": after / 2**20}))
"""


def memory_probe(mode: str, where: str, qvecs: np.ndarray, collection: str, work: Path) -> dict[str, float]:
    qpath = work / "probe_queries.npy"
    np.save(qpath, qvecs[:200])
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, mode, where, str(qpath), collection],
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
    )
    record = json.loads(out.stdout.strip().splitlines()[-1])
    record["rss_gain_mb"] = record["rss_after_mb"] - record["rss_before_mb"]
    return {k: round(v, 1) for k, v in record.items()}


def server_rss_mb(pid: int) -> float:
    import psutil

    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


async def run_size(
    size: int,
    mode: str,
    corpus: Any,
    vectors: np.ndarray,
    qvecs: np.ndarray,
    real: SentenceEmbedder,
    nocache: SentenceEmbedder,
    ef_values: list[int],
    work: Path,
    server: tuple[str, int, int] | None,
) -> dict[str, Any]:
    texts, answers = corpus.texts[:size], corpus.answers[:size]
    table = {t: v for t, v in zip(corpus.texts, vectors, strict=True)}
    table.update(zip(corpus.queries, qvecs, strict=True))
    embedder = LookupEmbedder(real, table)
    folder = work / f"{mode}-{size}"
    shutil.rmtree(folder, ignore_errors=True)
    prefix = f"b{size}_"

    def config(**extra: Any) -> StoreConfig:
        base: dict[str, Any] = {"capacity_per_tenant": size + RESERVE + 10, "collection_prefix": prefix}
        if mode == "embedded":
            base["path"] = folder
        else:
            if server is None:
                raise ValueError("server mode needs a server")
            base.update(host=server[0], port=server[1], timeout_s=120)
        return StoreConfig(**{**base, **extra})

    record: dict[str, Any] = {"size": size, "mode": mode, "composition": corpus.composition(size)}
    store = ExampleStore(config(), embedder)
    examples = make_examples(texts, answers, 0)
    add = await add_all(store, examples, 1000, f"add {size} ({mode})")
    ids = add.pop("stored_ids")
    record["add"] = add
    record["count"] = await store.count(TENANT)

    # Exact neighbours over what is stored (a merged example keeps the vector of the one stored first).
    first: dict[str, int] = {}
    for i, sid in enumerate(ids):
        first.setdefault(sid, i)
    stored_ids = list(first)
    matrix = vectors[[first[s] for s in stored_ids]]
    exact = exact_top10(matrix, qvecs)
    await store.close()

    record["query"] = {}
    for ef in ef_values:
        tuned = ExampleStore(config(hnsw_ef_search=ef), embedder)
        await tuned.query(corpus.queries[0], TENANT, k=10, embedding=qvecs[0])  # open and load the index
        record["query"][str(ef)] = await measure_queries(tuned, corpus.queries, qvecs, stored_ids, exact)
        await tuned.close()

    # End to end with the real model on queries it has never seen (LRU off: every query is embedded).
    e2e_store = ExampleStore(config(), nocache)
    latencies = []
    for text in corpus.queries[:100]:
        t0 = time.perf_counter()
        await e2e_store.query(text, TENANT, k=10)
        latencies.append(time.perf_counter() - t0)
    record["query_with_embedding"] = {
        "p50_ms": round(1000 * percentile(latencies, 50), 2),
        "p99_ms": round(1000 * percentile(latencies, 99), 2),
        "queries": len(latencies),
    }
    await e2e_store.close()

    # Single-example adds (each durable on return), texts new to this store.
    single_store = ExampleStore(config(), embedder)
    reserve = make_examples(corpus.texts[-RESERVE:][:100], corpus.answers[-RESERVE:][:100], 10_000_000)
    single = []
    for example in reserve:
        t0 = time.perf_counter()
        await single_store.add([example])
        single.append(time.perf_counter() - t0)
    record["single_add"] = {
        "p50_ms": round(1000 * percentile(single, 50), 2),
        "p99_ms": round(1000 * percentile(single, 99), 2),
        "adds": len(single),
    }
    await single_store.delete(TENANT, [e.id for e in reserve])
    await single_store.close()

    if mode == "embedded":
        record["disk_mb"] = round(folder_bytes(folder) / 2**20, 1)
        record["memory"] = memory_probe("embedded", str(folder), qvecs, prefix + TENANT, work)
    elif server is not None:
        record["memory"] = memory_probe("server", f"{server[0]}:{server[1]}", qvecs, prefix + TENANT, work)
        record["server_rss_mb"] = server_rss_mb(server[2])
    record["per_100k"] = {
        k: round(v * 100_000 / max(1, record["count"]), 1)
        for k, v in (("disk_mb", record.get("disk_mb")), ("rss_gain_mb", record["memory"]["rss_gain_mb"]))
        if v is not None
    }
    return record


# ------------------------------------------------------------------------------------------- dedupe safety


async def dedupe_eval(real: SentenceEmbedder, cache: Path, work: Path) -> dict[str, Any]:
    """Store the first wording of each fow-cache pair, add the second, and count which ones merge.

    300 pairs should share an answer (paraphrases, near repeats); 300 are traps that must not (negation, entity
    swap, number/date, scope). A merged trap silently replaces one question's answer with another's.
    """
    rows = [json.loads(line) for line in (DATA / "fow_cache" / "pairs.jsonl").read_text().splitlines() if line]
    firsts, seconds = [r["a"] for r in rows], [r["b"] for r in rows]
    table = dict(
        zip(firsts + seconds, cached_embeddings(firsts + seconds, real.embed, cache, progress="fow"), strict=True)
    )
    embedder = LookupEmbedder(real, table)
    out: dict[str, Any] = {}
    for guard in (True, False):
        folder = work / f"dedupe-{guard}"
        shutil.rmtree(folder, ignore_errors=True)
        store = ExampleStore(StoreConfig(path=folder, dedupe_guard=guard), embedder)
        merged: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            [a_id] = await store.add([Example(id=f"a{i}", tenant="fow", request=r["a"], response="A")])
            [b_id] = await store.add([Example(id=f"b{i}", tenant="fow", request=r["b"], response="B")])
            counts = merged.setdefault(r["category"], [0, 0])
            counts[0] += int(b_id == a_id)
            counts[1] += 1
            await store.delete("fow", [a_id, b_id])
        await store.close()
        shutil.rmtree(folder, ignore_errors=True)
        traps = [k for k in merged if not next(r["same_answer"] for r in rows if r["category"] == k)]
        out["guard_on" if guard else "guard_off"] = {
            "by_category": {k: f"{v[0]}/{v[1]}" for k, v in sorted(merged.items())},
            "traps_merged": sum(merged[k][0] for k in traps),
            "traps": sum(merged[k][1] for k in traps),
            "same_answer_merged": sum(v[0] for k, v in merged.items() if k not in traps),
            "same_answer": sum(v[1] for k, v in merged.items() if k not in traps),
        }
    out["dedupe_distance"] = StoreConfig().dedupe_distance
    return out


# ------------------------------------------------------------------------------------------- kill -9

KILL_CHILD = """
import asyncio, random, sys
from echo_middleware.config import EmbedConfig, StoreConfig
from echo_middleware.embed import SentenceEmbedder
from echo_middleware.store import ExampleStore
from echo_middleware.types import Example

texts = [line.rstrip("\\n") for line in open(sys.argv[2], encoding="utf-8")]

async def main() -> None:
    embedder = SentenceEmbedder(EmbedConfig())
    embedder.embed(["load the model before the clock starts"])
    store = ExampleStore(StoreConfig(path=sys.argv[1], lock_timeout_s=30), embedder)
    await store.count("bench")
    print("ready", flush=True)
    rng = random.Random(int(sys.argv[3]))
    i = 0
    while i < len(texts):
        n = rng.choice((1, 1, 2, 4, 8))
        batch = [Example(id=f"k{sys.argv[3]}-{i + j}", tenant="bench", request=t, response="ok")
                 for j, t in enumerate(texts[i : i + n])]
        ids = await store.add(batch)
        print(" ".join(ids), flush=True)
        i += n

asyncio.run(main())
"""


def kill_trials(corpus: Any, trials: int, work: Path, real: SentenceEmbedder) -> dict[str, Any]:
    folder = work / "kill9"
    shutil.rmtree(folder, ignore_errors=True)
    texts_file = work / "kill9_texts.txt"
    rows = []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    all_acked: list[str] = []
    for trial in range(trials):
        start = (trial * 3000) % max(1, len(corpus.texts) - 3000)
        texts = corpus.texts[start : start + 3000]  # new texts each trial when the pool is large enough
        texts_file.write_text("\n".join(t.replace("\n", " ") for t in texts), encoding="utf-8")
        proc = subprocess.Popen(
            [sys.executable, "-c", KILL_CHILD, str(folder), str(texts_file), str(trial)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        if proc.stdout is None or proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the writer did not start")
        delay = random.Random(trial).uniform(5.0, 20.0)
        lines: list[str] = []
        reader = threading.Thread(target=lines.extend, args=(proc.stdout,), daemon=True)
        reader.start()
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join(timeout=30)  # everything printed before the kill is still in the pipe
        acked = [i for line in lines if line.endswith("\n") for i in line.split()]
        all_acked += acked

        async def check(acked: list[str] = acked) -> tuple[int, int]:
            store = ExampleStore(StoreConfig(path=folder, lock_timeout_s=30), real)
            present = {e.id for e in await store.get(TENANT, acked)}
            count = await store.count(TENANT)
            await store.close()
            return len(set(acked) - present), count

        lost, count = asyncio.run(check())
        rows.append(
            {"trial": trial, "killed_after_s": round(delay, 1), "acked": len(acked), "lost": lost, "count": count}
        )
        print(f"kill -9 trial {trial}: {len(acked)} acknowledged, {lost} lost, {count} in the store")
    return {
        "trials": rows,
        "acked_total": len(all_acked),
        "lost_total": sum(r["lost"] for r in rows),
    }


# ------------------------------------------------------------------------------------------- report


def start_server(work: Path) -> tuple[subprocess.Popen[bytes], tuple[str, int, int]]:
    import httpx

    port = free_port()
    data = work / "server-db"
    shutil.rmtree(data, ignore_errors=True)
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "chroma"),
            "run",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--path",
            str(data),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/v2/heartbeat", timeout=2).status_code == 200:
                return proc, ("127.0.0.1", port, proc.pid)
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("chroma run did not start")


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Example store benchmark",
        "",
        f"Machine: {result['machine']}. Command: `{result['command']}`. Embedder: {result['embedder']} "
        f"({result['embed_texts_per_s']} texts/s on this machine, measured separately).",
        "",
        "| size | mode | add (examples/s) | single add p50 / p99 (ms) | query p50 / p99 (ms) | recall@10 | "
        "query + embed p50 / p99 (ms) | disk (MB) | memory gain (MB) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    default_ef = str(result["default_ef_search"])
    for r in result["runs"]:
        q = r["query"].get(default_ef) or next(iter(r["query"].values()))
        lines.append(
            f"| {r['size']:,} | {r['mode']} | {r['add']['examples_per_s']:,} | {r['single_add']['p50_ms']} / "
            f"{r['single_add']['p99_ms']} | {q['p50_ms']} / {q['p99_ms']} | {q['recall_at_10']:.3f} | "
            f"{r['query_with_embedding']['p50_ms']} / {r['query_with_embedding']['p99_ms']} | "
            f"{r.get('disk_mb', '—')} | {r['memory']['rss_gain_mb']} |"
        )
    lines += ["", f"Query figures at the default `hnsw_ef_search={default_ef}`. Recall and latency by ef_search:", ""]
    efs = sorted({int(ef) for r in result["runs"] for ef in r["query"]})
    lines.append("| size | mode | " + " | ".join(f"ef={ef}: recall, p50 / p99 ms" for ef in efs) + " |")
    lines.append("|---:|---|" + "---:|" * len(efs))
    for r in result["runs"]:
        cells = []
        for ef in efs:
            q = r["query"].get(str(ef))
            cells.append(f"{q['recall_at_10']:.3f}, {q['p50_ms']} / {q['p99_ms']}" if q else "—")
        lines.append(f"| {r['size']:,} | {r['mode']} | " + " | ".join(cells) + " |")
    kill = result.get("kill9")
    if kill:
        lines += [
            "",
            f"kill -9 during a write loop: {len(kill['trials'])} trials, {kill['acked_total']:,} acknowledged "
            f"examples, **{kill['lost_total']} lost**.",
        ]
    dedupe = result.get("dedupe")
    if dedupe:
        on, off = dedupe["guard_on"], dedupe["guard_off"]
        lines += [
            "",
            f"Dedupe on the 600 fow-cache pairs (second wording added after the first, dedupe_distance "
            f"{dedupe['dedupe_distance']}): with the wording guard {on['traps_merged']}/{on['traps']} traps merged "
            f"and {on['same_answer_merged']}/{on['same_answer']} same-answer pairs merged; on distance alone "
            f"{off['traps_merged']}/{off['traps']} traps and {off['same_answer_merged']}/{off['same_answer']}.",
            "",
            "| category | guard on | distance only |",
            "|---|---:|---:|",
            *(f"| {k} | {v} | {off['by_category'][k]} |" for k, v in on["by_category"].items()),
        ]
    lines += ["", "Text tiers per size (see benchmarks/_store_data.py):", ""]
    for r in result["runs"]:
        if r["mode"] == "embedded":
            lines.append(f"- {r['size']:,}: " + ", ".join(f"{k} {v:,}" for k, v in r["composition"].items()))
    return "\n".join(lines) + "\n"


async def main_async(args: argparse.Namespace) -> tuple[dict[str, Any], Any, SentenceEmbedder, Path]:
    sizes = sorted(args.sizes)
    corpus = build_corpus(max(sizes) + RESERVE)
    real = SentenceEmbedder(EmbedConfig())
    real.embed(["warm up"])
    nocache = SentenceEmbedder(EmbedConfig(cache_size=0))  # end-to-end queries: every query is embedded
    nocache.embed(["warm up"])
    cache = Path(args.cache_dir)
    vectors = cached_embeddings(corpus.texts, real.embed, cache, progress="embed pool")
    qvecs = cached_embeddings(corpus.queries, real.embed, cache, progress="embed queries")
    sample = [f"{q} (timing sample)" for q in corpus.queries[:256]]
    real.cache.clear()
    t0 = time.perf_counter()
    real.embed(sample)
    embed_rate = round(len(sample) / (time.perf_counter() - t0), 1)
    print(f"embedder: {embed_rate} texts/s")

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="store-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    modes = ["embedded"] + (["server"] if args.server else [])
    runs = []
    for mode in modes:
        server_proc, server = (None, None)
        if mode == "server":
            server_proc, server = start_server(work)
        try:
            for size in sizes:
                record = await run_size(size, mode, corpus, vectors, qvecs, real, nocache, args.ef_search, work, server)
                runs.append(record)
                q = record["query"].get("128") or next(iter(record["query"].values()))
                print(
                    f"{size:>7} {mode}: add {record['add']['examples_per_s']}/s, query p50 {q['p50_ms']} ms "
                    f"p99 {q['p99_ms']} ms, recall@10 {q['recall_at_10']}"
                )
        finally:
            if server_proc is not None:
                server_proc.terminate()
                server_proc.wait(timeout=30)
    result: dict[str, Any] = {
        "command": " ".join(["benchmarks/store_bench.py", *sys.argv[1:]]),
        "machine": f"{os.cpu_count()} CPU cores, {platform.platform()}, Python {platform.python_version()}",
        "chromadb": __import__("chromadb").__version__,
        "embedder": real.name,
        "embed_texts_per_s": embed_rate,
        "default_ef_search": StoreConfig().hnsw_ef_search,
        "runs": runs,
    }
    if args.dedupe_eval:
        result["dedupe"] = await dedupe_eval(real, cache, work)
        print(f"dedupe on fow-cache pairs: {result['dedupe']}")
    return result, corpus, real, work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1000, 10000, 100000])
    parser.add_argument("--ef-search", nargs="+", type=int, default=[32, 128, 512])
    parser.add_argument("--kill-trials", type=int, default=3)
    parser.add_argument("--no-dedupe-eval", dest="dedupe_eval", action="store_false", help="skip the fow-cache pairs")
    parser.add_argument("--server", action="store_true", help="also run every size against a chroma run server")
    parser.add_argument("--cache-dir", default=str(ROOT / ".echo" / "bench_cache" / "store"))
    parser.add_argument("--work-dir", default=None, help="keep the stores here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=RESULTS / "store.json")
    args = parser.parse_args()
    result, corpus, real, work = asyncio.run(main_async(args))
    if args.kill_trials:
        result["kill9"] = kill_trials(corpus, args.kill_trials, work, real)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
