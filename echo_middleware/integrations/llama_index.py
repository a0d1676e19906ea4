"""LlamaIndex front door: an LLM that works as ``Settings.llm`` in query engines, chat engines and agents.

:class:`EchoLLM` is a chat model with native async and streaming (every ``a*`` method awaits the pipeline; none
runs the sync path in a thread) and LlamaIndex's instrumentation (``llm_chat_callback`` /
``llm_completion_callback``, so callback handlers and the dispatcher's events see every call). Each response
carries the routing decision in ``response.additional_kwargs["decision"]`` and the whole pipeline result in
``response.raw``; query engines hide the LLM response, so :class:`DecisionLog` collects decisions from the
instrumentation events instead.

The large model can be any LlamaIndex LLM the application already has (``EchoLLM(large=OpenAI(...))``): it is
wrapped in a :class:`LlamaIndexEngine`. Tool calls are never offloaded: with a wrapped function-calling LLM they go
to it (its native tool calling); with local engines they run on the large engine in the ``<tool_call>`` text format
Qwen2.5 models are trained on.

:class:`EchoEmbedding` puts the pipeline's local sentence embedder behind LlamaIndex's embedding interface, so a
``VectorStoreIndex`` needs no network (``Settings.embed_model`` otherwise defaults to OpenAI's).

Setup:
    .. code-block:: bash

        pip install 'echo-middleware[llama-index]'
        echo-middleware models fetch

Instantiate:
    .. code-block:: python

        from llama_index.core import Settings, VectorStoreIndex
        from echo_middleware.integrations.llama_index import EchoEmbedding, EchoLLM

        Settings.llm = EchoLLM.from_defaults(max_tokens=128)
        Settings.embed_model = EchoEmbedding()

Invoke:
    .. code-block:: python

        engine = VectorStoreIndex.from_documents(docs).as_query_engine()
        print(engine.query("What does the guide say about backups?"))
        print(Settings.llm.complete("Hello", tenant="team-a").additional_kwargs["decision"])

Stream:
    .. code-block:: python

        for part in Settings.llm.stream_complete("Write a haiku about caches"):
            print(part.delta, end="")

Async:
    .. code-block:: python

        response = await Settings.llm.achat([ChatMessage(role="user", content="Hi")], offload="never")

Per-call options (``tenant=``, ``slo=``, ``offload=``, sampling) go in the call kwargs of ``chat`` / ``complete``
and their variants. Query and chat engines call the LLM without them: give those engines a per-tenant copy,
which shares the pipeline (``index.as_query_engine(llm=llm.model_copy(update={"tenant": "team-a"}))``).
"""

from __future__ import annotations

import collections
import json
import logging
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

try:
    from llama_index.core.base.embeddings.base import BaseEmbedding
    from llama_index.core.base.llms.types import (
        ChatMessage,
        ChatResponse,
        ChatResponseAsyncGen,
        ChatResponseGen,
        CompletionResponse,
        CompletionResponseAsyncGen,
        CompletionResponseGen,
        LLMMetadata,
        MessageRole,
        TextBlock,
    )
    from llama_index.core.bridge.pydantic import Field, PrivateAttr, model_validator
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.instrumentation.event_handlers import BaseEventHandler
    from llama_index.core.instrumentation.events import BaseEvent
    from llama_index.core.instrumentation.events.llm import LLMChatEndEvent, LLMCompletionEndEvent
    from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
    from llama_index.core.llms.function_calling import FunctionCallingLLM
    from llama_index.core.llms.llm import LLM, ToolSelection
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "echo_middleware.integrations.llama_index needs llama-index-core: pip install 'echo-middleware[llama-index]'"
    ) from exc

from echo_middleware.config import EmbedConfig, build_settings
from echo_middleware.errors import ConfigError
from echo_middleware.integrations._common import (
    CallOptions,
    Piece,
    PipelineHandle,
    WrappedModelEngine,
    check_pipeline_fields,
    coerce_arguments,
    configured_copy,
    merge_call_options,
    parse_tool_calls,
    render_tool_call,
    render_tool_result,
    split_overrides,
    tools_system_prompt,
    with_tools_prompt,
)
from echo_middleware.types import (
    SLO,
    EchoChunk,
    EchoResult,
    EngineRequest,
    Message,
    OffloadMode,
    SamplingParams,
    Usage,
)

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

    from echo_middleware.embed.base import Embedder
    from echo_middleware.pipeline import EchoPipeline

