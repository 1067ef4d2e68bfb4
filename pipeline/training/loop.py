"""The one training loop of the specialist, for every method.

Each iteration: a two-stream batch (``labeled_batch_size`` labeled crops + ``unlabeled_batch_size``
unlabeled crops), one student forward pass over both, then

    loss = sup(CE+Dice on labeled) + strategy.consistency(unlabeled) + w_pl(t) * pseudo(unlabeled vs SAM masks)

an optimizer step, and the EMA update of the teacher. The pseudo-label term uses only stored generalist
masks (never labels of unlabeled cases), gated per slice by the generalist's score and per sample by
agreement with the teacher. Its loss is ``train.pseudo_label.loss`` (the official MSE on softmax, the
default, or CE+Dice, the strong form) and its weight follows ``train.pseudo_label.schedule`` from the first
iteration that had pseudo-labels: ramped down to the run's end (official) or ramped up and held (strong).

Every ``log_every`` iterations and on the last one of a round the loop measures how much each unlabeled
term pulls against the supervised one: ``consistency_grad_share`` = |grad of the weighted consistency
loss| / |grad of the supervised loss| over the student's parameters (``pseudo_grad_share`` likewise),
with ``torch.autograd.grad`` before the step (two extra backward passes on those iterations only).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import RunConfig
from pipeline.errors import NonFiniteError
from pipeline.models.unet import UNet, build_model, model_args
from pipeline.progress import Progress
from pipeline.training.losses import PSEUDO_LABEL_LOSSES, ce_dice_loss
from pipeline.training.ramps import rampdown_weight, ramped_weight
from pipeline.training.sampling import sample_crop
from pipeline.training.strategies import UnlabeledBatch, make_strategy

log = logging.getLogger(__name__)


@dataclass
class TrainVolume:
    """One case in memory. image float32 (X, Y, Z), normalised; label uint8 (X, Y, Z) or None (unlabeled)."""

    case_id: str
    image: np.ndarray
    label: np.ndarray | None = None


@dataclass
class PseudoLabel:
    """Stored generalist masks of an unlabeled case, in the volume's axis order.

    labels uint8 (X, Y, Z); slice_weight float32 (S,) along ``slice_axis``: 1 keeps a slice, 0 drops it
    (gating by generalist score, decided when the pseudo-labels are loaded); voxel_weight float32 (X, Y, Z)
    in [0, 1] or None: per-voxel weights (the consensus gate's 0/1, the prompt ensemble's certainty),
    multiplied with the slice weight.
    """

    labels: np.ndarray
    slice_weight: np.ndarray
    voxel_weight: np.ndarray | None = None

    def weight(self, shape: tuple[int, ...], slice_axis: int) -> np.ndarray:
        """float32 ``shape`` (the volume's): slice weight broadcast along ``slice_axis``, times voxel weight."""
        view = [1, 1, 1]
        view[slice_axis] = -1
        w = np.broadcast_to(self.slice_weight.reshape(view).astype(np.float32), shape)
        return w if self.voxel_weight is None else w * self.voxel_weight


def _check_finite(logs: dict[str, float], step: int) -> None:
    """Stop at the first non-finite loss term, naming the step, the term and its value (NonFiniteError)."""
    for term, value in logs.items():
        if not np.isfinite(value):
            raise NonFiniteError(
                f"training stopped at step {step}: the {term} term is {value}; nothing is published, the last "
                "good checkpoint is kept. Lower train.lr (or the term's weight) or check the data (NaN voxels), "
                "then rerun to resume after the last completed round")


def _grad_norm(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> float:
    """L2 norm over ``params`` of d loss / d params, keeping the graph for the real backward pass."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None)))


def _foreground_dice(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample Dice of foreground (any class > 0) between two label maps (B, *S); 1 when both empty."""
    a, b = (a > 0).flatten(1).float(), (b > 0).flatten(1).float()
    inter, total = (a * b).sum(1), a.sum(1) + b.sum(1)
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))


