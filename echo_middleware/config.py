"""Every setting of echo-middleware, in one place.

One pydantic model per pipeline stage, composed in :class:`EchoSettings`, which reads ``ECHO_*`` environment
variables (nested with ``__``: ``ECHO_LARGE__MODEL=...``, ``ECHO_STORE__PATH=...``). Two short aliases are read
too because users reach for them first: ``ECHO_MODELS_DIR`` and ``ECHO_STORE_PATH``.

Values are validated, never silently rewritten: a bad value raises :class:`~echo_middleware.errors.ConfigError`
naming the field, the value and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from echo_middleware.errors import ConfigError
from echo_middleware.types import PriorityClass

APP_NAME = "echo-middleware"

EngineBackend = Literal["auto", "vllm", "openai", "transformers"]
"""``auto`` picks in-process vLLM when it is installed, else transformers."""
SpeculativeMethod = Literal["auto", "off", "ngram", "draft"]
RankerKind = Literal["utility", "similarity"]
"""``utility``: the learned proxy ranker; ``similarity``: nearest neighbours first (the baseline)."""
KVCacheDType = Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
DEFAULT_LARGE_MODEL = "qwen2.5-coder-1.5b-instruct"
DEFAULT_SMALL_MODEL = "qwen2.5-coder-0.5b-instruct"


def default_models_dir() -> Path:
    """Where bundled models live: ``$ECHO_MODELS_DIR`` or the user's cache dir."""
    env = os.environ.get("ECHO_MODELS_DIR")
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir(APP_NAME)) / "models"


def default_store_path() -> Path:
    """Where the embedded Chroma store lives: ``$ECHO_STORE_PATH`` or the user's data dir."""
    env = os.environ.get("ECHO_STORE_PATH")
    return Path(env).expanduser() if env else Path(platformdirs.user_data_dir(APP_NAME)) / "store"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SpeculativeOptions(_Section):
    """Speculative decoding, dumped into vLLM's ``speculative_config`` (or transformers' assisted generation).

    n-gram prompt lookup costs nothing to set up and pays off when the answer copies from the prompt, which is
    what in-context examples make likely; a draft model (the 0.5B for the 1.5B) helps on free text.
    """

    method: SpeculativeMethod = Field(
        "auto",
        description="auto (n-gram prompt lookup, but off for the transformers backend on CPU, where it is slower), "
        "off, ngram (prompt lookup) or draft (a draft model).",
    )
    num_speculative_tokens: int = Field(4, ge=1, le=16, description="Tokens proposed per step.")
    prompt_lookup_max: int = Field(4, ge=1, le=16, description="Longest n-gram looked up in the prompt.")
    prompt_lookup_min: int = Field(1, ge=1, le=16, description="Shortest n-gram looked up in the prompt.")
    draft_model: str | None = Field(None, description="Bundled model name or folder of the draft model.")

    def effective_method(self, *, cpu_transformers: bool = False) -> Literal["off", "ngram", "draft"]:
        """What ``method`` means on one engine: ``auto`` is n-gram prompt lookup, but off for transformers on CPU.

        On a CPU, transformers' prompt lookup measured 27 % fewer tokens/s than plain decoding
        (``benchmarks/results/engine_speed.md``), while vLLM's n-gram speculation on the same CPU measured 12 %
        more; ``ngram`` turns it on anyway.
        """
        if self.method == "auto":
            return "off" if cpu_transformers else "ngram"
        return self.method

    @model_validator(mode="after")
    def _check(self) -> SpeculativeOptions:
        if self.method == "draft" and not self.draft_model:
            raise ValueError(
                "speculative.draft_model is required when speculative.method='draft': name a bundled model "
                "(e.g. 'qwen2.5-coder-0.5b-instruct') or a folder, or use method='ngram'."
            )
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(
                f"speculative.prompt_lookup_min={self.prompt_lookup_min} is larger than "
                f"prompt_lookup_max={self.prompt_lookup_max}: lower the first or raise the second."
            )
        return self


