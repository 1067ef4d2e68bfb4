"""File names and list files of the SSL4MIS 2D layout (HiLab-git/SSL4MIS, the ACDC benchmark's layout).

::

    root/data/slices/<case>_slice_<n>.h5   one 2D slice per file: datasets image (H, W), label (H, W)
                                           (some forks keep them flat: root/data/<case>_slice_<n>.h5)
    root/data/<case>.h5                    a whole volume: image (S, H, W), label (S, H, W)
    root/train_slices.list                 one slice name per line (<case>_slice_<n>), training slices
    root/train.list, val.list, test.list   one case per line (a trailing .h5 is ignored); any may be absent

SSL4MIS trains on the slice files and evaluates on the volume files; its labeled set is the first
slices of ``train_slices.list``, i.e. the first cases in list order. Here a case is a volume either way:
a case with a volume file is read from it, a case with slice files only is rebuilt by stacking its slices
in slice-number order along axis 0, so volumes are slice-first (S, H, W) and ``data.slice_axis`` is 0.

Only names are handled here (pure functions, no file is opened); ``pipeline.data.dataset`` reads them.
"""

from __future__ import annotations

import re
from pathlib import Path

SLICES_DIR = Path("data") / "slices"
VOLUMES_DIR = Path("data")
LIST_NAMES = ("train_slices.list", "train.list", "val.list", "test.list")
_SLICE_NAME = re.compile(r"^(?P<case>.+)_slice_(?P<index>\d+)$")


def slice_name_parts(stem: str) -> tuple[str, int] | None:
    """``"patient001_frame01_slice_7"`` -> ``("patient001_frame01", 7)``; None when not a slice name."""
    m = _SLICE_NAME.match(stem)
    return (m["case"], int(m["index"])) if m else None


def slices_folder(root: Path) -> Path | None:
    """Where the slice files are: ``data/slices`` (SSL4MIS), else ``data`` when slice-named files lie flat
    beside the volumes (some forks), else None."""
    for folder in (Path(root) / SLICES_DIR, Path(root) / VOLUMES_DIR):
        if folder.is_dir() and any(slice_name_parts(p.stem) for p in folder.glob("*.h5") if not p.name.startswith(".")):
            return folder
    return None


def find_slice_files(root: Path) -> dict[str, list[tuple[int, Path]]]:
    """Case id -> [(slice number, file)] sorted by slice number, from ``root/data/slices/*.h5``, or from
    ``root/data/*_slice_<n>.h5`` when the slices lie flat beside the volumes (:func:`slices_folder`).

    Files whose name is not ``<case>_slice_<n>.h5`` are left out (the caller reports them), as are
    hidden files.
    """
    folder = slices_folder(root)
    out: dict[str, list[tuple[int, Path]]] = {}
    if folder is None:
        return out
    for path in sorted(folder.glob("*.h5")):
        parts = slice_name_parts(path.stem)
        if path.name.startswith(".") or parts is None:
            continue
        out.setdefault(parts[0], []).append((parts[1], path))
    return {case: sorted(items) for case, items in sorted(out.items())}


def odd_slice_files(root: Path) -> list[Path]:
    """Files in ``root/data/slices`` that are not named ``<case>_slice_<n>.h5``."""
    folder = Path(root) / SLICES_DIR
    if not folder.is_dir():
        return []
    return [p for p in sorted(folder.iterdir())
            if not p.name.startswith(".") and (p.suffix != ".h5" or slice_name_parts(p.stem) is None)]


def find_volume_files(root: Path) -> dict[str, Path]:
    """Case id -> ``root/data/<case>.h5`` (not recursive; hidden files and flat slice files left out)."""
    folder = Path(root) / VOLUMES_DIR
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.h5"))
            if not p.name.startswith(".") and slice_name_parts(p.stem) is None}


def _entry_case(line: str) -> str:
    """A list line -> case id: ``.h5`` dropped, ``_slice_<n>`` dropped."""
    name = line.strip()
    if name.endswith(".h5"):
        name = name[:-3]
    parts = slice_name_parts(name)
    return parts[0] if parts else name


def read_list_files(root: Path) -> dict[str, list[str]]:
    """List name (``train_slices``, ``train``, ``val``, ``test``) -> case ids in first-seen order, for the
    list files that exist. Slice entries give their case; blank lines are skipped; repeats are kept once."""
    out: dict[str, list[str]] = {}
    for name in LIST_NAMES:
        path = Path(root) / name
        if not path.is_file():
            continue
        cases = [_entry_case(line) for line in path.read_text().splitlines() if line.strip()]
        out[name.removesuffix(".list")] = list(dict.fromkeys(cases))
    return out


def split_from_lists(lists: dict[str, list[str]]) -> tuple[list[str], list[str], str]:
    """(test, train_order, where from) of the lists of :func:`read_list_files`.

    train_order: ``train.list``, else the cases of ``train_slices.list`` in their order (SSL4MIS labels the
    first slices of that list). test: ``test.list``, else ``val.list`` (SSL4MIS's validation volumes).
    Raises ValueError when no list gives training cases.
    """
    if "train" in lists:
        train, train_from = lists["train"], "train.list"
    elif "train_slices" in lists:
        train, train_from = lists["train_slices"], "train_slices.list"
    else:
        raise ValueError("no train.list or train_slices.list")
    if "test" in lists:
        test, test_from = lists["test"], "test.list"
    else:
        test, test_from = lists.get("val", []), "val.list" if "val" in lists else "no test list"
    return test, train, f"{train_from} + {test_from}"