logger = logging.getLogger(__name__)

DELEGATE = "_echo_delegate"
"""Key ``_prepare_chat_with_tools`` sets when tool calls go to the wrapped function-calling LLM."""
TOOL_KWARGS = ("tools", "tool_choice", "tool_required", "allow_parallel_tool_calls", DELEGATE)
SAMPLING_FIELDS: dict[str, tuple[str, ...]] = {
    "temperature": ("temperature",),
    "max_tokens": ("max_tokens", "max_new_tokens", "num_output"),
    "top_p": ("top_p",),
    "seed": ("seed", "random_seed"),
}
"""Our sampling field -> the field names LlamaIndex LLMs use for it (first match wins)."""

_ROLES: dict[str, str] = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "model": "assistant",
    "chatbot": "assistant",
}


# ------------------------------------------------------------------------------ message mapping


def _role_name(role: Any) -> str:
    return role.value if isinstance(role, MessageRole) else str(role)


def _text_of(message: ChatMessage, index: int) -> str:
    others = {type(b).__name__ for b in message.blocks if not isinstance(b, TextBlock)}
    if others:
        raise ConfigError(
            f"message {index} has {sorted(others)} content: the pipeline passes text only. Send text, or call the "
            "wrapped large LLM directly for multimodal input."
        )
    return message.content or ""


def _tool_calls_of(message: ChatMessage) -> list[tuple[str, dict[str, Any]]]:
    """Tool calls recorded on an assistant message, in our format or OpenAI's (dicts or client objects)."""
    out: list[tuple[str, dict[str, Any]]] = []
    for call in message.additional_kwargs.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, Mapping) else getattr(call, "function", None)
        if function is not None:
            name = function.get("name") if isinstance(function, Mapping) else getattr(function, "name", None)
            args = function.get("arguments") if isinstance(function, Mapping) else getattr(function, "arguments", None)
        elif isinstance(call, Mapping):
            name, args = call.get("name"), call.get("arguments")
        else:
            continue
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                args = {"_raw": args}
        if isinstance(name, str):
            out.append((name, dict(args or {})))
    return out


def to_echo_messages(messages: Sequence[ChatMessage]) -> list[Message]:
    """LlamaIndex chat messages as pipeline messages (tool calls and results in the ``<tool_call>`` format)."""
    out: list[Message] = []
    for i, message in enumerate(messages):
        role = _role_name(message.role)
        text = _text_of(message, i)
        if role in ("tool", "function"):
            out.append(Message(role="user", content=render_tool_result(text)))
            continue
        if role not in _ROLES:
            raise ConfigError(f"message {i} has role {role!r}: use system, user or assistant")
        ours = _ROLES[role]
        if ours == "assistant":
            calls = "\n".join(render_tool_call(name, args) for name, args in _tool_calls_of(message))
            text = "\n".join(p for p in (text, calls) if p)
        out.append(Message(role=ours, content=text))  # type: ignore[arg-type]
    if not out:
        raise ConfigError("no messages to answer: pass at least one message")
    return out


def to_llama_messages(request: EngineRequest) -> list[ChatMessage]:
    """An engine request as LlamaIndex chat messages (what a wrapped LLM is called with)."""
    if request.messages is None:
        return [ChatMessage(role=MessageRole.USER, content=request.prompt or "")]
    return [
        ChatMessage(
            role=MessageRole.USER if m.role == "tool" else MessageRole(m.role),
            content=render_tool_result(m.content) if m.role == "tool" else m.content,
        )
        for m in request.messages
    ]


def _usage_from(response: ChatResponse | CompletionResponse) -> tuple[int | None, int | None]:
    """Token counts a LlamaIndex response reports (``raw.usage`` as OpenAI's, or ``additional_kwargs``)."""
    raw = response.raw
    usage = raw.get("usage") if isinstance(raw, Mapping) else getattr(raw, "usage", None)
    if usage is not None:
        get = usage.get if isinstance(usage, Mapping) else lambda k: getattr(usage, k, None)
        prompt, completion = get("prompt_tokens"), get("completion_tokens")
        if isinstance(prompt, int) and isinstance(completion, int):
            return prompt, completion
    extra = response.additional_kwargs
    prompt, completion = extra.get("prompt_tokens"), extra.get("completion_tokens")
    if isinstance(prompt, int) and isinstance(completion, int):
        return prompt, completion
    return None, None


