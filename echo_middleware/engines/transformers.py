"""The transformers engine: the light path that runs anywhere torch runs, without vLLM.

It serves one generation at a time (batch size 1): transformers' ``generate`` has no continuous batching that
streams, and on a small CPU one sequence already uses every core. Requests that arrive meanwhile wait in a queue
ordered by :attr:`EngineRequest.priority` (lower first), then by arrival, so the scheduler's ordering reaches the
engine. What the engine turns on is reported in :attr:`Engine.features`:

- ``speculative_ngram``: transformers' prompt-lookup decoding (``prompt_lookup_num_tokens``); it pays off when
  the answer copies from the prompt (in-context examples) on a GPU. On a CPU it measured slower than plain
  decoding, so the default ``speculative.method="auto"`` leaves it off there (``"ngram"`` forces it).
- ``speculative_draft``: assisted generation with a draft model (``assistant_model``) sharing the tokenizer.
  Both keep greedy output the same as plain decoding *up to numerics*: verification scores several tokens in one
  forward pass, and in bfloat16 that can flip a near-tie (seen once with SmolLM2 drafting for itself after ~25
  tokens); in float32 the outputs matched in our tests.
- ``kv_cache_quantized``: transformers has no fp8 KV cache; its ``QuantizedCache`` (int8 with ``hqq``, int4 with
  ``optimum-quanto``) is used when one of those is installed, else the request is reported and refused.
- ``priority``: the waiting queue's ordering. ``prefix_caching`` and ``batching``: not available here.

``dtype="auto"`` means bfloat16 on CPU (measured 24 vs 16 tok/s for float32 with SmolLM2-135M on a 2-core AVX2
CPU: transformers' bf16 matmuls beat fp32 there, unlike vLLM's CPU kernels) and bfloat16/float16 on CUDA.

Example:
    .. code-block:: python

        from echo_middleware.config import EngineConfig
        from echo_middleware.engines.transformers import TransformersEngine
        from echo_middleware.types import EngineRequest, Message

        engine = TransformersEngine(EngineConfig(backend="transformers", model="smollm2-135m-instruct"))
        async with engine:
            answer = await engine.generate(EngineRequest(messages=[Message(role="user", content="Hi!")]))
            async for delta in engine.stream(EngineRequest(prompt="Once upon a time")):
                print(delta.text, end="")
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import heapq
import itertools
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from echo_middleware.config import EngineConfig
from echo_middleware.engines.base import Engine
from echo_middleware.errors import (
    ConfigError,
    EngineError,
    EngineUnavailable,
    FeatureUnsupported,
    ModelError,
)
from echo_middleware.models import model_path
from echo_middleware.types import EngineRequest, FeatureStatus, FinishReason, SamplingParams, StreamDelta, Usage

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

GENERATION_SLOTS = 1
"""Generations that run at once: transformers' ``generate`` is batch size 1 here (prompt lookup and assisted
generation only work at batch size 1, and one sequence keeps a small CPU busy)."""
STOP_WINDOW_TOKENS = 24
"""Extra generated tokens decoded per step, beyond the longest stop string, to spot a stop string as it ends."""


# ------------------------------------------------------------------------------------ pure helpers


class StopTrimmer:
    """Cuts streamed text at the first stop string, holding back text that may be the start of one.

    Text is fed in pieces as it is decoded; what :meth:`feed` returns is safe to show, because any suffix that
    could still grow into a stop string is held until the next piece says otherwise. The stop string itself is
    never returned.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._pending = ""
        self.hit: str | None = None

    def feed(self, text: str) -> str:
        """Add decoded text; return what can be emitted now (stops at a stop string, see :attr:`hit`)."""
        if self.hit is not None:
            return ""
        if not self.stops:
            return text
        self._pending += text
        first: tuple[int, str] | None = None
        for stop in self.stops:
            at = self._pending.find(stop)
            if at >= 0 and (first is None or at < first[0]):
                first = (at, stop)
        if first is not None:
            self.hit = first[1]
            out, self._pending = self._pending[: first[0]], ""
            return out
        hold = self._held_back(self._pending)
        out = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(out) :]
        return out

    def flush(self) -> str:
        """The held-back text at the end of generation (it did not become a stop string)."""
        out, self._pending = ("" if self.hit is not None else self._pending), ""
        return out

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best


