"""Connecting to Ray and placing actors with the resources in config.

``semisam run`` on a laptop starts a local cluster; under ``ray job submit`` (which sets RAY_ADDRESS),
or with ``workers.address`` set, it connects to the existing cluster instead. ``workers.address: auto``
connects to the cluster that ``ray start`` last started on this machine. Without any of these a new
local cluster is started even when a ``ray start`` cluster runs here (plain ``ray.init()`` would attach
to it and then refuse our ``num_cpus``).
"""

from __future__ import annotations

import logging
import os

import ray

from pipeline.config import ActorResources, WorkersConfig

log = logging.getLogger(__name__)


def init_ray(cfg: WorkersConfig) -> bool:
    """Connect to or start Ray. Returns True if this call started it (so the caller shuts it down)."""
    if ray.is_initialized():
        return False
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        log.info("starting a local Ray cluster (dashboard %s)",
                 f"on {cfg.dashboard_host}" if cfg.include_dashboard else "off")
        ray.init(address="local", num_cpus=cfg.local_num_cpus, num_gpus=cfg.local_num_gpus,
                 include_dashboard=cfg.include_dashboard, dashboard_host=cfg.dashboard_host, log_to_driver=True)
    return True


def remote_actor(cls: type, resources: ActorResources):
    """``ray.remote(cls)`` with the configured CPUs/GPUs; call ``.remote(...)`` on the result."""
    opts = {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus, "max_concurrency": 1}
    return ray.remote(cls).options(**opts)
