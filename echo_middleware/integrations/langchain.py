"""LangChain front door: a chat model (and a text LLM) that swap in for the one an application already uses.

Nothing else in a chain changes: ``prompt | EchoChatModel.from_defaults() | StrOutputParser()``. Each answer
carries the routing decision in ``response_metadata["decision"]`` (a :class:`~echo_middleware.types.Decision`
dumped to a dict) and token counts in ``usage_metadata``.

The large model can be any LangChain chat model the application already has: ``EchoChatModel(large=ChatOpenAI())``
wraps it in a :class:`LangChainEngine`, so the pipeline (router, scheduler, learning) only ever sees an
:class:`~echo_middleware.engines.base.Engine`.

Tools and structured output are never offloaded: with a wrapped LangChain large model, ``bind_tools`` and
``with_structured_output`` pass through to it (its own native tool calling); with local engines the request runs
on the large engine (``requires_large=True``) with the tools offered in the Hermes / Qwen2.5 ``<tool_call>`` text
format, which Qwen2.5 models are trained on.

Per-call options ride in the call kwargs (or ``.bind(...)``), or are set once on the model:
``tenant=``, ``slo=`` (an :class:`~echo_middleware.types.SLO` or a dict), ``offload=`` (``auto`` / ``never`` /
``always``), and the sampling values ``temperature``, ``max_tokens``, ``top_p``, ``seed``, ``stop``.

Setup:
    .. code-block:: bash

        pip install 'echo-middleware[langchain]'
        echo-middleware models fetch

Instantiate:
    .. code-block:: python

        from echo_middleware.integrations.langchain import EchoChatModel

        llm = EchoChatModel.from_defaults(max_tokens=128)  # embedded Chroma + local small and large models
        llm = EchoChatModel(large=ChatOpenAI(model="gpt-4o-mini"))  # or wrap the model you already use

Invoke:
    .. code-block:: python

        msg = llm.invoke("How do I reverse a list in Python?", tenant="team-a")
        print(msg.content, msg.response_metadata["decision"]["offloaded"])

Stream:
    .. code-block:: python

        for chunk in llm.stream("What does git stash do?"):
            print(chunk.content, end="")

Async:
    .. code-block:: python

        msg = await llm.ainvoke("What does git stash do?", offload="never")
        async for chunk in llm.astream("And git stash pop?"):
            ...
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Self

try:
    from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
    from langchain_core.language_models import BaseChatModel, BaseLLM, LangSmithParams
    from langchain_core.messages import (
        AIMessage,
        AIMessageChunk,
        BaseMessage,
        ChatMessage,
        HumanMessage,
        SystemMessage,
        ToolMessage,
    )
    from langchain_core.outputs import (
        ChatGeneration,
        ChatGenerationChunk,
        ChatResult,
        Generation,
        GenerationChunk,
        LLMResult,
    )
    from langchain_core.runnables import Runnable
    from langchain_core.utils.function_calling import convert_to_openai_tool
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "echo_middleware.integrations.langchain needs langchain-core: pip install 'echo-middleware[langchain]'"
    ) from exc
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from echo_middleware.config import build_settings
from echo_middleware.errors import ConfigError
from echo_middleware.integrations._common import (
    CallOptions,
    Piece,
    PipelineHandle,
    ToolCall,
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
    Decision,
    EchoChunk,
    EchoResult,
    EngineRequest,
    FeatureStatus,
    Message,
    OffloadMode,
    Usage,
    new_request_id,
)

if TYPE_CHECKING:
    from echo_middleware.pipeline import EchoPipeline

logger = logging.getLogger(__name__)

PROVIDER = "echo"
TOOL_KWARGS = ("tools", "tool_choice", "tool_kwargs")
SAMPLING_FIELDS: dict[str, tuple[str, ...]] = {
    "temperature": ("temperature",),
    "max_tokens": ("max_tokens", "max_completion_tokens", "max_output_tokens", "num_predict"),
    "top_p": ("top_p",),
    "seed": ("seed",),
}
"""Our sampling field -> the field names LangChain chat models use for it (first match wins)."""


# ------------------------------------------------------------------------------ message mapping


CALL_BLOCKS = frozenset({"tool_use", "tool_call", "tool_call_chunk", "function_call", "reasoning", "thinking"})
"""Content blocks of an AI message that are not sent as text: calls are in ``tool_calls``; reasoning is dropped."""


def _text_of(message: BaseMessage, index: int) -> str:
    """The text of a message; non-text content blocks are refused (local models read text only)."""
    if isinstance(message.content, list):
        kinds = {block.get("type") for block in message.content if isinstance(block, dict)} - {"text", None}
        if isinstance(message, AIMessage):
            kinds -= CALL_BLOCKS
        if kinds:
            raise ConfigError(
                f"message {index} has {sorted(kinds)} content: the pipeline passes text only. Send text, or call "
                "the wrapped large model directly for multimodal input."
            )
    return message.text


def to_echo_messages(messages: Sequence[BaseMessage]) -> list[Message]:
    """LangChain messages as pipeline messages.

    Tool calls in history are written in the ``<tool_call>`` text format and tool results as ``<tool_response>``
    user turns (what Qwen2.5's chat template renders for them), so any engine reads the same conversation.
    """
    out: list[Message] = []
    for i, message in enumerate(messages):
        text = _text_of(message, i)
        if isinstance(message, SystemMessage):
            out.append(Message(role="system", content=text))
        elif isinstance(message, HumanMessage):
            out.append(Message(role="user", content=text))
        elif isinstance(message, AIMessage):
            calls = "\n".join(render_tool_call(c["name"], c["args"]) for c in message.tool_calls)
            out.append(Message(role="assistant", content="\n".join(p for p in (text, calls) if p)))
        elif isinstance(message, ToolMessage):
            out.append(Message(role="user", content=render_tool_result(text)))
        elif isinstance(message, ChatMessage):
            role = {"human": "user", "ai": "assistant", "developer": "system"}.get(message.role, message.role)
            if role not in ("system", "user", "assistant"):
                raise ConfigError(f"message {i} has role {message.role!r}: use system, user or assistant")
            out.append(Message(role=role, content=text))  # type: ignore[arg-type]
        else:
            raise ConfigError(f"message {i} is a {type(message).__name__}, which the pipeline cannot send")
    if not out:
        raise ConfigError("no messages to answer: pass at least one message")
    return out


def to_langchain_messages(request: EngineRequest) -> list[BaseMessage]:
    """An engine request as LangChain messages (what a wrapped chat model is called with)."""
    if request.messages is None:
        return [HumanMessage(content=request.prompt or "")]
    kinds: dict[str, type[BaseMessage]] = {
        "system": SystemMessage,
        "user": HumanMessage,
        "assistant": AIMessage,
        "tool": HumanMessage,
    }
    return [
        kinds[m.role](content=render_tool_result(m.content) if m.role == "tool" else m.content)
        for m in request.messages
    ]


def _usage_metadata(usage: Usage) -> dict[str, int]:
    return {
        "input_tokens": usage.prompt_tokens,
        "output_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def _response_metadata(decision: Decision, finish_reason: str, fallback_name: str) -> dict[str, Any]:
    return {
        "model_name": decision.model or fallback_name,
        "finish_reason": finish_reason,
        "decision": decision.model_dump(mode="json"),
    }


def _model_name(model: BaseChatModel) -> str:
    for attr in ("model_name", "model", "model_id", "deployment_name"):
        value = getattr(model, attr, None)
        if isinstance(value, str) and value:
            return value
    return model._llm_type


# ------------------------------------------------------------------------------------- engine


class LangChainEngine(WrappedModelEngine):
    """Any LangChain chat model as an :class:`Engine`: what lets a user's own model be the large model.

    It streams through the model's ``astream`` (a model without native streaming yields its whole answer as one
    chunk, and ``features["streaming"]`` says so). Sampling values the caller set explicitly override the wrapped
    model's own fields when it has them (``temperature``, ``max_tokens``...); everything else keeps the user's
    configuration. Stop strings go as LangChain's standard ``stop`` argument and are also enforced here.
    ``cancel`` cancels the task driving the model's stream (for API models that closes the HTTP response).

    Args:
        model: The LangChain chat model.
        name: The engine's name in decisions and logs (default ``langchain:<model name>``).
        max_concurrency: Requests the scheduler sends at once.
        timeout_s: Seconds one generation may take (None: no limit beyond the request's deadline).
        context_window: Prompt plus answer tokens; default the model profile's ``max_input_tokens``, else 8192.
    """

    kind = "langchain"

    def __init__(
        self,
        model: BaseChatModel,
        *,
        name: str | None = None,
        max_concurrency: int = 8,
        timeout_s: float | None = None,
        context_window: int | None = None,
    ) -> None:
        if not isinstance(model, BaseChatModel):
            raise ConfigError(f"LangChainEngine wraps a LangChain chat model; got {type(model).__name__}")
        model_name = _model_name(model)
        super().__init__(
            name or f"langchain:{model_name}",
            model_name,
            max_concurrency=max_concurrency,
            timeout_s=timeout_s,
            context_window=context_window,
        )
        self.chat_model = model

    async def _start(self) -> None:
        cls = type(self.chat_model)
        native = cls._astream is not BaseChatModel._astream or cls._stream is not BaseChatModel._stream
        detail = "" if native else "the model has no native streaming: its answer arrives as one chunk"
        self._features["streaming"] = FeatureStatus(requested=True, enabled=native, detail=detail)

    @property
    def context_window(self) -> int:
        """The window given, else the model's profile ``max_input_tokens``, else 8192."""
        if self._window:
            return self._window
        profile = getattr(self.chat_model, "profile", None) or {}
        window = profile.get("max_input_tokens") if isinstance(profile, Mapping) else None
        return int(window) if isinstance(window, int) and window > 0 else 8192

    async def _pieces(self, request: EngineRequest) -> AsyncIterator[Piece]:
        model = configured_copy(self.chat_model, request.params, SAMPLING_FIELDS)
        stop = list(request.params.stop) or None
        prompt = completion = 0
        reported = False
        async for chunk in model.astream(to_langchain_messages(request), stop=stop):
            piece = Piece(text=chunk.text)
            if chunk.usage_metadata:  # chunks' usage adds up, as AIMessageChunk.__add__ does
                reported = True
                prompt += chunk.usage_metadata.get("input_tokens", 0)
                completion += chunk.usage_metadata.get("output_tokens", 0)
                piece.prompt_tokens, piece.completion_tokens = prompt, completion
            meta = chunk.response_metadata or {}
            reason = meta.get("finish_reason") or meta.get("stop_reason") or meta.get("done_reason")
            if reason:
                piece.finish_reason = "length" if reason in ("length", "max_tokens") else "stop"
            yield piece
        if not reported:
            logger.debug("%s reported no usage; the engine estimates it", self.name)

    async def count_tokens(self, text: str) -> int:
        """Tokens by the model's own counter when it has one, else four characters per token."""
        try:
            return int(await asyncio.to_thread(self.chat_model.get_num_tokens, text))
        except Exception:  # models without a tokenizer raise various errors; the estimate is the fallback
            return max(1, len(text) // 4)


# ------------------------------------------------------------------------------- shared fields


class _EchoFields(BaseModel):
    """The fields and plumbing EchoChatModel and EchoLLM share."""

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True, protected_namespaces=())

    model_name: str = Field(default="echo", alias="model", description="The name reported in traces (ls_model_name).")
    pipeline: Any = Field(default=None, exclude=True, description="An EchoPipeline to share between models.")
    settings: Any = Field(default=None, exclude=True, description="EchoSettings (or a dict) for an own pipeline.")
    large: Any = Field(
        default=None, exclude=True, description="The large model: any LangChain chat model or an echo Engine."
    )
    small: Any = Field(default=None, exclude=True, description="The small model: an echo Engine.")
    temperature: float | None = Field(default=None, ge=0, le=2, description="None: the pipeline's default (0).")
    max_tokens: int | None = Field(default=None, ge=1, description="Most new tokens; None: the pipeline default.")
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0)
    stop: list[str] | None = Field(default=None, alias="stop_sequences", description="Strings that end an answer.")
    timeout: float | None = Field(default=None, gt=0, description="Seconds one call may take (cancelled after).")
    max_retries: int = Field(
        default=0, ge=0, le=10, description="Accepted for compatibility; the pipeline retries and falls back."
    )
    streaming: bool = Field(default=False, description="Stream internally even for invoke (callbacks see tokens).")
    tenant: str | None = Field(default=None, description="Whose examples to use and feed; None: the default.")
    slo: SLO | None = Field(default=None, description="Latency objective and priority class.")
    offload: OffloadMode = Field(default="auto", description="auto: the router decides; never / always: forced.")

    _handle: PipelineHandle | None = PrivateAttr(default=None)
    _handle_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @model_validator(mode="after")
    def _check_echo_fields(self) -> _EchoFields:
        self.settings = check_pipeline_fields(
            pipeline=self.pipeline,
            settings=self.settings,
            large=self.large,
            small=self.small,
            large_types=(BaseChatModel,),
            framework="LangChain chat model",
            example="ChatOpenAI(...)",
        )
        return self

    def _attach_handle(self) -> None:
        """Create the (cheap, unstarted) pipeline handle now, so copies of this model share one pipeline."""
        large = LangChainEngine(self.large) if isinstance(self.large, BaseChatModel) else self.large
        self._handle = PipelineHandle(self.pipeline, settings=self.settings, large=large, small=self.small)

    @property
    def handle(self) -> PipelineHandle:
        """The pipeline behind this model (built on first use; nothing loads until the first call).

        Copies (``model_copy``, ``bind``, ``with_config``) share it, so per-tenant variants of one model
        (``llm.bind(tenant="a")``) use one set of engines.
        """
        with self._handle_lock:
            if self._handle is None:
                self._attach_handle()
            assert self._handle is not None  # noqa: S101 - set just above
            return self._handle

    @property
    def echo_pipeline(self) -> EchoPipeline:
        """The :class:`~echo_middleware.pipeline.EchoPipeline` this model drives."""
        return self.handle.pipeline

    @property
    def large_chat_model(self) -> BaseChatModel | None:
        """The wrapped LangChain large model, when there is one (tools and structured output go to it)."""
        return self.large if isinstance(self.large, BaseChatModel) else None

    def _call_defaults(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "slo": self.slo,
            "offload": self.offload,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": self.stop,
        }

    def _options(
        self, stop: list[str] | None, kwargs: dict[str, Any], allowed: Sequence[str] = ()
    ) -> tuple[CallOptions, dict[str, Any]]:
        return merge_call_options(
            self._call_defaults(), kwargs, stop=stop, owner=type(self).__name__, allowed_extra=allowed
        )

    def _ls_params(self, model_type: str, stop: list[str] | None, kwargs: Mapping[str, Any]) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider=PROVIDER,
            ls_model_name=kwargs["model"] if isinstance(kwargs.get("model"), str) else self.model_name,
            ls_model_type=model_type,  # type: ignore[typeddict-item]
        )
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = temperature
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        stops = stop or kwargs.get("stop") or self.stop
        if stops:
            params["ls_stop"] = list(stops)
        return params

    @classmethod
    def _from_overrides(cls, overrides: dict[str, Any]) -> Self:
        """``from_defaults``: kwargs split into this model's fields and settings overrides (built into settings)."""
        names = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
        own, settings = split_overrides(overrides, names)
        if settings:
            own["settings"] = build_settings(**settings)
        return cls(**own)

    def _base_identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            **{k: v for k, v in self._call_defaults().items() if v is not None and k != "slo"},
        }

    def close(self) -> None:
        """Close the pipeline this model built (engines, store); a shared ``pipeline=`` is left open."""
        if self._handle is not None:
            self._handle.close()

    async def aclose(self) -> None:
        """Async :meth:`close`."""
        if self._handle is not None:
            await self._handle.aclose()


