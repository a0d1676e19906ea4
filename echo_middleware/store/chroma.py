"""The example store on Chroma: embedded (``PersistentClient``) or a shared ``chroma run`` server (``HttpClient``).

Layout: one collection per tenant, named ``<collection_prefix><tenant>``, with cosine HNSW. A plain query of one
collection is about ten times faster at 100k items than a ``where=`` filter over a shared one, and deleting or
isolating a tenant is exact. The request text is the document; the answer and the usage statistics are metadata
(:func:`to_record` / :func:`from_record`). The collection's metadata records the embedder's name and vector length,
and opening a collection made with another embedder raises :class:`~echo_middleware.errors.EmbeddingMismatch`
instead of mixing vectors that cannot be compared. The replay queue is one more collection,
``<collection_prefix>_replay`` (a tenant name cannot start with ``_``).

Writes: every write to a tenant goes through that tenant's writer, one at a time, in arrival order. Callers that
arrive while a write runs are batched into the next one (consecutive adds become one upsert, consecutive usage
records one read-modify-write), so counters never lose an update under contention and many small writes cost few
Chroma calls. A write returns only after Chroma has committed it (embedded: the SQLite log; server: the server's
answer), so an acknowledged example survives ``kill -9``. Reads run in parallel with writes.

Concurrency across processes: an embedded store is locked to one process (an advisory ``flock`` on
``echo-store.lock`` in its folder), because two processes writing one Chroma folder corrupt its index; share a
store between processes with a Chroma server. Against a server, adds and deletes from many workers are safe;
usage counters are exact per worker process but two workers updating the *same* example at the same instant may
overwrite each other's increment (Chroma has no atomic increment).

Failures: every call to a server has a timeout; connection errors, timeouts, 502/503/504 and a locked SQLite
database become :class:`~echo_middleware.errors.StoreUnavailable` and are retried with tenacity (each retried call
is idempotent: upserts and absolute counter values); a corrupt store, a folder that is a file, or a collection of
someone else raise :class:`~echo_middleware.errors.StoreError` with the fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from echo_middleware.config import StoreConfig
from echo_middleware.embed.base import Embedder
from echo_middleware.errors import ConfigError, EchoError, EmbeddingMismatch, StoreError, StoreUnavailable
from echo_middleware.store.base import (
    BaseExampleStore,
    ReplayItem,
    StoreStats,
    example_values,
    is_expired,
    merge_examples,
    same_wording,
    validate_tenant,
    validate_text,
    validate_utility,
)
from echo_middleware.types import Candidate, Example, Message

logger = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA_VERSION = 1
LOCK_FILE = "echo-store.lock"
REPLAY = "_replay"
"""Writer key and collection suffix of the replay queue (never a valid tenant name)."""
PAGE = 2000
"""Rows per ``get`` when scanning a collection (export, stats, eviction)."""
MAX_K = 10_000

_COUNTER_KEYS = ("hits", "last_used", "utility_sum", "utility_n", "offload_successes")


# --------------------------------------------------------------------------------------------- record codec


def to_record(example: Example) -> tuple[str, str, dict[str, Any]]:
    """``(id, document, metadata)`` for Chroma. Optional fields are written as None so an upsert clears them."""
    try:
        meta_json = json.dumps(example.metadata, ensure_ascii=False) if example.metadata else None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"example {example.id!r}: metadata must be JSON-serialisable ({exc})") from exc
    messages = json.dumps([m.model_dump() for m in example.messages], ensure_ascii=False) if example.messages else None
    metadata: dict[str, Any] = {
        "response": example.response,
        "model": example.model,
        "created_at": float(example.created_at),
        "last_used": float(example.last_used),
        "hits": int(example.hits),
        "prompt_tokens": int(example.prompt_tokens),
        "response_tokens": int(example.response_tokens),
        "quality": None if example.quality is None else float(example.quality),
        "utility_sum": float(example.utility_sum),
        "utility_n": int(example.utility_n),
        "offload_successes": int(example.offload_successes),
        "messages": messages,
        "meta": meta_json,
    }
    return example.id, example.request, metadata


def from_record(tenant: str, id_: str, document: str | None, metadata: dict[str, Any] | None) -> Example:
    """The :class:`Example` a Chroma row holds (the inverse of :func:`to_record`)."""
    meta = dict(metadata or {})
    messages = meta.get("messages")
    extra = meta.get("meta")
    return Example(
        id=id_,
        tenant=tenant,
        request=document or "",
        messages=[Message(**m) for m in json.loads(messages)] if messages else [],
        response=str(meta.get("response", "")),
        model=str(meta.get("model", "")),
        created_at=float(meta.get("created_at", 0.0)),
        last_used=float(meta.get("last_used", 0.0)),
        hits=int(meta.get("hits", 0)),
        prompt_tokens=int(meta.get("prompt_tokens", 0)),
        response_tokens=int(meta.get("response_tokens", 0)),
        quality=meta.get("quality"),
        utility_sum=float(meta.get("utility_sum", 0.0)),
        utility_n=int(meta.get("utility_n", 0)),
        offload_successes=int(meta.get("offload_successes", 0)),
        metadata=json.loads(extra) if extra else {},
    )


def replay_id(tenant: str, request: str) -> str:
    """The queue id of a request: the same (whitespace- and case-normalised) request maps to one entry."""
    normalised = " ".join(request.split()).casefold()
    return hashlib.blake2b(f"{tenant}\x00{normalised}".encode(), digest_size=12).hexdigest()


# --------------------------------------------------------------------------------------------- error mapping


def _map_error(exc: BaseException, what: str, where: str) -> StoreError:
    """Turn a Chroma, httpx or OS error into our error tree: transient ones become StoreUnavailable."""
    import httpx
    from chromadb import errors as chroma_errors

    text = str(exc)
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code in (502, 503, 504):
        return StoreUnavailable(f"{where} answered {exc.response.status_code} during {what}; retry later")
    if isinstance(exc, httpx.TransportError | ConnectionError | TimeoutError):
        return StoreUnavailable(
            f"cannot reach the Chroma server at {where} during {what} ({type(exc).__name__}: {text}); is "
            "`chroma run` up, and are store.host/store.port right?"
        )
    lowered = text.lower()
    if "database is locked" in lowered or "database table is locked" in lowered:
        return StoreUnavailable(f"the store at {where} is locked by another writer during {what}: {text}")
    if "file is not a database" in lowered or "malformed" in lowered or "corrupt" in lowered:
        return StoreError(
            f"the store at {where} is corrupt ({text}): move the folder aside and restore a backup with "
            "`import_jsonl`, or start an empty store"
        )
    if isinstance(exc, chroma_errors.InvalidArgumentError) and "dimension" in lowered:
        return EmbeddingMismatch(
            f"{where}: {text} during {what}: the vectors have another length than the collection's; the embedder "
            "changed. Export the tenant, delete it and import it again to re-embed"
        )
    return StoreError(f"Chroma failed during {what} at {where}: {type(exc).__name__}: {text}")


# --------------------------------------------------------------------------------------------- process lock


class _FolderLock:
    """An exclusive advisory lock on an embedded store's folder, held from open to close.

    ``flock`` locks belong to an open file, so a second store on the same folder conflicts whether it is in
    another process or this one, and the kernel releases the lock when a process dies (even by ``kill -9``).
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, timeout_s: float) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no flock; Chroma's own checks remain
            logger.warning(
                "no fcntl on this platform: the store at %s is not locked against other processes", self.path
            )
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                    os.close(fd)
                    raise StoreUnavailable(
                        f"the store at {self.path.parent} is open in another process or store (pid {holder}): an "
                        "embedded store serves one process; close the other one, or share the store through a "
                        "Chroma server (`chroma run --path ...` and store.host)"
                    ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the file releases the flock
            self._fd = None


# --------------------------------------------------------------------------------------------- tenant writer


@dataclass
class _Op:
    kind: str
    payload: Any
    future: asyncio.Future[Any]


class _Writer:
    """Serialises the writes of one tenant: one batch of queued operations in a worker thread at a time."""

    def __init__(self, apply: Callable[[list[_Op]], list[Any]]) -> None:
        self._apply = apply
        self._pending: list[_Op] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, kind: str, payload: Any) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append(_Op(kind, payload, future))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain())
        return await future

    async def wait_idle(self) -> None:
        task = self._task
        if task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop():
            await asyncio.shield(task)

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                results = await asyncio.to_thread(self._apply, batch)
            except BaseException as exc:
                results = [exc] * len(batch)
                if isinstance(exc, asyncio.CancelledError):
                    for op in batch:
                        if not op.future.done():
                            op.future.cancel()
                    raise
            for op, result in zip(batch, results, strict=True):
                if op.future.done():
                    continue
                if isinstance(result, BaseException):
                    op.future.set_exception(result)
                else:
                    op.future.set_result(result)


