"""The adapted generalist (pipeline.generalist.adapt): box jitter, targets in the decoder's frame, fitting a
tiny random-weight SAM's decoder on ring-and-disk slices (the myocardium's problem in small), and the
weights-only run artifact with its SHA-256."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import AdaptConfig, GeneralistConfig, SamConfig
from pipeline.errors import CheckpointError
from pipeline.generalist.adapt import (
    adapt_slices,
    fit_decoder,
    jitter_box,
    label_box,
    low_res_target,
    read_adapted,
    save_adapted,
    slices_to_embed,
)
from pipeline.generalist.base import SlicePrompt
from pipeline.generalist.sam import SamGeneralist, checkpoint_sha256, load_sam
from pipeline.metrics import dice

CPU = torch.device("cpu")
RING, DISK = 1, 2


def _generalist(checkpoint) -> SamGeneralist:
    cfg = SamConfig(variant="tiny", checkpoint=str(checkpoint), encoder_backend="eager", precision="fp32")
    return SamGeneralist(load_sam(cfg, CPU), cfg, CPU)


def _ring_slices(n: int, seed: int = 0, shape: tuple[int, int] = (48, 40)) -> tuple[np.ndarray, np.ndarray]:
    """n slices (float32 (n, H, W)) with a bright ring (class 1) around a mid-grey disk (class 2) at random
    places and sizes, and their labels uint8 (n, H, W)."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    images = rng.normal(0, 0.05, (n, h, w)).astype(np.float32)
    labels = np.zeros((n, h, w), np.uint8)
    for i in range(n):
        r_in = rng.uniform(5, 8)
        r_out = r_in + rng.uniform(3, 5)
        cy, cx = rng.uniform(r_out + 1, h - r_out - 1), rng.uniform(r_out + 1, w - r_out - 1)
        d = np.hypot(yy - cy, xx - cx)
        labels[i][d <= r_out] = RING
        labels[i][d <= r_in] = DISK
        images[i][labels[i] == RING] += 1.0
        images[i][labels[i] == DISK] += 0.5
    return images, labels


