"""With GPUs declared to Ray (on a CPU machine), the driver pins the trainer and each SAM actor to its
own GPU: Ray hands each actor a distinct GPU id and sets CUDA_VISIBLE_DEVICES to it."""

from __future__ import annotations

import pytest
import ray

from pipeline.config import config_from_dict
from semisam.launch import make_coordinator
from tests.conftest import small_config_dict

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_with_gpus():
    ray.init(address="local", num_cpus=2, num_gpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_trainer_and_each_sam_actor_hold_distinct_gpus(ray_with_gpus, synthetic_root, tiny_sam_checkpoint, tmp_path):
    d = small_config_dict(synthetic_root, tmp_path, tiny_sam_checkpoint, rounds=1)
    d["workers"]["trainer"]["num_gpus"] = 1
    d["workers"]["sam"]["num_gpus"] = 1
    coordinator = make_coordinator(config_from_dict(d))
    try:
        trainer = ray.get(coordinator.trainer.process_info.remote())
        pool = coordinator.worker_stats()
    finally:
        coordinator.shutdown()
    ids = [trainer["gpu_ids"]] + [s["gpu_ids"] for s in pool]
    assert all(len(i) == 1 for i in ids), ids
    flat = [i[0] for i in ids]
    assert len(set(flat)) == 3, f"actors share a GPU: {flat}"
    # Ray exposes exactly the actor's own GPU to it, so inside the actor it is cuda:0
    assert [trainer["cuda_visible_devices"]] + [s["cuda_visible_devices"] for s in pool] == flat
    assert len({trainer["pid"], *(s["pid"] for s in pool)}) == 3


def test_fractional_cpu_actors_fit_a_two_cpu_machine(ray_with_gpus, synthetic_root, tiny_sam_checkpoint, tmp_path):
    """No GPUs asked: the same code places a trainer and 2 SAM actors on 2 CPUs (0.5 CPU each)."""
    coordinator = make_coordinator(config_from_dict(small_config_dict(synthetic_root, tmp_path, tiny_sam_checkpoint, rounds=1)))
    try:
        pool = coordinator.worker_stats()
        trainer = ray.get(coordinator.trainer.process_info.remote())
    finally:
        coordinator.shutdown()
    assert trainer["gpu_ids"] == [] and all(s["gpu_ids"] == [] for s in pool)
    assert len(pool) == 2
