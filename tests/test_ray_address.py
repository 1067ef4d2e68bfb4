"""`semisam run` as a driver of an existing cluster: the way `ray job submit` runs it (RAY_ADDRESS set).

A head node is started with `ray start --head --block` in a subprocess (its own port, 2 CPUs) and the run
is a separate `semisam run` process with RAY_ADDRESS pointing at it, as the job supervisor does. The
test checks that the run connected to that cluster, did not start one of its own, and finished.

Ray 2.60 turns on token authentication for `ray start` clusters; this head opts out
(RAY_AUTH_MODE=disabled) so the driver needs no token. tests/test_ray_job_submit.py runs a head with token
auth on, as docs/cluster.md does (clients need RAY_AUTH_MODE=token and the token).

Also here: a cluster semisam starts itself binds to 127.0.0.1, `workers.address=auto` is resolved only from
this user's `ray start`, and custom resources in config (`workers.sam.resources`) place the SAM actors.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray
import yaml

from pipeline.config import SamPoolConfig, WorkersConfig
from pipeline.errors import ConfigError
from pipeline.ray_runtime import _own_current_cluster, init_ray, remote_actor
from tests.conftest import small_config_dict
from tests.test_ray_job_submit import stop_head

pytestmark = pytest.mark.ray

RAY = Path(sys.executable).with_name("ray")


ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head():
    if not RAY.is_file():
        pytest.skip(f"no ray CLI next to {sys.executable}")
    port = _free_port()
    proc = subprocess.Popen([str(RAY), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                             "--block", "--disable-usage-stats"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, env=ENV)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ok = subprocess.run([str(RAY), "status", f"--address={address}"], capture_output=True, env=ENV)
        if ok.returncode == 0:
            break
        if proc.poll() is not None:
            pytest.fail(f"ray start exited: {proc.stdout.read().decode()[-2000:]}")
        time.sleep(1)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        pytest.fail("ray head did not come up in 60 s")
    yield address
    stop_head(proc)
    # `ray start` records itself as this machine's current cluster; do not leave a dead one behind
    current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    if current.is_file() and current.read_text().strip().endswith(f":{port}"):
        current.unlink()


def test_run_under_ray_address_uses_the_existing_cluster(head, synthetic_root, tmp_path):
    cfg = small_config_dict(synthetic_root, tmp_path / "runs", rounds=2)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    semisam = shutil.which("semisam", path=str(Path(sys.executable).parent))
    env = {**ENV, "RAY_ADDRESS": head}
    out = subprocess.run([semisam, "run", str(cfg_path)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"connecting to the Ray cluster at {head}" in out.stderr
    assert "starting a local Ray cluster" not in out.stderr
    state = json.loads((tmp_path / "runs" / "test" / "state.json").read_text())
    assert state["completed"] == [0, 1]


def test_local_cluster_binds_to_loopback():
    assert init_ray(WorkersConfig(local_num_cpus=1))
    try:
        @ray.remote(num_cpus=0)
        def node_ip() -> str:
            return ray.util.get_node_ip_address()

        assert {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} == {"127.0.0.1"}
        assert ray.get(node_ip.remote(), timeout=60) == "127.0.0.1"
        assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    finally:
        ray.shutdown()


def test_custom_resources_place_the_sam_actor():
    class Probe:
        def assigned(self) -> dict[str, float]:
            return ray.get_runtime_context().get_assigned_resources()

    ray.init(address="local", num_cpus=2, resources={"sam_gpu": 2}, include_dashboard=False)
    try:
        sam = remote_actor(Probe, SamPoolConfig(num_cpus=0.5, resources={"sam_gpu": 1})).remote()
        assert ray.get(sam.assigned.remote(), timeout=60) == {"CPU": 0.5, "sam_gpu": 1.0}
        assert ray.available_resources().get("sam_gpu") == 1.0
        # a resource no node declares: the actor is never placed
        elsewhere = remote_actor(Probe, SamPoolConfig(num_cpus=0.5, resources={"a100": 1})).remote()
        with pytest.raises(ray.exceptions.GetTimeoutError):
            ray.get(elsewhere.assigned.remote(), timeout=3)
    finally:
        ray.shutdown()


@pytest.fixture
def current_cluster_file(tmp_path, monkeypatch):
    path = tmp_path / "ray_current_cluster"
    monkeypatch.setattr("ray._common.utils.get_ray_address_file", lambda temp_dir: str(path))
    return path


def test_auto_is_the_cluster_this_user_started(current_cluster_file):
    with pytest.raises(ConfigError, match="no cluster started with `ray start`"):
        _own_current_cluster()
    current_cluster_file.write_text("10.1.2.3:6380\n")
    assert _own_current_cluster() == "10.1.2.3:6380"
    if os.getuid() != 0:
        return  # only root can hand the file to another user
    os.chown(current_cluster_file, os.getuid() + 4242, -1)
    with pytest.raises(ConfigError, match="written by another user"):
        _own_current_cluster()
