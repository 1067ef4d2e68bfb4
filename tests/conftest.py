"""Shared fixtures: a small synthetic MSD dataset, a tiny SAM checkpoint, run configs, the shared data."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import fsspec
import pytest
import ray
import yaml

from pipeline.config import RunConfig, config_from_dict
from pipeline.data.dataset import read_dataset_info
from pipeline.data.splits import resolve_split
from pipeline.data.synthetic import write_synthetic_msd
from pipeline.generalist.sam import save_tiny_sam
from pipeline.store import PseudoLabelStore, read_part
from pipeline.verify import verify_run
from semisam.launch import make_coordinator

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with a message when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared real data is not on this machine)")
    return path


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """8 synthetic cases (24x40x32, spacing 1.0/0.8/1.2 mm, labels 0/1/2) with splits.json (2 test cases).
    Read-only for tests: copy it before changing anything."""
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_msd(root, num_cases=8, seed=1)
    return root


@pytest.fixture(scope="session")
def data12(tmp_path_factory) -> Path:
    """12 synthetic cases: 3 test, 2 labeled, 7 unlabeled (enough work to kill actors in the middle).
    Read-only for tests."""
    root = tmp_path_factory.mktemp("data12")
    write_synthetic_msd(root, num_cases=12, seed=3)
    return root


@pytest.fixture(scope="module")
def ray_cluster():
    """One real local Ray (2 CPUs) per test module that asks for it (Ray start-up costs seconds)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@contextlib.contextmanager
