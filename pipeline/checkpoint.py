"""Specialist checkpoints: versioned, atomic, checksummed, loaded with ``weights_only=True``.

A checkpoint is a dict of tensors and plain values only (no pickled classes):
``{"format", "version", "trainer": SpecialistTrainer.state_dict(), "model_args", "config"}`` where
``config`` is the resolved run config as a JSON-able dict.

``checkpoints/ckpt_NNNN.pt`` is written in one atomic write; its SHA-256 goes beside it in
``ckpt_NNNN.pt.sha256`` (``sha256sum`` format, so ``sha256sum -c`` checks it too) and into the run's
``state.json``. Loading verifies the bytes against the recorded digest before unpickling anything: a
flipped byte is an error that names the file, never a silently different model.
"""

from __future__ import annotations

import io
import os

import torch

from pipeline.config import RunConfig
from pipeline.errors import CheckpointError
from pipeline.run_folder import RunFolder
from pipeline.storage import Location, sha256_hex

CHECKPOINT_FORMAT = 1


def checkpoint_path(run_dir: str | os.PathLike | Location, version: int) -> Location:
    """Where checkpoint ``version`` of a run folder lives (:meth:`RunFolder.checkpoint`)."""
    return RunFolder(run_dir).checkpoint(version)


def checksum_path(ckpt: Location) -> Location:
    return ckpt.parent / f"{ckpt.name}.sha256"


def recorded_sha256(ckpt: Location) -> str | None:
    """The digest written when ``ckpt`` was published (None if there is no ``.sha256`` file)."""
    side = checksum_path(ckpt)
    if not side.exists():
        return None
    text = side.read_text().split()
    return text[0] if text else ""


def save_checkpoint(path: str | os.PathLike | Location, version: int, trainer_state: dict, model_args: dict,
                    cfg: RunConfig) -> str:
    """Write the checkpoint and its ``.sha256``; returns the hex digest."""
    buf = io.BytesIO()
    torch.save({
        "format": CHECKPOINT_FORMAT,
        "version": version,
        "trainer": trainer_state,
        "model_args": dict(model_args),
        "config": cfg.model_dump(mode="json"),
    }, buf)
    data = buf.getvalue()
    digest = sha256_hex(data)
    loc = Location.of(path)
    loc.write_bytes(data)
    checksum_path(loc).write_text(f"{digest}  {loc.name}\n")
    return digest


def load_checkpoint(path: str | os.PathLike | Location, expect_model_args: dict | None = None,
                    map_location: str = "cpu", expect_sha256: str | None = None,
                    require_checksum: bool = True) -> dict:
    """Read a checkpoint; errors name the file. ``expect_model_args`` guards against a different network.

    The bytes must match ``expect_sha256`` (e.g. from state.json) and the ``.sha256`` file beside it;
    ``require_checksum=False`` accepts a checkpoint that has no recorded digest at all (a file made
    elsewhere, e.g. ``train.init_from``); a recorded digest that differs is always an error.
    """
    loc = Location.of(path)
    if not loc.is_file():
        raise CheckpointError(f"checkpoint {loc} does not exist")
    data = loc.read_bytes()
    digest = sha256_hex(data)
    side = recorded_sha256(loc)
    for what, want in (("state.json", expect_sha256), (checksum_path(loc).name, side)):
        if want is not None and want != digest:
            raise CheckpointError(
                f"checkpoint {loc} is corrupt: its SHA-256 {digest[:16]}... differs from {want[:16]}... recorded "
                f"in {what} when it was published. It is not used. Delete it (and its .sha256) and rerun "
                "`semisam run`: the round that wrote it is redone from the checkpoint before it")
    if require_checksum and expect_sha256 is None and side is None:
        raise CheckpointError(f"checkpoint {loc} has no recorded SHA-256 ({checksum_path(loc).name} is missing); "
                              "it cannot be verified, so it is not used")
    try:
        ckpt = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, foreign or pickled-object files
        raise CheckpointError(f"checkpoint {loc} cannot be read (weights only): {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{loc} is not a semisam checkpoint of format {CHECKPOINT_FORMAT}")
    if expect_model_args is not None and ckpt["model_args"] != expect_model_args:
        raise CheckpointError(f"checkpoint {loc} holds model {ckpt['model_args']}, config asks for {expect_model_args}")
    return ckpt
