"""create_engine: backend names to engine classes, imported lazily; the transformers engine's pure helpers."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from echo_middleware.config import EngineConfig
from echo_middleware.engines import ENGINES, create_engine, resolve_backend
from echo_middleware.engines.transformers import IncrementalDecoder, StopTrimmer, TransformersEngine
from echo_middleware.errors import ConfigError


def test_transformers_backend_builds_without_loading() -> None:
    engine = create_engine(EngineConfig(backend="transformers", model="smollm2-135m-instruct"), name="tiny")
    assert isinstance(engine, TransformersEngine)
    assert engine.name == "tiny"
    assert not engine.started
    assert engine.max_concurrency == 1
    assert engine.context_window == 4096  # max_model_len until the model's own limit is known


def test_default_name_and_models_dir(tmp_path: object) -> None:
    engine = create_engine(EngineConfig(backend="transformers", model="smollm2-135m-instruct"), models_dir=tmp_path)
    assert engine.name == "transformers:smollm2-135m-instruct"
    assert engine._models_dir == tmp_path  # type: ignore[attr-defined]


def test_importing_the_engines_loads_no_heavy_dependency() -> None:
    # Constructing a transformers engine must not import torch (start() does).
    if "torch" in sys.modules:
        pytest.skip("torch was imported by an earlier test in this process")
    create_engine(EngineConfig(backend="transformers", model="smollm2-135m-instruct"))
    assert "torch" not in sys.modules


def test_auto_prefers_vllm_when_installed() -> None:
    expected = "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"
    assert resolve_backend("auto") == expected


def test_unknown_backend_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"backend='tgi'.*auto, openai, transformers, vllm"):
        resolve_backend("tgi")


def test_every_backend_has_a_target() -> None:
    assert set(ENGINES) == {"transformers", "vllm", "openai"}
    for target in ENGINES.values():
        module, _, cls = target.partition(":")
        assert module.startswith("echo_middleware.engines.")
        assert cls.endswith("Engine")


# ------------------------------------------------------------------------------- StopTrimmer


def _trim(pieces: list[str], stops: list[str]) -> tuple[str, list[str], str | None]:
    trimmer = StopTrimmer(stops)
    shown = [trimmer.feed(p) for p in pieces]
    shown.append(trimmer.flush())
    return "".join(shown), shown, trimmer.hit


def test_trimmer_without_stops_passes_text_through() -> None:
    assert _trim(["a", "b"], []) == ("ab", ["a", "b", ""], None)


def test_trimmer_cuts_before_the_stop_string() -> None:
    text, _, hit = _trim(["Hello ", "wor", "ld. END more"], ["END"])
    assert text == "Hello world. "
    assert hit == "END"


def test_trimmer_finds_a_stop_split_over_pieces_and_never_shows_its_start() -> None:
    text, shown, hit = _trim(["answer: 4", "2\n#", "#", "# next"], ["###"])
    assert text == "answer: 42\n"
    assert hit == "###"
    assert all("#" not in piece for piece in shown)


def test_trimmer_releases_held_text_that_did_not_become_a_stop() -> None:
    text, shown, hit = _trim(["a#", "#b", "c"], ["###"])
    assert hit is None
    assert text == "a##bc"
    assert shown[0] == "a"  # "#" was held back until it was clearly not "###"


def test_trimmer_picks_the_earliest_of_several_stops() -> None:
    text, _, hit = _trim(["one two three"], ["three", "two"])
    assert (text, hit) == ("one ", "two")


def test_trimmer_ignores_text_after_a_hit() -> None:
    trimmer = StopTrimmer(["x"])
    assert trimmer.feed("abxcd") == "ab"
    assert trimmer.feed("more") == ""
    assert trimmer.flush() == ""


# ------------------------------------------------------------------------------- IncrementalDecoder


def _utf8(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def test_decoder_waits_for_whole_characters() -> None:
    data = "héllo 🌊!".encode()
    decoder = IncrementalDecoder(_utf8)
    pieces = [decoder.push([b]) for b in data]
    pieces.append(decoder.flush())
    assert "".join(pieces) == "héllo 🌊!"
    assert all("\ufffd" not in p for p in pieces)
    wave = data.index("🌊".encode())
    assert pieces[wave : wave + 3] == ["", "", ""]  # the 4-byte emoji appears once complete
    assert pieces[wave + 3] == "🌊"


def test_decoder_flushes_a_trailing_partial_character() -> None:
    decoder = IncrementalDecoder(_utf8)
    assert decoder.push(list(b"ok")) == "ok"
    assert decoder.push([0xF0, 0x9F]) == ""
    assert decoder.flush() == "\ufffd"
