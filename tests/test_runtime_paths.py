"""Paths chosen by the machine: the trainer's precision, memory format, compile and batch thread, the SAM
encoder's precision, each said in one log line; the literature's optimizer (SGD with poly decay). No
wall-clock asserts (speed: benchmarks/trainer_speed.py and benchmarks/generalist_speed.py)."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline import hardware
from pipeline.config import ModelConfig, SamConfig, TrainConfig
from pipeline.data.dataset import load_image, load_label, read_dataset_info
from pipeline.generalist import encoder_runtime
from pipeline.generalist.encoder_runtime import describe_choice, warn_if_emulated_bf16
from pipeline.training import runtime
from pipeline.training.loop import SpecialistTrainer, TrainVolume
from pipeline.training.prefetch import Prefetcher
from pipeline.training.ramps import poly_lr
from pipeline.training.runtime import COMPILE_MIN_VOXELS, resolve_train_runtime, round_voxels

from .conftest import small_config

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)  # a device object only: nothing runs on it here
CONF = Path(__file__).resolve().parents[1] / "conf"
ACDC_MODEL = ModelConfig(kind="unet2d", base_channels=16, depth=4, patch_size=[160, 160])


# -- the machine's facts ---------------------------------------------------------------------------------
def test_the_facts_of_this_machine_agree_with_proc_cpuinfo():
    m = hardware.describe()
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    assert set(m.cpu_flags) == {f for f in hardware._FLAGS_OF_INTEREST if f in flags}
    assert m.cores >= 1 and m.cpu_capability != ""
    assert m.cpu_native_bf16 == bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    assert ("native bf16" if m.cpu_native_bf16 else "no native bf16") in m.summary()
    assert json.loads(json.dumps(m.as_dict()))["cpu_flags"] == list(m.cpu_flags)


# -- the trainer's path ----------------------------------------------------------------------------------
@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_follows_native_bf16(monkeypatch, native):
    monkeypatch.setattr(hardware, "native_bf16", lambda device: native)
    cpu = resolve_train_runtime(TrainConfig(), ACDC_MODEL, CPU)
    assert cpu.precision == ("bf16" if native else "fp32")
    assert not cpu.channels_last  # slower on the CPUs measured
    assert ("native bf16" in cpu.reason) if native else ("no native bf16" in cpu.reason)
    gpu = resolve_train_runtime(TrainConfig(), ACDC_MODEL, CUDA)
    assert gpu.precision == ("bf16" if native else "fp16") and gpu.channels_last
    assert resolve_train_runtime(TrainConfig(), ModelConfig(kind="unet3d", patch_size=[8, 8, 8]), CUDA).channels_last is False


def test_auto_compiles_only_rounds_that_repay_it():
    acdc = TrainConfig(iterations=600, labeled_batch_size=4, unlabeled_batch_size=4)
    assert round_voxels(acdc, ACDC_MODEL) == 600 * 8 * 160 * 160 >= COMPILE_MIN_VOXELS
    assert resolve_train_runtime(acdc, ACDC_MODEL, CUDA).compile
    assert not resolve_train_runtime(acdc, ACDC_MODEL, CPU).compile  # measured: +3% on a CPU, minutes to compile
    demo = TrainConfig(iterations=150)
    small = ModelConfig(patch_size=[32, 32])
    assert not resolve_train_runtime(demo, small, CUDA).compile
    assert resolve_train_runtime(TrainConfig(iterations=150, compile=True), small, CPU).compile  # explicit wins
    assert not resolve_train_runtime(TrainConfig(compile=False), ACDC_MODEL, CPU).compile


def test_pinned_bf16_on_a_cpu_without_it_warns(monkeypatch, caplog):
    monkeypatch.setattr(hardware, "native_bf16", lambda device: False)
    with caplog.at_level(logging.WARNING, logger="pipeline.training.runtime"):
        rt = resolve_train_runtime(TrainConfig(precision="bf16"), ACDC_MODEL, CPU)
    assert rt.precision == "bf16" and "no native bf16" in caplog.text and "train.precision=auto" in caplog.text
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        resolve_train_runtime(TrainConfig(precision="fp16"), ACDC_MODEL, CPU)


def test_the_trainer_logs_its_path(synthetic_root, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.training.loop"):
        SpecialistTrainer(small_config(synthetic_root, tmp_path), 3, CPU)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("trainer on cpu"))
    assert "eager" in line and hardware.describe().cpu_capability in line


# -- the encoder's path ----------------------------------------------------------------------------------
def test_the_encoder_says_why(monkeypatch, caplog):
    monkeypatch.setattr(encoder_runtime, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(encoder_runtime, "openvino_available", lambda: False)
    line = describe_choice(SamConfig(variant="lite_medsam"), CPU)
    assert "compile fp32" in line and "no native bf16" in line and "[openvino]" in line
    monkeypatch.setattr(encoder_runtime, "openvino_available", lambda: True)
    assert "openvino fp32" in describe_choice(SamConfig(variant="lite_medsam"), CPU)
    monkeypatch.setattr(encoder_runtime, "openvino_available", lambda: False)
    monkeypatch.setattr(encoder_runtime, "cpu_has_native_bf16", lambda: True)
    assert "compile bf16" in describe_choice(SamConfig(variant="lite_medsam"), CPU)
    monkeypatch.setattr(encoder_runtime, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(encoder_runtime, "_warned_emulated", False)
    with caplog.at_level(logging.WARNING, logger="pipeline.generalist.encoder_runtime"):
        assert warn_if_emulated_bf16(SamConfig(variant="lite_medsam", precision="bf16"), CPU)
        assert not warn_if_emulated_bf16(SamConfig(variant="lite_medsam", precision="bf16"), CPU)  # once
    assert caplog.text.count("generalist.sam.precision is bf16") == 1 and "20x slower" in caplog.text


def test_no_preset_pins_a_precision():
    for path in CONF.glob("*.yaml"):
        tree = yaml.safe_load(path.read_text()) or {}
        assert "precision" not in (tree.get("generalist", {}).get("sam") or {}), path
        assert "precision" not in (tree.get("train") or {}), path


# -- the batch thread --------------------------------------------------------------------------------------
def test_prefetcher_gives_the_sequence_in_order_and_raises_at_the_failing_item():
    counter = iter(range(100))
    with Prefetcher(lambda: next(counter), 10, depth=3) as items:
        assert list(items) == list(range(10))

    def failing():
        value = next(seq)
        if value == 4:
            raise RuntimeError("bad crop 4")
        return value
    seq = iter(range(10))
    got = []
    with pytest.raises(RuntimeError, match="bad crop 4"), Prefetcher(failing, 10, depth=2) as items:
        for item in items:
            got.append(item)
    assert got == [0, 1, 2, 3]


def test_prefetcher_stops_its_thread_when_left_early():
    before = threading.active_count()
    with Prefetcher(lambda: np.zeros(3), 1000, depth=2) as items:
        for i, _ in enumerate(items):
            if i == 2:
                break
    assert threading.active_count() == before


@pytest.fixture(scope="module")
def volumes(synthetic_root: Path):
    info = read_dataset_info(synthetic_root)
    order = json.loads((synthetic_root / "splits.json").read_text())["train_order"]
    labeled = [TrainVolume(c, load_image(info, c)[0], load_label(info, c)) for c in order[:2]]
    unlabeled = [TrainVolume(c, load_image(info, c)[0]) for c in order[2:4]]
    return labeled, unlabeled


def _trained(synthetic_root, tmp_path, volumes, iterations=6, **train) -> SpecialistTrainer:
    cfg = small_config(synthetic_root, tmp_path, train={"lr": 0.01, **train})
    tr = SpecialistTrainer(cfg, 3, CPU)
    tr.train(*volumes, None, iterations=iterations)
    return tr


def test_batches_built_ahead_train_the_same_weights(synthetic_root, tmp_path, volumes):
    a = _trained(synthetic_root, tmp_path / "a", volumes, prefetch_batches=0)
    b = _trained(synthetic_root, tmp_path / "b", volumes, prefetch_batches=3)
    sa, sb = a.student.state_dict(), b.student.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # bit for bit: the same batches in the same order


def test_poly_lr_is_ssl4mis_decay_over_the_whole_schedule(synthetic_root, tmp_path, volumes):
    assert poly_lr(0.01, 0, 100) == 0.01
    assert poly_lr(0.01, 50, 100) == pytest.approx(0.01 * 0.5 ** 0.9)
    assert poly_lr(0.01, 100, 100) == 0.0 and poly_lr(0.01, 150, 100) == 0.0
    tr = _trained(synthetic_root, tmp_path, volumes, iterations=4, optimizer="sgd", lr_schedule="poly")
    total = tr.total_iterations
    # the lr of the last update (after 3 updates) is the decay at step 3 of the run's whole schedule
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * (1 - 3 / total) ** 0.9)
    assert tr.optimizer.param_groups[0]["momentum"] == 0.9


def test_compiled_training_matches_eager(synthetic_root, tmp_path, volumes):
    """One compiled round of the small U-Net against the eager one, same batches: the same losses and
    weights up to float rounding (compile fuses ops; it must not change what is computed)."""
    eager = _trained(synthetic_root, tmp_path / "e", volumes, iterations=3, compile=False, optimizer="sgd")
    compiled = _trained(synthetic_root, tmp_path / "c", volumes, iterations=3, compile=True, optimizer="sgd")
    assert compiled.runtime.compile and compiled.student_fwd.compiled is not None  # it really ran compiled
    se, sc = eager.student.state_dict(), compiled.student.state_dict()
    worst = max(float((se[k] - sc[k]).abs().max()) for k in se if se[k].is_floating_point())
    assert worst < 1e-4, worst


def test_a_compile_failure_falls_back_to_eager(synthetic_root, tmp_path, volumes, monkeypatch, caplog):
    def broken(*a, **k):
        def fail(x):
            raise RuntimeError("no C++ compiler")
        return fail
    monkeypatch.setattr(runtime.torch, "compile", broken)
    with caplog.at_level(logging.WARNING, logger="pipeline.training.runtime"):
        tr = _trained(synthetic_root, tmp_path, volumes, iterations=2, compile=True)
    assert tr.step == 2 and tr.student_fwd.compiled is None
    assert "torch.compile of the student failed" in caplog.text and "train.compile=false" in caplog.text


def test_the_openvino_encoder_gives_eager_fp32_embeddings(tiny_sam_checkpoint):
    """The optional OpenVINO backend (``pip install -e ".[openvino]"``) on the tiny random-weight SAM:
    the same embeddings as eager fp32 up to float rounding, one static graph fed slice by slice."""
    pytest.importorskip("openvino", reason="the optional OpenVINO backend is not installed")
    from pipeline.generalist.encoder_runtime import EncoderRunner
    from pipeline.generalist.sam import load_sam

    sam = load_sam(SamConfig(variant="tiny", checkpoint=str(tiny_sam_checkpoint)), CPU)
    x = torch.rand(3, 3, sam.image_encoder.img_size, sam.image_encoder.img_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        eager = EncoderRunner(sam.image_encoder, CPU, "fp32", "eager")(x)
        runner = EncoderRunner(sam.image_encoder, CPU, "fp32", "openvino")
        ov = runner(x)
    assert runner.backend == "openvino" and ov.shape == eager.shape
    assert float((ov - eager).norm() / eager.norm()) < 1e-4
    with pytest.raises(ValueError, match="runs on a CPU"):
        EncoderRunner(sam.image_encoder, CUDA, "fp32", "openvino")