class EngineConfig(_Section):
    """One engine: which backend, which model, and the flags that make it fast.

    Flags are *requests*: an engine turns on what its platform supports and reports the rest in
    ``engine.features`` (e.g. fp8 KV cache is refused by vLLM on a CPU without AVX-512). With ``strict=True`` a
    refused flag is an error instead.
    """

    backend: EngineBackend = Field("auto", description="auto: in-process vLLM if installed, else transformers.")
    model: str = Field(description="Bundled model name, a model folder, or (backend=openai) the served name.")
    dtype: DType = Field(
        "auto",
        description="auto: bf16 on GPU; on CPU float32 for vLLM (3x faster than bf16 on AVX2) and bf16 for "
        "transformers (1.5x faster than float32 there).",
    )
    speculative: SpeculativeOptions = Field(default_factory=SpeculativeOptions)
    kv_cache_dtype: KVCacheDType = Field("fp8", description="Quantized KV cache (HACK); auto keeps the model's.")
    enable_prefix_caching: bool = Field(True, description="Reuse KV of shared prompt prefixes (examples).")
    scheduling_policy: Literal["priority", "fcfs"] = Field("priority", description="vLLM's scheduler policy.")
    enforce_eager: bool | None = Field(None, description="None: eager on CPU (starts in 30 s, not 4 min).")
    max_model_len: int = Field(4096, ge=128, le=1_048_576, description="Context window the engine serves.")
    max_num_seqs: int = Field(16, ge=1, le=4096, description="Requests decoded together.")
    cpu_kv_cache_space_gib: float = Field(2.0, gt=0, le=512, description="vLLM CPU: KV cache size in GiB.")
    cpu_threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="transformers on CPU: torch threads of the generation thread (None: one per core). Use 1 "
        "when other processes share the cores: OpenMP threads that wait on each other run ~10x slower then.",
    )
    cpu_preload_iomp: bool = Field(
        True, description="vLLM CPU: preload Intel OpenMP (libiomp5) into vLLM's workers unless LD_PRELOAD has one."
    )
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="vLLM GPU: share of memory to use.")
    base_url: str | None = Field(None, description="backend=openai: the server, e.g. http://127.0.0.1:8000/v1")
    api_key: SecretStr | None = Field(None, description="backend=openai: bearer token, if the server wants one.")
    connect_timeout_s: float = Field(5.0, gt=0, le=600, description="Seconds to connect to a remote engine.")
    timeout_s: float = Field(300.0, gt=0, le=86_400, description="Seconds for one whole generation.")
    max_retries: int = Field(3, ge=0, le=20, description="Retries of transient errors (remote engines).")
    start_timeout_s: float = Field(900.0, gt=0, description="Seconds an engine may take to start.")
    strict: bool = Field(False, description="Raise instead of falling back when a flag is unsupported.")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Passed through to the backend.")

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if self.backend == "openai" and not self.base_url:
            raise ValueError(
                "base_url is required when backend='openai': set it to the server's /v1 address, "
                "e.g. 'http://127.0.0.1:8000/v1'."
            )
        if self.base_url is not None and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url={self.base_url!r} must start with http:// or https://.")
        return self


class EmbedConfig(_Section):
    """The sentence embedder that turns requests into vectors for retrieval."""

    model: str = Field("all-minilm-l6-v2", description="Bundled embedder name or a sentence-transformers folder.")
    batch_size: int = Field(64, ge=1, le=4096, description="Texts embedded per forward pass.")
    cache_size: int = Field(4096, ge=0, le=1_000_000, description="LRU entries for repeated texts (0: off).")
    device: str = Field("cpu", description="torch device for the embedder.")


