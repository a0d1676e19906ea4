"""What the LangChain and LlamaIndex front doors share, with no framework imported here.

- :class:`PipelineHandle`: the pipeline an adapter uses (given, or built lazily from settings), started once, and
  always driven on the process-wide background loop of :mod:`echo_middleware._sync`. The engines and the scheduler
  live on that loop, so an ``await llm.ainvoke(...)`` from the caller's own loop (Jupyter, FastAPI, pytest) is
  bridged to it instead of touching loop-bound state from a second loop; cancelling the caller cancels the
  request down to the engine.
- :class:`CallOptions`: the per-call options both frameworks accept (``tenant=``, ``slo=``, ``offload=``, sampling),
  turned into an :class:`~echo_middleware.types.EchoRequest`.
- A text protocol for tool calls on local models (the Hermes / Qwen2.5 ``<tool_call>`` format), used when tools
  are bound but the large model is a local engine rather than a framework model that calls tools natively.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import ValidationError

from echo_middleware._aio import until_deadline
from echo_middleware._sync import background_loop, iterate_sync, run_sync
from echo_middleware.engines.base import Engine
from echo_middleware.engines.transformers import StopTrimmer
from echo_middleware.errors import ConfigError, EchoError, EngineError, EngineTimeout, EngineUnavailable
from echo_middleware.types import (
    SLO,
    EchoChunk,
    EchoRequest,
    EchoResult,
    EngineRequest,
    FeatureStatus,
    FinishReason,
    Message,
    OffloadMode,
    SamplingParams,
    StreamDelta,
    Usage,
)

if TYPE_CHECKING:
    from echo_middleware.config import EchoSettings
    from echo_middleware.pipeline import EchoPipeline

logger = logging.getLogger(__name__)

T = TypeVar("T")

OFFLOAD_MODES: tuple[OffloadMode, ...] = ("auto", "never", "always")
SAMPLING_KEYS = ("temperature", "max_tokens", "top_p", "seed")


# ------------------------------------------------------------------------------------- bridging


async def on_background(coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` on the background loop from any loop; cancelling the caller cancels it there too."""
    loop = background_loop()
    if asyncio.get_running_loop() is loop:
        return await coro
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    return await asyncio.wrap_future(future)


_ITEM, _ERROR, _DONE = "item", "error", "done"


