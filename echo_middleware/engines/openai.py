"""A remote engine: a ``vllm serve`` (or any OpenAI-compatible server) driven through its HTTP API.

This is how echo-middleware scales past one machine: vLLM servers (tensor / pipeline parallel, many replicas
behind a load balancer) answer ``/v1/chat/completions`` and ``/v1/completions``; this engine streams from them
with ``httpx`` directly (no SDK, so timeouts, retries and cancellation are ours to get right):

- **Timeouts**: ``connect_timeout_s`` to connect, ``timeout_s`` between bytes of a response and for a whole
  generation (the base class enforces the latter and deadlines).
- **Retries** (tenacity, exponential backoff with jitter, ``Retry-After`` honoured): only connect errors and
  429 / 502 / 503 / 504, and only before the first token arrived, so no answer is ever generated twice into one
  stream. Any other 4xx becomes :class:`~echo_middleware.errors.EngineError` carrying the server's message.
- **Cancellation** closes the HTTP stream; vLLM aborts a request whose client disconnected, freeing its KV cache.
- **Priority**: vLLM's extra ``priority`` field (lower first) is sent when the server is vLLM and
  ``scheduling_policy="priority"`` (the server must run ``--scheduling-policy priority``; other servers never get
  the field, the OpenAI API has none).
- **Usage** comes from ``stream_options: {"include_usage": true}``.

What the server was started with is learnt where the API shows it: ``GET /v1/models`` gives ``max_model_len``
(the context window) and ``owned_by`` (``vllm``); a vLLM server's ``/metrics`` shows its KV cache dtype, prefix
caching and whether it speculates. What cannot be learnt is reported as unknown in :attr:`Engine.features`
(flags like ``--speculative-config`` and ``--kv-cache-dtype`` are set on the server, not by this engine).

Example:
    .. code-block:: python

        from echo_middleware.config import EngineConfig
        from echo_middleware.engines.openai import OpenAIEngine
        from echo_middleware.types import EngineRequest, Message

        engine = OpenAIEngine(
            EngineConfig(backend="openai", model="qwen2.5-coder-1.5b-instruct", base_url="http://127.0.0.1:8000/v1")
        )
        async with engine:
            answer = await engine.generate(EngineRequest(messages=[Message(role="user", content="Hi!")]))
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_exponential_jitter

from echo_middleware.config import EngineConfig
from echo_middleware.engines.base import Engine
from echo_middleware.errors import Cancelled, ConfigError, EngineError, EngineTimeout, EngineUnavailable
from echo_middleware.types import EngineRequest, FeatureStatus, FinishReason, StreamDelta, Usage

logger = logging.getLogger(__name__)

TRANSIENT_STATUS = frozenset({429, 502, 503, 504})
"""HTTP statuses worth retrying: rate limited, or a gateway / server that is momentarily unavailable."""
MAX_RETRY_AFTER_S = 30.0
"""The longest ``Retry-After`` honoured; a server asking for more is reported as unavailable sooner."""
FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "abort": "cancelled",
    "tool_calls": "stop",
    "function_call": "stop",
    "content_filter": "stop",
}
_INFO_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class _Transient(Exception):
    """A failure worth retrying (before the first token): connect error or 429/502/503/504."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Call:
    """One request in flight: its abort signal and its open response."""

    aborted: asyncio.Event = field(default_factory=asyncio.Event)
    response: httpx.Response | None = None


@dataclass
class ServerInfo:
    """What the server told about itself at start."""

    models: list[str] = field(default_factory=list)
    owned_by: str = ""
    max_model_len: int | None = None
    version: str | None = None
    """vLLM's version from ``/version`` (None: not a vLLM server, or not shown)."""
    metrics: dict[str, Any] | None = None
    """From a vLLM server's ``/metrics``: ``cache_dtype``, ``enable_prefix_caching``, ``speculative`` (None: not
    available)."""

    @property
    def is_vllm(self) -> bool:
        """Whether the server is vLLM (its model cards say ``owned_by: vllm`` or it answers ``/version``)."""
        return self.owned_by == "vllm" or self.version is not None


