"""``semisam predict`` on a real short demo run (issue 29): the demo's data, `semisam run conf/demo.yaml` with
few iterations and a validation split, then the real command on real NIfTI / h5 files, in-process and on
a real local Ray; its Dice is the run's own test Dice; Ctrl-C keeps finished files, a rerun skips them."""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import signal
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from pipeline.errors import DatasetError, Interrupted
from pipeline.predict import PredictOptions, predict
from pipeline.reports import eval_table
from pipeline.verify import verify_run
from semisam.cli import main
from workers.predictor import Predictor

CONF = Path(__file__).resolve().parents[1] / "conf" / "demo.yaml"
TEST_CASES = ["case_000", "case_001", "case_002"]  # the demo's splits.json: its first 3 cases are test


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`semisam demo-data` + a short `semisam run conf/demo.yaml` (2 rounds x 30 iterations, 2 validation
    cases held out of the unlabeled pool): (data folder, run folder, state.json)."""
    root = tmp_path_factory.mktemp("predict_demo")
    data = root / "data"
    assert main(["demo-data", str(data)]) == 0
    assert main(["run", str(CONF), f"data.root={data}", f"data.split_file={data / 'splits.json'}",
                 f"output_dir={root / 'runs'}", f"generalist.sam.checkpoint={data / 'tiny_sam.pt'}",
                 "train.iterations=30", "rounds=2", "data.num_val=2", "train.log_every=1000"]) == 0
    run = root / "runs" / "demo"
    return data, run, json.loads((run / "state.json").read_text())


def _images(data: Path, cases: list[str]) -> list[str]:
    return [str(data / "imagesTr" / f"{c}.nii.gz") for c in cases]


def test_predict_writes_labels_with_the_inputs_affine_and_the_runs_test_dice(demo_run, tmp_path, capsys):
    data, run, state = demo_run
    out = tmp_path / "out"
    assert main(["predict", str(run), *_images(data, TEST_CASES), str(out), "--labels", str(data / "labelsTr"),
                 "--round", "last"]) == 0
    assert "3 scans measured: mean Dice" in capsys.readouterr().out
    for case in TEST_CASES:
        written, source = nib.load(out / f"{case}.nii.gz"), nib.load(data / "imagesTr" / f"{case}.nii.gz")
        np.testing.assert_array_equal(written.affine, source.affine)
        assert written.header.get_zooms() == source.header.get_zooms() and written.shape == source.shape
        labels = np.asarray(written.dataobj)
        assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2} and (labels > 0).any()
    summary = json.loads((out / "summary.json").read_text())
    last = state["completed"][-1]
    assert summary["round"] == last == 1
    assert abs(summary["means"]["dice"] - state["summaries"][-1]["test"]["dice"]) < 1e-6
    # per case and class too: the same numbers as the run's own test table of that round
    mine = pd.read_csv(out / "metrics.csv").set_index(["case_id", "class_id"])
    theirs = pd.read_parquet(run / "eval" / f"round_{last:03d}.parquet").set_index(["case_id", "class_id"])
    np.testing.assert_allclose(mine.loc[theirs.index, "dice"], theirs["dice"], atol=1e-6)
    np.testing.assert_allclose(mine.loc[theirs.index, "hd95_mm"], theirs["hd95_mm"], atol=1e-6)
    assert set(mine["class_name"]) == {"anterior", "posterior"}  # the dataset's names, as `semisam eval`


def test_eval_shows_validation_beside_test_and_predict_takes_the_best_round(demo_run, tmp_path):
    data, run, state = demo_run
    assert sorted(p.name for p in (run / "eval").glob("val_round_*.parquet")) == ["val_round_000.parquet",
                                                                                  "val_round_001.parquet"]
    vals = [s["val"]["dice"] for s in state["summaries"]]
    best = state["best"]
    assert best["round"] == int(np.argmax(vals)) and best["val_dice"] == max(vals)
    text = eval_table(run).splitlines()
    header = text[1].split()
    assert header[:4] == ["round", "best", "val_cases", "val_dice"] and "test_dice" in header
    rows = {int(line.split()[0]): line.split() for line in text[2:4]}
    assert rows[best["round"]][1] == "*" and "*" not in rows[1 - best["round"]]
    assert f"{vals[0]:.4f}" in rows[0] and f"{state['summaries'][0]['test']['dice']:.4f}" in rows[0]
    assert text[-1] == f"best round by validation Dice: {best['round']} (validation Dice {best['val_dice']:.4f})"
    report = verify_run(run)  # the validation tables are checked with the rest (read, made by their checkpoint)
    assert report.ok, report.text()
    summary = predict(str(run), [Path(p) for p in _images(data, TEST_CASES[:1])], tmp_path / "best",
                      PredictOptions(labels=data / "labelsTr"), Predictor)
    assert summary["round"] == best["round"]  # --round best (the default) is the validation's choice
    test_table = pd.read_parquet(run / "eval" / f"round_{best['round']:03d}.parquet")
    expected = test_table[test_table["case_id"] == TEST_CASES[0]]["dice"].mean()
    assert abs(summary["means"]["dice"] - expected) < 1e-6


def test_interrupted_prediction_resumes_without_redoing_finished_scans(demo_run, tmp_path):
    data, run, _ = demo_run
    out, images = tmp_path / "out", [data / "imagesTr"]  # a folder: all 12 scans, in this process
    done: list[str] = []

    def sigint_after_two(case_id: str) -> None:
        done.append(case_id)
        if len(done) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C: the scan in hand is finished, then it stops

    with pytest.raises(Interrupted):
        predict(str(run), images, out, PredictOptions(round="last", in_process_max=100), Predictor, sigint_after_two)
    finished = sorted(p.name for p in out.glob("*.nii.gz"))
    assert finished == [f"{c}.nii.gz" for c in done] and not list(out.glob(".*"))  # no half-written file
    mtimes = {name: (out / name).stat().st_mtime_ns for name in finished}
    summary = predict(str(run), images, out, PredictOptions(round="last", in_process_max=100), Predictor)
    assert summary["scans"] == 12 and summary["written_now"] == 10 and summary["failed"] == []
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == mtimes  # not redone
    assert len(list(out.glob("*.nii.gz"))) == 12


def test_many_scans_go_to_ray_actors_with_the_same_result(demo_run, tmp_path, caplog):
    data, run, _ = demo_run
    cases = ["case_003", "case_004", "case_005"]
    here = predict(str(run), [Path(p) for p in _images(data, cases)], tmp_path / "here",
                   PredictOptions(round="last", labels=data / "labelsTr"), Predictor)
    with caplog.at_level(logging.INFO, logger="pipeline.predict"):
        there = predict(str(run), [Path(p) for p in _images(data, cases)], tmp_path / "ray",
                        PredictOptions(round="last", labels=data / "labelsTr", in_process_max=0), Predictor)
    assert "on 2 Ray actors" in caplog.text  # conf/demo.yaml's workers.sam.num_workers
    for case in cases:
        np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "here" / f"{case}.nii.gz").dataobj),
                                      np.asarray(nib.load(tmp_path / "ray" / f"{case}.nii.gz").dataobj))
    assert there["means"]["dice"] == here["means"]["dice"] and there["written_now"] == 3


def test_bad_input_gets_one_line_naming_the_file(demo_run, tmp_path):
    data, run, _ = demo_run
    bad = tmp_path / "bad"
    bad.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((10, 12), np.float32), np.eye(4)), bad / "flat.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.float32), np.eye(4)), bad / "two.nii.gz")
    (bad / "junk.nii.gz").write_bytes(b"not a nifti file")
    shutil.copy(data / "imagesTr" / "case_000.nii.gz", bad / "mr_0001.nii.gz")  # nnU-Net's second channel
    with pytest.raises(DatasetError) as e:
        predict(str(run), [bad], tmp_path / "out", PredictOptions(), Predictor)
    problems = e.value.problems
    assert len(problems) == 1 and problems[0].startswith(f"{bad / 'mr_0001.nii.gz'}: channel 0001")
    (bad / "mr_0001.nii.gz").unlink()
    with pytest.raises(DatasetError) as e:
        predict(str(run), [bad], tmp_path / "out", PredictOptions(), Predictor)
    lines = dict(p.split(": ", 1) for p in e.value.problems)
    assert set(lines) == {str(bad / n) for n in ("flat.nii.gz", "two.nii.gz", "junk.nii.gz")}
    assert "2D array" in lines[str(bad / "flat.nii.gz")] and "has 2 channels" in lines[str(bad / "two.nii.gz")]
    assert "unreadable" in lines[str(bad / "junk.nii.gz")]
    assert not (tmp_path / "out").exists()  # nothing started
    # a file whose header reads but whose data is cut short fails alone, named; the others are written
    good = tmp_path / "good"
    good.mkdir()
    for case in ("case_003", "case_004"):
        shutil.copy(data / "imagesTr" / f"{case}.nii.gz", good)
    raw = gzip.decompress((good / "case_004.nii.gz").read_bytes())
    (good / "case_004.nii.gz").write_bytes(gzip.compress(raw[: len(raw) // 2]))
    assert main(["predict", str(run), str(good), str(tmp_path / "out2")]) == 1
    assert (tmp_path / "out2" / "case_003.nii.gz").is_file() and not (tmp_path / "out2" / "case_004.nii.gz").exists()


def test_h5_scans_get_nifti_labels_with_their_spacing(demo_run, tmp_path):
    from pipeline.data.synthetic import write_synthetic_h5

    _, run, _ = demo_run
    h5 = write_synthetic_h5(tmp_path / "h5", num_cases=2, seed=5, spacing=(0.5, 0.7, 2.0))
    summary = predict(str(run), [h5 / "case_000.h5"], tmp_path / "out", PredictOptions(round="0"), Predictor)
    assert summary["round"] == 0 and summary["failed"] == []
    written = nib.load(tmp_path / "out" / "case_000.nii.gz")
    np.testing.assert_allclose(written.affine, np.diag([0.5, 0.7, 2.0, 1.0]))
    assert written.shape == (24, 40, 32) and np.asarray(written.dataobj).dtype == np.uint8


def test_with_generalist_gives_the_pseudo_label_relabeling_stored(demo_run, tmp_path, capsys):
    """--with-generalist --round 0 on an unlabeled case is what relabel round 1 stored for it (checkpoint 0,
    the round's prompts, the run's generalist and class sources), voxel for voxel."""
    from pipeline.store import PseudoLabelStore

    data, run, state = demo_run
    case = "case_005"  # unlabeled: relabeled in round 1 (train_order minus 2 labeled, minus the 2 validation)
    assert main(["predict", str(run), *_images(data, [case]), str(tmp_path / "sam"), "--round", "0",
                 "--with-generalist"]) == 0
    capsys.readouterr()
    written = np.asarray(nib.load(tmp_path / "sam" / f"{case}.nii.gz").dataobj)
    stored = PseudoLabelStore(run / "pseudo_labels").read_case(1, case)
    np.testing.assert_array_equal(written, stored["pseudo_label"])  # the demo's slice axis is 0
    assert (stored["pseudo_label"] != stored["specialist"]).any()  # the generalist did change something
    plain = predict(str(run), [Path(p) for p in _images(data, [case])], tmp_path / "plain", PredictOptions(round="0"),
                    Predictor)
    assert plain["generalist"] is None
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "plain" / f"{case}.nii.gz").dataobj),
                                  stored["specialist"])
