"""What every worker does on start: parse the config, set up logging, pick its device."""

from __future__ import annotations

import ctypes
import logging
import os
import resource

import torch

from pipeline.config import ActorResources, RunConfig
from pipeline.devices import pick_device, set_threads


def start_worker(cfg_dict: dict, role: str) -> tuple[RunConfig, torch.device]:
    """role: "trainer" or "sam" (whose ``torch_threads`` to apply)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    cfg = RunConfig.model_validate(cfg_dict)
    resources: ActorResources = cfg.workers.trainer if role == "trainer" else cfg.workers.sam
    set_threads(resources.torch_threads)
    return cfg, pick_device(cfg.device)


def accelerator_ids() -> list[str]:
    """The GPU ids Ray gave this actor (empty outside Ray or without GPUs)."""
    try:
        import ray

        if ray.is_initialized():
            return [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]
    except Exception:  # noqa: BLE001 - not inside Ray
        pass
    return []


def node_info() -> dict:
    """Where this actor runs: host, Ray node id, pid and the GPU ids Ray gave it."""
    import socket

    node_id = ""
    try:
        import ray

        if ray.is_initialized():
            node_id = ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - not inside Ray
        pass
    return {"host": socket.gethostname(), "node_id": node_id, "pid": os.getpid(), "gpu_ids": accelerator_ids()}


def process_info() -> dict:
    """pid, peak resident memory (MiB), CUDA_VISIBLE_DEVICES and the GPU ids Ray assigned."""
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "pid": os.getpid(),
        "peak_rss_mib": peak_kib / 1024.0,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "gpu_ids": accelerator_ids(),
    }


def return_free_heap() -> bool:
    """Hand memory that Python/torch already freed back to the OS (glibc ``malloc_trim``; no-op elsewhere).

    Without it a SAM actor's resident memory crept up ~85 MiB over 100 cases: freed heap that glibc kept,
    not live data. A long relabel round on a shared node should not look like a leak to the scheduler.
    Returns False where there is no glibc to ask.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True
