"""Prompts come only from predictions, never from labels.

The released SemiSAM code builds prompts for unlabeled scans from their ground truth. Two tests here:

- **Poisoned vs intact** (cannot be bypassed): the unlabeled cases' labels are replaced by *random valid
  labels* (NIfTI files for MSD; the ``label`` dataset inside each case's own h5 file, next to its image),
  then the specialist is trained, a relabel step runs (``relabel_case``, classical generalist) and a
  round trains on its pseudo-labels, once on the poisoned and once on the intact dataset, same seed,
  CPU. Trained weights, prompts and pseudo-labels must be bit-identical. Whatever reads a label of an
  unlabeled case, by any means (Python, h5py, C code through libc), gets random values and changes
  the result, so nothing on this path can read one unnoticed.
- **Audit hook** (MSD): every file the process opens is recorded with a Python audit hook while
  validation, the SAM worker and training run: no unlabeled case's label file may be opened.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.config import config_from_dict
from pipeline.data.dataset import load_image, load_label, read_dataset_info
from pipeline.data.synthetic import write_synthetic_h5, write_synthetic_msd
from pipeline.generalist.factory import make_generalist
from pipeline.models.unet import build_model
from pipeline.preflight import preflight
from pipeline.relabel import relabel_case
from pipeline.store import PseudoLabelStore
from pipeline.training.pseudo_labels import gated_pseudo_label
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
    out = worker.relabel(cases, round_index=1, version=0, model_args=model_args, weights_box=[None])
    assert not out["failed"], out["failed"]
    return cfg, cfg_dict, store, out["rows"]


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


# ------------------------------------------------------------------------------- poisoned vs intact


def _poison(root: Path, fmt: str, case_ids: list[str], seed: int = 7) -> None:
    """Replace the labels of ``case_ids`` by random labels of the same shape and classes (valid files)."""
    rng = np.random.default_rng(seed)
    for case_id in case_ids:
        if fmt == "msd":
            path = root / "labelsTr" / f"{case_id}.nii.gz"
            old = nib.load(path)
            noise = rng.integers(0, 3, old.shape).astype(np.uint8)
            nib.save(nib.Nifti1Image(noise, old.affine, old.header), path)
        else:
            with h5py.File(root / f"{case_id}.h5", "r+") as f:
                f["label"][...] = rng.integers(0, 3, f["label"].shape).astype(f["label"].dtype)


def _train_relabel_train(data_root: Path, fmt: str, run_root: Path) -> dict:
    """Round 0 training, one relabel step on every unlabeled case (classical generalist), round 1 training
    on its pseudo-labels; returns the weights after each round and everything the relabel step made."""
    cfg_dict = small_config_dict(data_root, run_root, data={"format": fmt}, rounds=2)
    cfg = config_from_dict(cfg_dict)
    trainer = TrainerWorker(cfg_dict)
    trainer.train_round(0, None)
    out = {"weights0": _snapshot(trainer.weights())}
    model = build_model(trainer.model_args())
    model.load_state_dict(trainer.weights())
    model.eval()
    info = read_dataset_info(cfg.data.root, cfg.data.format)
    generalist = make_generalist(cfg.generalist, torch.device("cpu"))
    pseudo, made = {}, {}
    for v in trainer.unlabeled:
        image = load_image(info, v.case_id, cfg.data.normalization)[0]
        r = relabel_case(v.case_id, image, model, generalist, None, cfg, info.foreground_classes, round_index=1,
                         checkpoint_version=0, device=torch.device("cpu"))
        made[v.case_id] = r
        pseudo[v.case_id] = gated_pseudo_label(r.pseudo_label, r.specialist, r.scores, cfg.data.slice_axis,
                                               cfg.train.pseudo_label.min_sam_score)
    stats = trainer.trainer.train(trainer.labeled, trainer.unlabeled, pseudo, cfg.train.iterations)
    out.update(weights1=_snapshot(trainer.weights()), relabel=made, stats=stats,
               unlabeled=[v.case_id for v in trainer.unlabeled])
    return out


def _snapshot(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


@pytest.mark.parametrize("fmt", ["msd", "h5"])
def test_poisoned_unlabeled_labels_change_no_weight_prompt_or_pseudo_label(fmt, tmp_path):
    intact = tmp_path / "intact"
    if fmt == "msd":
        write_synthetic_msd(intact, num_cases=8, seed=1)
    else:
        write_synthetic_h5(intact, num_cases=8, seed=1)
    poisoned = tmp_path / "poisoned"
    shutil.copytree(intact, poisoned)
    info = read_dataset_info(intact, fmt)

    ref = _train_relabel_train(intact, fmt, tmp_path / "run_intact")
    unlabeled = ref["unlabeled"]
    assert len(unlabeled) == 4
    _poison(poisoned, fmt, unlabeled)
    # the poison is real: the files hold different, still valid labels that any reader would get
    poisoned_info = read_dataset_info(poisoned, fmt)
    for c in unlabeled:
        a, b = load_label(info, c), load_label(poisoned_info, c)
        assert a.shape == b.shape and (a != b).mean() > 0.3
        np.testing.assert_array_equal(load_image(info, c)[0], load_image(poisoned_info, c)[0])
    got = _train_relabel_train(poisoned, fmt, tmp_path / "run_poisoned")

    assert got["unlabeled"] == unlabeled
    assert "pseudo" in got["stats"]  # the pseudo-label term really trained on the relabel output
    for key in ("weights0", "weights1"):
        assert got[key].keys() == ref[key].keys()
        for name in ref[key]:
            assert torch.equal(got[key][name], ref[key][name]), f"{key} {name} differs"
    for c in unlabeled:
        a, b = ref["relabel"][c], got["relabel"][c]
        np.testing.assert_array_equal(a.pseudo_label, b.pseudo_label)
        np.testing.assert_array_equal(a.specialist, b.specialist)
        np.testing.assert_array_equal(a.scores, b.scores)
        assert [r["prompts"] for r in a.rows] == [r["prompts"] for r in b.rows]
    rows = [r for c in unlabeled for r in got["relabel"][c].rows]
    assert any(r["num_prompts"] > 0 for r in rows), "no prompts were made: the comparison proves nothing"
    assert any((got["relabel"][c].pseudo_label > 0).any() for c in unlabeled)