# --------------------------------------------------------------------------------------------- the store


class ChromaExampleStore(BaseExampleStore):
    """Past requests with good answers, per tenant, on Chroma; async, durable, safe under concurrency.

    Nothing connects or loads in ``__init__``: the client opens on the first call (or :meth:`open`), and the
    embedder loads on the first text it embeds.

    Setup:
        Embedded (default): nothing; the store lives in ``$ECHO_STORE_PATH`` or the user's data dir.
        Server: ``chroma run --host 127.0.0.1 --port 8000 --path /srv/echo-store``, then ``store.host``.

    Instantiate:
        .. code-block:: python

            from echo_middleware.config import EmbedConfig, StoreConfig
            from echo_middleware.embed import SentenceEmbedder
            from echo_middleware.store import ExampleStore

            store = ExampleStore(StoreConfig(path="./echo-store"), SentenceEmbedder(EmbedConfig()))
            shared = ExampleStore(StoreConfig(host="127.0.0.1", port=8000), SentenceEmbedder(EmbedConfig()))

    Invoke:
        .. code-block:: python

            from echo_middleware.types import Example

            [eid] = await store.add([Example(tenant="acme", request="capital of France?", response="Paris")])
            candidates = await store.query("what is France's capital", tenant="acme", k=4)
            await store.record_use("acme", {eid: 0.9}, success=True)
            await store.close()

    Sync (scripts):
        .. code-block:: python

            import asyncio

            asyncio.run(store.export_jsonl("acme", "acme.jsonl"))

    Args:
        config: The ``store`` section of the settings.
        embedder: Makes every vector; its name and length are recorded in each collection.
    """

    def __init__(self, config: StoreConfig | None = None, embedder: Embedder | None = None) -> None:
        if embedder is None:
            raise ConfigError("ExampleStore needs an embedder: pass create_embedder(settings.embed)")
        if not isinstance(embedder, Embedder):
            raise ConfigError(f"embedder must be an echo_middleware.embed.Embedder, not {type(embedder).__name__}")
        self.config = config if config is not None else StoreConfig()
        self.embedder = embedder
        self._check_prefix(self.config.collection_prefix)
        self._client: Any = None
        self._lock: _FolderLock | None = None
        self._ef: Any = None
        self._open_lock = threading.Lock()
        self._cols: dict[str, Any] = {}
        self._cols_lock = threading.Lock()
        self._writers: dict[str, _Writer] = {}
        self._chroma_max_batch: int | None = None
        self._closed = False

    # ------------------------------------------------------------------ opening

    @property
    def location(self) -> str:
        """Where the store is: the server's URL or the embedded folder."""
        if self.config.host:
            scheme = "https" if self.config.ssl else "http"
            return f"{scheme}://{self.config.host}:{self.config.port}"
        return str(Path(self.config.path).expanduser())

    @staticmethod
    def _check_prefix(prefix: str) -> None:
        if not prefix or not prefix[0].isalnum() or not all(c.isalnum() or c in "_-" for c in prefix):
            raise ConfigError(
                f"store.collection_prefix={prefix!r} must start with a letter or digit and hold only letters, "
                "digits, '_' and '-' (e.g. 'echo_')"
            )

    async def open(self) -> ChromaExampleStore:
        """Connect (server) or open the folder (embedded) now, instead of on the first call."""
        await asyncio.to_thread(self._open_sync)
        return self

    async def start(self) -> None:
        """Same as :meth:`open` (the name the pipeline's components share)."""
        await self.open()

    async def __aenter__(self) -> ChromaExampleStore:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _open_sync(self) -> Any:
        if self._closed:
            raise StoreError("the store is closed: create a new ExampleStore")
        with self._open_lock:
            if self._client is not None:
                return self._client
            from echo_middleware.embed.chroma_function import EchoEmbeddingFunction

            self._ef = EchoEmbeddingFunction(self.embedder)
            self._client = self._connect() if self.config.host else self._open_folder()
            return self._client

    def _settings(self) -> Any:
        from chromadb.config import Settings

        return Settings(anonymized_telemetry=False, allow_reset=False)

    def _open_folder(self) -> Any:
        import chromadb

        folder = Path(self.config.path).expanduser()
        if folder.exists() and not folder.is_dir():
            raise StoreError(f"store.path={str(folder)!r} is a file, not a folder: point it at a folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the store folder {folder}: {exc}") from exc
        lock = _FolderLock(folder)
        lock.acquire(self.config.lock_timeout_s)  # waits lock_timeout_s itself; not retried
        try:
            client = self._call("open", lambda: chromadb.PersistentClient(path=str(folder), settings=self._settings()))
        except BaseException:
            lock.release()
            raise
        self._lock = lock
        logger.info("opened the embedded example store at %s", folder)
        return client

    def _connect(self) -> Any:
        import chromadb
        import httpx

        url = self.location

        # Chroma's HttpClient talks to the server inside its constructor, without a timeout: check first.
        def heartbeat() -> None:
            try:
                httpx.get(f"{url}/api/v2/heartbeat", timeout=self.config.timeout_s).raise_for_status()
            except Exception as exc:
                raise _map_error(exc, "heartbeat", url) from exc

        self._retrying(heartbeat)
        client = self._call(
            "connect",
            lambda: chromadb.HttpClient(
                host=str(self.config.host), port=self.config.port, ssl=self.config.ssl, settings=self._settings()
            ),
        )
        session = getattr(getattr(client, "_server", None), "_session", None)
        if isinstance(session, httpx.Client):
            session.timeout = httpx.Timeout(self.config.timeout_s)
        else:  # pragma: no cover - depends on chromadb internals
            logger.warning("could not set a timeout on Chroma's HTTP session; calls to %s may hang", url)
        logger.info("connected to the Chroma server at %s", url)
        return client

    # ------------------------------------------------------------------ calling Chroma

    def _retrying(self, fn: Callable[[], T]) -> T:
        from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

        for attempt in Retrying(
            retry=retry_if_exception_type(StoreUnavailable),
            stop=stop_after_attempt(self.config.max_retries + 1),
            wait=wait_exponential(multiplier=0.2, max=5.0),
            reraise=True,
        ):
            with attempt:
                return fn()
        raise AssertionError("unreachable")  # pragma: no cover

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """One Chroma call, its errors mapped, transient ones retried (every call made here is idempotent)."""

        def once() -> T:
            try:
                return fn()
            except Exception as exc:
                from chromadb.errors import NotFoundError

                if isinstance(exc, NotFoundError):
                    raise
                raise _map_error(exc, what, self.location) from exc

        return self._retrying(once)

    def _name(self, tenant: str) -> str:
        return f"{self.config.collection_prefix}{tenant}"

    def _collection(self, tenant: str, *, create: bool, check: bool = True) -> Any:
        """The tenant's collection (cached), created when ``create``; None when missing and not ``create``."""
        from chromadb.errors import NotFoundError

        with self._cols_lock:
            col = self._cols.get(tenant)
        if col is not None:
            return col
        client = self._open_sync()
        name = self._name(tenant)
        try:
            col = self._call(f"open {name}", lambda: client.get_collection(name, embedding_function=self._ef))
        except NotFoundError:
            if not create:
                return None
            col = self._call(
                f"create {name}",
                lambda: client.get_or_create_collection(
                    name,
                    configuration={
                        "hnsw": {
                            "space": "cosine",
                            "ef_search": self.config.hnsw_ef_search,
                            "ef_construction": self.config.hnsw_ef_construction,
                            "max_neighbors": self.config.hnsw_m,
                        }
                    },
                    metadata={
                        "echo_schema": SCHEMA_VERSION,
                        "echo_embedder": self.embedder.name,
                        "echo_dim": self.embedder.dim,
                        "echo_tenant": tenant,
                    },
                    embedding_function=self._ef,
                ),
            )
            logger.info("created collection %s for tenant %s", name, tenant)
        except ValueError as exc:  # Chroma: the collection was made with another embedding function
            raise StoreError(
                f"collection {name} at {self.location} was not created by echo-middleware ({exc}); choose another "
                "store.collection_prefix or tenant"
            ) from exc
        if check:
            self._check_compatible(tenant, col)
            self._tune(col)
            with self._cols_lock:
                self._cols[tenant] = col
        return col

    def _check_compatible(self, tenant: str, col: Any) -> None:
        meta = col.metadata or {}
        if "echo_schema" not in meta:
            raise StoreError(
                f"collection {col.name} at {self.location} was not created by echo-middleware (its metadata has no "
                "echo_schema); choose another store.collection_prefix or tenant"
            )
        stored_name, stored_dim = meta.get("echo_embedder"), meta.get("echo_dim")
        if stored_dim != self.embedder.dim or stored_name != self.embedder.name:
            raise EmbeddingMismatch(
                f"tenant {tenant!r} was built with embedder {stored_name!r} (dimension {stored_dim}), but the "
                f"embedder now is {self.embedder.name!r} (dimension {self.embedder.dim}); vectors of two models "
                "cannot be compared. Set embed.model back, or move the tenant to the new embedder: export_jsonl, "
                "delete_tenant, import_jsonl (it re-embeds)"
            )

    def _tune(self, col: Any) -> None:
        hnsw = (col.configuration_json or {}).get("hnsw") or {}
        if hnsw and hnsw.get("ef_search") != self.config.hnsw_ef_search:
            self._call(
                f"tune {col.name}",
                lambda: col.modify(configuration={"hnsw": {"ef_search": self.config.hnsw_ef_search}}),
            )

    def _forget(self, tenant: str) -> None:
        with self._cols_lock:
            self._cols.pop(tenant, None)

    def _with_collection(self, tenant: str, create: bool, fn: Callable[[Any], T], empty: T) -> T:
        """Run ``fn(collection)``; when the collection vanished (deleted by another worker), look it up again once."""
        from chromadb.errors import NotFoundError

        for attempt in range(2):
            col = self._collection(tenant, create=create)
            if col is None:
                return empty
            try:
                return fn(col)
            except NotFoundError:
                self._forget(tenant)
                if attempt:
                    raise
        return empty  # pragma: no cover

    def _writer(self, tenant: str) -> _Writer:
        writer = self._writers.get(tenant)
        if writer is None:
            writer = self._writers[tenant] = _Writer(lambda ops, tenant=tenant: self._apply(tenant, ops))
        return writer

    def _ensure_usable(self) -> None:
        if self._closed:
            raise StoreError("the store is closed: create a new ExampleStore")

    # ------------------------------------------------------------------ validation

    def _validate_example(self, example: object, field: str) -> Example:
        if not isinstance(example, Example):
            raise ConfigError(f"{field} must be an Example, not {type(example).__name__}")
        validate_tenant(example.tenant)
        if not isinstance(example.id, str) or not example.id.strip() or len(example.id) > 256:
            raise ConfigError(f"{field}.id={example.id!r} must be a non-blank string of at most 256 characters")
        validate_text(example.request, f"{field}.request", self.config.max_text_chars)
        validate_text(example.response, f"{field}.response", self.config.max_text_chars)
        if example.quality is not None:
            validate_utility(example.quality, f"{field}.quality")
        for name in ("hits", "utility_n", "offload_successes", "prompt_tokens", "response_tokens"):
            if getattr(example, name) < 0:
                raise ConfigError(f"{field}.{name}={getattr(example, name)} must be >= 0")
        for name in ("created_at", "last_used", "utility_sum"):
            if not math.isfinite(getattr(example, name)):
                raise ConfigError(f"{field}.{name} must be a finite number")
        return example

    def _check_vectors(self, vectors: np.ndarray, count: int) -> np.ndarray:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim == 1:
            vectors = vectors[None, :]
        if vectors.shape != (count, self.embedder.dim):
            raise EmbeddingMismatch(
                f"got vectors of shape {vectors.shape}, expected ({count}, {self.embedder.dim}) from embedder "
                f"{self.embedder.name!r}"
            )
        return vectors

    # ------------------------------------------------------------------ writes

    async def add(self, examples: Sequence[Example], *, dedupe: bool | None = None) -> list[str]:
        """Store examples, each in its own ``tenant``; durable when this returns.

        A request within ``store.dedupe_distance`` of a stored one (or of another in the same call) merges into it:
        the better answer is kept, under the stored id, with the usage statistics summed. The returned list says
        which id each input ended up under. An example whose id exists already replaces it.

        Args:
            examples: The examples; validated before anything is written (all or nothing per call).
            dedupe: Override ``store.dedupe`` for this call.

        Raises:
            ConfigError: bad tenant name, empty or oversized text, quality outside [0, 1].
            EmbeddingMismatch: the tenant was built with another embedder.
            StoreUnavailable: the server cannot be reached (after retries).
        """
        self._ensure_usable()
        if isinstance(examples, Example):
            raise ConfigError("add() takes a list of examples: wrap the one example in a list")
        items = [self._validate_example(e, f"examples[{i}]") for i, e in enumerate(examples)]
        if not items:
            return []
        vectors = self._check_vectors(await self.embedder.aembed([e.request for e in items]), len(items))
        await asyncio.to_thread(self._open_sync)
        use_dedupe = self.config.dedupe if dedupe is None else dedupe
        by_tenant: dict[str, list[int]] = {}
        for i, example in enumerate(items):
            by_tenant.setdefault(example.tenant, []).append(i)
        results = await asyncio.gather(
            *(
                self._writer(tenant).submit("add", ([items[i] for i in idx], vectors[idx], use_dedupe))
                for tenant, idx in by_tenant.items()
            )
        )
        ids: list[str] = [""] * len(items)
        for idx, stored in zip(by_tenant.values(), results, strict=True):
            for i, sid in zip(idx, stored, strict=True):
                ids[i] = sid
        return ids

    async def record_use(self, tenant: str, id_utilities: dict[str, float | None], success: bool | None = None) -> int:
        """Count one use of each example: hits + 1, last_used = now, the utility (if given) and the outcome.

        Atomic per store: concurrent calls are merged into one read-modify-write, never losing an increment.

        Args:
            tenant: The tenant the examples belong to.
            id_utilities: Example id -> the utility the ranker gave it for this request (None: not scored).
            success: Whether the offloaded answer that used them was judged good (True adds an offload success).

        Returns:
            How many of the ids exist (missing ones, e.g. evicted meanwhile, are skipped).
        """
        self._ensure_usable()
        validate_tenant(tenant)
        if not isinstance(id_utilities, dict):
            raise ConfigError("id_utilities must be a dict of example id -> utility (or None)")
        clean = {str(k): validate_utility(v, f"id_utilities[{k!r}]") for k, v in id_utilities.items()}
        if success is not None and not isinstance(success, bool):
            raise ConfigError(f"success={success!r} must be True, False or None")
        if not clean:
            return 0
        await asyncio.to_thread(self._open_sync)
        return int(await self._writer(tenant).submit("use", (clean, success, time.time())))

    async def update(self, example: Example) -> None:
        """Replace a stored example (same tenant and id), re-embedding its request.

        Raises:
            StoreError: no example with this id in this tenant.
        """
        self._ensure_usable()
        self._validate_example(example, "example")
        vector = self._check_vectors(await self.embedder.aembed([example.request]), 1)
        await asyncio.to_thread(self._open_sync)
        await self._writer(example.tenant).submit("update", (example, vector))

    async def delete(self, tenant: str, ids: Sequence[str]) -> int:
        """Delete examples by id; returns how many of them existed."""
        self._ensure_usable()
        validate_tenant(tenant)
        if isinstance(ids, str):
            raise ConfigError("ids must be a list of ids, not one string: wrap it in a list")
        wanted = list(dict.fromkeys(str(i) for i in ids))
        if not wanted:
            return 0
        await asyncio.to_thread(self._open_sync)
        return int(await self._writer(tenant).submit("delete", wanted))

    async def delete_tenant(self, tenant: str) -> int:
        """Delete a tenant's collection and every example in it (works across an embedder change)."""
        self._ensure_usable()
        validate_tenant(tenant)
        await asyncio.to_thread(self._open_sync)
        return int(await self._writer(tenant).submit("drop", None))

    async def evict(self, tenant: str) -> int:
        """Remove expired examples (TTL), then the least valuable ones beyond capacity; returns how many went.

        Over capacity, the tenant is cut to ``evict_low_water`` x capacity so that eviction runs rarely. Adds call
        this on their own when a tenant grows past its capacity.
        """
        self._ensure_usable()
        validate_tenant(tenant)
        await asyncio.to_thread(self._open_sync)
        return int(await self._writer(tenant).submit("evict", time.time()))

    # ------------------------------------------------------------------ writer side (worker thread)

    def _apply(self, tenant: str, ops: list[_Op]) -> list[Any]:
        """Run a batch of queued writes in order; consecutive adds (same dedupe) and usage records are merged."""
        results: list[Any] = [None] * len(ops)
        i = 0
        while i < len(ops):
            kind = ops[i].kind
            j = i + 1
            if kind in ("add", "use"):
                while (
                    j < len(ops) and ops[j].kind == kind and (kind != "add" or ops[j].payload[2] == ops[i].payload[2])
                ):
                    j += 1
            group = ops[i:j]
            try:
                if kind == "add":
                    out: list[Any] = self._write_adds(tenant, [op.payload for op in group])
                elif kind == "use":
                    out = self._write_uses(tenant, [op.payload for op in group])
                else:
                    handler = {
                        "update": self._write_update,
                        "delete": self._write_delete,
                        "drop": self._write_drop,
                        "evict": self._write_evict,
                        "export": self._read_all,
                        "push_replay": self._write_push_replay,
                        "pop_replay": self._write_pop_replay,
                    }[kind]
                    out = [handler(tenant, group[0].payload)]
            except Exception as exc:
                error = exc if isinstance(exc, EchoError) else _map_error(exc, kind, self.location)
                out = [error] * len(group)
            results[i:j] = out
            i = j
        return results

    def _write_adds(self, tenant: str, payloads: list[tuple[list[Example], np.ndarray, bool]]) -> list[list[str]]:
        examples = [e for p in payloads for e in p[0]]
        vectors = np.concatenate([p[1] for p in payloads])
        dedupe = payloads[0][2] and self.config.dedupe_distance > 0
        stored: list[str] = []
        step = min(self.config.max_batch, self._max_batch())
        for start in range(0, len(examples), step):
            chunk, chunk_vectors = examples[start : start + step], vectors[start : start + step]
            stored += self._with_collection(
                tenant, True, lambda col, c=chunk, v=chunk_vectors: self._add_chunk(col, c, v, dedupe), []
            )
        self._maybe_evict(tenant)
        out, at = [], 0
        for p in payloads:
            out.append(stored[at : at + len(p[0])])
            at += len(p[0])
        return out

    def _max_batch(self) -> int:
        """The most rows Chroma takes in one call (asked once; a server may allow fewer than embedded)."""
        if self._chroma_max_batch is None:
            try:
                self._chroma_max_batch = int(self._open_sync().get_max_batch_size())
            except Exception:  # older servers: the configured size
                self._chroma_max_batch = self.config.max_batch
        return self._chroma_max_batch

    def _add_chunk(self, col: Any, examples: list[Example], vectors: np.ndarray, dedupe: bool) -> list[str]:
        """Upsert one chunk; with dedupe, fold near-identical requests (in the chunk and in the store) together."""
        n = len(examples)
        root = list(range(n))
        superseded: set[int] = set()
        # The same id twice in one chunk: the later one replaces the earlier one.
        last_of_id: dict[str, int] = {}
        for i, example in enumerate(examples):
            if example.id in last_of_id:
                root[last_of_id[example.id]] = i
                superseded.add(last_of_id[example.id])
            last_of_id[example.id] = i
        distance = self.config.dedupe_distance
        if dedupe and n > 1:
            sims = vectors @ vectors.T
            pairs = np.argwhere(np.triu(sims, k=1) >= 1.0 - distance)
            for j, i in sorted(pairs.tolist(), key=lambda p: (p[1], p[0])):
                if root[i] == i and root[j] == j and self._same_request(examples[j].request, examples[i].request):
                    root[i] = j
        for i in range(n):  # follow chains to their final root
            r = i
            while root[r] != r:
                r = root[r]
            root[i] = r
        merged: dict[int, Example] = {}
        for i in range(n):
            r = root[i]
            if i == r:
                merged.setdefault(r, examples[r])
            elif i not in superseded:
                merged[r] = merge_examples(merged.get(r, examples[r]), examples[i], keep_id=examples[r].id)
        records: dict[str, tuple[Example, np.ndarray]] = {}
        final_id: dict[int, str] = {}
        roots = list(merged)
        stored = int(self._call(f"count {col.name}", col.count)) if dedupe and roots else 0
        if stored:
            # Distances only for every new request; the few rows near enough are then read in full.
            found = self._call(
                f"dedupe lookup in {col.name}",
                lambda: col.query(query_embeddings=vectors[roots], n_results=min(3, stored), include=["distances"]),
            )
            near: dict[int, list[tuple[str, float]]] = {}
            for pos, r in enumerate(roots):
                for eid, dist in zip(found["ids"][pos], found["distances"][pos], strict=True):
                    if eid == merged[r].id or dist > distance:
                        break  # the example itself (an overwrite), or nothing near enough
                    near.setdefault(r, []).append((eid, float(dist)))
            rows: dict[str, tuple[Example, np.ndarray]] = {}
            wanted = sorted({eid for pairs in near.values() for eid, _ in pairs})
            if wanted:
                got = self._call(
                    f"dedupe read in {col.name}",
                    lambda: col.get(ids=wanted, include=["documents", "metadatas", "embeddings"]),
                )
                for k, eid in enumerate(got["ids"]):
                    rows[eid] = (
                        from_record(examples[0].tenant, eid, got["documents"][k], got["metadatas"][k]),
                        np.asarray(got["embeddings"][k], dtype=np.float32),
                    )
            for r in roots:
                new = merged[r]
                match = next(
                    (
                        (eid, d)
                        for eid, d in near.get(r, [])
                        if eid in rows and self._same_request(rows[eid][0].request, new.request)
                    ),
                    None,
                )
                if match is None:
                    records[new.id] = (new, vectors[r])
                    final_id[r] = new.id
                    continue
                existing_id = match[0]
                existing, existing_vector = records.get(existing_id) or rows[existing_id]
                combined = merge_examples(existing, new, keep_id=existing_id)
                vector = existing_vector if combined.request == existing.request else vectors[r]
                records[existing_id] = (combined, vector)
                final_id[r] = existing_id
                logger.debug("dedupe: %s merged into %s (distance %.4f)", new.id, existing_id, match[1])
        else:
            for r in roots:
                records[merged[r].id] = (merged[r], vectors[r])
                final_id[r] = merged[r].id
        if records:
            ids, documents, metadatas = [], [], []
            for example, _ in records.values():
                rid, doc, meta = to_record(example)
                ids.append(rid)
                documents.append(doc)
                metadatas.append(meta)
            embeddings = np.stack([v for _, v in records.values()])
            self._call(
                f"upsert into {col.name}",
                lambda: col.upsert(ids=ids, embeddings=embeddings, documents=documents, metadatas=metadatas),
            )
        return [final_id[root[i]] for i in range(n)]

    def _same_request(self, a: str, b: str) -> bool:
        """The wording check of dedupe (see :func:`~echo_middleware.store.base.same_wording`)."""
        return not self.config.dedupe_guard or same_wording(a, b)

    def _write_uses(self, tenant: str, payloads: list[tuple[dict[str, float | None], bool | None, float]]) -> list[int]:
        delta: dict[str, dict[str, float]] = {}
        for utilities, success, now in payloads:
            for eid, utility in utilities.items():
                d = delta.setdefault(eid, {"hits": 0, "utility_sum": 0.0, "utility_n": 0, "ok": 0, "last_used": 0.0})
                d["hits"] += 1
                d["last_used"] = max(d["last_used"], now)
                if utility is not None:
                    d["utility_sum"] += utility
                    d["utility_n"] += 1
                if success:
                    d["ok"] += 1

        def apply(col: Any) -> set[str]:
            existing: set[str] = set()
            ids = list(delta)
            for start in range(0, len(ids), PAGE):
                page = ids[start : start + PAGE]
                got = self._call(f"read counters in {col.name}", lambda p=page: col.get(ids=p, include=["metadatas"]))
                upd_ids, upd_meta = [], []
                for eid, meta in zip(got["ids"], got["metadatas"], strict=True):
                    d, meta = delta[eid], meta or {}
                    existing.add(eid)
                    upd_ids.append(eid)
                    upd_meta.append(
                        {
                            "hits": int(meta.get("hits", 0)) + int(d["hits"]),
                            "last_used": max(float(meta.get("last_used", 0.0)), d["last_used"]),
                            "utility_sum": float(meta.get("utility_sum", 0.0)) + d["utility_sum"],
                            "utility_n": int(meta.get("utility_n", 0)) + int(d["utility_n"]),
                            "offload_successes": int(meta.get("offload_successes", 0)) + int(d["ok"]),
                        }
                    )
                if upd_ids:
                    self._call(
                        f"update counters in {col.name}", lambda i=upd_ids, m=upd_meta: col.update(ids=i, metadatas=m)
                    )
            return existing

        existing = self._with_collection(tenant, False, apply, set())
        return [sum(1 for eid in utilities if eid in existing) for utilities, _, _ in payloads]

    def _write_update(self, tenant: str, payload: tuple[Example, np.ndarray]) -> None:
        example, vector = payload

        def apply(col: Any) -> None:
            got = self._call(f"read {col.name}", lambda: col.get(ids=[example.id], include=[]))
            if not got["ids"]:
                raise StoreError(f"no example {example.id!r} in tenant {tenant!r} to update: add it instead")
            rid, doc, meta = to_record(example)
            self._call(
                f"update {col.name}",
                lambda: col.upsert(ids=[rid], embeddings=vector, documents=[doc], metadatas=[meta]),
            )

        missing = object()
        if self._with_collection(tenant, False, apply, missing) is missing:
            raise StoreError(f"tenant {tenant!r} has no examples: nothing to update")

    def _write_delete(self, tenant: str, ids: list[str]) -> int:
        def apply(col: Any) -> int:
            gone = 0
            for start in range(0, len(ids), PAGE):
                page = ids[start : start + PAGE]
                present = self._call(f"read {col.name}", lambda p=page: col.get(ids=p, include=[]))["ids"]
                if present:
                    self._call(f"remove ids in {col.name}", lambda p=present: col.delete(ids=p))
                    gone += len(present)
            return gone

        return self._with_collection(tenant, False, apply, 0)

    def _write_drop(self, tenant: str, _: None) -> int:
        from chromadb.errors import NotFoundError

        client = self._open_sync()
        name = self._name(tenant)
        self._forget(tenant)
        try:
            col = self._call(f"open {name}", lambda: client.get_collection(name, embedding_function=self._ef))
        except NotFoundError:
            return 0
        count = int(self._call(f"count {name}", col.count))
        try:
            self._call(f"delete {name}", lambda: client.delete_collection(name))
        except NotFoundError:
            return 0
        logger.info("deleted tenant %s (%d examples)", tenant, count)
        return count

    def _scan(self, col: Any, include: list[str]) -> Iterator[dict[str, Any]]:
        """Every row of a collection, a page at a time."""
        offset = 0
        while True:
            page = self._call(f"scan {col.name}", lambda o=offset: col.get(include=include, limit=PAGE, offset=o))
            if not page["ids"]:
                return
            yield page
            if len(page["ids"]) < PAGE:
                return
            offset += len(page["ids"])

    def _usage_arrays(self, col: Any) -> dict[str, np.ndarray]:
        ids: list[str] = []
        cols: dict[str, list[float]] = {k: [] for k in ("created_at", "last_used", "hits", "utility_sum", "utility_n")}
        for page in self._scan(col, ["metadatas"]):
            ids += page["ids"]
            for meta in page["metadatas"]:
                meta = meta or {}
                for key, values in cols.items():
                    values.append(float(meta.get(key, 0.0)))
        arrays = {k: np.asarray(v, dtype=np.float64) for k, v in cols.items()}
        arrays["ids"] = np.asarray(ids, dtype=object)
        return arrays

    def _write_evict(self, tenant: str, now: float) -> int:
        return self._with_collection(tenant, False, lambda col: self._evict(col, now), 0)

    def _maybe_evict(self, tenant: str) -> None:
        col = self._collection(tenant, create=False)
        if col is not None and int(self._call(f"count {col.name}", col.count)) > self.config.capacity_per_tenant:
            self._evict(col, time.time())

    def _evict(self, col: Any, now: float) -> int:
        """Drop expired rows; if more than capacity remain, drop the least valuable down to the low-water mark."""
        a = self._usage_arrays(col)
        ids = a["ids"]
        if not len(ids):
            return 0
        drop = np.zeros(len(ids), dtype=bool)
        if self.config.ttl_s is not None:
            drop |= now - a["created_at"] > self.config.ttl_s
        keep_n = int((~drop).sum())
        capacity = self.config.capacity_per_tenant
        if keep_n > capacity:
            target = max(1, math.floor(capacity * self.config.evict_low_water))
            values = example_values(
                a["created_at"],
                a["last_used"],
                a["hits"],
                a["utility_sum"],
                a["utility_n"],
                now,
                self.config.recency_half_life_s,
            )
            values[drop] = np.inf  # already going
            order = np.argsort(values, kind="stable")
            drop[order[: keep_n - target]] = True
        victims = [str(i) for i in ids[drop]]
        for start in range(0, len(victims), PAGE):
            page = victims[start : start + PAGE]
            self._call(f"evict in {col.name}", lambda p=page: col.delete(ids=p))
        if victims:
            logger.info("evicted %d examples from %s (%d left)", len(victims), col.name, len(ids) - len(victims))
        return len(victims)

    def _read_all(self, tenant: str, with_embeddings: bool) -> list[tuple[Example, list[float] | None]]:
        def read(col: Any) -> list[tuple[Example, list[float] | None]]:
            include = ["documents", "metadatas"] + (["embeddings"] if with_embeddings else [])
            rows: list[tuple[Example, list[float] | None]] = []
            for page in self._scan(col, include):
                embeddings = page.get("embeddings") if with_embeddings else None
                for k, (eid, doc, meta) in enumerate(
                    zip(page["ids"], page["documents"], page["metadatas"], strict=True)
                ):
                    vector = None if embeddings is None else [float(x) for x in embeddings[k]]
                    rows.append((from_record(tenant, eid, doc, meta), vector))
            return rows

        from chromadb.errors import NotFoundError

        name = self._name(tenant)
        client = self._open_sync()
        try:  # no compatibility check: exporting is how a tenant moves to a new embedder
            col = self._call(f"open {name}", lambda: client.get_collection(name, embedding_function=self._ef))
        except NotFoundError:
            return []
        return read(col)

    # ------------------------------------------------------------------ reads

    async def query(self, text: str, tenant: str, k: int, *, embedding: Any = None) -> list[Candidate]:
        """The ``k`` stored requests nearest to ``text`` (cosine distance, ascending), expired ones left out.

        Args:
            text: The new request.
            tenant: Whose examples to search; a tenant never written returns [].
            k: How many candidates (1-10000).
            embedding: The vector of ``text`` when the caller has it already (skips the embedder).
        """
        self._ensure_usable()
        validate_tenant(tenant)
        validate_text(text, "text", self.config.max_text_chars)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise ConfigError(f"k={k!r} must be an integer in [1, {MAX_K}]")
        if embedding is None:
            embedding = await self.embedder.aembed([text])
        vector = self._check_vectors(embedding, 1)
        return await asyncio.to_thread(self._query_sync, tenant, vector, k)

    def _query_sync(self, tenant: str, vector: np.ndarray, k: int) -> list[Candidate]:
        ttl = self.config.ttl_s
        fetch = k if ttl is None else min(MAX_K, 2 * k)

        def run(col: Any) -> list[Candidate]:
            found = self._call(
                f"query {col.name}",
                lambda: col.query(
                    query_embeddings=vector, n_results=fetch, include=["documents", "metadatas", "distances"]
                ),
            )
            now = time.time()
            out = []
            for eid, doc, meta, dist in zip(
                found["ids"][0], found["documents"][0], found["metadatas"][0], found["distances"][0], strict=True
            ):
                example = from_record(tenant, eid, doc, meta)
                if is_expired(example, now, ttl):
                    continue
                out.append(Candidate(example=example, distance=min(2.0, max(0.0, float(dist)))))
            out.sort(key=lambda c: c.distance)
            return out[:k]

        return self._with_collection(tenant, False, run, [])

    async def get(self, tenant: str, ids: Sequence[str]) -> list[Example]:
        """The examples with these ids, in the order asked; ids that do not exist are skipped."""
        self._ensure_usable()
        validate_tenant(tenant)
        if isinstance(ids, str):
            raise ConfigError("ids must be a list of ids, not one string: wrap it in a list")
        wanted = [str(i) for i in ids]
        if not wanted:
            return []

        def read(col: Any) -> list[Example]:
            found: dict[str, Example] = {}
            unique = list(dict.fromkeys(wanted))
            for start in range(0, len(unique), PAGE):
                page = unique[start : start + PAGE]
                got = self._call(
                    f"get from {col.name}", lambda p=page: col.get(ids=p, include=["documents", "metadatas"])
                )
                for eid, doc, meta in zip(got["ids"], got["documents"], got["metadatas"], strict=True):
                    found[eid] = from_record(tenant, eid, doc, meta)
            return [found[i] for i in wanted if i in found]

        return await asyncio.to_thread(self._with_collection, tenant, False, read, [])

    async def tenants(self) -> list[str]:
        """Every tenant that has a collection in this store (sorted)."""
        self._ensure_usable()

        def names() -> list[str]:
            client = self._open_sync()
            prefix = self.config.collection_prefix
            cols = self._call("list collections", client.list_collections)
            out = []
            for col in cols:
                name = col if isinstance(col, str) else col.name
                tenant = name[len(prefix) :] if name.startswith(prefix) else None
                if tenant and tenant != REPLAY and not tenant.startswith("_"):
                    out.append(tenant)
            return sorted(out)

        return await asyncio.to_thread(names)

    async def count(self, tenant: str) -> int:
        """How many examples the tenant holds (0 for a tenant never written)."""
        self._ensure_usable()
        validate_tenant(tenant)
        return await asyncio.to_thread(
            self._with_collection, tenant, False, lambda col: int(self._call(f"count {col.name}", col.count)), 0
        )

    async def stats(self, tenant: str) -> StoreStats:
        """Counts and usage of a tenant (scans its metadata: seconds at 100k examples)."""
        self._ensure_usable()
        validate_tenant(tenant)

        def compute(col: Any) -> StoreStats:
            now = time.time()
            a = self._usage_arrays(col)
            count = len(a["ids"])
            meta = col.metadata or {}
            hnsw = dict((col.configuration_json or {}).get("hnsw") or {})
            base = StoreStats(
                tenant=tenant,
                count=count,
                capacity=self.config.capacity_per_tenant,
                embedder=str(meta.get("echo_embedder", "")),
                dim=meta.get("echo_dim"),
                hnsw=hnsw,
                location=self.location,
            )
            if not count:
                return base
            oks = 0
            for page in self._scan(col, ["metadatas"]):
                oks += sum(int((m or {}).get("offload_successes", 0)) for m in page["metadatas"])
            n_util = float(a["utility_n"].sum())
            return base.model_copy(
                update={
                    "expired": int((now - a["created_at"] > self.config.ttl_s).sum()) if self.config.ttl_s else 0,
                    "never_used": int((a["hits"] == 0).sum()),
                    "total_hits": int(a["hits"].sum()),
                    "mean_utility": float(a["utility_sum"].sum() / n_util) if n_util else None,
                    "offload_successes": oks,
                    "oldest_created_at": float(a["created_at"].min()),
                    "newest_created_at": float(a["created_at"].max()),
                }
            )

        empty = StoreStats(tenant=tenant, count=0, capacity=self.config.capacity_per_tenant, location=self.location)
        return await asyncio.to_thread(self._with_collection, tenant, False, compute, empty)

    # ------------------------------------------------------------------ backup and seeding

    async def export_jsonl(self, tenant: str, path: str | os.PathLike[str], *, include_embeddings: bool = False) -> int:
        """Write every example of ``tenant`` to ``path``, one JSON object per line; returns how many.

        The file appears whole or not at all (written beside it, fsynced, then renamed). The export waits for
        pending writes to the tenant and holds new ones back while it reads, so it is a consistent snapshot of
        what this process wrote. Works even when the tenant was built with another embedder (that is how a tenant
        moves to a new one).

        Args:
            tenant: The tenant.
            path: The JSONL file to write.
            include_embeddings: Also write each vector (with the embedder's name), so an import with the same
                embedder skips embedding. Makes the file about ten times larger.
        """
        self._ensure_usable()
        validate_tenant(tenant)
        await asyncio.to_thread(self._open_sync)
        rows = await self._writer(tenant).submit("export", include_embeddings)

        def write() -> int:
            target = Path(path).expanduser()
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            try:
                with tmp.open("w", encoding="utf-8") as handle:
                    for example, vector in rows:
                        record = example.model_dump(mode="json")
                        if vector is not None:
                            record["embedding"] = vector
                            record["embedder"] = self.embedder.name
                        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())
                tmp.replace(target)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            return len(rows)

        return await asyncio.to_thread(write)

    async def import_jsonl(
        self, path: str | os.PathLike[str], tenant: str | None = None, *, dedupe: bool = False
    ) -> int:
        """Add every example of a JSONL file (an export, or seeds you wrote); returns how many lines were read.

        The whole file is validated before anything is written, so a bad line (named by its number) leaves the
        store as it was. Ids, answers and usage statistics are kept; an id that exists is replaced. Vectors in the
        file are used when they come from the same embedder, otherwise requests are embedded again.

        Args:
            path: The JSONL file.
            tenant: Put every example in this tenant; None keeps each line's own ``tenant``.
            dedupe: Merge near-identical requests as :meth:`add` does (off: restore exactly).
        """
        self._ensure_usable()
        if tenant is not None:
            validate_tenant(tenant)

        def parse() -> tuple[list[Example], list[list[float] | None]]:
            source = Path(path).expanduser()
            if not source.is_file():
                raise ConfigError(f"import file {source} does not exist")
            examples: list[Example] = []
            vectors: list[list[float] | None] = []
            with source.open(encoding="utf-8") as handle:
                for number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                        if not isinstance(record, dict):
                            raise TypeError("a line must be a JSON object")
                        vector = record.pop("embedding", None)
                        embedder = record.pop("embedder", None)
                        if tenant is not None:
                            record["tenant"] = tenant
                        example = self._validate_example(Example.model_validate(record), f"line {number}")
                    except ConfigError as exc:
                        raise ConfigError(f"{source}: {exc}") from exc
                    except Exception as exc:
                        raise ConfigError(f"{source} line {number} is not a valid example: {exc}") from exc
                    usable = (
                        vector is not None
                        and embedder == self.embedder.name
                        and isinstance(vector, list)
                        and len(vector) == self.embedder.dim
                    )
                    examples.append(example)
                    vectors.append(vector if usable else None)
            return examples, vectors

        examples, file_vectors = await asyncio.to_thread(parse)
        if not examples:
            return 0
        await asyncio.to_thread(self._open_sync)
        missing = [i for i, v in enumerate(file_vectors) if v is None]
        vectors = np.zeros((len(examples), self.embedder.dim), dtype=np.float32)
        for i, v in enumerate(file_vectors):
            if v is not None:
                vectors[i] = v
        step = max(1, self.config.max_batch)
        for start in range(0, len(missing), step):
            idx = missing[start : start + step]
            vectors[idx] = self._check_vectors(await self.embedder.aembed([examples[i].request for i in idx]), len(idx))
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
        by_tenant: dict[str, list[int]] = {}
        for i, example in enumerate(examples):
            by_tenant.setdefault(example.tenant, []).append(i)
        for name, idx in by_tenant.items():
            for start in range(0, len(idx), step):
                part = idx[start : start + step]
                await self._writer(name).submit("add", ([examples[i] for i in part], vectors[part], dedupe))
        return len(examples)

    # ------------------------------------------------------------------ replay queue

    async def push_replay(
        self, tenant: str, request_text: str, messages: Sequence[Message] | None, value: float
    ) -> str:
        """Queue a request to re-answer with the large model when it is idle; returns its queue id.

        The same request (normalised) queued again keeps one entry with the higher value. Beyond
        ``store.replay_capacity`` entries the least valuable are dropped.
        """
        self._ensure_usable()
        validate_tenant(tenant)
        validate_text(request_text, "request_text", self.config.max_text_chars)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"value={value!r} must be a finite number (higher is replayed first)")
        msgs = [m if isinstance(m, Message) else Message.model_validate(m) for m in (messages or [])]
        vector = self._check_vectors(await self.embedder.aembed([request_text]), 1)
        item = ReplayItem(
            id=replay_id(tenant, request_text), tenant=tenant, request=request_text, messages=msgs, value=float(value)
        )
        await asyncio.to_thread(self._open_sync)
        await self._writer(REPLAY).submit("push_replay", (item, vector))
        return item.id

    async def pop_replay(self, n: int) -> list[ReplayItem]:
        """Take up to ``n`` queued requests off the queue, most valuable first (across tenants)."""
        self._ensure_usable()
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"n={n!r} must be a positive integer")
        await asyncio.to_thread(self._open_sync)
        return list(await self._writer(REPLAY).submit("pop_replay", n))

    def _replay_collection(self, create: bool) -> Any:
        return self._collection(REPLAY, create=create)

    def _write_push_replay(self, _: str, payload: tuple[ReplayItem, np.ndarray]) -> None:
        item, vector = payload

        def apply(col: Any) -> None:
            got = self._call("read replay", lambda: col.get(ids=[item.id], include=["metadatas"]))
            value = item.value
            if got["ids"]:
                value = max(value, float((got["metadatas"][0] or {}).get("value", value)))
            meta = {
                "tenant": item.tenant,
                "value": value,
                "pushed_at": item.pushed_at,
                "messages": json.dumps([m.model_dump() for m in item.messages], ensure_ascii=False)
                if item.messages
                else None,
            }
            self._call(
                "push replay",
                lambda: col.upsert(ids=[item.id], embeddings=vector, documents=[item.request], metadatas=[meta]),
            )
            if int(self._call("count replay", col.count)) > self.config.replay_capacity:
                rows = [
                    (float((m or {}).get("value", 0.0)), i)
                    for p in self._scan(col, ["metadatas"])
                    for i, m in zip(p["ids"], p["metadatas"], strict=True)
                ]
                rows.sort()
                drop = [i for _, i in rows[: len(rows) - self.config.replay_capacity]]
                if drop:
                    self._call("trim replay", lambda: col.delete(ids=drop))

        self._with_collection(REPLAY, True, apply, None)

    def _write_pop_replay(self, _: str, n: int) -> list[ReplayItem]:
        def apply(col: Any) -> list[ReplayItem]:
            rows = []
            for page in self._scan(col, ["metadatas", "documents"]):
                for eid, doc, meta in zip(page["ids"], page["documents"], page["metadatas"], strict=True):
                    meta = meta or {}
                    rows.append((-float(meta.get("value", 0.0)), float(meta.get("pushed_at", 0.0)), eid, doc, meta))
            rows.sort(key=lambda r: (r[0], r[1]))
            taken = rows[:n]
            if not taken:
                return []
            self._call("pop replay", lambda: col.delete(ids=[r[2] for r in taken]))
            return [
                ReplayItem(
                    id=eid,
                    tenant=str(meta.get("tenant", "")),
                    request=doc or "",
                    messages=[Message(**m) for m in json.loads(meta["messages"])] if meta.get("messages") else [],
                    value=-neg_value,
                    pushed_at=pushed_at,
                )
                for neg_value, pushed_at, eid, doc, meta in taken
            ]

        return self._with_collection(REPLAY, False, apply, [])

    # ------------------------------------------------------------------ closing

    async def close(self) -> None:
        """Wait for pending writes, then release the client and the folder lock. Idempotent."""
        if self._closed:
            return
        for writer in list(self._writers.values()):
            with contextlib.suppress(Exception):
                await writer.wait_idle()
        self._closed = True
        await asyncio.to_thread(self._release)

    def _release(self) -> None:
        with self._open_lock:
            client, self._client = self._client, None
            with self._cols_lock:
                self._cols.clear()
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()
            if self._lock is not None:
                self._lock.release()
                self._lock = None


ExampleStore = ChromaExampleStore
"""The example store: Chroma, embedded or server."""


def create_store(config: StoreConfig | None, embedder: Embedder) -> ChromaExampleStore:
    """The store the settings describe (embedded when ``store.host`` is unset, else a Chroma server)."""
    return ChromaExampleStore(config if config is not None else StoreConfig(), embedder)


__all__ = ["ChromaExampleStore", "ExampleStore", "create_store", "from_record", "replay_id", "to_record"]
