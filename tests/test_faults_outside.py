"""Issue 31's faults ("faults outside the list") injected into real runs on a real local Ray (2 CPUs), as in
tests/test_faults.py: each ends with the same result as the run without it, or with one line that names
what is wrong and what to do. (SIGINT before the run is under way: tests/test_driver_signals.py; an
unreadable embedding-cache entry: tests/test_embedding_cache.py.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline.errors import ConfigError
from pipeline.store import PseudoLabelStore
from pipeline.verify import verify_run
from tests.conftest import assert_exactly_once, copy_run, run_to_end

pytestmark = pytest.mark.ray

SEMISAM = str(Path(sys.executable).parent / "semisam")


def _final_dice(cfg) -> float:
    return float(pd.read_parquet(Path(cfg.run_dir) / "eval" / f"round_{cfg.rounds - 1:03d}.parquet")["dice"].mean())


def test_deleted_manifest_part_of_a_completed_round_is_repaired(finished, tmp_path, caplog):
    cfg = copy_run(finished, tmp_path)
    store = PseudoLabelStore(Path(cfg.run_dir) / "pseudo_labels")
    parts = store.parts(1)
    lost = set(pd.concat([pd.read_parquet(p.path) for p in parts[:1]])["case_id"])
    Path(parts[0].path).unlink()
    assert any("have no pseudo-labels" in p for p in verify_run(cfg.run_dir).problems)  # the fault is real
    with caplog.at_level("WARNING", logger="pipeline.resume"):
        c, summaries = run_to_end(cfg)
    assert [s.round for s in summaries] == [0, 1, 2]
    assert any("have no manifest rows" in r.getMessage() for r in caplog.records)
    assert_exactly_once(cfg, [1, 2])  # verify OK: every unlabeled case is back in round 1
    assert lost <= set(store.manifest(1)["case_id"])
    assert _final_dice(cfg) == _final_dice(finished)  # training was not redone: the same result


@pytest.mark.parametrize("name, damage", [
    ("config.yaml", "train: [1, 2\n  rounds: {"),
    ("config.yaml", "- just\n- a list\n"),
    ("state.json", '{"completed": [0, 1'),
    ("state.json", '{"completed": "all"}'),
])
def test_damaged_run_folder_file_at_resume_is_one_line(finished, tmp_path, name, damage):
    cfg = copy_run(finished, tmp_path)
    target = Path(cfg.run_dir) / name
    target.write_text(damage)
    tree = cfg.model_dump(mode="json")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(tree))
    out = subprocess.run([SEMISAM, "run", str(cfg_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and str(target) in errors[0] and "is damaged" in errors[0], out.stderr[-2000:]
    assert "Restore it" in errors[0]


def test_damaged_config_is_named_by_the_library_too(finished, tmp_path):
    from pipeline.run_folder import RunFolder

    cfg = copy_run(finished, tmp_path)
    (Path(cfg.run_dir) / "config.yaml").write_text("a: [")
    with pytest.raises(ConfigError, match="config.yaml is damaged"):
        RunFolder(cfg.run_dir).saved_config()


def test_stray_round_folder_is_one_note_in_verify_and_no_zarr_warning(finished, tmp_path, recwarn):
    cfg = copy_run(finished, tmp_path)
    stray = Path(cfg.run_dir) / "pseudo_labels" / "masks.zarr" / "round_099"
    (stray / "case_x").mkdir(parents=True)
    report = verify_run(cfg.run_dir)
    assert report.ok, report.text()
    assert [n for n in report.notes if "round_099" in n] == [
        f"1 folders under {stray.parent} are not part of the store (never read; safe to delete): round_099"]
    assert not [w for w in recwarn if "zarr" in type(w.message).__name__.lower() or "Zarr" in str(w.message)]
    store = PseudoLabelStore(Path(cfg.run_dir) / "pseudo_labels")
    assert store.rounds() == [1, 2]
    cases = sorted(store.manifest(1)["case_id"].unique())
    assert store.damaged_cases(1, cases) == {}  # read in parallel: every case whole
    chunk = next((Path(cfg.run_dir) / "pseudo_labels" / "masks.zarr" / "round_001" / cases[1] / "pseudo_label" / "c").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert list(store.damaged_cases(1, cases)) == [cases[1]]


def test_a_long_trainer_call_says_it_is_still_running(ray_cluster, monkeypatch, caplog):
    """Issue 31 item 8: evaluation and class-source scoring print a line every STILL_EVERY_S, not nothing."""
    import ray

    from pipeline import trainer_client
    from pipeline.interrupt import StopFlag

    @ray.remote(num_cpus=0.1)
    def slow() -> int:
        import time

        time.sleep(2.0)
        return 7

    monkeypatch.setattr(trainer_client, "STILL_EVERY_S", 0.5)
    seen: list[float] = []
    assert trainer_client.wait_for(slow.remote(), StopFlag(), still=seen.append) == 7
    assert len(seen) >= 2 and seen == sorted(seen) and seen[0] >= 0.5


def test_damaged_eval_table_at_resume_redoes_its_round_to_the_same_result(finished, tmp_path, caplog):
    cfg = copy_run(finished, tmp_path)
    table = Path(cfg.run_dir) / "eval" / "round_002.parquet"
    table.write_bytes(table.read_bytes()[:100])
    with caplog.at_level("WARNING", logger="pipeline.resume"):
        run_to_end(cfg)
    assert any("round_002.parquet" in r.getMessage() or "test table cannot be read" in r.getMessage()
               for r in caplog.records)
    assert _final_dice(cfg) == _final_dice(finished)
    assert verify_run(cfg.run_dir).ok
