"""Can the cluster place the run's actors? Checked before round 0, so an over-asked pool never hangs.

Ray queues an actor it cannot place and waits, silently, for a node that fits (an autoscaler may add
one). Before starting any actor the coordinator counts, node by node, how many actors of each request
the alive nodes can hold (the trainer first, then SAM actors); a request no node can hold is reported
with the resources that are missing. Actors are then started and given ``faults.placement_timeout_s``
to come up; see ``pipeline.pool``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import ray

from pipeline.config import ActorResources, SamPoolConfig

log = logging.getLogger(__name__)


def request_of(res: ActorResources) -> dict[str, float]:
    """The Ray resources one actor asks for: {"CPU": ..., "GPU": ..., custom...} (zero entries dropped)."""
    req = {"CPU": float(res.num_cpus), "GPU": float(res.num_gpus), **{k: float(v) for k, v in res.resources.items()}}
    return {k: v for k, v in req.items() if v > 0}


def describe(req: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(req.items())) or "no resources"


def alive_node_resources() -> list[dict[str, float]]:
    """Total resources of each alive node (what an idle cluster could place)."""
    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


def fits(node: dict[str, float], req: dict[str, float]) -> int:
    """How many actors of ``req`` fit in ``node`` (a large number when ``req`` asks for nothing)."""
    counts = [math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in req.items()]
    return min(counts) if counts else 10**6


def take(node: dict[str, float], req: dict[str, float], n: int = 1) -> None:
    for k, v in req.items():
        node[k] = node.get(k, 0.0) - v * n


@dataclass
class PoolPlan:
    trainer_fits: bool
    sam_placeable: int      # SAM actors the alive nodes can hold beside the trainer
    sam_wanted: int         # what the run will start
    message: str            # what is missing, for logs and errors ("" when all fits)


def plan_pool(trainer: ActorResources, sam: SamPoolConfig, need_sam: bool,
              nodes: list[dict[str, float]] | None = None) -> PoolPlan:
    """Place the trainer on the first node that holds it, then count SAM actors over all nodes."""
    nodes = [dict(n) for n in (nodes if nodes is not None else alive_node_resources())]
    t_req, s_req = request_of(trainer), request_of(sam)
    trainer_fits = False
    for node in nodes:
        if fits(node, t_req) >= 1:
            take(node, t_req)
            trainer_fits = True
            break
    placeable = sum(min(fits(n, s_req), 10**4) for n in nodes) if need_sam else 0
    if not need_sam:
        wanted = 0
    elif sam.num_workers == "auto":
        wanted = placeable if sam.max_workers is None else min(placeable, sam.max_workers)
    else:
        wanted = sam.num_workers
    problems = []
    totals = _totals(nodes if trainer_fits else [dict(n) for n in (alive_node_resources() if nodes is None else nodes)])
    if not trainer_fits:
        problems.append(f"no node can hold the trainer ({describe(t_req)}; the cluster has "
                        f"{describe(_largest_node(nodes))} on its largest node)")
    if need_sam and placeable < (sam.num_workers if isinstance(sam.num_workers, int) else 1):
        asked = sam.num_workers if isinstance(sam.num_workers, int) else 1
        missing = {k: v * asked - totals.get(k, 0.0) for k, v in s_req.items() if v * asked > totals.get(k, 0.0)}
        problems.append(f"{asked} SAM actors of {describe(s_req)} each were asked for, the cluster can place "
                        f"{placeable} beside the trainer (short of {describe(missing) or 'room on a single node'})")
    return PoolPlan(trainer_fits, placeable, wanted, "; ".join(problems))


def _totals(nodes: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for n in nodes:
        for k, v in n.items():
            out[k] = out.get(k, 0.0) + max(v, 0.0)
    return out


def _largest_node(nodes: list[dict[str, float]]) -> dict[str, float]:
    if not nodes:
        return {}
    best = max(nodes, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)))
    return {k: v for k, v in best.items() if k in ("CPU", "GPU") or not (k.startswith("node:") or k in (
        "memory", "object_store_memory") or k.startswith("accelerator_type"))}
