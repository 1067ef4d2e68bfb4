"""Bad input gets a clear error naming the file, case or key, before any work starts (and before Ray)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import ray
import yaml

from semisam.cli import main
from tests.conftest import shared_path, small_config_dict


def _write_cfg(tmp_path: Path, d: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def _run(args: list[str], caplog) -> tuple[int, str]:
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="semisam"):
        code = main(args)
    return code, caplog.text


def test_unknown_config_key(tmp_path, synthetic_root, caplog):
    d = small_config_dict(synthetic_root, tmp_path)
    d["train"]["iteratons"] = 5
    code, text = _run(["run", str(_write_cfg(tmp_path, d))], caplog)
    assert code == 2
    assert "train.iteratons: unknown key" in text


def test_unknown_override(tmp_path, synthetic_root, caplog):
    code, text = _run(["run", str(_write_cfg(tmp_path, small_config_dict(synthetic_root, tmp_path))),
                       "workers.sam.num_wrkers=3"], caplog)
    assert code == 2 and "workers.sam.num_wrkers: unknown key" in text


def test_missing_sam_checkpoint_fails_before_ray_starts(tmp_path, synthetic_root, caplog):
    d = small_config_dict(synthetic_root, tmp_path, tmp_path / "nope" / "sam_vit_b.pth")
    code, text = _run(["run", str(_write_cfg(tmp_path, d))], caplog)
    assert code == 2
    assert "nope/sam_vit_b.pth does not exist" in text
    assert not ray.is_initialized()
    assert not (tmp_path / "test").exists()  # no run folder was made


def test_truncated_nifti_is_named(tmp_path, synthetic_root, caplog):
    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    split = json.loads((data / "splits.json").read_text())
    victim = data / "imagesTr" / f"{split['train_order'][-1]}.nii.gz"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    code, text = _run(["run", str(_write_cfg(tmp_path, small_config_dict(data, tmp_path)))], caplog)
    assert code == 2
    assert str(victim) in text and "truncated" in text
    assert not ray.is_initialized()


def _misfit_dataset(tmp_path: Path) -> Path:
    """Real hippocampus cases plus the real misfits, linked (never copied) into one MSD folder."""
    hippo = shared_path("hippocampus")
    misfits = shared_path("hippocampus-misfits")
    root = tmp_path / "misfit"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for case in ("hippocampus_001", "hippocampus_003"):
        for sub in ("imagesTr", "labelsTr"):
            os.symlink(hippo / sub / f"{case}.nii.gz", root / sub / f"{case}.nii.gz")
    for f in (misfits / "imagesTr").iterdir():
        os.symlink(f, root / "imagesTr" / f.name)
    for f in (misfits / "labelsTr").iterdir():
        os.symlink(f, root / "labelsTr" / f.name)
    meta = json.loads((hippo / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({"name": "misfit", "labels": meta["labels"], "modality": meta["modality"]}))
    return root


def test_validate_names_the_real_misfits(tmp_path, caplog):
    root = _misfit_dataset(tmp_path)
    code, text = _run(["validate", str(root)], caplog)
    assert code == 2
    # labels whose image is missing are named; the image without a label is an unlabeled case, not an error
    assert "hippocampus_010.nii.gz" in text and "hippocampus_281.nii.gz" in text
    assert "hippocampus_118" not in text


def test_run_names_a_label_of_the_wrong_shape(tmp_path, tiny_sam_checkpoint, caplog):
    hippo = shared_path("hippocampus")
    misfits = shared_path("hippocampus-misfits")
    root = tmp_path / "shape"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    shutil.copy(hippo / "dataset.json", root / "dataset.json")
    for case in ("hippocampus_001", "hippocampus_003", "hippocampus_004"):
        os.symlink(hippo / "imagesTr" / f"{case}.nii.gz", root / "imagesTr" / f"{case}.nii.gz")
        src = misfits / "labelsTr" / "hippocampus_281.nii.gz" if case == "hippocampus_003" else hippo / "labelsTr" / f"{case}.nii.gz"
        os.symlink(src, root / "labelsTr" / f"{case}.nii.gz")
    d = small_config_dict(root, tmp_path, tiny_sam_checkpoint)
    d["data"] = {"root": str(root), "labeled": ["hippocampus_001", "hippocampus_003"], "test": ["hippocampus_004"], "unlabeled": []}
    code, text = _run(["run", str(_write_cfg(tmp_path, d))], caplog)
    assert code == 2
    assert "labelsTr/hippocampus_003.nii.gz" in text
    assert "(512, 512, 94)" in text
    assert not ray.is_initialized()