# ------------------------------------------------------------------------------------- engine


class LlamaIndexEngine(WrappedModelEngine):
    """Any LlamaIndex LLM as an :class:`Engine`: what lets a user's own LLM be the large model.

    Chat models stream through ``astream_chat``, others through ``astream_complete`` on the LLM's own
    ``messages_to_prompt``. Sampling values the caller set explicitly override the LLM's own fields when it has
    them (``temperature``, ``max_tokens``...); everything else keeps the user's configuration. Stop strings are
    enforced here (LlamaIndex has no standard stop argument). ``cancel`` cancels the task driving the stream.

    Args:
        llm: The LlamaIndex LLM.
        name: The engine's name in decisions and logs (default ``llama_index:<model name>``).
        max_concurrency: Requests the scheduler sends at once.
        timeout_s: Seconds one generation may take (None: no limit beyond the request's deadline).
        context_window: Prompt plus answer tokens; default the LLM's ``metadata.context_window``.
    """

    kind = "llama_index"

    def __init__(
        self,
        llm: LLM,
        *,
        name: str | None = None,
        max_concurrency: int = 8,
        timeout_s: float | None = None,
        context_window: int | None = None,
    ) -> None:
        if not isinstance(llm, LLM):
            raise ConfigError(f"LlamaIndexEngine wraps a LlamaIndex LLM; got {type(llm).__name__}")
        meta = llm.metadata
        model_name = meta.model_name if meta.model_name and meta.model_name != "unknown" else llm.class_name()
        super().__init__(
            name or f"llama_index:{model_name}",
            model_name,
            max_concurrency=max_concurrency,
            timeout_s=timeout_s,
            context_window=context_window or meta.context_window,
        )
        self.llm = llm

    async def _pieces(self, request: EngineRequest) -> AsyncIterator[Piece]:
        llm = configured_copy(self.llm, request.params, SAMPLING_FIELDS)
        last: ChatResponse | CompletionResponse | None = None
        if llm.metadata.is_chat_model:
            stream: Any = await llm.astream_chat(to_llama_messages(request))
        else:
            prompt = request.prompt if request.messages is None else llm.messages_to_prompt(to_llama_messages(request))
            stream = await llm.astream_complete(prompt, formatted=True)
        async for response in stream:
            last = response
            yield Piece(text=response.delta or "")
        if last is not None:
            prompt_tokens, completion_tokens = _usage_from(last)
            if prompt_tokens is not None:
                yield Piece(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)


# ----------------------------------------------------------------------------------------- LLM


def _raw(result: EchoResult) -> dict[str, Any]:
    usage = result.usage
    return {
        **result.model_dump(mode="json"),
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
        },
    }


def _extras(result: EchoResult) -> dict[str, Any]:
    return {
        "decision": result.decision.model_dump(mode="json"),
        "prompt_tokens": result.usage.prompt_tokens,
        "completion_tokens": result.usage.completion_tokens,
        "total_tokens": result.usage.total_tokens,
    }


def _result_of(parts: list[str], last: EchoChunk) -> EchoResult:
    if last.decision is None:
        raise ConfigError(f"the pipeline's stream for {last.request_id} ended without its decision chunk")
    return EchoResult(
        request_id=last.request_id,
        text="".join(parts),
        finish_reason=last.finish_reason or "stop",
        usage=last.usage or Usage(),
        decision=last.decision,
    )


