"""The adapted generalist in a real run (local Ray, tiny SAM): fitted once before the first relabel round,
recorded in state.json with its SHA-256, named in every manifest row; a resume whose decoder file is gone or
changed fits it again and redoes what the old one made; ``verify`` names a changed decoder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from pipeline.config import config_from_dict
from pipeline.run_folder import RunFolder
from pipeline.storage import file_sha256
from pipeline.store import PseudoLabelStore
from pipeline.verify import verify_run
from tests.conftest import run_to_end, small_config_dict, unlabeled_cases

ADAPT = {"adapt": {"enabled": True, "iterations": 3, "slices_per_step": 1}}


def _cfg(root: Path, out: Path, sam: Path):
    d = small_config_dict(root, out, sam, rounds=2)
    d["generalist"] = {**d["generalist"], **ADAPT}
    d["workers"]["sam"]["num_workers"] = 1
    return config_from_dict(d)


def test_a_run_fits_the_decoder_once_and_every_row_names_it(ray_cluster, synthetic_root, tiny_sam_checkpoint,
                                                             tmp_path):
    cfg = _cfg(synthetic_root, tmp_path / "runs", tiny_sam_checkpoint)
    run_to_end(cfg)
    folder = RunFolder(cfg.run_dir)
    state = folder.read_state()
    sha = state["adapted_decoder"]["sha256"]
    assert file_sha256(folder.adapted_decoder) == sha
    assert state["adapted_decoder"]["stats"]["iterations"] == 3
    m = PseudoLabelStore(folder.pseudo_labels).manifest(1)
    assert set(m["decoder_sha256"]) == {sha}
    assert set(m["case_id"]) == set(unlabeled_cases(cfg))
    assert verify_run(folder.root).ok

    # the decoder file is changed behind the run's back: verify names it, a resume fits it again and redoes
    # round 1 (made with the old one), and every row then names the new decoder
    copy = tmp_path / "copy"
    shutil.copytree(Path(cfg.run_dir), copy / cfg.name)
    (copy / cfg.name / "driver.lock").unlink(missing_ok=True)
    tree = {**cfg.model_dump(mode="json"), "output_dir": str(copy)}
    (copy / cfg.name / "config.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    moved = config_from_dict(tree)
    decoder = RunFolder(moved.run_dir).adapted_decoder
    decoder.write_bytes(decoder.read_bytes() + b"\0")
    report = verify_run(RunFolder(moved.run_dir).root)
    assert any("adapted decoder" in p for p in report.problems), report.text()
    run_to_end(moved)
    state2 = json.loads((Path(moved.run_dir) / "state.json").read_text())
    new_sha = state2["adapted_decoder"]["sha256"]
    assert file_sha256(RunFolder(moved.run_dir).adapted_decoder) == new_sha
    m2 = PseudoLabelStore(RunFolder(moved.run_dir).pseudo_labels).manifest(1)
    assert set(m2["decoder_sha256"]) == {new_sha}
    assert verify_run(RunFolder(moved.run_dir).root).ok
