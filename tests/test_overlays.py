"""Overlay pictures, slice picking, summary sheets and eval plots, on a small real store and run folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.data.dataset import load_label, read_dataset_info
from pipeline.data.synthetic import write_synthetic_msd
from pipeline.errors import ConfigError, StoreError
from pipeline.eval_plots import audit_frame, write_eval_plots
from pipeline.overlays import _panels, draw_overlays, parse_prompts, pick_slices
from pipeline.reports import inspect_frame, write_overlays
from pipeline.store import PseudoLabelStore
from tests.conftest import small_config_dict

CLASSICAL = "classical-random-walker"
SHAPE = (16, 20, 18)  # (X, Y, Z); slices along X: 16 slices of (20, 18)


def _manifest_rows(case_id: str, pseudo: np.ndarray, agreement: list[float], score: list[float],
                   generalist: str = CLASSICAL) -> list[dict]:
    rows = []
    for s in range(pseudo.shape[0]):
        prompted = not np.isnan(score[s])
        prompts = [{"class_id": 1, "points_xy": [[5.0, 6.0], [7.0, 6.0], [2.0, 2.0]], "point_labels": [1, 1, 0],
                    "box_xyxy": [3.0, 4.0, 9.0, 10.0], "mask_prompt": False}] if prompted else []
        rows.append({"round": 1, "case_id": case_id, "slice": s, "checkpoint_version": 0, "generalist": generalist,
                     "num_prompts": len(prompts), "prompts": json.dumps(prompts), "score_mean": score[s],
                     "scores": json.dumps({"1": score[s]} if prompted else {}),
                     "pseudo_fg_fraction": float((pseudo[s] > 0).mean()), "specialist_fg_fraction": 0.1,
                     "agreement_dice": agreement[s], "embedding_cached": False})
    return rows


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A run folder: synthetic data (case_002 has no label file), config.yaml, and a store with round 1 of
    case_000 (labeled) and case_002 (unlabeled), whose manifest values are set so the picks are known."""
    base = tmp_path_factory.mktemp("overlay_run")
    data = write_synthetic_msd(base / "data", num_cases=4, shape=SHAPE, seed=5)
    (data / "labelsTr" / "case_002.nii.gz").unlink()
    (data / "splits.json").write_text(json.dumps({"test": ["case_003"], "train_order": ["case_000", "case_001",
                                                                                      "case_002"]}))
    run_dir = base / "runs" / "test"
    run_dir.mkdir(parents=True)
    cfg = small_config_dict(data, base / "runs")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))

    info = read_dataset_info(data)
    store = PseudoLabelStore(run_dir / "pseudo_labels", create=True, class_ids=[1, 2], slice_axis=0)
    store.ensure_round(1, 0, CLASSICAL)
    n = SHAPE[0]
    truth = load_label(info, "case_000")  # (16, 20, 18), slices along axis 0
    rows = []
    for case_id, pseudo in (("case_000", truth), ("case_002", np.roll(truth, 2, axis=1))):
        specialist = np.where(pseudo == 2, 0, pseudo).astype(np.uint8)
        store.write_case(1, case_id, pseudo.astype(np.uint8), specialist, np.full((n, 2), 0.5, np.float32), {})
        agreement = [0.9] * n
        score = [0.8] * n
        if case_id == "case_000":
            agreement[3], agreement[7] = 0.10, 0.20          # the two largest disagreements
            score[5] = 0.05                                  # the lowest score
            agreement[0] = score[0] = float("nan")           # not prompted: never picked
        else:
            agreement[4] = 0.15
            score[9] = 0.01
        rows += _manifest_rows(case_id, pseudo, agreement, score)
    store.append_manifest(rows)
    return {"run_dir": run_dir, "store": run_dir / "pseudo_labels", "info": info}


# ---------------------------------------------------------------------------------------------- picking


def test_pick_slices_orders_by_each_criterion(run):
    m = PseudoLabelStore(run["store"]).manifest()
    pick = lambda how, k: [(r.case_id, int(r.slice)) for r in pick_slices(m, how, k).itertuples()]  # noqa: E731
    assert pick("disagreement", 3) == [("case_000", 3), ("case_002", 4), ("case_000", 7)]
    assert pick("lowest-score", 2) == [("case_002", 9), ("case_000", 5)]
    fg = m[m["num_prompts"] > 0].sort_values("pseudo_fg_fraction", ascending=False, kind="stable")
    assert pick("most-foreground", 1)[0][1] == int(fg.iloc[0]["slice"])
    random_a, random_b = pick("random", 5), [(r.case_id, int(r.slice)) for r in pick_slices(m, "random", 5).itertuples()]
    assert random_a == random_b and len(set(random_a)) == 5 and ("case_000", 0) not in random_a
    assert len(pick_slices(m, "random", 500)) == 2 * SHAPE[0] - 1  # every prompted slice, no more
    with pytest.raises(ConfigError, match="not one of"):
        pick_slices(m, "biggest", 2)


def test_parse_prompts():
    assert parse_prompts("") == [] and parse_prompts(None) == []
    assert parse_prompts('[{"class_id": 2, "points_xy": [[1.0, 2.0]], "point_labels": [1], "box_xyxy": null, '
                         '"mask_prompt": false}]')[0]["class_id"] == 2


# ---------------------------------------------------------------------------------------------- pictures


def test_overlays_have_the_expected_panels_and_slices(run, tmp_path):
    out = draw_overlays(run["store"], tmp_path / "png", num_slices=3, pick="disagreement")
    slices, sheets = [o for o in out if o.case_id], [o for o in out if o.case_id is None]
    assert [(o.case_id, o.slice) for o in slices] == [("case_000", 3), ("case_002", 4), ("case_000", 7)]
    full = ("image", "specialist", "pseudo-label + prompts", "ground truth")
    assert slices[0].panels == full and slices[2].panels == full
    assert slices[1].panels == full[:3]  # case_002 has no label file: no ground-truth panel
    for o in slices:
        assert o.path == tmp_path / "png" / f"round001_{o.case_id}_slice{o.slice:03d}.png" and o.path.is_file()
    # A 4-panel picture is wider than a 3-panel one of the same slice size.
    wide, narrow = plt.imread(slices[0].path), plt.imread(slices[1].path)
    assert wide.shape[1] > 1.2 * narrow.shape[1]

    assert len(sheets) == 1 and sheets[0].path == tmp_path / "png" / "sheets" / "round_001.png"
    assert sheets[0].grid == (3, 4)
    assert sheets[0].panels[4:8] == ("image", "specialist", "pseudo-label + prompts", "no ground truth")
    sheet = plt.imread(sheets[0].path)
    assert sheet.shape[0] > 2 * wide.shape[0]  # three rows


def test_write_overlays_keeps_its_entry_point(run, tmp_path):
    paths = write_overlays(run["store"], tmp_path / "png", num_slices=2)
    assert [p.name for p in paths] == ["round001_case_000_slice003.png", "round001_case_002_slice004.png",
                                       "round_001.png"]
    with pytest.raises(StoreError, match="no round 4"):
        write_overlays(run["store"], tmp_path / "png", num_slices=2, round_index=4)


def test_uncertainty_is_drawn_only_when_stored(run, tmp_path, monkeypatch):
    row = PseudoLabelStore(run["store"]).manifest().iloc[3]
    arrays = PseudoLabelStore(run["store"]).read_case(1, "case_000")
    assert [t.split("\n")[0] for t, _, _ in _panels(row, arrays, 3, None)] == [
        "image", "specialist", "pseudo-label + prompts"]
    real_read = PseudoLabelStore.read_case

    def with_uncertainty(self, round_index, case_id):
        out = real_read(self, round_index, case_id)
        return {**out, "uncertainty": np.random.default_rng(0).random(out["pseudo_label"].shape).astype(np.float32)}

    monkeypatch.setattr(PseudoLabelStore, "read_case", with_uncertainty)
    out = draw_overlays(run["store"], tmp_path / "png", num_slices=1)
    assert out[0].panels == ("image", "specialist", "pseudo-label + prompts", "ground truth", "uncertainty")


def test_cli_inspect_pick_and_cached_dash(run, tmp_path, capsys):
    from semisam.cli import main

    assert main(["inspect", str(run["store"]), "--png", str(tmp_path / "png"), "--num-slices", "2",
                 "--pick", "lowest-score"]) == 0
    out = capsys.readouterr().out
    assert "wrote 2 slice pictures (lowest-score)" in out and "sheets/round_001.png" in out
    assert sorted(p.name for p in (tmp_path / "png").glob("*.png")) == [
        "round001_case_000_slice005.png", "round001_case_002_slice009.png"]
    frame = inspect_frame(run["store"])
    assert frame["cached"].tolist() == ["-"]  # the random walker has no embeddings


