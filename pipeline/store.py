"""The pseudo-label store: Zarr v3 masks plus a partitioned Parquet manifest, with its Dask view.

Layout (declared here once; ``STORE_FORMAT`` is bumped on any change)::

    <store>/                               a local path or any fsspec URL (pipeline.storage.Location)
      masks.zarr/                          group attrs: format, class_ids, slice_axis
        round_001/                         group attrs: round, checkpoint_version, generalist
          <case_id>/                       group attrs: case_id, round, checkpoint_version, generalist,
                                           decoder_sha256, slice_axis, volume_shape, prompt_source
                                           (oracle_labels_LEAK: pipeline.oracle), written_at
            pseudo_label   uint8  (S, H, W)   the generalist's label map (0 = background), one chunk
            specialist     uint8  (S, H, W)   the specialist's argmax that prompted it
            scores         float32 (S, K)     generalist score per slice and foreground class (NaN: not prompted)
            uncertainty    float16 (S, H, W)  only with a prompt ensemble (prompts.ensemble > 1): the fraction
                                              of members that disagree with the pseudo-label, 0 = all agree
      manifest/                            a Parquet dataset: one row per (round, case_id, slice)
        part-r001-<ns>-<id>.parquet        immutable parts, each written whole and atomically (fastparquet)

Arrays are slice-first: ``S`` runs along the config's ``data.slice_axis`` of the (X, Y, Z) volume
(``np.moveaxis(volume, slice_axis, 0)``). Each case array is one chunk written whole by exactly one
writer (the SAM actor that relabels that case), so concurrent writers never share a chunk or shard.
(One chunk per slice cost 100-165 ms per case against ~3 ms for one chunk: benchmarks/perf.py.)

Exactly once: SAM actors write a case's arrays; only then does the coordinator (the manifest's one
writer, under the run lock) add the case's rows as a new part. A case is *done* in a round when it has
manifest rows **and** its arrays are present (``case_status``, one listing); a case with rows but no
arrays has its rows removed and is redone, a case with arrays but no rows is simply redone (its arrays
are replaced whole). An append never reads or rewrites earlier parts, so it costs the same at row 10
million as at row 100; only ``remove_cases`` (repair, rare) rewrites the parts that hold those cases.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import fastparquet
import numpy as np
import pandas as pd
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from pipeline.data.case_ids import check_case_id
from pipeline.errors import StoreError
from pipeline.storage import Location, with_retries

log = logging.getLogger(__name__)

STORE_FORMAT = 2
ARRAYS = ("pseudo_label", "specialist", "scores")
CODECS = (ZstdCodec(), Crc32cCodec())
READ_THREADS = 16
"""Cases whose chunks ``damaged_cases`` reads at once (resume and verify): enough to hide a request's latency
on object storage (20 ms x 12 chunks a case), few enough for 2 cores and a server's connection limits."""
"""Every mask chunk is zstd-compressed, then carries a CRC-32C of its bytes: zstd frames have no checksum
by default, and a flipped bit could decode silently to other data (issue 16: 1,083 of 5,704 single-bit
flips of one chunk did). A chunk whose checksum fails raises on read."""

MANIFEST_COLUMNS: dict[str, str] = {
    "round": "int32",
    "case_id": "object",
    "slice": "int32",
    "checkpoint_version": "int32",
    "checkpoint_sha256": "object",  # SHA-256 of that checkpoint ("": written before it was recorded)
    "generalist": "object",
    "decoder_sha256": "object",     # SHA-256 of the adapted decoder file (generalist.adapt); "": the
                                    # generalist checkpoint's own decoder
    "num_prompts": "int32",
    "prompts": "object",            # JSON: [{class_id, points_xy, point_labels, box_xyxy, mask_prompt}]
    "score_mean": "float64",        # mean generalist score over prompted classes (NaN: no prompt)
    "scores": "object",             # JSON: {class_id: score}
    "pseudo_fg_fraction": "float64",
    "specialist_fg_fraction": "float64",
    "agreement_dice": "float64",    # foreground Dice between pseudo-label and specialist (NaN: both empty)
    "embedding_cached": "bool",     # the slice's embedding came from the cache (False: computed now)
    "ensemble": "int32",            # prompt sets decoded for the slice (prompts.ensemble); "prompts" is member 0
    "ensemble_prompts": "object",   # JSON: the prompts of members 1..N-1 ("[]" for one set)
    "uncertain_fraction": "float64",  # share of the slice's pixels where a member disagrees (NaN: one set)
    "fg_uncertainty": "float64",    # mean uncertainty over pixels any member calls foreground (NaN: none / one set)
    "class_source": "object",       # JSON: {class_id: "generalist" | "specialist"}, the round's choice per class
    "trained_in_round": "int32",    # the training round that uses these masks: round, or round + 1 when
                                    # overlapped (workers.overlap: one round stale); parts without it: round
}
OPTIONAL_COLUMNS: dict[str, object] = {"ensemble": 1, "ensemble_prompts": "[]", "uncertain_fraction": float("nan"),
                                       "fg_uncertainty": float("nan"), "class_source": "{}",
                                       "checkpoint_sha256": "", "decoder_sha256": ""}
