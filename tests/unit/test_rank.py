"""The utility ranker: pair features, the logistic proxy model, ranking, online updates and the shipped weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from echo_middleware.config import RankConfig, RouteConfig
from echo_middleware.errors import ConfigError
from echo_middleware.rank import (
    FEATURE_NAMES,
    LogisticModel,
    RankQuery,
    SimilarityRanker,
    UtilityRanker,
    create_ranker,
    pair_features,
)
from echo_middleware.rank.features import CONTEXT_KEY, context_hash
from echo_middleware.rank.utility import read_bundle, write_bundle
from echo_middleware.route.calibration import calibrate_threshold
from echo_middleware.types import Candidate, Example, Message


def cand(request: str, response: str = "an answer", distance: float = 0.2, **fields: object) -> Candidate:
    return Candidate(example=Example(request=request, response=response, **fields), distance=distance)


def col(name: str) -> int:
    return FEATURE_NAMES.index(name)


def test_features_of_a_repeat_a_paraphrase_and_an_entity_swap() -> None:
    query = RankQuery("Where was Alison Kreviazuk born?")
    rows = pair_features(
        query,
        [
            cand("Where was Alison Kreviazuk born?", "Mississauga", distance=0.0),
            cand("What is the birthplace of Alison Kreviazuk?", "Alison Kreviazuk was born in Mississauga.", 0.15),
            cand("Where was Tomas Bermudez born?", "Granada", distance=0.3),
        ],
    )
    assert rows.shape == (3, len(FEATURE_NAMES))
    repeat, paraphrase, swap = rows
    assert repeat[col("exact_repeat")] == 1.0
    assert paraphrase[col("exact_repeat")] == 0.0
    assert repeat[col("similarity")] == pytest.approx(1.0)
    assert swap[col("similarity_gap")] == pytest.approx(0.3)
    assert repeat[col("entity_mismatch")] == 0.0
    assert paraphrase[col("entity_mismatch")] < 0.5  # same person, other words
    assert swap[col("entity_mismatch")] == 1.0  # other person
    assert paraphrase[col("response_covers_entities")] == 1.0  # the answer talks about the asked person
    assert swap[col("response_covers_entities")] == 0.0
    assert swap[col("template_prefix")] > paraphrase[col("template_prefix")]  # same template, other entity


def test_number_and_negation_mismatches() -> None:
    rows = pair_features(
        RankQuery("Don't cancel my 2 subscriptions"),
        [
            cand("Cancel my 2 subscriptions"),
            cand("Don't cancel my 3 subscriptions"),
            cand("Don't cancel my 2 subscriptions"),
        ],
    )
    assert rows[0, col("negation_mismatch")] == 1.0
    assert rows[0, col("number_mismatch")] == 0.0
    assert rows[1, col("negation_mismatch")] == 0.0
    assert rows[1, col("number_mismatch")] == 1.0
    assert rows[2, col("negation_mismatch")] == 0.0
    assert rows[2, col("number_mismatch")] == 0.0


def test_usage_features_and_context() -> None:
    messages = [Message(role="system", content="Answer in French."), Message(role="user", content="Hi")]
    query = RankQuery.from_messages(messages)
    assert query.text == "Hi"
    assert query.context == context_hash(messages) != ""
    rows = pair_features(
        query,
        [
            cand("Hi", utility_sum=0.0, utility_n=8, metadata={CONTEXT_KEY: query.context}),
            cand("Hi", utility_sum=8.0, utility_n=8, metadata={CONTEXT_KEY: "other"}),
            cand("Hi"),
        ],
    )
    assert rows[0, col("mean_utility")] == pytest.approx(1 / 10)  # 0 + 0.5 * 2 over 8 + 2
    assert rows[1, col("mean_utility")] == pytest.approx(9 / 10)
    assert rows[2, col("mean_utility")] == pytest.approx(0.5)  # the prior
    assert rows[0, col("same_context")] == 1.0
    assert rows[1, col("same_context")] == 0.0
    assert rows[2, col("same_context")] == 0.5


def test_no_candidates_no_rows() -> None:
    assert pair_features(RankQuery("x"), []).shape == (0, len(FEATURE_NAMES))


def test_logistic_fit_learns_a_soft_rule_and_roundtrips() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, size=(400, len(FEATURE_NAMES)))
    y = (x[:, col("similarity")] > 0.5) * (1 - x[:, col("entity_mismatch")])  # soft labels
    model = LogisticModel.fit(x, y, ("similarity", "entity_mismatch"), l2=0.1)
    assert model.coef[0] > 0 > model.coef[1]
    good, bad = np.zeros((2, len(FEATURE_NAMES)))
    good[col("similarity")], bad[col("similarity")] = 0.9, 0.9
    bad[col("entity_mismatch")] = 1.0
    p_good, p_bad = model.predict(np.vstack([good, bad]))
    assert p_good > 0.6 > p_bad
    again = LogisticModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert again.predict(np.vstack([good, bad])) == pytest.approx([p_good, p_bad], abs=1e-6)
    parts = model.contributions(bad)
    assert set(parts) == {"similarity", "entity_mismatch"}
    assert parts["entity_mismatch"] < 0


def test_sign_constraints_pin_a_wrong_signed_weight_and_refit_the_rest() -> None:
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, size=(300, len(FEATURE_NAMES)))
    # in this sample a mismatch goes with *better* labels: the unconstrained fit learns the wrong direction
    y = 0.3 * x[:, col("similarity")] + 0.6 * x[:, col("entity_mismatch")]
    feats = ("similarity", "entity_mismatch")
    free = LogisticModel.fit(x, y, feats, l2=0.1)
    assert free.coef[1] > 0
    constrained = LogisticModel.fit(x, y, feats, l2=0.1, signs={"entity_mismatch": -1, "similarity": 1})
    assert constrained.coef[1] == 0.0
    assert constrained.coef[0] > 0  # the rest still fits
    with pytest.raises(ValueError, match="signs"):
        LogisticModel.fit(x, y, feats, signs={"exact_repeat": 1})


def test_inputs_outside_the_training_range_are_clipped_to_it() -> None:
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 1, size=(300, len(FEATURE_NAMES)))
    x[:, col("request_length")] *= 0.6  # training requests are short
    y = 0.2 + 0.6 * x[:, col("request_length")]
    model = LogisticModel.fit(x, y, ("similarity", "request_length"), l2=0.1)
    assert model.upper is not None
    assert model.upper[1] == pytest.approx(x[:, col("request_length")].max())
    seen, far = np.zeros((2, len(FEATURE_NAMES)))
    seen[col("request_length")] = model.upper[1]
    far[col("request_length")] = 5.0  # a long RAG prompt: far outside what the model was fitted on
    assert model.predict(far)[0] == pytest.approx(model.predict(seen)[0])
    again = LogisticModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert again.predict(far)[0] == pytest.approx(model.predict(far)[0], abs=1e-6)
    # a bundle without bounds (older files) still loads and extrapolates as before
    bare = {k: v for k, v in model.to_dict().items() if k not in ("lower", "upper")}
    assert LogisticModel.from_dict(bare).predict(far)[0] > model.predict(far)[0]


def test_partial_fit_moves_towards_the_labels() -> None:
    model = LogisticModel(("similarity",), [0.5], [0.2], [1.0], 0.0)
    row = np.zeros((1, len(FEATURE_NAMES)))
    row[0, col("similarity")] = 0.9
    before = float(model.predict(row)[0])
    for _ in range(50):
        model.partial_fit(row, [0.0], lr=0.1)
    assert float(model.predict(row)[0]) < before - 0.2
    assert model.updates == 50


def test_weights_naming_unknown_features_are_refused() -> None:
    with pytest.raises(ConfigError, match="retrain"):
        LogisticModel(("no_such_feature",), [0.0], [1.0], [1.0], 0.0)
    with pytest.raises(ConfigError, match="malformed"):
        LogisticModel.from_dict(
            {"features": ["similarity"], "mean": [0.0, 1.0], "scale": [1.0], "coef": [1.0], "intercept": 0.0}
        )


def test_rank_sorts_by_utility_not_by_distance() -> None:
    # A model that punishes entity mismatch: the nearer entity swap must rank below the paraphrase.
    model = LogisticModel(("similarity", "entity_mismatch"), [0.0, 0.0], [1.0, 1.0], [4.0, -6.0], 0.0)
    ranker = UtilityRanker(model=model)
    ranking = ranker.rank(
        RankQuery("Where was Alison Kreviazuk born?"),
        [
            cand("Where was Tomas Bermudez born?", distance=0.1),
            cand("What is the birthplace of Alison Kreviazuk?", distance=0.3),
        ],
    )
    first, second = ranking.candidates
    assert "Alison" in first.example.request
    assert first.utility is not None
    assert second.utility is not None
    assert first.utility > second.utility
    row = ranking.row(first.example.id)
    assert row is not None
    assert row[col("similarity")] == pytest.approx(0.7)
    assert ranking.row("missing") is None
    assert ranker.rank(RankQuery("x"), []).candidates == []


def test_similarity_ranker_orders_by_distance() -> None:
    model = LogisticModel(("similarity",), [0.0], [1.0], [10.0], -8.0)
    ranking = SimilarityRanker(model=model).rank(
        RankQuery("Where was Alison Kreviazuk born?"),
        [cand("b", distance=0.4), cand("a", distance=0.1), cand("c", distance=0.2)],
    )
    assert [c.example.request for c in ranking.candidates] == ["a", "c", "b"]


def test_online_updates_are_saved_and_reloaded(tmp_path: Path) -> None:
    state = tmp_path / "ranker_state.json"
    model = LogisticModel(("similarity",), [0.5], [0.2], [1.0], 0.0)
    ranker = UtilityRanker(RankConfig(state_path=state, learning_rate=0.5), model=model, calibration=[(0.9, 1.0)])
    ranker.save()
    assert not state.exists()  # nothing learned, nothing written
    row = np.zeros((1, len(FEATURE_NAMES)))
    row[0, col("similarity")] = 0.9
    ranker.observe(row, [0.0])
    ranker.save()
    reloaded = UtilityRanker(RankConfig(state_path=state))
    assert reloaded.model.coef == pytest.approx(ranker.model.coef)
    assert reloaded.calibration == [(0.9, 1.0)]
    frozen = UtilityRanker(
        RankConfig(learning_rate=0.0), model=LogisticModel(("similarity",), [0.5], [0.2], [1.0], 0.0)
    )
    frozen.observe(row, [0.0])
    assert frozen.model.updates == 0


def test_bundle_files_are_checked(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ConfigError, match="not a ranker bundle"):
        read_bundle(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        read_bundle(tmp_path / "missing.json")
    only_similarity = tmp_path / "sim.json"
    write_bundle(
        only_similarity,
        {"rankers": {"similarity": {"model": LogisticModel(("similarity",), [0.0], [1.0], [1.0], 0.0).to_dict()}}},
    )
    with pytest.raises(ConfigError, match="no 'utility' ranker"):
        _ = UtilityRanker(RankConfig(model_path=only_similarity)).model
    assert SimilarityRanker(RankConfig(model_path=only_similarity)).model.features == ("similarity",)


def test_create_ranker_by_kind() -> None:
    assert isinstance(create_ranker(RankConfig(kind="utility")), UtilityRanker)
    assert isinstance(create_ranker(RankConfig(kind="similarity")), SimilarityRanker)


# ------------------------------------------------------------------------------------- shipped weights


def test_the_shipped_ranker_is_trained_and_ranks_traps_below_paraphrases() -> None:
    bundle = read_bundle(None)
    assert bundle is not None, "echo_middleware/data/ranker.json is missing: run benchmarks/train_ranker.py"
    assert bundle["created_by"] == "benchmarks/train_ranker.py"
    utility = bundle["rankers"]["utility"]
    assert tuple(utility["model"]["features"]) == FEATURE_NAMES
    assert len(utility["calibration"]) >= 20
    # retention is a share of all held-out requests: every query has a pair, offloadable or not
    assert len(utility["calibration"]) == utility["metrics"]["queries"]
    assert all(0 <= p <= 1 and 0 <= q <= 1 for p, q in utility["calibration"])
    assert bundle["rankers"]["similarity"]["model"]["features"] == ["similarity"]

    ranker = UtilityRanker()
    assert ranker.source == ""  # weights load on first use, not at construction
    query = RankQuery("What is the birthplace of Alison Kreviazuk?")
    repeat = cand("What is the birthplace of Alison Kreviazuk?", "Mississauga", distance=0.0)
    paraphrase = cand("Where was Alison Kreviazuk born?", "Alison Kreviazuk was born in Mississauga.", distance=0.12)
    # same template, another person: closer in wording than the paraphrase, useless as a demonstration
    trap = cand("What is the birthplace of Tomas Bermudez?", "Granada", distance=0.1)
    order = [c.example.request for c in ranker.rank(query, [trap, paraphrase, repeat]).candidates]
    assert order == [repeat.example.request, paraphrase.example.request, trap.example.request]
    assert ranker.source == "echo_middleware/data/ranker.json"
    utilities = {c.example.request: c.utility for c in ranker.rank(query, [trap, paraphrase, repeat]).candidates}
    # at the default retention target, the shipped calibration lets the repeat through and stops the trap
    threshold = calibrate_threshold(ranker.calibration, RouteConfig().target_retention)
    assert utilities[trap.example.request] < threshold < utilities[repeat.example.request]