class EchoLLM(FunctionCallingLLM):
    """A LlamaIndex LLM backed by the echo-middleware pipeline; see the module docstring for usage.

    Args (all optional):
        pipeline: An EchoPipeline to share (e.g. with a LangChain model in the same process).
        settings: EchoSettings (or a dict of overrides) for the pipeline this LLM builds on first use.
        large: The large model: any LlamaIndex LLM (wrapped in :class:`LlamaIndexEngine`) or an echo Engine.
        small: The small model's Engine (default: the bundled small model from settings).
        tenant, slo, offload: Defaults for every call; call kwargs (``llm.chat(msgs, tenant="a")``) override them.
        temperature, max_tokens, top_p, seed, stop: Sampling defaults; call kwargs override them.
        context_window: Reported in ``metadata``; default the smaller ``max_model_len`` of the two engines.
        timeout: Seconds a call may take before it is cancelled (down to the engine) with EngineTimeout.
    """

    model: str = Field(default="echo", description="The name reported in metadata and traces.")
    pipeline: Any = Field(default=None, exclude=True, description="An EchoPipeline to share.")
    settings: Any = Field(default=None, exclude=True, description="EchoSettings (or a dict) for an own pipeline.")
    large: Any = Field(default=None, exclude=True, description="The large model: a LlamaIndex LLM or an Engine.")
    small: Any = Field(default=None, exclude=True, description="The small model: an echo Engine.")
    temperature: float | None = Field(default=None, ge=0, le=2, description="None: the pipeline's default (0).")
    max_tokens: int | None = Field(default=None, ge=1, description="Most new tokens; None: the pipeline default.")
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0)
    stop: list[str] | None = Field(default=None, description="Strings that end an answer.")
    context_window: int | None = Field(default=None, ge=128, description="Reported context window.")
    timeout: float | None = Field(default=None, gt=0, description="Seconds one call may take (cancelled after).")
    tenant: str | None = Field(default=None, description="Whose examples to use and feed; None: the default.")
    slo: SLO | None = Field(default=None, description="Latency objective and priority class.")
    offload: OffloadMode = Field(default="auto", description="auto: the router decides; never / always: forced.")

    _handle: PipelineHandle | None = PrivateAttr(default=None)
    _handle_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @model_validator(mode="after")
    def _check_echo_fields(self) -> EchoLLM:
        self.settings = check_pipeline_fields(
            pipeline=self.pipeline,
            settings=self.settings,
            large=self.large,
            small=self.small,
            large_types=(LLM,),
            framework="LlamaIndex LLM",
            example="OpenAI(...)",
        )
        return self

    @classmethod
    def class_name(cls) -> str:
        """LlamaIndex's name of this class."""
        return "EchoLLM"

    @classmethod
    def from_defaults(cls, **overrides: Any) -> EchoLLM:
        """An LLM on the bundled defaults (embedded Chroma, local small and large models).

        Keyword arguments that name fields of this class set them (``max_tokens=128``, ``large=OpenAI()``); the
        others are settings overrides (``store={"path": "..."}``, ``small={"model": "..."}``), validated now.
        ``ECHO_*`` variables apply.
        """
        own, rest = split_overrides(overrides, set(cls.model_fields))
        if rest:
            own["settings"] = build_settings(**rest)
        return cls(**own)

    # ------------------------------------------------------------------------------ plumbing

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._attach_handle()

    def _attach_handle(self) -> None:
        """Create the (cheap, unstarted) pipeline handle now, so copies of this LLM share one pipeline."""
        large = LlamaIndexEngine(self.large) if isinstance(self.large, LLM) else self.large
        self._handle = PipelineHandle(self.pipeline, settings=self.settings, large=large, small=self.small)

    @property
    def handle(self) -> PipelineHandle:
        """The pipeline behind this LLM (built on first use; nothing loads until the first call).

        Copies share it: ``llm.model_copy(update={"tenant": "a"})`` is a per-tenant LLM on the same engines, for
        query and chat engines, which call the LLM without per-call arguments.
        """
        with self._handle_lock:
            if self._handle is None:
                self._attach_handle()
            assert self._handle is not None  # noqa: S101 - set just above
            return self._handle

    @property
    def echo_pipeline(self) -> EchoPipeline:
        """The :class:`~echo_middleware.pipeline.EchoPipeline` this LLM drives."""
        return self.handle.pipeline

    @property
    def large_llm(self) -> LLM | None:
        """The wrapped LlamaIndex large LLM, when there is one."""
        return self.large if isinstance(self.large, LLM) else None

    def close(self) -> None:
        """Close the pipeline this LLM built (engines, store); a shared ``pipeline=`` is left open."""
        if self._handle is not None:
            self._handle.close()

    async def aclose(self) -> None:
        """Async :meth:`close`."""
        if self._handle is not None:
            await self._handle.aclose()

    @property
    def metadata(self) -> LLMMetadata:
        """Context window, output budget, and that this is a chat model that can call functions."""
        window = self.context_window
        if window is None:
            settings = self.handle.settings
            window = min(settings.large.max_model_len, settings.small.max_model_len)
        return LLMMetadata(
            context_window=window,
            num_output=self.max_tokens or SamplingParams().max_tokens,
            is_chat_model=True,
            is_function_calling_model=True,
            model_name=self.model,
        )

    def _options(self, kwargs: dict[str, Any]) -> tuple[CallOptions, dict[str, Any]]:
        defaults = {
            "tenant": self.tenant,
            "slo": self.slo,
            "offload": self.offload,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": self.stop,
        }
        stop = kwargs.pop("stop", None)
        kwargs.pop("formatted", None)
        return merge_call_options(defaults, kwargs, stop=stop, owner="EchoLLM", allowed_extra=TOOL_KWARGS)

    def _chat_request(
        self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]
    ) -> tuple[Any, list[dict[str, Any]]]:
        """The pipeline request of a chat call, and the tools offered (OpenAI tool dicts; empty without tools)."""
        options, tooling = self._options(dict(kwargs))
        echo_messages = to_echo_messages(messages)
        tools = tooling.get("tools") or []
        if tools and tooling.get("tool_choice") != "none":
            choice = tooling.get("tool_choice") or ("required" if tooling.get("tool_required") else None)
            echo_messages = with_tools_prompt(echo_messages, tools_system_prompt(tools, choice))
            options.requires_large = True
            options.metadata["tools"] = [t["function"]["name"] for t in tools]
            return options.request(echo_messages), list(tools)
        return options.request(echo_messages), []

    def _completion_request(self, prompt: str, kwargs: dict[str, Any]) -> Any:
        options, _ = self._options(dict(kwargs))
        return options.request([Message(role="user", content=prompt)])

    def _delegated(self, kwargs: Mapping[str, Any]) -> dict[str, Any] | None:
        """The kwargs for the wrapped LLM when this call's tools go to it, else None."""
        if not kwargs.get(DELEGATE):
            return None
        return {k: v for k, v in kwargs.items() if k != DELEGATE}

    def _chat_response(self, result: EchoResult, tools: list[dict[str, Any]]) -> ChatResponse:
        text, extra = result.text, {}
        if tools:
            text, calls = parse_tool_calls(result.text, [t["function"]["name"] for t in tools])
            calls = coerce_arguments(calls, tools)
            extra = {"tool_calls": [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in calls]}
        return ChatResponse(
            message=ChatMessage(role=MessageRole.ASSISTANT, content=text, additional_kwargs=extra),
            raw=_raw(result),
            additional_kwargs=_extras(result),
        )

    # ---------------------------------------------------------------------------------- chat

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Answer a conversation (tools in kwargs go to the large model)."""
        delegated = self._delegated(kwargs)
        if delegated is not None:
            assert self.large_llm is not None  # noqa: S101 - only set when there is one
            return self.large_llm.chat(messages, **delegated)
        request, tools = self._chat_request(messages, kwargs)
        return self._chat_response(self.handle.generate(request, timeout_s=self.timeout), tools)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Async :meth:`chat`: awaits the pipeline (no worker thread)."""
        delegated = self._delegated(kwargs)
        if delegated is not None:
            assert self.large_llm is not None  # noqa: S101
            return await self.large_llm.achat(messages, **delegated)
        request, tools = self._chat_request(messages, kwargs)
        return self._chat_response(await self.handle.agenerate(request, timeout_s=self.timeout), tools)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        """Stream a conversation's answer; with local tool calls the answer arrives whole (it must be parsed)."""
        delegated = self._delegated(kwargs)
        if delegated is not None:
            assert self.large_llm is not None  # noqa: S101
            return self.large_llm.stream_chat(messages, **delegated)
        request, tools = self._chat_request(messages, kwargs)

        def gen() -> Iterator[ChatResponse]:
            if tools:
                response = self._chat_response(self.handle.generate(request, timeout_s=self.timeout), tools)
                response.delta = response.message.content
                yield response
                return
            parts: list[str] = []
            for piece in self.handle.stream(request, timeout_s=self.timeout):
                if piece.text:
                    parts.append(piece.text)
                if piece.decision is None:
                    if piece.text:
                        yield ChatResponse(
                            message=ChatMessage(role=MessageRole.ASSISTANT, content="".join(parts)), delta=piece.text
                        )
                    continue
                response = self._chat_response(_result_of(parts, piece), [])
                response.delta = piece.text
                yield response

        return gen()

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        """Async :meth:`stream_chat`: iterates the pipeline's stream on its loop (no worker thread)."""
        delegated = self._delegated(kwargs)
        if delegated is not None:
            assert self.large_llm is not None  # noqa: S101
            return await self.large_llm.astream_chat(messages, **delegated)
        request, tools = self._chat_request(messages, kwargs)

        async def gen() -> AsyncIterator[ChatResponse]:
            if tools:
                response = self._chat_response(await self.handle.agenerate(request, timeout_s=self.timeout), tools)
                response.delta = response.message.content
                yield response
                return
            parts: list[str] = []
            async for piece in self.handle.astream(request, timeout_s=self.timeout):
                if piece.text:
                    parts.append(piece.text)
                if piece.decision is None:
                    if piece.text:
                        yield ChatResponse(
                            message=ChatMessage(role=MessageRole.ASSISTANT, content="".join(parts)), delta=piece.text
                        )
                    continue
                response = self._chat_response(_result_of(parts, piece), [])
                response.delta = piece.text
                yield response

        return gen()

    # ------------------------------------------------------------------------------ complete

    @staticmethod
    def _completion(result: EchoResult, delta: str | None = None) -> CompletionResponse:
        return CompletionResponse(text=result.text, delta=delta, raw=_raw(result), additional_kwargs=_extras(result))

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """Answer a prompt, sent as one user turn."""
        request = self._completion_request(prompt, kwargs)
        return self._completion(self.handle.generate(request, timeout_s=self.timeout))

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """Async :meth:`complete`: awaits the pipeline (no worker thread)."""
        request = self._completion_request(prompt, kwargs)
        return self._completion(await self.handle.agenerate(request, timeout_s=self.timeout))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        """Stream the answer to a prompt; the last response carries the decision."""
        request = self._completion_request(prompt, kwargs)

        def gen() -> Iterator[CompletionResponse]:
            parts: list[str] = []
            for piece in self.handle.stream(request, timeout_s=self.timeout):
                if piece.text:
                    parts.append(piece.text)
                if piece.decision is not None:
                    yield self._completion(_result_of(parts, piece), piece.text)
                elif piece.text:
                    yield CompletionResponse(text="".join(parts), delta=piece.text)

        return gen()

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        """Async :meth:`stream_complete` (no worker thread)."""
        request = self._completion_request(prompt, kwargs)

        async def gen() -> AsyncIterator[CompletionResponse]:
            parts: list[str] = []
            async for piece in self.handle.astream(request, timeout_s=self.timeout):
                if piece.text:
                    parts.append(piece.text)
                if piece.decision is not None:
                    yield self._completion(_result_of(parts, piece), piece.text)
                elif piece.text:
                    yield CompletionResponse(text="".join(parts), delta=piece.text)

        return gen()

    # --------------------------------------------------------------------------------- tools

    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The chat kwargs of a tool call: the wrapped function-calling LLM's own, or ours for the local path."""
        large = self.large_llm
        if isinstance(large, FunctionCallingLLM):
            prepared = large._prepare_chat_with_tools_compat(
                tools,
                user_msg=user_msg,
                chat_history=chat_history,
                verbose=verbose,
                allow_parallel_tool_calls=allow_parallel_tool_calls,
                tool_required=tool_required,
                **kwargs,
            )
            return {**prepared, DELEGATE: True}
        messages = list(chat_history or [])
        if user_msg is not None:
            messages.append(
                ChatMessage(role=MessageRole.USER, content=user_msg) if isinstance(user_msg, str) else user_msg
            )
        return {
            "messages": messages,
            "tools": [tool.metadata.to_openai_tool(skip_length_check=True) for tool in tools],
            "tool_required": tool_required,
            **kwargs,
        }

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        """The tool calls in a response (read by the wrapped LLM when it made them)."""
        large = self.large_llm
        if isinstance(large, FunctionCallingLLM):
            return large.get_tool_calls_from_response(response, error_on_no_tool_call=error_on_no_tool_call, **kwargs)
        calls = response.message.additional_kwargs.get("tool_calls") or []
        if not calls and error_on_no_tool_call:
            raise ValueError(f"Expected at least one tool call, but got {len(calls)} tool calls.")
        return [ToolSelection(tool_id=c["id"], tool_name=c["name"], tool_kwargs=c["arguments"]) for c in calls]