"""Columns added after format 2 was first written, with the value older parts stand for (one prompt set)."""
DERIVED_COLUMNS: dict[str, str] = {"trained_in_round": "round"}
"""Optional columns whose missing value is another column's (masks used by their own round's training)."""


def round_key(round_index: int) -> str:
    return f"round_{round_index:03d}"


def _part_prefix(round_index: int) -> str:
    return f"part-r{round_index:03d}-"


def _part_round(name: str) -> int | None:
    if not (name.startswith("part-r") and name.endswith(".parquet")):
        return None
    try:
        return int(name[len("part-r"):].split("-", 1)[0])
    except ValueError:
        return None


class PseudoLabelStore:
    """Open (or create) a store at ``root`` (a path, URL or Location). Reading never creates anything."""

    def __init__(self, root: str | os.PathLike | Location, create: bool = False, class_ids: list[int] | None = None,
                 slice_axis: int = 0):
        self.loc = Location.of(root)
        self.root = self.loc  # kept for callers: a Location works like a Path (``/``, os.fspath when local)
        self.masks_loc = self.loc / "masks.zarr"
        self.manifest_loc = self.loc / "manifest"
        if create:
            self.loc.mkdir()
            group = zarr.open_group(store=self.masks_loc.zarr_store(), mode="a")
            if "format" not in group.attrs:
                group.attrs.update({"format": STORE_FORMAT, "class_ids": list(class_ids or []), "slice_axis": slice_axis})
        elif not (self.masks_loc / "zarr.json").is_file():
            raise StoreError(f"{self.loc} is not a pseudo-label store (no masks.zarr/zarr.json inside)")
        self.group = zarr.open_group(store=self.masks_loc.zarr_store(read_only=not create), mode="a" if create else "r")
        fmt = self.group.attrs.get("format")
        if fmt != STORE_FORMAT:
            hint = (" (format 1 kept the manifest in one manifest.parquet; start a new run folder)"
                    if fmt == 1 else "")
            raise StoreError(f"store {self.loc} has format {fmt}, this semisam reads format {STORE_FORMAT}{hint}")

    @property
    def class_ids(self) -> list[int]:
        return list(self.group.attrs["class_ids"])

    @property
    def slice_axis(self) -> int:
        return int(self.group.attrs["slice_axis"])

    def _writable_root(self) -> zarr.Group:
        return zarr.open_group(store=self.masks_loc.zarr_store(), mode="a")

    # -- masks ---------------------------------------------------------------------------------
    def ensure_round(self, round_index: int, checkpoint_version: int, generalist: str) -> None:
        """Create the round's group before actors write into it (called by the coordinator only)."""
        g = self._writable_root().require_group(round_key(round_index))
        g.attrs.update({"round": round_index, "checkpoint_version": checkpoint_version, "generalist": generalist})

    def write_case(self, round_index: int, case_id: str, pseudo_label: np.ndarray, specialist: np.ndarray,
                   scores: np.ndarray, attrs: dict, uncertainty: np.ndarray | None = None) -> None:
        """Write (or replace) one case's arrays of a round. pseudo_label/specialist uint8 (S, H, W), scores (S, K),
        uncertainty float (S, H, W) or None (one prompt set: no array; a stale one is removed).

        Every chunk is written, also an all-background one (``write_empty_chunks``), so a case's presence
        is a listing of its files (``case_status``)."""
        check_case_id(case_id)
        if pseudo_label.shape != specialist.shape or scores.shape[0] != pseudo_label.shape[0]:
            raise ValueError(f"{case_id}: shapes differ: pseudo {pseudo_label.shape}, specialist "
                             f"{specialist.shape}, scores {scores.shape}")
        if uncertainty is not None and uncertainty.shape != pseudo_label.shape:
            raise ValueError(f"{case_id}: uncertainty {uncertainty.shape} differs from pseudo {pseudo_label.shape}")
        where = f"the arrays of case {case_id} in round {round_index} to {self.masks_loc / round_key(round_index)}"
        with_retries(lambda: self._write_case(round_index, case_id, pseudo_label, specialist, scores, attrs,
                                              uncertainty), where, self.loc)

    def _write_case(self, round_index, case_id, pseudo_label, specialist, scores, attrs, uncertainty) -> None:
        root = self._writable_root()
        if round_key(round_index) not in root:
            raise StoreError(f"round {round_index} was not created in {self.loc} (ensure_round first)")
        g = root[round_key(round_index)].require_group(case_id)
        s, h, w = pseudo_label.shape
        full = {"write_empty_chunks": True}
        for name, data in (("pseudo_label", pseudo_label), ("specialist", specialist)):
            a = g.create_array(name, shape=(s, h, w), chunks=(s, h, w), dtype="uint8", fill_value=0,
                               overwrite=True, config=full, compressors=CODECS)
            a[...] = data.astype(np.uint8)
        a = g.create_array("scores", shape=scores.shape, chunks=scores.shape, dtype="float32",
                           fill_value=float("nan"), overwrite=True, config=full, compressors=CODECS)
        a[...] = scores.astype(np.float32)
        if uncertainty is not None:
            a = g.create_array("uncertainty", shape=(s, h, w), chunks=(s, h, w), dtype="float16", fill_value=0,
                               overwrite=True, config=full, compressors=CODECS)
            a[...] = uncertainty.astype(np.float16)
        elif "uncertainty" in g:
            del g["uncertainty"]
        g.attrs.update({**attrs, "case_id": case_id, "round": round_index,
                        "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})

    def _read_arrays(self, round_index: int, case_id: str) -> tuple[dict, dict]:
        """(arrays, attrs) of one case (``case_id`` already checked), every chunk read; KeyError when it is
        absent, another exception
        (a CRC-32C mismatch, a damaged zstd frame, a truncated file) when it is damaged."""
        g = self.group[f"{round_key(round_index)}/{case_id}"]
        out = {name: np.asarray(g[name][...]) for name in ARRAYS}
        try:  # one lookup, not a listing of the group (which opens every member: 7 requests on S3)
            out["uncertainty"] = np.asarray(g["uncertainty"][...], dtype=np.float32)
        except KeyError:
            out["uncertainty"] = None
        return out, dict(g.attrs)

    def read_case(self, round_index: int, case_id: str) -> dict:
        """{"pseudo_label", "specialist": uint8 (S, H, W), "scores": float32 (S, K), "attrs": dict,
        "uncertainty": float32 (S, H, W) or None (no prompt ensemble)}."""
        check_case_id(case_id)  # a bad id is a ConfigError, never a path
        try:
            out, attrs = self._read_arrays(round_index, case_id)
        except KeyError:
            raise StoreError(f"store {self.loc} has no masks for case {case_id} in round {round_index} "
                             f"(missing or deleted; `semisam run` on the run folder redoes it)") from None
        except Exception as e:  # noqa: BLE001 - see _read_arrays
            raise StoreError(f"store {self.loc}: case {case_id} of round {round_index} is damaged: "
                             f"{_what_failed(e)} in {self.masks_loc / round_key(round_index) / case_id}. "
                             "`semisam run` on the run folder relabels it (or delete that folder)") from None
        return {**out, "attrs": attrs}

    def damaged_cases(self, round_index: int, case_ids: list[str]) -> dict[str, str]:
        """{case_id: what is wrong} for the cases whose arrays cannot be read whole: every chunk is read,
        so a flipped bit is found by its CRC-32C (stores written before checksums: by zstd, if at all).
        Cases are read ``READ_THREADS`` at a time: on object storage each chunk is a request whose latency,
        not its bytes, is the cost, so a resume of a large store would otherwise wait for one after another.
        """
        for case_id in case_ids:
            check_case_id(case_id)

        def why(case_id: str) -> str | None:
            try:
                self._read_arrays(round_index, case_id)
            except KeyError:
                return "arrays missing"
            except Exception as e:  # noqa: BLE001 - see _read_arrays
                return _what_failed(e)
            return None

        if len(case_ids) <= 1:
            found = [why(c) for c in case_ids]
        else:
            with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(case_ids))) as pool:
                found = list(pool.map(why, case_ids))
        return {c: w for c, w in zip(case_ids, found, strict=True) if w is not None}

    def rounds(self) -> list[int]:
        """The rounds the store holds (``round_NNN`` groups); a folder that is not one is left out (see
        :meth:`stray_folders`)."""
        return sorted(int(n.split("_")[1]) for n in self.masks_loc.list_names()
                      if re.fullmatch(r"round_\d+", n) and (self.masks_loc / n / "zarr.json").exists())

    def stray_folders(self) -> list[str]:
        """Names under ``masks.zarr`` that are not part of the store (no ``zarr.json``: not a Zarr group),
        e.g. a copied or half-deleted ``round_099``; they are never read."""
        return sorted(n for n in self.masks_loc.list_names()
                      if n != "zarr.json" and not (self.masks_loc / n / "zarr.json").exists())

    def case_status(self, round_index: int) -> dict[str, bool]:
        """{case_id: all its arrays present} for every case folder of the round: one listing, no reads."""
        files = set((self.masks_loc / round_key(round_index)).find())
        cases = {f.split("/", 1)[0] for f in files if "/" in f}
        chunk = {"pseudo_label": "c/0/0/0", "specialist": "c/0/0/0", "scores": "c/0/0"}
        return {c: all(f"{c}/{a}/zarr.json" in files and f"{c}/{a}/{chunk[a]}" in files for a in ARRAYS)
                and f"{c}/zarr.json" in files for c in cases}

    # -- manifest ------------------------------------------------------------------------------
    def parts(self, round_index: int | None = None) -> list[Location]:
        """The manifest's part files (of one round, or all), oldest first."""
        names = [n for n in self.manifest_loc.list_names() if _part_round(n) is not None]
        if round_index is not None:
            names = [n for n in names if n.startswith(_part_prefix(round_index))]
        return [self.manifest_loc / n for n in sorted(names, key=lambda n: n.split("-", 2)[2])]

    def manifest(self, round_index: int | None = None) -> pd.DataFrame:
        """The manifest (of one round, or all) as pandas (empty with the right columns when none).

        Should a crash have left two parts with rows of the same (round, case), the newer part wins."""
        frames = [read_part(p) for p in self.parts(round_index)]
        if not frames:
            return _typed(pd.DataFrame(columns=list(MANIFEST_COLUMNS)))
        for i, f in enumerate(frames):
            f["_part"] = i
        m = pd.concat(frames, ignore_index=True)
        newest = m.groupby(["round", "case_id"])["_part"].transform("max")
        m = m[m["_part"] == newest].drop(columns="_part")
        return _typed(m)

    def completed_cases(self, round_index: int) -> set[str]:
        """Cases with manifest rows in the round (see ``case_status`` for whether their arrays exist)."""
        return set(self.manifest(round_index)["case_id"])

    def append_manifest(self, rows: pd.DataFrame | list[dict], replace: bool = False) -> None:
        """Add rows as one new part (coordinator only). Earlier parts are neither read nor rewritten.

        ``replace``: first remove the rows any earlier part holds for the (round, case_id)s in ``rows``
        (reads the parts of those rounds). Without it the caller guarantees the cases are new.
        """
        if isinstance(rows, list):  # a dict missing a key would otherwise become a silent NaN in the frame
            required = set(MANIFEST_COLUMNS) - set(OPTIONAL_COLUMNS) - set(DERIVED_COLUMNS)
            for i, row in enumerate(rows):
                if not required <= set(row) <= set(MANIFEST_COLUMNS):
                    raise StoreError(f"manifest row {i} ({row.get('case_id')!r}, slice {row.get('slice')}) has "
                                     f"missing columns {sorted(required - set(row))} / "
                                     f"unknown columns {sorted(set(row) - set(MANIFEST_COLUMNS))}")
        new = _typed(pd.DataFrame(rows))
        if new.empty:
            return
        if replace:
            for r, g in new.groupby("round"):
                self.remove_cases(int(r), set(g["case_id"]))
        for r, g in new.groupby("round"):
            self._write_part(int(r), g)

    def remove_cases(self, round_index: int, case_ids: set[str]) -> int:
        """Remove the manifest rows of ``case_ids`` in a round (repair before a redo); returns rows removed.

        A part holding other cases too is deleted *before* the survivors are written again: a crash in
        between loses their rows, never duplicates them, and a case without rows is redone on resume."""
        removed = 0
        for part in self.parts(round_index):
            df = read_part(part)
            hit = df["case_id"].isin(case_ids)
            if not hit.any():
                continue
            part.remove()
            if (~hit).any():
                self._write_part(round_index, df.loc[~hit])
            removed += int(hit.sum())
        return removed

    def _write_part(self, round_index: int, df: pd.DataFrame) -> Location:
        name = f"{_part_prefix(round_index)}{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        fd, tmp = tempfile.mkstemp(suffix=".parquet")
        os.close(fd)
        try:
            fastparquet.write(tmp, _typed(df), stats=False)
            with open(tmp, "rb") as f:
                data = f.read()
        finally:
            os.unlink(tmp)
        part = self.manifest_loc / name
        part.write_bytes(data)
        return part


