"""Per-class pseudo-label sources (generalist / specialist / auto), nested overlaps and box-only prompts."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.class_source import compose, configured_sources, decide
from pipeline.config import PromptConfig, config_from_dict
from pipeline.data.dataset import read_dataset_info
from pipeline.data.splits import resolve_selection, resolve_split
from pipeline.errors import ConfigError
from pipeline.generalist.factory import make_generalist
from pipeline.prompts import prompts_for_slice
from pipeline.relabel import merge_class_masks, relabel_case
from pipeline.store import PseudoLabelStore
from tests.conftest import run_to_end, shared_path, small_config_dict

CPU = torch.device("cpu")


def test_configured_sources_one_value_or_per_class():
    assert configured_sources("auto", [1, 2, 3]) == {1: "auto", 2: "auto", 3: "auto"}
    assert configured_sources({2: "specialist"}, [1, 2, 3]) == {1: "generalist", 2: "specialist", 3: "generalist"}
    cfg = config_from_dict({"data": {"root": "/x", "num_labeled": 1},
                            "generalist": {"class_source": {"2": "specialist"}}})
    assert cfg.generalist.class_source == {2: "specialist"}  # YAML/override keys become class values


def test_compose_keeps_specialist_classes_and_replaces_generalist_ones():
    spec = np.array([[0, 1, 1, 2, 2, 3, 3, 0]], np.uint8)
    gen = np.array([[1, 1, 0, 0, 3, 3, 3, 3]], np.uint8)  # generalist map of classes 1 and 3 only
    out = compose(spec, gen, [1, 3])
    # class 2 (specialist-sourced) is the specialist's where the generalist paints nothing; classes 1 and 3
    # are exactly the generalist's (the specialist's 1 at column 2 is gone)
    np.testing.assert_array_equal(out, [[1, 1, 0, 2, 3, 3, 3, 3]])
    np.testing.assert_array_equal(compose(spec, np.zeros_like(gen), []), spec)


def test_decide_takes_the_generalist_only_where_it_beats_the_specialist_by_the_margin():
    table = pd.DataFrame({"case_id": ["a", "b"] * 3, "class_id": [1, 1, 2, 2, 3, 3],
                          "generalist_dice": [0.9, 0.8, 0.1, 0.2, 0.7, 0.7],
                          "specialist_dice": [0.6, 0.7, 0.5, 0.6, 0.68, 0.68]})
    sources, evidence = decide({1: "auto", 2: "auto", 3: "auto"}, table, 0.0)
    assert sources == {1: "generalist", 2: "specialist", 3: "generalist"}
    assert evidence[1] == {"generalist_dice": 0.85, "specialist_dice": 0.65, "cases": 2}
    sources, _ = decide({1: "auto", 2: "generalist", 3: "auto"}, table, 0.05)
    assert sources == {1: "generalist", 2: "generalist", 3: "specialist"}  # 0.02 gain < 0.05; 2 is set
    assert decide({1: "auto"}, None, 0.0)[0] == {1: "specialist"}  # no evidence: keep the specialist


def test_nested_overlap_keeps_the_inner_structure():
    yy, xx = np.mgrid[:21, :21]
    r = np.hypot(yy - 10, xx - 10)
    disk, inner = r <= 8, r <= 4   # a box around a ring (MYO) gives the disk; the LV is the inner part
    masks = np.stack([disk, inner])
    logits = np.stack([np.full(disk.shape, 5.0), np.full(disk.shape, 1.0)]).astype(np.float32)  # disk more sure
    by_logit = merge_class_masks(masks, logits, [2, 3])
    assert not (by_logit == 3).any()          # the LV vanishes under the more confident disk
    nested = merge_class_masks(masks, logits, [2, 3], overlap="nested")
    np.testing.assert_array_equal(nested == 3, inner)
    np.testing.assert_array_equal(nested == 2, disk & ~inner)   # the ring
    np.testing.assert_array_equal(merge_class_masks(masks[::-1], logits[::-1], [3, 2], "nested"), nested)


def test_box_only_prompts_draw_the_same_randomness():
    pred = np.zeros((20, 20), np.uint8)
    pred[5:12, 4:15] = 1
    a = prompts_for_slice(pred, [1], PromptConfig(use_points=False), rng := np.random.default_rng(0))
    after_a = rng.random()
    b = prompts_for_slice(pred, [1], PromptConfig(), rng := np.random.default_rng(0))
    assert rng.random() == after_a
    assert a[0].points_xy.shape == (0, 2) and len(a[0].point_labels) == 0
    np.testing.assert_array_equal(a[0].box_xyxy, b[0].box_xyxy)
    with pytest.raises(ValueError, match="nothing would prompt"):
        PromptConfig(use_points=False, use_box=False)


# ------------------------------------------------------------------ relabel with a trained specialist
def _relabel(specialist, sources, sam_checkpoint=None):
    d, model, info, case_id, image = specialist
    if sam_checkpoint is not None:
        d = {**d, "generalist": {"backend": "sam", "sam": {"variant": "tiny", "checkpoint": str(sam_checkpoint)}}}
    cfg = config_from_dict(d)
    generalist = make_generalist(cfg.generalist, CPU)
    out = relabel_case(case_id, image, model, generalist, None, cfg, info.foreground_classes, 1, 0, CPU, sources)
    return out, generalist


def test_specialist_sourced_class_is_not_prompted_and_keeps_the_specialist_mask(specialist, tiny_sam_checkpoint):
    out, gen = _relabel(specialist, {1: "specialist", 2: "generalist"}, tiny_sam_checkpoint)
    assert (out.specialist == 1).any() and not (out.specialist == 2).any()
    # class 1 is not prompted and class 2 has nothing to prompt from: no encoder or decoder call, and the
    # pseudo-label is exactly the specialist's map
    assert all(json.loads(r["prompts"]) == [] for r in out.rows)
    assert gen.encoder_calls == 0 and gen.decoder_calls == 0
    np.testing.assert_array_equal(out.pseudo_label, out.specialist)
    assert json.loads(out.rows[0]["class_source"]) == {"1": "specialist", "2": "generalist"}


def test_generalist_sourced_class_is_the_all_generalist_mask(specialist, tiny_sam_checkpoint):
    everything, _ = _relabel(specialist, None, tiny_sam_checkpoint)
    out, gen = _relabel(specialist, {1: "generalist", 2: "specialist"}, tiny_sam_checkpoint)
    prompted = [p for r in out.rows for p in json.loads(r["prompts"])]
    assert prompted and {p["class_id"] for p in prompted} == {1}
    assert gen.decoder_calls == len(prompted)
    # class 2 is never predicted, so class 1's masks (same prompts, same random draws) are those of the
    # run where the generalist labels every class
    np.testing.assert_array_equal(out.pseudo_label, everything.pseudo_label)
    assert [r["prompts"] for r in out.rows] == [r["prompts"] for r in everything.rows]
    assert json.loads(everything.rows[0]["class_source"]) == {"1": "generalist", "2": "generalist"}


# ------------------------------------------------------------------------------------- selection cases
def test_selection_defaults_to_val_list_and_refuses_overlaps():
    root = shared_path("acdc")
    data = {"root": str(root), "format": "ssl4mis", "num_labeled": 6,
            "labels": {0: "background", 1: "RV", 2: "MYO", 3: "LV"}}
    cfg = config_from_dict({"data": data})
    info = read_dataset_info(root, "ssl4mis", cfg.data.labels)
    split = resolve_split(cfg.data, info)
    cases, source = resolve_selection(cfg.data, info, split)
    assert cases == (root / "val.list").read_text().split() and source.startswith("the validation split (val.list")
    bad = config_from_dict({"data": {**data, "selection": [split.labeled[0], "patient999_frame01"]}})
    with pytest.raises(ConfigError, match=r"(?s)patient999_frame01. is not in the dataset.*patient099_frame01. is also a labeled case"):
        resolve_selection(bad.data, info, split)


def test_selection_falls_back_to_the_labeled_cases(synthetic_root):
    cfg = config_from_dict(small_config_dict(synthetic_root, synthetic_root / "unused"))
    info = read_dataset_info(synthetic_root)
    split = resolve_split(cfg.data, info)
    cases, source = resolve_selection(cfg.data, info, split)
    assert cases == split.labeled and "optimistic" not in source and "labeled training cases" in source


def test_auto_run_records_choice_evidence_and_selection_table(data12, tmp_path, ray_cluster, tiny_sam_checkpoint):
    """A real run with class_source auto: the trainer scores both sources on the selection cases, the
    coordinator decides, the manifest and the round summary say what was chosen and why."""
    d = small_config_dict(data12, tmp_path, tiny_sam_checkpoint, rounds=2,
                          generalist={"backend": "sam", "class_source": "auto",
                                      "sam": {"variant": "tiny", "checkpoint": str(tiny_sam_checkpoint)}},
                          train={"iterations": 20}, eval={"audit_pseudo_labels": True, "every_round": False})
    cfg = config_from_dict(d)
    _, summaries = run_to_end(cfg)
    table = pd.read_parquet(cfg.run_dir / "selection" / "round_001.parquet")
    assert sorted(table["case_id"].unique()) == sorted(resolve_split(cfg.data, read_dataset_info(data12)).labeled)
    assert set(table["class_id"]) == {1, 2} and table[["generalist_dice", "specialist_dice"]].notna().all().all()
    relabel = summaries[1].relabel
    want, _ = decide({1: "auto", 2: "auto"}, table, 0.0)
    assert relabel["class_source"] == {str(c): s for c, s in want.items()}
    for c in ("1", "2"):
        ev = relabel["class_source_evidence"][c]
        rows = table[table["class_id"] == int(c)]
        assert ev["generalist_dice"] == pytest.approx(rows["generalist_dice"].mean(), abs=1e-4)
    m = PseudoLabelStore(cfg.run_dir / "pseudo_labels").manifest(1)
    assert set(m["class_source"]) == {json.dumps({c: s for c, s in relabel["class_source"].items()},
                                                 separators=(",", ":"))}
    assert "class sources" in summaries[1].line()
    assert set(summaries[1].audit["by_class"]) == {"1", "2"}


def test_the_manifest_column_reads_back():
    from pipeline.class_source import as_json, from_json

    sources = {1: "generalist", 3: "specialist"}
    assert from_json(as_json(sources)) == sources
    assert from_json("{}") == {} and from_json("") == {}


def test_selection_cases_in_the_unlabeled_pool_are_taken_out_of_it(synthetic_root, caplog):
    """Issue 31: data.selection naming training cases after the labeled ones was refused; they are held out."""
    import logging

    base = small_config_dict(synthetic_root, synthetic_root / "unused")
    whole = resolve_split(config_from_dict(base).data, read_dataset_info(synthetic_root))
    chosen = whole.unlabeled[:2]
    cfg = config_from_dict({**base, "data": {**base["data"], "selection": chosen}})
    info = read_dataset_info(synthetic_root)
    with caplog.at_level(logging.INFO, logger="pipeline.data.splits"):
        split = resolve_split(cfg.data, info)
    assert split.unlabeled == whole.unlabeled[2:] and split.labeled == whole.labeled and split.test == whole.test
    assert any("2 data.selection cases held out of the unlabeled pool" in r.getMessage() for r in caplog.records)
    cases, source = resolve_selection(cfg.data, info, split)
    assert cases == chosen and source == "data.selection"
    labeled = config_from_dict({**base, "data": {**base["data"], "selection": [whole.labeled[0]]}})
    with pytest.raises(ConfigError, match="is also a labeled case; selection cases must be held out"):
        resolve_selection(labeled.data, info, resolve_split(labeled.data, info))
