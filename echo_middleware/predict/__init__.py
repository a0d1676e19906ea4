"""Pipeline stage: predict each request's output length, so the scheduler can serve short jobs first."""

from echo_middleware.predict.length import LengthPrediction, LengthPredictor, LengthSample
from echo_middleware.predict.metrics import length_errors, spearman

__all__ = ["LengthPrediction", "LengthPredictor", "LengthSample", "length_errors", "spearman"]
