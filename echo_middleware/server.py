"""An OpenAI-compatible HTTP front door over the same pipeline: ``echo-middleware serve``.

Any OpenAI client (or LangChain's ``ChatOpenAI``, LlamaIndex's ``OpenAILike``) can point its ``base_url`` here and
get in-context caching and offload routing without installing this package. Per-request options ride in the
``echo`` body field (``{"tenant": ..., "offload": "auto"|"never"|"always", "slo": {...}}``) or the
``X-Echo-Tenant`` header; every response carries the routing decision in ``echo_decision``.

Requests that ask for ``tools`` or a ``response_format`` are never offloaded (the small model cannot be judged
on them). A client that disconnects mid-stream cancels its request down to the engine.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from echo_middleware.errors import ConfigError, EchoError, EngineError, Overloaded
from echo_middleware.types import SLO, EchoRequest, Message, OffloadMode, SamplingParams

if TYPE_CHECKING:
    from fastapi import FastAPI

    from echo_middleware.pipeline import EchoPipeline

logger = logging.getLogger(__name__)


class EchoOptions(BaseModel):
    """The ``echo`` extension field of a chat completion request."""

    model_config = ConfigDict(extra="forbid")

    tenant: str | None = None
    offload: OffloadMode = "auto"
    slo: SLO | None = None


class ChatMessageIn(BaseModel):
    """An OpenAI chat message; content parts are joined as text."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def to_message(self) -> Message:
        """Our Message; ``developer`` is the newer name of ``system``."""
        if isinstance(self.content, list):
            text = "".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")
        else:
            text = self.content or ""
        role = "system" if self.role == "developer" else self.role
        return Message(role=role, content=text)


class ChatCompletionIn(BaseModel):
    """The subset of OpenAI's chat completion request that the pipeline honours (others are refused)."""

    model_config = ConfigDict(extra="ignore")

    model: str = "echo"
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is supported.")
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None
    echo: EchoOptions = Field(default_factory=EchoOptions)

    def to_request(self, tenant_header: str | None) -> EchoRequest:
        """The pipeline request this HTTP body asks for."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        params = SamplingParams(
            max_tokens=self.max_completion_tokens or self.max_tokens or 256,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=stop,
            seed=self.seed,
        )
        structured = self.response_format is not None and self.response_format.get("type") != "text"
        return EchoRequest(
            messages=[m.to_message() for m in self.messages],
            tenant=self.echo.tenant or tenant_header,
            slo=self.echo.slo,
            params=params,
            offload=self.echo.offload,
            requires_large=bool(self.tools) or structured,
        )


def _error(status: int, message: str, kind: str, param: str | None = None) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param}})


def create_app(pipeline: EchoPipeline, *, model_name: str = "echo") -> FastAPI:
    """A FastAPI app serving ``pipeline``; the app starts and closes the pipeline with its lifespan."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import StreamingResponse
    except ImportError as exc:
        raise ImportError("the HTTP server needs the `server` extra: pip install 'echo-middleware[server]'") from exc

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await pipeline.start()
        try:
            yield
        finally:
            await pipeline.close()

    app = FastAPI(title="echo-middleware", version="0.1.0", lifespan=lifespan)

    @app.get("/health")
    async def health() -> Any:
        checks = {
            "large": (await pipeline.large_engine.health()).model_dump(),
            "small": (await pipeline.small_engine.health()).model_dump(),
        }
        ok = all(c["ok"] for c in checks.values())
        return _error(503, json.dumps(checks), "unhealthy") if not ok else {"ok": True, "engines": checks}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "echo-middleware"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request) -> Any:
        try:
            body = ChatCompletionIn.model_validate(await http.json())
            request = body.to_request(http.headers.get("x-echo-tenant"))
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"])
            return _error(400, f"{param}: {first['msg']}", "invalid_request_error", param)
        except ValueError as exc:  # malformed JSON
            return _error(400, f"the body is not valid JSON: {exc}", "invalid_request_error")
        created = int(time.time())
        completion_id = f"chatcmpl-{request.request_id}"
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(
                _sse(pipeline, request, completion_id, created, model_name, include_usage),
                media_type="text/event-stream",
            )
        try:
            result = await pipeline.agenerate(request)
        except Exception as exc:
            return _failure(exc)
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "finish_reason": result.finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": result.usage.prompt_tokens,
                "completion_tokens": result.usage.completion_tokens,
                "total_tokens": result.usage.total_tokens,
            },
            "echo_decision": result.decision.model_dump(mode="json"),
        }

    return app


def _failure(exc: Exception) -> Any:
    if isinstance(exc, ConfigError):
        return _error(400, str(exc), "invalid_request_error")
    if isinstance(exc, Overloaded):
        return _error(429, str(exc), "overloaded")
    if isinstance(exc, EngineError | EchoError):
        logger.warning("request failed: %s", exc)
        return _error(503, str(exc), "engine_error")
    raise exc


async def _sse(
    pipeline: EchoPipeline,
    request: EchoRequest,
    completion_id: str,
    created: int,
    model_name: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format; the last chunk carries ``echo_decision``."""

    def chunk(delta: dict[str, Any], finish: str | None, **extra: Any) -> str:
        payload = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }
        return f"data: {json.dumps(payload)}\n\n"

    yield chunk({"role": "assistant", "content": ""}, None)
    try:
        async for part in pipeline.astream(request):
            if part.text:
                yield chunk({"content": part.text}, None)
            if part.finish_reason is not None:
                decision = part.decision.model_dump(mode="json") if part.decision else None
                yield chunk({}, part.finish_reason, echo_decision=decision)
                if include_usage and part.usage is not None:
                    usage = {
                        "prompt_tokens": part.usage.prompt_tokens,
                        "completion_tokens": part.usage.completion_tokens,
                        "total_tokens": part.usage.total_tokens,
                    }
                    payload = {
                        "id": completion_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model_name,
                        "choices": [],
                        "usage": usage,
                    }
                    yield f"data: {json.dumps(payload)}\n\n"
    except EchoError as exc:
        logger.warning("stream %s failed: %s", request.request_id, exc)
        yield f"data: {json.dumps({'error': {'message': str(exc), 'type': type(exc).__name__}})}\n\n"
    yield "data: [DONE]\n\n"


def serve(host: str = "127.0.0.1", port: int = 8080, **settings: Any) -> None:
    """Run the server with uvicorn until interrupted."""
    import uvicorn

    from echo_middleware.pipeline import EchoPipeline

    app = create_app(EchoPipeline.from_defaults(**settings))
    uvicorn.run(app, host=host, port=port, log_level="info")
