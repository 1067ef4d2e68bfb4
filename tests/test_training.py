"""Training: ramps, losses, strategies, crop sampling and the one training loop (tiny networks, CPU)."""

from __future__ import annotations

import copy
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ConsistencyConfig
from pipeline.data.dataset import load_image, load_label, read_dataset_info
from pipeline.models.unet import UNet
from pipeline.training.loop import SpecialistTrainer, TrainVolume
from pipeline.training.losses import (
    ce_dice_loss,
    entropy,
    pseudo_label_mse,
    soft_dice_loss,
    softmax_mse,
    weighted_cross_entropy,
)
from pipeline.training.pseudo_labels import PseudoLabel
from pipeline.training.ramps import (
    linear_rampup,
    rampdown_weight,
    ramped_weight,
    sigmoid_rampup,
    uamt_threshold,
)
from pipeline.training.sampling import crop_around, sample_crop
from pipeline.training.strategies import (
    STRATEGIES,
    MeanTeacher,
    Supervised,
    UncertaintyAwareMeanTeacher,
    UnlabeledBatch,
    make_strategy,
)

from .conftest import small_config

CPU = torch.device("cpu")
NUM_CLASSES = 3


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# --------------------------------------------------------------------------------------------- ramps


def test_sigmoid_rampup_endpoints():
    assert sigmoid_rampup(0, 50) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 50) == 1.0
    assert sigmoid_rampup(25, 50) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(500, 50) == 1.0  # clipped after the ramp
    assert sigmoid_rampup(-3, 50) == pytest.approx(math.exp(-5))  # clipped before it
    assert sigmoid_rampup(0, 0) == 1.0 and sigmoid_rampup(7, 0) == 1.0


def test_sigmoid_rampup_is_monotone():
    values = [sigmoid_rampup(s, 40) for s in range(0, 60)]
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    assert values[0] < values[20] < values[40] == values[59] == 1.0


def test_linear_rampup():
    assert linear_rampup(0, 10) == 0.0 and linear_rampup(5, 10) == 0.5 and linear_rampup(20, 10) == 1.0
    assert linear_rampup(3, 0) == 1.0 and linear_rampup(-1, 10) == 0.0


def test_ramped_weight():
    assert ramped_weight(0.5, -1, 10) == 0.0
    assert ramped_weight(0.5, -100, 0) == 0.0
    assert ramped_weight(0.5, 0, 10) == pytest.approx(0.5 * math.exp(-5))
    assert ramped_weight(0.5, 10, 10) == 0.5
    assert ramped_weight(2.0, 3, 0) == 2.0


def test_uamt_threshold_is_ssl4mis_schedule_over_the_whole_run():
    ln3 = math.log(3)
    # SSL4MIS: (0.75 + 0.25 * sigmoid_rampup(iter, max_iterations)) * ln(C)
    assert uamt_threshold(0, 600, 3) == pytest.approx((0.75 + 0.25 * math.exp(-5)) * ln3)
    assert uamt_threshold(300, 600, 3) == pytest.approx((0.75 + 0.25 * math.exp(-1.25)) * ln3)  # 0.822 ln 3
    assert uamt_threshold(600, 600, 3) == pytest.approx(ln3)  # ln C only at the very end
    assert uamt_threshold(0, 600, 2) == pytest.approx((0.75 + 0.25 * math.exp(-5)) * math.log(2))
    # below ln C (which would keep every voxel) at every step before the end
    values = [uamt_threshold(s, 600, 3) for s in range(0, 600, 50)]
    assert all(b > a for a, b in zip(values, values[1:], strict=False)) and max(values) < ln3
    assert uamt_threshold(100, 600, 3, start=0.5, end=0.5) == pytest.approx(0.5 * ln3)