def test_cached_counts_for_a_sam_generalist(tmp_path):
    store = PseudoLabelStore(tmp_path / "pl", create=True, class_ids=[1], slice_axis=0)
    store.ensure_round(1, 0, "sam-tiny")
    pseudo = np.zeros((3, 4, 4), np.uint8)
    pseudo[:, 1:3, 1:3] = 1
    store.write_case(1, "c", pseudo, pseudo, np.full((3, 1), 0.5, np.float32), {})
    rows = _manifest_rows("c", pseudo, [1.0, 1.0, 1.0], [0.5, 0.5, 0.5], generalist="sam-tiny")
    rows[1]["embedding_cached"] = True
    store.append_manifest(rows)
    assert inspect_frame(tmp_path / "pl")["cached"].tolist() == ["1/3"]


# ---------------------------------------------------------------------------------------------- eval plots


def _eval_files(run_dir: Path, rounds: dict[int, float], audit: dict[int, tuple[float, float]]) -> None:
    (run_dir / "eval").mkdir(parents=True, exist_ok=True)
    for r, dice in rounds.items():
        pd.DataFrame([{"round": r, "case_id": "c", "class_id": k, "dice": dice, "jaccard": dice / 2,
                       "hd95_mm": 3.0, "asd_mm": 1.0} for k in (1, 2)]).to_parquet(
            run_dir / "eval" / f"round_{r:03d}.parquet")
    if audit:
        (run_dir / "audit").mkdir(exist_ok=True)
    for r, (pseudo, specialist) in audit.items():
        pd.DataFrame([{"round": r, "case_id": c, "class_id": 1, "pseudo_dice": pseudo, "specialist_dice": specialist}
                      for c in ("a", "b")]).to_parquet(run_dir / "audit" / f"round_{r:03d}.parquet")


def test_eval_plots_with_and_without_audit(tmp_path, capsys):
    from semisam.cli import main

    with_audit = tmp_path / "a"
    _eval_files(with_audit, {0: 0.4, 1: 0.5, 2: 0.6}, {1: (0.55, 0.45), 2: (0.65, 0.6)})
    assert audit_frame(with_audit).to_dict("list") == {"round": [1, 2], "pseudo_dice": [0.55, 0.65],
                                                       "specialist_dice": [0.45, 0.6]}
    assert main(["eval", str(with_audit), "--png", str(tmp_path / "png_a")]) == 0
    assert "dice_per_round.png (test Dice per round, pseudo-label vs specialist Dice (audit))" in capsys.readouterr().out
    two = plt.imread(tmp_path / "png_a" / "dice_per_round.png")

    without = tmp_path / "b"
    _eval_files(without, {0: 0.4, 1: 0.5}, {})
    plot = write_eval_plots(without, tmp_path / "png_b")
    assert plot.panels == ("test Dice per round",) and audit_frame(without).empty
    one = plt.imread(plot.path)
    assert two.shape[1] > 1.6 * one.shape[1]  # the audit panel doubles the width
    shutil.rmtree(tmp_path / "png_b")


def test_pictures_have_a_legend_a_robust_window_and_flag_empty_masks(run, tmp_path):
    """Issue 18: no legend for the class colours or the point marks; one panel almost black (a min-max window
    spoiled by outliers); empty masks with a passing score not flagged."""
    from pipeline.overlays import display_window

    out = draw_overlays(run["store"], tmp_path / "png", num_slices=2)
    names = run["info"].labels
    assert all(o.legend == (names[1], names[2], "positive point", "negative point", "box prompt") for o in out)
    image = np.zeros((20, 20), np.float32)
    image[5:15, 5:15] = 1.0
    image[0, 0] = 1000.0  # one outlier: min-max would map the anatomy to 0.1 % grey
    lo, hi = display_window(image)
    assert hi < 2.0 and lo == 0.0
    arrays = PseudoLabelStore(run["store"]).read_case(1, "case_000")
    row = PseudoLabelStore(run["store"]).manifest().iloc[3]
    s = next(i for i in range(SHAPE[0]) if (arrays["pseudo_label"][i] == 1).any() and not (arrays["pseudo_label"][i] == 2).any())
    title = _panels(row, arrays, s, None, [1, 2], names)[2][0]
    assert f"EMPTY mask: {names[2]} (gated out)" in title  # class 2 was scored (prompted) but is absent
    full = next(i for i in range(SHAPE[0]) if {1, 2} <= set(np.unique(arrays["pseudo_label"][i])))
    assert "EMPTY" not in _panels(row, arrays, full, None, [1, 2], names)[2][0]
