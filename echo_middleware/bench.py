"""``echo-middleware bench``: run the benchmark harness in ``benchmarks/`` from the command line.

The harness, its workloads and their data live in the repository's ``benchmarks/`` folder (the data is not part
of the installed package), so this command runs from a checkout: it finds ``benchmarks/`` next to the package,
in the current directory, or where ``--benchmarks-dir`` points. Wire it into a parser with::

    sub = parser.add_subparsers(...)
    bench = sub.add_parser("bench", help="speed, cost and answer quality against the alternatives")
    add_bench_arguments(bench)
    bench.set_defaults(func=run_bench)

``--quick`` runs every system on a small slice with SmolLM2-135M as both models (what CI runs, a few minutes on
2 cores); without it the full run uses Qwen2.5-Coder 1.5B (large) and 0.5B (small), about 30 minutes.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Any

from echo_middleware.errors import ConfigError

QUICK_MODEL = "smollm2-135m-instruct"


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``bench`` options to ``parser`` (shared by the CLI and ``benchmarks/run.py``)."""
    parser.add_argument("--quick", action="store_true", help="every system on a small slice, SmolLM2 as both models")
    parser.add_argument(
        "--workload",
        action="append",
        choices=["qa", "math", "open", "traps"],
        help="workload to run (repeat for several; default: all four)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="results folder (default: benchmarks/results, --quick: .../quick)"
    )
    parser.add_argument(
        "--system",
        action="append",
        help="system to run (repeat; default: all but echo-similarity): always-large, always-small, "
        "semantic-cache, similarity-examples, echo, echo-fcfs, echo-nospec, echo-similarity",
    )
    parser.add_argument("--large", default=None, help="large model (default: qwen2.5-coder-1.5b-instruct)")
    parser.add_argument("--small", default=None, help="small model (default: qwen2.5-coder-0.5b-instruct)")
    parser.add_argument("--backend", default="transformers", choices=["transformers", "vllm", "auto"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument(
        "--speculative",
        default="auto",
        choices=["auto", "off", "ngram"],
        help="speculation of the default engines (auto: as shipped, off for transformers on CPU)",
    )
    parser.add_argument(
        "--size",
        action="append",
        default=[],
        metavar="WORKLOAD=WARMUP,EVAL",
        help="requests per workload, e.g. qa=60,40 (repeat)",
    )
    parser.add_argument(
        "--repeat-p", type=float, default=None, help="share of verbatim repeats (default: the recipe's 0.03)"
    )
    parser.add_argument(
        "--paraphrase-p",
        type=float,
        default=None,
        help="chance a question with a second wording gets it asked later (default: qa 1.0)",
    )
    parser.add_argument("--zipf-s", type=float, default=None, help="Zipf exponent over task types (default 1.0)")
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of traces, arrivals and sampling (default 0; --quick: 7)"
    )
    parser.add_argument(
        "--rates",
        default=None,
        help="arrival rates as multiples of always-large's capacity, comma-separated (default 0.5,0.8,1.2)",
    )
    parser.add_argument("--semantic-threshold", type=float, default=0.8, help="semantic cache: cosine to reuse")
    parser.add_argument(
        "--semantic-impl", default="auto", choices=["auto", "gptcache", "chroma"], help="semantic cache backend"
    )
    parser.add_argument("--no-judge", action="store_true", help="skip the LLM judge (open text uses similarity)")
    parser.add_argument(
        "--live",
        action="append",
        default=[],
        metavar="SYSTEM",
        help="also run SYSTEM live (concurrent requests, wall clock) at the headline rate, to check the replay",
    )
    parser.add_argument("--headline", default=None, help="workload of summary.json (default: the first one run)")
    parser.add_argument("--no-cache", action="store_true", help="regenerate the warm-up answers")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--benchmarks-dir", type=Path, default=None, help="the repository's benchmarks/ folder")
    parser.add_argument("--command-line", default=None, help=argparse.SUPPRESS)
    return parser


def find_benchmarks(explicit: Path | None = None) -> Path:
    """The ``benchmarks/`` folder of a checkout: explicit, next to the package, or in the current directory."""
    here = Path(__file__).resolve().parents[1] / "benchmarks"
    candidates = [explicit] if explicit else [here, Path.cwd() / "benchmarks"]
    for folder in candidates:
        if (folder / "harness.py").is_file():
            return folder
    raise ConfigError(
        "benchmarks/ not found: `echo-middleware bench` runs from a checkout of the repository "
        "(git clone, then run it in the checkout) or pass --benchmarks-dir PATH/TO/benchmarks"
    )


def _sizes(pairs: list[str]) -> dict[str, tuple[int, int]]:
    sizes = {}
    for pair in pairs:
        try:
            workload, numbers = pair.split("=", 1)
            warm, evals = (int(x) for x in numbers.split(","))
        except ValueError:
            raise ConfigError(f"--size {pair!r}: write WORKLOAD=WARMUP,EVAL, e.g. qa=60,40") from None
        sizes[workload] = (warm, evals)
    return sizes


def build_config(args: argparse.Namespace, harness: Any, benchmarks: Path) -> Any:
    """The harness's :class:`BenchConfig` from parsed arguments."""
    workloads = list(dict.fromkeys(args.workload or ["qa", "math", "open", "traps"]))
    large = args.large or (QUICK_MODEL if args.quick else "qwen2.5-coder-1.5b-instruct")
    small = args.small or (QUICK_MODEL if args.quick else "qwen2.5-coder-0.5b-instruct")
    rates = harness.DEFAULT_RATES
    if args.rates:
        try:
            rates = tuple(float(x) for x in args.rates.split(","))
        except ValueError:
            raise ConfigError(f"--rates {args.rates!r}: write numbers separated by commas, e.g. 0.5,0.8,1.2") from None
        if not rates or min(rates) <= 0:
            raise ConfigError(f"--rates {args.rates!r}: every rate must be > 0")
    headline_rate = harness.HEADLINE_RATE if harness.HEADLINE_RATE in rates else rates[len(rates) // 2]
    if args.headline and args.headline not in workloads:
        raise ConfigError(f"--headline {args.headline!r} is not among the workloads run ({', '.join(workloads)})")
    return harness.BenchConfig(
        workloads=workloads,
        # A quick run never overwrites the full run's results (the README's table comes from those).
        out=args.out or (benchmarks / "results" / ("quick" if args.quick else "")),
        quick=args.quick,
        systems=list(dict.fromkeys(args.system or harness.DEFAULT_SYSTEMS)),
        large=large,
        small=small,
        backend=args.backend,
        dtype=args.dtype,
        speculative=args.speculative,
        sizes=_sizes(args.size),
        seed=args.seed if args.seed is not None else (harness.QUICK_SEED if args.quick else 0),
        rates=rates,
        headline_rate=headline_rate,
        semantic_threshold=args.semantic_threshold,
        semantic_impl=args.semantic_impl,
        judge=not args.no_judge,
        headline=args.headline or workloads[0],
        command=args.command_line or "echo-middleware bench",
        use_cache=not args.no_cache,
        live=list(dict.fromkeys(args.live)),
        trace_knobs={
            k: v
            for k, v in (("repeat_p", args.repeat_p), ("paraphrase_p", args.paraphrase_p), ("zipf_s", args.zipf_s))
            if v is not None
        },
        progress=not args.no_progress,
    )


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` (see :func:`add_bench_arguments`); returns an exit code.

    Writes ``results.json``, ``results.md``, ``outcomes.jsonl``, ``traces.json``, ``summary.json`` and one plot
    per workload into ``--out``, and prints the README table.
    """
    from echo_middleware._sync import run_sync

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    benchmarks = find_benchmarks(getattr(args, "benchmarks_dir", None))
    if str(benchmarks) not in sys.path:
        sys.path.insert(0, str(benchmarks))
    harness = importlib.import_module("harness")
    report = importlib.import_module("report")
    if not getattr(args, "command_line", None):
        args.command_line = "echo-middleware bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else ""
        args.command_line = args.command_line.strip() or "echo-middleware bench"
    config = build_config(args, harness, benchmarks)
    results = run_sync(harness.run(config))
    sys.stdout.write(report.render_readme_table(results) + "\n")
    sys.stdout.write(f"\nresults in {config.out}\n")
    return 0
