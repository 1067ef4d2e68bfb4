"""TensorBoard event files in the run folder, the convention Ray and PyTorch users expect:
``tensorboard --logdir <run folder>/tb``.

- ``tb/train``: every ``train.log_every`` iterations, each logged training value (``sup``, ``consistency``,
  ``pseudo``, ``pseudo_weight``, the gradient shares, ``loss``), at the global step. The trainer writes it.
- ``tb/rounds``: once per round, at the round number: the test metrics (mean and per class, by class name),
  the audit of the pseudo-labels, the relabel statistics and the round's mean training loss. The driver
  writes it.

TensorBoard's writer writes local files only: on a run folder in object storage no events are written
(one log line says so). A round redone after a restart writes its steps again; TensorBoard shows both.
"""

from __future__ import annotations

import logging
import math
import os

from pipeline.run_folder import RunFolder
from pipeline.storage import Location

log = logging.getLogger(__name__)



class EventLog:
    """One TensorBoard event stream (``<run folder>/tb/<name>``); a no-op when the folder is not local."""

    def __init__(self, run_dir: Location, name: str):
        self.writer = None
        if not run_dir.is_local:
            log.info("TensorBoard events are written to local run folders only; %s is not one", run_dir)
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=os.path.join(RunFolder(run_dir).events.path, name), flush_secs=10)

    def scalars(self, step: int, values: dict, prefix: str = "") -> None:
        """``values`` {name: number} at ``step``, each as ``<prefix>/<name>``; non-numbers and NaN are skipped."""
        if self.writer is None:
            return
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
                continue
            self.writer.add_scalar(f"{prefix}/{name}" if prefix else name, float(value), step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def round_scalars(summary: dict, class_names: dict[int, str]) -> dict[str, float]:
    """The numbers of one round summary (``RoundSummary`` as a dict) under TensorBoard tags: ``test/dice``,
    ``test/dice_<class name>``, ``audit/pseudo_dice``, ``audit/<class name>/pseudo_dice``, ``relabel/...``,
    ``train/loss``."""
    out: dict[str, float] = {}
    from pipeline.reports import class_label

    for key, value in summary.get("test", {}).items():
        if key.startswith("dice_class"):
            key = f"dice_{class_label(key, class_names)}"
        out[f"test/{key}"] = value
    audit = summary.get("audit", {})
    for key, value in audit.items():
        if key == "by_class":
            for cid, per in value.items():
                for k, v in per.items():
                    out[f"audit/{class_names.get(int(cid), f'class{cid}')}/{k}"] = v
        else:
            out[f"audit/{key}"] = value
    for key in ("score_mean", "agreement_dice", "fg_uncertainty", "cases", "slices", "prompted_slices"):
        if key in summary.get("relabel", {}):
            out[f"relabel/{key}"] = summary["relabel"][key]
    if "loss" in summary.get("train", {}):
        out["train/loss"] = summary["train"]["loss"]
    return out