class StoreConfig(_Section):
    """The example store on Chroma: embedded (``path``) or a shared server (``host``)."""

    path: Path = Field(default_factory=default_store_path, description="Embedded PersistentClient folder.")
    host: str | None = Field(None, description="Chroma server host; when set, HttpClient is used.")
    port: int = Field(8000, ge=1, le=65535, description="Chroma server port.")
    ssl: bool = Field(False, description="Use https to reach the Chroma server.")
    timeout_s: float = Field(10.0, gt=0, le=600, description="Seconds for one call to a Chroma server.")
    collection_prefix: str = Field("echo_", description="Prefix of every tenant's collection name.")
    hnsw_ef_search: int = Field(128, ge=10, le=4096, description="HNSW search breadth: recall vs speed.")
    hnsw_ef_construction: int = Field(128, ge=10, le=4096, description="HNSW build breadth.")
    hnsw_m: int = Field(16, ge=4, le=128, description="HNSW graph degree.")
    max_batch: int = Field(4096, ge=1, le=5000, description="Most items per Chroma write.")
    capacity_per_tenant: int = Field(100_000, ge=1, description="Examples kept per tenant before eviction.")
    ttl_s: float | None = Field(None, gt=0, description="Examples older than this are evicted; None keeps them.")
    dedupe_distance: float = Field(0.02, ge=0, le=2, description="Cosine distance under which requests merge.")
    max_text_chars: int = Field(32_000, ge=1, description="Longest request or response text accepted.")
    dedupe: bool = Field(True, description="Merge a new request into a stored one within dedupe_distance.")
    dedupe_guard: bool = Field(
        True, description="Dedupe also needs the same wording up to case, filler words and typos (no traps)."
    )
    recency_half_life_s: float = Field(
        7 * 86_400.0, gt=0, description="Eviction value: seconds after which an unused example counts half."
    )
    evict_low_water: float = Field(
        0.95, gt=0, le=1, description="Over capacity, evict down to this share of it (fewer, larger evictions)."
    )
    replay_capacity: int = Field(10_000, ge=1, description="Most queued replay requests; the least valuable go.")
    max_retries: int = Field(3, ge=0, le=20, description="Retries of transient store errors (server, lock).")
    lock_timeout_s: float = Field(
        10.0, ge=0, le=3600, description="Seconds to wait for another process to release an embedded store."
    )


class RankConfig(_Section):
    """The proxy utility ranker that scores how much each example would help the small model."""

    top_k: int = Field(20, ge=1, le=200, description="Candidates retrieved per request.")
    max_examples: int = Field(4, ge=0, le=32, description="Most examples put in the small model's prompt.")
    min_utility: float = Field(0.5, ge=0, le=1, description="Examples below this utility are left out.")
    model_path: Path | None = Field(None, description="A trained ranker file; None uses the shipped default.")
    kind: RankerKind = Field("utility", description="utility: the learned proxy; similarity: nearest first.")
    learning_rate: float = Field(0.02, ge=0, le=1, description="Step of online updates from outcomes (0: frozen).")
    state_path: Path | None = Field(
        None, description="Where online-updated weights are saved on close and read at start (None: memory only)."
    )


_CLASS_BIAS_WEIGHT: dict[PriorityClass, float] = {"interactive": 1.0, "standard": 0.5, "batch": 0.0}


class RouteConfig(_Section):
    """The offload policy: when the small model with examples answers instead of the large one."""

    target_retention: float = Field(0.97, gt=0, le=1, description="Quality kept against always-large.")
    threshold: float | None = Field(None, ge=0, le=1, description="Fixed quality threshold; None: calibrated.")
    load_bias: float = Field(0.15, ge=0, le=1, description="Most the bar drops when the large engine is full.")
    load_gamma: float = Field(1.0, gt=0, le=100, description="How fast the bias grows with overload (tanh).")
    offload_without_examples: bool = Field(False, description="Offload even with no usable example.")
    class_bias_weight: dict[PriorityClass, float] = Field(
        default_factory=lambda: dict(_CLASS_BIAS_WEIGHT),
        description="Share of the load bias each priority class gets when it has no explicit SLO.",
    )
    calibration_window: int = Field(2000, ge=10, description="Most recent measured outcomes kept for calibration.")
    conformal: bool = Field(
        True,
        description="Finite-sample guard (conformal risk control): retention on n held-out outcomes counts n/(n+1), "
        "so the target holds on new requests, not only on the ones calibrated on.",
    )
    min_calibration: int = Field(20, ge=1, description="Outcomes needed before a calibrated threshold is trusted.")
    default_threshold: float = Field(
        0.9, ge=0, le=1, description="Threshold while fewer than min_calibration outcomes are known."
    )
    fallback_to_small: bool = Field(True, description="If the large model fails, answer with the small one.")


