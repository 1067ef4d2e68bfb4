"""Schedules: pure functions of the step (after SSL4MIS's ramps.py, Laine & Aila 2017)."""

from __future__ import annotations

import math


def sigmoid_rampup(step: float, length: int) -> float:
    """exp(-5 (1 - t)^2) with t = step/length clipped to [0, 1]; 1.0 when length is 0."""
    if length <= 0:
        return 1.0
    t = min(max(step, 0.0), length) / length
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def linear_rampup(step: float, length: int) -> float:
    """step/length clipped to [0, 1]; 1.0 when length is 0."""
    if length <= 0:
        return 1.0
    return float(min(max(step, 0.0), length) / length)


def ramped_weight(weight: float, step: float, length: int) -> float:
    """``weight * sigmoid_rampup(step, length)``; zero before step 0."""
    return 0.0 if step < 0 else weight * sigmoid_rampup(step, length)
