"""The SAM backend: segment_anything's own classes at tiny size, real checkpoints, real torch.load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything.modeling import Sam

from pipeline.config import GeneralistConfig, SamConfig
from pipeline.errors import CheckpointError
from pipeline.generalist.base import SlicePrompt
from pipeline.generalist.factory import generalist_name
from pipeline.generalist.sam import SamGeneralist, build_sam_model, load_sam, save_tiny_sam

CPU = torch.device("cpu")
H, W = 40, 32


class _Payload:
    """Pickles as 'call write_text(flag, "ran")': loading it with weights_only=False runs that code."""

    def __init__(self, flag):
        self.flag = flag

    def __reduce__(self):
        return (type(self.flag).write_text, (self.flag, "ran"))


def _generalist(checkpoint, **kw) -> SamGeneralist:
    cfg = SamConfig(variant="tiny", checkpoint=checkpoint, **kw)
    return SamGeneralist(load_sam(cfg, CPU), cfg, CPU)


@pytest.fixture(scope="module")
def gen(tiny_sam_checkpoint) -> SamGeneralist:
    return _generalist(tiny_sam_checkpoint)


def _slices(b: int = 3) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    rng = np.random.default_rng(0)
    out = np.empty((b, H, W), np.float32)
    for s in range(b):
        out[s] = 50 + 10 * rng.normal(size=(H, W)) + 300 * (((yy - 15) / 9) ** 2 + ((xx - 12) / 6) ** 2 <= 1)
    return out


def _prompt(class_id, points, labels, box=None, mask=None) -> SlicePrompt:
    return SlicePrompt(class_id, np.asarray(points, np.float32).reshape(-1, 2), np.asarray(labels, np.int32),
                       None if box is None else np.asarray(box, np.float32), mask)


def test_build_is_segment_anything_sam():
    sam = build_sam_model("tiny")
    assert isinstance(sam, Sam)
    assert not sam.training
    assert sam.image_encoder.img_size == 64
    assert sam.prompt_encoder.image_embedding_size == (8, 8)
    with pytest.raises(CheckpointError, match="unknown SAM variant"):
        build_sam_model("vit_q")
    with pytest.raises(CheckpointError, match="patch size"):
        build_sam_model("tiny", image_size=60)


def test_save_load_round_trip(tmp_path):
    path = save_tiny_sam(tmp_path / "a.pt", seed=5)
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # atomic write: no temp file left
    loaded = load_sam(SamConfig(variant="tiny", checkpoint=path), CPU)
    torch.manual_seed(5)
    expected = build_sam_model("tiny").state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0)
    other = load_sam(SamConfig(variant="tiny", checkpoint=save_tiny_sam(tmp_path / "b.pt", seed=6)), CPU)
    k = "image_encoder.patch_embed.proj.weight"
    assert not torch.equal(other.state_dict()[k], got[k])  # the comparison above can fail


def test_wrapped_model_state_dict_loads(tmp_path, tiny_sam_checkpoint):
    state = torch.load(tiny_sam_checkpoint, map_location="cpu", weights_only=True)
    torch.save({"model": state, "epoch": 3}, tmp_path / "wrapped.pt")
    sam = load_sam(SamConfig(variant="tiny", checkpoint=tmp_path / "wrapped.pt"), CPU)
    torch.testing.assert_close(sam.state_dict()["mask_decoder.iou_token.weight"],
                               state["mask_decoder.iou_token.weight"], rtol=0, atol=0)


def test_missing_checkpoint_names_path(tmp_path):
    path = tmp_path / "nope" / "sam.pth"
    with pytest.raises(CheckpointError, match="does not exist") as e:
        load_sam(SamConfig(variant="tiny", checkpoint=path), CPU)
    assert str(path) in str(e.value)


def test_checkpoint_none_names_config_key():
    with pytest.raises(CheckpointError, match=r"generalist\.sam\.checkpoint"):
        load_sam(SamConfig(variant="tiny", checkpoint=None), CPU)


def test_pickled_object_refused_and_never_run(tmp_path):
    flag = tmp_path / "payload_ran.txt"
    path = tmp_path / "evil.pt"
    torch.save({"image_encoder.x": _Payload(flag)}, path)
    with pytest.raises(CheckpointError, match="weights-only") as e:
        load_sam(SamConfig(variant="tiny", checkpoint=path), CPU)
    assert str(path) in str(e.value)
    assert not flag.exists()
    # the payload is live: an unsafe load would have run it (so the assertion above can fail)
    torch.load(path, weights_only=False)
    assert flag.read_text() == "ran"


def test_truncated_checkpoint(tmp_path, tiny_sam_checkpoint):
    data = tiny_sam_checkpoint.read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot be read") as e:
        load_sam(SamConfig(variant="tiny", checkpoint=path), CPU)
    assert str(path) in str(e.value)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_sam(SamConfig(variant="tiny", checkpoint=path), CPU)


def test_tiny_checkpoint_as_vit_b_says_tiny(tiny_sam_checkpoint):
    with pytest.raises(CheckpointError, match="does not match variant vit_b") as e:
        load_sam(SamConfig(variant="vit_b", checkpoint=tiny_sam_checkpoint), CPU)
    assert "looks like a tiny checkpoint" in str(e.value)
    assert str(tiny_sam_checkpoint) in str(e.value)


def test_embed_non_square(gen):
    before = gen.encoder_calls
    emb = gen.embed(_slices(3))
    assert emb.shape == (3, 32, 8, 8) and emb.dtype == np.float32
    assert np.isfinite(emb).all()
    assert gen.encoder_calls == before + 3
    assert not np.allclose(emb[0], emb[1])  # different slices, different embeddings


@pytest.fixture(scope="module")
def embedding(gen) -> np.ndarray:
    return gen.embed(_slices(1))[0]


def test_decode_points_and_boxes(gen, embedding):
    prompts = [
        _prompt(1, [[12, 15], [28, 36]], [1, 0], [6, 6, 18, 24]),
        _prompt(2, [[25, 30], [5, 35]], [1, 1], [20, 26, 30, 38]),
    ]
    before = gen.decoder_calls
    res = gen.decode(embedding, (H, W), prompts)
    assert gen.decoder_calls == before + 2
    assert res.masks.shape == (2, H, W) and res.masks.dtype == bool
    assert res.logits.shape == (2, H, W) and res.logits.dtype == np.float32
    assert res.scores.shape == (2,) and ((res.scores >= 0) & (res.scores <= 1)).all()
    np.testing.assert_array_equal(res.masks, res.logits > 0)
    assert not np.allclose(res.logits[0], res.logits[1])  # the prompts reached the decoder


def test_decode_pads_uneven_point_counts(gen, embedding):
    one = _prompt(1, [[12, 15]], [1], [6, 6, 18, 24])
    three = _prompt(2, [[25, 30], [22, 28], [2, 2]], [1, 1, 0], [20, 26, 30, 38])
    res = gen.decode(embedding, (H, W), [one, three])
    assert res.masks.shape == (2, H, W) and res.scores.shape == (2,)
    # the short prompt is padded with label -1 points (SAM's "not a point" token; their coordinates are
    # zeroed by the prompt encoder): the same as giving those points explicitly, whatever their place
    padded = _prompt(1, [[12, 15], [7, 3], [30, 1]], [1, -1, -1], [6, 6, 18, 24])
    alone = gen.decode(embedding, (H, W), [padded])
    np.testing.assert_allclose(res.logits[0], alone.logits[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(res.logits[1], gen.decode(embedding, (H, W), [three]).logits[0], rtol=1e-5, atol=1e-5)
    # SAM does not skip those tokens: unpadded, the one-point prompt decodes (slightly) differently
    unpadded = gen.decode(embedding, (H, W), [one])
    assert np.abs(unpadded.logits[0] - res.logits[0]).max() > 1e-4
    # points only (no boxes), and no prompts at all
    pts_only = gen.decode(embedding, (H, W), [_prompt(1, [[12, 15]], [1]), _prompt(2, [], [])])
    assert pts_only.masks.shape == (2, H, W)
    empty = gen.decode(embedding, (H, W), [])
    assert empty.masks.shape == (0, H, W) and empty.scores.shape == (0,)


def test_mask_prompt_changes_output(gen, embedding):
    yy, xx = np.mgrid[:H, :W]
    mask_logits = np.where(((yy - 15) / 9) ** 2 + ((xx - 12) / 6) ** 2 <= 1, 8.0, -8.0).astype(np.float32)
    plain = _prompt(1, [[12, 15]], [1], [6, 6, 18, 24])
    with_mask = _prompt(1, [[12, 15]], [1], [6, 6, 18, 24], mask_logits)
    masked_input = gen._mask_prompt(mask_logits[None], (H, W))
    assert tuple(masked_input.shape) == (1, 1, 32, 32)  # SAM's low-res mask input, 4E x 4E
    a = gen.decode(embedding, (H, W), [plain])
    b = gen.decode(embedding, (H, W), [with_mask])
    assert b.masks.shape == (1, H, W)
    assert np.abs(a.logits - b.logits).max() > 1e-3


def test_input_frame_and_point_scaling(gen, tiny_sam_checkpoint):
    assert gen.input_size((40, 32)) == (64, 51)
    assert gen.input_size((32, 40)) == (51, 64)
    assert gen.input_size((64, 64)) == (64, 64)
    np.testing.assert_allclose(gen._scale_xy((40, 32)), [51 / 32, 64 / 40])  # (x scale, y scale)
    med = _generalist(tiny_sam_checkpoint, preprocess="medsam")
    assert med.input_size((40, 32)) == (64, 64)
    np.testing.assert_allclose(med._scale_xy((40, 32)), [64 / 32, 64 / 40])
    emb = med.embed(_slices(1))
    assert emb.shape == (1, 32, 8, 8)
    res = med.decode(emb[0], (H, W), [_prompt(1, [[12, 15]], [1], [6, 6, 18, 24])])
    assert res.masks.shape == (1, H, W)


def test_generalist_name_matches(gen, tiny_sam_checkpoint):
    assert gen.name == "sam-tiny"
    assert generalist_name(GeneralistConfig(backend="sam", sam=gen.cfg)) == gen.name
    med = _generalist(tiny_sam_checkpoint, preprocess="medsam")
    assert med.name == "sam-tiny-medsam"
    assert generalist_name(GeneralistConfig(backend="sam", sam=med.cfg)) == med.name
    assert generalist_name(GeneralistConfig(backend="classical")) == "classical-random-walker"
