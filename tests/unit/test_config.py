"""Settings: bad values raise ConfigError naming the field and the fix; ECHO_* environment variables are read."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from echo_middleware.config import EchoSettings, EngineConfig, SpeculativeOptions, build_settings, default_models_dir
from echo_middleware.errors import ConfigError


def test_defaults_are_valid() -> None:
    settings = build_settings()
    assert settings.large.model == "qwen2.5-coder-1.5b-instruct"
    assert settings.small.model == "qwen2.5-coder-0.5b-instruct"
    assert settings.large.backend == "auto"
    assert settings.large.speculative.method == "auto"


def test_auto_speculation_is_ngram_except_transformers_on_cpu() -> None:
    auto = build_settings().large.speculative
    assert auto.effective_method() == "ngram"
    assert auto.effective_method(cpu_transformers=True) == "off"
    forced = build_settings(large={"speculative": {"method": "ngram"}}).large.speculative
    assert forced.effective_method(cpu_transformers=True) == "ngram"
    assert build_settings(large={"speculative": {"method": "off"}}).large.speculative.effective_method() == "off"


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="large"):
        build_settings(large={"model": "x", "kv_cache_dtype": "fp4"})


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        pytest.param(
            {"large": {"backend": "openai", "model": "m"}},
            [r"large", r"base_url is required when backend='openai'", r"http://127\.0\.0\.1:8000/v1"],
            id="openai-without-base-url",
        ),
        pytest.param(
            {"large": {"backend": "openai", "model": "m", "base_url": "ftp://host/v1"}},
            [r"base_url='ftp://host/v1'", r"http:// or https://"],
            id="base-url-scheme",
        ),
        pytest.param(
            {"small": {"model": "m", "speculative": {"method": "draft"}}},
            [r"small\.speculative", r"speculative\.draft_model is required", r"method='ngram'"],
            id="draft-without-draft-model",
        ),
        pytest.param(
            {"small": {"model": "m", "speculative": {"prompt_lookup_min": 5, "prompt_lookup_max": 2}}},
            [r"prompt_lookup_min=5 is larger than prompt_lookup_max=2"],
            id="lookup-min-over-max",
        ),
        pytest.param(
            {"large": {"model": "m", "kv_cache_dtype": "fp4"}},
            [r"large\.kv_cache_dtype='fp4'", r"'auto', 'fp8'"],
            id="bad-kv-cache-dtype",
        ),
        pytest.param(
            {"large": {"model": "m", "backend": "tgi"}},
            [r"large\.backend='tgi'", r"'transformers'"],
            id="bad-backend",
        ),
        pytest.param(
            {"large": {"model": "m", "max_model_len": 10}},
            [r"large\.max_model_len=10", r"greater than or equal to 128"],
            id="max-model-len-bound",
        ),
        pytest.param(
            {"large": {"model": "m", "kv_cahce_dtype": "fp8"}},
            [r"large\.kv_cahce_dtype", r"Extra inputs are not permitted"],
            id="typo-is-refused",
        ),
    ],
)
def test_bad_values_name_the_field(overrides: dict[str, object], expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        build_settings(**overrides)
    message = str(info.value)
    for pattern in expected:
        assert re.search(pattern, message), (pattern, message)


def test_several_bad_fields_are_all_reported() -> None:
    with pytest.raises(ConfigError) as info:
        build_settings(large={"model": "m", "kv_cache_dtype": "fp4"}, small={"model": "m", "max_num_seqs": 0})
    assert "large.kv_cache_dtype" in str(info.value)
    assert "small.max_num_seqs" in str(info.value)


def test_engine_config_validates_directly() -> None:
    with pytest.raises(ValueError, match="base_url is required"):
        EngineConfig(backend="openai", model="m")
    with pytest.raises(ValueError, match="draft_model is required"):
        SpeculativeOptions(method="draft")
    config = EngineConfig(backend="openai", model="m", base_url="http://127.0.0.1:8000/v1")
    assert config.base_url == "http://127.0.0.1:8000/v1"


def test_assignment_is_validated() -> None:
    config = EngineConfig(model="m")
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        config.kv_cache_dtype = "int3"  # type: ignore[assignment]
    assert config.kv_cache_dtype == "fp8"


def test_nested_env_var_sets_a_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECHO_LARGE__MODEL", "my-large-model")
    monkeypatch.setenv("ECHO_LARGE__MAX_NUM_SEQS", "3")
    monkeypatch.setenv("ECHO_SMALL__SPECULATIVE__METHOD", "off")
    settings = EchoSettings()
    assert settings.large.model == "my-large-model"
    assert settings.large.max_num_seqs == 3
    assert settings.small.speculative.method == "off"
    assert settings.small.model == "qwen2.5-coder-0.5b-instruct"  # untouched


def test_bad_env_var_raises_config_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECHO_LARGE__MODEL", "m")
    monkeypatch.setenv("ECHO_LARGE__KV_CACHE_DTYPE", "fp4")
    with pytest.raises(ConfigError, match=r"large\.kv_cache_dtype='fp4'"):
        build_settings()


def test_arguments_win_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECHO_TENANT", "from-env")
    assert build_settings().tenant == "from-env"
    assert build_settings(tenant="from-arg").tenant == "from-arg"


def test_models_dir_env_var(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ECHO_MODELS_DIR", str(tmp_path / "models"))
    assert default_models_dir() == tmp_path / "models"
    assert build_settings().models_dir == tmp_path / "models"


def test_models_dir_default_is_the_user_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ECHO_MODELS_DIR", raising=False)
    assert default_models_dir().parts[-2:] == ("echo-middleware", "models")


def test_store_path_alias(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ECHO_STORE_PATH", str(tmp_path / "store"))
    assert build_settings().store.path == tmp_path / "store"


def test_a_partial_engine_section_keeps_the_default_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECHO_SMALL__DTYPE", "float32")
    settings = build_settings(large={"kv_cache_dtype": "auto"})
    assert settings.small.dtype == "float32"
    assert settings.small.model == "qwen2.5-coder-0.5b-instruct"
    assert settings.large.kv_cache_dtype == "auto"
    assert settings.large.model == "qwen2.5-coder-1.5b-instruct"
