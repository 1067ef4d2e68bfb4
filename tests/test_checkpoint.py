"""Specialist checkpoints: a real SpecialistTrainer state through save/load, and the atomic write."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.atomic import atomic_write, atomic_write_text, file_mode
from pipeline.checkpoint import CHECKPOINT_FORMAT, checkpoint_path, load_checkpoint, save_checkpoint
from pipeline.errors import CheckpointError
from pipeline.training.loop import SpecialistTrainer, TrainVolume
from tests.conftest import small_config

CPU = torch.device("cpu")


def _volumes(n: int, labeled: bool, seed: int) -> list[TrainVolume]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = np.zeros((24, 40, 32), np.uint8)
        label[6:18, 10:25, 8:20] = 1
        label[8:14, 26:34, 10:18] = 2
        image = (rng.normal(size=label.shape) * 0.3 + label).astype(np.float32)
        out.append(TrainVolume(f"case_{seed}_{i}", image, label if labeled else None))
    return out


@pytest.fixture
def trained(synthetic_root, tmp_path):
    torch.set_num_threads(1)
    cfg = small_config(synthetic_root, tmp_path / "run")
    trainer = SpecialistTrainer(cfg, num_classes=3, device=CPU)
    initial = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    trainer.train(_volumes(2, True, 0), _volumes(2, False, 1), None, iterations=2)
    assert trainer.step == 2
    changed = any(not torch.equal(initial[k], v) for k, v in trainer.student.state_dict().items())
    assert changed  # training moved the weights, so the round trip below compares non-initial values
    return cfg, trainer


def test_round_trip(trained, tmp_path):
    cfg, trainer = trained
    path = checkpoint_path(tmp_path / "run", 3)
    assert path.name == "ckpt_0003.pt"
    digest = save_checkpoint(path, 3, trainer.state_dict(), trainer.model_args, cfg)
    assert path.parent.list_names() == ["ckpt_0003.pt", "ckpt_0003.pt.sha256"]  # no temp file left behind
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == digest
    assert Path(str(path) + ".sha256").read_text() == f"{digest}  ckpt_0003.pt\n"
    assert oct(os.stat(path).st_mode & 0o777) == oct(file_mode())  # readable by a colleague

    ckpt = load_checkpoint(path, expect_model_args=trainer.model_args)
    assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["version"] == 3
    assert ckpt["model_args"] == trainer.model_args
    assert ckpt["config"] == cfg.model_dump(mode="json")

    fresh = SpecialistTrainer(cfg, num_classes=3, device=CPU)
    assert any(not torch.equal(fresh.student.state_dict()[k], v) for k, v in trainer.student.state_dict().items())
    fresh.load_state_dict(ckpt["trainer"])
    for name in ("student", "teacher"):
        want, got = getattr(trainer, name).state_dict(), getattr(fresh, name).state_dict()
        assert want.keys() == got.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    opt_want, opt_got = trainer.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert opt_want["param_groups"] == opt_got["param_groups"]
    assert opt_want["state"].keys() == opt_got["state"].keys() and opt_want["state"]
    for i, st in opt_want["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(opt_got["state"][i][k], v, rtol=0, atol=0)
    assert fresh.step == 2
    assert fresh.first_pseudo_step == trainer.first_pseudo_step


def test_wrong_model_args(trained, tmp_path):
    cfg, trainer = trained
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, 1, trainer.state_dict(), trainer.model_args, cfg)
    other = {**trainer.model_args, "base_channels": trainer.model_args["base_channels"] * 2}
    with pytest.raises(CheckpointError, match="config asks for") as e:
        load_checkpoint(path, expect_model_args=other)
    assert str(path) in str(e.value)
    assert load_checkpoint(path)["version"] == 1  # without the guard it loads


def test_missing_file_named(tmp_path):
    path = tmp_path / "checkpoints" / "ckpt_0009.pt"
    with pytest.raises(CheckpointError, match="does not exist") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)


def test_foreign_and_truncated_files(trained, tmp_path):
    cfg, trainer = trained
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a semisam checkpoint"):
        load_checkpoint(foreign, require_checksum=False)
    good = tmp_path / "good.pt"
    save_checkpoint(good, 1, trainer.state_dict(), trainer.model_args, cfg)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot be read") as e:
        load_checkpoint(cut, require_checksum=False)
    assert str(cut) in str(e.value)
    with pytest.raises(CheckpointError, match="no recorded SHA-256"):
        load_checkpoint(cut)  # a file nobody published is not used by default


def test_flipped_bytes_are_refused_and_named(trained, tmp_path):
    """Issue 7: 4096 bytes flipped inside a checkpoint loaded without error and changed 1025 weights."""
    cfg, trainer = trained
    path = checkpoint_path(tmp_path / "run", 2)
    digest = save_checkpoint(path, 2, trainer.state_dict(), trainer.model_args, cfg)
    data = bytearray(Path(path).read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4096] = bytes(b ^ 0xFF for b in data[mid:mid + 4096])
    Path(path).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt") as e:
        load_checkpoint(path)
    assert "ckpt_0002.pt" in str(e.value) and "not used" in str(e.value)
    # the digest from state.json is checked as well, even without the .sha256 file
    os.unlink(str(path) + ".sha256")
    with pytest.raises(CheckpointError, match="state.json"):
        load_checkpoint(path, expect_sha256=digest)


def test_atomic_write_failure_keeps_previous(tmp_path):
    target = tmp_path / "state.txt"
    atomic_write_text(target, "version one\n")
    assert target.read_text() == "version one\n"

    def half_then_fail(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("version tw")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "version one\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.txt"]

    atomic_write(target, lambda tmp: open(tmp, "w").write("version two\n"))
    assert target.read_text() == "version two\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.txt"]


def test_atomic_write_failure_with_no_previous_file(tmp_path):
    target = tmp_path / "sub" / "new.bin"

    def fail(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"\x00" * 10)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write(target, fail)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []
