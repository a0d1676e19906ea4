"""VLLMEngine's plan on this machine, with vLLM imported but not started.

How EngineConfig maps to AsyncEngineArgs here, what is refused up front (fp8 KV cache on a CPU without
AVX-512/AMX, in vLLM's own words), strict mode, and engine_kwargs checking. Importing vLLM takes tens of seconds,
hence integration; the started engine is tested in test_vllm_engine.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from echo_middleware.config import EngineConfig
from echo_middleware.engines.vllm import VLLMEngine, fp8_kv_refusal
from echo_middleware.errors import ConfigError, FeatureUnsupported

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

MODEL = "smollm2-135m-instruct"


def _cpu_has_avx512_or_amx() -> bool:
    import torch

    return bool(torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported())


@pytest.fixture(scope="module")
def vllm_installed() -> None:
    pytest.importorskip("vllm")


def _engine(**overrides: Any) -> VLLMEngine:
    return VLLMEngine(EngineConfig(**{"backend": "vllm", "model": MODEL, **overrides}))


@pytest.mark.usefixtures("vllm_installed")
def test_fp8_refusal_uses_vllms_reason() -> None:
    if _cpu_has_avx512_or_amx():
        assert fp8_kv_refusal(64, "fp8") is None
    else:
        assert fp8_kv_refusal(64, "fp8") == "FP8 KV cache on CPU requires x86 with AVX-512 or AMX."
    assert "head_size divisible by 32" in str(fp8_kv_refusal(80, "fp8"))


@pytest.mark.usefixtures("vllm_installed", "tiny_model_dir")
def test_defaults_map_to_cpu_engine_args() -> None:
    plan = _engine()._plan()
    assert plan.device == "cpu"
    args = plan.args
    assert args["dtype"] == "float32"
    assert args["enforce_eager"] is True
    assert args["kv_cache_memory_bytes"] == 2 * 2**30
    assert "gpu_memory_utilization" not in args
    assert args["scheduling_policy"] == "priority"
    assert args["served_model_name"] == MODEL
    assert Path(args["model"]).is_dir()
    assert args["speculative_config"] == {
        "method": "ngram",
        "num_speculative_tokens": 4,
        "prompt_lookup_max": 4,
        "prompt_lookup_min": 1,
    }
    kv = plan.features.get("kv_cache_quantized")
    if _cpu_has_avx512_or_amx():
        assert args["kv_cache_dtype"] == "fp8"
    else:
        assert "kv_cache_dtype" not in args  # refused before start, not crashed into
        assert kv is not None
        assert kv.requested
        assert not kv.enabled
        assert "AVX-512 or AMX" in kv.detail
    assert ("speculative_config", "speculative_ngram") in plan.optional
    assert ("enable_prefix_caching", "prefix_caching") in plan.optional


@pytest.mark.usefixtures("vllm_installed", "tiny_model_dir")
def test_strict_mode_refuses_fp8_naming_the_field() -> None:
    if _cpu_has_avx512_or_amx():
        pytest.skip("this CPU has AVX-512/AMX: vLLM accepts fp8 KV here")
    with pytest.raises(FeatureUnsupported, match=r"kv_cache_dtype.*AVX-512 or AMX.*Fix: set kv_cache_dtype='auto'"):
        _engine(strict=True)._plan()


@pytest.mark.usefixtures("vllm_installed", "tiny_model_dir")
def test_explicit_choices_are_kept() -> None:
    plan = _engine(
        dtype="bfloat16",
        enforce_eager=False,
        kv_cache_dtype="auto",
        enable_prefix_caching=False,
        scheduling_policy="fcfs",
        cpu_kv_cache_space_gib=0.5,
        speculative={"method": "draft", "draft_model": MODEL, "num_speculative_tokens": 3},
    )._plan()
    args = plan.args
    assert args["dtype"] == "bfloat16"
    assert args["enforce_eager"] is False
    assert "kv_cache_dtype" not in args
    assert args["enable_prefix_caching"] is False
    assert args["scheduling_policy"] == "fcfs"
    assert args["kv_cache_memory_bytes"] == 2**29
    assert args["speculative_config"] == {"model": args["model"], "num_speculative_tokens": 3}
    assert plan.optional == [("speculative_config", "speculative_draft")]
    assert "kv_cache_quantized" not in plan.features  # not asked for, nothing to refuse


@pytest.mark.usefixtures("vllm_installed", "tiny_model_dir")
def test_engine_kwargs_are_checked_and_win() -> None:
    plan = _engine(engine_kwargs={"max_num_batched_tokens": 1024, "enable_prefix_caching": False})._plan()
    assert plan.args["max_num_batched_tokens"] == 1024
    assert plan.args["enable_prefix_caching"] is False
    assert all(field != "enable_prefix_caching" for field, _ in plan.optional)  # the user's own choice stays
    with pytest.raises(ConfigError, match=r"engine_kwargs has \['max-num-seqs'\].*underscores"):
        _engine(engine_kwargs={"max-num-seqs": 2})._plan()
