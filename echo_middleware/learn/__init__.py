"""Pipeline stage: learn. Large answers become examples; shadow checks, probes and replay keep estimates honest.

:mod:`echo_middleware.learn.quality` holds the agreement and quality measures shared with the benchmarks;
:mod:`echo_middleware.learn.learner` the background learner (imported from there: it depends on the ranker,
which depends on the quality measures).
"""

from echo_middleware.learn.quality import agreement, gold_score

__all__ = ["agreement", "gold_score"]
