"""The quality benchmark's bookkeeping: cell configs, aggregation over seeds, the tables and plots."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from benchmarks import quality


def _cell(row: str, k: int, seed: int, dice1: float, audit: list[tuple[int, float, float]] = ()) -> dict:
    final = {}
    for m, base in (("dice", dice1), ("jaccard", dice1 / 2), ("hd95_mm", 10.0), ("asd_mm", 2.0)):
        final[m] = base
        final[f"{m}_class1"] = base
        final[f"{m}_class2"] = base
    return {"cell": quality.cell_name(k, row, seed), "row": row, "k": k, "seed": seed, "final": final,
            "audit": [{"round": r, "pseudo_dice": p, "specialist_dice": s} for r, p, s in audit]}


def test_cell_config_applies_the_row_and_the_budget(tmp_path):
    data = quality.DEFAULT_DATA
    cfg = quality.cell_config(2, "mean_teacher+semisam_official", 1, data, tmp_path, [])
    assert (cfg.data.num_labeled, cfg.seed, cfg.train.method) == (2, 1, "mean_teacher")
    assert cfg.train.pseudo_label.enabled and cfg.eval.audit_pseudo_labels
    pl = cfg.train.pseudo_label
    assert (pl.loss, pl.schedule, pl.weight) == ("mse", "down", 0.05)  # the official form
    assert (cfg.rounds, cfg.train.iterations) == (3, 200)
    assert cfg.run_dir == tmp_path / "k002-mean_teacher-semisam_official-s1"
    assert cfg.generalist.cache_dir == str(tmp_path / "embedding_cache")  # one cache for all cells
    ens = quality.cell_config(4, "mean_teacher+semisam+ensemble", 0, data, tmp_path, [])
    assert ens.generalist.cache_dir == cfg.generalist.cache_dir
    assert ens.prompts.ensemble > 1 and ens.train.pseudo_label.uncertainty_weighting
    assert ens.train.pseudo_label.loss == "ce_dice"
    plain = quality.cell_config(2, "mean_teacher", 1, data, tmp_path, [])
    assert not plain.train.pseudo_label.enabled and plain.train.method == "mean_teacher"
    # every row of a k shares everything but the method keys
    a, b = cfg.model_dump(), plain.model_dump()
    for key in ("model", "data", "rounds", "generalist"):
        assert a[key] == b[key], key
    for key in ("iterations", "labeled_batch_size", "unlabeled_batch_size", "lr", "augment"):
        assert a["train"][key] == b["train"][key], key
    extra = quality.cell_overrides(1, "mean_teacher+semisam", 0, data, tmp_path, ["train.pseudo_label.consensus_only=true"])
    assert extra[-1] == "train.pseudo_label.consensus_only=true"  # what a cell JSON records as its overrides
    assert quality.cell_config(1, "mean_teacher+semisam", 0, data, tmp_path, extra[-1:]).train.pseudo_label.consensus_only
    ceiling = quality.cell_config(quality.FULL_K, "full_supervised_long", 0, data, tmp_path, [])
    assert (ceiling.data.num_labeled, ceiling.train.iterations) == (200, 1000)
    assert not ceiling.eval.audit_pseudo_labels


def test_final_metrics_means_per_class_skipping_nan():
    df = pd.DataFrame({"case_id": ["a", "a", "b", "b"], "class_id": [1, 2, 1, 2], "dice": [0.8, 0.6, 0.4, 0.2],
                       "jaccard": [0.6, 0.4, 0.2, 0.1], "hd95_mm": [1.0, np.nan, 3.0, 5.0],
                       "asd_mm": [1.0, 1.0, 1.0, 1.0]})
    m = quality.final_metrics(df)
    assert m["dice"] == pytest.approx(0.5) and m["dice_class1"] == pytest.approx(0.6)
    assert m["hd95_mm"] == pytest.approx(3.0) and m["hd95_mm_class2"] == pytest.approx(5.0)


def test_aggregate_mean_std_over_seeds_and_audit_per_round(tmp_path):
    cells = [_cell("supervised", 1, 0, 0.4), _cell("supervised", 1, 1, 0.6),
             _cell("mean_teacher+semisam", 1, 0, 0.5, [(1, 0.3, 0.5), (2, 0.4, 0.6)]),
             _cell("mean_teacher+semisam", 1, 1, 0.7, [(1, 0.5, 0.5), (2, 0.6, 0.6)])]
    for c in cells:
        (tmp_path / f"{c['cell']}.json").write_text(json.dumps(c))
    table = quality.aggregate(quality.load_cells(tmp_path))
    assert [(e["row"], e["k"]) for e in table] == [("supervised", 1), ("mean_teacher+semisam", 1)]
    assert table[0]["dice"]["mean"] == pytest.approx(0.5) and table[0]["dice"]["std"] == pytest.approx(0.1)
    audit = table[1]["audit"]
    assert [a["round"] for a in audit] == [1, 2]
    assert audit[0]["pseudo_dice"]["mean"] == pytest.approx(0.4)
    text = quality.markdown(table)
    assert "**0.500 ± 0.100**" in text and "| 1 | mean_teacher+semisam | 1 | 0.400 ± 0.100 | - | 0.500 ± 0.000 | -0.100 |" in text
    paths = quality.plot(table, tmp_path / "fig")
    assert [p.name for p in paths] == ["quality_dice_vs_k.png", "quality_pseudo_label_dice.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_update_docs_replaces_only_the_marked_table(tmp_path):
    docs = tmp_path / "b.md"
    docs.write_text(f"intro\n{quality.TABLE_START}\nold table\n{quality.TABLE_END}\nafter\n")
    assert quality.update_docs(docs, "new table\n")
    assert docs.read_text() == f"intro\n{quality.TABLE_START}\nnew table\n{quality.TABLE_END}\nafter\n"
    plain = tmp_path / "c.md"
    plain.write_text("no markers\n")
    assert not quality.update_docs(plain, "x") and plain.read_text() == "no markers\n"


def test_paired_differences_call_a_gain_only_outside_the_noise():
    cells = []
    for seed, (base, small, big) in enumerate([(0.60, 0.63, 0.70), (0.70, 0.68, 0.81), (0.65, 0.69, 0.74),
                                               (0.62, 0.61, 0.73), (0.66, 0.70, 0.77)]):
        cells += [_cell("supervised", 4, seed, base), _cell("mean_teacher", 4, seed, small),
                  _cell("uamt", 4, seed, big)]
    pairs = {(c["row"], c["baseline"]): c for c in quality.paired(cells)}
    mt = pairs[("mean_teacher", "supervised")]
    assert mt["differences"] == [0.03, -0.02, 0.04, -0.01, 0.04]
    assert mt["mean"] == pytest.approx(0.016) and mt["verdict"] == "within noise"
    assert mt["ci95"][0] < 0 < mt["ci95"][1] and 0.05 < mt["p_paired_t"] < 1
    ua = pairs[("uamt", "supervised")]
    assert ua["mean"] == pytest.approx(0.104) and ua["verdict"] == "gain" and ua["p_paired_t"] < 0.001
    for c in cells:  # distances: UA-MT 2-3 mm lower than supervised on every seed is a gain, not a loss
        if c["row"] == "uamt":
            c["final"]["hd95_mm"] = 7.0 + 0.5 * (c["seed"] % 2)
    hd = {(c["row"], c["baseline"]): c for c in quality.paired(cells, "hd95_mm")}
    assert hd[("uamt", "supervised")]["mean"] == pytest.approx(-2.8) and hd[("uamt", "supervised")]["verdict"] == "gain"
    assert hd[("mean_teacher", "supervised")]["verdict"] == "identical"  # no difference at all
    text = quality.paired_markdown(list(pairs.values()))
    assert "| 4 | uamt | supervised | 5 | +0.100 +0.110 +0.090 +0.110 +0.110 | +0.104" in text and "**gain**" in text


def test_paired_audit_compares_round_one_pseudo_labels_seed_by_seed():
    cells = []
    for seed, (single, consensus) in enumerate([(0.53, 0.54), (0.55, 0.56), (0.52, 0.528), (0.50, 0.514)]):
        # round 2 differs the other way: only round 1 (same checkpoint in both rows) is compared
        cells += [_cell("mean_teacher+semisam", 4, seed, 0.7, [(1, single, 0.6), (2, 0.6, 0.7)]),
                  _cell("mean_teacher+semisam+ensemble", 4, seed, 0.7, [(1, consensus, 0.6), (2, 0.5, 0.7)])]
    cells.append(_cell("mean_teacher+semisam+ensemble", 4, 9, 0.7, [(1, 0.9, 0.6)]))  # no partner: left out
    [pair] = quality.paired_audit(cells)
    assert (pair["row"], pair["baseline"], pair["round"], pair["seeds"]) == (
        "mean_teacher+semisam+ensemble", "mean_teacher+semisam", 1, [0, 1, 2, 3])
    assert pair["differences"] == [0.01, 0.01, 0.008, 0.014]
    assert pair["mean"] == pytest.approx(0.0105) and pair["verdict"] == "gain" and pair["p_paired_t"] < 0.01
    [late] = quality.paired_audit(cells, relabel_round=2)
    assert late["mean"] == pytest.approx(-0.1) and late["verdict"] == "loss"


def test_lite_coverage_names_the_missing_cells():
    from benchmarks import generalist_quality as gq

    cells = [{"k": "acdc3", "row": "mean_teacher", "seed": s} for s in range(5)]
    cells += [{"k": "acdc3", "row": "best", "seed": s} for s in (0, 1, 2)]
    text = gq.coverage_markdown(cells)
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in text.splitlines()
            if line.startswith("| acdc") or line.startswith("| hippo")}
    cols = list(gq.ROWS)
    assert rows["acdc3"][cols.index("mean_teacher")] == "5/5"
    assert rows["acdc3"][cols.index("best")] == "3/5 (no 3,4)"
    assert rows["acdc3"][cols.index("uamt")] == "0/5"
    assert rows["acdc7"][cols.index("mean_teacher")] == "0/5"
    assert set(rows) == set(gq.SETS)
