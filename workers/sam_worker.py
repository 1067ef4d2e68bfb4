"""A SAM inference actor: loads checkpoint N of the specialist, relabels whole cases, writes masks.

It holds the generalist (loaded once, in ``__init__``) and the embedding cache. Relabeling reads images
only: it never opens a label file. The one exception is ``fit_adapted`` (``generalist.adapt``), called once
per run on one actor, which reads the labels of the *labeled training cases* (``split.labeled``) and no
other. Each call handles whole cases and writes each case's arrays itself, so no two actors ever write the
same chunk; manifest rows go back to the coordinator, the manifest's one writer.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import ray
import torch

from pipeline.data.dataset import load_image, load_label, read_data
from pipeline.data.splits import resolve_split
from pipeline.errors import StoreError
from pipeline.generalist import adapt
from pipeline.generalist.cache import EmbeddingCache
from pipeline.generalist.encoder_runtime import EncoderBackendChanged
from pipeline.generalist.factory import embedding_cache, make_generalist
from pipeline.generalist.sam import checkpoint_sha256
from pipeline.models.unet import build_model
from pipeline.oracle import check_unlocked, is_oracle
from pipeline.relabel import relabel_case
from pipeline.run_folder import RunFolder
from pipeline.run_lock import check_sees_run_folder
from pipeline.store import PseudoLabelStore
from workers.common import node_info, process_info, return_free_heap, start_worker

log = logging.getLogger(__name__)


class SamWorker:
    def __init__(self, cfg_dict: dict, worker_index: int = 0, leak_labels: bool = False):
        """``leak_labels``: unlocks an oracle config (``prompts.source: oracle_labels_LEAK``, see
        :mod:`pipeline.oracle`), which is refused without it."""
        self.cfg, self.device = start_worker(cfg_dict, "sam")
        check_unlocked(self.cfg, leak_labels, f"SAM worker {worker_index}")
        self.oracle = is_oracle(self.cfg)
        self.index = worker_index
        self.info = read_data(self.cfg.data)
        self.class_ids = self.info.foreground_classes
        self.generalist = make_generalist(self.cfg.generalist, self.device)
        # The run folder is opened on first use, after ready() has checked this node sees it: opening it
        # here would create an empty local folder on a node without the shared storage.
        self._cache: EmbeddingCache | None = None
        self._store: PseudoLabelStore | None = None
        self.model = None
        self.version = -1
        self.sha = ""  # the specialist checkpoint's SHA-256: weights are reloaded when it changes
        self.seconds = 0.0
        log.info("SAM worker %d on %s with %s", worker_index, self.device, self.generalist.name)

    @property
    def cache(self) -> EmbeddingCache | None:
        """The embedding cache (SAM only): ``generalist.cache_dir``, else the run folder's embeddings.zarr,
        under the key of this checkpoint (hashed once per actor) and preprocessing."""
        if self._cache is None:
            self._cache = embedding_cache(self.cfg, self.generalist)
            if self._cache is not None:
                log.info("SAM worker %d: embedding cache %s", self.index, self._cache.key)
        return self._cache

    @property
    def store(self) -> PseudoLabelStore:
        if self._store is None:
            self._store = PseudoLabelStore(RunFolder(self.cfg.run_dir).pseudo_labels)
        return self._store

    def ready(self, run_token: str) -> dict:
        """Answered once the actor is up: proves it sees the driver's run folder; says where it runs."""
        info = node_info()
        check_sees_run_folder(self.cfg.run_dir, run_token, f"SAM worker {self.index} on {info['host']}")
        return {"worker": self.index, **info}

    @ray.method(concurrency_group="health")
    def alive(self) -> float:
        """Answered from its own thread while a relabel call runs (``pipeline.pool.HangWatch``)."""
        return time.time()

    def load_specialist(self, version: int, model_args: dict, weights: dict, sha: str = "") -> int:
        """Take checkpoint ``version``'s student weights (state dict from the object store)."""
        model = build_model(model_args)
        model.load_state_dict(weights)
        self.model = model.to(self.device).eval()
        self.version, self.sha = version, sha
        return self.version

    def fit_adapted(self) -> dict:
        """Fit the adapted decoder (``generalist.adapt``, :mod:`pipeline.generalist.adapt`) on the labeled
        training cases, their embeddings through the embedding cache; write it to the run folder
        (``generalist/adapted_decoder.pt``) and decode with it from now on. Returns {"sha256", "stats"}.
        Only ``split.labeled``'s labels are opened (unlabeled and test labels never)."""
        cfg, axis = self.cfg.generalist.adapt, self.cfg.data.slice_axis
        if self.generalist.decoder_sha256 or self.generalist.class_tokens is not None:
            self.generalist = make_generalist(self.cfg.generalist, self.device)  # fit from the checkpoint's own
        items: list[adapt.AdaptSlice] = []
        for case_id in resolve_split(self.cfg.data, self.info).labeled:
            image, _ = load_image(self.info, case_id, self.cfg.data.normalization)
            labels = np.moveaxis(load_label(self.info, case_id), axis, 0)
            slices = np.ascontiguousarray(np.moveaxis(image, axis, 0))
            wanted = adapt.slices_to_embed(labels, self.class_ids, cfg.min_pixels)
            if self.cache is not None:
                embeddings, _ = self.cache.get(case_id, slices, wanted, self.generalist.embed)
            else:
                embeddings = dict(zip(wanted, self.generalist.embed(slices[wanted]), strict=True)) if wanted else {}
            items += adapt.adapt_slices(embeddings, labels, self.class_ids, cfg.min_pixels)
        fitted = adapt.fit_decoder(self.generalist, items, self.class_ids, cfg, self.cfg.seed)
        sha = adapt.save_adapted(RunFolder(self.cfg.run_dir).adapted_decoder, fitted, cfg,
                                 checkpoint_sha256(self.generalist.cfg))
        self.generalist.decoder_sha256 = sha
        log.info("SAM worker %d: adapted decoder %s... fitted on %d labeled slices in %.0f s", self.index, sha[:12],
                 fitted["stats"]["slices"], fitted["stats"]["seconds"])
        return {"sha256": sha, "stats": fitted["stats"]}

    def use_decoder(self, sha: str) -> None:
        """Decode with the run's adapted decoder of SHA-256 ``sha`` (read from the run folder, checked)."""
        if sha != getattr(self.generalist, "decoder_sha256", ""):
            payload = adapt.read_adapted(RunFolder(self.cfg.run_dir).adapted_decoder, expect_sha256=sha)
            self.generalist.use_adapted(payload, sha)

    def relabel(self, case_ids: list[str], round_index: int, version: int, model_args: dict, weights_box: list,
                sources: dict[int, str] | None = None, sha: str = "", decoder_sha: str = "") -> dict:
        """Relabel cases with checkpoint ``version`` (SHA-256 ``sha``), write their masks, return their
        manifest rows.

        ``weights_box`` is ``[ObjectRef of the state dict]``, fetched only when this actor does not hold
        that very checkpoint yet (first call, after Ray restarted it, or a round retrained under the same
        number: the SHA-256 decides, not the number). A case that raises is reported in ``failed``
        ({case_id: cause}) and the others go on: {"rows": [...], "failed": {...}}. ``sources``: the
        round's class sources (``pipeline.class_source``; None: the generalist for every class).
        ``decoder_sha``: the run's adapted decoder (``generalist.adapt``; "": the checkpoint's own).
        """
        if (version, sha) != (self.version, self.sha):
            self.load_specialist(version, model_args, ray.get(weights_box[0]), sha)
        if decoder_sha:
            self.use_decoder(decoder_sha)
        start = time.perf_counter()
        rows: list[dict] = []
        failed: dict[str, str] = {}
        for case_id in case_ids:
            try:
                rows.extend(self._relabel_case(case_id, round_index, sources))
            except StoreError:
                raise  # the store cannot be written (full, gone): not this case's fault; the run stops, resumable
            except Exception as e:  # noqa: BLE001 - one bad case must not take the others with it
                # the driver says it in one line (retried, or given up); the traceback only in the debug log
                log.debug("SAM worker %d: case %s failed", self.index, case_id, exc_info=True)
                failed[case_id] = f"{type(e).__name__}: {e}"[:500]
        return_free_heap()
        self.seconds += time.perf_counter() - start
        return {"rows": rows, "failed": failed}

    def _relabel_case(self, case_id: str, round_index: int, sources: dict[int, str] | None) -> list[dict]:
        image, _ = load_image(self.info, case_id, self.cfg.data.normalization)
        # the oracle control only (unlocked by name, pipeline.oracle): prompts from this case's label
        oracle = np.moveaxis(load_label(self.info, case_id), self.cfg.data.slice_axis, 0) if self.oracle else None

        def run():
            with torch.inference_mode():
                return relabel_case(case_id, image, self.model, self.generalist, self.cache, self.cfg,
                                    self.class_ids, round_index, self.version, self.device, sources, self.sha,
                                    oracle_labels=oracle)

        try:
            out = run()
        except EncoderBackendChanged:  # compiling failed: rebuild the cache under the eager backend's key
            self._cache = None
            out = run()
        self.store.write_case(round_index, case_id, out.pseudo_label, out.specialist, out.scores, {
            "checkpoint_version": self.version,
            "checkpoint_sha256": self.sha,
            "generalist": self.generalist.name,
            "decoder_sha256": getattr(self.generalist, "decoder_sha256", ""),
            "slice_axis": self.cfg.data.slice_axis,
            "volume_shape": list(image.shape),
            "ensemble": self.cfg.prompts.ensemble,
            "prompt_source": self.cfg.prompts.source,
        }, uncertainty=out.uncertainty)
        return out.rows

    def stats(self) -> dict:
        """Counters for tests and benchmarks: cache hits/misses, encoder/decoder calls, time, memory."""
        out = {"worker": self.index, "seconds": self.seconds, **process_info()}
        if self._cache is not None:
            out.update(self._cache.stats())
        out["encoder_calls"] = getattr(self.generalist, "encoder_calls", 0)
        out["decoder_calls"] = getattr(self.generalist, "decoder_calls", 0)
        return out
