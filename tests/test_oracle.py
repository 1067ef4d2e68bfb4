"""The oracle ceiling (pipeline.oracle): prompts from the unlabeled cases' labels, only when unlocked by name.

- No dotted override of conf/acdc.yaml starts an oracle run: ``prompts.source=oracle_labels_LEAK`` is
  refused by ``semisam run`` before anything is created, and no config key exists that could unlock it.
- The SAM actor refuses an oracle config unless it is unlocked too.
- Unlocked, its prompts are the labels' boxes (so the leak is real and measurable), the store marks each
  case, and ``verify``/``eval``/``inspect`` print the oracle banner.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import BaseModel

from pipeline.config import RunConfig, config_from_dict, load_config
from pipeline.data.dataset import load_label
from pipeline.errors import ConfigError
from pipeline.oracle import BANNER, ORACLE, UNLOCK_FLAG, check_unlocked, is_oracle
from pipeline.reports import inspect_table
from pipeline.run_folder import RunFolder
from pipeline.storage import write_table
from pipeline.store import PseudoLabelStore
from pipeline.verify import verify_run
from semisam.cli import main
from tests.conftest import small_config_dict
from workers.sam_worker import SamWorker

ACDC = Path(__file__).resolve().parents[1] / "conf" / "acdc.yaml"


def _dotted_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _dotted_keys(ann, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def test_an_override_of_the_acdc_preset_cannot_start_an_oracle_run(tmp_path, caplog):
    out = tmp_path / "runs"
    args = ["run", str(ACDC), "prompts.source=oracle_labels_LEAK", f"output_dir={out}"]
    with caplog.at_level(logging.ERROR, logger="semisam"):
        assert main(args) == 2
    assert UNLOCK_FLAG in caplog.text and "leak" in caplog.text
    assert not out.exists(), "nothing may be created before the refusal"
    # the value is a valid config (so the refusal is the unlock's, not a typo's) ...
    cfg = load_config(ACDC, ["prompts.source=oracle_labels_LEAK"])
    assert is_oracle(cfg)
    with pytest.raises(ConfigError, match=UNLOCK_FLAG):
        check_unlocked(cfg, leak_labels=False)
    # ... and no config key can unlock it: the only key that names the oracle is prompts.source itself
    keys = _dotted_keys(RunConfig)
    suspicious = [k for k in keys if any(w in k.lower() for w in ("oracle", "leak", "unlock", "i_know"))]
    assert suspicious == []
    assert "prompts.source" in keys
    for attempt in ("prompts.leak_labels=true", "leak_labels=true", "prompts.i_know_this_leaks_labels=true"):
        with pytest.raises(ConfigError, match="unknown key"):
            load_config(ACDC, ["prompts.source=oracle_labels_LEAK", attempt])


def test_the_sam_actor_refuses_an_oracle_config_unless_unlocked(synthetic_root, tiny_sam_checkpoint, tmp_path):
    d = small_config_dict(synthetic_root, tmp_path, tiny_sam_checkpoint, prompts={"source": ORACLE})
    with pytest.raises(ConfigError, match=UNLOCK_FLAG):
        SamWorker(d)
    assert SamWorker(d, 0, leak_labels=True).oracle


def test_an_unlocked_oracle_relabel_prompts_from_labels_and_every_output_says_so(specialist, tiny_sam_checkpoint,
                                                                                  tmp_path, capsys):
    d, model, info, case_id, _ = specialist
    d = small_config_dict(Path(d["data"]["root"]), tmp_path, tiny_sam_checkpoint,
                          prompts={"source": ORACLE, "use_points": False, "box_margin": 0})
    cfg = config_from_dict(d)
    RunFolder(cfg.run_dir).write_config(cfg)
    store = PseudoLabelStore(RunFolder(cfg.run_dir).pseudo_labels, create=True, class_ids=info.foreground_classes)
    store.ensure_round(1, 0, "sam-tiny")
    worker = SamWorker(d, 0, leak_labels=True)
    worker.model, worker.version = model, 0  # the round-0 specialist (it still decides unprompted classes)
    out = worker.relabel([case_id], 1, 0, {}, [None])
    assert not out["failed"], out["failed"]
    label = np.moveaxis(load_label(info, case_id), cfg.data.slice_axis, 0)
    for row in out["rows"]:
        for p in json.loads(row["prompts"]):
            m = label[row["slice"]] == p["class_id"]
            rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
            assert p["box_xyxy"] == [cols[0], rows[0], cols[-1], rows[-1]]  # the label's own box
    assert any(r["num_prompts"] > 0 for r in out["rows"])
    assert store.read_case(1, case_id)["attrs"]["prompt_source"] == ORACLE
    store.append_manifest(out["rows"])

    folder = RunFolder(cfg.run_dir)
    assert verify_run(folder.root).text().splitlines()[0] == BANNER
    assert inspect_table(folder.pseudo_labels).splitlines()[0] == BANNER
    write_table(pd.DataFrame([{"round": 0, "case_id": "c", "class_id": 1, "class_name": "a", "dice": 0.5,
                               "jaccard": 0.3, "hd95_vox": 1.0, "asd_vox": 1.0, "checkpoint_sha256": "x"}]),
                folder.table("eval", 0))
    assert main(["eval", str(folder.root)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == BANNER
