"""The offload policy: calibration to a target retention, load bias, SLOs, forced modes and requires_large."""

from __future__ import annotations

import math

import numpy as np
import pytest

from echo_middleware.config import RouteConfig
from echo_middleware.route import NO_OFFLOAD, Calibrator, OffloadPolicy, calibrate_threshold, retention_curve
from echo_middleware.types import SLO, Candidate, EchoRequest, EngineLoad, Example, Message, SamplingParams


def request(**kwargs: object) -> EchoRequest:
    return EchoRequest(messages=[Message(role="user", content="q")], **kwargs)  # type: ignore[arg-type]


def selected(*utilities: float) -> list[Candidate]:
    return [Candidate(example=Example(request="q", response="a"), distance=0.1, utility=u) for u in utilities]


# --------------------------------------------------------------------------------------- calibration

PAIRS = [(0.95, 1.0), (0.9, 1.0), (0.8, 0.5), (0.7, 1.0), (0.6, 0.0), (0.5, 0.0)]


def test_retention_curve_counts_what_each_threshold_loses() -> None:
    thresholds, retention, offload = retention_curve(PAIRS)
    assert list(thresholds) == [0.95, 0.9, 0.8, 0.7, 0.6, 0.5]
    # offloading the top j loses sum(1 - q) of n = 6
    assert list(retention) == pytest.approx([1, 1, 1 - 0.5 / 6, 1 - 0.5 / 6, 1 - 1.5 / 6, 1 - 2.5 / 6])
    assert list(offload) == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1])


def test_calibrated_threshold_is_the_lowest_that_keeps_the_target() -> None:
    assert calibrate_threshold(PAIRS, 1.0, conformal=False) == 0.9
    assert calibrate_threshold(PAIRS, 0.9, conformal=False) == 0.7  # 0.917 retained at 0.7 and above
    assert calibrate_threshold(PAIRS, 0.5, conformal=False) == 0.5
    # a lucky tail does not count: 0.7 keeps 0.917, but 0.8 (higher) keeps the same, so 0.7 is fine; with a bad
    # early outcome the lower thresholds are refused even if retention recovers later
    dip = [(0.9, 0.0), (0.8, 1.0), (0.7, 1.0), (0.6, 1.0)]
    assert calibrate_threshold(dip, 0.8, conformal=False) == NO_OFFLOAD
    assert calibrate_threshold([], 0.9) == NO_OFFLOAD


def test_conformal_guard_counts_n_pairs_as_n_over_n_plus_1() -> None:
    # 6 pairs: retention 0.917 at 0.7 counts 0.917 * 6/7 = 0.786, so 0.9 now needs the 0.8 threshold (0.857)
    assert calibrate_threshold(PAIRS, 0.85) == 0.9
    assert calibrate_threshold(PAIRS, 0.85, conformal=False) == 0.7
    assert calibrate_threshold(PAIRS, 1.0) == NO_OFFLOAD  # n/(n+1) < 1: perfection is never promised
    # with flawless outcomes, 97% needs 1/0.03 - 1 = 32.3 of them: 32 are not enough, 33 are
    assert calibrate_threshold([(0.9, 1.0)] * 32, 0.97) == NO_OFFLOAD
    assert calibrate_threshold([(0.9, 1.0)] * 33, 0.97) == 0.9


def test_conformal_guard_keeps_the_target_on_new_requests() -> None:
    """Calibrate on 85 pairs, judge on fresh ones from the same distribution: the guarded threshold keeps the
    target in expectation; the plain one, fitted to its own sample, keeps less (what echo_bench measured)."""
    rng = np.random.default_rng(0)
    target = 0.97

    def draw(n: int) -> np.ndarray:
        p = rng.uniform(0.3, 1.0, n)  # predicted quality
        q = (rng.uniform(size=n) < p**2).astype(float)  # measured: success likelier at high p, but not calibrated
        return np.column_stack([p, q])

    kept: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(300):
        train, fresh = draw(85), draw(4000)
        for conformal in (True, False):
            t = calibrate_threshold([tuple(r) for r in train], target, conformal=conformal)
            lost = ((1 - fresh[:, 1]) * (fresh[:, 0] >= t)).sum()
            kept[conformal].append(1 - lost / len(fresh))
    assert np.mean(kept[True]) >= target
    assert np.mean(kept[False]) < target  # the optimism the guard removes (0.970 vs 0.980 with this seed)
    assert np.mean(kept[False]) < np.mean(kept[True]) - 0.005


def test_ties_share_one_threshold() -> None:
    pairs = [(0.9, 1.0), (0.9, 0.0), (0.5, 1.0)]
    thresholds, retention, _ = retention_curve(pairs)
    assert list(thresholds) == [0.9, 0.5]
    assert list(retention) == pytest.approx([2 / 3, 2 / 3])


def test_calibrator_window_and_cache() -> None:
    cal = Calibrator(PAIRS, window=6)
    assert cal.threshold(1.0, conformal=False) == 0.9
    assert cal.threshold(0.85) == 0.9  # guarded (see above); cached apart from the plain one
    cal.observe(0.99, 0.0)  # a confident failure pushes the oldest pair out and raises the bar
    assert len(cal) == 6
    assert cal.observed == 1
    assert cal.threshold(1.0, conformal=False) == NO_OFFLOAD
    assert (0.99, 0.0) in cal.pairs()


# ------------------------------------------------------------------------------------------- policy


def test_fixed_threshold_decides_and_explains() -> None:
    policy = OffloadPolicy(RouteConfig(threshold=0.8))
    yes = policy.decide(request(), selected(0.85, 0.6))
    assert yes.offload
    assert yes.predicted_quality == 0.85
    assert yes.threshold == 0.8
    assert "0.85 >= threshold 0.80" in yes.reason
    assert "fixed by route.threshold" in yes.reason
    no = policy.decide(request(), selected(0.75))
    assert not no.offload
    assert "0.75 < threshold 0.80" in no.reason
    assert no.possible


