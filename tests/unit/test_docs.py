"""The configuration reference in docs/ is generated from the settings models and must match them."""

from __future__ import annotations

from pathlib import Path

from echo_middleware._docs import render

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_configuration_reference_is_current() -> None:
    assert DOC.read_text() == render(), "regenerate: python -m echo_middleware._docs > docs/configuration.md"


def test_every_setting_is_documented() -> None:
    text = render()
    for name in ("large.kv_cache_dtype", "store.hnsw_ef_search", "route.target_retention", "schedule.policy"):
        assert f"`{name}`" in text