def _tight_box_dice(gen: SamGeneralist, embeddings: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    got: dict[int, list[float]] = {RING: [], DISK: []}
    for s in range(len(labels)):
        prompts = [SlicePrompt(c, np.zeros((0, 2), np.float32), np.zeros(0, np.int32), label_box(labels[s] == c))
                   for c in (RING, DISK)]
        res = gen.decode(embeddings[s], labels[s].shape, prompts)
        for p, m in zip(prompts, res.masks, strict=True):
            got[p.class_id].append(dice(m, labels[s] == p.class_id))
    return {c: float(np.mean(v)) for c, v in got.items()}


def test_jitter_box_without_jitter_is_the_box_with_its_margin_and_stays_inside():
    rng = np.random.default_rng(0)
    box = np.array([10, 5, 19, 24], np.float32)
    still = AdaptConfig(shift_std=0, log_scale_std=0, margin_min=2, margin_max=2)
    np.testing.assert_array_equal(jitter_box(box, (30, 30), still, rng), [8, 3, 21, 26])
    edge = AdaptConfig(shift_std=0, log_scale_std=0, margin_min=4, margin_max=4)
    np.testing.assert_array_equal(jitter_box(np.array([0, 0, 5, 29], np.float32), (30, 30), edge, rng), [0, 0, 9, 29])
    wild = AdaptConfig(shift_std=2.0, log_scale_std=1.0, margin_min=0, margin_max=9)
    for _ in range(200):
        b = jitter_box(box, (30, 20), wild, rng)
        assert 0 <= b[0] <= b[2] <= 19 and 0 <= b[1] <= b[3] <= 29


def test_jitter_box_draws_the_configured_distribution():
    rng = np.random.default_rng(1)
    cfg = AdaptConfig(shift_std=0.1, log_scale_std=0.0, margin_min=0, margin_max=0)
    box = np.array([100, 100, 139, 139], np.float32)  # 40 px sides, far from the edges
    centres = np.array([(b[0] + b[2]) / 2 for b in (jitter_box(box, (400, 400), cfg, rng) for _ in range(2000))])
    assert abs(centres.mean() - 119.5) < 0.3
    assert abs(centres.std() - 4.0) < 0.3  # 0.1 x 40 px, up to rounding
    cfg = AdaptConfig(shift_std=0.0, log_scale_std=0.2, margin_min=0, margin_max=0)
    widths = np.array([b[2] - b[0] + 1 for b in (jitter_box(box, (400, 400), cfg, rng) for _ in range(2000))])
    assert abs(np.log(widths / 40).std() - 0.2) < 0.02


def test_low_res_target_sits_in_the_top_left_of_the_padded_frame():
    mask = np.zeros((40, 20), bool)
    mask[:20, :] = True  # the top half
    t = low_res_target(mask, input_size=(64, 32), image_size=64, low_res=32)  # slice -> (64, 32) of 64, L = 32
    assert t.shape == (32, 32)
    assert t[:16, :16].min() == 1 and t[16:, :].max() == 0 and t[:, 16:].max() == 0


def test_slices_to_embed_and_adapt_slices_keep_slices_with_a_class():
    labels = np.zeros((3, 10, 10), np.uint8)
    labels[0, :2, :2] = 1  # 4 px
    labels[2, :1, :3] = 2  # 3 px: too small
    assert slices_to_embed(labels, [1, 2], min_pixels=4) == [0]
    items = adapt_slices({0: np.zeros((2, 2, 2), np.float32), 2: np.ones((2, 2, 2), np.float32)}, labels, [1, 2], 3)
    assert [it.classes for it in items] == [(1,), (2,)]


@pytest.fixture
def one_thread():
    """One intra-op thread: on 2 shared cores, two OpenMP threads spinning against other processes made the
    decoder's small steps 30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_fitting_the_decoder_learns_ring_and_disk_and_the_artifact_reproduces_it(tiny_sam_checkpoint, tmp_path,
                                                                                 one_thread):
    torch.manual_seed(0)
    images, labels = _ring_slices(12, seed=0)
    gen = _generalist(tiny_sam_checkpoint)
    embeddings = gen.embed(images)
    before = _tight_box_dice(gen, embeddings, labels)

    cfg = AdaptConfig(enabled=True, iterations=80, slices_per_step=4, lr=6e-3, class_token_lr=6e-3, shift_std=0.02,
                      log_scale_std=0.03, margin_min=0, margin_max=2)
    items = adapt_slices(dict(enumerate(embeddings)), labels, [RING, DISK], cfg.min_pixels)
    fitted = fit_decoder(gen, items, [RING, DISK], cfg, seed=0)
    after = _tight_box_dice(gen, embeddings, labels)
    assert fitted["stats"]["slices"] == 12 and fitted["stats"]["prompts"] == 24
    assert after[RING] > 0.6 and after[DISK] > 0.6, (before, after)
    assert after[RING] > before[RING] + 0.2

    path = tmp_path / "adapted_decoder.pt"
    sha = save_adapted(path, fitted, cfg, checkpoint_sha256(gen.cfg))
    payload = read_adapted(path, expect_sha256=sha)
    assert payload["class_ids"] == [RING, DISK] and payload["settings"]["iterations"] == 80
    fresh = _generalist(tiny_sam_checkpoint)
    assert _tight_box_dice(fresh, embeddings, labels) == before  # fitting changed that generalist only
    fresh.use_adapted(payload, sha)
    assert fresh.decoder_sha256 == sha
    assert _tight_box_dice(fresh, embeddings, labels) == after

    path.write_bytes(path.read_bytes()[:-1] + b"x")
    with pytest.raises(CheckpointError, match="changed or damaged"):
        read_adapted(path, expect_sha256=sha)
    with pytest.raises(CheckpointError, match="missing"):
        read_adapted(tmp_path / "nothing.pt")


def test_an_adapted_decoder_of_another_checkpoint_is_refused(tiny_sam_checkpoint, tmp_path):
    gen = _generalist(tiny_sam_checkpoint)
    fitted = {"state": {}, "class_ids": [1], "stats": {}}
    sha = save_adapted(tmp_path / "a.pt", fitted, AdaptConfig(), "0" * 64)
    with pytest.raises(CheckpointError, match="fitted on the SAM checkpoint"):
        gen.use_adapted(read_adapted(tmp_path / "a.pt", sha), sha)


def test_adapt_needs_a_sam_backend():
    with pytest.raises(ValueError, match="backend 'classical'"):
        GeneralistConfig(backend="classical", adapt={"enabled": True})