# ----------------------------------------------------------------------------------- decisions


class DecisionLog(BaseEventHandler):
    """Collects the decisions of EchoLLM calls from LlamaIndex's instrumentation events.

    Query and chat engines return their own response objects, not the LLM's; this handler listens on the root
    dispatcher for LLM end events and keeps the decisions they carry, newest last.

    Example:
        .. code-block:: python

            decisions = DecisionLog.attach()
            engine.query("How do I back up the database?")
            print(decisions.last["offloaded"], decisions.last["reason"])
    """

    maxlen: int = Field(default=1000, ge=1, description="Decisions kept.")
    _items: collections.deque[dict[str, Any]] = PrivateAttr(default_factory=collections.deque)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @classmethod
    def class_name(cls) -> str:
        """LlamaIndex's name of this class."""
        return "EchoDecisionLog"

    @classmethod
    def attach(cls, maxlen: int = 1000) -> DecisionLog:
        """A new log, registered on the root dispatcher."""
        log = cls(maxlen=maxlen)
        get_dispatcher().add_event_handler(log)
        return log

    def detach(self) -> None:
        """Stop listening (removes this handler from the root dispatcher)."""
        dispatcher = get_dispatcher()
        dispatcher.event_handlers = [h for h in dispatcher.event_handlers if h is not self]

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        """Keep the decision of an LLM end event, if it has one."""
        if not isinstance(event, LLMChatEndEvent | LLMCompletionEndEvent) or event.response is None:
            return
        decision = event.response.additional_kwargs.get("decision")
        if isinstance(decision, dict):
            with self._lock:
                self._items.append(decision)
                while len(self._items) > self.maxlen:
                    self._items.popleft()

    @property
    def decisions(self) -> list[dict[str, Any]]:
        """The decisions seen, oldest first."""
        with self._lock:
            return list(self._items)

    @property
    def last(self) -> dict[str, Any] | None:
        """The newest decision, or None."""
        with self._lock:
            return self._items[-1] if self._items else None

    def clear(self) -> None:
        """Forget the decisions seen."""
        with self._lock:
            self._items.clear()