def test_rampdown_weight_is_the_official_decreasing_ramp():
    # official: 0.5 * 0.1 * sigmoid_rampup((6000 - it) // 150, 40); here without the 150-iteration steps
    assert rampdown_weight(0.05, 0, 0, 6000) == pytest.approx(0.05)
    assert rampdown_weight(0.05, 3000, 0, 6000) == pytest.approx(0.05 * math.exp(-5 * 0.25))
    assert rampdown_weight(0.05, 6000, 0, 6000) == pytest.approx(0.05 * math.exp(-5))
    for it in (0, 1500, 4500, 5999):
        official = 0.5 * 0.1 * sigmoid_rampup((6000 - it) // 150, 40)
        assert rampdown_weight(0.05, it, 0, 6000) == pytest.approx(official, abs=0.05 * 0.04)
    w = [rampdown_weight(0.05, s, 200, 599) for s in range(200, 600)]
    assert all(b < a for a, b in zip(w, w[1:], strict=False))  # strictly decreasing over the pseudo-label steps
    assert rampdown_weight(0.05, 199, 200, 599) == 0.0  # nothing before the first pseudo-labels


# -------------------------------------------------------------------------------------------- losses


def _target(shape=(2, 8, 8), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, NUM_CLASSES, shape, generator=g)
    t.view(-1)[:NUM_CLASSES] = torch.arange(NUM_CLASSES)  # every class present
    return t


def _onehot_logits(target: torch.Tensor, margin: float = 30.0) -> torch.Tensor:
    return margin * F.one_hot(target, NUM_CLASSES).movedim(-1, 1).float()


def test_ce_dice_loss_perfect_and_wrong():
    t = _target()
    assert float(ce_dice_loss(_onehot_logits(t), t)) < 1e-4
    wrong = _onehot_logits((t + 1) % NUM_CLASSES)
    bad = float(ce_dice_loss(wrong, t))
    assert bad > 10.0  # CE ~ 30 at this margin, Dice ~ 1
    assert float(soft_dice_loss(wrong, t)) == pytest.approx(1.0, abs=1e-3)
    assert float(soft_dice_loss(_onehot_logits(t), t)) == pytest.approx(0.0, abs=1e-4)


def test_ce_dice_loss_3d():
    t = _target((1, 4, 6, 5))
    assert float(ce_dice_loss(_onehot_logits(t), t)) < 1e-4
    assert float(ce_dice_loss(torch.zeros(1, NUM_CLASSES, 4, 6, 5), t)) > 0.3


def test_weighted_cross_entropy_all_zero_weights_is_zero():
    t = _target()
    logits = _onehot_logits((t + 1) % NUM_CLASSES)
    assert float(weighted_cross_entropy(logits, t, torch.zeros(t.shape))) == 0.0
    assert float(weighted_cross_entropy(logits, t, torch.zeros(t.shape[0]))) == 0.0  # per-sample weights


def test_weighted_cross_entropy_is_mean_over_weighted_voxels():
    t = _target()
    logits = torch.randn(2, NUM_CLASSES, 8, 8, generator=torch.Generator().manual_seed(1))
    w = torch.zeros(t.shape)
    w[0] = 1.0
    ce = F.cross_entropy(logits, t, reduction="none")
    assert float(weighted_cross_entropy(logits, t, w)) == pytest.approx(float(ce[0].mean()), rel=1e-6)
    # per-sample weights broadcast over the voxels
    assert float(weighted_cross_entropy(logits, t, torch.tensor([1.0, 0.0]))) == pytest.approx(
        float(ce[0].mean()), rel=1e-6)
    assert float(weighted_cross_entropy(logits, t)) == pytest.approx(float(ce.mean()), rel=1e-6)


def test_soft_dice_loss_ignores_zero_weight_voxels():
    t = _target()
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, NUM_CLASSES, 8, 8, generator=g)
    w = torch.ones(t.shape)
    w[:, :, 4:] = 0.0
    changed = logits.clone()
    changed[:, :, :, 4:] = torch.randn(2, NUM_CLASSES, 8, 4, generator=g) * 10
    assert float(soft_dice_loss(logits, t, w)) == pytest.approx(float(soft_dice_loss(changed, t, w)), abs=1e-7)
    assert float(ce_dice_loss(logits, t, w)) == pytest.approx(float(ce_dice_loss(changed, t, w)), abs=1e-6)
    # without weights the change is seen
    assert abs(float(soft_dice_loss(logits, t)) - float(soft_dice_loss(changed, t))) > 1e-3
    # and the weighted loss equals the loss on the kept half alone
    kept = float(soft_dice_loss(logits[..., :4], t[..., :4]))
    assert float(soft_dice_loss(logits, t, w)) == pytest.approx(kept, abs=1e-6)


