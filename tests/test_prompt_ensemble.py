"""The prompt ensemble (issue 9 item 3): perturbed prompt sets per slice, the consensus pseudo-label, its
per-voxel uncertainty in the store and manifest, certainty-weighted training, and the audit on certain
voxels. Real parts: a specialist trained a few iterations on synthetic NIfTI cases, the classical
generalist and a tiny ``segment_anything`` SAM (random weights), a Zarr store on disk, a local Ray run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.config import PromptConfig, config_from_dict
from pipeline.errors import ConfigError, StoreError
from pipeline.generalist.factory import make_generalist
from pipeline.prompts import ensemble_prompts, prompts_for_slice, specialist_region
from pipeline.relabel import consensus, relabel_case
from pipeline.reports import inspect_frame
from pipeline.store import PseudoLabelStore
from pipeline.training.pseudo_labels import gated_pseudo_label, load_pseudo_labels
from tests.conftest import run_to_end, small_config_dict

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------ consensus (pure)
def test_consensus_majority_and_disagreement():
    a = np.array([[0, 1, 2, 1]], np.uint8)
    b = np.array([[0, 1, 1, 2]], np.uint8)
    c = np.array([[0, 2, 1, 0]], np.uint8)
    majority, u = consensus(np.stack([a, b, c]), [1, 2])
    # col 0: 0,0,0 -> 0 (all agree); col 1: 1,1,2 -> 1; col 2: 2,1,1 -> 1; col 3: 1,2,0 -> three-way tie -> member 0's 1
    np.testing.assert_array_equal(majority, [[0, 1, 1, 1]])
    np.testing.assert_allclose(u, [[0.0, 1 / 3, 1 / 3, 2 / 3]], atol=1e-6)


def test_consensus_tie_goes_to_member_zero_and_unanimity_is_certain():
    members = np.array([[2, 0, 1], [1, 0, 1], [1, 0, 1], [2, 0, 1]], np.uint8)[:, None]  # (4, 1, 3)
    majority, u = consensus(members, [1, 2])
    np.testing.assert_array_equal(majority, [[2, 0, 1]])  # 2-2 tie -> member 0 says 2
    np.testing.assert_allclose(u, [[0.5, 0.0, 0.0]])


def test_consensus_of_one_member_is_that_member_with_no_uncertainty():
    m = np.array([[[0, 1], [2, 2]]], np.uint8)
    majority, u = consensus(m, [1, 2])
    np.testing.assert_array_equal(majority, m[0])
    assert not u.any()


# --------------------------------------------------------------------------------- prompts (pure)
def _blob_probs(h: int = 40, w: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """A specialist softmax (3, H, W) with a confident disc of class 1 and a faint rim, and its argmax."""
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot(yy - 20, xx - 18)
    p1 = np.clip(1.2 - r / 10, 0.02, 0.96)  # 0.5 at r = 7
    p2 = np.full((h, w), 0.02)
    probs = np.stack([1 - p1 - p2, p1, p2])
    return probs, probs.argmax(0).astype(np.uint8)


def test_specialist_region_at_half_is_the_argmax_and_grows_below_it():
    probs, pred = _blob_probs()
    majority = probs.max(0) >= 0.5  # where one class holds the majority, threshold 0.5 is the argmax
    assert majority.mean() > 0.95
    np.testing.assert_array_equal(specialist_region(probs, [1, 2], 0.5)[majority], pred[majority])
    assert (specialist_region(probs, [1, 2], 0.35) > 0).sum() > (pred > 0).sum() > (specialist_region(probs, [1, 2], 0.65) > 0).sum()


def test_member_zero_is_the_single_prompt_set_and_draws_the_same_randomness():
    probs, pred = _blob_probs()
    cfg1, cfg4 = PromptConfig(), PromptConfig(ensemble=4)
    rng1, rng4 = np.random.default_rng(5), np.random.default_rng(5)
    single = ensemble_prompts(pred, probs, [1, 2], cfg1, rng1, np.random.default_rng(9))
    four = ensemble_prompts(pred, probs, [1, 2], cfg4, rng4, np.random.default_rng(9))
    assert len(single) == 1 and len(four) == 4
    assert json.dumps([p.summary() for p in single[0]]) == json.dumps([p.summary() for p in four[0]])
    assert single[0][0].summary() == prompts_for_slice(pred, [1, 2], cfg1, np.random.default_rng(5))[0].summary()
    assert rng1.random() == rng4.random()  # the next slice's prompts are the same too
    # the perturbed members differ from member 0 (points and/or box), and positives stay in their region
    assert any(json.dumps(m[0].summary()) != json.dumps(four[0][0].summary()) for m in four[1:])
    for m in four[1:]:
        for p in m:
            xy = p.points_xy[p.point_labels == 1].astype(int)
            assert (probs[p.class_id][xy[:, 1], xy[:, 0]] >= 0.5 - cfg4.threshold_jitter).all()
            x0, y0, x1, y1 = p.box_xyxy
            assert 0 <= x0 <= x1 <= 39 and 0 <= y0 <= y1 <= 39


def test_no_jitter_and_no_threshold_change_gives_identical_boxes():
    probs, pred = _blob_probs()
    cfg = PromptConfig(ensemble=3, point_jitter=0, box_margin_jitter=0, threshold_jitter=0.0)
    members = ensemble_prompts(pred, probs, [1, 2], cfg, np.random.default_rng(0), np.random.default_rng(1))
    boxes = {tuple(m[0].box_xyxy) for m in members}
    assert len(boxes) == 1  # same region, same margin: only the random points differ
    assert members[0][0].points_xy[0].tolist() == members[1][0].points_xy[0].tolist()  # the interior point


def test_uncertainty_weighting_needs_an_ensemble(synthetic_root, tmp_path):
    d = small_config_dict(synthetic_root, tmp_path, train={"pseudo_label": {"uncertainty_weighting": True}})
    with pytest.raises(ConfigError, match="prompts.ensemble >= 2"):
        config_from_dict(d)
    d["prompts"] = {"ensemble": 3}
    assert config_from_dict(d).train.pseudo_label.uncertainty_weighting


# ------------------------------------------------------------------ relabel with a trained specialist
def _relabel(specialist, n: int, sam_checkpoint=None):
    d, model, info, case_id, image = specialist
    d = {**d, "prompts": {"ensemble": n}}
    if sam_checkpoint is not None:
        d["generalist"] = {"backend": "sam", "sam": {"variant": "tiny", "checkpoint": str(sam_checkpoint)}}
    cfg = config_from_dict(d)
    generalist = make_generalist(cfg.generalist, CPU)
    return relabel_case(case_id, image, model, generalist, None, cfg, info.foreground_classes, 1, 0, CPU)


def test_classical_ensemble_consensus_agrees_with_the_single_set_where_all_members_agree(specialist):
    one, three = _relabel(specialist, 1), _relabel(specialist, 3)
    assert one.uncertainty is None
    u = three.uncertainty
    assert u.shape == three.pseudo_label.shape
    assert set(np.unique(np.round(u * 3)).astype(int)) <= {0, 1, 2}  # 0, 1/3, 2/3 of 3 members disagree
    assert (u > 0).any(), "perturbed prompts never changed a voxel: no spread was measured"
    certain = u == 0
    # where every member agrees the consensus is member 0's mask, i.e. the single-set pseudo-label
    np.testing.assert_array_equal(three.pseudo_label[certain], one.pseudo_label[certain])
    np.testing.assert_array_equal(three.specialist, one.specialist)
    # manifest rows: member 0's prompts as before, the others recorded, summaries consistent with the map
    for r1, r3 in zip(one.rows, three.rows, strict=True):
        assert r1["prompts"] == r3["prompts"] and r1["ensemble"] == 1 and r3["ensemble"] == 3
        assert np.isnan(r1["uncertain_fraction"])
        s = r3["slice"]
        assert r3["uncertain_fraction"] == pytest.approx(float((u[s] > 0).mean()))
        others = json.loads(r3["ensemble_prompts"])
        assert len(others) == 2
        if r3["num_prompts"]:
            assert 0.0 <= r3["fg_uncertainty"] <= 2 / 3 + 1e-6


def test_tiny_sam_ensemble_decodes_every_member_on_one_embedding(specialist, tiny_sam_checkpoint):
    d, model, info, case_id, image = specialist
    cfg = config_from_dict({**d, "prompts": {"ensemble": 4},
                            "generalist": {"backend": "sam", "sam": {"variant": "tiny",
                                                                     "checkpoint": str(tiny_sam_checkpoint)}}})
    generalist = make_generalist(cfg.generalist, CPU)
    out = relabel_case(case_id, image, model, generalist, None, cfg, info.foreground_classes, 1, 0, CPU)
    prompted = [r for r in out.rows if r["num_prompts"] or json.loads(r["ensemble_prompts"]) != [[], [], []]]
    assert prompted
    assert generalist.encoder_calls == len(prompted)  # one embedding per prompted slice, not one per member
    members = sum(r["num_prompts"] + sum(len(m) for m in json.loads(r["ensemble_prompts"])) for r in out.rows)
    assert generalist.decoder_calls == members
    assert out.uncertainty is not None and out.uncertainty.max() <= 0.75 + 1e-6
    np.testing.assert_array_equal(out.uncertainty > 0, out.uncertainty >= 0.25)


# -------------------------------------------------------------------------------- store and training
def test_store_keeps_uncertainty_and_reads_parts_without_ensemble_columns(tmp_path):
    store = PseudoLabelStore(tmp_path / "pl", create=True, class_ids=[1, 2])
    store.ensure_round(1, 0, "g")
    pl = np.zeros((3, 4, 5), np.uint8)
    u = np.full((3, 4, 5), 0.25, np.float32)
    store.write_case(1, "c1", pl, pl, np.zeros((3, 2), np.float32), {}, uncertainty=u)
    np.testing.assert_array_equal(store.read_case(1, "c1")["uncertainty"], u)
    assert store.case_status(1) == {"c1": True}
    store.write_case(1, "c1", pl, pl, np.zeros((3, 2), np.float32), {})  # redone with one prompt set
    assert store.read_case(1, "c1")["uncertainty"] is None
    # a part written before the ensemble columns existed reads with the one-set defaults
    row = {"round": 1, "case_id": "c1", "slice": 0, "checkpoint_version": 0, "generalist": "g", "num_prompts": 0,
           "prompts": "[]", "score_mean": np.nan, "scores": "{}", "pseudo_fg_fraction": 0.0,
           "specialist_fg_fraction": 0.0, "agreement_dice": np.nan, "embedding_cached": False}
    store.append_manifest([row])
    m = store.manifest(1)
    assert m["ensemble"].tolist() == [1] and m["ensemble_prompts"].tolist() == ["[]"]
    assert m["uncertain_fraction"].isna().all()


def test_certainty_weights_the_pseudo_label_voxels(tmp_path):
    pl = np.ones((2, 3, 3), np.uint8)
    spec = pl.copy()
    spec[0, 0, 0] = 0
    u = np.zeros((2, 3, 3), np.float32)
    u[1, 1, 1] = 2 / 3
    gated = gated_pseudo_label(pl, spec, np.full((2, 2), 0.9, np.float32), 0, 0.5, uncertainty=u)
    assert gated.voxel_weight[1, 1, 1] == pytest.approx(1 / 3) and gated.voxel_weight[0, 0, 0] == 1.0
    both = gated_pseudo_label(pl, spec, np.full((2, 2), 0.9, np.float32), 0, 0.5, consensus_only=True, uncertainty=u)
    assert both.voxel_weight[0, 0, 0] == 0.0 and both.voxel_weight[1, 1, 1] == pytest.approx(1 / 3)
    # the weights reach the crop weights the loss uses
    w = both.weight((2, 3, 3), 0)
    assert w[1, 1, 1] == pytest.approx(1 / 3) and w[0, 0, 0] == 0.0
    store = PseudoLabelStore(tmp_path / "pl", create=True, class_ids=[1])
    store.ensure_round(1, 0, "g")
    store.write_case(1, "c1", pl, spec, np.full((2, 1), 0.9, np.float32), {})
    with pytest.raises(StoreError, match="c1.*no uncertainty array"):
        load_pseudo_labels(store, 1, ["c1"], 0, 0.0, uncertainty_weighting=True)


# ------------------------------------------------------------------------------------- end to end
def test_run_with_an_ensemble_stores_uncertainty_audits_certain_voxels_and_trains_on_it(data12, tmp_path, ray_cluster):
    d = small_config_dict(data12, tmp_path, rounds=2, prompts={"ensemble": 3},
                          train={"iterations": 20, "pseudo_label": {"uncertainty_weighting": True}},
                          eval={"audit_pseudo_labels": True, "every_round": False})
    cfg = config_from_dict(d)
    _, summaries = run_to_end(cfg)
    store = PseudoLabelStore(cfg.run_dir / "pseudo_labels")
    m = store.manifest(1)
    assert (m["ensemble"] == 3).all()
    assert m["uncertain_fraction"].notna().all()
    for case_id in m["case_id"].unique():
        c = store.read_case(1, case_id)
        assert c["uncertainty"] is not None and c["uncertainty"].shape == c["pseudo_label"].shape
        assert c["attrs"]["ensemble"] == 3
        per_slice = m[m["case_id"] == case_id].sort_values("slice")["uncertain_fraction"].to_numpy()
        np.testing.assert_allclose(per_slice, (c["uncertainty"] > 0).mean(axis=(1, 2)), atol=1e-9)
    audit = pd.read_parquet(cfg.run_dir / "audit" / "round_001.parquet")
    assert audit["pseudo_dice_certain"].notna().all() and audit["specialist_dice_certain"].notna().all()
    s1 = summaries[1]
    assert s1.relabel["ensemble"] == 3 and 0 <= s1.relabel["fg_uncertainty"] <= 2 / 3
    assert "on certain voxels" in s1.line() and "3-member prompt ensemble" in s1.line()
    assert s1.train["pseudo_weight"] > 0 and "pseudo" in s1.train
    table = inspect_frame(cfg.run_dir / "pseudo_labels")  # `semisam inspect` shows the ensemble and its spread
    row = table[table["round"] == 1].iloc[0]
    assert row["ensemble"] == 3 and row["fg_uncertainty"] == pytest.approx(s1.relabel["fg_uncertainty"])