def test_calibrated_threshold_comes_from_the_attached_pairs() -> None:
    policy = OffloadPolicy(RouteConfig(target_retention=0.9, min_calibration=3, conformal=False))
    assert policy.threshold()[0] == RouteConfig().default_threshold  # nothing known yet
    policy.attach_calibration(PAIRS)
    value, source = policy.threshold()
    assert value == 0.7
    assert "90% retention on 6 outcomes" in source
    policy.attach_calibration([(0.1, 1.0)] * 100)  # only the first hand-over counts
    assert policy.threshold()[0] == 0.7
    assert policy.decide(request(), selected(0.72)).offload
    assert not policy.decide(request(), selected(0.69)).offload


def test_unreachable_target_offloads_nothing() -> None:
    policy = OffloadPolicy(RouteConfig(target_retention=1.0, min_calibration=1), calibration=[(0.9, 0.0)])
    decision = policy.decide(request(), selected(0.99))
    assert not decision.offload
    assert decision.threshold == NO_OFFLOAD
    assert "no threshold keeps 100% retention" in decision.reason


def test_too_few_outcomes_use_the_default_threshold() -> None:
    policy = OffloadPolicy(RouteConfig(min_calibration=50, default_threshold=0.6), calibration=PAIRS)
    value, source = policy.threshold()
    assert value == 0.6
    assert "only 6 outcomes" in source


def test_forced_modes() -> None:
    policy = OffloadPolicy(RouteConfig(threshold=0.99))
    always = policy.decide(request(offload="always"), selected(0.1))
    assert always.offload
    assert always.forced
    assert "offload='always'" in always.reason
    never = policy.decide(request(offload="never"), selected(1.0))
    assert not never.offload
    assert never.forced
    assert "offload='never'" in never.reason
    # always wins over requires_large: the caller said so
    assert policy.decide(request(offload="always", requires_large=True), []).offload


def test_requires_large_and_missing_examples_are_not_offloaded() -> None:
    policy = OffloadPolicy(RouteConfig(threshold=0.0))
    tools = policy.decide(request(requires_large=True), selected(1.0))
    assert not tools.offload
    assert not tools.possible
    assert "tool calls or structured output" in tools.reason
    empty = policy.decide(request(), [], best_utility=0.3)
    assert not empty.offload
    assert "best utility 0.30 < rank.min_utility" in empty.reason
    nothing = policy.decide(request(), [])
    assert "no similar past request" in nothing.reason
    down = policy.decide(request(), [], note="store unavailable (boom)")
    assert "store unavailable (boom)" in down.reason
    anyway = OffloadPolicy(RouteConfig(threshold=0.0, offload_without_examples=True)).decide(request(), [])
    assert anyway.offload
    assert anyway.possible


def load(waiting: int, running: int = 1, slots: int = 1, tps: float = 0.0) -> EngineLoad:
    return EngineLoad(waiting=waiting, running=running, max_concurrency=slots, tokens_per_s=tps)


def test_load_bias_follows_tanh_of_the_overload() -> None:
    cfg = RouteConfig(threshold=0.9, load_bias=0.2, load_gamma=0.5)
    policy = OffloadPolicy(cfg)
    interactive = request(slo=SLO(priority="interactive"))
    assert policy.load_bias(interactive, load(0, running=1))[0] == 0.0  # full, not over
    assert policy.load_bias(interactive, None)[0] == 0.0
    bias, why = policy.load_bias(interactive, load(3))  # utilisation 4, overload 3
    assert bias == pytest.approx(0.2 * math.tanh(0.5 * 3))
    assert "utilisation 4.0" in why
    standard = policy.load_bias(request(), load(3))[0]
    assert standard == pytest.approx(bias * 0.5)
    assert policy.load_bias(request(slo=SLO(priority="batch")), load(3))[0] == 0.0
    assert policy.load_bias(interactive, load(1000))[0] < 0.2 + 1e-12  # bounded by load_bias


def test_load_bias_lowers_the_bar_only_when_the_slo_needs_it() -> None:
    policy = OffloadPolicy(RouteConfig(threshold=0.9, load_bias=0.2, load_gamma=1.0))
    params = SamplingParams(max_tokens=100)
    # 10 tokens/s: 100 tokens take 10 s; 4 ahead on 1 slot: 40 s of waiting
    tight = request(slo=SLO(latency_s=5.0), params=params)
    loose = request(slo=SLO(latency_s=500.0), params=params)
    busy = load(3, tps=10.0)
    tight_bias, why = policy.load_bias(tight, busy)
    assert tight_bias == pytest.approx(0.2 * math.tanh(3.0))
    assert "latency SLO 5 s" in why
    assert policy.load_bias(loose, busy) == (0.0, "large utilisation 4.0, SLO met on the large queue")
    ttft = policy.load_bias(request(slo=SLO(ttft_s=1.0), params=params), busy)
    assert ttft[0] > 0
    assert "ttft SLO" in ttft[1]
    unknown_speed = policy.load_bias(tight, load(3))
    assert unknown_speed[0] == pytest.approx(tight_bias)
    assert "speed unknown" in unknown_speed[1]
    # the same prediction is offloaded under load and not without it
    assert not policy.decide(tight, selected(0.8), load(0)).offload
    under_load = policy.decide(tight, selected(0.8), busy)
    assert under_load.offload
    assert under_load.base_threshold == 0.9
    assert under_load.threshold == pytest.approx(0.9 - tight_bias)
    assert "lowered by" in under_load.reason
