"""Semi-supervised methods as strategies over the one training loop.

A strategy turns the student's logits on the unlabeled part of the batch (and the teacher) into a
consistency loss. The supervised loss, the SemiSAM pseudo-label term, the optimizer step and the EMA
update live in the loop (``pipeline.training.loop``) and are the same for every method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from pipeline.config import ConsistencyConfig
from pipeline.training.losses import entropy, softmax_mse
from pipeline.training.ramps import ramped_weight, uamt_threshold


@dataclass
class UnlabeledBatch:
    """What a strategy sees. x: (B, 1, *S) unlabeled inputs; student_logits: (B, C, *S)."""

    x: torch.Tensor
    student_logits: torch.Tensor
    step: int


def noisy(x: torch.Tensor, cfg: ConsistencyConfig) -> torch.Tensor:
    """Gaussian input noise, clipped (Mean Teacher's input perturbation as in SSL4MIS)."""
    return x + (torch.randn_like(x) * cfg.noise_std).clamp(-cfg.noise_clip, cfg.noise_clip)


class Strategy(Protocol):
    uses_teacher: bool

    def consistency_loss(self, batch: UnlabeledBatch, teacher: torch.nn.Module) -> tuple[torch.Tensor, dict]:
        """Weighted consistency loss (already multiplied by its ramped weight) and scalars to log."""
        ...


class Supervised:
    """Labeled loss only (plus the SemiSAM term when pseudo-labels exist)."""

    uses_teacher = False

    def __init__(self, cfg: ConsistencyConfig, total_iterations: int):
        self.cfg = cfg

    def consistency_loss(self, batch: UnlabeledBatch, teacher: torch.nn.Module) -> tuple[torch.Tensor, dict]:
        return batch.student_logits.sum() * 0.0, {}


class MeanTeacher:
    """Tarvainen & Valpola 2017: MSE between student and EMA-teacher softmax on noisy unlabeled input
    (mean over voxels and classes, as SSL4MIS)."""

    uses_teacher = True

    def __init__(self, cfg: ConsistencyConfig, total_iterations: int):
        self.cfg = cfg

    def consistency_loss(self, batch: UnlabeledBatch, teacher: torch.nn.Module) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            teacher_logits = teacher(noisy(batch.x, self.cfg))
        w = ramped_weight(self.cfg.weight, batch.step, self.cfg.rampup_iterations)
        loss = softmax_mse(batch.student_logits, teacher_logits).mean()
        return w * loss, {"consistency": loss.detach(), "consistency_weight": w}


class UncertaintyAwareMeanTeacher:
    """Yu et al. 2019 (UA-MT) as SSL4MIS runs it: consistency only where the entropy of the teacher's
    mean softmax over ``uamt_passes`` noisy, dropout-on passes is below the threshold
    :func:`~pipeline.training.ramps.uamt_threshold`, which ramps from 0.75 ln C to ln C along a sigmoid
    over the whole run (``total_iterations`` = rounds x iterations per round)."""

    uses_teacher = True

    def __init__(self, cfg: ConsistencyConfig, total_iterations: int):
        self.cfg = cfg
        self.total_iterations = total_iterations

    def consistency_loss(self, batch: UnlabeledBatch, teacher: torch.nn.Module) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        num_classes = batch.student_logits.shape[1]
        with torch.no_grad():
            was_training = teacher.training
            teacher.train()  # dropout on for Monte Carlo passes
            probs = torch.stack([teacher(noisy(batch.x, cfg)).softmax(1) for _ in range(cfg.uamt_passes)]).mean(0)
            teacher.train(was_training)
            teacher_logits = teacher(noisy(batch.x, cfg))
            uncertainty = entropy(probs)
        threshold = uamt_threshold(batch.step, self.total_iterations, num_classes, cfg.uamt_threshold_start,
                                   cfg.uamt_threshold_end)
        mask = (uncertainty < threshold).float()
        per_voxel = softmax_mse(batch.student_logits, teacher_logits)
        loss = (per_voxel * mask).sum() / (mask.sum() + 1e-6)
        w = ramped_weight(cfg.weight, batch.step, cfg.rampup_iterations)
        return w * loss, {"consistency": loss.detach(), "consistency_weight": w, "certain_fraction": mask.mean(),
                          "uamt_threshold": threshold}


STRATEGIES: dict[str, type] = {
    "supervised": Supervised,
    "mean_teacher": MeanTeacher,
    "uamt": UncertaintyAwareMeanTeacher,
}


def make_strategy(method: str, cfg: ConsistencyConfig, total_iterations: int) -> Strategy:
    """The strategy of ``train.method``; ``total_iterations`` is the run's length (UA-MT's threshold ramp)."""
    return STRATEGIES[method](cfg, total_iterations)
