"""Tokens/s of the transformers engine with prompt-lookup (or draft) speculation on vs off, side by side.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/transformers_speed.py`` (SmolLM2 and Qwen 0.5B, about four
minutes on 2 cores). Writes ``benchmarks/results/transformers_speed.json``. See ``_engine_bench_transformers.py``
for what is measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _engine_bench_transformers import bench_transformers, format_table

from echo_middleware.errors import ModelNotFound
from echo_middleware.models import model_path

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"], help="models"
    )
    parser.add_argument("--methods", nargs="+", default=["off", "ngram"], choices=["off", "ngram", "draft"])
    parser.add_argument("--draft-model", default=None, help="draft model for --methods draft")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument(
        "--cpu-threads", type=int, default=None, help="torch threads (1 when other processes share the cores)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "transformers_speed.json")
    args = parser.parse_args()

    models = []
    for name in args.models:
        try:
            model_path(name)
            models.append(name)
        except ModelNotFound as exc:
            print(f"skipping {name}: {exc}")
    began = time.time()
    before = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    rows = bench_transformers(
        models,
        methods=args.methods,
        max_tokens=args.max_tokens,
        repeats=args.repeats,
        dtype=args.dtype,
        draft_model=args.draft_model,
        cpu_threads=args.cpu_threads,
    )
    print(format_table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": " ".join(sys.argv),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "python": sys.version},
        "seconds": time.time() - began,
        "loadavg_before": before,
        "loadavg_after": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None,
        "rows": rows,
    }
    args.out.write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