class SpecialistTrainer:
    """Student, EMA teacher, optimizer and step counter; ``train`` runs one round of iterations."""

    def __init__(self, cfg: RunConfig, num_classes: int, device: torch.device):
        self.cfg, self.device, self.num_classes = cfg, device, num_classes
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.model_args = model_args(cfg.model, num_classes)
        self.student: UNet = build_model(self.model_args).to(device)
        self.teacher: UNet = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        t = cfg.train
        if t.optimizer == "adam":
            self.optimizer = torch.optim.Adam(self.student.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(self.student.parameters(), lr=t.lr, momentum=0.9, weight_decay=t.weight_decay)
        # the schedule's length in iterations (train.schedule_rounds, fixed when the run folder was created):
        # UA-MT's threshold ramp and the decreasing pseudo-label ramp span it
        self.total_iterations = (t.schedule_rounds or cfg.rounds) * t.iterations
        self.strategy = make_strategy(t.method, t.consistency, self.total_iterations)
        self.step = 0
        self.first_pseudo_step: int | None = None
        self.on_log = None  # called as on_log(step, values) every train.log_every iterations (TensorBoard)

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "first_pseudo_step": -1 if self.first_pseudo_step is None else self.first_pseudo_step,
            "rng": self.rng.bit_generator.state["state"]["state"] % (2**63),
        }

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        fps = int(state["first_pseudo_step"])
        self.first_pseudo_step = None if fps < 0 else fps  # "rng" is not read: train() seeds by step

    # -- training ------------------------------------------------------------------------------
    def _batch(self, vols: list[TrainVolume], n: int, pseudo: dict[str, PseudoLabel] | None, labeled: bool):
        cfg = self.cfg
        xs, ys, ws = [], [], []
        for _ in range(n):
            v = vols[int(self.rng.integers(len(vols)))]
            if labeled:
                crop = sample_crop(v.image, v.label, None, tuple(cfg.model.patch_size), cfg.data.slice_axis,
                                   self.rng, cfg.train.foreground_crop_probability, cfg.train.augment)
            else:
                pl = None if pseudo is None else pseudo.get(v.case_id)
                weight = None if pl is None else pl.weight(v.image.shape, cfg.data.slice_axis)
                crop = sample_crop(v.image, None if pl is None else pl.labels, weight, tuple(cfg.model.patch_size),
                                   cfg.data.slice_axis, self.rng, 0.0, cfg.train.augment)
                if crop.target is None:  # no pseudo-label for this case yet: excluded from the pseudo term
                    crop.target = np.zeros(crop.image.shape, np.uint8)
                    crop.weight = np.zeros(crop.image.shape, np.float32)
            xs.append(crop.image)
            ys.append(crop.target)
            ws.append(crop.weight)
        x = torch.from_numpy(np.stack(xs))[:, None].to(self.device)
        y = torch.from_numpy(np.stack(ys).astype(np.int64)).to(self.device)
        w = None if labeled else torch.from_numpy(np.stack(ws)).to(self.device)
        return x, y, w

    @torch.no_grad()
    def _ema_update(self) -> None:
        alpha = min(1.0 - 1.0 / (self.step + 1), self.cfg.train.consistency.ema_decay)
        for tp, sp in zip(self.teacher.parameters(), self.student.parameters(), strict=True):
            tp.mul_(alpha).add_(sp.detach(), alpha=1 - alpha)
        for tb, sb in zip(self.teacher.buffers(), self.student.buffers(), strict=True):
            tb.copy_(sb)

    def pseudo_label_weight(self) -> float:
        """Weight of the pseudo-label term at the current step (0 before the first step with pseudo-labels)."""
        pl = self.cfg.train.pseudo_label
        if self.first_pseudo_step is None:
            return 0.0
        if pl.schedule == "down":
            return rampdown_weight(pl.weight, self.step, self.first_pseudo_step, self.total_iterations - 1)
        return ramped_weight(pl.weight, self.step - self.first_pseudo_step, pl.rampup_iterations)

    def train(self, labeled: list[TrainVolume], unlabeled: list[TrainVolume],
              pseudo: dict[str, PseudoLabel] | None, iterations: int) -> dict[str, float]:
        """Run ``iterations`` steps; returns the mean of each logged value over the iterations that logged it
        (``sup``, ``loss``, ``consistency``, ``certain_fraction`` (UA-MT), ``consistency_grad_share``,
        ``pseudo``, ``pseudo_weight``, ``pseudo_grad_share``, ...)."""
        t = self.cfg.train
        pl_cfg = t.pseudo_label
        use_pseudo = bool(pseudo) and pl_cfg.active
        n_unl = t.unlabeled_batch_size if unlabeled else 0
        if not self.strategy.uses_teacher and not use_pseudo:
            n_unl = 0  # supervised without pseudo-labels: unlabeled crops would not be used
        if use_pseudo and self.first_pseudo_step is None:
            self.first_pseudo_step = self.step
        # A round's randomness (crops, augmentation, consistency noise) is a function of the seed and the step
        # it starts at, not of what this process drew before: a round redone after a restart from its
        # checkpoint draws exactly what the run without the fault drew (same weights, same metrics).
        self.rng = np.random.default_rng([self.cfg.seed, self.step])
        torch.manual_seed(self.cfg.seed * 1_000_003 + self.step)
        self.student.train()
        self.teacher.train()
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}
        pseudo_loss = PSEUDO_LABEL_LOSSES[pl_cfg.loss]
        params = [p for p in self.student.parameters() if p.requires_grad]
        # a plain line every progress_seconds: iterations/s and ETA (a slow round must not look like a hang)
        progress = Progress(f"training (step {self.step})", iterations, "it", log, every_s=t.progress_seconds)
        for i in range(iterations):
            measure = (self.step + 1) % t.log_every == 0 or i == iterations - 1
            terms: dict[str, torch.Tensor] = {}
            xl, yl, _ = self._batch(labeled, t.labeled_batch_size, None, labeled=True)
            if n_unl:
                xu, yu, wu = self._batch(unlabeled, n_unl, pseudo if use_pseudo else None, labeled=False)
                logits = self.student(torch.cat([xl, xu]))
                logits_l, logits_u = logits[: len(xl)], logits[len(xl):]
            else:
                logits_l = self.student(xl)
            sup = ce_dice_loss(logits_l, yl)
            loss = sup
            logs = {"sup": sup.item()}
            if n_unl and self.strategy.uses_teacher:
                cons, extra = self.strategy.consistency_loss(UnlabeledBatch(xu, logits_u, self.step), self.teacher)
                loss = loss + cons
                terms["consistency_grad_share"] = cons
                logs.update(extra)
            if n_unl and use_pseudo:
                if pl_cfg.min_teacher_agreement > 0:
                    with torch.no_grad():
                        agree = _foreground_dice(self.teacher(xu).argmax(1), yu)
                    keep = (agree >= pl_cfg.min_teacher_agreement).float()
                    wu = wu * keep.view(-1, *([1] * (wu.dim() - 1)))
                    logs["pl_kept"] = float(keep.mean())
                w_pl = self.pseudo_label_weight()
                if float(wu.sum()) > 0:
                    pl_loss = pseudo_loss(logits_u, yu, wu)
                    loss = loss + w_pl * pl_loss
                    terms["pseudo_grad_share"] = w_pl * pl_loss
                    logs["pseudo"] = pl_loss.item()
                logs["pseudo_weight"] = w_pl
            if measure and terms:
                sup_norm = max(_grad_norm(sup, params), 1e-12)
                for key, term in terms.items():
                    logs[key] = _grad_norm(term, params) / sup_norm
            logs["loss"] = loss.item()
            _check_finite(logs, self.step + 1)  # before the step: the weights stay those of the last good step
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.step += 1
            self._ema_update()
            for k, v in logs.items():
                totals[k] = totals.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
            if self.step % t.log_every == 0:
                log.info("step %d: %s", self.step, " ".join(f"{k}={v:.4f}" for k, v in logs.items()))
                if self.on_log is not None:
                    self.on_log(self.step, logs)
            progress.advance(1, extra=f"loss {logs['loss']:.4f}")
        for name, net in (("student", self.student), ("teacher", self.teacher)):
            bad = next((n for n, p in net.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()), None)
            if bad is not None:
                raise NonFiniteError(f"training stopped at step {self.step}: the {name}'s {bad} holds non-finite "
                                     "values; nothing is published, the last good checkpoint is kept. Lower "
                                     "train.lr or check the data (NaN voxels)")
        # a key missing from some iterations (e.g. 'pseudo' when a batch was gated out) is averaged over
        # the iterations that had it
        return {k: v / counts[k] for k, v in totals.items()}
