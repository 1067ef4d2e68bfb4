"""Pure parts: progress lines (no escape codes) and the placement plan over node resources."""

from __future__ import annotations

import logging

from pipeline.config import ActorResources, SamPoolConfig
from pipeline.placement import plan_pool
from pipeline.progress import Progress, format_seconds


def test_progress_lines_are_plain_and_rate_limited(caplog):
    now = [0.0]
    p = Progress("relabel round 1", total=10, unit="cases", logger=logging.getLogger("t"), every_s=10,
                 clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="t"):
        for _ in range(4):
            now[0] += 2.0
            p.advance(1)            # 8 s: nothing yet
        now[0] += 4.0
        p.advance(1)                # 12 s, 5 done: one line
        now[0] += 1.0
        p.advance(5)                # done: the last line always comes
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["relabel round 1: 5/10 cases (50%), 0.42 cases/s, ETA 12 s",
                     "relabel round 1: 10/10 cases (100%), 0.77 cases/s, ETA 0 s"]
    assert all("\x1b" not in ln and "\r" not in ln for ln in lines)
    assert format_seconds(3725) == "62 min 05 s" and format_seconds(float("nan")) == "?"


def _nodes(*specs):
    return [dict(s) for s in specs]


def test_plan_counts_actors_node_by_node():
    trainer = ActorResources(num_cpus=1, num_gpus=1)
    sam = SamPoolConfig(num_workers=8, num_cpus=1, num_gpus=1)
    nodes = _nodes({"CPU": 8, "GPU": 2}, {"CPU": 8, "GPU": 4})
    plan = plan_pool(trainer, sam, True, nodes)
    assert plan.trainer_fits and plan.sam_placeable == 5 and plan.sam_wanted == 8
    assert "8 SAM actors of 1 CPU, 1 GPU each were asked for, the cluster can place 5" in plan.message
    assert "short of 3 CPU" not in plan.message and "3 GPU" in plan.message
    auto = plan_pool(trainer, SamPoolConfig(num_workers="auto", num_gpus=1, max_workers=3), True, nodes)
    assert auto.sam_wanted == 3 and auto.message == ""
    # half a GPU on each of two nodes is not one GPU: counted per node, not as a cluster total
    split = plan_pool(ActorResources(num_gpus=1), sam, False, _nodes({"CPU": 4, "GPU": 0.5}, {"CPU": 4, "GPU": 0.5}))
    assert not split.trainer_fits and "no node can hold the trainer" in split.message
    custom = plan_pool(trainer, SamPoolConfig(num_workers=2, resources={"sam_gpu": 1}), True, nodes)
    assert custom.sam_placeable == 0 and "sam_gpu" in custom.message