# ----------------------------------------------------------------------------------- embedding


class EchoEmbedding(BaseEmbedding):
    """The pipeline's local sentence embedder as a LlamaIndex embedding model (no network, no API key).

    Args:
        embedder: An :class:`~echo_middleware.embed.base.Embedder` to share (e.g. the pipeline's); default a
            :class:`~echo_middleware.embed.sentence.SentenceEmbedder` on ``config``, loaded on first use.
        config: The embedder's settings when ``embedder`` is not given (default: the bundled all-MiniLM-L6-v2).
    """

    embedder: Any = Field(default=None, exclude=True, description="An echo Embedder to share.")
    config: EmbedConfig | None = Field(default=None, description="Settings of the default embedder.")
    embed_batch_size: int = Field(default=64, gt=0, le=2048, description="Texts per embedding call.")

    @model_validator(mode="after")
    def _build_embedder(self) -> EchoEmbedding:
        if self.embedder is None:
            from echo_middleware.embed.sentence import SentenceEmbedder

            self.embedder = SentenceEmbedder(self.config or EmbedConfig())
        if not (hasattr(self.embedder, "embed") and hasattr(self.embedder, "aembed")):
            raise ValueError(f"embedder={type(self.embedder).__name__} is not an echo Embedder")
        if self.model_name in ("unknown", ""):
            self.model_name = str(getattr(self.embedder, "name", "echo-embedder"))
        return self

    @classmethod
    def class_name(cls) -> str:
        """LlamaIndex's name of this class."""
        return "EchoEmbedding"

    @property
    def _echo(self) -> Embedder:
        return self.embedder  # type: ignore[no-any-return]

    def _get_query_embedding(self, query: str) -> list[float]:
        return [float(x) for x in self._echo.embed([query])[0]]

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return [float(x) for x in (await self._echo.aembed([query]))[0]]

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._get_query_embedding(text)

    async def _aget_text_embedding(self, text: str) -> list[float]:
        return await self._aget_query_embedding(text)

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._echo.embed(texts).tolist()  # type: ignore[no-any-return]

    async def _aget_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return (await self._echo.aembed(texts)).tolist()  # type: ignore[no-any-return]


__all__ = ["DecisionLog", "EchoEmbedding", "EchoLLM", "LlamaIndexEngine", "to_echo_messages", "to_llama_messages"]