def test_softmax_mse_and_entropy():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, NUM_CLASSES, 5, 6, generator=g)
    mse = softmax_mse(a, a.clone())
    assert mse.shape == (2, 5, 6) and float(mse.abs().max()) == 0.0
    # averaged over classes (SSL4MIS), not summed: certain class 0 vs certain class 1 of 3 -> (1 + 1 + 0) / 3
    zero, one = (_onehot_logits(torch.full((1, 2, 2), c, dtype=torch.long)) for c in (0, 1))
    assert torch.allclose(softmax_mse(zero, one), torch.full((1, 2, 2), 2.0 / 3), atol=1e-6)
    assert float(softmax_mse(a, _onehot_logits(torch.zeros(2, 5, 6, dtype=torch.long))).min()) > 0.0
    uniform = torch.full((1, NUM_CLASSES, 4, 4), 1.0 / NUM_CLASSES)
    ent = entropy(uniform)
    assert ent.shape == (1, 4, 4)
    assert torch.allclose(ent, torch.full_like(ent, math.log(NUM_CLASSES)), atol=1e-4)
    certain = _onehot_logits(torch.zeros(1, 4, 4, dtype=torch.long)).softmax(1)
    assert float(entropy(certain).max()) < 1e-4
    assert float(entropy(a.softmax(1)).max()) <= math.log(NUM_CLASSES) + 1e-5


def test_pseudo_label_mse_values():
    # student softmax (0.5, 0.25, 0.25) everywhere; target class 0 on the left column, class 1 on the right
    logits = torch.log(torch.tensor([0.5, 0.25, 0.25]))[None, :, None, None].expand(1, 3, 2, 2).clone()
    target = torch.tensor([[[0, 1], [0, 1]]])
    left = ((0.5 - 1) ** 2 + 0.25**2 + 0.25**2) / 3      # 0.125
    right = (0.5**2 + (0.25 - 1) ** 2 + 0.25**2) / 3     # 0.29167
    assert float(pseudo_label_mse(logits, target)) == pytest.approx((left + right) / 2, rel=1e-6)
    # official form: torch.mean((softmax - onehot) ** 2) over (B, C, *S)
    onehot = F.one_hot(target, 3).movedim(-1, 1).float()
    assert float(pseudo_label_mse(logits, target)) == pytest.approx(float(((logits.softmax(1) - onehot) ** 2).mean()))
    # voxel weights: only the right column counts; all-zero weights give 0
    w = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
    assert float(pseudo_label_mse(logits, target, w)) == pytest.approx(right, rel=1e-6)
    assert float(pseudo_label_mse(logits, target, torch.zeros_like(w))) == 0.0
    assert float(pseudo_label_mse(_onehot_logits(target), target)) == pytest.approx(0.0, abs=1e-10)


# ---------------------------------------------------------------------------------------- strategies


def _unet(seed: int, dropout: float = 0.0) -> UNet:
    torch.manual_seed(seed)
    return UNet(2, 1, NUM_CLASSES, base_channels=4, depth=2, dropout=dropout)


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_supervised_has_no_consistency():
    student = _unet(0)
    x = _x()
    loss, extra = Supervised(ConsistencyConfig(), 100).consistency_loss(UnlabeledBatch(x, student(x), 5), student)
    assert float(loss.detach()) == 0.0 and extra == {}
    assert loss.requires_grad  # still part of the graph (a zero term, not a detached constant)
    assert Supervised.uses_teacher is False


