"""The SemiSAM term as a strategy beside the method's :class:`~pipeline.training.strategies.Strategy`: which
stored masks it trusts (its gates), its weight at a step, and its loss, in one place.

Gates. When a round's masks are loaded (:meth:`PseudoLabelTerm.load`): a prompted slice is dropped when its
mean generalist score is below ``min_sam_score`` or a prompted class came back empty; ``consensus_only``
drops voxels where the mask differs from the specialist prediction it was prompted from;
``uncertainty_weighting`` weights voxels by the prompt ensemble's certainty; ``generalist_voxels_only`` drops
voxels that only classes taken from the specialist (``generalist.class_source``) decide. During training
(:meth:`PseudoLabelTerm.loss`): ``min_teacher_agreement`` drops whole samples whose mask the EMA teacher
disagrees with (foreground Dice below it).

Weight. From the first step that had pseudo-labels (``first_step``): ramped down to the end of the run's
schedule (``schedule: down``, the official form) or ramped up over ``rampup_iterations`` and held
(``schedule: up``, the strong form). The loss is ``train.pseudo_label.loss`` (MSE on softmax, or CE+Dice).
Only stored generalist masks enter; never a label of an unlabeled case.
"""

from __future__ import annotations

import torch

from pipeline.store import PseudoLabelStore
from pipeline.training.losses import PSEUDO_LABEL_LOSSES
from pipeline.training.pseudo_labels import PseudoLabel, load_pseudo_labels
from pipeline.training.ramps import rampdown_weight, ramped_weight


def foreground_dice(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample Dice of foreground (any class > 0) between two label maps (B, *S); 1 when both empty."""
    a, b = (a > 0).flatten(1).float(), (b > 0).flatten(1).float()
    inter, total = (a * b).sum(1), a.sum(1) + b.sum(1)
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))


class PseudoLabelTerm:
    """``cfg``: ``train.pseudo_label``; ``total_iterations``: the schedule's length (the ramp down ends there)."""

    def __init__(self, cfg, total_iterations: int):
        self.cfg, self.total_iterations = cfg, total_iterations
        self.loss_fn = PSEUDO_LABEL_LOSSES[cfg.loss]
        self.first_step: int | None = None

    @property
    def active(self) -> bool:
        return self.cfg.active

    def load(self, store: PseudoLabelStore, round_index: int, case_ids: list[str], slice_axis: int) -> dict[str, PseudoLabel]:
        """A round's masks for ``case_ids``, with the load-time gates (see the module docstring)."""
        return load_pseudo_labels(store, round_index, case_ids, slice_axis, self.cfg.min_sam_score,
                                  self.cfg.consensus_only, self.cfg.uncertainty_weighting,
                                  self.cfg.generalist_voxels_only)

    def begin(self, step: int) -> None:
        """Called when a round with pseudo-labels starts at ``step``: the weight's schedule starts at the first."""
        if self.first_step is None:
            self.first_step = step

    def weight(self, step: int) -> float:
        """The term's weight at ``step`` (0 before the first step with pseudo-labels)."""
        if self.first_step is None:
            return 0.0
        if self.cfg.schedule == "down":
            return rampdown_weight(self.cfg.weight, step, self.first_step, self.total_iterations - 1)
        return ramped_weight(self.cfg.weight, step - self.first_step, self.cfg.rampup_iterations)

    def loss(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, x: torch.Tensor,
             teacher, step: int) -> tuple[torch.Tensor | None, dict[str, torch.Tensor | float]]:
        """The weighted term on an unlabeled batch: student ``logits`` (B, C, *S), stored masks ``target``
        (B, *S) int64 with voxel ``weight`` (B, *S) (0 where no mask or gated), the batch ``x`` (B, 1, *S)
        for the teacher's gate. Returns (``w(step) * loss``, or None when every voxel is gated out; logs:
        ``pl_kept`` (with the teacher gate), ``pseudo`` (the unweighted loss), ``pseudo_weight``; tensors stay on
        the device). The caller skips batches whose stored masks are all gated out (known on the host);
        with the teacher gate, a batch it empties gives None.
        ``teacher``: a callable (B, 1, *S) -> logits, the loop's ``RuntimeForward``."""
        logs: dict[str, torch.Tensor | float] = {}
        w = self.weight(step)
        logs["pseudo_weight"] = w
        if self.cfg.min_teacher_agreement > 0:
            with torch.no_grad():
                agree = foreground_dice(teacher(x).argmax(1), target)
            keep = (agree >= self.cfg.min_teacher_agreement).float()
            weight = weight * keep.view(-1, *([1] * (weight.dim() - 1)))
            logs["pl_kept"] = keep.mean()
            if float(weight.sum()) == 0:  # a host sync, with the teacher gate only
                return None, logs
        raw = self.loss_fn(logits, target, weight)
        term = w * raw
        logs["pseudo"] = raw.detach()
        return term, logs
