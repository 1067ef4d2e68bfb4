"""Specialist checkpoints: versioned, atomic, loaded with ``weights_only=True``.

A checkpoint is a dict of tensors and plain values only (no pickled classes):
``{"format", "version", "trainer": SpecialistTrainer.state_dict(), "model_args", "config"}`` where
``config`` is the resolved run config as a JSON-able dict.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.atomic import atomic_torch_save
from pipeline.config import RunConfig
from pipeline.errors import CheckpointError

CHECKPOINT_FORMAT = 1


def checkpoint_path(run_dir: Path, version: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"ckpt_{version:04d}.pt"


def save_checkpoint(path: Path, version: int, trainer_state: dict, model_args: dict, cfg: RunConfig) -> None:
    atomic_torch_save({
        "format": CHECKPOINT_FORMAT,
        "version": version,
        "trainer": trainer_state,
        "model_args": dict(model_args),
        "config": cfg.model_dump(mode="json"),
    }, Path(path))


def load_checkpoint(path: Path, expect_model_args: dict | None = None, map_location: str = "cpu") -> dict:
    """Read a checkpoint; errors name the file. ``expect_model_args`` guards against a different network."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, foreign or pickled-object files
        raise CheckpointError(f"checkpoint {path} cannot be read (weights only): {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a semisam checkpoint of format {CHECKPOINT_FORMAT}")
    if expect_model_args is not None and ckpt["model_args"] != expect_model_args:
        raise CheckpointError(f"checkpoint {path} holds model {ckpt['model_args']}, config asks for {expect_model_args}")
    return ckpt
