"""The embedding cache: each slice's image embedding is computed once and reused in every later round.

SAM is frozen, so a slice's embedding never changes; only the prompts do. Embeddings live on disk in a
Zarr v3 group in the run folder (so they survive restarts and are shared by all SAM actors):

    embeddings.zarr/<generalist name>/<case_id>   float16 (S, C, E, E), one chunk per slice, no compression
                                                  attrs: {"done": [slice indices written]}

One case is handled by one actor at a time (the coordinator hands out whole cases), so each array has
one writer; every slice is its own chunk, so filling in further slices later never rewrites others.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import numpy as np
import zarr

from pipeline.storage import Location

log = logging.getLogger(__name__)


class EmbeddingCache:
    def __init__(self, root: str | os.PathLike | Location, generalist_name: str, dtype: str = "float16"):
        self.root = Location.of(root)
        self.group_path = f"{generalist_name}"
        self.dtype = np.dtype(dtype)
        self.hits = 0
        self.misses = 0
        self._group = zarr.open_group(store=self.root.zarr_store(), mode="a").require_group(self.group_path)

    def stats(self) -> dict[str, int]:
        return {"cache_hits": self.hits, "cache_misses": self.misses}

    def get(self, case_id: str, slices: np.ndarray, wanted: list[int],
            embed: Callable[[np.ndarray], np.ndarray]) -> tuple[dict[int, np.ndarray], set[int]]:
        """Embeddings of ``slices[wanted]`` (slices float32 (S, H, W)), computing only the missing ones.

        Returns ({slice index: float32 (C, E, E)}, the indices that came from the cache). A cached array whose slice count differs from ``S``
        (the image changed) is discarded and recomputed.
        """
        if not wanted:
            return {}, set()
        arr = self._group.get(case_id)
        done: set[int] = set()
        if arr is not None:
            if arr.shape[0] != slices.shape[0]:
                log.warning("embedding cache for %s has %d slices, image has %d: recomputing",
                            case_id, arr.shape[0], slices.shape[0])
                arr = None
            else:
                done = set(arr.attrs.get("done", []))
        missing = [s for s in wanted if s not in done]
        present = [s for s in wanted if s in done]
        out: dict[int, np.ndarray] = {}
        if missing:
            new = embed(slices[missing])
            if arr is None:
                arr = self._group.create_array(
                    case_id, shape=(slices.shape[0], *new.shape[1:]), chunks=(1, *new.shape[1:]),
                    dtype=self.dtype, compressors=None, fill_value=0, overwrite=True,
                )
            for s, e in zip(missing, new, strict=True):
                arr[s] = e.astype(self.dtype)
                out[s] = e.astype(np.float32)
            arr.attrs["done"] = sorted(done | set(missing))  # after the data: a crash leaves slices unmarked
        for s in present:
            out[s] = np.asarray(arr[s], dtype=np.float32)
        self.misses += len(missing)
        self.hits += len(present)
        return out, set(present)
