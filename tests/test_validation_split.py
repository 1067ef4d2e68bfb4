"""The validation split (issue 29): from a split file's ``val``, an SSL4MIS ``val.list`` or ``data.num_val``
cases of the unlabeled pool; none for a set too small (logged); the default selection cases; the best
round by validation Dice. Real dataset folders on disk, no Ray (the demo run of tests/test_predict.py
covers the rounds end to end)."""

from __future__ import annotations

import json
import logging
import math

import pytest

from pipeline.config import DataConfig
from pipeline.data.dataset import read_dataset_info
from pipeline.data.splits import resolve_selection, resolve_split
from pipeline.data.synthetic import write_synthetic_ssl4mis
from pipeline.data.validate import validate_cases
from pipeline.errors import ConfigError
from pipeline.round_summary import RoundSummary, best_round


def test_val_from_the_split_file_leaves_the_unlabeled_pool(synthetic_root, tmp_path):
    tree = json.loads((synthetic_root / "splits.json").read_text())  # test: 2 cases, train_order: 6
    split_file = tmp_path / "splits.json"
    split_file.write_text(json.dumps({**tree, "val": [tree["train_order"][-1]]}))
    info = read_dataset_info(synthetic_root)
    split = resolve_split(DataConfig(root=synthetic_root, split_file=split_file, num_labeled=2), info)
    assert split.val == [tree["train_order"][-1]] and split.unlabeled == tree["train_order"][2:-1]
    assert split.labeled == tree["train_order"][:2] and "'val' of split file" in split.val_source
    validate_cases(info, split)  # the validation case's label is checked like a test case's
    # selection for class_source auto defaults to the validation cases
    assert resolve_selection(DataConfig(root=synthetic_root, split_file=split_file, num_labeled=2), info,
                             split) == (split.val, f"the validation split ({split.val_source})")
    split_file.write_text(json.dumps({**tree, "val": [tree["train_order"][0]]}))  # a labeled case
    with pytest.raises(ConfigError, match=r"case 'case_\d+' appears in both labeled and val"):
        resolve_split(DataConfig(root=synthetic_root, split_file=split_file, num_labeled=2), info)
    split_file.write_text(json.dumps({**tree, "val": "case_003"}))
    with pytest.raises(ConfigError, match=r"'val' must be a list of case id strings"):
        resolve_split(DataConfig(root=synthetic_root, split_file=split_file, num_labeled=2), info)


def test_num_val_holds_out_the_last_labeled_cases_of_the_pool_or_none(synthetic_root, caplog):
    info = read_dataset_info(synthetic_root)
    tree = json.loads((synthetic_root / "splits.json").read_text())
    cfg = DataConfig(root=synthetic_root, split_file=synthetic_root / "splits.json", num_labeled=2, num_val=2)
    split = resolve_split(cfg, info)
    assert split.val == tree["train_order"][-2:] and split.unlabeled == tree["train_order"][2:-2]
    assert split.test == tree["test"] and not set(split.val) & set(split.unlabeled)
    with caplog.at_level(logging.INFO, logger="pipeline.data.splits"):
        small = resolve_split(cfg.model_copy(update={"num_val": 3}), info)  # a pool of 4 cannot spare 3
        assert small.val == [] and small.unlabeled == tree["train_order"][2:]
        assert "no validation split: data.num_val=3 asks for more than this set holds (4 unlabeled" in caplog.text
        caplog.clear()
        none = resolve_split(cfg.model_copy(update={"num_val": 0}), info)
        assert none.val == [] and "no validation split (no 'val' in the split file" in caplog.text


def test_ssl4mis_val_list_is_the_validation_split_and_the_selection(tmp_path, caplog):
    root = write_synthetic_ssl4mis(tmp_path / "acdc", num_train=3, num_val=1, num_test=1, seed=1)
    info = read_dataset_info(root)
    cfg = DataConfig(root=root, num_labeled=1, slice_axis=0)
    split = resolve_split(cfg, info)
    assert split.val == info.split_lists["val"] == ["patient004_frame01"] and split.test == ["patient005_frame01"]
    cases, source = resolve_selection(cfg, info, split)
    assert cases == split.val and source.startswith("the validation split (val.list of")
    assert resolve_split(cfg.model_copy(update={"max_val": 0}), info).val == []
    # without a test.list, val.list is the test split: it cannot also choose the best round
    (root / "test.list").unlink()
    info = read_dataset_info(root)
    with caplog.at_level(logging.INFO, logger="pipeline.data.splits"):
        split = resolve_split(cfg, info)
    assert split.test == ["patient004_frame01"] and split.val == []
    assert "val.list of" in caplog.text and "is the test split here" in caplog.text


def test_best_round_is_the_highest_validation_dice_never_the_test():
    def summary(r: int, val: float | None, test: float) -> dict:
        return {"round": r, "val": {} if val is None else {"dice": val}, "test": {"dice": test}}

    rounds = [summary(0, 0.5, 0.9), summary(1, 0.7, 0.1), summary(2, 0.7, 0.95), summary(3, math.nan, 0.99)]
    assert best_round(rounds) == {"round": 1, "val_dice": 0.7, "test_dice": 0.1}  # earliest of equal ones
    assert best_round([summary(0, None, 0.9), summary(1, None, 0.8)]) is None
    old = {"round": 0, "seconds": 1.0, "train": {}, "relabel": {}, "test": {}, "audit": {}, "timing": {}}
    assert RoundSummary(**old).val == {}  # a state.json written before validation splits still loads
    line = RoundSummary(round=2, seconds=1.0, val={"dice": 0.8123}).line()
    assert "val Dice 0.8123" in line
