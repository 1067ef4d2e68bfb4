"""Losses on logits ``(B, C, *spatial)`` and integer targets ``(B, *spatial)``.

``weights`` are per-sample ``(B,)`` or per-voxel ``(B, *spatial)`` in [0, 1]; a zero weight removes that
sample/voxel from the loss (used by pseudo-label gating). All reductions are means over what is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _voxel_weights(weights: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor:
    if weights is None:
        return torch.ones(target.shape, device=target.device)
    while weights.dim() < target.dim():
        weights = weights[..., None]
    return weights.expand(target.shape).float()


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None,
                   eps: float = 1e-5) -> torch.Tensor:
    """1 - mean over classes (background included) of the batch soft Dice (V-Net/SSL4MIS style)."""
    probs = logits.softmax(1)
    onehot = F.one_hot(target.long(), logits.shape[1]).movedim(-1, 1).float()
    w = _voxel_weights(weights, target)[:, None]
    dims = [0, *range(2, logits.dim())]
    inter = (probs * onehot * w).sum(dims)
    denom = (probs * w).sum(dims) + (onehot * w).sum(dims)
    return 1.0 - ((2 * inter + eps) / (denom + eps)).mean()


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    ce = F.cross_entropy(logits, target.long(), reduction="none")
    w = _voxel_weights(weights, target)
    return (ce * w).sum() / w.sum().clamp_min(1.0)


def ce_dice_loss(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """0.5 * (CE + soft Dice), the supervised loss of SSL4MIS and SemiSAM."""
    return 0.5 * (weighted_cross_entropy(logits, target, weights) + soft_dice_loss(logits, target, weights))


def softmax_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-voxel squared error between softmax outputs, **averaged** over classes: ``(B, *spatial)``.

    As SSL4MIS: Mean Teacher takes ``torch.mean((student_soft - teacher_soft) ** 2)`` and UA-MT
    ``sum(mask * softmax_mse_loss(...)) / (2 * sum(mask))`` with 2 classes, both means over classes.
    """
    return ((student_logits.softmax(1) - teacher_logits.softmax(1)) ** 2).mean(1)


def pseudo_label_mse(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between the student's softmax ``(B, C, *S)`` and the one-hot of ``target`` ``(B, *S)``, the
    SemiSAM term of the official code (``torch.mean((outputs_soft[labeled_bs:] - samseg_soft[labeled_bs:])**2)``):
    mean over classes, then the ``weights``-weighted mean over voxels (0 when every weight is 0)."""
    onehot = F.one_hot(target.long(), logits.shape[1]).movedim(-1, 1).float()
    per_voxel = ((logits.softmax(1) - onehot) ** 2).mean(1)
    w = _voxel_weights(weights, target)
    return (per_voxel * w).sum() / w.sum().clamp_min(1.0)


PSEUDO_LABEL_LOSSES = {"ce_dice": ce_dice_loss, "mse": pseudo_label_mse}
"""``train.pseudo_label.loss`` -> loss(logits, target, weights)."""


def entropy(probs: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Predictive entropy over the class axis: ``(B, C, *S)`` -> ``(B, *S)``, in nats."""
    return -(probs * (probs + eps).log()).sum(1)
