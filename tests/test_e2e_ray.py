"""End to end on a real local Ray cluster (2 CPUs): tiny SAM, a pool of 2 SAM actors, synthetic data.

Round 0 trains; rounds 1 and 2 relabel every unlabeled case with the previous checkpoint and train on
the masks. Then the same run folder is resumed with one more round, and the CLI reads the results.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.config import config_from_dict
from pipeline.data.dataset import read_dataset_info
from pipeline.data.splits import resolve_split
from pipeline.store import PseudoLabelStore, open_manifest, open_masks
from semisam.cli import main as cli_main
from semisam.launch import make_coordinator, run_with_stats
from tests.conftest import small_config_dict

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def finished_run(ray_cluster, synthetic_root, tiny_sam_checkpoint, tmp_path_factory):
    """Run 3 rounds (0: train; 1, 2: relabel + train); keep the coordinator's worker stats."""
    run_root = tmp_path_factory.mktemp("runs")
    cfg = config_from_dict(small_config_dict(synthetic_root, run_root, tiny_sam_checkpoint))
    summaries, stats = run_with_stats(cfg)
    split = resolve_split(cfg.data, read_dataset_info(cfg.data.root))
    return cfg, summaries, stats, split


def test_every_unlabeled_case_has_masks_in_both_relabel_rounds(finished_run):
    cfg, summaries, _, split = finished_run
    assert [s.round for s in summaries] == [0, 1, 2]
    store = PseudoLabelStore(cfg.run_dir / "pseudo_labels")
    assert store.rounds() == [1, 2]
    manifest = store.manifest()
    assert len(split.unlabeled) == 4
    for r in (1, 2):
        masks = open_masks(store.root, r)
        assert sorted(masks) == sorted(split.unlabeled)
        rows = manifest[manifest["round"] == r]
        for case_id, arr in masks.items():
            stored = store.read_case(r, case_id)
            assert stored["attrs"]["checkpoint_version"] == r - 1  # relabeled with the previous checkpoint
            assert stored["attrs"]["generalist"] == "sam-tiny"
            case_rows = rows[rows["case_id"] == case_id]
            # one manifest row per slice, slices numbered 0..S-1
            assert sorted(case_rows["slice"]) == list(range(arr.shape[0]))
            assert set(np.unique(arr.compute())) <= {0, 1, 2}
            # the manifest's foreground fraction is the stored mask's
            fg = (stored["pseudo_label"] > 0).mean(axis=(1, 2))
            np.testing.assert_allclose(case_rows.sort_values("slice")["pseudo_fg_fraction"], fg, atol=1e-9)
        assert (rows["checkpoint_version"] == r - 1).all()
    assert len(open_manifest(store.root).compute()) == len(manifest)


def test_round_two_reused_cached_embeddings(finished_run):
    cfg, summaries, stats, _ = finished_run
    r1, r2 = summaries[1].relabel, summaries[2].relabel
    assert r1["prompted_slices"] > 0, "the specialist prompted nothing: the test would prove nothing"
    # Round 1 computed embeddings for the slices it prompted; round 2 read back every slice it had seen.
    manifest = PseudoLabelStore(cfg.run_dir / "pseudo_labels").manifest()
    m1 = manifest[(manifest["round"] == 1) & (manifest["num_prompts"] > 0)]
    m2 = manifest[(manifest["round"] == 2) & (manifest["num_prompts"] > 0)]
    assert not m1["embedding_cached"].any()
    seen = set(zip(m1["case_id"], m1["slice"], strict=True))
    for case_id, s, cached in zip(m2["case_id"], m2["slice"], m2["embedding_cached"], strict=True):
        assert cached == ((case_id, s) in seen)
    assert r2["cached_slices"] == sum((c, s) in seen for c, s in zip(m2["case_id"], m2["slice"], strict=True))
    assert r2["cached_slices"] > 0
    # Counted in the actors too: encoder calls = cache misses, and every hit skipped the encoder.
    hits = sum(s["cache_hits"] for s in stats)
    misses = sum(s["cache_misses"] for s in stats)
    assert hits == r2["cached_slices"]
    assert sum(s["encoder_calls"] for s in stats) == misses
    assert misses == len(m1) + (len(m2) - r2["cached_slices"])
    # both actors did work (the pool really is a pool)
    assert all(s["seconds"] > 0 for s in stats)


def test_evaluation_results_exist(finished_run):
    cfg, summaries, _, split = finished_run
    for r in range(3):
        df = pd.read_parquet(cfg.run_dir / "eval" / f"round_{r:03d}.parquet")
        assert sorted(df["case_id"].unique()) == sorted(split.test)
        assert sorted(df["class_id"].unique()) == [1, 2]
        assert df["dice"].between(0, 1).all()
        assert summaries[r].test["dice"] == pytest.approx(df["dice"].mean())
    ckpts = (cfg.run_dir / "checkpoints").list_names()
    assert ckpts == [f"ckpt_000{i}.pt{ext}" for i in range(3) for ext in ("", ".sha256")]
    state = json.loads((cfg.run_dir / "state.json").read_text())
    assert state["completed"] == [0, 1, 2]
    # each checkpoint's SHA-256 is recorded when published, in state.json and beside the file
    for i in range(3):
        data = (cfg.run_dir / "checkpoints" / f"ckpt_000{i}.pt").read_bytes()
        assert state["checkpoints"][str(i)] == hashlib.sha256(data).hexdigest()


