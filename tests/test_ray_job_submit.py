"""docs/cluster.md's `ray job submit` example, run as written against a `ray start` head with token auth on.

Ray 2.60 clusters started with `ray start` use token authentication. The head here is started the way the
docs say (RAY_AUTH_MODE=token, dashboard on 127.0.0.1), with its own free ports and its own temp
folder so it never meets another cluster on this machine. Its token is a file of this test's
(RAY_AUTH_TOKEN_PATH), not ~/.ray/auth_token, which may be someone else's.

The block is taken from docs/cluster.md and run with bash in a copy of the repository's files (its
`data/` and `runs/` are the copy's, not the checkout's). Only the dashboard port is substituted, and
overrides appended to the command make it 2 short rounds. The block writes the synthetic data and submits
`semisam run conf/demo.yaml` with absolute paths; the test checks that the job succeeded, that the run
folder lists both rounds as completed, and that the package
Ray uploaded held the code but not `data/`, `runs/` or `.venv` (Ray skips what .gitignore lists).
It also pins the documented refusal: a client with the token but without RAY_AUTH_MODE=token is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
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

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = BIN / "ray"
CLUSTER_DOC = REPO / "docs" / "cluster.md"  # where the cluster commands are documented
README_PORT = "8265"
SHORTER = " rounds=2 train.iterations=30 train.log_every=10"  # appended: the demo's 3 x 150 iterations, cut


def readme_job_block() -> str:
    """The fenced bash block of docs/cluster.md that runs `ray job submit`."""
    blocks = re.findall(r"```bash\n(.*?)```", CLUSTER_DOC.read_text(), flags=re.S)
    found = [b for b in blocks if "ray job submit" in b and "semisam demo-data" in b]
    assert len(found) == 1, "docs/cluster.md must have exactly one bash block with `semisam demo-data` + `ray job submit`"
    return found[0]


def _free_ports(n: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _client_env(base: dict[str, str]) -> dict[str, str]:
    """What a user's shell has: the venv on PATH, no RAY_ADDRESS, no auth mode unless the command sets it."""
    env = {k: v for k, v in base.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def token_head():
    """A `ray start --head` with token auth, dashboard on 127.0.0.1; yields (dashboard port, env, temp dir)."""
    if not RAY.is_file():
        pytest.skip(f"no ray CLI next to {sys.executable}")
    work = Path(tempfile.mkdtemp(prefix="rjs", dir="/tmp"))  # short: Ray's socket paths live under it
    token_file = work / "auth_token"
    token_file.write_text(os.urandom(32).hex())
    token_file.chmod(0o600)
    env = _client_env({**os.environ, "RAY_AUTH_TOKEN_PATH": str(token_file)})
    gcs, dash, agent, client = _free_ports(4)
    cmd = [str(RAY), "start", "--head", f"--port={gcs}", "--num-cpus=2", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
           f"--ray-client-server-port={client}", f"--temp-dir={work / 'ray'}", "--disable-usage-stats", "--block"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**env, "RAY_AUTH_MODE": "token"})
    try:
        deadline = time.monotonic() + 90
        while True:  # the job API answers once the dashboard is up
            ok = subprocess.run([str(RAY), "job", "list", f"--address=http://127.0.0.1:{dash}"],
                                capture_output=True, env={**env, "RAY_AUTH_MODE": "token"}, timeout=60)
            if ok.returncode == 0:
                break
            if proc.poll() is not None:
                pytest.fail(f"ray start exited: {proc.stdout.read().decode()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"ray head's job API did not answer in 90 s: {ok.stderr.decode()[-2000:]}")
            time.sleep(2)
        yield dash, env, work
    finally:
        stop_head(proc)
        # `ray start` records itself as the current cluster (in its own temp dir here; check the default too)
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.is_file() and current.read_text().strip().endswith(f":{gcs}"):
            current.unlink()
        shutil.rmtree(work, ignore_errors=True)


def stop_head(proc: subprocess.Popen) -> None:
    """Stop a `ray start --block` head and everything it started.

    SIGTERM to `ray start` alone: it stops its processes and exits (about 10 s). SIGTERM to the whole group
    instead leaves `ray start` waiting and some processes running, so the group only gets SIGKILL, last.
    """
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def _copy_repository(dest: Path) -> None:
    """The checkout's files as git sees them (tracked and untracked, not ignored): no .venv, data or runs."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def test_client_without_auth_mode_is_refused(token_head):
    dash, env, _ = token_head
    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text()
    # the token itself, as RAY_AUTH_TOKEN, but no RAY_AUTH_MODE=token: Ray 2.60 sends no token and is refused
    out = subprocess.run([str(RAY), "job", "list", f"--address=http://127.0.0.1:{dash}"], capture_output=True,
                         text=True, env={**env, "RAY_AUTH_TOKEN": token}, timeout=120)
    assert out.returncode != 0
    assert re.search(r"auth|401|token", out.stdout + out.stderr, flags=re.I), (out.stdout + out.stderr)[-2000:]


def test_readme_job_submit_example_runs_as_written(token_head, tmp_path):
    dash, env, work = token_head
    repo = tmp_path / "semisam"
    _copy_repository(repo)
    script = readme_job_block().replace(f"127.0.0.1:{README_PORT}", f"127.0.0.1:{dash}").rstrip() + SHORTER
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=repo, env=env, capture_output=True,
                         text=True, timeout=240)
    log = out.stdout[-4000:] + out.stderr[-4000:]
    assert out.returncode == 0, log
    assert "succeeded" in log

    name = yaml.safe_load((repo / "conf" / "demo.yaml").read_text())["name"]
    state = json.loads((repo / "runs" / name / "state.json").read_text())
    assert state["completed"] == [0, 1]

    # what Ray uploaded and unpacked for the job: the code and configs, none of the ignored folders
    unpacked = {p.resolve() for p in (work / "ray").glob("session_*/runtime_resources/working_dir_files/*")
                if p.is_dir()}
    assert len(unpacked) == 1, unpacked
    top = {p.name for p in unpacked.pop().iterdir()}
    assert {"pipeline", "workers", "conf", "pyproject.toml"} <= top
    assert not top & {"data", "runs", ".venv", ".git"}, top


def test_readme_s3_job_passes_credentials_as_written(token_head, tmp_path):
    """docs/cluster.md's block that passes AWS credentials in the job's runtime environment, run as written
    against a local S3 server; the head was started without any AWS variable, so only the block's
    ``--runtime-env-json`` can bring them to the job's driver and actors."""
    from tests.conftest import moto_s3

    dash, env, _ = token_head
    repo = tmp_path / "semisam"
    _copy_repository(repo)
    blocks = re.findall(r"```bash\n(.*?)```", CLUSTER_DOC.read_text(), flags=re.S)
    found = [b for b in blocks if "ray job submit" in b and "--runtime-env-json" in b]
    assert len(found) == 1, "docs/cluster.md must have exactly one `ray job submit` block with --runtime-env-json"
    script = found[0].replace(f"127.0.0.1:{README_PORT}", f"127.0.0.1:{dash}").replace(
        "s3://my-bucket/runs", "s3://semisam-job/runs").rstrip() + SHORTER
    subprocess.run([str(BIN / "semisam"), "demo-data", "data/demo"], cwd=repo, env=env, check=True,
                   capture_output=True, timeout=120)
    with moto_s3("semisam-job"):
        aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
        out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=repo, env={**env, **aws},
                             capture_output=True, text=True, timeout=240)
        log = out.stdout[-4000:] + out.stderr[-4000:]
        assert out.returncode == 0, log
        assert "succeeded" in log
        import s3fs

        name = yaml.safe_load((repo / "conf" / "demo.yaml").read_text())["name"]
        state = json.loads(s3fs.S3FileSystem().cat_file(f"semisam-job/runs/{name}/state.json"))
        assert state["completed"] == [0, 1]
