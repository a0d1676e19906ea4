"""The typed values that travel through the pipeline: requests, engine results, examples and decisions.

These are plain pydantic models with no framework types in them, so the LangChain and LlamaIndex adapters, the
HTTP server and the benchmarks all speak the same language as the core.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Role = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "cancelled", "error"]
OffloadMode = Literal["auto", "never", "always"]
PriorityClass = Literal["interactive", "standard", "batch"]


def new_request_id() -> str:
    """A short random id that names one request in logs, engines and decisions."""
    return uuid.uuid4().hex[:16]


class Message(BaseModel):
    """One chat turn."""

    model_config = ConfigDict(frozen=True)

    role: Role
    content: str


class SamplingParams(BaseModel):
    """How to sample; the subset every engine (vLLM, OpenAI API, transformers) understands."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(256, ge=1, le=32768, description="Most new tokens to generate.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    stop: list[str] = Field(default_factory=list, max_length=16, description="Strings that end generation.")
    seed: int | None = Field(None, ge=0, description="Seed for sampling; None draws one.")


class SLO(BaseModel):
    """A request's latency objective (AdaServe): what it needs, and how important it is."""

    model_config = ConfigDict(extra="forbid")

    ttft_s: float | None = Field(None, gt=0, description="Time to first token, seconds.")
    latency_s: float | None = Field(None, gt=0, description="Time to the whole answer, seconds.")
    priority: PriorityClass = Field("standard", description="interactive > standard > batch.")


class EngineRequest(BaseModel):
    """What an engine is asked to do: chat messages or a raw prompt, sampling, priority and deadline."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(default_factory=new_request_id)
    messages: list[Message] | None = None
    prompt: str | None = None
    params: SamplingParams = Field(default_factory=SamplingParams)
    priority: int = Field(0, description="Lower is served first, as in vLLM's priority scheduler.")
    deadline: float | None = Field(
        None, description="Absolute wall-clock time (time.time()) after which the request is cancelled."
    )

    @model_validator(mode="after")
    def _one_input(self) -> EngineRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("EngineRequest needs exactly one of `messages` or `prompt`; got both or neither.")
        if self.messages is not None and not self.messages:
            raise ValueError("EngineRequest.messages is empty: pass at least one message.")
        return self

    def remaining_s(self) -> float | None:
        """Seconds left before the deadline (negative when past), or None without a deadline."""
        return None if self.deadline is None else self.deadline - time.time()


class Usage(BaseModel):
    """Token counts of one generation."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


class Timings(BaseModel):
    """Where one generation spent its time, in seconds."""

    queued_s: float = 0.0
    ttft_s: float | None = None
    total_s: float = 0.0


class Generation(BaseModel):
    """An engine's finished answer."""

    request_id: str
    text: str
    finish_reason: FinishReason = "stop"
    usage: Usage = Field(default_factory=Usage)
    timings: Timings = Field(default_factory=Timings)
    engine: str = ""
    model: str = ""


class StreamDelta(BaseModel):
    """One piece of a streamed answer; the last one carries finish_reason and usage."""

    request_id: str
    text: str = ""
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


class EngineLoad(BaseModel):
    """What the router and scheduler need to know about an engine's load right now."""

    waiting: int = 0
    running: int = 0
    max_concurrency: int = 1
    tokens_per_s: float = 0.0

    @property
    def utilisation(self) -> float:
        """Requests in the engine per slot: above 1.0 means a queue is building."""
        return (self.waiting + self.running) / max(1, self.max_concurrency)


class FeatureStatus(BaseModel):
    """Whether an engine feature was asked for, whether it is on, and why not when it is off."""

    requested: bool
    enabled: bool
    detail: str = ""


class EngineHealth(BaseModel):
    """An engine's answer to a health check."""

    ok: bool
    detail: str = ""
    latency_s: float = 0.0


# ------------------------------------------------------------------------------------ pipeline types


class Example(BaseModel):
    """A stored past request with a good answer: a demonstration for the small model."""

    id: str = Field(default_factory=new_request_id)
    tenant: str = "default"
    request: str = Field(description="The request as text (what is embedded).")
    messages: list[Message] = Field(default_factory=list)
    response: str
    model: str = ""
    created_at: float = Field(default_factory=time.time)
    last_used: float = Field(default_factory=time.time)
    hits: int = 0
    prompt_tokens: int = 0
    response_tokens: int = 0
    quality: float | None = Field(None, description="Quality signal in [0, 1] when one is known.")
    utility_sum: float = 0.0
    utility_n: int = 0
    offload_successes: int = 0
    metadata: dict[str, Any] = Field(default_factory=dict)


class Candidate(BaseModel):
    """A retrieved example with its retrieval distance and, once ranked, its utility."""

    example: Example
    distance: float
    utility: float | None = None


class ExampleUse(BaseModel):
    """An example that went into a prompt, as reported in a decision."""

    id: str
    distance: float
    utility: float | None = None


class Decision(BaseModel):
    """Why a request was answered the way it was: shown to users in response metadata."""

    request_id: str
    offloaded: bool
    reason: str
    mode: OffloadMode = "auto"
    examples: list[ExampleUse] = Field(default_factory=list)
    predicted_quality: float | None = None
    threshold: float | None = None
    predicted_length: float | None = None
    engine: str = ""
    model: str = ""
    queue_wait_s: float = 0.0
    stage_s: dict[str, float] = Field(default_factory=dict)
    fallback: str | None = None


class EchoRequest(BaseModel):
    """One request to the pipeline, as every front door (LangChain, LlamaIndex, HTTP, CLI) builds it."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(default_factory=new_request_id)
    messages: list[Message] = Field(min_length=1, description="The conversation; the last turn is answered.")
    tenant: str | None = Field(None, description="Whose examples to use and feed; None: the configured default.")
    slo: SLO | None = Field(None, description="Latency objective and priority class.")
    params: SamplingParams = Field(default_factory=SamplingParams)
    offload: OffloadMode = Field("auto", description="auto: the router decides; never / always: forced.")
    requires_large: bool = Field(
        False, description="The request needs the large model (tools, structured output): never offloaded."
    )
    metadata: dict[str, Any] = Field(default_factory=dict)


class EchoResult(BaseModel):
    """The pipeline's answer: text, token usage and the decision that explains it."""

    request_id: str
    text: str
    finish_reason: FinishReason = "stop"
    usage: Usage = Field(default_factory=Usage)
    decision: Decision


class EchoChunk(BaseModel):
    """A piece of a streamed pipeline answer; the last one carries finish_reason, usage and the decision."""

    request_id: str
    text: str = ""
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    decision: Decision | None = None