def test_resume_runs_only_the_missing_round(finished_run):
    cfg, _, _, _ = finished_run
    ckpt_dir = Path(cfg.run_dir) / "checkpoints"
    before = {p.name: p.stat().st_mtime_ns for p in ckpt_dir.iterdir()}
    manifest_before = PseudoLabelStore(cfg.run_dir / "pseudo_labels").manifest()
    cfg4 = config_from_dict({**cfg.model_dump(mode="json"), "rounds": 4})
    coordinator = make_coordinator(cfg4)
    try:
        summaries = coordinator.run()
    finally:
        coordinator.shutdown()
    assert [s.round for s in summaries] == [0, 1, 2, 3]
    after = {p.name: p.stat().st_mtime_ns for p in ckpt_dir.iterdir()}
    assert {k: after[k] for k in before} == before  # finished rounds were not redone
    assert "ckpt_0003.pt" in after
    manifest = PseudoLabelStore(cfg.run_dir / "pseudo_labels").manifest()
    old = manifest[manifest["round"] < 3].sort_values(["round", "case_id", "slice"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(old, manifest_before.sort_values(["round", "case_id", "slice"]).reset_index(drop=True))
    assert (manifest[manifest["round"] == 3]["checkpoint_version"] == 2).all()


def test_resume_refuses_a_different_config(finished_run):
    from pipeline.errors import ConfigError

    cfg, _, _, _ = finished_run
    other = config_from_dict({**cfg.model_dump(mode="json"), "train": {**cfg.train.model_dump(mode="json"), "lr": 0.5}})
    with pytest.raises(ConfigError, match="train.lr"):
        make_coordinator(other)


def test_cli_inspect_and_eval_read_the_run(finished_run, capsys, tmp_path, monkeypatch):
    cfg, _, _, split = finished_run
    monkeypatch.chdir(tmp_path)  # from any folder: the saved config holds absolute paths
    saved = yaml.safe_load((cfg.run_dir / "config.yaml").read_text())
    assert Path(saved["data"]["root"]).is_absolute() and Path(saved["output_dir"]).is_absolute()
    # a shared run folder stays readable by a colleague (was 0600)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.yaml", "state.json", "checkpoints/ckpt_0000.pt", "eval/round_000.parquet"):
        assert os.stat(Path(cfg.run_dir) / name).st_mode & 0o777 == 0o666 & ~umask, name
    assert cli_main(["inspect", str(cfg.run_dir / "pseudo_labels"), "--png", str(tmp_path / "png"), "--num-slices", "2"]) == 0
    out = capsys.readouterr().out
    lines = [ln.split() for ln in out.splitlines()]
    header = lines[0]
    assert header[:3] == ["round", "cases", "slices"]
    rows = {int(ln[0]): ln for ln in lines[1:] if ln and ln[0].isdigit()}
    assert sorted(rows)[:2] == [1, 2]
    assert int(rows[1][1]) == len(split.unlabeled)
    assert len(list((tmp_path / "png").glob("*.png"))) == 2
    assert cli_main(["eval", str(cfg.run_dir)]) == 0
    out = capsys.readouterr().out
    assert "mm" in out and "dice" in out
    names = read_dataset_info(cfg.data.root).labels  # the class names reach the eval table and its text
    table = pd.read_parquet(Path(cfg.run_dir) / "eval" / "round_000.parquet")
    assert dict(zip(table["class_id"], table["class_name"], strict=True)) == {c: names[c] for c in table["class_id"]}
    assert all(f"dice_{names[c]}" in out for c in set(table["class_id"]))


def test_without_the_pseudo_label_term_rounds_only_train(ray_cluster, synthetic_root, tmp_path):
    """Plain Mean Teacher: no SAM pool is started, nothing is relabeled, every round trains on."""
    cfg = config_from_dict(small_config_dict(synthetic_root, tmp_path, rounds=2,
                                             train={"pseudo_label": {"enabled": False}}))
    coordinator = make_coordinator(cfg)
    try:
        assert coordinator.pool is None
        summaries = coordinator.run()
    finally:
        coordinator.shutdown()
    assert [s.relabel for s in summaries] == [{}, {}]
    assert [s.train["step"] for s in summaries] == [6, 12]
    assert "pseudo" not in summaries[1].train
    assert PseudoLabelStore(cfg.run_dir / "pseudo_labels").parts() == []
    assert (cfg.run_dir / "eval" / "round_001.parquet").is_file()


def test_tensorboard_events_hold_the_losses_and_the_round_metrics(ray_cluster, synthetic_root, tmp_path):
    """Issue 18: losses per step and test metrics, audit and relabel statistics per round, read back from
    the event files the run wrote (``tensorboard --logdir <run folder>/tb``), with class names."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config_from_dict(small_config_dict(synthetic_root, tmp_path, rounds=2, train={"log_every": 2},
                                             eval={"audit_pseudo_labels": True}))
    coordinator = make_coordinator(cfg)
    try:
        summaries = coordinator.run()
    finally:
        coordinator.shutdown()
    rounds = EventAccumulator(str(Path(cfg.run_dir) / "tb" / "rounds")).Reload()
    dice = rounds.Scalars("test/dice")
    assert [e.step for e in dice] == [0, 1]
    assert [e.value for e in dice] == pytest.approx([s.test["dice"] for s in summaries], abs=1e-6)
    names = read_dataset_info(cfg.data.root).labels
    assert {f"test/dice_{names[1]}", "audit/pseudo_dice", f"audit/{names[1]}/pseudo_dice",
            "relabel/score_mean"} <= set(rounds.Tags()["scalars"])
    train = EventAccumulator(str(Path(cfg.run_dir) / "tb" / "train")).Reload()
    loss = train.Scalars("train/loss")
    assert [e.step for e in loss] == [2, 4, 6, 8, 10, 12]  # 6 iterations a round, every 2nd logged
    assert "train/pseudo" in train.Tags()["scalars"]         # the SemiSAM term, in round 1
