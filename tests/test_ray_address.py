"""`semisam run` as a driver of an existing cluster: the way `ray job submit` runs it (RAY_ADDRESS set).

A head node is started with `ray start --head --block` in a subprocess (its own port, 2 CPUs) and the run
is a separate `semisam run` process with RAY_ADDRESS pointing at it, as the job supervisor does. The
test checks that the run connected to that cluster, did not start one of its own, and finished.

Ray 2.60 turns on token authentication for `ray start` clusters; the test head opts out
(RAY_AUTH_MODE=disabled) so the driver needs no token. On a real cluster, give the driver the token
(`ray get-auth-token`, RAY_AUTH_TOKEN) as Ray's docs describe; nothing in semisam changes.
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
import yaml

from tests.conftest import small_config_dict

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
    os.killpg(proc.pid, signal.SIGTERM)  # --block: the head stops the processes it started
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
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
