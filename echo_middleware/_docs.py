"""Generate docs/configuration.md from the settings models, so the reference never drifts from the code.

    python -m echo_middleware._docs > docs/configuration.md

A unit test fails when the committed file differs from what this prints.
"""

from __future__ import annotations

import sys
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from echo_middleware.config import EchoSettings

_HEADER = """# Configuration reference

Generated from `echo_middleware/config.py` by `python -m echo_middleware._docs > docs/configuration.md`;
do not edit by hand.

Settings come from keyword arguments (`EchoPipeline.from_defaults(large={"model": ...})`), then `ECHO_*`
environment variables (sections nested with `__`: `ECHO_STORE__HOST=chroma.internal`), then the defaults below.
`ECHO_MODELS_DIR` and `ECHO_STORE_PATH` are read as the defaults of `models_dir` and `store.path`.
Unknown keys are rejected, and a bad value raises `ConfigError` naming the field, the value and the fix.
"""


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        try:
            value: Any = info.default_factory()  # type: ignore[call-arg]
        except TypeError:
            return "(computed)"
        if isinstance(value, BaseModel):
            return "(section)"
        if hasattr(value, "__fspath__"):
            return "(per-user dir)"
        return f"`{value!r}`"
    if info.is_required():
        return "required"
    return f"`{info.default!r}`"


def _type(info: FieldInfo) -> str:
    text = str(info.annotation)
    for noise in ("typing.", "pathlib.", "pydantic.types.", "<class '", "'>"):
        text = text.replace(noise, "")
    return text.replace("|", "\\|")


def _bounds(info: FieldInfo) -> str:
    parts = []
    for meta in info.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sign} {value}")
    return ", ".join(parts)


def _table(model: type[BaseModel], prefix: str) -> list[str]:
    rows = ["| setting | env var | type | default | bounds | meaning |", "|---|---|---|---|---|---|"]
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            continue
        env = f"ECHO_{(prefix + name).replace('.', '__').upper()}"
        desc = (info.description or "").replace("|", "\\|")
        rows.append(f"| `{prefix}{name}` | `{env}` | {_type(info)} | {_default(info)} | {_bounds(info)} | {desc} |")
    return rows


def _sections(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = [*_table(model, prefix), ""]
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            doc = (annotation.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
            out += [f"## `{prefix}{name}` — {annotation.__name__}", "", doc, ""]
            out += _sections(annotation, f"{prefix}{name}.")
    return out


def render() -> str:
    """The whole configuration reference as Markdown."""
    return "\n".join([_HEADER, "## Top level", "", *_sections(EchoSettings)]).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
