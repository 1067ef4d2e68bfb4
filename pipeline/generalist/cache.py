"""The embedding cache: each slice's image embedding is computed once and reused by every later round and,
with ``generalist.cache_dir``, by every run on the same data with the same generalist.

SAM is frozen, so a slice's embedding depends only on the checkpoint, the preprocessing and the image;
the prompts change, the embedding does not. The cache is content-addressed (as Git or Hugging Face's
cache): an entry is named by the hash of everything that decides its bytes, so a stale one cannot be read.

    <cache_dir>/                       default <run folder>/embeddings.zarr
      <key>/                           Zarr v3 group; attrs: the key's inputs (checkpoint SHA-256, variant,
                                       image size, preprocessing, precision, slice axis, dtype), for humans
        <case_id>/<image>/             float16 (S, C, E, E), one uncompressed chunk per slice;
                                       attrs: image_sha256, image_shape, image_dtype
          done/<s>.<crc32>             empty mark: slice s is written; crc32 (8 hex digits) of its chunk's bytes

``key`` = 32 hex digits of the SHA-256 of the canonical JSON of the key's inputs (for SAM:
``pipeline.generalist.sam.embedding_key_fields``); ``image`` = 32 hex digits of the SHA-256 of the case's
slices (dtype, shape and bytes: the float32 (S, H, W) array the generalist embeds). A changed checkpoint or
preprocessing field is another key, a changed image another folder. The old folder is left in place,
never read (another dataset may use the same case id); deleting the whole cache folder is always safe.

Concurrent writers (two runs, or actors of two runs, filling the same case at once) are safe because
nothing is read-modified-written and nothing is deleted:
- the array's metadata is created with ``overwrite=False``; writers of one (key, image) create identical
  metadata, so two creators racing leave the same file;
- each slice is one whole chunk. zarr's LocalStore writes a chunk to a uniquely named temporary file and
  renames it over the target (``zarr/storage/_local.py``, ``_atomic_write``); FsspecStore writes it with one
  PUT. A reader sees a whole chunk, never half of one. Two writers of a slice write the same embedding, so
  the last one wins harmlessly;
- a slice's mark is its own object, written atomically (``Location.write_bytes``) after its chunk. A
  reader trusts a slice only when it has a mark whose checksum matches the chunk's bytes: a crash between
  chunk and mark, a damaged chunk, or a writer on other hardware whose rounding differs is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zlib
from collections.abc import Callable

import numpy as np
import zarr
from zarr.errors import ContainsArrayError, ContainsGroupError

from pipeline.storage import Location, sha256_hex

log = logging.getLogger(__name__)

NAME_HEX = 32
"""Hex digits of a key's or image's SHA-256 used as a folder name (128 bits: no collisions in practice)."""
_MARK = re.compile(r"^(\d+)\.([0-9a-f]{8})$")


def cache_key(fields: dict) -> str:
    """The cache group's name for an embedding's deciding inputs ``fields`` (a JSON-able dict)."""
    return sha256_hex(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode())[:NAME_HEX]


def image_sha256(slices: np.ndarray) -> str:
    """SHA-256 of an image's dtype, shape and bytes (slices float32 (S, H, W) as embedded)."""
    a = np.ascontiguousarray(slices)
    digest = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    digest.update(a.data)
    return digest.hexdigest()


def _checksum(stored: np.ndarray) -> str:
    """CRC-32 of one stored slice's bytes, 8 hex digits (the mark's name carries it). It guards against
    torn, damaged or foreign chunks, not against an adversary; 4x faster than SHA-256 (0.6 vs 2.5 ms for a
    ViT slice of 2 MiB), and it is paid on every read."""
    return f"{zlib.crc32(np.ascontiguousarray(stored)):08x}"


def _open_or_create_group(store, path: str):
    """``zarr.open_group(mode="a")``, safe when another process creates the same group at the same moment:
    zarr checks that the group is absent, then creates it, and a group made in between raises
    ContainsGroupError; the group then exists, so it is opened (found by the two-process cache test)."""
    try:
        return zarr.open_group(store=store, path=path, mode="a")
    except ContainsGroupError:
        return zarr.open_group(store=store, path=path, mode="r+")


