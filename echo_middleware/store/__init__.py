"""Pipeline stage 2, retrieve: the example store on Chroma (embedded or a shared server), one collection per tenant.

Nothing here imports chromadb or connects at import time; the store opens on its first call.
"""

from __future__ import annotations

from echo_middleware.store.base import (
    BaseExampleStore,
    ReplayItem,
    StoreStats,
    better_answer,
    example_value,
    example_values,
    is_expired,
    merge_examples,
    validate_tenant,
)
from echo_middleware.store.chroma import ChromaExampleStore, ExampleStore, create_store

__all__ = [
    "BaseExampleStore",
    "ChromaExampleStore",
    "ExampleStore",
    "ReplayItem",
    "StoreStats",
    "better_answer",
    "create_store",
    "example_value",
    "example_values",
    "is_expired",
    "merge_examples",
    "validate_tenant",
]