# --------------------------------------------------------------------------------- chat model


class EchoChatModel(_EchoFields, BaseChatModel):
    """A LangChain chat model backed by the echo-middleware pipeline; see the module docstring for usage.

    Args (all optional):
        pipeline: A started or unstarted EchoPipeline to share (e.g. between a chat model and an LLM).
        settings: EchoSettings (or a dict of overrides) for the pipeline this model builds on first use.
        large: The large model: any LangChain chat model (wrapped in :class:`LangChainEngine`) or an Engine.
        small: The small model's Engine (default: the bundled small model from settings).
        tenant, slo, offload: Defaults for every call; call kwargs override them.
        temperature, max_tokens, top_p, seed, stop: Sampling defaults; call kwargs override them.
        timeout: Seconds a call may take before it is cancelled (down to the engine) with EngineTimeout.
    """

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True, extra="forbid")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._attach_handle()

    @classmethod
    def from_defaults(cls, **overrides: Any) -> EchoChatModel:
        """A model on the bundled defaults (embedded Chroma, local small and large models).

        Keyword arguments that name fields of this class set them (``max_tokens=128``, ``tenant="a"``,
        ``large=ChatOpenAI()``); the others are settings overrides (``store={"path": "..."}``), validated now;
        ``large`` / ``small`` given as dicts are settings sections (``small={"model": "..."}``).
        ``ECHO_*`` environment variables apply as usual.
        """
        return cls._from_overrides(overrides)

    @property
    def _llm_type(self) -> str:
        return "echo-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        large = None if self.large is None else getattr(self.large, "name", type(self.large).__name__)
        return {**self._base_identifying_params(), "large": large}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return self._ls_params("chat", stop, kwargs)

    # ------------------------------------------------------------------------ tools / structure

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Any],
        *,
        tool_choice: str | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[Any, AIMessage]:
        """Bind tools; tool calls always go to the large model (never offloaded).

        With a wrapped LangChain large model its own ``bind_tools`` is used at call time (native tool calling,
        extra kwargs such as ``parallel_tool_calls`` passed on); with local engines the tools are offered in the
        ``<tool_call>`` text format and the answer is parsed into ``AIMessage.tool_calls``.
        """
        formatted = [convert_to_openai_tool(tool) for tool in tools]
        if tool_choice is True:
            tool_choice = "any"
        elif tool_choice is False:
            tool_choice = None
        tracing = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("ls_")}
        return self.bind(tools=formatted, tool_choice=tool_choice, tool_kwargs=kwargs, **tracing)

    def with_structured_output(  # type: ignore[override]
        self, schema: dict[str, Any] | type, *, include_raw: bool = False, **kwargs: Any
    ) -> Runnable[Any, dict[str, Any] | BaseModel]:
        """Structured output; passed through to the wrapped LangChain large model when there is one.

        Without one it uses tool calling on the large engine (``method`` and ``strict`` are accepted; the local
        path always uses the tool-call format and validates the result with the schema's parser).
        """
        if self.large_chat_model is not None:
            return self.large_chat_model.with_structured_output(schema, include_raw=include_raw, **kwargs)
        return super().with_structured_output(schema, include_raw=include_raw, **kwargs)

    # --------------------------------------------------------------------------------- generate

    def _prepare(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[CallOptions, dict[str, Any], list[Message] | None]:
        """Options and tool kwargs of a call; the pipeline messages unless tools go to a wrapped model."""
        options, tooling = self._options(stop, kwargs, allowed=TOOL_KWARGS)
        tools = tooling.get("tools") or []
        if tooling.get("tool_choice") == "none":
            tools = []
        tooling["tools"] = tools
        if tools and self.large_chat_model is not None:
            return options, tooling, None
        echo_messages = to_echo_messages(messages)
        if tools:
            prompt = tools_system_prompt(tools, tooling.get("tool_choice"))
            echo_messages = with_tools_prompt(echo_messages, prompt)
            options.requires_large = True
            options.metadata["tools"] = [t["function"]["name"] for t in tools]
        return options, tooling, echo_messages

    def _delegate(self, tooling: dict[str, Any]) -> Runnable[Any, Any]:
        large = self.large_chat_model
        assert large is not None  # noqa: S101 - _prepare only delegates when there is one
        return large.bind_tools(
            tooling["tools"], tool_choice=tooling.get("tool_choice"), **tooling.get("tool_kwargs", {})
        )

    def _delegated_decision(self) -> Decision:
        large = self.large_chat_model
        name = _model_name(large) if large is not None else ""
        return Decision(
            request_id=new_request_id(),
            offloaded=False,
            reason="tools bound: delegated to the wrapped large model (tool calls are never offloaded)",
            mode="never",
            engine=f"langchain:{name}",
            model=name,
        )

    def _message(self, result: EchoResult, tooling: Mapping[str, Any]) -> AIMessage:
        text, calls = result.text, []
        if tooling.get("tools"):
            text, calls = parse_tool_calls(result.text, [t["function"]["name"] for t in tooling["tools"]])
            calls = coerce_arguments(calls, tooling["tools"])
        return AIMessage(
            content=text,
            tool_calls=[_lc_tool_call(c) for c in calls],
            usage_metadata=_usage_metadata(result.usage),  # type: ignore[arg-type]
            response_metadata=_response_metadata(result.decision, result.finish_reason, self.model_name),
            id=f"echo-{result.request_id}",
        )

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        options, tooling, echo_messages = self._prepare(messages, stop, kwargs)
        if echo_messages is None:
            reply = self._delegate(tooling).invoke(messages, stop=stop)
            return _delegated_result(reply, self._delegated_decision())
        result = self.handle.generate(options.request(echo_messages), timeout_s=self.timeout)
        return ChatResult(generations=[ChatGeneration(message=self._message(result, tooling))])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        options, tooling, echo_messages = self._prepare(messages, stop, kwargs)
        if echo_messages is None:
            reply = await self._delegate(tooling).ainvoke(messages, stop=stop)
            return _delegated_result(reply, self._delegated_decision())
        result = await self.handle.agenerate(options.request(echo_messages), timeout_s=self.timeout)
        return ChatResult(generations=[ChatGeneration(message=self._message(result, tooling))])

    # ----------------------------------------------------------------------------------- stream

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        options, tooling, echo_messages = self._prepare(messages, stop, kwargs)
        if echo_messages is None:
            for piece in self._delegate(tooling).stream(messages, stop=stop):
                chunk = ChatGenerationChunk(message=_strip_last(piece))
                if run_manager:
                    run_manager.on_llm_new_token(piece.text, chunk=chunk)
                yield chunk
            yield _decision_chunk(self._delegated_decision(), None, "stop", self.model_name)
            return
        if tooling.get("tools"):  # the text must be parsed whole before tool calls can be returned
            result = self.handle.generate(options.request(echo_messages), timeout_s=self.timeout)
            yield _whole_chunk(self._message(result, tooling), run_manager)
            return
        for piece in self.handle.stream(options.request(echo_messages), timeout_s=self.timeout):
            chunk = _chunk_of(piece, self.model_name)
            if chunk is None:
                continue
            if run_manager and piece.text:
                run_manager.on_llm_new_token(piece.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        options, tooling, echo_messages = self._prepare(messages, stop, kwargs)
        if echo_messages is None:
            async for piece in self._delegate(tooling).astream(messages, stop=stop):
                chunk = ChatGenerationChunk(message=_strip_last(piece))
                if run_manager:
                    await run_manager.on_llm_new_token(piece.text, chunk=chunk)
                yield chunk
            yield _decision_chunk(self._delegated_decision(), None, "stop", self.model_name)
            return
        if tooling.get("tools"):
            result = await self.handle.agenerate(options.request(echo_messages), timeout_s=self.timeout)
            chunk = _whole_chunk(self._message(result, tooling), None)
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk
            return
        async for piece in self.handle.astream(options.request(echo_messages), timeout_s=self.timeout):
            chunk = _chunk_of(piece, self.model_name)
            if chunk is None:
                continue
            if run_manager and piece.text:
                await run_manager.on_llm_new_token(piece.text, chunk=chunk)
            yield chunk


def _lc_tool_call(call: ToolCall) -> dict[str, Any]:
    return {"name": call.name, "args": call.arguments, "id": call.id, "type": "tool_call"}


def _delegated_result(reply: Any, decision: Decision) -> ChatResult:
    if not isinstance(reply, AIMessage):
        raise ConfigError(f"the wrapped large model returned {type(reply).__name__}, not an AIMessage")
    metadata = {**reply.response_metadata, "decision": decision.model_dump(mode="json")}
    return ChatResult(generations=[ChatGeneration(message=reply.model_copy(update={"response_metadata": metadata}))])


def _strip_last(piece: AIMessageChunk) -> AIMessageChunk:
    """A delegated chunk without ``chunk_position='last'``: our decision chunk closes the stream."""
    return piece.model_copy(update={"chunk_position": None}) if piece.chunk_position == "last" else piece


def _decision_chunk(
    decision: Decision, usage: Usage | None, finish_reason: str, fallback_name: str
) -> ChatGenerationChunk:
    return ChatGenerationChunk(
        message=AIMessageChunk(
            content="",
            usage_metadata=None if usage is None else _usage_metadata(usage),  # type: ignore[arg-type]
            response_metadata=_response_metadata(decision, finish_reason, fallback_name),
            chunk_position="last",
        )
    )


def _chunk_of(piece: EchoChunk, fallback_name: str) -> ChatGenerationChunk | None:
    """A pipeline chunk as a LangChain chunk; the last one carries usage, finish reason and the decision."""
    if piece.decision is None:
        if not piece.text:
            return None
        return ChatGenerationChunk(message=AIMessageChunk(content=piece.text, id=f"echo-{piece.request_id}"))
    chunk = _decision_chunk(piece.decision, piece.usage or Usage(), piece.finish_reason or "stop", fallback_name)
    chunk.message.content = piece.text
    chunk.message.id = f"echo-{piece.request_id}"
    return chunk


def _whole_chunk(message: AIMessage, run_manager: CallbackManagerForLLMRun | None) -> ChatGenerationChunk:
    chunk = ChatGenerationChunk(
        message=AIMessageChunk(
            content=message.content,
            tool_call_chunks=[
                {"name": c["name"], "args": _json(c["args"]), "id": c["id"], "index": i, "type": "tool_call_chunk"}
                for i, c in enumerate(message.tool_calls)
            ],
            usage_metadata=message.usage_metadata,
            response_metadata=message.response_metadata,
            id=message.id,
            chunk_position="last",
        )
    )
    if run_manager:
        run_manager.on_llm_new_token(chunk.text, chunk=chunk)
    return chunk


def _json(value: Any) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)


# ------------------------------------------------------------------------------------ text LLM


class EchoLLM(_EchoFields, BaseLLM):
    """A LangChain text-completion LLM backed by the pipeline (for chains built on ``BaseLLM``).

    Each prompt is sent as one user turn (the bundled models are instruction-tuned chat models). Decisions are in
    ``generation_info["decision"]`` of each generation; a batch of prompts goes to the pipeline concurrently, so
    the scheduler orders them together.
    """

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True, extra="forbid")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._attach_handle()

    @classmethod
    def from_defaults(cls, **overrides: Any) -> EchoLLM:
        """A model on the bundled defaults; kwargs as in :meth:`EchoChatModel.from_defaults`."""
        return cls._from_overrides(overrides)

    @property
    def _llm_type(self) -> str:
        return "echo-llm"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self._base_identifying_params()

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return self._ls_params("llm", stop, kwargs)

    def _requests(self, prompts: list[str], stop: list[str] | None, kwargs: dict[str, Any]) -> list[Any]:
        options, _ = self._options(stop, kwargs)
        return [options.request([Message(role="user", content=p)]) for p in prompts]

    def _result(self, results: Sequence[EchoResult]) -> LLMResult:
        prompt = sum(r.usage.prompt_tokens for r in results)
        completion = sum(r.usage.completion_tokens for r in results)
        return LLMResult(
            generations=[[_text_generation(r)] for r in results],
            llm_output={
                "model_name": self.model_name,
                "token_usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                },
            },
        )

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        requests = self._requests(prompts, stop, kwargs)
        if self.streaming:
            results = [_collect(self.handle.stream(r, timeout_s=self.timeout), run_manager) for r in requests]
            return self._result(results)
        return self._result(self.handle.batch(requests, timeout_s=self.timeout))

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        requests = self._requests(prompts, stop, kwargs)
        if self.streaming:
            results = [await _acollect(self.handle.astream(r, timeout_s=self.timeout), run_manager) for r in requests]
            return self._result(results)
        return self._result(await self.handle.abatch(requests, timeout_s=self.timeout))

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        (request,) = self._requests([prompt], stop, kwargs)
        for piece in self.handle.stream(request, timeout_s=self.timeout):
            chunk = _text_chunk(piece)
            if chunk is None:
                continue
            if run_manager and piece.text:
                run_manager.on_llm_new_token(piece.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        (request,) = self._requests([prompt], stop, kwargs)
        async for piece in self.handle.astream(request, timeout_s=self.timeout):
            chunk = _text_chunk(piece)
            if chunk is None:
                continue
            if run_manager and piece.text:
                await run_manager.on_llm_new_token(piece.text, chunk=chunk)
            yield chunk


def _generation_info(decision: Decision, usage: Usage, finish_reason: str) -> dict[str, Any]:
    return {
        "finish_reason": finish_reason,
        "usage": {**_usage_metadata(usage)},
        "decision": decision.model_dump(mode="json"),
    }


def _text_generation(result: EchoResult) -> Generation:
    return Generation(
        text=result.text, generation_info=_generation_info(result.decision, result.usage, result.finish_reason)
    )


def _text_chunk(piece: EchoChunk) -> GenerationChunk | None:
    if piece.decision is None:
        return GenerationChunk(text=piece.text) if piece.text else None
    info = _generation_info(piece.decision, piece.usage or Usage(), piece.finish_reason or "stop")
    return GenerationChunk(text=piece.text, generation_info=info)


def _result_of(request_id: str, parts: list[str], last: EchoChunk | None) -> EchoResult:
    if last is None or last.decision is None:
        raise ConfigError(f"the pipeline's stream for {request_id} ended without its decision chunk")
    return EchoResult(
        request_id=request_id,
        text="".join(parts),
        finish_reason=last.finish_reason or "stop",
        usage=last.usage or Usage(),
        decision=last.decision,
    )


def _collect(stream: Iterator[EchoChunk], run_manager: CallbackManagerForLLMRun | None) -> EchoResult:
    parts: list[str] = []
    last: EchoChunk | None = None
    for piece in stream:
        if piece.text:
            parts.append(piece.text)
            if run_manager:
                run_manager.on_llm_new_token(piece.text)
        last = piece
    return _result_of(last.request_id if last else "?", parts, last)


async def _acollect(stream: AsyncIterator[EchoChunk], run_manager: AsyncCallbackManagerForLLMRun | None) -> EchoResult:
    parts: list[str] = []
    last: EchoChunk | None = None
    async for piece in stream:
        if piece.text:
            parts.append(piece.text)
            if run_manager:
                await run_manager.on_llm_new_token(piece.text)
        last = piece
    return _result_of(last.request_id if last else "?", parts, last)


__all__ = ["EchoChatModel", "EchoLLM", "LangChainEngine", "to_echo_messages", "to_langchain_messages"]