def moto_s3(*buckets: str):
    """A moto S3 server on 127.0.0.1 (server mode, a real HTTP endpoint) with ``buckets`` created, and the
    AWS environment pointing at it for the duration (actors started meanwhile inherit it). Skips the test
    when moto/boto3 (dev dependencies) are absent. Yields ``{"server": ThreadedMotoServer}``: a test may
    stop it and put a new one on the same port there (moto keeps its buckets in this process), and
    whichever server is there at the end is stopped."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is a dev dependency")
    boto3 = pytest.importorskip("boto3")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    # fsspec caches filesystem instances by their arguments, and an S3 instance keeps the endpoint it was
    # created with: without this a second server (another port) would be reached through the first's
    fsspec.get_filesystem_class("s3").clear_instance_cache()
    holder = {"server": server}
    try:
        for bucket in buckets:
            boto3.client("s3").create_bucket(Bucket=bucket)
        yield holder
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        fsspec.get_filesystem_class("s3").clear_instance_cache()
        holder["server"].stop()


@pytest.fixture(scope="session")
def tiny_sam_checkpoint(tmp_path_factory) -> Path:
    return save_tiny_sam(tmp_path_factory.mktemp("sam") / "tiny_sam.pt", seed=0)


@pytest.fixture(scope="module")
def specialist(synthetic_root, tmp_path_factory):
    """A specialist trained 40 iterations on the synthetic cases (round 0), with one unlabeled image:
    (config dict, model in eval mode, dataset info, case id, image). At this size it predicts class 1 and
    never the small class 2 (tests/test_class_source.py relies on that, and checks it)."""
    from pipeline.models.unet import build_model
    from workers.trainer import TrainerWorker

    d = small_config_dict(synthetic_root, tmp_path_factory.mktemp("specialist"), train={"iterations": 40})
    trainer = TrainerWorker(d)
    trainer.train_round(0, None)
    model = build_model(trainer.model_args())
    model.load_state_dict(trainer.weights())
    model.eval()
    v = trainer.unlabeled[0]
    return d, model, read_dataset_info(synthetic_root), v.case_id, v.image


def small_config_dict(data_root: Path, run_root: Path, sam_checkpoint: Path | None = None, **sections) -> dict:
    """A run config small enough for tests on 2 CPUs: 2D U-Net (base 4), 6 iterations a round,
    2 labeled cases, tiny SAM (or the classical generalist when no checkpoint is given), 2 SAM actors."""
    cfg = {
        "name": "test",
        "output_dir": str(run_root),
        "rounds": 3,
        "seed": 0,
        "device": "cpu",
        "data": {"root": str(data_root), "split_file": str(Path(data_root) / "splits.json"), "num_labeled": 2},
        "model": {"kind": "unet2d", "base_channels": 4, "depth": 2, "patch_size": [32, 32]},
        "train": {"method": "mean_teacher", "iterations": 6, "labeled_batch_size": 2, "unlabeled_batch_size": 2,
                  "log_every": 1000},
        "generalist": ({"backend": "sam", "sam": {"variant": "tiny", "checkpoint": str(sam_checkpoint)}}
                       if sam_checkpoint else {"backend": "classical"}),
        "workers": {"trainer": {"num_cpus": 0.5, "torch_threads": 1},
                    "sam": {"num_workers": 2, "num_cpus": 0.5, "torch_threads": 1}},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def small_config(data_root: Path, run_root: Path, sam_checkpoint: Path | None = None, **sections) -> RunConfig:
    return config_from_dict(small_config_dict(data_root, run_root, sam_checkpoint, **sections))


def run_to_end(cfg, on_event=None):
    """Run a Coordinator to the end (always shut down); returns (coordinator, summaries) for inspection."""
    c = make_coordinator(cfg, on_event)
    try:
        return c, c.run()
    finally:
        c.shutdown()


def unlabeled_cases(cfg) -> list[str]:
    return sorted(resolve_split(cfg.data, read_dataset_info(cfg.data.root)).unlabeled)


def assert_exactly_once(cfg, rounds: list[int]) -> None:
    """Every unlabeled case once per round in the manifest (no duplicated slice) and in the arrays."""
    store = PseudoLabelStore(cfg.run_dir / "pseudo_labels")
    want = unlabeled_cases(cfg)
    for r in rounds:
        m = store.manifest(r)
        assert sorted(m["case_id"].unique()) == want, r
        assert not m.duplicated(["case_id", "slice"]).any(), r
        # one part per (round, case): no case counted twice across parts
        seen: dict[str, int] = {}
        for p in store.parts(r):
            for c in read_part(p)["case_id"].unique():
                seen[c] = seen.get(c, 0) + 1
        assert all(n == 1 for n in seen.values()), seen
        status = store.case_status(r)
        assert sorted(c for c, ok in status.items() if ok) == want
    report = verify_run(cfg.run_dir)
    assert report.ok, report.text()


# -- fault tests (tests/test_faults*.py) ----------------------------------------------------------------
def fault_config(data: Path, out: Path, **sections) -> RunConfig:
    """``small_config`` for fault tests: 2 rounds, 2 SAM actors, a trainer, generous placement timeout."""
    base = {"rounds": 2, "workers": {"trainer": {"num_cpus": 0.5, "torch_threads": 1},
                                     "sam": {"num_workers": 2, "num_cpus": 0.5, "torch_threads": 1},
                                     "faults": {"placement_timeout_s": 120}}}
    for k, v in sections.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return config_from_dict(small_config_dict(data, out, **base))


@pytest.fixture(scope="module")
def finished(ray_cluster, data12, tmp_path_factory):
    """A finished 3-round run (one per test module); tests copy its folder before damaging it."""
    cfg = fault_config(data12, tmp_path_factory.mktemp("finished"), rounds=3)
    run_to_end(cfg)
    return cfg


def copy_run(cfg, tmp_path, rounds: int | None = None, completed: list[int] | None = None):
    """A copy of a finished run folder (optionally with state.json saying fewer rounds are done, as after a
    driver killed between publishing a round's checkpoint and completing the round)."""
    dst = tmp_path / "copy"
    shutil.copytree(Path(cfg.run_dir), dst / cfg.name)
    (dst / cfg.name / "driver.lock").unlink(missing_ok=True)
    tree = {**cfg.model_dump(mode="json"), "output_dir": str(dst)}
    if rounds is not None:
        tree["rounds"] = rounds
    new = config_from_dict(tree)
    (Path(new.run_dir) / "config.yaml").write_text(yaml.safe_dump({**tree, "rounds": cfg.rounds}, sort_keys=False))
    if completed is not None:
        state_path = Path(new.run_dir) / "state.json"
        state = json.loads(state_path.read_text())
        state["completed"] = completed
        state["summaries"] = [s for s in state["summaries"] if s["round"] in completed]
        state_path.write_text(json.dumps(state))
    return new
