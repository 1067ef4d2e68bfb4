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

How it runs on the device (precision, channels_last, compile) is chosen by ``pipeline.training.runtime``
from what the machine has, and logged once. Batches are built ahead in a background thread
(``pipeline.training.prefetch``; the same batches as building them in the loop). Logged values stay
tensors on the device and are read (a host sync) only every ``log_every`` iterations and at a round's end,
where the losses of the iterations since the last read are checked for NaN/inf.
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
from pipeline.training.losses import ce_dice_loss
from pipeline.training.prefetch import Prefetcher
from pipeline.training.pseudo_labels import PseudoLabel
from pipeline.training.pseudo_term import PseudoLabelTerm
from pipeline.training.ramps import poly_lr
from pipeline.training.runtime import RuntimeForward, resolve_train_runtime
from pipeline.training.sampling import sample_crop
from pipeline.training.strategies import UnlabeledBatch, make_strategy

log = logging.getLogger(__name__)


@dataclass
class TrainVolume:
    """One case in memory. image float32 (X, Y, Z), normalised; label uint8 (X, Y, Z) or None (unlabeled)."""

    case_id: str
    image: np.ndarray
    label: np.ndarray | None = None


def _check_finite(history: list[dict[str, torch.Tensor | float]], first_step: int) -> None:
    """Stop at the first non-finite loss term among the iterations of ``history`` (iteration ``first_step``
    first), naming the step, the term and its value (NonFiniteError). One host sync for all of them."""
    if not history:
        return
    for key in history[0]:
        values = torch.stack([torch.as_tensor(h[key], dtype=torch.float64).reshape(()).cpu()
                              for h in history if key in h])
        bad = (~torch.isfinite(values)).nonzero()
        if len(bad):
            steps = [first_step + i for i, h in enumerate(history) if key in h]
            i = int(bad[0])
            raise NonFiniteError(
                f"training stopped at step {steps[i]}: the {key} term is {float(values[i])}; nothing is "
                "published, the last good checkpoint is kept. Lower train.lr (or the term's weight) or check "
                "the data (NaN voxels), then rerun to resume after the last completed round")