def parse_metrics(text: str) -> dict[str, Any]:
    """Read the server's configuration out of vLLM's Prometheus ``/metrics`` text.

    ``vllm:cache_config_info`` carries the cache settings as labels; ``vllm:spec_decode_*`` series exist only
    when the server speculates.
    """
    found: dict[str, Any] = {"speculative": False}
    for line in text.splitlines():
        if line.startswith("vllm:spec_decode"):
            found["speculative"] = True
        if line.startswith("vllm:cache_config_info{"):
            match = _INFO_LINE.match(line)
            if match:
                labels = dict(_LABEL.findall(match.group("labels")))
                found["cache_dtype"] = labels.get("cache_dtype")
                if "enable_prefix_caching" in labels:
                    found["enable_prefix_caching"] = labels["enable_prefix_caching"] == "True"
    return found


def server_message(response: httpx.Response) -> str:
    """The error message in an OpenAI-style (``{"error": {"message"}}``) or vLLM-style body, else the text."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if body.get("message"):
            return str(body["message"])
        if body.get("detail"):
            return str(body["detail"])
    return json.dumps(body)[:500]


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


class OpenAIEngine(Engine):
    """An OpenAI-compatible server (a ``vllm serve`` above all) as an engine.

    Args:
        config: ``base_url`` (the server's ``/v1`` address), ``model`` (the served model name), ``api_key``,
            ``connect_timeout_s``, ``timeout_s``, ``max_retries``, ``scheduling_policy``.
        name: The engine's name in logs and decisions (default ``openai:<model>``).
        transport: An httpx transport to use instead of the network's (a proxy, a unix socket, a test double).

    Construction connects to nothing; :meth:`start` checks the server answers and learns what it serves.
    """

    kind = "openai"

    def __init__(
        self,
        config: EngineConfig,
        *,
        name: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not config.base_url:
            raise ConfigError(
                "base_url is required for the openai engine: set it to the server's /v1 address, "
                "e.g. 'http://127.0.0.1:8000/v1'"
            )
        super().__init__(name or f"openai:{config.model}", config.model, max_concurrency=config.max_num_seqs)
        self.config = config
        self.base_url = config.base_url.rstrip("/")
        self.root_url = self.base_url.removesuffix("/v1")
        """The server's root (vLLM's /health, /metrics, /tokenize and /version live there)."""
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._calls: dict[str, _Call] = {}
        self._sleep = asyncio.sleep
        """How backoff waits (replaced in unit tests to record the waits instead)."""
        self.server = ServerInfo()

    # -------------------------------------------------------------------------------- lifecycle

    def _make_client(self) -> httpx.AsyncClient:
        cfg = self.config
        headers = {"Accept": "application/json"}
        if cfg.api_key is not None:
            headers["Authorization"] = f"Bearer {cfg.api_key.get_secret_value()}"
        return httpx.AsyncClient(
            timeout=httpx.Timeout(cfg.timeout_s, connect=cfg.connect_timeout_s, pool=cfg.connect_timeout_s),
            headers=headers,
            transport=self._transport,
            limits=httpx.Limits(max_connections=max(cfg.max_num_seqs * 2, 16), max_keepalive_connections=16),
        )

    def _probe_timeout(self) -> httpx.Timeout:
        """Short timeouts for start and health checks: a server that does not answer these is not usable."""
        connect = self.config.connect_timeout_s
        return httpx.Timeout(max(connect * 2, 10.0), connect=connect)

    async def _start(self) -> None:
        self._client = self._make_client()
        try:
            response = await self._with_retries(
                lambda: self._get(f"{self.base_url}/models"), what=f"GET {self.base_url}/models"
            )
        except BaseException:
            await self._client.aclose()
            self._client = None
            raise
        try:
            await self._learn(response)
        except BaseException:
            await self._client.aclose()
            self._client = None
            raise
        logger.info(
            "%s: %s serves %s (%s, context %s); features: %s",
            self.name,
            self.base_url,
            self.model,
            f"vLLM {self.server.version}" if self.server.version else self.server.owned_by or "OpenAI-compatible",
            self.context_window,
            ", ".join(f"{k}={'on' if v.enabled else 'off'}" for k, v in self._features.items()),
        )

    async def _get(self, url: str) -> httpx.Response:
        """A short GET; transient failures raise _Transient, others EngineError."""
        assert self._client is not None  # noqa: S101
        try:
            response = await self._client.get(url, timeout=self._probe_timeout())
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as exc:
            raise _Transient(f"{type(exc).__name__}: {exc or 'no answer'}") from exc
        except httpx.TimeoutException as exc:
            raise EngineUnavailable(
                f"{self.name}: {url} did not answer within {self._probe_timeout().read:.0f} s ({type(exc).__name__}):"
                " the server is overloaded or hung; check its log"
            ) from exc
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"{self.name}: GET {url} failed: {type(exc).__name__}: {exc}") from exc
        if response.status_code in TRANSIENT_STATUS:
            raise _Transient(f"HTTP {response.status_code}: {server_message(response)}", _retry_after(response))
        return response

    async def _learn(self, response: httpx.Response) -> None:
        """Read /v1/models (and a vLLM server's /version and /metrics) into ``self.server`` and the features."""
        if response.status_code in (401, 403):
            raise EngineError(
                f"{self.name}: {self.base_url} refused the request (HTTP {response.status_code}: "
                f"{server_message(response)}): set api_key to the server's key (vLLM: --api-key)"
            )
        if response.status_code != 200:
            raise EngineUnavailable(
                f"{self.name}: GET {self.base_url}/models answered HTTP {response.status_code} "
                f"({server_message(response)}): is base_url the server's /v1 address?"
            )
        try:
            cards = response.json().get("data", [])
        except (ValueError, AttributeError) as exc:
            raise EngineUnavailable(
                f"{self.name}: GET {self.base_url}/models did not return an OpenAI model list: is base_url the "
                "server's /v1 address?"
            ) from exc
        server = ServerInfo(models=[str(c.get("id")) for c in cards if isinstance(c, dict)])
        if self.model not in server.models:
            raise ConfigError(
                f"model={self.model!r} is not served by {self.base_url}; it serves {server.models}. Set model to one "
                "of these (vLLM: the --served-model-name, else the --model path)"
            )
        card = next(c for c in cards if isinstance(c, dict) and c.get("id") == self.model)
        server.owned_by = str(card.get("owned_by", ""))
        if card.get("max_model_len"):
            server.max_model_len = int(card["max_model_len"])
        if server.owned_by == "vllm":
            server.version = await self._optional_json("/version", "version")
            server.metrics = await self._optional_metrics()
        self.server = server
        self._features = self._features_from(server)

    async def _optional_json(self, path: str, key: str) -> Any:
        with contextlib.suppress(Exception):
            response = await self._client.get(f"{self.root_url}{path}", timeout=self._probe_timeout())  # type: ignore[union-attr]
            if response.status_code == 200:
                return response.json().get(key)
        return None

    async def _optional_metrics(self) -> dict[str, Any] | None:
        with contextlib.suppress(Exception):
            response = await self._client.get(f"{self.root_url}/metrics", timeout=self._probe_timeout())  # type: ignore[union-attr]
            if response.status_code == 200 and "vllm:" in response.text:
                return parse_metrics(response.text)
        return None

    def _features_from(self, server: ServerInfo) -> dict[str, FeatureStatus]:
        cfg = self.config
        metrics = server.metrics
        unknown = "unknown: not visible over this server's API; set on the server"
        features: dict[str, FeatureStatus] = {}

        spec = cfg.speculative
        wanted = spec.effective_method()
        server_spec = None if metrics is None else bool(metrics.get("speculative"))
        for method in ("ngram", "draft"):
            requested = wanted == method
            if server_spec is None:
                status = FeatureStatus(
                    requested=requested,
                    enabled=False,
                    detail=f"{unknown} (vLLM: --speculative-config)",
                )
            elif server_spec and requested:
                status = FeatureStatus(
                    requested=True,
                    enabled=True,
                    detail="the server speculates (vllm:spec_decode_* metrics); its method is set on the server "
                    "with --speculative-config and is not shown over the API",
                )
            else:
                status = FeatureStatus(
                    requested=requested,
                    enabled=False,
                    detail="the server runs without speculative decoding (no vllm:spec_decode_* metrics); start it "
                    "with --speculative-config"
                    if not server_spec
                    else f"the server speculates, but speculative.method={spec.method!r} here",
                )
            features[f"speculative_{method}"] = status
        if server_spec and wanted == "off":
            features["speculative_server"] = FeatureStatus(
                requested=False, enabled=True, detail="the server speculates (method set on the server)"
            )

        want_kv = cfg.kv_cache_dtype != "auto"
        cache_dtype = None if metrics is None else metrics.get("cache_dtype")
        features["kv_cache_quantized"] = (
            FeatureStatus(requested=want_kv, enabled=False, detail=f"{unknown} (vLLM: --kv-cache-dtype fp8)")
            if cache_dtype is None
            else FeatureStatus(
                requested=want_kv,
                enabled=str(cache_dtype).startswith("fp8"),
                detail=f"the server's KV cache dtype is {cache_dtype} (vLLM: --kv-cache-dtype)",
            )
        )
        prefix = None if metrics is None else metrics.get("enable_prefix_caching")
        features["prefix_caching"] = (
            FeatureStatus(requested=cfg.enable_prefix_caching, enabled=False, detail=f"{unknown}")
            if prefix is None
            else FeatureStatus(
                requested=cfg.enable_prefix_caching,
                enabled=bool(prefix),
                detail="reported by the server's vllm:cache_config_info",
            )
        )
        want_priority = cfg.scheduling_policy == "priority"
        features["priority"] = FeatureStatus(
            requested=want_priority,
            enabled=want_priority and server.is_vllm,
            detail=(
                "EngineRequest.priority is sent as vLLM's `priority` field; the server honours it only when started "
                "with --scheduling-policy priority (not visible over the API)"
                if server.is_vllm
                else "not a vLLM server: the OpenAI API has no priority, requests are not prioritised"
            )
            if want_priority
            else "scheduling_policy='fcfs': no priority is sent",
        )
        features["batching"] = FeatureStatus(
            requested=True,
            enabled=server.is_vllm,
            detail="server-side continuous batching (vLLM)" if server.is_vllm else unknown,
        )
        return features

    async def _close(self) -> None:
        for call in self._calls.values():
            call.aborted.set()
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def _health(self) -> str:
        if self._client is None:
            raise EngineUnavailable(f"{self.name} is not started")
        url = f"{self.root_url}/health" if self.server.is_vllm else f"{self.base_url}/models"
        try:
            response = await self._client.get(url, timeout=self._probe_timeout())
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"{url}: {type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise EngineUnavailable(f"{url} answered HTTP {response.status_code}: {server_message(response)}")
        return f"{self.base_url} ({'vLLM ' + self.server.version if self.server.version else 'up'})"

    def _timeout_s(self) -> float | None:
        return self.config.timeout_s

    # -------------------------------------------------------------------------------- tokens

    @property
    def context_window(self) -> int:
        """The server's ``max_model_len`` when it says (vLLM does), else the configured ``max_model_len``."""
        return self.server.max_model_len or self.config.max_model_len

    async def count_tokens(self, text: str) -> int:
        """Tokens ``text`` takes with the server's tokenizer (vLLM's ``/tokenize``); an estimate elsewhere."""
        await self.start()
        if self.server.is_vllm and self._client is not None:
            payload = {"model": self.model, "prompt": text, "add_special_tokens": False}
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                response = await self._client.post(
                    f"{self.root_url}/tokenize", json=payload, timeout=self._probe_timeout()
                )
                if response.status_code == 200:
                    return int(response.json()["count"])
        return await super().count_tokens(text)

    # -------------------------------------------------------------------------------- generation

    def _payload(self, request: EngineRequest) -> tuple[str, dict[str, Any]]:
        params = request.params
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        if self._features.get("priority", FeatureStatus(requested=False, enabled=False)).enabled:
            body["priority"] = request.priority
        if request.messages is not None:
            body["messages"] = [m.model_dump() for m in request.messages]
            return f"{self.base_url}/chat/completions", body
        body["prompt"] = request.prompt
        return f"{self.base_url}/completions", body

    async def _open(self, url: str, body: dict[str, Any], request_id: str) -> httpx.Response:
        """POST and read the status; transient failures raise _Transient, final ones EngineError."""
        client = self._client
        if client is None:
            raise EngineUnavailable(f"engine {self.name} is closed")
        outgoing = client.build_request("POST", url, json=body, headers={"X-Request-Id": request_id})
        try:
            response = await client.send(outgoing, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise _Transient(f"{type(exc).__name__}: {exc or 'cannot connect'}") from exc
        except httpx.RemoteProtocolError as exc:  # the server closed the connection before answering
            raise _Transient(f"{type(exc).__name__}: {exc}") from exc
        except httpx.TimeoutException as exc:
            raise EngineTimeout(
                f"{self.name}: {url} sent no response within timeout_s={self.config.timeout_s:.0f} s"
            ) from exc
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"{self.name}: POST {url} failed: {type(exc).__name__}: {exc}") from exc
        if response.status_code == 200:
            return response
        try:
            await response.aread()
        finally:
            await response.aclose()
        message = server_message(response)
        if response.status_code in TRANSIENT_STATUS:
            raise _Transient(f"HTTP {response.status_code}: {message}", _retry_after(response))
        if response.status_code in (401, 403):
            raise EngineError(f"{self.name}: HTTP {response.status_code} from {url}: {message}; check api_key")
        raise EngineError(f"{self.name}: HTTP {response.status_code} from {url}: {message}")

    def _wait(self, state: RetryCallState) -> float:
        """Exponential backoff with jitter, at least what the server's ``Retry-After`` asked for."""
        backoff = wait_exponential_jitter(initial=0.5, max=8.0, jitter=0.5)(state)
        outcome = state.outcome
        error = outcome.exception() if outcome is not None else None
        asked = error.retry_after if isinstance(error, _Transient) else None
        return max(backoff, min(asked, MAX_RETRY_AFTER_S)) if asked is not None else backoff

    async def _with_retries(self, attempt_once: Any, what: str) -> Any:
        """Run ``attempt_once`` with retries of transient failures; the last one becomes EngineUnavailable."""
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_Transient),
            stop=stop_after_attempt(self.config.max_retries + 1),
            wait=self._wait,
            sleep=self._sleep,
            reraise=True,
            before_sleep=lambda state: logger.warning(
                "%s: %s failed (%s); retry %d of %d",
                self.name,
                what,
                state.outcome.exception() if state.outcome else "?",
                state.attempt_number,
                self.config.max_retries,
            ),
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await attempt_once()
        except _Transient as exc:
            tries = self.config.max_retries + 1
            raise EngineUnavailable(
                f"{self.name}: {what} failed after {tries} attempt{'s' if tries > 1 else ''}: {exc}. Check that the "
                f"server at {self.base_url} is running and reachable (vLLM: `python -m "
                "vllm.entrypoints.openai.api_server --model ... --port ...`; base_url must end with /v1)"
            ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _stream(self, request: EngineRequest) -> AsyncIterator[StreamDelta]:
        self._require_started()
        rid = request.request_id
        call = _Call()
        self._calls[rid] = call
        url, body = self._payload(request)
        aborted = asyncio.ensure_future(call.aborted.wait())
        opening: asyncio.Future[httpx.Response] | None = None
        reading: asyncio.Future[str] | None = None
        try:
            opening = asyncio.ensure_future(
                self._with_retries(lambda: self._open(url, body, rid), what=f"POST {url} ({rid})")
            )
            await asyncio.wait({opening, aborted}, return_when=asyncio.FIRST_COMPLETED)
            if not opening.done():
                return  # aborted while connecting: the base class raises Cancelled with the reason
            call.response = response = opening.result()
            chat = "messages" in body
            finish: FinishReason | None = None
            usage: Usage | None = None
            chunks = 0
            lines = response.aiter_lines().__aiter__()
            while True:
                reading = asyncio.ensure_future(lines.__anext__())
                await asyncio.wait({reading, aborted}, return_when=asyncio.FIRST_COMPLETED)
                if not reading.done():
                    return  # aborted: the finally below closes the stream
                try:
                    line = reading.result()
                except StopAsyncIteration:
                    break
                except httpx.TimeoutException as exc:
                    raise EngineTimeout(
                        f"{self.name}: {url} sent nothing for timeout_s={self.config.timeout_s:.0f} s ({rid})"
                    ) from exc
                except httpx.HTTPError as exc:
                    if call.aborted.is_set():
                        return
                    raise EngineUnavailable(
                        f"{self.name}: the stream of {rid} from {url} broke after {chunks} chunks: "
                        f"{type(exc).__name__}: {exc} (not retried: tokens were already sent)"
                    ) from exc
                if not line.startswith("data:"):
                    continue  # blank separators, comments, event names
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    event = json.loads(data)
                except ValueError as exc:
                    raise EngineError(f"{self.name}: {url} sent a malformed event for {rid}: {data[:200]!r}") from exc
                if "error" in event and not event.get("choices"):
                    error = event["error"]
                    message = error.get("message", error) if isinstance(error, dict) else error
                    raise EngineError(f"{self.name}: the server failed {rid} mid-stream: {message}")
                if event.get("usage"):
                    usage = Usage(
                        prompt_tokens=int(event["usage"].get("prompt_tokens") or 0),
                        completion_tokens=int(event["usage"].get("completion_tokens") or 0),
                    )
                for choice in event.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if text:
                        chunks += 1
                        yield StreamDelta(request_id=rid, text=text)
                    reason = choice.get("finish_reason")
                    if reason:
                        finish = FINISH_REASONS.get(reason, "error")
            if finish is None:
                return  # ended without a finish reason: the base class reports it (or Cancelled if aborted)
            if finish == "cancelled":
                if call.aborted.is_set():
                    return
                raise Cancelled(f"{self.name}: the server aborted {rid}")
            if usage is None:
                logger.debug("%s: %s sent no usage for %s; counting chunks", self.name, url, rid)
                usage = Usage(completion_tokens=chunks)
            yield StreamDelta(request_id=rid, finish_reason=finish, usage=usage)
        finally:
            aborted.cancel()
            self._calls.pop(rid, None)
            for pending in (reading, opening):  # cancelled, aborted or past the deadline while waiting on these
                if pending is not None and not pending.done():
                    pending.cancel()
                    with contextlib.suppress(BaseException):
                        await pending
            opened = opening is not None and opening.done() and not opening.cancelled()
            if call.response is None and opened and opening.exception() is None:  # type: ignore[union-attr]
                call.response = opening.result()  # type: ignore[union-attr]  # opened just as it was given up
            if call.response is not None:
                with contextlib.suppress(Exception):
                    await call.response.aclose()  # closing the connection makes vLLM abort the request

    async def _abort(self, request_id: str) -> None:
        call = self._calls.get(request_id)
        if call is not None:
            call.aborted.set()
            await asyncio.sleep(0)  # let the stream close its response now


__all__ = ["OpenAIEngine", "ServerInfo", "parse_metrics", "server_message"]
