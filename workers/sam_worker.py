"""A SAM inference actor: loads checkpoint N of the specialist, relabels whole cases, writes masks.

It holds the generalist (loaded once, in ``__init__``) and the embedding cache. It reads images only:
it never opens a label file. Each call handles whole cases and writes each case's arrays itself, so no
two actors ever write the same chunk; manifest rows go back to the coordinator, the manifest's one writer.
"""

from __future__ import annotations

import logging
import time

import torch

from pipeline.data.dataset import load_image, read_dataset_info
from pipeline.generalist.cache import EmbeddingCache
from pipeline.generalist.factory import make_generalist
from pipeline.models.unet import build_model
from pipeline.relabel import relabel_case
from pipeline.store import PseudoLabelStore
from workers.common import process_info, return_free_heap, start_worker

log = logging.getLogger(__name__)


class SamWorker:
    def __init__(self, cfg_dict: dict, worker_index: int = 0):
        self.cfg, self.device = start_worker(cfg_dict, "sam")
        self.index = worker_index
        self.info = read_dataset_info(self.cfg.data.root, self.cfg.data.format)
        self.class_ids = self.info.foreground_classes
        self.generalist = make_generalist(self.cfg.generalist, self.device)
        g = self.cfg.generalist
        self.cache = None
        if g.cache_embeddings and getattr(self.generalist, "cacheable", False):
            self.cache = EmbeddingCache(self.cfg.run_dir / "embeddings.zarr", self.generalist.name, g.cache_dtype)
        self.store = PseudoLabelStore(self.cfg.run_dir / "pseudo_labels")
        self.model = None
        self.version = -1
        self.seconds = 0.0
        log.info("SAM worker %d on %s with %s", worker_index, self.device, self.generalist.name)

    def load_specialist(self, version: int, model_args: dict, weights: dict) -> int:
        """Take checkpoint ``version``'s student weights (state dict from the object store)."""
        if version != self.version:
            model = build_model(model_args)
            model.load_state_dict(weights)
            self.model = model.to(self.device).eval()
            self.version = version
        return self.version

    def relabel(self, case_ids: list[str], round_index: int) -> list[dict]:
        """Relabel cases with the loaded checkpoint, write their masks, return their manifest rows."""
        if self.model is None:
            raise RuntimeError("load_specialist must be called before relabel")
        start = time.perf_counter()
        rows: list[dict] = []
        for case_id in case_ids:
            image, _ = load_image(self.info, case_id, self.cfg.data.normalization)
            with torch.inference_mode():
                out = relabel_case(case_id, image, self.model, self.generalist, self.cache, self.cfg,
                                   self.class_ids, round_index, self.version, self.device)
            self.store.write_case(round_index, case_id, out.pseudo_label, out.specialist, out.scores, {
                "checkpoint_version": self.version,
                "generalist": self.generalist.name,
                "slice_axis": self.cfg.data.slice_axis,
                "volume_shape": list(image.shape),
            })
            rows.extend(out.rows)
        return_free_heap()
        self.seconds += time.perf_counter() - start
        return rows

    def stats(self) -> dict:
        """Counters for tests and benchmarks: cache hits/misses, encoder/decoder calls, time, memory."""
        out = {"worker": self.index, "seconds": self.seconds, **process_info()}
        if self.cache is not None:
            out.update(self.cache.stats())
        out["encoder_calls"] = getattr(self.generalist, "encoder_calls", 0)
        out["decoder_calls"] = getattr(self.generalist, "decoder_calls", 0)
        return out
