"""The benchmark harness's pure parts: traces from the real data files, arrivals, the queue replay, scoring glue,
the report renderers. (The end-to-end quick run on a real model is tests/integration/test_bench_quick.py.)"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import replay  # noqa: E402
import report  # noqa: E402
import scoring  # noqa: E402
import workloads  # noqa: E402

# ------------------------------------------------------------------------------------------ traces


@pytest.mark.parametrize("workload", workloads.WORKLOADS)
def test_trace_is_deterministic_and_sized(workload: str) -> None:
    a = workloads.build_trace(workload, 20, 12, seed=3)
    b = workloads.build_trace(workload, 20, 12, seed=3)
    c = workloads.build_trace(workload, 20, 12, seed=4)
    assert a.to_json() == b.to_json()
    assert a.to_json() != c.to_json()
    assert len(a.warmup) == 20
    assert len(a.eval) == 12
    assert all(i.phase == "warmup" for i in a.warmup)
    assert all(i.phase == "eval" for i in a.eval)
    assert len({i.id for i in a.items}) == 32


@pytest.mark.parametrize("workload", workloads.WORKLOADS)
def test_twins_point_backwards_to_the_item_they_resemble(workload: str) -> None:
    trace = workloads.build_trace(workload, 40, 40, seed=0)
    position = {item.id: n for n, item in enumerate(trace.items)}
    by_id = trace.by_id()
    for item in trace.items:
        if item.kind == "fresh":
            assert item.twin is None
            continue
        twin = by_id[item.twin]
        assert position[twin.id] < position[item.id]
        if item.kind == "repeat":
            assert item.prompt == twin.prompt
            assert item.answers == twin.answers
        else:  # a second wording: same task, different text
            assert item.prompt != twin.prompt
            assert item.task == twin.task


def test_qa_trace_has_paraphrases_of_warmup_items_in_eval() -> None:
    trace = workloads.build_trace("qa", 60, 40, seed=0)
    by_id = trace.by_id()
    paraphrases = [i for i in trace.eval if i.kind == "paraphrase"]
    assert paraphrases, trace.kinds()
    assert any(by_id[p.twin].phase == "warmup" for p in paraphrases)
    for p in paraphrases:  # EntityQuestions paraphrase pairs share their gold answer
        assert set(p.answers) == set(by_id[p.twin].answers)
    assert all(i.metric == "short" and i.answers for i in trace.items)


def test_traps_trace_puts_first_wordings_first_and_every_trap_in_eval() -> None:
    trace = workloads.build_trace("traps", 30, 30, seed=1)
    kinds = trace.kinds()
    assert kinds["trap"] > 0
    assert kinds["paraphrase"] > 0  # controls: pairs that should share an answer
    assert not any(i.kind in ("trap", "paraphrase") for i in trace.warmup)
    categories = {i.category for i in trace.eval if i.kind == "trap"}
    assert categories <= {"negation", "entity_swap", "number_date", "scope"}


def test_math_trace_keeps_the_gsm8k_final_number() -> None:
    trace = workloads.build_trace("math", 5, 5, seed=0)
    for item in trace.items:
        assert len(item.answers) == 1
        float(item.answers[0])  # a plain number, commas removed
        assert "####" in item.system


def test_knob_overrides_and_validation() -> None:
    none = workloads.build_trace("qa", 30, 30, seed=0, paraphrase_p=0.0, repeat_p=0.0)
    assert none.kinds()["paraphrase"] == 0
    assert none.kinds()["repeat"] == 0
    assert workloads.build_trace("qa", 5, 5, max_tokens=7).eval[0].max_tokens == 7
    with pytest.raises(ValueError, match="repeat_p"):
        workloads.build_trace("qa", 5, 5, repeat_p=1.5)
    with pytest.raises(ValueError, match="unknown"):
        workloads.build_trace("poetry", 5, 5)
    with pytest.raises(ValueError, match="n_eval"):
        workloads.build_trace("qa", 5, 0)


def test_missing_data_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="benchmarks/data"):
        workloads.build_trace("qa", 2, 2, data=tmp_path)


def test_poisson_arrivals_have_the_asked_rate() -> None:
    times = workloads.arrivals(4000, 2.0, seed=1)
    assert times == sorted(times)
    gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    assert statistics.mean(gaps) == pytest.approx(0.5, rel=0.06)
    assert statistics.pstdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, rel=0.08)
    bursty = workloads.arrivals(4000, 2.0, seed=1, cv=3.0)
    bgaps = [b - a for a, b in zip([0.0, *bursty], bursty, strict=False)]
    assert statistics.pstdev(bgaps) / statistics.mean(bgaps) > 2.0
    assert workloads.arrivals(10, 2.0, seed=1) == workloads.arrivals(10, 2.0, seed=1)
    with pytest.raises(ValueError, match="rate"):
        workloads.arrivals(3, 0.0)


# ------------------------------------------------------------------------------------------ replay


def test_fcfs_replay_by_hand() -> None:
    jobs = [replay.Job("a", 0.0, 4.0), replay.Job("b", 1.0, 1.0), replay.Job("c", 10.0, 2.0)]
    done = {d.id: d for d in replay.simulate(jobs, "fcfs")}
    assert (done["a"].start, done["a"].finish) == (0.0, 4.0)
    assert (done["b"].start, done["b"].finish) == (4.0, 5.0)
    assert (done["c"].start, done["c"].finish) == (10.0, 12.0)
    stats = replay.summarize(list(done.values()))
    assert stats["n"] == 3
    assert stats["throughput_rps"] == pytest.approx(3 / 12)
    assert stats["p50_latency_s"] == pytest.approx(4.0)


def test_sjf_serves_short_predicted_jobs_first_and_lowers_mean_latency() -> None:
    # one long job holds the server while a long and a short one queue: SJF runs the short one first
    jobs = [
        replay.Job("first", 0.0, 10.0, predicted_tokens=200),
        replay.Job("long", 1.0, 10.0, predicted_tokens=200),
        replay.Job("short", 2.0, 1.0, predicted_tokens=2),
    ]
    fcfs = {d.id: d for d in replay.simulate(jobs, "fcfs")}
    sjf = {d.id: d for d in replay.simulate(jobs, "sjf")}
    assert fcfs["short"].start == 20.0
    assert sjf["short"].start == 10.0
    assert sjf["long"].start == 11.0
    assert statistics.mean(d.latency for d in sjf.values()) < statistics.mean(d.latency for d in fcfs.values())


def test_background_jobs_wait_for_idle_and_are_not_counted_as_requests() -> None:
    jobs = [
        replay.Job("a", 0.0, 2.0),
        replay.Job("a:bg", 0.0, 5.0, background=True),
        replay.Job("b", 1.0, 2.0),
    ]
    done = {d.id: d for d in replay.simulate(jobs, "fcfs")}
    assert done["b"].start == 2.0  # the user request goes before the background work queued earlier
    assert done["a:bg"].start == 4.0
    assert replay.summarize(list(done.values()))["n"] == 2


def test_replay_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="policy"):
        replay.simulate([replay.Job("a", 0, 1)], "lifo")
    with pytest.raises(ValueError, match="service_s"):
        replay.simulate([replay.Job("a", 0, -1)], "fcfs")
    assert replay.capacity_rps([1.0, 3.0]) == pytest.approx(0.5)
    assert replay.capacity_rps([1.0, 3.0], extra_s=4.0) == pytest.approx(0.25)  # idle-time work, charged


# ------------------------------------------------------------------------------------------ scoring


def _item(metric: str, answers: tuple[str, ...]) -> workloads.Item:
    return workloads.Item(
        id="x-0001",
        workload="qa",
        source="test",
        task="t",
        kind="fresh",
        phase="eval",
        system="",
        prompt="Where was Alison Kreviazuk born?",
        answers=answers,
        metric=metric,  # type: ignore[arg-type]
        max_tokens=16,
    )


def test_scores_pick_the_measure_of_the_item() -> None:
    short = scoring.score_item(_item("short", ("Mississauga",)), "Mississauga, Ontario", "Mississauga", None)
    assert short["em"] == 0.0
    assert short["contains"] == 1.0
    assert 0.5 < short["f1"] < 1.0
    assert short["f1_large"] == short["f1"]
    numeric = scoring.score_item(_item("numeric", ("18",)), "9 * 2 = 18\n#### 18", None, None)
    assert numeric == {"numeric": 1.0}
    wrong = scoring.score_item(_item("numeric", ("18",)), "#### 81", None, None)
    assert wrong == {"numeric": 0.0}
    open_ = scoring.score_item(_item("open", ()), "the cat sat", "the cat sat down", None)
    assert set(open_) == {"rouge_large"}
    assert 0.5 < open_["rouge_large"] < 1.0


def test_statistics_helpers() -> None:
    assert scoring.percentile([1, 2, 3, 4], 50) == 2.5
    assert math.isnan(scoring.percentile([], 50))
    assert scoring.mean([1.0, None, 3.0]) == 2.0
    assert scoring.retention(0.5, 1.0) == 0.5
    assert math.isnan(scoring.retention(0.5, 0.0))


def test_judge_prompts_come_from_mt_bench() -> None:
    prompts = scoring.load_judge_prompts()
    assert "{answer}" in prompts["single-v1"]["prompt_template"]
    assert "{ref_answer_1}" in prompts["single-math-v1"]["prompt_template"]


def test_rating_and_verdict_parsers() -> None:
    assert scoring._RATING.match("7]]").group(1) == "7"
    assert scoring._RATING.match("10]]").group(1) == "10"
    assert scoring._RATING.match("seven") is None
    assert scoring._CHOICE.match("B]]").group(1) == "B"


# ------------------------------------------------------------------------------------------ report


def _results() -> dict:
    def row(q: float, cap: float, off: float) -> dict:
        return {
            "quality": q,
            "quality_retention": q / 0.8,
            "offload_rate": off,
            "capacity_rps": cap,
            "speedup_vs_large": cap / 0.1,
            "speedup_vs_large_with_learning": cap / 0.1 * 0.8,
            "large_token_share": 1 - off,
            "by_kind": {"fresh": {"quality_retention": q / 0.8, "offload_rate": off}},
            "load": {"0.8": {"rate_rps": 0.08, "throughput_rps": 0.08, "p50_latency_s": 5.0, "p90_latency_s": 9.0}},
        }

    return {
        "command": "echo-middleware bench --quick",
        "machine": "test machine",
        "date": "today",
        "wall_s": 60.0,
        "judge": {"model": None},
        "config": {
            "headline_rate": 0.8,
            "rates": [0.8],
            "large": "L",
            "small": "S",
            "backend": "transformers",
            "dtype": "auto",
            "speculative": "ngram",
            "headline": "qa",
        },
        "workloads": {
            "qa": {
                "trace": {"description": "qa: 2 warm-up, 2 eval", "kinds": {"fresh": 2, "paraphrase": 0}},
                "primary_metric": "f1",
                "systems": {"always-large": row(0.8, 0.1, 0.0), "echo": row(0.78, 0.3, 0.6)},
            }
        },
    }


def test_summary_has_the_documented_shape() -> None:
    s = report.summary(_results())
    assert set(s) == {"workload", "machine", "command", "systems"}
    assert s["workload"] == "qa"
    assert set(s["systems"]) == {"always-large", "echo"}
    assert set(s["systems"]["echo"]) == {
        "throughput_rps",
        "p50_latency_s",
        "p90_latency_s",
        "offload_rate",
        "quality_retention",
    }
    assert s["systems"]["echo"]["throughput_rps"] == pytest.approx(0.3)


def test_tables_render_every_system() -> None:
    results = _results()
    table = report.render_readme_table(results)
    assert "`always-large`" in table
    assert "`echo`" in table
    assert "echo-middleware bench --quick" in table
    full = report.render_markdown(results)
    assert "## qa" in full
    assert full.count("| `echo` |") == 4  # main, by-kind, load and README tables
    echo_row = next(line for line in full.splitlines() if line.startswith("| `echo` | 0.78"))
    assert "| 3.00 | 2.40 |" in echo_row  # capacity ratio, then the same with learning charged


def test_clean_turns_nan_into_null() -> None:
    assert report._clean({"a": [math.nan, 1.0, math.inf]}) == {"a": [None, 1.0, None]}


def test_qa_trace_leaves_out_the_rows_the_ranker_was_trained_on() -> None:
    import json

    data = BENCH / "data"
    pairs = [json.loads(x) for x in (data / "entityquestions" / "paraphrase_pairs_dev.jsonl").read_text().splitlines()]
    nq = [json.loads(x) for x in (data / "nq_open" / "NQ-open.dev.jsonl").read_text().splitlines()]
    trained = {r["question"] for r in pairs[::4]} | {r["paraphrase"] for r in pairs[::4]}
    trained_nq = {r["question"].strip().rstrip("?").lower() for r in nq[::4]}
    trace = workloads.build_trace("qa", 200, 100, seed=0)
    for item in trace.items:
        assert item.prompt not in trained
        assert item.prompt.rstrip("?").lower() not in trained_nq
