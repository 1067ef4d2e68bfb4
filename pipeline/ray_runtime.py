"""Connecting to Ray and placing actors with the resources in config.

``semisam run`` on a laptop starts a local cluster; under ``ray job submit`` (which sets RAY_ADDRESS),
or with ``workers.address`` set, it connects to the existing cluster instead. ``workers.address: auto``
connects to the cluster that ``ray start`` last started on this machine, and only if this user started
it. Without any of these a new local cluster is started, bound to 127.0.0.1, even when a ``ray start``
cluster runs here (plain ``ray.init()`` would attach to it and then refuse our ``num_cpus``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

import ray

from pipeline.config import ActorResources, WorkersConfig
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)


def init_ray(cfg: WorkersConfig) -> bool:
    """Connect to or start Ray. Returns True if this call started it (so the caller shuts it down)."""
    if ray.is_initialized():
        return False
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        _no_colour_codes()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address == "auto":
        address = _own_current_cluster()
    with _keep_own_sigterm_handler():
        try:
            if address:
                log.info("connecting to the Ray cluster at %s", address)
                ray.init(address=address, log_to_driver=True)
            else:
                log.info("starting a local Ray cluster on 127.0.0.1 (%s; Ray's token authentication %s)",
                         f"dashboard on {cfg.dashboard_host}" if cfg.include_dashboard else
                         "dashboard UI off: Ray's API server process still runs, for job and state queries",
                         os.environ.get("RAY_AUTH_MODE", "on, Ray's default; RAY_AUTH_MODE=disabled opts out"))
                with _loopback_only(), _without_notice(_TOKEN_AUTH_LOGGER, _TOKEN_AUTH_NOTICE):
                    num_cpus, num_gpus = local_cluster_size(cfg)
                    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus,
                             include_dashboard=cfg.include_dashboard, dashboard_host=cfg.dashboard_host,
                             log_to_driver=True)
        except BaseException:  # a failed or interrupted start-up: whatever it started goes with it
            with contextlib.suppress(Exception):
                ray.shutdown()
            raise
    return True


def local_cluster_size(cfg: WorkersConfig) -> tuple[int | None, int | None]:
    """(num_cpus, num_gpus) for ``ray.init`` of a local cluster: ``auto`` and None both leave the count to
    Ray's own detection of this machine (None); a number is passed as it is."""
    def count(value: int | str | None) -> int | None:
        return None if value in (None, "auto") else int(value)

    return count(cfg.local_num_cpus), count(cfg.local_num_gpus)


_TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
_TOKEN_AUTH_NOTICE = "Token authentication is enabled for this Ray cluster"
"""Ray (2.60) warns on every start of a local cluster that it enabled token authentication; the start-up line
above says so once, in our words, so Ray's notice is dropped."""


class _DropNotice(logging.Filter):
    def __init__(self, starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


@contextlib.contextmanager
def _without_notice(logger_name: str, starts: str):
    """Drop one third-party log message (by its start) while the block runs; every other message passes."""
    target = logging.getLogger(logger_name)
    drop = _DropNotice(starts)
    target.addFilter(drop)
    try:
        yield
    finally:
        target.removeFilter(drop)


@contextlib.contextmanager
def _keep_own_sigterm_handler():
    """``ray.init`` replaces the driver's SIGTERM handler by its own (``sys.exit(15)``, or, for a local
    cluster, kill its processes and ``sys.exit(1)``), which would turn a SIGTERM into exit 1 with the
    coordinator never told. When the caller handles SIGTERM itself (``semisam run``'s
    :class:`pipeline.interrupt.StopFlag`), Ray's (private, 2.60) setter does nothing during the call; the
    caller then shuts the cluster down itself (``Coordinator.shutdown``)."""
    import signal

    try:
        from ray._private import utils as ray_utils
    except ImportError:  # another Ray layout: its handler stays
        yield
        return
    saved = getattr(ray_utils, "set_sigterm_handler", None)
    if saved is None or signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.SIG_IGN, None):
        yield
        return
    ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = saved


def _no_colour_codes() -> None:
    """Ray colours its "(Actor pid=...)" log prefixes and its "[repeated Nx across cluster]" notes; in a log
    file, a CI page or `ray job logs` the codes are noise. The prefixes obey RAY_COLOR_PREFIX (a user's own
    setting wins); the notes have no switch, so Ray's (private, 2.60) colouring helper is replaced by the
    identity when it exists."""
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    try:
        from ray._private import ray_logging

        if callable(getattr(ray_logging, "_color", None)):
            ray_logging._color = lambda msg: msg
    except ImportError:  # another Ray layout: its notes keep their colour
        pass


def _own_current_cluster() -> str:
    """What ``auto`` means here: the cluster ``ray start`` last started on this machine, which Ray records
    in ``<ray temp dir>/ray_current_cluster``. Refused when that file is missing (Ray's own ``auto`` would
    then attach to any cluster it finds) or another user wrote it (their cluster, not yours)."""
    from ray._common.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    if not path.is_file():
        raise ConfigError(f"workers.address=auto: no cluster started with `ray start` on this machine ({path} "
                          "is missing); start one, or give workers.address=HOST:PORT")
    if path.stat().st_uid != os.getuid():
        raise ConfigError(f"workers.address=auto: {path} was written by another user (uid {path.stat().st_uid}), "
                          "so the cluster it names is theirs; give workers.address=HOST:PORT of your own cluster")
    address = path.read_text().strip()
    log.info("workers.address=auto is %s (the cluster `ray start` last started here, from %s)", address, path)
    return address


@contextlib.contextmanager
def _loopback_only():
    """Make a cluster started by ``ray.init`` bind to and advertise 127.0.0.1 instead of the machine's address.

    Ray 2.60 rewrites ``_node_ip_address="127.0.0.1"`` to the machine's address. Its local-only mode (what it
    uses on macOS and Windows: ``ray_constants.ENABLE_RAY_CLUSTER`` false) makes the GCS, raylet and workers
    listen on 127.0.0.1. The node address is decided during ``ray.init``, so the switch is restored after.
    """
    from ray._private import ray_constants

    saved = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    if saved is None:  # a Ray without this switch: its default address, said in the log
        log.warning("this Ray has no local-only mode; the local cluster binds to the machine's address")
        yield
        return
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def remote_actor(cls: type, resources: ActorResources, concurrency_groups: dict[str, int] | None = None, **options):
    """``ray.remote(cls)`` with the configured CPUs/GPUs and custom resources; call ``.remote(...)`` on the result.
    ``concurrency_groups`` (Ray accepts them in ``ray.remote`` only, not in ``.options``): extra groups, each
    with threads of its own, for methods marked ``@ray.method(concurrency_group=...)``."""
    opts = {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus, "max_concurrency": 1, **options}
    if resources.resources:  # custom resources steer actors to nodes that declare them (e.g. sam_gpu)
        opts["resources"] = dict(resources.resources)
    remote = ray.remote(concurrency_groups=concurrency_groups)(cls) if concurrency_groups else ray.remote(cls)
    return remote.options(**opts)