class IncrementalDecoder:
    """Turns token ids into text deltas as they arrive, without re-decoding the whole answer each step.

    The approach of text-generation-inference: decode a short window before the new tokens and the window with
    them, and emit the difference. A token that ends inside a multi-byte character (decoded as the replacement
    character) waits for the next one.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, ids: Sequence[int]) -> str:
        """Add new token ids; return the text they complete (may be empty)."""
        self.ids.extend(ids)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is left undecoded at the end (e.g. a trailing incomplete character)."""
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return after[len(before) :] if len(after) > len(before) else ""


# ------------------------------------------------------------------------------------ generation parts


@dataclass(eq=False)
class _Job:
    """One request's place in the engine: queue position, cancel flag, and its channel to the worker thread."""

    request: EngineRequest
    seq: int
    stop: threading.Event = field(default_factory=threading.Event)
    """Set to end generation at the next step (cancel, deadline, stop string, consumer gone)."""
    turn: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the job got the generation slot, or when it was aborted while waiting."""
    queue: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    granted: bool = False
    handed_off: bool = False
    aborted: bool = False
    stop_reason: str | None = None
    """Why ``stop`` was set: ``stop_string`` or ``aborted`` (cancel, deadline, consumer gone)."""


@dataclass(frozen=True)
class FinishedJob:
    """What a generation did, kept for a short while for debugging and tests."""

    request_id: str
    completion_tokens: int
    max_new_tokens: int
    outcome: str
    """``eos``, ``length``, ``stop_string``, ``aborted``, ``error`` (or ``stop``: ended by transformers itself)."""


class _Streamer:
    """The ``streamer`` handed to ``generate``: decodes new tokens and posts text to the event loop."""

    def __init__(self, decoder: IncrementalDecoder, emit: Callable[[str, Any], None]) -> None:
        self._decoder = decoder
        self._emit = emit
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt
            self._prompt_seen = True
            return
        ids = value.reshape(-1).tolist()
        text = self._decoder.push(ids)
        if text:
            self._emit("text", text)

    def end(self) -> None:
        text = self._decoder.flush()
        if text:
            self._emit("text", text)


class _StopCriteria:
    """A ``stopping_criteria`` entry: ends generation when the job's flag is set or a stop string appears."""

    def __init__(
        self, flag: threading.Event, stops: Sequence[str], prompt_len: int, decode: Callable[[list[int]], str]
    ) -> None:
        self._flag = flag
        self._stops = [s for s in stops if s]
        self._prompt_len = prompt_len
        self._decode = decode
        self._window = max((len(s) for s in self._stops), default=0) + STOP_WINDOW_TOKENS
        self.matched = False

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        import torch

        done = self._flag.is_set()
        if not done and self._stops:
            length = input_ids.shape[1]
            if length > self._prompt_len:
                tail = self._decode(input_ids[0, max(self._prompt_len, length - self._window) :].tolist())
                done = self.matched = any(s in tail for s in self._stops)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def _set_torch_threads(threads: int | None) -> None:
    """Executor initializer: torch threads of the generation thread (torch also uses it for threads made later)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------ the engine


class TransformersEngine(Engine):
    """An in-process Hugging Face transformers model, one generation at a time, queued by priority.

    Args:
        config: The engine's settings; ``model`` is a bundled model name or a Hugging Face folder.
        models_dir: Where bundled models live (default: ``$ECHO_MODELS_DIR`` or the user's cache dir).
        name: The engine's name in logs and decisions (default ``transformers:<model>``).

    Construction loads nothing; :meth:`start` loads the tokenizer and weights in a worker thread.
    ``config.engine_kwargs`` are passed to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``attn_implementation``).
    """

    kind = "transformers"

    def __init__(
        self,
        config: EngineConfig,
        *,
        models_dir: str | os.PathLike[str] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name or f"transformers:{config.model}", config.model, max_concurrency=GENERATION_SLOTS)
        self.config = config
        self._models_dir = models_dir
        self._tokenizer: Any = None
        self._model: Any = None
        self._assistant: Any = None
        self._device = "cpu"
        self._dtype_name = ""
        self._eos_ids: frozenset[int] = frozenset()
        self._bos_id: int | None = None
        self._pad_id: int | None = None
        self._model_window = 0
        self._gen_extra: dict[str, Any] = {}
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._free = GENERATION_SLOTS
        self._waiting: list[tuple[int, int, _Job]] = []
        self._jobs: dict[str, _Job] = {}
        self._seq = itertools.count()
        self.finished: collections.deque[FinishedJob] = collections.deque(maxlen=64)
        """The last generations and how they ended (newest last)."""

    # -------------------------------------------------------------------------------- lifecycle

    async def _start(self) -> None:
        try:
            async with asyncio.timeout(self.config.start_timeout_s):
                await asyncio.to_thread(self._load)
        except TimeoutError as exc:
            raise EngineUnavailable(
                f"{self.name}: loading {self.model} took over start_timeout_s={self.config.start_timeout_s:.0f} s; "
                "raise start_timeout_s or use a smaller model"
            ) from exc
        threads = self.config.cpu_threads if self._device == "cpu" else None
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="echo-transformers", initializer=_set_torch_threads, initargs=(threads,)
        )
        self._free = GENERATION_SLOTS

    def _load(self) -> None:
        """Load tokenizer, model and draft model, decide every feature, and verify them with a tiny generation."""
        folder = model_path(self.config.model, self._models_dir)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:
            raise ModelError(
                f"the transformers engine needs {exc.name}: pip install 'torch==2.13.0' 'transformers>=5.16.1,<5.20'"
            ) from exc
        features: dict[str, FeatureStatus] = {}
        gen_extra: dict[str, Any] = {}
        features["kv_cache_quantized"], kv_extra = self._plan_kv_cache()
        features["prefix_caching"] = self._refuse(
            "enable_prefix_caching",
            self.config.enable_prefix_caching,
            "transformers keeps no KV cache between requests",
            "set enable_prefix_caching=False, or use backend='vllm'",
        )
        policy_on = self.config.scheduling_policy == "priority"
        features["priority"] = FeatureStatus(
            requested=policy_on,
            enabled=policy_on,
            detail="waiting requests are served by EngineRequest.priority (lower first), then arrival"
            if policy_on
            else "scheduling_policy='fcfs': waiting requests are served in arrival order",
        )
        features["batching"] = FeatureStatus(
            requested=self.config.max_num_seqs > 1,
            enabled=False,
            detail=f"one generation at a time (batch size 1); max_num_seqs={self.config.max_num_seqs} is not used, "
            "other requests wait in the queue",
        )

        self._device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = self._resolve_dtype(torch)
        self._dtype_name = str(dtype).removeprefix("torch.")
        self._tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **self.config.engine_kwargs)
        self._model = model.to(self._device).eval()
        text_config = model.config.get_text_config()
        self._model_window = int(getattr(text_config, "max_position_embeddings", 0) or self.config.max_model_len)
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self._tokenizer.eos_token_id is not None:
            eos_ids.add(self._tokenizer.eos_token_id)
        self._eos_ids = frozenset(eos_ids)
        self._bos_id = model.generation_config.bos_token_id
        pad = model.generation_config.pad_token_id
        self._pad_id = pad if pad is not None else (min(self._eos_ids) if self._eos_ids else None)

        spec = self.config.speculative
        method = spec.effective_method(cpu_transformers=self._device == "cpu")
        auto_off = (
            "speculative.method='auto' leaves prompt lookup off for transformers on CPU, where it measured 27% fewer "
            "tokens/s (benchmarks/results/engine_speed.md); set speculative.method='ngram' to force it"
        )
        features["speculative_ngram"] = FeatureStatus(
            requested=method == "ngram", enabled=False, detail=auto_off if spec.method == "auto" else ""
        )
        features["speculative_draft"] = FeatureStatus(requested=method == "draft", enabled=False)
        spec_extra: dict[str, Any] = {}
        if method == "ngram":
            spec_extra = {
                "prompt_lookup_num_tokens": spec.num_speculative_tokens,
                "max_matching_ngram_size": spec.prompt_lookup_max,
            }
            detail = (
                f"prompt lookup: {spec.num_speculative_tokens} tokens proposed per step from n-grams of up to "
                f"{spec.prompt_lookup_max} tokens (transformers has no minimum n-gram size: prompt_lookup_min is "
                "not used); batch size 1"
            )
        elif method == "draft":
            assert spec.draft_model is not None  # noqa: S101  (SpeculativeOptions validates it)
            self._assistant = self._load_draft(spec.draft_model, dtype, AutoModelForCausalLM, AutoTokenizer)
            self._assistant.generation_config.num_assistant_tokens = spec.num_speculative_tokens
            self._assistant.generation_config.num_assistant_tokens_schedule = "constant"
            detail = (
                f"assisted generation with {spec.draft_model}: up to {spec.num_speculative_tokens} draft tokens per "
                "step (fewer when the draft is unsure); batch size 1"
            )
        if method != "off":
            feature = "speculative_ngram" if method == "ngram" else "speculative_draft"
            error = self._try_generate(spec_extra)
            if error is None:
                features[feature] = FeatureStatus(requested=True, enabled=True, detail=detail)
                gen_extra.update(spec_extra)
            else:
                self._assistant = None
                features[feature] = self._refuse(
                    "speculative.method", True, f"generate failed with it: {error}", "set speculative.method='off'"
                )
        if kv_extra:
            error = self._try_generate({**kv_extra, **gen_extra})
            if error is None:
                gen_extra.update(kv_extra)
            else:
                features["kv_cache_quantized"] = self._refuse(
                    "kv_cache_dtype",
                    True,
                    f"transformers' quantized cache failed on {self.model}: {error}",
                    "set kv_cache_dtype='auto'",
                )
        self._gen_extra = gen_extra
        self._features = features
        logger.info(
            "%s: %s on %s (%s), context %d; features: %s",
            self.name,
            folder,
            self._device,
            self._dtype_name,
            self.context_window,
            ", ".join(f"{k}={'on' if v.enabled else 'off'}" for k, v in features.items()),
        )

    def _resolve_dtype(self, torch: Any) -> Any:
        if self.config.dtype != "auto":
            return getattr(torch, self.config.dtype)
        if self._device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16

    def _load_draft(self, draft: str, dtype: Any, model_cls: Any, tokenizer_cls: Any) -> Any:
        folder = model_path(draft, self._models_dir)
        draft_tokenizer = tokenizer_cls.from_pretrained(folder)
        if draft_tokenizer.get_vocab() != self._tokenizer.get_vocab():
            raise ConfigError(
                f"speculative.draft_model={draft!r} has another tokenizer than model={self.model!r}; the draft "
                "must share the model's tokenizer (e.g. qwen2.5-coder-0.5b-instruct drafts for "
                "qwen2.5-coder-1.5b-instruct). Pick a draft of the same family or set speculative.method='ngram'."
            )
        assistant = model_cls.from_pretrained(folder, dtype=dtype)
        return assistant.to(self._device).eval()

    def _plan_kv_cache(self) -> tuple[FeatureStatus, dict[str, Any]]:
        want = self.config.kv_cache_dtype
        if want == "auto":
            return FeatureStatus(requested=False, enabled=False, detail="KV cache in the model's dtype"), {}
        from transformers.utils import is_hqq_available, is_optimum_quanto_available

        if is_hqq_available():
            backend, nbits = "hqq", 8
        elif is_optimum_quanto_available():
            backend, nbits = "quanto", 4
        else:
            return self._refuse(
                "kv_cache_dtype",
                True,
                f"kv_cache_dtype={want!r}: transformers has no fp8 KV cache, and its quantized cache needs hqq "
                "(int8) or optimum-quanto (int4), neither of which is installed",
                "set kv_cache_dtype='auto', pip install hqq or optimum-quanto, or use backend='vllm' on a GPU",
            ), {}
        return FeatureStatus(
            requested=True,
            enabled=True,
            detail=f"kv_cache_dtype={want!r} served as int{nbits} with {backend} (transformers QuantizedCache; "
            "transformers has no fp8 cache, this is the nearest it has)",
        ), {"cache_implementation": "quantized", "cache_config": {"backend": backend, "nbits": nbits}}

    def _refuse(self, field_name: str, requested: bool, reason: str, fix: str) -> FeatureStatus:
        """Report a requested feature as off; in strict mode raise instead."""
        if not requested:
            return FeatureStatus(requested=False, enabled=False)
        if self.config.strict:
            raise FeatureUnsupported(f"{self.name}: {field_name}: {reason}. Fix: {fix} (or strict=False to fall back)")
        logger.warning("%s: %s is off: %s", self.name, field_name, reason)
        return FeatureStatus(requested=True, enabled=False, detail=f"{reason}; falling back")

    def _try_generate(self, extra: dict[str, Any]) -> str | None:
        """Two greedy tokens with ``extra``: None when it works, else the error (features are verified, not hoped)."""
        import torch

        ids = self._tokenizer.encode("Hello, how are", add_special_tokens=False) * 2
        kwargs: dict[str, Any] = {}
        if self._assistant is not None:
            kwargs["assistant_model"] = self._assistant
        try:
            with torch.inference_mode():
                tensor = torch.tensor([ids], device=self._device)
                self._model.generate(
                    input_ids=tensor,
                    attention_mask=torch.ones_like(tensor),
                    generation_config=self._generation_config(SamplingParams(max_tokens=2), 2, extra),
                    **kwargs,
                )
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    async def _close(self) -> None:
        for job in self._jobs.values():
            job.stop.set()
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True)  # let a running generate see its flag and end
        self._model = self._assistant = None
        self._waiting.clear()
        if self._device == "cuda":
            import torch

            torch.cuda.empty_cache()

    @property
    def device(self) -> str:
        """``cuda`` or ``cpu``: where the model runs (known after :meth:`start`)."""
        return self._device

    async def _health(self) -> str:
        if self._model is None:
            raise EngineUnavailable(f"{self.name} has no model loaded")
        threads = f", {self.config.cpu_threads} threads" if self._device == "cpu" and self.config.cpu_threads else ""
        return f"{self.model} on {self._device} ({self._dtype_name}{threads}), {len(self._waiting)} queued"

    def _timeout_s(self) -> float | None:
        return self.config.timeout_s

    # -------------------------------------------------------------------------------- tokens

    @property
    def context_window(self) -> int:
        """The model's position limit, capped by ``max_model_len`` (``max_model_len`` before start)."""
        if not self._model_window:
            return self.config.max_model_len
        return min(self._model_window, self.config.max_model_len)

    async def count_tokens(self, text: str) -> int:
        """Tokens ``text`` takes with the model's tokenizer (no special tokens)."""
        await self.start()
        if len(text) < 4096:
            return len(self._tokenizer.encode(text, add_special_tokens=False))
        return len(await asyncio.to_thread(self._tokenizer.encode, text, add_special_tokens=False))

    def _encode(self, request: EngineRequest) -> list[int]:
        """Chat messages through the model's chat template; raw prompts with the tokenizer's defaults, as vLLM."""
        tokenizer = self._tokenizer
        if request.messages is None:
            return list(tokenizer.encode(request.prompt))
        if not tokenizer.chat_template:
            raise EngineError(
                f"{self.name}: model {self.model} has no chat template; send a raw `prompt` instead of `messages`"
            )
        text = tokenizer.apply_chat_template(
            [m.model_dump() for m in request.messages], add_generation_prompt=True, tokenize=False
        )
        return list(tokenizer.encode(text, add_special_tokens=False))

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    # -------------------------------------------------------------------------------- the queue

    async def _acquire(self, job: _Job) -> None:
        """Take the generation slot, or wait for it in priority order; returns early if the job is aborted."""
        # Invariant: a released slot goes straight to a live waiter, so a free slot means nobody live waits.
        if self._free > 0:
            self._free -= 1
            job.granted = True
            return
        key = job.request.priority if self.config.scheduling_policy == "priority" else 0
        heapq.heappush(self._waiting, (key, job.seq, job))
        await job.turn.wait()

    def _release(self) -> None:
        """Hand the slot to the best live waiter, or free it."""
        while self._waiting:
            _, _, job = heapq.heappop(self._waiting)
            if job.stop.is_set():
                continue
            job.granted = True
            job.turn.set()
            return
        self._free += 1

    # -------------------------------------------------------------------------------- generation

    async def _stream(self, request: EngineRequest) -> AsyncIterator[StreamDelta]:
        self._require_started()
        rid = request.request_id
        job = _Job(request=request, seq=next(self._seq))
        self._jobs[rid] = job
        try:
            prompt_ids = await asyncio.to_thread(self._encode, request)
            window = self.context_window
            if len(prompt_ids) >= window:
                raise EngineError(
                    f"{self.name}: the prompt of {rid} has {len(prompt_ids)} tokens but the context window is "
                    f"{window}: shorten the prompt (fewer examples) or raise max_model_len"
                )
            max_new = min(request.params.max_tokens, window - len(prompt_ids))
            await self._acquire(job)
            if job.stop.is_set():
                return  # aborted while waiting: the base class raises Cancelled with the reason
            if self._executor is None:
                raise EngineUnavailable(f"engine {self.name} is closing")
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(self._executor, self._generate_blocking, job, prompt_ids, max_new, loop)
            job.handed_off = True
            future.add_done_callback(lambda _f: self._release())

            trimmer = StopTrimmer(request.params.stop)
            result: tuple[int, bool] | None = None
            while result is None:
                kind, payload = await job.queue.get()
                if kind == "text":
                    text = trimmer.feed(payload)
                    if text:
                        yield StreamDelta(request_id=rid, text=text)
                    if trimmer.hit is not None and not job.stop.is_set():
                        job.stop_reason = "stop_string"
                        job.stop.set()  # end generation now; wait for the worker's count of tokens
                elif kind == "done":
                    result = payload
                elif kind == "abort":
                    return  # the base class raises Cancelled with the reason
                else:
                    raise EngineError(f"{self.name}: generation of {rid} failed: {payload}") from payload
            if job.aborted:
                return
            tail = trimmer.flush()
            completion, ended_on_eos = result
            finish: FinishReason
            if trimmer.hit is not None or ended_on_eos:
                finish = "stop"
            elif completion >= max_new:
                finish = "length"
            else:
                finish = "stop"
            yield StreamDelta(
                request_id=rid,
                text=tail,
                finish_reason=finish,
                usage=Usage(prompt_tokens=len(prompt_ids), completion_tokens=completion),
            )
        finally:
            if not job.stop.is_set():  # the consumer is gone or done: the worker ends at its next step
                job.stop_reason = job.stop_reason or "aborted"
                job.stop.set()
            if job.granted and not job.handed_off:
                self._release()
            if self._jobs.get(rid) is job:
                del self._jobs[rid]

    async def _abort(self, request_id: str) -> None:
        job = self._jobs.get(request_id)
        if job is None:
            return
        job.aborted = True
        if not job.stop.is_set():
            job.stop_reason = "aborted"
            job.stop.set()
        job.turn.set()  # wake it if it waits for the slot
        job.queue.put_nowait(("abort", None))  # wake it if it waits for text

    def _generation_config(self, params: SamplingParams, max_new: int, extra: dict[str, Any] | None = None) -> Any:
        """A fresh GenerationConfig from the request (the model's own sampling defaults are not used, as in vLLM)."""
        from transformers import GenerationConfig

        config = GenerationConfig(
            max_new_tokens=max_new,
            eos_token_id=sorted(self._eos_ids) or None,
            pad_token_id=self._pad_id,
            bos_token_id=self._bos_id,
            **(self._gen_extra if extra is None else extra),
        )
        if params.temperature == 0:
            config.do_sample = False
            config.temperature = config.top_p = config.top_k = None
        else:
            config.do_sample = True
            config.temperature = params.temperature
            config.top_p = params.top_p
            config.top_k = 0  # off, as in vLLM and the OpenAI API
        return config

    def _generate_blocking(
        self, job: _Job, prompt_ids: list[int], max_new: int, loop: asyncio.AbstractEventLoop
    ) -> None:
        """Runs in the worker thread: generate, posting text and finally ("done", (tokens, ended_on_eos))."""
        import torch

        def emit(kind: str, payload: Any) -> None:
            try:
                loop.call_soon_threadsafe(job.queue.put_nowait, (kind, payload))
            except RuntimeError:  # the loop is closed: nobody listens any more
                job.stop.set()

        rid = job.request.request_id
        params = job.request.params
        completion, outcome = 0, "error"
        try:
            if job.stop.is_set():
                emit("done", (0, False))
                outcome = "aborted"
                return
            decoder = IncrementalDecoder(self._decode)
            kwargs: dict[str, Any] = {}
            if self._assistant is not None:
                kwargs["assistant_model"] = self._assistant
            criteria = _StopCriteria(job.stop, params.stop, len(prompt_ids), self._decode)
            with torch.inference_mode():
                if params.seed is not None and params.temperature > 0:
                    torch.manual_seed(params.seed)  # global RNG: safe, one generation runs at a time
                input_ids = torch.tensor([prompt_ids], device=self._device)
                output = self._model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    generation_config=self._generation_config(params, max_new),
                    streamer=_Streamer(decoder, emit),
                    stopping_criteria=[criteria],
                    **kwargs,
                )
            new = output[0, len(prompt_ids) :].tolist()
            completion = len(new)
            ended_on_eos = bool(new) and new[-1] in self._eos_ids
            if job.stop.is_set():
                outcome = job.stop_reason or "aborted"
            elif criteria.matched:
                outcome = "stop_string"
            else:
                outcome = "eos" if ended_on_eos else "length" if completion >= max_new else "stop"
            emit("done", (completion, ended_on_eos))
        except Exception as exc:  # handed to the stream, which raises EngineError from it
            emit("error", exc)
        finally:
            self.finished.append(FinishedJob(rid, completion, max_new, outcome))
            logger.debug("%s: %s generated %d tokens (%s)", self.name, rid, completion, outcome)