def test_mean_teacher_weight_follows_the_ramp_and_is_zero_for_identical_networks():
    cfg = ConsistencyConfig(weight=0.3, rampup_iterations=20, noise_std=0.0)
    student = _unet(0).train()
    teacher = copy.deepcopy(student)
    mt = MeanTeacher(cfg, 100)
    x = _x()
    loss0, extra0 = mt.consistency_loss(UnlabeledBatch(x, student(x), 0), teacher)
    loss20, extra20 = mt.consistency_loss(UnlabeledBatch(x, student(x), 20), teacher)
    assert extra0["consistency_weight"] == pytest.approx(0.3 * math.exp(-5))
    assert extra20["consistency_weight"] == pytest.approx(0.3)
    assert extra0["consistency_weight"] < extra20["consistency_weight"]
    assert float(loss0.detach()) == pytest.approx(0.0, abs=1e-10)
    assert float(loss20.detach()) == pytest.approx(0.0, abs=1e-10)
    assert extra20["consistency"] == pytest.approx(0.0, abs=1e-10)


def test_mean_teacher_loss_is_positive_for_a_different_teacher():
    cfg = ConsistencyConfig(weight=0.3, rampup_iterations=20, noise_std=0.0)
    student, teacher = _unet(0), _unet(1)
    x = _x()
    loss, extra = MeanTeacher(cfg, 100).consistency_loss(UnlabeledBatch(x, student(x), 20), teacher)
    assert extra["consistency"] > 0
    assert float(loss.detach()) == pytest.approx(0.3 * float(extra["consistency"]), rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())  # the teacher gets no gradient
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_uamt_certain_fraction():
    student, teacher = _unet(0), _unet(1, dropout=0.3).eval()
    x = _x()
    _, extra = UncertaintyAwareMeanTeacher(ConsistencyConfig(uamt_passes=2), 100).consistency_loss(
        UnlabeledBatch(x, student(x), 0), teacher)
    assert 0.0 <= extra["certain_fraction"] <= 1.0
    assert not teacher.training  # MC-dropout passes restore the teacher's mode
    # threshold 0: nothing is certain; threshold above ln(C): everything is
    none_cfg = ConsistencyConfig(uamt_passes=2, uamt_threshold_start=0.0, uamt_threshold_end=0.0)
    loss, extra = UncertaintyAwareMeanTeacher(none_cfg, 100).consistency_loss(UnlabeledBatch(x, student(x), 0), teacher)
    assert extra["certain_fraction"] == 0.0 and float(loss.detach()) == 0.0
    all_cfg = ConsistencyConfig(uamt_passes=2, uamt_threshold_start=1.01, uamt_threshold_end=1.01)
    loss, extra = UncertaintyAwareMeanTeacher(all_cfg, 100).consistency_loss(UnlabeledBatch(x, student(x), 0), teacher)
    assert extra["certain_fraction"] == 1.0 and extra["consistency"] > 0


def test_make_strategy():
    assert set(STRATEGIES) == {"supervised", "mean_teacher", "uamt"}
    uamt = make_strategy("uamt", ConsistencyConfig(), 600)
    assert isinstance(uamt, UncertaintyAwareMeanTeacher) and uamt.total_iterations == 600
    assert isinstance(make_strategy("mean_teacher", ConsistencyConfig(), 600), MeanTeacher)
    assert ConsistencyConfig().uamt_passes == 8  # SSL4MIS's T = 8


# ------------------------------------------------------------------------------------------ sampling


def test_crop_around_pads_small_array_centred():
    arr = np.ones((3, 3), np.float32)
    out = crop_around(arr, (1, 1), (7, 8), fill=-1.0)
    assert out.shape == (7, 8)
    assert (out[2:5, 2:5] == 1).all()  # 4 missing rows: 2 before, 2 after; 5 missing columns: 2 before, 3 after
    assert out.sum() == 9 - (7 * 8 - 9)
    assert (out[:2] == -1).all() and (out[5:] == -1).all() and (out[:, :2] == -1).all() and (out[:, 5:] == -1).all()


def test_crop_around_stays_inside_larger_array():
    arr = np.arange(10)
    assert crop_around(arr, (0,), (4,), fill=0).tolist() == [0, 1, 2, 3]
    assert crop_around(arr, (9,), (4,), fill=0).tolist() == [6, 7, 8, 9]
    assert crop_around(arr, (5,), (4,), fill=0).tolist() == [3, 4, 5, 6]
    grid = np.arange(6 * 20).reshape(6, 20)
    out = crop_around(grid, (3, 10), (8, 4), fill=-5)  # padded along axis 0, cropped along axis 1
    assert out.shape == (8, 4)
    assert (out[0] == -5).all() and (out[7] == -5).all()
    np.testing.assert_array_equal(out[1:7], grid[:, 8:12])


