"""Pipeline stage: route. Offload to the small model with examples, or not: calibrated, load-aware, explained."""

from echo_middleware.route.calibration import NO_OFFLOAD, Calibrator, calibrate_threshold, retention_curve
from echo_middleware.route.policy import OffloadPolicy, RouteDecision

__all__ = ["NO_OFFLOAD", "Calibrator", "OffloadPolicy", "RouteDecision", "calibrate_threshold", "retention_curve"]
