"""The trainer actor: trains the specialist, publishes versioned checkpoints, evaluates on the test split.

Checkpoint N is written after round N as ``checkpoints/ckpt_NNNN.pt`` (atomic rename) and its student
weights are returned through the Ray object store for the SAM pool (``weights``).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import ray
import torch

from pipeline.checkpoint import checkpoint_path, load_checkpoint, recorded_sha256, save_checkpoint
from pipeline.class_source import selection_table
from pipeline.data.dataset import load_image, load_label, read_data
from pipeline.data.splits import resolve_split
from pipeline.data.validate import warn_constant_images
from pipeline.errors import WorkerError
from pipeline.evaluation import EvalVolume, evaluate_model
from pipeline.events import EventLog
from pipeline.generalist.adapt import read_adapted
from pipeline.generalist.factory import embedding_cache, make_generalist
from pipeline.relabel import relabel_case
from pipeline.run_folder import RunFolder
from pipeline.run_lock import check_sees_run_folder
from pipeline.storage import write_table
from pipeline.store import PseudoLabelStore
from pipeline.training.loop import SpecialistTrainer, TrainVolume
from pipeline.training.pseudo_labels import PseudoLabel
from workers.common import node_info, process_info, start_worker

log = logging.getLogger(__name__)


class TrainerWorker:
    def __init__(self, cfg_dict: dict):
        self.cfg, self.device = start_worker(cfg_dict, "trainer")
        cfg = self.cfg
        self.info = read_data(cfg.data)
        self.split = resolve_split(cfg.data, self.info)
        self.class_ids = self.info.foreground_classes
        norm = cfg.data.normalization
        self.labeled = [TrainVolume(c, load_image(self.info, c, norm)[0], load_label(self.info, c)) for c in self.split.labeled]
        # Unlabeled cases: images only. Their labels, if the files exist, are never opened here.
        self.unlabeled = [TrainVolume(c, load_image(self.info, c, norm)[0]) for c in self.split.unlabeled]
        self.test = [self._eval_volume(c) for c in self.split.test]
        self.val = [self._eval_volume(c) for c in self.split.val]  # validation: chooses the best round
        for volumes, role in ((self.labeled, "labeled"), (self.unlabeled, "unlabeled"), (self.test, "test"),
                              (self.val, "validation")):
            warn_constant_images(volumes, role)
        self.trainer = SpecialistTrainer(cfg, self.info.num_classes, self.device)
        self.events = None  # TensorBoard's tb/train, opened on the first training round (pipeline.events)
        # Provenance: the weights are checkpoint ``version`` (-1: none, round 0 starts from scratch) with
        # SHA-256 ``sha``, or the result of training round ``trained`` on top of it, not yet published.
        self.version = -1
        self.sha: str | None = None
        self.trained: int | None = None
        self._generalist = None  # built on first select_sources (generalist.class_source: auto)
        self._cache = None
        log.info("trainer on %s: %d labeled, %d unlabeled, %d validation, %d test cases", self.device,
                 len(self.labeled), len(self.unlabeled), len(self.val), len(self.test))

    def _eval_volume(self, case_id: str) -> EvalVolume:
        image, spacing = load_image(self.info, case_id, self.cfg.data.normalization)
        return EvalVolume(case_id, image, load_label(self.info, case_id), spacing)

    # -- checkpoints -----------------------------------------------------------------------------
    def ready(self, run_token: str) -> dict:
        """Answered once the actor is up (data loaded): proves it sees the driver's run folder."""
        info = node_info()
        check_sees_run_folder(self.cfg.run_dir, run_token, f"the trainer on {info['host']}")
        return info

    @ray.method(concurrency_group="health")
    def alive(self) -> float:
        """Answered from its own thread while a long call runs: the driver's hang detector (see
        ``Coordinator._get``). A stopped or wedged process does not answer."""
        return time.time()

    def restore(self, version: int, sha256: str | None = None) -> int:
        """Load checkpoint ``version`` of this run (resume, or after a restart); its SHA-256 is verified."""
        path = checkpoint_path(self.cfg.run_dir, version)
        ckpt = load_checkpoint(path, expect_model_args=self.trainer.model_args, expect_sha256=sha256)
        self.trainer.load_state_dict(ckpt["trainer"])
        self.version, self.sha, self.trained = version, sha256 or recorded_sha256(path), None
        return version

    def _holds(self, version: int, what: str) -> None:
        """Refuse to ``what`` unless the weights are exactly checkpoint ``version`` (never a stale one)."""
        if self.version != version or self.trained is not None:
            held = f"checkpoint {self.version}" if self.version >= 0 else "no checkpoint"
            if self.trained is not None:
                held += f" trained further in round {self.trained}"
            raise WorkerError(f"the trainer refuses to {what}: it needs checkpoint {version}, it holds {held}")

    def publish(self, version: int) -> str:
        """Write checkpoint ``version`` (atomic, with its ``.sha256``); returns the SHA-256. Only the weights
        that training round ``version`` just produced are published: never older ones under a newer number."""
        if self.trained != version:
            raise WorkerError(f"the trainer refuses to publish checkpoint {version}: its weights are not the "
                              f"result of training round {version} (they are checkpoint {self.version}"
                              + (f" trained in round {self.trained})" if self.trained is not None else ")"))
        digest = save_checkpoint(checkpoint_path(self.cfg.run_dir, version), version, self.trainer.state_dict(),
                                 self.trainer.model_args, self.cfg)
        self.version, self.sha, self.trained = version, digest, None
        return digest

    def weights(self, version: int | None = None) -> dict:
        """The student's state dict (CPU tensors), for the SAM pool through the object store. With
        ``version`` (the coordinator always gives it) only when the weights are exactly that checkpoint."""
        if version is not None:
            self._holds(version, f"share the weights of checkpoint {version}")
        return {k: v.detach().cpu() for k, v in self.trainer.student.state_dict().items()}

    def model_args(self) -> dict:
        return dict(self.trainer.model_args)

    # -- work ------------------------------------------------------------------------------------
    def load_pseudo_labels(self, round_index: int, case_ids: list[str] | None = None) -> dict[str, PseudoLabel]:
        """The generalist masks of ``round_index`` (for ``case_ids``, default every unlabeled case),
        gated by generalist score. Cases the round gave up on have no masks and are left out."""
        ids = [v.case_id for v in self.unlabeled] if case_ids is None else list(case_ids)
        store = PseudoLabelStore(RunFolder(self.cfg.run_dir).pseudo_labels)
        return self.trainer.term.load(store, round_index, ids, self.cfg.data.slice_axis)

    def train_round(self, round_index: int, pseudo_round: int | None, pseudo_cases: list[str] | None = None) -> dict:
        """Train round ``round_index`` on top of the weights held (the coordinator restores checkpoint
        ``round_index - 1`` first); ``publish(round_index)`` then accepts them."""
        pseudo = self.load_pseudo_labels(pseudo_round, pseudo_cases) if pseudo_round is not None else None
        if self.events is None:
            self.events = EventLog(self.cfg.run_dir, "train")
            self.trainer.on_log = lambda step, values: self.events.scalars(step, values, "train")
        stats = self.trainer.train(self.labeled, self.unlabeled, pseudo, self.cfg.train.iterations)
        if pseudo:
            kept = np.concatenate([p.slice_weight for p in pseudo.values()])
            stats["pseudo_slices_kept"] = float(kept.mean()) if kept.size else float("nan")
            voxels = [p.voxel_weight for p in pseudo.values() if p.voxel_weight is not None]
            if voxels:
                stats["pseudo_voxels_kept"] = float(np.mean([v.mean() for v in voxels]))
        stats["step"] = self.trainer.step
        self.trained = round_index
        self.events.flush()
        return stats

    def evaluate(self, round_index: int, part: str = "test") -> pd.DataFrame:
        """Evaluate checkpoint ``round_index`` on the test split (``part="test"``, written to
        ``eval/round_NNN.parquet``) or the validation split (``part="val"``, ``eval/val_round_NNN.parquet``),
        with the class's name (``class_name``, from dataset.json or ``data.labels``) and the checkpoint's
        SHA-256 (``checkpoint_sha256``) in every row."""
        self._holds(round_index, f"evaluate round {round_index}")
        volumes = {"test": self.test, "val": self.val}[part]
        df = evaluate_model(self.trainer.student, volumes, self.cfg, self.class_ids, self.device)
        df.insert(0, "round", round_index)
        df.insert(df.columns.get_loc("class_id") + 1, "class_name", df["class_id"].map(self.info.labels))
        df["checkpoint_sha256"] = self.sha
        folder = RunFolder(self.cfg.run_dir)
        write_table(df, folder.table("eval", round_index) if part == "test" else folder.val_table(round_index))
        return df

    def select_sources(self, round_index: int, case_ids: list[str], decoder_sha: str = "") -> pd.DataFrame:
        """Score the generalist (every class prompted, as in relabeling) and the specialist (the current
        student, i.e. the checkpoint the round relabels with) against the labels of the held-out
        ``case_ids``: one row per (case, class), ``pipeline.class_source.selection_table``. The trainer
        does it because it is the actor that reads labels; the SAM actors never do. ``decoder_sha``: the
        run's adapted decoder (``generalist.adapt``), which the generalist then decodes with."""
        if self._generalist is None:
            self._generalist = make_generalist(self.cfg.generalist, self.device)
            self._cache = embedding_cache(self.cfg, self._generalist)
        if decoder_sha and decoder_sha != self._generalist.decoder_sha256:
            payload = read_adapted(RunFolder(self.cfg.run_dir).adapted_decoder, expect_sha256=decoder_sha)
            self._generalist.use_adapted(payload, decoder_sha)
        rows: list[dict] = []
        norm, axis = self.cfg.data.normalization, self.cfg.data.slice_axis
        for case_id in case_ids:
            image, _ = load_image(self.info, case_id, norm)
            label = np.moveaxis(load_label(self.info, case_id), axis, 0)
            with torch.inference_mode():
                out = relabel_case(case_id, image, self.trainer.student, self._generalist, self._cache, self.cfg,
                                   self.class_ids, round_index, self.version, self.device,
                                   checkpoint_sha256=self.sha or "")
            rows.extend(selection_table(case_id, out.pseudo_label, out.specialist, label, self.class_ids,
                                        round_index))
        return pd.DataFrame(rows)

    def process_info(self) -> dict:
        return process_info()

