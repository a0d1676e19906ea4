"""Run the full benchmark harness: ``python benchmarks/run.py [--quick] [--workload qa] [--out DIR]``.

The same as ``echo-middleware bench`` (see ``echo_middleware/bench.py`` for every option and
``docs/benchmarks.md`` for what is measured).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

from echo_middleware.bench import add_bench_arguments, run_bench


def main(argv: list[str] | None = None) -> int:
    parser = add_bench_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command_line is None:
        args.command_line = " ".join(
            ["python benchmarks/run.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]
        )
    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