@pytest.mark.parametrize("patch", [(8, 8), (8, 8, 8)])
def test_sample_crop_foreground_probability_one_hits_foreground(patch):
    target = np.zeros((30, 30, 30), np.uint8)
    target[25, 3, 17] = 2
    image = np.random.default_rng(0).normal(size=target.shape).astype(np.float32)
    for seed in range(10):
        crop = sample_crop(image, target, None, patch, slice_axis=0, rng=np.random.default_rng(seed),
                           foreground_probability=1.0)
        assert crop.image.shape == patch and crop.target.shape == patch and crop.weight is None
        assert (crop.target == 2).sum() == 1
        assert crop.image.dtype == np.float32
    # without the foreground bias, random crops mostly miss a single voxel
    misses = sum(not sample_crop(image, target, None, patch, 0, np.random.default_rng(s), 0.0).target.any()
                 for s in range(10))
    assert misses >= 5


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_sample_crop_2d_takes_one_slice_along_slice_axis(slice_axis: int):
    shape = [10, 12, 14]
    index = np.arange(shape[slice_axis]).reshape([-1 if i == slice_axis else 1 for i in range(3)])
    image = np.broadcast_to(index, shape).astype(np.float32)
    target = np.broadcast_to(index, shape).astype(np.uint8)
    weight = np.broadcast_to(index, shape).astype(np.float32) / 10
    seen = set()
    for seed in range(12):
        crop = sample_crop(image, target, weight, (8, 8), slice_axis, np.random.default_rng(seed))
        assert crop.image.shape == (8, 8)
        values = np.unique(crop.image)
        assert values.size == 1
        assert np.unique(crop.target).tolist() == [int(values[0])]  # target and weight from the same slice
        np.testing.assert_allclose(np.unique(crop.weight), values / 10)
        seen.add(int(values[0]))
    assert len(seen) > 1  # the slice is random


def test_sample_crop_pads_small_volume():
    image = np.full((4, 5, 6), 3.0, np.float32)
    image[0, 0, 0] = 1.0
    target = np.ones((4, 5, 6), np.uint8)
    weight = np.ones((4, 5, 6), np.float32)
    crop = sample_crop(image, target, weight, (8, 8, 8), 0, np.random.default_rng(0))
    assert crop.image.shape == crop.target.shape == crop.weight.shape == (8, 8, 8)
    assert crop.target.sum() == 4 * 5 * 6 and crop.weight.sum() == 4 * 5 * 6  # padding: label 0, weight 0
    assert (crop.image[crop.target == 0] == 1.0).all()  # image padded with its minimum


# ------------------------------------------------------------------------------------------ the loop


@pytest.fixture(scope="module")
def volumes(synthetic_root: Path) -> tuple[list[TrainVolume], list[TrainVolume]]:
    """2 labeled cases and 2 unlabeled cases (images only) of the synthetic dataset."""
    info = read_dataset_info(synthetic_root)
    order = json.loads((synthetic_root / "splits.json").read_text())["train_order"]
    labeled = [TrainVolume(c, load_image(info, c)[0], load_label(info, c)) for c in order[:2]]
    unlabeled = [TrainVolume(c, load_image(info, c)[0]) for c in order[2:4]]
    return labeled, unlabeled


def _trainer(synthetic_root: Path, tmp_path: Path, **sections) -> SpecialistTrainer:
    return SpecialistTrainer(small_config(synthetic_root, tmp_path, **sections), NUM_CLASSES, CPU)


def _pseudo(unlabeled: list[TrainVolume], fill: int | None = None, slice_weight: float = 1.0) -> dict:
    """Stand-in generalist masks: bright voxels as class 1 (or every voxel ``fill``)."""
    out = {}
    for v in unlabeled:
        labels = (v.image > 1.0).astype(np.uint8) if fill is None else np.full(v.image.shape, fill, np.uint8)
        out[v.case_id] = PseudoLabel(labels=labels, slice_weight=np.full(v.image.shape[0], slice_weight, np.float32))
    return out