def _what_failed(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    if "checksum" in str(err).lower() or "crc" in str(err).lower():
        return "a chunk fails its CRC-32C checksum"
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def read_part(part: Location) -> pd.DataFrame:
    path = part.local_copy(".parquet")
    try:
        return fastparquet.ParquetFile(path).to_pandas()
    except Exception as e:  # noqa: BLE001 - truncated/foreign files raise many kinds of errors
        raise StoreError(f"manifest part {part} cannot be read ({type(e).__name__}: {e}); it is damaged: "
                         f"delete it and rerun `semisam run` on the run folder (its cases are relabeled), "
                         f"or run `semisam verify` to list every problem") from None
    finally:
        if path != part.path:
            os.unlink(path)


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    for col, source in DERIVED_COLUMNS.items():  # written before it was recorded, or by a caller that does not
        if col not in df.columns:
            df = df.assign(**{col: df[source]})
    for col, default in OPTIONAL_COLUMNS.items():  # parts written before these columns existed
        if col not in df.columns:
            df = df.assign(**{col: default})
        elif df[col].isna().any():
            df = df.assign(**{col: df[col].where(df[col].notna(), default)})
    missing = set(MANIFEST_COLUMNS) - set(df.columns)
    extra = set(df.columns) - set(MANIFEST_COLUMNS)
    if missing or extra:
        raise StoreError(f"manifest rows have missing columns {sorted(missing)} / unknown columns {sorted(extra)}")
    df = df[list(MANIFEST_COLUMNS)].reset_index(drop=True)
    return df.astype(MANIFEST_COLUMNS)


# -- Dask view ------------------------------------------------------------------------------------
def open_masks(store_root: str | os.PathLike | Location, round_index: int, array: str = "pseudo_label") -> dict:
    """{case_id: dask array (S, H, W)} of one round (``array``: pseudo_label, specialist or scores)."""
    import dask.array as da

    store = PseudoLabelStore(store_root)
    try:
        g = store.group[round_key(round_index)]
    except KeyError:
        raise StoreError(f"store {store.loc} has no round {round_index}; it has {store.rounds()}") from None
    return {case_id: da.from_zarr(g[case_id][array]) for case_id in sorted(g.group_keys())}


def open_manifest(store_root: str | os.PathLike | Location):
    """The manifest (a folder of Parquet parts) as a Dask dataframe, read with pyarrow."""
    import dask.dataframe as dd

    loc = Location.of(store_root) / "manifest"
    if not PseudoLabelStore(store_root).parts():
        raise StoreError(f"store {Location.of(store_root)} has no manifest parts yet")
    return dd.read_parquet(loc.url, storage_options=loc.pandas_options() or None)