def _class_delays(interactive: float, standard: float, batch: float) -> dict[PriorityClass, float]:
    return {"interactive": interactive, "standard": standard, "batch": batch}


SpeculationMode = Literal["always", "unless_saturated", "never"]
"""Per priority class: speculate always, only while the engine has room, or never."""


class SpeculationConfig(_Section):
    """SLO-aware speculation (AdaServe): how much speculative decoding each priority class gets.

    Speculation lowers the latency of one request but costs verification work; when the engine is saturated that
    work is better spent on throughput, so batch traffic gives it up first.
    """

    interactive: SpeculationMode = Field("always", description="Interactive requests.")
    standard: SpeculationMode = Field("unless_saturated", description="Requests without a class.")
    batch: SpeculationMode = Field("never", description="Batch requests.")
    saturation: float = Field(1.0, gt=0, le=100, description="Engine utilisation (in flight / slots) = saturated.")
    num_tokens: int | None = Field(None, ge=1, le=16, description="Tokens per step; None: the engine's setting.")


class ScheduleConfig(_Section):
    """The per-engine scheduler in front of each engine (SSJF + AdaServe)."""

    policy: Literal["fcfs", "sjf", "slo"] = Field("slo", description="slo: EDF for SLOs, SJF with aging else.")
    aging_s: float = Field(
        30.0, gt=0, description="Seconds of waiting worth one predicted-length bucket (a doubling of the length)."
    )
    max_queue: int = Field(1024, ge=1, description="Requests waiting per engine before back-pressure.")
    on_full: Literal["wait", "reject"] = Field("wait", description="Queue full: wait for room or raise.")
    max_concurrency: int = Field(8, ge=1, le=4096, description="Requests in flight per engine.")
    max_wait_s: float | None = Field(
        None, gt=0, description="Hard bound: a request waiting this long is served next (None: aging alone)."
    )
    queue_timeout_s: float | None = Field(
        None, gt=0, description="A request still queued after this long fails with EngineTimeout (None: never)."
    )
    class_delay_s: dict[PriorityClass, float] = Field(
        default_factory=lambda: _class_delays(-20.0, 0.0, 60.0),
        description="Seconds added to a request's rank per priority class (negative: served sooner).",
    )
    default_tokens_per_s: float = Field(
        20.0, gt=0, description="Decode speed assumed for latency deadlines until the engine has measured one."
    )
    slo_deadline_factor: float | None = Field(
        None, gt=0, description="Cancel a request after this many times its SLO latency_s (None: SLOs never cancel)."
    )
    engine_priority: bool = Field(True, description="Hand the queue order down as EngineRequest.priority.")
    hedge_delay_s: float = Field(0.0, ge=0, description="hedge(): seconds before the second engine is started.")
    metrics_window: int = Field(10_000, ge=10, description="Recent requests kept per class for percentiles.")
    speculation: SpeculationConfig = Field(default_factory=SpeculationConfig)

    @model_validator(mode="after")
    def _check(self) -> ScheduleConfig:
        missing = {"interactive", "standard", "batch"} - set(self.class_delay_s)
        if missing:
            raise ValueError(
                f"schedule.class_delay_s={self.class_delay_s!r} lacks {sorted(missing)}: give a delay in seconds "
                "for each of interactive, standard and batch."
            )
        return self


