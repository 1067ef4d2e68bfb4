"""Shared fixtures: a small synthetic MSD dataset, a tiny SAM checkpoint, run configs, the shared data."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import RunConfig, config_from_dict
from pipeline.data.synthetic import write_synthetic_msd
from pipeline.generalist.sam import save_tiny_sam

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with a message when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared real data is not on this machine)")
    return path


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """8 synthetic cases (24x40x32, spacing 1.0/0.8/1.2 mm, labels 0/1/2) with splits.json (2 test cases).
    Read-only for tests: copy it before changing anything."""
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_msd(root, num_cases=8, seed=1)
    return root


@pytest.fixture(scope="session")
def tiny_sam_checkpoint(tmp_path_factory) -> Path:
    return save_tiny_sam(tmp_path_factory.mktemp("sam") / "tiny_sam.pt", seed=0)


def small_config_dict(data_root: Path, run_root: Path, sam_checkpoint: Path | None = None, **sections) -> dict:
    """A run config small enough for tests on 2 CPUs: 2D U-Net (base 4), 6 iterations a round,
    2 labeled cases, tiny SAM (or the classical generalist when no checkpoint is given), 2 SAM actors."""
    cfg = {
        "name": "test",
        "output_dir": str(run_root),
        "rounds": 3,
        "seed": 0,
        "device": "cpu",
        "data": {"root": str(data_root), "split_file": str(Path(data_root) / "splits.json"), "num_labeled": 2},
        "model": {"kind": "unet2d", "base_channels": 4, "depth": 2, "patch_size": [32, 32]},
        "train": {"method": "mean_teacher", "iterations": 6, "labeled_batch_size": 2, "unlabeled_batch_size": 2,
                  "log_every": 1000},
        "generalist": ({"backend": "sam", "sam": {"variant": "tiny", "checkpoint": str(sam_checkpoint)}}
                       if sam_checkpoint else {"backend": "classical"}),
        "workers": {"trainer": {"num_cpus": 0.5, "torch_threads": 1},
                    "sam": {"num_workers": 2, "num_cpus": 0.5, "torch_threads": 1}},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def small_config(data_root: Path, run_root: Path, sam_checkpoint: Path | None = None, **sections) -> RunConfig:
    return config_from_dict(small_config_dict(data_root, run_root, sam_checkpoint, **sections))
