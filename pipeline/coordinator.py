"""The coordinator: alternates relabeling rounds and training rounds on Ray, and resumes runs.

    round 0:   train (no pseudo-labels)                      -> checkpoint 0 -> evaluate
    round r>0: relabel unlabeled cases with checkpoint r-1   -> store round r
               train with the round-r pseudo-labels          -> checkpoint r -> evaluate

With the pseudo-label term off (``train.pseudo_label.enabled: false`` or weight 0, e.g. plain Mean
Teacher) no SAM pool is started and every round only trains.

Run folder (``output_dir/name``)::

    config.yaml          the resolved config (a resumed run must match it, except rounds/workers/device)
    state.json           completed rounds and their one-line summaries (written atomically)
    checkpoints/         ckpt_NNNN.pt, one per round
    pseudo_labels/       the store (masks.zarr + manifest.parquet), see pipeline.store
    embeddings.zarr/     the embedding cache
    eval/round_NNN.parquet, audit/round_NNN.parquet

Rerunning the same folder skips completed rounds; inside an interrupted relabel round, cases already in
the manifest are not redone.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ray
import yaml
from tqdm import tqdm

from pipeline.atomic import atomic_write_text
from pipeline.config import RunConfig, dump_config
from pipeline.data.dataset import read_dataset_info
from pipeline.data.splits import resolve_split
from pipeline.data.validate import validate_cases
from pipeline.errors import CheckpointError, ConfigError
from pipeline.evaluation import audit_pseudo_labels, round_means
from pipeline.generalist.factory import generalist_name
from pipeline.ray_runtime import init_ray, remote_actor
from pipeline.store import PseudoLabelStore
from workers.sam_worker import SamWorker
from workers.trainer import TrainerWorker

log = logging.getLogger(__name__)

# Keys a resumed run may change: they decide where and how long it runs, not what it computes.
RESUMABLE_CHANGES = {"rounds", "workers", "device"}
# How often the coordinator appends finished cases to the manifest during a relabel round.
MANIFEST_FLUSH_SECONDS = 10.0


@dataclass
class RoundSummary:
    round: int
    seconds: float
    train: dict = field(default_factory=dict)
    relabel: dict = field(default_factory=dict)
    test: dict = field(default_factory=dict)
    audit: dict = field(default_factory=dict)

    def line(self) -> str:
        parts = [f"round {self.round}"]
        if self.relabel:
            r = self.relabel
            parts.append(f"relabel {r['cases']} cases/{r['slices']} slices, score {r['score_mean']:.3f}, "
                         f"cached embeddings {r['cached_slices']}/{r['prompted_slices']}")
        parts.append(f"train loss {self.train.get('loss', float('nan')):.4f}")
        if self.test:
            unit = "vox" if "hd95_vox" in self.test else "mm"
            hd = self.test.get(f"hd95_{unit}", float("nan"))
            asd = self.test.get(f"asd_{unit}", float("nan"))
            nan = f" ({self.test['hd95_nan']}/{self.test['pairs']} pairs without distance)" if "pairs" in self.test else ""
            parts.append(f"test Dice {self.test['dice']:.4f} HD95 {hd:.2f} {unit} ASD {asd:.2f} {unit}{nan}")
        if self.audit:
            parts.append(f"audit pseudo Dice {self.audit['pseudo_dice']:.4f} vs specialist "
                         f"{self.audit['specialist_dice']:.4f}")
        parts.append(f"{self.seconds:.1f} s")
        return " | ".join(parts)


def _diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _diff_keys(a[k], b[k], key + ".")
        elif a.get(k) != b.get(k):
            out.append(key)
    return out


def prepare_run_dir(cfg: RunConfig) -> dict:
    """Create or reopen the run folder; returns the saved state ({"completed": [...], "summaries": [...]})."""
    run_dir = cfg.run_dir
    saved_cfg = run_dir / "config.yaml"
    state_path = run_dir / "state.json"
    if saved_cfg.exists():
        old = yaml.safe_load(saved_cfg.read_text())
        new = cfg.model_dump(mode="json")
        changed = [k for k in _diff_keys(old, new) if k.split(".")[0] not in RESUMABLE_CHANGES]
        if changed:
            raise ConfigError(
                f"run folder {run_dir} holds a run with another config (differs in: {', '.join(changed)}); "
                "resume it with the same config, or pick a new name= / output_dir="
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved_cfg, dump_config(cfg))
    if state_path.exists():
        return json.loads(state_path.read_text())
    return {"completed": [], "summaries": []}


def preflight(cfg: RunConfig):
    """Everything that can be checked before any work starts: dataset, split, checkpoint path."""
    info = read_dataset_info(cfg.data.root, cfg.data.format)
    split = resolve_split(cfg.data, info)
    validate_cases(info, split, check_unlabeled_labels=cfg.eval.audit_pseudo_labels)
    if cfg.generalist.backend == "sam":
        ckpt = cfg.generalist.sam.checkpoint
        if ckpt is None or not Path(ckpt).is_file():
            raise CheckpointError(f"SAM checkpoint {ckpt} does not exist (generalist.sam.checkpoint)")
    if not split.unlabeled and cfg.rounds > 1:
        log.warning("no unlabeled cases: rounds after 0 only train further")
    return info, split


class Coordinator:
    """Owns the actors of one run and drives its rounds."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.info, self.split = preflight(cfg)
        self.state = prepare_run_dir(cfg)
        self.store = PseudoLabelStore(cfg.run_dir / "pseudo_labels", create=True,
                                      class_ids=self.info.foreground_classes, slice_axis=cfg.data.slice_axis)
        # Without the pseudo-label term there is nothing to relabel: no SAM pool, rounds only train.
        self.relabels = bool(self.split.unlabeled) and cfg.train.pseudo_label.active
        self._started_ray = init_ray(cfg.workers)
        cfg_dict = cfg.model_dump(mode="json")
        w = cfg.workers
        self.trainer = remote_actor(TrainerWorker, w.trainer).remote(cfg_dict)
        self.pool = ([remote_actor(SamWorker, w.sam).remote(cfg_dict, i) for i in range(w.sam.num_workers)]
                     if self.relabels else [])

    def shutdown(self) -> None:
        for a in [self.trainer, *self.pool]:
            ray.kill(a)
        if self._started_ray:
            ray.shutdown()

    # -- rounds ----------------------------------------------------------------------------------
    def run(self) -> list[RoundSummary]:
        completed = sorted(self.state["completed"])
        if completed:
            last = completed[-1]
            ray.get(self.trainer.restore.remote(last))
            log.info("resuming %s after round %d", self.cfg.run_dir, last)
        summaries = [RoundSummary(**s) for s in self.state["summaries"]]
        for r in tqdm(range(self.cfg.rounds), desc="rounds", unit="round"):
            if r in completed:
                continue
            summary = self.run_round(r)
            summaries.append(summary)
            log.info(summary.line())
            self.state["completed"].append(r)
            self.state["summaries"].append(asdict(summary))
            atomic_write_text(self.cfg.run_dir / "state.json", json.dumps(self.state, indent=1))
        return summaries

    def run_round(self, r: int) -> RoundSummary:
        start = time.perf_counter()
        summary = RoundSummary(round=r, seconds=0.0)
        if r > 0 and self.relabels:
            summary.relabel = self.relabel_round(r, checkpoint_version=r - 1)
            if self.cfg.eval.audit_pseudo_labels:
                audit = audit_pseudo_labels(self.store, self.info, r, self.split.unlabeled, self.info.foreground_classes)
                out = self.cfg.run_dir / "audit" / f"round_{r:03d}.parquet"
                out.parent.mkdir(parents=True, exist_ok=True)
                audit.to_parquet(out, index=False)
                summary.audit = {"pseudo_dice": float(audit["pseudo_dice"].mean()),
                                 "specialist_dice": float(audit["specialist_dice"].mean())}
        pseudo_round = r if (r > 0 and self.relabels) else None
        summary.train = ray.get(self.trainer.train_round.remote(r, pseudo_round))
        ray.get(self.trainer.publish.remote(r))
        if self.split.test and (self.cfg.eval.every_round or r == self.cfg.rounds - 1):
            summary.test = round_means(ray.get(self.trainer.evaluate.remote(r)))
        summary.seconds = time.perf_counter() - start
        return summary

    def relabel_round(self, r: int, checkpoint_version: int) -> dict:
        """Hand whole cases to the SAM pool (a work queue, two calls queued per actor) and append the
        manifest as each call returns."""
        self.store.ensure_round(r, checkpoint_version, generalist_name(self.cfg.generalist))
        weights = self.trainer.weights.remote()      # stays in the object store; each actor fetches it once
        model_args = self.trainer.model_args.remote()
        ray.get([w.load_specialist.remote(checkpoint_version, model_args, weights) for w in self.pool])
        done = self.store.completed_cases(r)
        todo = [c for c in self.split.unlabeled if c not in done]
        if done:
            log.info("round %d: %d cases already relabeled, %d to go", r, len(done), len(todo))
        k = self.cfg.workers.sam.cases_per_task
        tasks = [todo[i:i + k] for i in range(0, len(todo), k)]
        free = [w for w in self.pool for _ in range(2)]
        in_flight: dict = {}
        pending: list[dict] = []  # rows of finished cases not yet in the manifest
        last_flush = time.monotonic()
        with tqdm(total=len(todo), desc=f"relabel round {r}", unit="case") as bar:
            while tasks or in_flight:
                while free and tasks:
                    worker, task = free.pop(0), tasks.pop(0)
                    in_flight[worker.relabel.remote(task, r)] = (worker, task)
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                for ref in ready:
                    worker, task = in_flight.pop(ref)
                    pending.extend(ray.get(ref))
                    free.append(worker)
                    bar.update(len(task))
                # Each append rewrites the manifest file, so batch them: a crash loses at most the cases
                # of the last MANIFEST_FLUSH_SECONDS, which a resume relabels again.
                if pending and (not in_flight or time.monotonic() - last_flush > MANIFEST_FLUSH_SECONDS):
                    self.store.append_manifest(pending)
                    pending, last_flush = [], time.monotonic()
        m = self.store.manifest()
        m = m[m["round"] == r]
        prompted = m[m["num_prompts"] > 0]
        return {
            "cases": int(m["case_id"].nunique()),
            "slices": len(m),
            "prompted_slices": len(prompted),
            "cached_slices": int(prompted["embedding_cached"].sum()),
            "score_mean": float(prompted["score_mean"].mean()) if len(prompted) else float("nan"),
            "agreement_dice": float(prompted["agreement_dice"].mean()) if len(prompted) else float("nan"),
        }

    def worker_stats(self) -> list[dict]:
        return ray.get([w.stats.remote() for w in self.pool])


def run(cfg: RunConfig) -> list[RoundSummary]:
    """Run (or resume) a whole run; the Ray cluster is started here if none is reachable."""
    coordinator = Coordinator(cfg)
    try:
        return coordinator.run()
    finally:
        coordinator.shutdown()