async def aiter_on_background(factory: Callable[[], AsyncIterator[T]]) -> AsyncIterator[T]:
    """Iterate the async iterator ``factory()`` makes, running it on the background loop.

    Items cross to the caller's loop through a queue; when the caller stops early (``break``, an exception, task
    cancellation) the producer is cancelled on the background loop, which cancels the request in the engine.
    """
    loop = background_loop()
    if asyncio.get_running_loop() is loop:
        async for item in factory():
            yield item
        return
    caller = asyncio.get_running_loop()
    items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def post(kind: str, value: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the caller's loop is already closed: nobody is listening
            caller.call_soon_threadsafe(items.put_nowait, (kind, value))

    async def pump() -> None:
        source = factory()
        try:
            async for item in source:
                post(_ITEM, item)
        except BaseException as exc:  # handed to the consumer and re-raised there
            post(_ERROR, exc)
            raise
        else:
            post(_DONE, None)
        finally:
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    future = asyncio.run_coroutine_threadsafe(pump(), loop)
    try:
        while True:
            kind, value = await items.get()
            if kind == _DONE:
                return
            if kind == _ERROR:
                raise value
            yield value
    finally:
        if not future.done():
            future.cancel()


# --------------------------------------------------------------------------------- the pipeline


class PipelineHandle:
    """The pipeline behind one adapter: a shared one the user passed, or one built on first use and owned here.

    Building is lazy (constructing a LangChain or LlamaIndex model must stay cheap and load nothing); starting is
    done once, on the background loop, before the first request.
    """

    def __init__(
        self,
        pipeline: EchoPipeline | None = None,
        *,
        settings: EchoSettings | None = None,
        large: Engine | None = None,
        small: Engine | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._owned = pipeline is None
        self._settings = settings
        self._large = large
        self._small = small
        self._lock = threading.Lock()
        self._started: asyncio.Future[None] | None = None

    @property
    def owned(self) -> bool:
        """Whether this handle built the pipeline (and so closes it)."""
        return self._owned

    @property
    def pipeline(self) -> EchoPipeline:
        """The pipeline, built on first access (cheap: engines load in ``start``)."""
        with self._lock:
            if self._pipeline is None:
                from echo_middleware.pipeline import EchoPipeline

                self._pipeline = EchoPipeline(self._settings, large=self._large, small=self._small)
            return self._pipeline

    @property
    def settings(self) -> EchoSettings:
        """The settings the pipeline runs with."""
        if self._pipeline is not None:
            return self._pipeline.settings
        if self._settings is None:
            from echo_middleware.config import build_settings

            self._settings = build_settings()
        return self._settings

    async def _ensure_started(self) -> EchoPipeline:
        """Start the pipeline once (on the background loop); concurrent first calls share one start."""
        pipeline = self.pipeline
        if self._started is None:
            self._started = asyncio.ensure_future(self._start(pipeline))
        try:
            await asyncio.shield(self._started)
        except BaseException:
            if self._started.done() and (self._started.cancelled() or self._started.exception() is not None):
                self._started = None  # a failed start is retried by the next call
            raise
        return pipeline

    @staticmethod
    async def _start(pipeline: EchoPipeline) -> None:
        """Start the engines one after the other, then the pipeline.

        Two local models loading at once on one CPU gain nothing, and transformers' lazy imports are not
        thread-safe: two engines importing it at the same moment fail with "cannot import name
        AutoModelForCausalLM". A small engine that fails here is left to the pipeline, which starts it again
        and, if it still fails, lets the large model answer (and says so in each decision).
        """
        if not getattr(pipeline, "_started", False):
            large = getattr(pipeline, "large_engine", None)
            small = getattr(pipeline, "small_engine", None)
            if isinstance(large, Engine):
                await large.start()
            if isinstance(small, Engine):
                try:
                    await small.start()
                except Exception as exc:  # the pipeline decides what a failed small engine means
                    logger.debug("small engine failed to start before the pipeline: %s", exc)
        await pipeline.start()

    async def _generate(self, request: EchoRequest) -> EchoResult:
        pipeline = await self._ensure_started()
        return await pipeline.agenerate(request)

    async def _stream(self, request: EchoRequest) -> AsyncIterator[EchoChunk]:
        pipeline = await self._ensure_started()
        async for chunk in pipeline.astream(request):
            yield chunk

    async def agenerate(self, request: EchoRequest, timeout_s: float | None = None) -> EchoResult:
        """Answer ``request`` (from any loop)."""
        return await _with_timeout(on_background(self._generate(request)), timeout_s, request)

    async def abatch(self, requests: Sequence[EchoRequest], timeout_s: float | None = None) -> list[EchoResult]:
        """Answer several requests concurrently, so the scheduler sees them all at once."""
        return list(await asyncio.gather(*(self.agenerate(r, timeout_s) for r in requests)))

    async def astream(self, request: EchoRequest, timeout_s: float | None = None) -> AsyncIterator[EchoChunk]:
        """Stream ``request`` (from any loop); the last chunk carries the decision and usage."""
        source = aiter_on_background(lambda: self._stream(request))
        async with contextlib.aclosing(_before_deadline(source, request, timeout_s)) as chunks:
            async for chunk in chunks:
                yield chunk

    def generate(self, request: EchoRequest, timeout_s: float | None = None) -> EchoResult:
        """Answer ``request`` from sync code (also inside a running loop, e.g. Jupyter)."""
        return run_sync(_with_timeout(self._generate(request), timeout_s, request))

    def batch(self, requests: Sequence[EchoRequest], timeout_s: float | None = None) -> list[EchoResult]:
        """Answer several requests from sync code, concurrently."""

        async def both() -> list[EchoResult]:
            return list(await asyncio.gather(*(_with_timeout(self._generate(r), timeout_s, r) for r in requests)))

        return run_sync(both())

    def stream(self, request: EchoRequest, timeout_s: float | None = None) -> Iterator[EchoChunk]:
        """Stream ``request`` from sync code; closing the iterator cancels the request."""
        return iterate_sync(_before_deadline(self._stream(request), request, timeout_s))

    async def aclose(self) -> None:
        """Close the pipeline if this handle built it; a shared pipeline is left to its owner."""
        if self._owned and self._pipeline is not None:
            await on_background(self._pipeline.close())
            self._pipeline = None
            self._started = None

    def close(self) -> None:
        """Sync :meth:`aclose`."""
        if self._owned and self._pipeline is not None:
            run_sync(self._pipeline.close())
            self._pipeline = None
            self._started = None


def _timeout_error(request: EchoRequest, timeout_s: float | None) -> EngineTimeout:
    return EngineTimeout(
        f"request {request.request_id} took longer than timeout={timeout_s} s: raise `timeout` or ask for fewer "
        "tokens (max_tokens)"
    )


async def _with_timeout(coro: Coroutine[Any, Any, T], timeout_s: float | None, request: EchoRequest) -> T:
    if timeout_s is None:
        return await coro
    try:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can return a result that lands just as the
        # caller is cancelled and lose the cancellation (CPython gh-86296).
        async with asyncio.timeout(timeout_s):
            return await coro
    except TimeoutError:
        raise _timeout_error(request, timeout_s) from None


def _before_deadline(
    source: AsyncIterator[EchoChunk], request: EchoRequest, timeout_s: float | None
) -> AsyncIterator[EchoChunk]:
    """``source``'s chunks until ``timeout_s`` (the whole stream's budget) runs out; closing it closes ``source``."""
    end = None if timeout_s is None else time.monotonic() + timeout_s
    return until_deadline(source, end, lambda: _timeout_error(request, timeout_s))


# ---------------------------------------------------------------------------------- call options


@dataclass
class CallOptions:
    """Everything a front door can set for one call, merged from constructor fields and call kwargs."""

    tenant: str | None = None
    slo: SLO | None = None
    offload: OffloadMode = "auto"
    sampling: dict[str, Any] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    requires_large: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)

    def request(self, messages: list[Message], request_id: str | None = None) -> EchoRequest:
        """The pipeline request; sampling fields not set anywhere keep the pipeline's defaults.

        Only the fields that were set are passed to :class:`SamplingParams`, so ``params.model_fields_set`` tells
        an engine that wraps a framework model which values the user chose (those override the wrapped model's
        own configuration; the rest leave it alone).
        """
        sampling = {k: v for k, v in self.sampling.items() if v is not None}
        if self.stop:
            sampling["stop"] = list(self.stop)
        try:
            params = SamplingParams(**sampling)
            extra = {"request_id": request_id} if request_id else {}
            return EchoRequest(
                messages=messages,
                tenant=self.tenant,
                slo=self.slo,
                params=params,
                offload=self.offload,
                requires_large=self.requires_large,
                metadata=dict(self.metadata),
                **extra,
            )
        except ValidationError as exc:
            from echo_middleware.config import format_validation_error

            raise ConfigError(format_validation_error(exc)) from exc


def check_pipeline_fields(
    *, pipeline: Any, settings: Any, large: Any, small: Any, large_types: tuple[type, ...], framework: str, example: str
) -> EchoSettings | None:
    """Validate an adapter's ``pipeline`` / ``settings`` / ``large`` / ``small`` fields; return the settings.

    Both front doors take the same four fields, so the rules (and their messages, which name the field and the fix)
    live here once. ``large_types`` are the framework's model classes that may be the large model, ``framework`` and
    ``example`` name them in the error (e.g. "LangChain chat model", "ChatOpenAI(...)").

    Raises:
        ValueError: A field is wrong (pydantic turns it into a ValidationError naming the field).
    """
    from echo_middleware.config import EchoSettings, build_settings

    if pipeline is not None and (settings is not None or large is not None or small is not None):
        raise ValueError(
            "pass either pipeline= (a shared EchoPipeline) or settings=/large=/small= (to build one), not both"
        )
    if pipeline is not None and not (hasattr(pipeline, "agenerate") and hasattr(pipeline, "astream")):
        raise ValueError(f"pipeline={type(pipeline).__name__} is not an EchoPipeline")
    if large is not None and not isinstance(large, (*large_types, Engine)):
        raise ValueError(
            f"large={type(large).__name__} is neither a {framework} nor an echo Engine: pass e.g. "
            f"{example} or create_engine(EngineConfig(...))"
        )
    if small is not None and not isinstance(small, Engine):
        raise ValueError(f"small={type(small).__name__} is not an echo Engine: pass create_engine(...)")
    if isinstance(settings, Mapping):
        return build_settings(**settings)
    if settings is not None and not isinstance(settings, EchoSettings):
        raise ValueError(f"settings={type(settings).__name__} is not EchoSettings or a dict")
    return settings


def coerce_slo(value: Any, where: str) -> SLO | None:
    """An :class:`SLO` from an SLO, a dict, or None; anything else is a ConfigError naming ``where``."""
    if value is None or isinstance(value, SLO):
        return value
    if isinstance(value, Mapping):
        try:
            return SLO(**value)
        except ValidationError as exc:
            from echo_middleware.config import format_validation_error

            raise ConfigError(f"{where}: {format_validation_error(exc)}") from exc
    raise ConfigError(f"{where}={value!r} is not an SLO: pass SLO(ttft_s=..., latency_s=...) or a dict of those")


def coerce_offload(value: Any, where: str) -> OffloadMode:
    """Check an offload mode, naming ``where`` and the choices when it is wrong."""
    if value not in OFFLOAD_MODES:
        raise ConfigError(f"{where}={value!r} is not an offload mode: use one of {', '.join(OFFLOAD_MODES)}")
    return value  # type: ignore[no-any-return]


def merge_call_options(
    defaults: Mapping[str, Any],
    kwargs: dict[str, Any],
    *,
    stop: Sequence[str] | None,
    owner: str,
    allowed_extra: Sequence[str] = (),
) -> tuple[CallOptions, dict[str, Any]]:
    """Merge constructor ``defaults`` with call ``kwargs`` (which win) into :class:`CallOptions`.

    Recognised kwargs are consumed: ``tenant``, ``slo``, ``offload``, the sampling keys and
    ``stop``. Keys in ``allowed_extra`` are returned for the caller to handle (e.g. ``tools``); framework-internal
    ``ls_*`` keys are dropped; anything else is a ConfigError naming it, so a typo is not silently ignored.

    Returns:
        The options and the extra kwargs.
    """
    rest = dict(kwargs)
    extra = {k: rest.pop(k) for k in list(rest) if k in allowed_extra}
    for key in [k for k in rest if k.startswith("ls_")]:
        rest.pop(key)
    picked = {k: rest.pop(k) for k in list(rest) if k in (*SAMPLING_KEYS, "tenant", "slo", "offload")}
    if rest:
        known = ", ".join(sorted({*SAMPLING_KEYS, "tenant", "slo", "offload", "stop", *allowed_extra}))
        raise ConfigError(f"{owner} got unknown call argument(s) {sorted(rest)}: it accepts {known}")
    merged = {**defaults, **{k: v for k, v in picked.items() if v is not None}}
    stops = list(stop) if stop is not None else list(merged.get("stop") or [])
    options = CallOptions(
        tenant=merged.get("tenant"),
        slo=coerce_slo(merged.get("slo"), f"{owner}.slo"),
        offload=coerce_offload(merged.get("offload", "auto"), f"{owner}.offload"),
        sampling={k: merged.get(k) for k in SAMPLING_KEYS},
        stop=stops,
    )
    return options, extra


def split_overrides(overrides: Mapping[str, Any], field_names: set[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``from_defaults`` kwargs into an adapter's own fields and settings overrides.

    ``large`` / ``small`` are both: a model or an Engine is the adapter's field, a dict (or an ``EngineConfig``)
    is the settings section of that engine, as in :meth:`EchoPipeline.from_defaults`.
    """
    own: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    for key, value in overrides.items():
        is_section = key in ("large", "small") and (isinstance(value, Mapping) or hasattr(value, "model_dump"))
        engine_like = is_section and hasattr(value, "stream")  # an Engine or framework model is not a section
        if key in field_names and not (is_section and not engine_like):
            own[key] = value
        else:
            settings[key] = value
    return own, settings


def configured_copy(model: Any, params: SamplingParams, names: Mapping[str, Sequence[str]]) -> Any:
    """A shallow copy of a pydantic framework model with the sampling values the user set explicitly.

    ``names`` maps our field (``max_tokens``) to the model's candidate field names (``max_tokens``,
    ``num_predict``...). Values the user did not set leave the wrapped model's own configuration alone; a model
    without a matching field keeps its own value (logged at DEBUG).
    """
    fields = getattr(type(model), "model_fields", {})
    update: dict[str, Any] = {}
    for ours in params.model_fields_set & set(names):
        for theirs in names[ours]:
            if theirs in fields:
                update[theirs] = getattr(params, ours)
                break
        else:
            logger.debug("%s has no field for %s; its own setting applies", type(model).__name__, ours)
    return model.model_copy(update=update) if update else model


# ------------------------------------------------------------------------- wrapped-model engines


@dataclass
class Piece:
    """What a framework model streamed: new text and, when it reports them, usage and the finish reason."""

    text: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: FinishReason | None = None


TRANSIENT_NAMES = ("Connection", "RateLimit", "Unavailable", "InternalServer", "Overloaded", "APIStatus", "Network")
"""Parts of exception class names (openai, anthropic, httpx, requests...) that mark a transient failure."""


def wrap_model_error(engine: str, exc: BaseException) -> BaseException:
    """A wrapped model's exception as our error tree, so the pipeline's retry and fallback rules apply.

    Timeouts become :class:`EngineTimeout`, connection / rate-limit / server-side errors :class:`EngineUnavailable`
    (both transient), anything else :class:`EngineError`; our own errors pass unchanged.
    """
    if isinstance(exc, EchoError):
        return exc
    kind = type(exc).__name__
    message = f"{engine}: the wrapped model failed: {kind}: {exc}"
    if "Timeout" in kind or isinstance(exc, TimeoutError):
        return EngineTimeout(message)
    if any(part in kind for part in TRANSIENT_NAMES) or isinstance(exc, ConnectionError):
        return EngineUnavailable(message)
    return EngineError(message)


class WrappedModelEngine(Engine):
    """An :class:`Engine` over a framework model (LangChain, LlamaIndex) the user already has.

    Subclasses turn an :class:`EngineRequest` into the model's own streaming call in :meth:`_pieces`. This class
    runs that call in a task, so that ``cancel`` (and a consumer that goes away) stops it at once even while the
    model is waiting on the network; enforces stop strings for models that ignore them (and stops the model at
    one); and reports usage, estimated at four characters per token when the model reports none (then
    ``features["usage"]`` says so).
    """

    kind = "wrapped"

    def __init__(
        self,
        name: str,
        model: str,
        *,
        max_concurrency: int = 8,
        timeout_s: float | None = None,
        context_window: int | None = None,
    ) -> None:
        super().__init__(name, model, max_concurrency)
        self._timeout = timeout_s
        self._window = context_window
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def _pieces(self, request: EngineRequest) -> AsyncIterator[Piece]:
        raise NotImplementedError

    def _prompt_chars(self, request: EngineRequest) -> int:
        if request.messages is None:
            return len(request.prompt or "")
        return sum(len(m.content) for m in request.messages)

    def _timeout_s(self) -> float | None:
        return self._timeout

    async def _start(self) -> None:
        self._features.setdefault("streaming", FeatureStatus(requested=True, enabled=True))

    async def _pump(self, request: EngineRequest, out: asyncio.Queue[tuple[str, Any]]) -> None:
        try:
            async for piece in self._pieces(request):
                out.put_nowait(("piece", piece))
        except asyncio.CancelledError:
            out.put_nowait(("abort", None))
            raise
        except Exception as exc:  # handed to the consumer, raised there
            out.put_nowait(("error", exc))
        else:
            out.put_nowait(("done", None))

    async def _stream(self, request: EngineRequest) -> AsyncIterator[StreamDelta]:
        rid = request.request_id
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        task = asyncio.create_task(self._pump(request, queue), name=f"{self.name}:{rid}")
        self._tasks[rid] = task
        trimmer = StopTrimmer(request.params.stop)
        chars = 0
        prompt_tokens: int | None = None
        completion_tokens: int | None = None
        finish: FinishReason = "stop"
        try:
            while True:
                kind, payload = await queue.get()
                if kind == "abort":
                    return  # the base class raises Cancelled with the caller's reason
                if kind == "error":
                    raise wrap_model_error(self.name, payload) from payload
                if kind == "done":
                    break
                piece: Piece = payload
                if piece.prompt_tokens is not None:
                    prompt_tokens = piece.prompt_tokens
                if piece.completion_tokens is not None:
                    completion_tokens = piece.completion_tokens
                if piece.finish_reason is not None:
                    finish = piece.finish_reason
                text = trimmer.feed(piece.text)
                if text:
                    chars += len(text)
                    yield StreamDelta(request_id=rid, text=text)
                if trimmer.hit is not None:
                    finish = "stop"
                    task.cancel()  # the answer is complete: stop paying for tokens after the stop string
                    break
            tail = trimmer.flush()
            chars += len(tail)
            if prompt_tokens is None or completion_tokens is None:
                self._features["usage"] = FeatureStatus(
                    requested=True, enabled=False, detail="the model reports no usage: estimated at 4 chars/token"
                )
                if prompt_tokens is None:
                    prompt_tokens = max(1, self._prompt_chars(request) // 4)
                if completion_tokens is None:
                    completion_tokens = (chars + 3) // 4
            yield StreamDelta(
                request_id=rid,
                text=tail,
                finish_reason=finish,
                usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens),
            )
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await asyncio.wait({task}, timeout=5.0)
            if self._tasks.get(rid) is task:
                del self._tasks[rid]

    async def _abort(self, request_id: str) -> None:
        task = self._tasks.get(request_id)
        if task is not None and not task.done():
            task.cancel()

    @property
    def context_window(self) -> int:
        """The window given to the constructor, else 8192."""
        return self._window or 8192


# ----------------------------------------------------------------------------------- tool calls


@dataclass
class ToolCall:
    """One parsed tool call."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def tools_system_prompt(tools: Sequence[Mapping[str, Any]], tool_choice: str | None = None) -> str:
    """The system text that offers ``tools`` (OpenAI tool dicts) to a local model, in the Hermes / Qwen2.5 format.

    Qwen2.5 models are trained on exactly this format (it is what their chat template renders for ``tools=``), so
    a local large model can call tools without an engine-side tool parser.
    """
    lines = [
        "# Tools",
        "",
        "You may call one or more functions to assist with the user query.",
        "",
        "You are provided with function signatures within <tools></tools> XML tags:",
        "<tools>",
        *(json.dumps(t, ensure_ascii=False) for t in tools),
        "</tools>",
        "",
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:",
        "<tool_call>",
        '{"name": <function-name>, "arguments": <args-json-object>}',
        "</tool_call>",
    ]
    if tool_choice in ("any", "required"):
        lines += ["", "You must call at least one of these functions."]
    elif tool_choice and tool_choice not in ("auto", "none"):
        lines += ["", f"You must call the function {tool_choice}."]
    return "\n".join(lines)


def render_tool_call(name: str, arguments: Mapping[str, Any]) -> str:
    """A past tool call as the assistant wrote it, for conversation history."""
    return (
        "<tool_call>\n"
        + json.dumps({"name": name, "arguments": dict(arguments)}, ensure_ascii=False)
        + "\n</tool_call>"
    )


def render_tool_result(content: str) -> str:
    """A tool's result as the user turn that carries it (what Qwen2.5's chat template renders for role=tool)."""
    return f"<tool_response>\n{content}\n</tool_response>"


def parse_tool_calls(text: str, known: Sequence[str] = ()) -> tuple[str, list[ToolCall]]:
    """Split a local model's answer into plain text and the tool calls in it.

    Accepts ``<tool_call>{json}</tool_call>`` blocks (an unclosed last block too, as a length cut leaves it) and,
    when there are none, an answer that is only a JSON object with ``name`` and ``arguments`` naming a known tool.
    Blocks that are not valid JSON calls are left in the text.

    Returns:
        The text without the parsed calls, and the calls.
    """
    calls: list[ToolCall] = []
    kept: list[str] = []
    position = 0
    for match in TOOL_CALL_RE.finditer(text):
        call = _as_call(match.group(1))
        if call is None:
            continue
        kept.append(text[position : match.start()])
        position = match.end()
        calls.append(call)
    kept.append(text[position:])
    remaining = "".join(kept).strip()
    if not calls:
        bare = _as_call(text.strip())
        if bare is not None and (not known or bare.name in known):
            return "", [bare]
    return remaining, calls


def coerce_arguments(calls: list[ToolCall], tools: Sequence[Mapping[str, Any]]) -> list[ToolCall]:
    """Give each call's top-level arguments the JSON types its tool declares (``"6"`` -> ``6`` for an integer).

    Small local models often quote numbers and booleans; native tool-calling APIs return them typed, and tools
    that do not validate their input (LlamaIndex's ``FunctionTool``) would otherwise get strings. Values that do
    not convert are left as they are, for the tool's own validation to report.
    """
    schemas = {t.get("function", {}).get("name"): t.get("function", {}).get("parameters", {}) for t in tools}
    for call in calls:
        properties = (schemas.get(call.name) or {}).get("properties") or {}
        for key, value in list(call.arguments.items()):
            kind = (properties.get(key) or {}).get("type")
            if isinstance(value, str):
                call.arguments[key] = _convert(value, kind)
    return calls


def _convert(value: str, kind: Any) -> Any:
    text = value.strip()
    try:
        if kind == "integer" and re.fullmatch(r"[+-]?\d+", text):
            return int(text)
        if kind == "number" and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", text):
            return float(text)
    except ValueError:
        return value
    if kind == "boolean" and text.lower() in ("true", "false"):
        return text.lower() == "true"
    if kind in ("array", "object") and text[:1] in "[{":
        try:
            parsed = json.loads(text)
        except ValueError:
            return value
        if isinstance(parsed, list if kind == "array" else dict):
            return parsed
    return value


def _as_call(raw: str) -> ToolCall | None:
    raw = raw.strip()
    if raw.startswith("```"):
        raw = raw.strip("`").removeprefix("json").strip()
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(name=value["name"], arguments=arguments)


def with_tools_prompt(messages: list[Message], prompt: str) -> list[Message]:
    """``messages`` with the tools prompt appended to the first system message (or a new one in front)."""
    if messages and messages[0].role == "system":
        first = Message(role="system", content=f"{messages[0].content}\n\n{prompt}")
        return [first, *messages[1:]]
    return [Message(role="system", content=prompt), *messages]
