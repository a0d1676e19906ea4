"""Exceptions raised by echo-middleware.

Every error a user can act on says which field or input was wrong and how to fix it. The tree::

    EchoError
    ├── ConfigError(ValueError)         a setting or argument is invalid (names the field and the fix)
    ├── ModelError                      a bundled model cannot be fetched, found or loaded
    │   └── ModelNotFound               the model folder is missing: run `echo-middleware models fetch`
    ├── StoreError                      the example store failed
    │   ├── StoreUnavailable            the store cannot be reached (transient: retried)
    │   └── EmbeddingMismatch           stored vectors have another dimension than the embedder makes
    ├── EngineError                     an engine failed to generate
    │   ├── EngineUnavailable           cannot be reached or not started (transient: retried)
    │   ├── EngineTimeout               no answer within the timeout (transient: retried)
    │   ├── FeatureUnsupported          an engine flag the platform refuses (strict mode only)
    │   └── Cancelled                   the request was cancelled (client gone, deadline, hedge loser)
    └── Overloaded                      admission control refused a request (queue full)

Transient errors (``StoreUnavailable``, ``EngineUnavailable``, ``EngineTimeout``) are the only ones retried,
with tenacity, at the boundary that talks to the network.
"""

from __future__ import annotations


class EchoError(Exception):
    """Base class of every error echo-middleware raises on purpose."""


class ConfigError(EchoError, ValueError):
    """A setting or argument is invalid; the message names the field, the value and the fix."""


class ModelError(EchoError):
    """A bundled model cannot be fetched, assembled, converted or loaded."""


class ModelNotFound(ModelError):
    """A model folder is missing; ``echo-middleware models fetch NAME`` materialises it."""


class StoreError(EchoError):
    """The example store failed."""


class StoreUnavailable(StoreError):
    """The store cannot be reached right now (server down, locked file); retrying may help."""


class EmbeddingMismatch(StoreError):
    """The stored vectors have another dimension or embedder than the one configured now."""


class EngineError(EchoError):
    """An engine failed to generate."""


class EngineUnavailable(EngineError):
    """The engine cannot be reached or has not been started; retrying may help."""


class EngineTimeout(EngineError):
    """The engine did not answer within its timeout."""


class FeatureUnsupported(EngineError):
    """An engine flag (fp8 KV cache, speculation...) that this platform cannot do, in strict mode."""


class Cancelled(EngineError):
    """The request was cancelled before it finished (client disconnect, deadline, hedge loser)."""


class Overloaded(EchoError):
    """Admission control refused the request: the engine's queue is full."""


TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (StoreUnavailable, EngineUnavailable, EngineTimeout)
"""The errors worth retrying; everything else is final."""
