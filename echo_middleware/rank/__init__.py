"""Pipeline stage: rank. Score each retrieved example's *utility* for this request, and build the small prompt.

:class:`UtilityRanker` is a learned proxy over pair features (:mod:`~echo_middleware.rank.features`);
:class:`SimilarityRanker` is the nearest-neighbour baseline. :func:`select_examples` and :func:`assemble_prompt`
turn the ranking into the small model's prompt within its context window.
"""

from echo_middleware.rank.base import Ranker, Ranking
from echo_middleware.rank.features import FEATURE_NAMES, RankQuery, pair_features
from echo_middleware.rank.model import LogisticModel
from echo_middleware.rank.prompt import AssembledPrompt, assemble_prompt, select_examples
from echo_middleware.rank.utility import RANKERS, LearnedRanker, SimilarityRanker, UtilityRanker, create_ranker

__all__ = [
    "FEATURE_NAMES",
    "RANKERS",
    "AssembledPrompt",
    "LearnedRanker",
    "LogisticModel",
    "RankQuery",
    "Ranker",
    "Ranking",
    "SimilarityRanker",
    "UtilityRanker",
    "assemble_prompt",
    "create_ranker",
    "pair_features",
    "select_examples",
]
