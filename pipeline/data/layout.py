"""Which layout a dataset folder is in, told from its file names alone (no file is opened).

``data.format: auto`` (the default) and ``semisam validate`` without ``--format`` use this:

- ``msd``: ``imagesTr/`` exists (MSD / nnU-Net v2; ``dataset.json`` holds the labels);
- ``ssl4mis``: ``data/slices/*_slice_<n>.h5`` (or ``data/*_slice_<n>.h5``, flat) exist, or ``data/*.h5`` with a ``train.list`` /
  ``train_slices.list`` / ``val.list`` / ``test.list`` beside ``data/`` (see ``pipeline.data.ssl4mis``);
- ``h5``: any other folder holding ``.h5`` files (UA-MT style, one case per file, ``<case>.h5`` or
  ``<case>/mri_norm2.h5``); list files at the root (UA-MT's ``train.list``, ``test.list``) give the split.

The checks run in that order: an SSL4MIS folder also holds .h5 files, so it is looked for before ``h5``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.data import ssl4mis
from pipeline.errors import DatasetError

_NIFTI_ENDINGS = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Layout:
    """A detected layout: ``format`` (``msd``, ``h5`` or ``ssl4mis``) and what was seen, in words."""

    format: str
    found: str


def _visible(paths) -> list[Path]:
    return [p for p in paths if not p.name.startswith(".")]


def _h5_files(root: Path) -> list[Path]:
    return [p for p in sorted(root.rglob("*.h5"))
            if not any(part.startswith(".") for part in p.relative_to(root).parts)]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def describe_folder(root: Path) -> str:
    """What a folder holds that tells layouts apart, for error messages: ``"dataset.json, no imagesTr/,
    12 .h5 files (3 in data/slices), lists train.list"``."""
    root = Path(root)
    if not root.is_dir():
        return "the folder does not exist"
    parts = ["dataset.json" if (root / "dataset.json").is_file() else "no dataset.json"]
    images = root / "imagesTr"
    if images.is_dir():
        n = sum(1 for p in _visible(images.iterdir()) if p.name.endswith(_NIFTI_ENDINGS))
        parts.append(f"imagesTr/ with {_plural(n, 'NIfTI file')}")
    else:
        parts.append("no imagesTr/")
    h5 = _h5_files(root)
    in_slices = sum(1 for p in h5 if p.parent == root / ssl4mis.SLICES_DIR)
    flat = sum(1 for p in h5 if p.parent == root / ssl4mis.VOLUMES_DIR and ssl4mis.slice_name_parts(p.stem))
    where = [f"{in_slices} in data/slices"] if in_slices else []
    where += [f"{flat} slice files flat in data/"] if flat else []
    parts.append(f"{_plural(len(h5), '.h5 file')}" + (f" ({', '.join(where)})" if where else ""))
    lists = [name for name in ssl4mis.LIST_NAMES if (root / name).is_file()]
    parts.append(f"lists {', '.join(lists)}" if lists else "no .list files")
    return ", ".join(parts)


def detect_layout(root: Path) -> Layout:
    """The layout of ``root`` from its file names; DatasetError saying what was found when none fits."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder does not exist")
    images = root / "imagesTr"
    if images.is_dir():
        n = sum(1 for p in _visible(images.iterdir()) if p.name.endswith(_NIFTI_ENDINGS))
        return Layout("msd", f"MSD/nnU-Net layout: imagesTr/ with {_plural(n, 'NIfTI image')}")
    slices = ssl4mis.find_slice_files(root)
    volumes = ssl4mis.find_volume_files(root)
    lists = [name for name in ssl4mis.LIST_NAMES if (root / name).is_file()]
    if slices or (volumes and lists):
        n_slices = sum(len(v) for v in slices.values())
        folder = ssl4mis.slices_folder(root)
        where = "flat in data/ beside the volumes" if folder == root / ssl4mis.VOLUMES_DIR else "in data/slices"
        return Layout("ssl4mis", f"SSL4MIS 2D layout: {_plural(n_slices, 'slice file')} of "
                                 f"{_plural(len(slices), 'case')} {where}, "
                                 f"{_plural(len(volumes), 'volume file')} in data/, "
                                 f"lists {', '.join(lists) if lists else '(none)'}")
    h5 = _h5_files(root)
    if h5:
        return Layout("h5", f"h5 layout: {_plural(len(h5), '.h5 file')} (one case each)"
                            + (f", lists {', '.join(lists)}" if lists else ""))
    raise DatasetError(f"{root}: not a dataset folder in any known layout (MSD: imagesTr/ + dataset.json; "
                       f"h5: *.h5 files; SSL4MIS: data/slices/<case>_slice_<n>.h5, data/<case>.h5, *.list); "
                       f"found {describe_folder(root)}")
