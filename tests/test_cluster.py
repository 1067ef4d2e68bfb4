"""A real two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``, Ray's own test helper) with
declared GPUs: actors spread over both nodes with distinct (node, GPU id) pairs, and a run survives the
loss of a worker node in the middle of a relabel round.

Head: 1 CPU, 2 GPUs, the ``trainer`` resource (so the trainer lives on the head, as on a real cluster
whose head or trainer group survives). Worker node: 1 CPU, 2 GPUs. The trainer and 3 SAM actors ask for
one GPU each, so both nodes are full and the worker node holds two SAM actors.
"""

from __future__ import annotations

import pytest
import ray
from ray.cluster_utils import Cluster

from tests.conftest import assert_exactly_once, run_to_end, small_config_dict

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 2, "resources": {"trainer": 1}})
    worker = c.add_node(num_cpus=1, num_gpus=2)
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    yield c, worker
    ray.shutdown()
    c.shutdown()


def _cfg(data, out, **extra):
    from pipeline.config import config_from_dict

    tree = small_config_dict(data, out, rounds=2, workers={
        "trainer": {"num_cpus": 0.25, "num_gpus": 1, "torch_threads": 1, "resources": {"trainer": 1}},
        "sam": {"num_workers": 3, "num_cpus": 0.25, "num_gpus": 1, "torch_threads": 1},
        "faults": {"placement_timeout_s": 120}}, **extra)
    return config_from_dict(tree)


def test_actors_land_on_both_nodes_with_their_own_gpus(cluster, data12, tmp_path):
    head_and_worker = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(head_and_worker) == 2
    c, summaries = run_to_end(_cfg(data12, tmp_path))
    assert [s.round for s in summaries] == [0, 1]
    placed = [(c.trainer_info["node_id"], g) for g in c.trainer_info["gpu_ids"]]
    for m in c.pool.ready():
        placed += [(m.info["node_id"], g) for g in m.info["gpu_ids"]]
    assert len(placed) == 4 and len(set(placed)) == 4          # 4 actors, 4 distinct (node, GPU) pairs
    assert {node for node, _ in placed} == head_and_worker     # both nodes used
    assert {g for _, g in placed} == {"0", "1"}                 # GPU ids are per node


def test_losing_a_worker_node_mid_round_loses_no_case(cluster, data12, tmp_path):
    c_obj, worker = cluster
    removed: list[str] = []

    def drop_the_worker_node(event, coord, **kw):
        if event == "task_done" and kw["round"] == 1 and not removed:
            on_worker = [m for m in coord.pool.ready() if m.info["node_id"] == worker.node_id]
            assert on_worker, "no SAM actor on the worker node"
            removed.append(worker.node_id)
            c_obj.remove_node(worker)

    cfg = _cfg(data12, tmp_path)
    c, summaries = run_to_end(cfg, drop_the_worker_node)
    assert removed
    assert [s.round for s in summaries] == [0, 1]
    assert summaries[1].relabel["failed_cases"] == {}
    assert summaries[1].relabel["workers_ready"] == 1     # the round finished on the head's one SAM actor
    assert_exactly_once(cfg, [1])


def test_a_node_lost_after_the_last_round_does_not_keep_the_driver(cluster, data12, tmp_path):
    """Issue 16: a SAM node lost once the rounds were done used to kill the driver in worker_stats with an
    ActorUnavailableError traceback (the data complete, the job failed); the statistics of the actors that
    are gone are now left out and the run returns."""
    from semisam.launch import run_with_stats

    c_obj, _ = cluster
    c_obj.add_node(num_cpus=1, num_gpus=2)
    c_obj.wait_for_nodes()
    lost: list[int] = []

    def drop_a_sam_node_at_the_end(event, coord, **kw):
        if event == "round_done" and kw["round"] == 1 and not lost:
            nodes = {n.node_id: n for n in c_obj.worker_nodes}
            node_id = next(m.info["node_id"] for m in coord.pool.ready() if m.info["node_id"] in nodes)
            lost.extend(m.info["pid"] for m in coord.pool.ready() if m.info["node_id"] == node_id)
            c_obj.remove_node(nodes[node_id])

    cfg = _cfg(data12, tmp_path)
    summaries, stats = run_with_stats(cfg, drop_a_sam_node_at_the_end)
    assert lost and [s.round for s in summaries] == [0, 1]
    assert stats and not {s["pid"] for s in stats} & set(lost)  # the lost node's actors left out, not waited on
    assert_exactly_once(cfg, [1])
