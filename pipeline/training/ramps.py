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


def rampdown_weight(weight: float, step: float, start: int, end: int) -> float:
    """``weight * sigmoid_rampup(end - step, end - start)``: ``weight`` at ``start``, falling along the
    mirrored sigmoid ramp to ``weight * exp(-5)`` at ``end`` (and held there); zero before ``start``.

    The decreasing SemiSAM weight of the official code (YichiZhang98/SemiSAM, ``code/train_LA_semisam_mt.py``)::

        consistency_weight_sam = get_current_consistency_weight((args.max_iterations - iter_num )//150)
        ...
        sam_con_loss = 0.5 * consistency_weight_sam * sam_consistency

    with ``get_current_consistency_weight(e) = 0.1 * sigmoid_rampup(e, 40)`` and ``max_iterations = 6000
    = 40 * 150``: 0.05 at the first iteration, 0.05 * exp(-5) at the last. Here the ramp spans the
    iterations that have pseudo-labels (``start`` = the first of them, ``end`` = the run's last), without
    the official 150-iteration steps.
    """
    if step < start:
        return 0.0
    return weight * sigmoid_rampup(end - step, end - start)


def uamt_threshold(step: float, total_iterations: int, num_classes: int, start: float = 0.75,
                   end: float = 1.0) -> float:
    """UA-MT uncertainty threshold in nats: ``(start + (end - start) * sigmoid_rampup(step, total)) * ln(C)``.

    With the defaults this is SSL4MIS's ``(0.75 + 0.25 * ramps.sigmoid_rampup(iter_num, max_iterations))
    * np.log(2)`` for C classes: (0.75 + 0.25 e^-5) ln C = 0.752 ln C at step 0, 0.82 ln C half way, ln C
    (the largest entropy possible, which keeps every voxel) only at the run's last iteration.
    """
    return (start + (end - start) * sigmoid_rampup(step, total_iterations)) * math.log(num_classes)


def poly_lr(base_lr: float, step: int, total: int, power: float = 0.9) -> float:
    """SSL4MIS's poly decay: ``base_lr * (1 - step / total) ** power`` for the update after ``step`` updates
    (``base_lr`` at step 0, 0 at ``total``; held at 0 past it, for a run resumed with more rounds)."""
    if total <= 0:
        return base_lr
    return base_lr * max(0.0, 1.0 - step / total) ** power
