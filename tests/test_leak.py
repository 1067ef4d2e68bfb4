"""Prompts come only from predictions, never from labels.

The released SemiSAM code builds prompts for unlabeled scans from their ground truth. Here the label
files of the unlabeled cases are replaced by garbage, every file the process opens is recorded with a
Python audit hook, and the whole relabel path (validation, SAM worker, training on the pseudo-labels)
runs: no unlabeled case's label file may be opened, and the pseudo-labels must be identical to those
made from the intact dataset.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from pipeline.config import config_from_dict
from pipeline.coordinator import preflight
from pipeline.store import PseudoLabelStore
from tests.conftest import small_config_dict
from workers.sam_worker import SamWorker
from workers.trainer import TrainerWorker

_OPENED: list[str] | None = None


def _record_opens(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_record_opens)


def _relabel(data_root: Path, run_root: Path, sam_ckpt: Path, weights: dict, model_args: dict, cases: list[str]):
    cfg_dict = small_config_dict(data_root, run_root, sam_ckpt)
    cfg = config_from_dict(cfg_dict)
    preflight(cfg)
    store = PseudoLabelStore(cfg.run_dir / "pseudo_labels", create=True, class_ids=[1, 2])
    store.ensure_round(1, 0, "sam-tiny")
    worker = SamWorker(cfg_dict)
    worker.load_specialist(0, model_args, weights)
    rows = worker.relabel(cases, round_index=1)
    return cfg, cfg_dict, store, rows


def test_relabel_and_training_never_open_unlabeled_labels(synthetic_root, tiny_sam_checkpoint, tmp_path):
    global _OPENED
    # A specialist to prompt with: trained briefly on the labeled cases of the intact dataset.
    base_dict = small_config_dict(synthetic_root, tmp_path / "base", tiny_sam_checkpoint)
    trainer = TrainerWorker(base_dict)
    trainer.train_round(0, None)
    weights, model_args = trainer.weights(), trainer.model_args()
    unlabeled = [v.case_id for v in trainer.unlabeled]
    assert len(unlabeled) == 4

    # The same dataset with every unlabeled case's label file replaced by garbage bytes.
    poisoned = tmp_path / "poisoned"
    shutil.copytree(synthetic_root, poisoned)
    label_files = [os.path.realpath(poisoned / "labelsTr" / f"{c}.nii.gz") for c in unlabeled]
    for f in label_files:
        Path(f).write_bytes(b"this is not a label" * 10)

    reference = _relabel(synthetic_root, tmp_path / "ref", tiny_sam_checkpoint, weights, model_args, unlabeled)
    _OPENED = []
    try:
        cfg, cfg_dict, store, rows = _relabel(poisoned, tmp_path / "run", tiny_sam_checkpoint, weights, model_args, unlabeled)
        # ...and the training path that consumes the pseudo-labels
        store.append_manifest(rows)
        poisoned_trainer = TrainerWorker(cfg_dict)
        stats = poisoned_trainer.train_round(1, pseudo_round=1)
        opened = set(_OPENED)
    finally:
        _OPENED = None

    assert "pseudo" in stats  # the pseudo-label term really ran
    images = {os.path.realpath(poisoned / "imagesTr" / f"{c}.nii.gz") for c in unlabeled}
    assert images <= opened, "the audit hook saw no image reads: it is not recording"
    leaked = opened & set(label_files)
    assert not leaked, f"label files of unlabeled cases were opened: {sorted(leaked)}"

    # Same pseudo-labels and prompts as from the intact dataset: labels had no influence.
    _, _, ref_store, ref_rows = reference
    for c in unlabeled:
        a, b = ref_store.read_case(1, c), store.read_case(1, c)
        np.testing.assert_array_equal(a["pseudo_label"], b["pseudo_label"])
        np.testing.assert_array_equal(a["specialist"], b["specialist"])
    assert [r["prompts"] for r in ref_rows] == [r["prompts"] for r in rows]
    assert any(r["num_prompts"] > 0 for r in rows), "no prompts were made: the comparison proves nothing"


def test_prompts_change_when_the_prediction_changes(synthetic_root, tiny_sam_checkpoint, tmp_path):
    """The converse: prompts do depend on the specialist (so the equality above is not vacuous)."""
    trainer = TrainerWorker(small_config_dict(synthetic_root, tmp_path / "base", tiny_sam_checkpoint))
    trainer.train_round(0, None)
    unlabeled = [v.case_id for v in trainer.unlabeled][:1]
    args = trainer.model_args()
    _, _, _, rows_a = _relabel(synthetic_root, tmp_path / "a", tiny_sam_checkpoint, trainer.weights(), args, unlabeled)
    torch.manual_seed(123)
    trainer.train_round(1, None)
    _, _, _, rows_b = _relabel(synthetic_root, tmp_path / "b", tiny_sam_checkpoint, trainer.weights(), args, unlabeled)
    assert [r["prompts"] for r in rows_a] != [r["prompts"] for r in rows_b]
