"""The pseudo-label store: Zarr v3 masks plus a Parquet manifest, with its Dask view.

Layout (declared here once; ``STORE_FORMAT`` is bumped on any change)::

    <store>/
      masks.zarr/                          group attrs: format, class_ids, slice_axis
        round_001/                         group attrs: round, checkpoint_version, generalist
          <case_id>/                       group attrs: case_id, round, checkpoint_version, generalist,
                                           slice_axis, volume_shape, written_at
            pseudo_label   uint8  (S, H, W)   the generalist's label map (0 = background), one chunk
            specialist     uint8  (S, H, W)   the specialist's argmax that prompted it
            scores         float32 (S, K)     generalist score per slice and foreground class (NaN: not prompted)
      manifest.parquet                     one row per (round, case_id, slice); see MANIFEST_COLUMNS

Arrays are slice-first: ``S`` runs along the config's ``data.slice_axis`` of the (X, Y, Z) volume
(``np.moveaxis(volume, slice_axis, 0)``). Each case array is one chunk written whole by exactly one
writer (the SAM actor that relabels that case), so concurrent writers never share a chunk or shard.
(One chunk per slice cost 100-165 ms per case against ~3 ms for one chunk: benchmarks/perf.py.)

Writers: SAM actors write case arrays; only the coordinator writes the manifest (appending with
fastparquet to a copy that replaces the file atomically). A case counts as done in a round when the
manifest has its rows; rewriting a (round, case) replaces both its arrays and its rows (idempotent).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
import tempfile
from pathlib import Path

import fastparquet
import numpy as np
import pandas as pd
import zarr

from pipeline.data.case_ids import check_case_id
from pipeline.errors import StoreError

log = logging.getLogger(__name__)

STORE_FORMAT = 1

MANIFEST_COLUMNS: dict[str, str] = {
    "round": "int32",
    "case_id": "object",
    "slice": "int32",
    "checkpoint_version": "int32",
    "generalist": "object",
    "num_prompts": "int32",
    "prompts": "object",            # JSON: [{class_id, points_xy, point_labels, box_xyxy, mask_prompt}]
    "score_mean": "float64",        # mean generalist score over prompted classes (NaN: no prompt)
    "scores": "object",             # JSON: {class_id: score}
    "pseudo_fg_fraction": "float64",
    "specialist_fg_fraction": "float64",
    "agreement_dice": "float64",    # foreground Dice between pseudo-label and specialist (NaN: both empty)
    "embedding_cached": "bool",     # the slice's embedding came from the cache (False: computed now)
}


def round_key(round_index: int) -> str:
    return f"round_{round_index:03d}"


class PseudoLabelStore:
    """Open (or create) a store at ``root``. Reading never creates anything."""

    def __init__(self, root: Path, create: bool = False, class_ids: list[int] | None = None, slice_axis: int = 0):
        self.root = Path(root)
        self.masks_path = self.root / "masks.zarr"
        self.manifest_path = self.root / "manifest.parquet"
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
            group = zarr.open_group(self.masks_path, mode="a")
            if "format" not in group.attrs:
                group.attrs.update({"format": STORE_FORMAT, "class_ids": list(class_ids or []), "slice_axis": slice_axis})
        elif not (self.masks_path / "zarr.json").is_file():
            raise StoreError(f"{self.root} is not a pseudo-label store (no masks.zarr/zarr.json inside)")
        self.group = zarr.open_group(self.masks_path, mode="a" if create else "r")
        fmt = self.group.attrs.get("format")
        if fmt != STORE_FORMAT:
            raise StoreError(f"store {self.root} has format {fmt}, this semisam reads format {STORE_FORMAT}")

    @property
    def class_ids(self) -> list[int]:
        return list(self.group.attrs["class_ids"])

    @property
    def slice_axis(self) -> int:
        return int(self.group.attrs["slice_axis"])

    # -- masks ---------------------------------------------------------------------------------
    def ensure_round(self, round_index: int, checkpoint_version: int, generalist: str) -> None:
        """Create the round's group before actors write into it (called by the coordinator only)."""
        g = zarr.open_group(self.masks_path, mode="a").require_group(round_key(round_index))
        g.attrs.update({"round": round_index, "checkpoint_version": checkpoint_version, "generalist": generalist})

    def write_case(self, round_index: int, case_id: str, pseudo_label: np.ndarray, specialist: np.ndarray,
                   scores: np.ndarray, attrs: dict) -> None:
        """Write (or replace) one case's arrays of a round. pseudo_label/specialist uint8 (S, H, W), scores (S, K)."""
        check_case_id(case_id)
        if pseudo_label.shape != specialist.shape or scores.shape[0] != pseudo_label.shape[0]:
            raise ValueError(f"{case_id}: shapes differ: pseudo {pseudo_label.shape}, specialist "
                             f"{specialist.shape}, scores {scores.shape}")
        root = zarr.open_group(self.masks_path, mode="a")
        if round_key(round_index) not in root:
            raise StoreError(f"round {round_index} was not created in {self.root} (ensure_round first)")
        g = root[round_key(round_index)].require_group(case_id)
        s, h, w = pseudo_label.shape
        for name, data in (("pseudo_label", pseudo_label), ("specialist", specialist)):
            a = g.create_array(name, shape=(s, h, w), chunks=(s, h, w), dtype="uint8", fill_value=0, overwrite=True)
            a[...] = data.astype(np.uint8)
        a = g.create_array("scores", shape=scores.shape, chunks=scores.shape, dtype="float32",
                           fill_value=float("nan"), overwrite=True)
        a[...] = scores.astype(np.float32)
        g.attrs.update({**attrs, "case_id": case_id, "round": round_index,
                        "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})

    def read_case(self, round_index: int, case_id: str) -> dict:
        """{"pseudo_label", "specialist": uint8 (S, H, W), "scores": float32 (S, K), "attrs": dict}."""
        key = f"{round_key(round_index)}/{check_case_id(case_id)}"
        try:
            g = self.group[key]
        except KeyError:
            raise StoreError(f"store {self.root} has no masks for case {case_id} in round {round_index}") from None
        return {
            "pseudo_label": np.asarray(g["pseudo_label"][...]),
            "specialist": np.asarray(g["specialist"][...]),
            "scores": np.asarray(g["scores"][...]),
            "attrs": dict(g.attrs),
        }

    def rounds(self) -> list[int]:
        return sorted(int(k.split("_")[1]) for k in self.group.group_keys() if k.startswith("round_"))

    # -- manifest ------------------------------------------------------------------------------
    def manifest(self) -> pd.DataFrame:
        """The whole manifest as pandas (empty with the right columns when none was written)."""
        if not self.manifest_path.exists():
            return _typed(pd.DataFrame(columns=list(MANIFEST_COLUMNS)))
        return fastparquet.ParquetFile(str(self.manifest_path)).to_pandas()

    def completed_cases(self, round_index: int) -> set[str]:
        m = self.manifest()
        return set(m.loc[m["round"] == round_index, "case_id"])

    def append_manifest(self, rows: pd.DataFrame | list[dict]) -> None:
        """Add rows (coordinator only). Rows of a (round, case_id) already present are replaced.

        The new file is written beside the old one and renamed over it, so a crash leaves the old manifest.
        """
        if isinstance(rows, list):  # a dict missing a key would otherwise become a silent NaN in the frame
            for i, row in enumerate(rows):
                if set(row) != set(MANIFEST_COLUMNS):
                    raise StoreError(f"manifest row {i} ({row.get('case_id')!r}, slice {row.get('slice')}) has "
                                     f"missing columns {sorted(set(MANIFEST_COLUMNS) - set(row))} / "
                                     f"unknown columns {sorted(set(row) - set(MANIFEST_COLUMNS))}")
        new = _typed(pd.DataFrame(rows))
        if new.empty:
            return
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".manifest.", suffix=".parquet")
        os.close(fd)
        os.unlink(tmp)
        try:
            if self.manifest_path.exists():
                old = self.manifest()
                keys = set(zip(new["round"], new["case_id"], strict=True))
                stale = [k in keys for k in zip(old["round"], old["case_id"], strict=True)]
                if any(stale):
                    kept = old.loc[~np.asarray(stale)]
                    fastparquet.write(tmp, _typed(pd.concat([kept, new], ignore_index=True)), stats=False)
                else:
                    shutil.copyfile(self.manifest_path, tmp)
                    fastparquet.write(tmp, new, append=True, stats=False)
            else:
                fastparquet.write(tmp, new, stats=False)
            os.replace(tmp, self.manifest_path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    missing = set(MANIFEST_COLUMNS) - set(df.columns)
    extra = set(df.columns) - set(MANIFEST_COLUMNS)
    if missing or extra:
        raise StoreError(f"manifest rows have missing columns {sorted(missing)} / unknown columns {sorted(extra)}")
    df = df[list(MANIFEST_COLUMNS)].reset_index(drop=True)
    return df.astype(MANIFEST_COLUMNS)


# -- Dask view ------------------------------------------------------------------------------------
def open_masks(store_root: Path, round_index: int, array: str = "pseudo_label") -> dict:
    """{case_id: dask array (S, H, W)} of one round (``array``: pseudo_label, specialist or scores)."""
    import dask.array as da

    store = PseudoLabelStore(store_root)
    try:
        g = store.group[round_key(round_index)]
    except KeyError:
        raise StoreError(f"store {store_root} has no round {round_index}; it has {store.rounds()}") from None
    return {case_id: da.from_zarr(g[case_id][array]) for case_id in sorted(g.group_keys())}


def open_manifest(store_root: Path):
    """The manifest as a Dask dataframe (read with pyarrow; the file is written by fastparquet)."""
    import dask.dataframe as dd

    path = Path(store_root) / "manifest.parquet"
    if not path.exists():
        raise StoreError(f"store {store_root} has no manifest.parquet yet")
    return dd.read_parquet(str(path))