class EmbeddingCache:
    """Embeddings of one key (one generalist with one checkpoint and preprocessing) under ``root``.

    ``key`` names the group (``cache_key(key_fields)``); ``key_fields``, when given, are written as the
    group's attrs so a human can read what the key means.
    """

    def __init__(self, root: str | os.PathLike | Location, key: str, dtype: str = "float16",
                 key_fields: dict | None = None):
        self.root = Location.of(root)
        self.key = key
        self.dtype = np.dtype(dtype)
        self.hits = 0
        self.misses = 0
        self._store = self.root.zarr_store()
        group = _open_or_create_group(self._store, key)
        if key_fields is not None and group.attrs.asdict() != key_fields:
            # every writer of this key writes the same fields, so a race leaves the same attrs
            group.attrs.update(key_fields)

    def stats(self) -> dict[str, int]:
        return {"cache_hits": self.hits, "cache_misses": self.misses}

    def get(self, case_id: str, slices: np.ndarray, wanted: list[int],
            embed: Callable[[np.ndarray], np.ndarray]) -> tuple[dict[int, np.ndarray], set[int]]:
        """Embeddings of ``slices[wanted]`` (slices float32 (S, H, W)), computing only the missing ones.

        Returns ({slice index: float32 (C, E, E)}, the indices that came from the cache). Only slices
        stored for this very image (same hash) and marked with a matching checksum are read; an image
        that differs from the one cached under ``case_id`` is logged and embedded anew. Any entry that
        cannot be read (truncated chunk, missing or foreign metadata, wrong shape or dtype, bad checksum)
        is a miss: one warning names the file, the slice is recomputed and rewritten. A fresh embedding
        is returned as the cache stores it (rounded to ``dtype``), so the numbers are the same whether a
        slice came from the cache or not: a rerun is bit-identical whatever the cache held.
        """
        if not wanted:
            return {}, set()
        digest = image_sha256(slices)
        path = f"{self.key}/{case_id}/{digest[:NAME_HEX]}"
        marks = self._marks(path)
        arr = self._open(path, slices.shape[0]) if marks else None
        out = self._read_marked(arr, path, marks, wanted) if arr is not None else {}
        present = set(out)
        missing = [s for s in wanted if s not in present]
        if missing:
            if not marks:
                self._warn_if_image_changed(case_id, digest)
            new = embed(slices[missing])
            if arr is None or arr.shape[1:] != new.shape[1:]:
                arr = self._create(path, slices, digest, new.shape[1:], replace=bool(marks))
            for s, e in zip(missing, new, strict=True):
                stored = e.astype(self.dtype)
                arr[s] = stored  # one whole chunk, written atomically by the store
                (self.root / path / "done" / f"{s}.{_checksum(stored)}").write_bytes(b"")  # after the chunk
                out[s] = stored.astype(np.float32)  # as a later read of the cache gives it back
        self.misses += len(missing)
        self.hits += len(present)
        return out, present

    def _open(self, path: str, num_slices: int) -> zarr.Array | None:
        """The image's array when its metadata reads and fits (``num_slices`` slices, the cache's dtype);
        else None, warned once naming the folder (its slices are then recomputed and the array rewritten)."""
        try:
            arr = zarr.open_array(store=self._store, path=path, mode="r+")
        except Exception as e:  # noqa: BLE001 - missing or damaged metadata: any failure is a miss
            why = f"its metadata cannot be read ({type(e).__name__}: {str(e)[:120]})"
        else:
            if arr.shape[0] == num_slices and arr.dtype == self.dtype and len(arr.shape) == 4:
                return arr
            why = f"it holds shape {arr.shape} {arr.dtype}, not ({num_slices}, C, E, E) {self.dtype}"
        log.warning("embedding cache: %s is unusable: %s; its slices are recomputed and rewritten",
                    self.root / path, why)
        return None

    def _read_marked(self, arr: zarr.Array, path: str, marks: dict[int, set[str]],
                     wanted: list[int]) -> dict[int, np.ndarray]:
        """{slice: float32 embedding} of the ``wanted`` slices that are marked, read whole and match their
        mark's checksum; the others are left out (recomputed). One warning names the damaged chunks."""
        out: dict[int, np.ndarray] = {}
        bad: list[str] = []
        for s in (s for s in wanted if s in marks):
            try:
                stored = np.asarray(arr[s])  # one chunk (4x faster than arr.oindex[list] for a ViT slice)
            except Exception as e:  # noqa: BLE001 - a truncated or foreign chunk: a miss, like a bad checksum
                bad.append(f"slice {s} ({type(e).__name__})")
                continue
            if _checksum(stored) in marks[s]:
                out[s] = stored.astype(np.float32)
            else:
                bad.append(f"slice {s} (checksum)")
        if bad:
            log.warning("embedding cache: %s: %s cannot be used (an interrupted or damaged write): "
                        "recomputing and rewriting them", self.root / path, ", ".join(bad))
        return out

    def _marks(self, path: str) -> dict[int, set[str]]:
        """{slice: checksums of its marks} of one image's array (one listing; temporary files ignored)."""
        marks: dict[int, set[str]] = {}
        for name in (self.root / path / "done").list_names():
            m = _MARK.match(name)
            if m:
                marks.setdefault(int(m.group(1)), set()).add(m.group(2))
        return marks

    def _create(self, path: str, slices: np.ndarray, digest: str, embedding_shape: tuple[int, ...],
                replace: bool = False) -> zarr.Array:
        """The image's array, created if absent (never overwritten: another writer may be filling it), unless
        ``replace``: the one there was found unusable, so it is written anew (its old marks go with it)."""
        shape = (slices.shape[0], *embedding_shape)
        try:
            arr = zarr.create_array(
                store=self._store, name=path, shape=shape, chunks=(1, *embedding_shape), dtype=self.dtype,
                compressors=None, fill_value=0, overwrite=replace,
                attributes={"image_sha256": digest, "image_shape": list(slices.shape),
                            "image_dtype": str(slices.dtype)},
            )
        except ContainsArrayError:
            arr = zarr.open_array(store=self._store, path=path, mode="r+")
        if arr.shape != shape or arr.dtype != self.dtype:  # an unmarked foreign array: not ours to keep
            return self._create(path, slices, digest, embedding_shape, replace=True)
        return arr

    def _warn_if_image_changed(self, case_id: str, digest: str) -> None:
        others = [n for n in (self.root / self.key / case_id).list_names()
                  if n != digest[:NAME_HEX] and len(n) == NAME_HEX]
        if others:
            log.warning("embedding cache: case %s's image differs from the one cached for it (image sha256 %s, "
                        "cached %s): embedding it anew, the old entry is not used",
                        case_id, digest[:12], ", ".join(n[:12] for n in others))