def _grad_norm(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> float:
    """L2 norm over ``params`` of d loss / d params, keeping the graph for the real backward pass."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None)))


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
        self.runtime = resolve_train_runtime(cfg.train, cfg.model, device)
        log.info("%s", self.runtime.describe())
        self.student_fwd = RuntimeForward(self.student, self.runtime, "student")
        self.teacher_fwd = RuntimeForward(self.teacher, self.runtime, "teacher")
        self.scaler = self.runtime.grad_scaler()
        t = cfg.train
        if t.optimizer == "adam":
            self.optimizer = torch.optim.Adam(self.student.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(self.student.parameters(), lr=t.lr, momentum=0.9, weight_decay=t.weight_decay)
        # the schedule's length in iterations (train.schedule_rounds, fixed when the run folder was created):
        # UA-MT's threshold ramp and the decreasing pseudo-label ramp span it
        self.total_iterations = (t.schedule_rounds or cfg.rounds) * t.iterations
        self.strategy = make_strategy(t.method, t.consistency, self.total_iterations)
        self.term = PseudoLabelTerm(t.pseudo_label, self.total_iterations)
        self.step = 0
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
        """``n`` crops of ``vols`` as NumPy arrays: images float32 (n, *P), targets uint8 (n, *P), weights
        float32 (n, *P) (unlabeled) or None. Draws from ``self.rng`` (called in one thread, in order)."""
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
        return np.stack(xs), np.stack(ys), (None if labeled else np.stack(ws))

    def _batches(self, labeled: list[TrainVolume], unlabeled: list[TrainVolume], n_unl: int,
                 pseudo: dict[str, PseudoLabel] | None):
        """The function that builds one iteration's two-stream batch (host arrays), for ``Prefetcher``."""
        n_lab = self.cfg.train.labeled_batch_size

        def make() -> dict:
            xl, yl, _ = self._batch(labeled, n_lab, None, labeled=True)
            batch = {"xl": xl, "yl": yl}
            if n_unl:
                xu, yu, wu = self._batch(unlabeled, n_unl, pseudo, labeled=False)
                batch.update(xu=xu, yu=yu, wu=wu, has_pseudo=bool(wu.any()))
            return batch
        return make

    def _to_device(self, batch: dict) -> dict:
        """Host arrays -> tensors on the device: images (B, 1, *P) float32, targets (B, *P) int64."""
        out = {}
        for key, value in batch.items():
            if not isinstance(value, np.ndarray):
                out[key] = value
                continue
            t = torch.from_numpy(value.astype(np.int64) if key[0] == "y" else value)
            if key[0] == "x":
                t = t[:, None]
            out[key] = t.to(self.device, non_blocking=True)
        return out

    @torch.no_grad()
    def _ema_update(self) -> None:
        alpha = min(1.0 - 1.0 / (self.step + 1), self.cfg.train.consistency.ema_decay)
        for tp, sp in zip(self.teacher.parameters(), self.student.parameters(), strict=True):
            tp.mul_(alpha).add_(sp.detach(), alpha=1 - alpha)
        for tb, sb in zip(self.teacher.buffers(), self.student.buffers(), strict=True):
            tb.copy_(sb)

    # -- the pseudo-label term ---------------------------------------------------------------------
    @property
    def first_pseudo_step(self) -> int | None:
        """The first step that had pseudo-labels (the term's weight schedule starts there), or None."""
        return self.term.first_step

    @first_pseudo_step.setter
    def first_pseudo_step(self, step: int | None) -> None:
        self.term.first_step = step

    def pseudo_label_weight(self) -> float:
        """Weight of the pseudo-label term at the current step (0 before the first step with pseudo-labels)."""
        return self.term.weight(self.step)

    # -- one round -------------------------------------------------------------------------------
    def train(self, labeled: list[TrainVolume], unlabeled: list[TrainVolume],
              pseudo: dict[str, PseudoLabel] | None, iterations: int) -> dict[str, float]:
        """Run ``iterations`` steps; returns the mean of each logged value over the iterations that logged it
        (``sup``, ``loss``, ``consistency``, ``certain_fraction`` (UA-MT), ``consistency_grad_share``,
        ``pseudo``, ``pseudo_weight``, ``pseudo_grad_share``, ...): a key missing from some iterations (e.g.
        ``pseudo`` when a batch was gated out) is averaged over the iterations that had it."""
        t = self.cfg.train
        use_pseudo = bool(pseudo) and self.term.active
        n_unl = t.unlabeled_batch_size if unlabeled else 0
        if not self.strategy.uses_teacher and not use_pseudo:
            n_unl = 0  # supervised without pseudo-labels: unlabeled crops would not be used
        if use_pseudo:
            self.term.begin(self.step)
        self._seed_round()
        self.student.train()
        self.teacher.train()
        totals: dict[str, torch.Tensor | float] = {}
        counts: dict[str, int] = {}
        history: list[dict] = []  # logged values of the iterations since the last finiteness check
        last_loss = ""
        # a plain line every progress_seconds: iterations/s and ETA (a slow round must not look like a hang)
        first, last = self.step + 1, self.step + iterations
        progress = Progress(f"training steps {first}-{last}", iterations, "it", log, every_s=t.progress_seconds)
        make = self._batches(labeled, unlabeled if n_unl else [], n_unl, pseudo if use_pseudo else None)
        with Prefetcher(make, iterations, t.prefetch_batches) as batches:
            for i, batch in enumerate(batches):
                measure = (self.step + 1) % t.log_every == 0 or i == iterations - 1
                logs = self._step(self._to_device(batch), n_unl, pseudo if use_pseudo else None, measure)
                history.append(logs)
                for k, v in logs.items():
                    totals[k] = totals.get(k, 0.0) + (v.detach() if isinstance(v, torch.Tensor) else v)
                    counts[k] = counts.get(k, 0) + 1
                if measure:  # the one host sync of these iterations
                    _check_finite(history, self.step - len(history) + 1)
                    history = []
                    values = {k: float(v) for k, v in logs.items()}
                    last_loss = f"loss {values['loss']:.4f}"
                    if self.step % t.log_every == 0:
                        log.info("step %d: %s", self.step, " ".join(f"{k}={v:.4f}" for k, v in values.items()))
                        if self.on_log is not None:
                            self.on_log(self.step, values)
                progress.advance(1, extra=last_loss)
        self._check_weights()
        return {k: float(v) / counts[k] for k, v in totals.items()}

    def _seed_round(self) -> None:
        """A round's randomness (crops, augmentation, consistency noise) is a function of the seed and the step
        it starts at, not of what this process drew before: a round redone after a restart from its
        checkpoint draws exactly what the run without the fault drew (same weights, same metrics)."""
        self.rng = np.random.default_rng([self.cfg.seed, self.step])
        torch.manual_seed(self.cfg.seed * 1_000_003 + self.step)

    def _lr(self) -> float:
        t = self.cfg.train
        if t.lr_schedule == "poly":
            return poly_lr(t.lr, self.step, self.total_iterations, t.lr_poly_power)
        return t.lr

    def _step(self, batch: dict, n_unl: int, pseudo: dict[str, PseudoLabel] | None,
              measure: bool) -> dict[str, torch.Tensor | float]:
        """One iteration on a batch already on the device: the losses (see the module docstring), the
        optimizer step and the teacher's EMA update. ``measure``: also the gradient share of each unlabeled
        term. Returns the logged values, tensors on the device (no host sync here)."""
        xl, yl = batch["xl"], batch["yl"]
        # the gradient shares need a graph that survives two extra backward passes: a compiled backward
        # frees (donates) its buffers, so measured iterations run the student eager (same weights)
        student = self.student_fwd.eager if measure else self.student_fwd
        if n_unl:
            xu, yu, wu = batch["xu"], batch["yu"], batch["wu"]
            logits = student(torch.cat([xl, xu]))
            logits_l, logits_u = logits[: len(xl)], logits[len(xl):]
        else:
            logits_l = student(xl)
        sup = ce_dice_loss(logits_l, yl)
        loss, logs, terms = sup, {"sup": sup.detach()}, {}
        if n_unl and self.strategy.uses_teacher:
            cons, extra = self.strategy.consistency_loss(UnlabeledBatch(xu, logits_u, self.step), self.teacher_fwd)
            loss = loss + cons
            terms["consistency_grad_share"] = cons
            logs.update(extra)
        if n_unl and pseudo and batch["has_pseudo"]:
            term, extra = self.term.loss(logits_u, yu, wu, xu, self.teacher_fwd, self.step)
            if term is not None:
                loss = loss + term
                terms["pseudo_grad_share"] = term
            logs.update(extra)
        elif n_unl and pseudo:
            logs["pseudo_weight"] = self.term.weight(self.step)
        if measure and terms:  # two extra backward passes, on these iterations only
            params = [p for p in self.student.parameters() if p.requires_grad]
            sup_norm = max(_grad_norm(sup, params), 1e-12)
            logs.update({key: _grad_norm(term, params) / sup_norm for key, term in terms.items()})
        logs["loss"] = loss.detach()
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.step += 1
        self._ema_update()
        return logs

    def _check_weights(self) -> None:
        """After a round: every weight of student and teacher is finite, else NonFiniteError (nothing published)."""
        for name, net in (("student", self.student), ("teacher", self.teacher)):
            bad = next((n for n, p in net.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()), None)
            if bad is not None:
                raise NonFiniteError(f"training stopped at step {self.step}: the {name}'s {bad} holds non-finite "
                                     "values; nothing is published, the last good checkpoint is kept. Lower "
                                     "train.lr or check the data (NaN voxels)")
