"""Run folders on object storage: a local S3-compatible server (moto, server mode, 127.0.0.1 only).

A whole 2-round run writes its run folder to ``s3://``; ``semisam inspect``, ``eval``, ``verify`` and
the Dask readers read it back from the same URL. A missing bucket or missing credentials is a clear
error before any work. The endpoint and keys come from the standard AWS environment, as on a cluster.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import ray

from pipeline.config import config_from_dict
from pipeline.errors import StoreError
from pipeline.storage import Location
from pipeline.store import PseudoLabelStore, open_manifest, open_masks
from pipeline.verify import verify_run
from semisam.cli import main as cli_main
from semisam.launch import make_coordinator, run
from tests.conftest import moto_s3, small_config_dict, unlabeled_cases

pytestmark = pytest.mark.ray

pytest.importorskip("moto.server", reason="moto[server] is a dev dependency")
pytest.importorskip("boto3")

BUCKET = "semisam-runs"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 and the AWS environment pointing at it (set before Ray starts, so
    the actors inherit it like nodes configured with credentials)."""
    with moto_s3(BUCKET) as holder:
        SERVER.update(holder=holder)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield f"s3://{BUCKET}"
        ray.shutdown()


SERVER: dict = {}  # the running moto server's holder (tests may restart it)


@pytest.fixture(scope="module")
def s3_run(s3, synthetic_root):
    cfg = config_from_dict(small_config_dict(synthetic_root, f"{s3}/runs", rounds=2))
    return cfg, run(cfg)


def test_a_whole_run_writes_its_folder_to_s3(s3_run):
    cfg, summaries = s3_run
    assert str(cfg.run_dir) == f"s3://{BUCKET}/runs/test"
    assert [s.round for s in summaries] == [0, 1]
    files = set(cfg.run_dir.find())
    assert {"config.yaml", "state.json", "checkpoints/ckpt_0000.pt", "checkpoints/ckpt_0001.pt.sha256",
            "eval/round_001.parquet"} <= files
    assert "driver.lock" not in files  # released
    assert any(f.startswith("pseudo_labels/manifest/part-r001-") for f in files)
    assert any(f.startswith("pseudo_labels/masks.zarr/round_001/") for f in files)
    assert not os.path.exists("s3:")  # issue 8: the URL used to become a local folder ./s3:/bucket/...


def test_dask_readers_take_the_url(s3_run):
    cfg, summaries = s3_run
    store_url = f"{cfg.run_dir}/pseudo_labels"
    masks = open_masks(store_url, 1)
    assert len(masks) == summaries[1].relabel["cases"]
    store = PseudoLabelStore(store_url)
    for case_id, arr in masks.items():
        np.testing.assert_array_equal(arr.compute(), store.read_case(1, case_id)["pseudo_label"])
    df = open_manifest(store_url).compute()
    assert len(df) == summaries[1].relabel["slices"]
    assert sorted(df["case_id"].unique()) == sorted(masks)


def test_cli_reads_the_run_from_the_url(s3_run, capsys, tmp_path):
    cfg, summaries = s3_run
    assert cli_main(["inspect", f"{cfg.run_dir}/pseudo_labels"]) == 0
    assert cli_main(["eval", str(cfg.run_dir), "--png", str(tmp_path / "plots")]) == 0  # issue 17: used Path.glob
    assert (tmp_path / "plots" / "dice_per_round.png").is_file()
    assert cli_main(["verify", str(cfg.run_dir)]) == 0
    out = capsys.readouterr().out
    assert "dice" in out and f"s3://{BUCKET}/runs/test: OK" in out


def test_resume_from_s3_adds_a_round(s3_run):
    cfg, _ = s3_run
    more = config_from_dict({**cfg.model_dump(mode="json"), "rounds": 3})
    summaries = run(more)
    assert [s.round for s in summaries] == [0, 1, 2]
    assert PseudoLabelStore(f"{cfg.run_dir}/pseudo_labels").rounds() == [1, 2]


def test_missing_bucket_and_credentials_fail_before_any_work(s3, synthetic_root, monkeypatch):
    cfg = config_from_dict(small_config_dict(synthetic_root, "s3://no-such-bucket/runs"))
    with pytest.raises(StoreError, match="cannot write to the run folder s3://no-such-bucket/runs/test") as e:
        make_coordinator(cfg)
    assert "bucket" in str(e.value)
    with pytest.raises(StoreError, match="cannot open|not known|fsspec"):
        Location.of("nosuchproto://x/y")
    # verify on a folder in a bucket that is not there says so (it used to say "config.yaml is missing")
    assert verify_run("s3://no-such-bucket/runs/test").problems == [
        "the bucket s3://no-such-bucket does not exist (or these credentials cannot see it)"]


def test_storage_outage_mid_round_is_retried(s3, synthetic_root):
    """The S3 server stops for 3 s in the middle of a relabel round, then comes back on the same port:
    the writes of the SAM actors and of the driver are retried with backoff and the run ends as without
    the outage. It used to end in per-case warnings and a driver dead in a `finally` (9 tracebacks)."""
    from moto.server import ThreadedMotoServer

    cfg = config_from_dict(small_config_dict(synthetic_root, f"{s3}/outage", rounds=2))
    down: list[float] = []

    def restart(host: str, port: int) -> None:
        server = ThreadedMotoServer(ip_address=host, port=port)
        server.start()
        SERVER["holder"]["server"] = server

    def outage(event, c, **kw):
        if event == "task_done" and kw["round"] == 1 and not down:
            old = SERVER["holder"]["server"]
            host, port = old.get_host_and_port()
            old.stop()
            down.append(time.monotonic())
            threading.Timer(3.0, restart, (host, port)).start()

    c = make_coordinator(cfg, outage)
    try:
        summaries = c.run()
    finally:
        c.shutdown()
    assert down and [s.round for s in summaries] == [0, 1]
    assert summaries[1].relabel["failed_cases"] == {}
    assert summaries[1].relabel["cases"] == len(unlabeled_cases(cfg))
    assert verify_run(cfg.run_dir).ok
