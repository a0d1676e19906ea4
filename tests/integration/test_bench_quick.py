"""The benchmark's quick mode end to end: every system on a small slice of every workload, SmolLM2 as both
models (what CI runs). Checks the outputs' shape and sanity, not speed: timings belong in the results."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(3600)]

ROOT = Path(__file__).resolve().parents[2]
SUMMARY_SYSTEMS = {"always-large", "always-small", "semantic-cache", "similarity-examples", "echo"}
ALL_SYSTEMS = SUMMARY_SYSTEMS | {"echo-fcfs", "echo-nospec"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, embedder_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("bench-quick")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(out), "--no-progress"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "| `echo` |" in proc.stdout  # the README table is printed
    return out


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not math.isnan(value) and not math.isinf(value)


def test_summary_has_the_documented_shape(quick_run: Path) -> None:
    summary = json.loads((quick_run / "summary.json").read_text())
    assert set(summary) == {"workload", "machine", "command", "systems"}
    assert summary["workload"] == "qa"
    assert "--quick" in summary["command"]
    assert set(summary["systems"]) == SUMMARY_SYSTEMS
    for name, row in summary["systems"].items():
        assert set(row) == {"throughput_rps", "p50_latency_s", "p90_latency_s", "offload_rate", "quality_retention"}
        assert row["throughput_rps"] > 0, name
        assert 0 < row["p50_latency_s"] <= row["p90_latency_s"], name
        assert 0.0 <= row["offload_rate"] <= 1.0, name
    assert summary["systems"]["always-large"]["offload_rate"] == 0.0
    assert summary["systems"]["always-small"]["offload_rate"] == 1.0


def test_every_system_answered_every_workload(quick_run: Path) -> None:
    results = json.loads((quick_run / "results.json").read_text())
    assert set(results["workloads"]) == {"qa", "math", "open", "traps"}
    rows = [json.loads(line) for line in (quick_run / "outcomes.jsonl").read_text().splitlines()]
    for workload, block in results["workloads"].items():
        assert set(block["systems"]) == ALL_SYSTEMS, workload
        n_eval = sum(block["trace"]["kinds"].values())
        for name, row in block["systems"].items():
            assert row["n"] == n_eval, (workload, name)
            assert row["errors"] == 0, (workload, name)
            assert _finite(row["capacity_rps"])
            assert row["capacity_rps"] > 0
            assert set(row["load"]) == {"0.5", "0.8", "1.2"}
            for load in row["load"].values():
                assert load["n"] == n_eval
                assert load["p50_latency_s"] > 0
        large = block["systems"]["always-large"]
        assert large["large_token_share"] == 1.0
        assert block["systems"]["always-small"]["large_token_share"] == 0.0
        assert block["systems"]["similarity-examples"]["offload_rate"] == 1.0
        if _finite(large["quality"]) and large["quality"] > 0:
            assert large["quality_retention"] == pytest.approx(1.0)
        for name in ("echo", "echo-nospec", "similarity-examples"):
            assert results["systems"][name]["length_predictions"]
        answered = [r for r in rows if r["workload"] == workload and r["system"] == "always-large"]
        assert len(answered) == n_eval
        assert all(r["text"].strip() for r in answered)
    # echo-fcfs is echo's run replayed in arrival order: same answers, same busy time
    qa = results["workloads"]["qa"]["systems"]
    assert qa["echo-fcfs"]["capacity_rps"] == qa["echo"]["capacity_rps"]
    assert qa["echo-fcfs"]["policy"] == "fcfs"
    assert qa["echo"]["policy"] == "sjf"


def test_scores_and_traps(quick_run: Path) -> None:
    results = json.loads((quick_run / "results.json").read_text())
    qa = results["workloads"]["qa"]
    assert qa["primary_metric"] == "f1"
    assert {"em", "f1", "contains"} <= set(qa["systems"]["always-large"]["measures"])
    assert results["workloads"]["math"]["primary_metric"] == "numeric"
    assert results["judge"]["calls"] > 0
    open_ = results["workloads"]["open"]
    assert open_["primary_metric"] == "judge"
    for name, row in open_["systems"].items():
        if "judge" in row["measures"]:  # None when SmolLM2 wrote no parsable rating for any answer
            assert 1.0 <= row["measures"]["judge"] <= 10.0, name
    traps = results["workloads"]["traps"]
    assert traps["primary_metric"] == "emb_large"
    assert traps["systems"]["always-large"]["measures"]["emb_large"] == pytest.approx(1.0, abs=1e-3)
    for row in traps["systems"].values():
        if traps["trace"]["kinds"].get("trap"):
            assert 0.0 <= (row["traps"]["false_reuse_rate"] or 0.0) <= 1.0


def test_files_for_the_readme(quick_run: Path) -> None:
    for name in ("results.md", "results.json", "outcomes.jsonl", "traces.json", "qa.png", "traps.png"):
        assert (quick_run / name).stat().st_size > 0, name
    table = (quick_run / "results.md").read_text()
    assert "## README table" in table
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    results = json.loads((quick_run / "results.json").read_text())
    assert report.render_readme_table(results) in table