class PredictConfig(_Section):
    """The output-length predictor (SSJF): neighbours' answer lengths combined with an online ridge regressor."""

    neighbours: int = Field(8, ge=0, le=200, description="Nearest retrieved examples whose lengths are used.")
    max_distance: float = Field(0.6, gt=0, le=2, description="Cosine distance beyond which a neighbour is ignored.")
    distance_scale: float = Field(0.1, gt=0, le=2, description="Neighbour weight is exp(-distance / scale).")
    ridge: float = Field(1.0, gt=0, le=1e6, description="L2 penalty of the regressor (larger: smoother).")
    use_embedding: bool = Field(True, description="Use the request embedding as regressor features.")
    min_observations: int = Field(20, ge=1, description="Observations before the regressor is trusted.")
    refit_every: int = Field(16, ge=1, description="Observations between refits of the regressor.")
    forgetting: float = Field(1.0, gt=0.9, le=1.0, description="Weight kept by old observations per new one.")
    default_tokens: float = Field(128.0, gt=0, description="Prediction before anything was observed.")
    model_path: Path | None = Field(None, description="Where the predictor's state is saved and loaded.")


class LearnConfig(_Section):
    """How large-model answers become examples, and how quality estimates stay honest."""

    store_large_answers: bool = Field(True, description="Keep large-model answers as new examples.")
    shadow_rate: float = Field(0.05, ge=0, le=1, description="Share of offloads re-checked by the large model.")
    replay_when_idle: bool = Field(True, description="Use idle time of the large engine for replay.")
    probe_rate: float = Field(
        0.05, ge=0, le=1, description="Share of large answers also tried on the small model when idle (labels)."
    )
    success_agreement: float = Field(
        0.7, ge=0, le=1, description="Agreement with the large answer that counts an offload as a success."
    )
    idle_poll_s: float = Field(0.5, gt=0, le=60, description="Seconds between checks for idle engines.")
    max_pending: int = Field(256, ge=0, description="Most background checks waiting; more are dropped.")


class EchoSettings(BaseSettings):
    """All settings, read from arguments, then ``ECHO_*`` environment variables, then defaults."""

    model_config = SettingsConfigDict(
        env_prefix="ECHO_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    models_dir: Path = Field(default_factory=default_models_dir, description="Where bundled models live.")
    large: EngineConfig = Field(
        default_factory=lambda: EngineConfig(model=DEFAULT_LARGE_MODEL),
        description="The large model: quality reference and fallback.",
    )
    small: EngineConfig = Field(
        default_factory=lambda: EngineConfig(model=DEFAULT_SMALL_MODEL),
        description="The small local model that answers offloaded requests with examples.",
    )
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    rank: RankConfig = Field(default_factory=RankConfig)
    route: RouteConfig = Field(default_factory=RouteConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)
    learn: LearnConfig = Field(default_factory=LearnConfig)
    tenant: str = Field("default", description="Tenant used when a request names none.")

    @model_validator(mode="before")
    @classmethod
    def _keep_default_engine_models(cls, data: Any) -> Any:
        """``ECHO_SMALL__DTYPE=float32`` alone must keep the small model's default name, not demand a new one.

        A section given as a dict (from arguments or nested env vars) replaces the default section whole, so
        without this ``model`` would be required whenever any other field of ``large`` / ``small`` is set.
        """
        if isinstance(data, dict):
            for section, model in (("large", DEFAULT_LARGE_MODEL), ("small", DEFAULT_SMALL_MODEL)):
                value = data.get(section)
                if isinstance(value, dict) and "model" not in value:
                    data = {**data, section: {**value, "model": model}}
        return data


def build_settings(**overrides: Any) -> EchoSettings:
    """Build settings, turning pydantic's validation errors into a :class:`ConfigError` that names the fix."""
    try:
        return EchoSettings(**overrides)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from exc


def format_validation_error(exc: ValidationError) -> str:
    """One line per bad field: ``large.kv_cache_dtype='fp4': Input should be 'auto', 'fp8' ...``."""
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(settings)"
        value = err.get("input")
        shown = f"={value!r}" if not isinstance(value, dict) else ""
        lines.append(f"{field}{shown}: {err['msg']}")
    return f"invalid {exc.title} settings:\n  " + "\n  ".join(lines)
