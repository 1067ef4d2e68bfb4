"""A run with this project's actors: the library's coordinator given ``workers``' actor classes.

    from semisam.launch import run
    summaries = run(load_config("conf/demo.yaml"))
"""

from __future__ import annotations

from pipeline import coordinator
from pipeline import predict as prediction
from pipeline.config import RunConfig
from pipeline.round_summary import RoundSummary
from workers.predictor import Predictor
from workers.sam_worker import SamWorker
from workers.trainer import TrainerWorker

ACTORS = coordinator.Actors(trainer=TrainerWorker, sam=SamWorker)
"""The trainer and SAM actor classes every run of this project uses."""


def make_coordinator(cfg: RunConfig, on_event=None) -> coordinator.Coordinator:
    """A :class:`pipeline.coordinator.Coordinator` with :data:`ACTORS` (call ``run()``, then ``shutdown()``)."""
    return coordinator.Coordinator(cfg, ACTORS, on_event)


def run(cfg: RunConfig, on_event=None, stop=None, *, leak_labels: bool = False) -> list[RoundSummary]:
    """Run (or resume) a whole run with :data:`ACTORS`; a local Ray cluster is started if none is reachable.
    ``stop``: a :class:`pipeline.interrupt.StopFlag` the caller installed (the CLI, before any import);
    ``leak_labels``: unlocks the oracle control (:mod:`pipeline.oracle`), benchmarks only."""
    return coordinator.run(cfg, ACTORS, on_event, stop, leak_labels=leak_labels)


def run_with_stats(cfg: RunConfig, on_event=None) -> tuple[list[RoundSummary], list[dict]]:
    """:func:`run`, plus each live SAM actor's counters (see :func:`pipeline.coordinator.run_with_stats`)."""
    return coordinator.run_with_stats(cfg, ACTORS, on_event)


def predict(run_dir: str, inputs, output, options: prediction.PredictOptions, on_scan=None) -> dict:
    """:func:`pipeline.predict.predict` with the project's ``workers.predictor.Predictor`` actors."""
    return prediction.predict(run_dir, inputs, output, options, Predictor, on_scan)