def _distance(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return sum(float((p - q).detach().pow(2).sum()) for p, q in zip(a.parameters(), b.parameters(), strict=True)) ** 0.5


def test_supervised_training_lowers_the_loss(synthetic_root, tmp_path, volumes):
    labeled, unlabeled = volumes
    tr = _trainer(synthetic_root, tmp_path, train={"method": "supervised", "lr": 0.01})
    sups = [tr.train(labeled, unlabeled, None, iterations=10)["sup"] for _ in range(4)]
    assert tr.step == 40
    assert sups[-1] < sups[0] - 0.05, sups


def test_step_counter_and_ema_teacher(synthetic_root, tmp_path, volumes):
    labeled, unlabeled = volumes
    tr = _trainer(synthetic_root, tmp_path)
    assert tr.step == 0 and _distance(tr.student, tr.teacher) == 0.0
    stats = tr.train(labeled, unlabeled, None, iterations=3)
    assert tr.step == 3
    assert {"sup", "consistency", "consistency_weight", "loss"} <= set(stats)
    assert "pseudo" not in stats and "pseudo_weight" not in stats  # no pseudo-labels given
    tr.train(labeled, unlabeled, None, iterations=2)
    assert tr.step == 5
    before = _distance(tr.student, tr.teacher)
    assert before > 0  # the teacher lags the student
    assert all(not p.requires_grad for p in tr.teacher.parameters())
    alpha = min(1.0 - 1.0 / (tr.step + 1), tr.cfg.train.consistency.ema_decay)
    tr._ema_update()
    after = _distance(tr.student, tr.teacher)
    assert after < before
    assert after == pytest.approx(alpha * before, rel=1e-4)


def _snapshot(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_state_dict_round_trip(synthetic_root, tmp_path, volumes):
    labeled, unlabeled = volumes
    tr = _trainer(synthetic_root, tmp_path)
    tr.train(labeled, unlabeled, _pseudo(unlabeled), iterations=3)
    state = _snapshot(tr.state_dict())
    fresh = _trainer(synthetic_root, tmp_path)
    assert not _same_weights(fresh.student.state_dict(), state["student"])  # training changed the weights
    fresh.load_state_dict(state)
    assert fresh.step == tr.step == 3 and fresh.first_pseudo_step == tr.first_pseudo_step == 0
    assert _same_weights(fresh.student.state_dict(), tr.student.state_dict())
    assert _same_weights(fresh.teacher.state_dict(), tr.teacher.state_dict())
    opt_a, opt_b = fresh.optimizer.state_dict()["state"], tr.optimizer.state_dict()["state"]
    assert opt_a.keys() == opt_b.keys() and all(_same_weights(opt_a[k], opt_b[k]) for k in opt_a)
    # resuming is deterministic: two trainers resumed from one state train to the same weights. Each gets
    # its own copy: torch's Optimizer.load_state_dict keeps (aliases) the given state tensors.
    resumed = []
    for _ in range(2):
        r = _trainer(synthetic_root, tmp_path)
        r.load_state_dict(_snapshot(state))
        r.train(labeled, unlabeled, None, iterations=1)
        resumed.append(r)
    assert resumed[0].step == resumed[1].step == 4
    assert _same_weights(resumed[0].student.state_dict(), resumed[1].student.state_dict())
    assert not _same_weights(resumed[0].student.state_dict(), state["student"])


def test_state_dict_without_pseudo_step(synthetic_root, tmp_path):
    tr = _trainer(synthetic_root, tmp_path)
    state = _snapshot(tr.state_dict())
    assert state["first_pseudo_step"] == -1
    fresh = _trainer(synthetic_root, tmp_path)
    fresh.first_pseudo_step = 7
    fresh.load_state_dict(state)
    assert fresh.first_pseudo_step is None


def test_pseudo_label_term(synthetic_root, tmp_path, volumes):
    labeled, unlabeled = volumes
    strong = {"loss": "ce_dice", "schedule": "up", "weight": 0.5}  # the default (published) form: further below
    tr = _trainer(synthetic_root, tmp_path, train={"method": "supervised", "unlabeled_batch_size": 2,
                                                   "pseudo_label": strong})
    tr.train(labeled, unlabeled, None, iterations=2)  # round 0: no pseudo-labels yet
    assert tr.first_pseudo_step is None
    stats = tr.train(labeled, unlabeled, _pseudo(unlabeled), iterations=3)
    assert tr.first_pseudo_step == 2  # the ramp starts at the first iteration with pseudo-labels
    assert "pseudo" in stats and stats["pseudo"] > 0
    pl = tr.cfg.train.pseudo_label
    expected = np.mean([ramped_weight(pl.weight, s, pl.rampup_iterations) for s in range(3)])
    assert stats["pseudo_weight"] == pytest.approx(expected, rel=1e-6)
    assert stats["loss"] > stats["sup"]  # supervised method: the only extra term is the pseudo-label one
    assert "consistency" not in stats and "pl_kept" not in stats


def test_pseudo_label_zero_slice_weight_is_gated_out(synthetic_root, tmp_path, volumes):
    labeled, unlabeled = volumes
    tr = _trainer(synthetic_root, tmp_path, train={"method": "supervised"})
    stats = tr.train(labeled, unlabeled, _pseudo(unlabeled, slice_weight=0.0), iterations=3)
    assert "pseudo" not in stats
    assert stats["loss"] == pytest.approx(stats["sup"], rel=1e-6)  # nothing but the supervised term


def test_pseudo_label_disabled(synthetic_root, tmp_path, volumes):
    labeled, unlabeled = volumes
    tr = _trainer(synthetic_root, tmp_path, train={"method": "supervised", "pseudo_label": {"enabled": False}})
    stats = tr.train(labeled, unlabeled, _pseudo(unlabeled), iterations=2)
    assert "pseudo" not in stats and "pseudo_weight" not in stats and tr.first_pseudo_step is None


def test_teacher_agreement_gate_drops_disagreeing_pseudo_labels(synthetic_root, tmp_path, volumes):
    labeled, unlabeled = volumes
    tr = _trainer(synthetic_root, tmp_path, train={"pseudo_label": {"min_teacher_agreement": 1.0}})
    # precondition: the (untrained) teacher predicts foreground on these images
    x = torch.from_numpy(unlabeled[0].image[12, 4:36, :32].copy())[None, None]
    with torch.no_grad():
        assert bool((tr.teacher(x).argmax(1) > 0).any())
    stats = tr.train(labeled, unlabeled, _pseudo(unlabeled, fill=0), iterations=3)
    assert "pl_kept" in stats and 0.0 <= stats["pl_kept"] < 1.0
    # with no gate there is no pl_kept and the pseudo term is used
    tr2 = _trainer(synthetic_root, tmp_path)
    stats2 = tr2.train(labeled, unlabeled, _pseudo(unlabeled, fill=0), iterations=2)
    assert "pl_kept" not in stats2 and "pseudo" in stats2


@pytest.mark.parametrize("method", sorted(STRATEGIES))
def test_every_method_trains(method, synthetic_root, tmp_path, volumes):
    labeled, unlabeled = volumes
    tr = _trainer(synthetic_root, tmp_path, train={"method": method, "consistency": {"uamt_passes": 2}})
    stats = tr.train(labeled, unlabeled, _pseudo(unlabeled), iterations=3)
    assert tr.step == 3
    assert {"sup", "loss", "pseudo", "pseudo_weight"} <= set(stats)
    assert all(math.isfinite(v) for v in stats.values()), stats
    if method != "supervised":
        assert "consistency" in stats and "consistency_weight" in stats
    if method == "uamt":
        assert 0.0 <= stats["certain_fraction"] <= 1.0
    assert _distance(tr.student, tr.teacher) > 0


def test_unet3d_trains(synthetic_root, tmp_path, volumes):
    labeled, unlabeled = volumes
    tr = _trainer(synthetic_root, tmp_path,
                  model={"kind": "unet3d", "base_channels": 4, "depth": 2, "patch_size": [16, 16, 16]},
                  train={"labeled_batch_size": 1, "unlabeled_batch_size": 1})
    assert tr.student.dims == 3
    stats = tr.train(labeled, unlabeled, _pseudo(unlabeled), iterations=2)
    assert tr.step == 2 and all(math.isfinite(v) for v in stats.values())
    assert {"sup", "consistency", "pseudo"} <= set(stats)


def test_gradient_shares_are_measured_on_log_iterations(synthetic_root, tmp_path, volumes):
    labeled, unlabeled = volumes
    tr = _trainer(synthetic_root, tmp_path, train={"log_every": 2, "consistency": {"rampup_iterations": 0}})
    stats = tr.train(labeled, unlabeled, _pseudo(unlabeled), iterations=3)
    # measured at step 2 (log_every) and step 3 (the round's last); both terms pull with a finite share
    assert 0.0 < stats["consistency_grad_share"] < 10.0
    assert 0.0 < stats["pseudo_grad_share"] < 10.0
    # the share is |grad(w * term)| / |grad(sup)|: a 10x weight gives 10x the share on the same batch
    shares = []
    for weight in (0.1, 1.0):
        t = _trainer(synthetic_root, tmp_path, train={"log_every": 1, "method": "supervised",
                                                     "pseudo_label": {"weight": weight, "rampup_iterations": 0}})
        shares.append(t.train(labeled, unlabeled, _pseudo(unlabeled), iterations=1)["pseudo_grad_share"])
    assert shares[1] == pytest.approx(10 * shares[0], rel=1e-4)
    # measuring does not change training: same weights with and without measurements (each trainer is
    # built right before it trains: building one reseeds torch's global RNG, which dropout draws from)
    weights = []
    for log_every in (1, 1000):
        t = _trainer(synthetic_root, tmp_path, train={"log_every": log_every})
        t.train(labeled, unlabeled, _pseudo(unlabeled), iterations=2)
        weights.append(t.student.state_dict())
    assert _same_weights(*weights)


def test_uamt_certain_fraction_stays_below_one_over_the_run(synthetic_root, tmp_path, volumes):
    labeled, unlabeled = volumes
    tr = _trainer(synthetic_root, tmp_path, rounds=3, train={"method": "uamt", "iterations": 4,
                                                            "consistency": {"uamt_passes": 2}})
    assert tr.total_iterations == 12
    fractions = [tr.train(labeled, unlabeled, None, iterations=4)["certain_fraction"] for _ in range(3)]
    assert all(0.0 < f < 1.0 for f in fractions), fractions
    assert tr.strategy.total_iterations == 12


def test_official_semisam_term_mse_and_decreasing_weight(synthetic_root, tmp_path, volumes):
    labeled, unlabeled = volumes
    pl = {"weight": 0.05, "loss": "mse", "schedule": "down"}
    tr = _trainer(synthetic_root, tmp_path, rounds=3, train={"method": "supervised", "iterations": 4, "pseudo_label": pl})
    tr.train(labeled, unlabeled, None, iterations=4)  # round 0: no pseudo-labels
    r1 = tr.train(labeled, unlabeled, _pseudo(unlabeled), iterations=4)
    r2 = tr.train(labeled, unlabeled, _pseudo(unlabeled), iterations=4)
    assert tr.first_pseudo_step == 4
    expected = np.mean([rampdown_weight(0.05, s, 4, 11) for s in range(4, 8)])
    assert r1["pseudo_weight"] == pytest.approx(expected, rel=1e-6)
    assert 0.05 >= r1["pseudo_weight"] > r2["pseudo_weight"] > 0.05 * math.exp(-5) - 1e-9  # decreasing
    tr.step = 4
    assert tr.pseudo_label_weight() == pytest.approx(0.05)
    tr.step = 11
    assert tr.pseudo_label_weight() == pytest.approx(0.05 * math.exp(-5))
    # mse on softmax is at most 2 / C per voxel; CE + Dice on the same masks is larger
    assert 0.0 < r1["pseudo"] <= 2.0 / NUM_CLASSES
