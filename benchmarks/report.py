"""Turn a benchmark run into files: results JSON, per-request outcomes, Markdown tables, plots, summary.json.

The README's table is generated, never typed: :func:`render_readme_table` renders it from ``results.json``::

    .venv/bin/python benchmarks/report.py benchmarks/results/results.json          # print the README table
    .venv/bin/python benchmarks/report.py benchmarks/results/results.json --full   # every table of the run
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ORDER = (
    "always-large",
    "always-small",
    "semantic-cache",
    "similarity-examples",
    "echo",
    "echo-fcfs",
    "echo-nospec",
    "echo-similarity",
)
SUMMARY_SYSTEMS = ("always-large", "always-small", "semantic-cache", "similarity-examples", "echo")


def _f(value: Any, digits: int = 2, pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and (math.isnan(value) or math.isinf(value))):
        return "–"
    if pct:
        return f"{100 * value:.0f}%"
    return f"{value:.{digits}f}"


def _systems(block: dict[str, Any]) -> list[str]:
    return [name for name in ORDER if name in block["systems"]]


def headline_rate(results: dict[str, Any]) -> str:
    """The arrival-rate multiple the latency columns are read at."""
    return f"{results['config']['headline_rate']:g}"


def render_workload_table(results: dict[str, Any], workload: str) -> str:
    """One workload: every system's quality, cost and speed in one table."""
    block = results["workloads"][workload]
    rate = headline_rate(results)
    metric = block["primary_metric"]
    traps = any("traps" in block["systems"][s] for s in block["systems"])
    head = [
        "system",
        f"quality ({metric})",
        "retention",
        "offload",
        "capacity (req/s)",
        "x always-large",
        "x always-large, learning charged",
        "x always-large (CPU s)",
        f"p50 s @{rate}x",
        f"p90 s @{rate}x",
        "large tokens",
    ]
    if traps:
        head.append("false reuse (traps)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in _systems(block):
        row = block["systems"][name]
        load = row["load"].get(rate, {})
        cells = [
            f"`{name}`",
            _f(row["quality"]),
            _f(row["quality_retention"]),
            _f(row["offload_rate"], pct=True),
            _f(row["capacity_rps"], 3),
            _f(row["speedup_vs_large"]),
            _f(row.get("speedup_vs_large_with_learning")),
            _f(row.get("speedup_vs_large_cpu")),
            _f(load.get("p50_latency_s"), 1),
            _f(load.get("p90_latency_s"), 1),
            _f(row["large_token_share"], pct=True),
        ]
        if traps:
            cells.append(_f(row.get("traps", {}).get("false_reuse_rate"), pct=True))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_kind_table(results: dict[str, Any], workload: str) -> str:
    """Quality retention and offload rate split by request kind (fresh / paraphrase / repeat / trap)."""
    block = results["workloads"][workload]
    kinds = [k for k, n in block["trace"]["kinds"].items() if n]
    head = ["system", *[f"{k} (n={block['trace']['kinds'][k]}) retention / offload" for k in kinds]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in _systems(block):
        row = block["systems"][name]
        cells = [f"`{name}`"]
        for kind in kinds:
            k = row["by_kind"].get(kind)
            cells.append("–" if k is None else f"{_f(k['quality_retention'])} / {_f(k['offload_rate'], pct=True)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_load_table(results: dict[str, Any], workload: str) -> str:
    """Throughput and latency at every replayed arrival rate."""
    block = results["workloads"][workload]
    rates = list(next(iter(block["systems"].values()))["load"])
    head = ["system", *[f"{r}x: req/s, p50 / p90 s" for r in rates]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in _systems(block):
        load = block["systems"][name]["load"]
        cells = [f"`{name}`"]
        for r in rates:
            x = load[r]
            cells.append(f"{_f(x['throughput_rps'], 3)}, {_f(x['p50_latency_s'], 1)} / {_f(x['p90_latency_s'], 1)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_live_table(results: dict[str, Any], workload: str) -> str:
    """Live (wall-clock, concurrent) latency against the replayed figures at the same arrivals."""
    live = results["workloads"][workload].get("live") or {}
    if not live:
        return ""
    head = ["system", "rate (req/s)", "live p50 / p90 s", "replayed p50 / p90 s", "live req/s", "replayed req/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in live.items():
        rep = row.get("replayed") or {}
        lines.append(
            "| "
            + " | ".join(
                [
                    f"`{name}`",
                    _f(row["rate_rps"], 3),
                    f"{_f(row['p50_latency_s'], 1)} / {_f(row['p90_latency_s'], 1)}",
                    f"{_f(rep.get('p50_latency_s'), 1)} / {_f(rep.get('p90_latency_s'), 1)}",
                    _f(row["throughput_rps"], 3),
                    _f(rep.get("throughput_rps"), 3),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def render_sweep_table(results: dict[str, Any], workload: str) -> str:
    """The semantic cache at other thresholds (replayed): hit rates by kind and quality retention."""
    rows = results["workloads"][workload].get("semantic_sweep") or []
    if not rows:
        return ""
    kinds = [k for k in ("fresh", "paraphrase", "repeat", "trap") if f"hit_rate_{k}" in rows[0]]
    head = ["cosine threshold", "hits", *[f"hits on {k}" for k in kinds], "quality retention"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [f"{row['threshold']:g}", _f(row["hit_rate"], pct=True)]
        cells += [_f(row.get(f"hit_rate_{k}"), pct=True) for k in kinds]
        cells.append(_f(row["quality_retention"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_readme_table(results: dict[str, Any]) -> str:
    """The README's table: one row per system and workload, with the command and machine that produced it."""
    rate = headline_rate(results)
    head = [
        "workload",
        "system",
        "quality retention",
        "offload",
        "throughput vs always-large",
        f"p50 latency @{rate}x load (s)",
        "large-model tokens",
        "false reuse on traps",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for workload, block in results["workloads"].items():
        for name in _systems(block):
            if name not in SUMMARY_SYSTEMS:
                continue
            row = block["systems"][name]
            load = row["load"].get(rate, {})
            lines.append(
                "| "
                + " | ".join(
                    [
                        workload,
                        f"`{name}`",
                        _f(row["quality_retention"]),
                        _f(row["offload_rate"], pct=True),
                        f"{_f(row['speedup_vs_large'])}x",
                        _f(load.get("p50_latency_s"), 1),
                        _f(row["large_token_share"], pct=True),
                        _f(row.get("traps", {}).get("false_reuse_rate"), pct=True),
                    ]
                )
                + " |"
            )
    cfg = results["config"]
    note = (
        f"\n\nMeasured by `{results['command']}` on {results['machine']}; large model {cfg['large']}, small model "
        f"{cfg['small']}, engine {cfg['backend']}. Quality retention = quality / always-large's quality; latency "
        f"under Poisson arrivals at {rate}x always-large's capacity, replayed over measured service times. "
        "See docs/benchmarks.md for what these numbers do and do not show."
    )
    return "\n".join(lines) + note


def render_markdown(results: dict[str, Any]) -> str:
    """Every table of a run, with the traces' composition."""
    cfg = results["config"]
    parts = [
        "# echo-middleware benchmark results",
        "",
        f"- command: `{results['command']}`",
        f"- machine: {results['machine']}",
        f"- date: {results['date']}, wall time {results['wall_s'] / 60:.1f} min",
        f"- large: {cfg['large']}, small: {cfg['small']}, engine: {cfg['backend']} (dtype {cfg['dtype']}), "
        f"speculation: {cfg['speculative']}",
        f"- judge: {results['judge'].get('model') or 'off'}"
        + (
            f" ({results['judge'].get('calls', 0)} calls, {results['judge'].get('unparsed', 0)} unparsed)"
            if results["judge"].get("model")
            else ""
        ),
        f"- arrival rates (x always-large capacity): {', '.join(f'{r:g}' for r in cfg['rates'])}; "
        f"latency columns at {cfg['headline_rate']:g}x",
        "- capacity: requests per second of serving time. The learner's shadow checks and probes run only while "
        "an engine is idle, so a saturated server does none; the replay runs them in idle time, and the "
        "'learning charged' column counts them as busy time in full",
        "",
    ]
    for workload, block in results["workloads"].items():
        parts += [
            f"## {workload}",
            "",
            f"Trace: {block['trace']['description']}. Quality measure: `{block['primary_metric']}`.",
            "",
            render_workload_table(results, workload),
            "",
            "By kind (quality retention against always-large on the same kind / share not answered by the large "
            "model):",
            "",
            render_kind_table(results, workload),
            "",
            "Under load (Poisson arrivals, rate as a multiple of always-large's capacity):",
            "",
            render_load_table(results, workload),
            "",
        ]
        live = render_live_table(results, workload)
        if live:
            parts += [
                "Live check: the same arrivals sent concurrently on the wall clock, against the replay:",
                "",
                live,
                "",
            ]
        sweep = render_sweep_table(results, workload)
        if sweep:
            parts += [
                "The semantic cache at other thresholds (replayed over the same embeddings and always-large's "
                "answers; on traps every hit is a false reuse):",
                "",
                sweep,
                "",
            ]
    parts += ["## README table", "", render_readme_table(results), ""]
    return "\n".join(parts)


def summary(results: dict[str, Any], workload: str | None = None) -> dict[str, Any]:
    """The headline figures, shaped for ``summary.json``.

    ``throughput_rps`` is the saturation throughput (requests per second of serving time; the learner's
    idle-time work is not charged, as a saturated server never runs it); the latencies are at the headline
    arrival rate, where the replay does run that work in idle time.
    """
    workload = workload or results["config"].get("headline") or next(iter(results["workloads"]))
    block = results["workloads"][workload]
    rate = headline_rate(results)
    systems = {}
    for name in SUMMARY_SYSTEMS:
        row = block["systems"].get(name)
        if row is None:
            continue
        load = row["load"].get(rate, {})
        systems[name] = {
            "throughput_rps": _num(row["capacity_rps"]),
            "p50_latency_s": _num(load.get("p50_latency_s")),
            "p90_latency_s": _num(load.get("p90_latency_s")),
            "offload_rate": _num(row["offload_rate"]),
            "quality_retention": _num(row["quality_retention"]),
        }
    return {"workload": workload, "machine": results["machine"], "command": results["command"], "systems": systems}


def _num(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else value


def _clean(value: Any) -> Any:
    """NaN and infinity as null, so the JSON is standard."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


def plot(results: dict[str, Any], out: Path) -> list[Path]:
    """Latency against load, and quality retention against throughput, one figure each per workload."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the bench extra is missing: the numbers are still written
        return []
    written = []
    for workload, block in results["workloads"].items():
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for name in _systems(block):
            row = block["systems"][name]
            rates = [v["rate_rps"] for v in row["load"].values()]
            p50 = [v["p50_latency_s"] for v in row["load"].values()]
            ax1.plot(rates, p50, marker="o", label=name)
            if row["quality_retention"] is not None and not _isnan(row["quality_retention"]):
                ax2.scatter(row["capacity_rps"], row["quality_retention"], s=40)
                ax2.annotate(name, (row["capacity_rps"], row["quality_retention"]), fontsize=8)
        ax1.set_xlabel("arrival rate (requests/s)")
        ax1.set_ylabel("p50 latency (s)")
        ax1.set_yscale("log")
        ax1.set_title(f"{workload}: latency under Poisson load")
        ax1.legend(fontsize=7)
        ax2.set_xlabel("capacity (requests/s of busy time)")
        ax2.set_ylabel("quality retention vs always-large")
        ax2.axhline(0.97, color="grey", linestyle="--", linewidth=0.8)
        ax2.set_title(f"{workload}: quality vs throughput")
        fig.tight_layout()
        path = out / f"{workload}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def write_all(results: dict[str, Any], traces: dict[str, Any], outcomes: dict[str, Any], config: Any) -> None:
    """Write results.json, outcomes.jsonl, traces.json, results.md, plots and summary.json into ``config.out``."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    clean = _clean(results)
    (out / "results.json").write_text(json.dumps(clean, indent=2) + "\n", encoding="utf-8")
    with (out / "outcomes.jsonl").open("w", encoding="utf-8") as handle:
        for workload, by_system in outcomes.items():
            for name, rows in by_system.items():
                for o in rows:
                    row = {"workload": workload, "system": name, **o.__dict__}
                    handle.write(json.dumps(_clean(row), default=str) + "\n")
    (out / "traces.json").write_text(
        json.dumps({w: t.to_json() for w, t in traces.items()}, indent=1) + "\n", encoding="utf-8"
    )
    (out / "results.md").write_text(render_markdown(clean), encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(summary(clean), indent=2) + "\n", encoding="utf-8")
    plot(clean, out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Render the README table (or every table) from results.json.")
    parser.add_argument("results", type=Path, nargs="?", default=Path(__file__).parent / "results" / "results.json")
    parser.add_argument("--full", action="store_true", help="every table of the run, not only the README's")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text(encoding="utf-8"))
    print(render_markdown(results) if args.full else render_readme_table(results))


if __name__ == "__main__":
    main()
