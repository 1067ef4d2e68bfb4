"""Which cases are labeled, unlabeled and test in a run.

From a split file (JSON ``{"test": [...], "train_order": [...]}``, optionally ``"val": [...]``; the
first ``num_labeled`` of ``train_order`` are labeled, the rest unlabeled), from explicit
``data.labeled/unlabeled/test``, or, with neither, from the list files of an SSL4MIS folder (``train.list``
or ``train_slices.list`` as ``train_order``, ``test.list`` or else ``val.list`` as ``test``; see
``pipeline.data.ssl4mis``). Only file listings are used here: no label file is opened.

The validation split (:func:`resolve_val`): labeled cases that nothing trains on; every round is
evaluated on them and the best round is the one with the highest validation Dice (test labels never
choose anything). From the split file's ``val``, else an SSL4MIS folder's ``val.list`` (when ``test.list``
gives the test split; otherwise ``val.list`` *is* the test split), else the last ``data.num_val`` cases of
the unlabeled pool that have labels; none when there is no source or the pool is too small (logged).
The same cases are the default selection cases of ``generalist.class_source: auto``
(:func:`resolve_selection`): neither use trains on them, so one held-out set serves both.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import DataConfig
from pipeline.data.case_ids import check_case_id
from pipeline.data.dataset import DatasetInfo
from pipeline.data.ssl4mis import split_from_lists
from pipeline.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    """Case ids of the three disjoint parts of a run, in their configured order."""

    labeled: list[str]
    unlabeled: list[str]
    test: list[str]
    selection: list[str] = field(default_factory=list)
    """Held-out labeled cases for ``generalist.class_source: auto`` (set by the coordinator's preflight,
    :func:`resolve_selection`; empty otherwise). Not part of :attr:`all_cases`."""
    val: list[str] = field(default_factory=list)
    """Validation cases (:func:`resolve_val`): labeled, never trained on; they choose the best round.
    Not part of :attr:`all_cases`. Empty when the run has no validation split."""
    val_source: str = field(default="", compare=False)
    """Where :attr:`val` came from, for messages ("" when there is none); not compared."""

    @property
    def all_cases(self) -> list[str]:
        """labeled + unlabeled + test, in that order."""
        return [*self.labeled, *self.unlabeled, *self.test]


def _read_split_file(path: Path) -> tuple[list[str], list[str], list[str] | None]:
    """(test, train_order, val or None) of a split file; ConfigError naming the file and key when malformed."""
    if not path.is_file():
        raise ConfigError(f"split file {path} does not exist")
    try:
        tree = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"split file {path} is not valid JSON: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"split file {path} must hold a JSON object with 'test' and 'train_order'")
    parts = []
    for key in ("test", "train_order"):
        value = tree.get(key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"split file {path}: {key!r} must be a list of case id strings")
        parts.append(value)
    val = tree.get("val")
    if val is not None and (not isinstance(val, list) or not all(isinstance(v, str) for v in val)):
        raise ConfigError(f"split file {path}: 'val' must be a list of case id strings (validation cases)")
    return parts[0], parts[1], val


def _suggest(case_id: str, known: list[str]) -> str:
    near = difflib.get_close_matches(case_id, known, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""


def _check(parts: dict[str, list[str]], info: DatasetInfo, source: str, problems: list[str]) -> None:
    """Append a message per bad id, repeated id, unknown id and labeled/test case without label."""
    known = list(info.cases)
    seen: dict[str, str] = {}
    for part, ids in parts.items():
        for case_id in ids:
            try:
                check_case_id(case_id)
            except ConfigError as e:
                problems.append(f"{source} ({part}): {e}")
                continue
            if case_id in seen:
                where = "twice in" if seen[case_id] == part else f"in both {seen[case_id]} and"
                problems.append(f"{source}: case {case_id!r} appears {where} {part}")
                continue
            seen[case_id] = part
            files = info.cases.get(case_id)
            if files is None:
                problems.append(f"{source} ({part}): case {case_id!r} is not in the dataset {info.root}"
                                f"{_suggest(case_id, known)}")
            elif part in ("labeled", "test", "selection", "val") and files.label is None:
                problems.append(f"{source} ({part}): case {case_id!r} has no label file "
                                f"(its image is {files.image})")


def patients_of(cases: list[str], pattern: str) -> list[str]:
    """The patient of each case (``pattern``'s ``patient`` group; the case itself when it does not match)."""
    rx = re.compile(pattern)
    return [m["patient"] if (m := rx.match(c)) else c for c in cases]


def first_patients(train_order: list[str], n: int, pattern: str) -> int | None:
    """How many leading cases of ``train_order`` belong to its first ``n`` patients (None: fewer patients).
    A patient's cases must be consecutive in ``train_order`` (as in SSL4MIS's lists); ConfigError if not."""
    patients = patients_of(train_order, pattern)
    seen: list[str] = []
    for i, p in enumerate(patients):
        if seen and p == seen[-1]:
            continue
        if p in seen:
            raise ConfigError(f"data.num_labeled_patients: the cases of patient {p!r} are not consecutive in "
                              "train_order; order them by patient, or give data.num_labeled")
        if len(seen) == n:
            return i
        seen.append(p)
    return len(train_order) if len(seen) == n else None


def _split_from_list_files(info: DatasetInfo) -> tuple[str, list[str], list[str]]:
    """(source, test, train_order) from the dataset's SSL4MIS list files; ConfigError when it has none."""
    try:
        test, train_order, lists = split_from_lists(info.split_lists)
    except ValueError as e:
        raise ConfigError(f"no data.split_file or data.labeled given, and the dataset {info.root} "
                          f"({info.format}) has no list files to split by ({e})") from None
    return f"list files {lists} of {info.root}", test, train_order


def resolve_split(cfg: DataConfig, info: DatasetInfo) -> Split:
    """The run's split, checked against the dataset; ConfigError listing every problem.

    Explicit ``cfg.labeled`` takes precedence over ``cfg.split_file``; with explicit lists, a missing
    ``unlabeled`` means every dataset case not labeled or test, and a missing ``test`` means none. With
    neither, the dataset's list files (SSL4MIS) give ``train_order`` and ``test``.
    ``cfg.max_unlabeled`` / ``cfg.max_test`` / ``cfg.max_val`` keep the first N after all checks (cases that
    ``max_val`` drops are not returned to the unlabeled pool).
    """
    problems: list[str] = []
    file_val: list[str] | None = None
    if cfg.labeled is not None:
        if cfg.split_file is not None:
            logger.warning("data.labeled is given: ignoring data.split_file %s", cfg.split_file)
        source = "data.labeled/unlabeled/test"
        labeled, test = list(cfg.labeled), list(cfg.test or [])
        if cfg.unlabeled is not None:
            unlabeled = list(cfg.unlabeled)
        else:
            taken = set(labeled) | set(test)
            unlabeled = [c for c in info.cases if c not in taken]
        if not labeled:
            problems.append(f"{source}: data.labeled is empty; a run needs at least one labeled case")
    else:
        if cfg.num_labeled is None and cfg.num_labeled_patients is None:
            raise ConfigError("give data.split_file with data.num_labeled, or data.labeled/unlabeled/test")
        if cfg.split_file is not None:
            source = f"split file {cfg.split_file}"
            test, train_order, file_val = _read_split_file(Path(cfg.split_file))
        else:
            source, test, train_order = _split_from_list_files(info)
        k = cfg.num_labeled
        if cfg.num_labeled_patients is not None:
            k = first_patients(train_order, cfg.num_labeled_patients, cfg.patient_pattern)
            if k is None:
                problems.append(f"{source}: num_labeled_patients={cfg.num_labeled_patients} but train_order has "
                                f"only {len(set(patients_of(train_order, cfg.patient_pattern)))} patients")
                k = len(train_order)
            else:
                logger.info("%d labeled patients = the first %d cases of train_order (%s)",
                            cfg.num_labeled_patients, k, ", ".join(train_order[:k]))
        elif k > len(train_order):
            problems.append(f"{source}: num_labeled={cfg.num_labeled} but train_order has only "
                            f"{len(train_order)} cases")
        labeled, unlabeled = train_order[:k], train_order[k:]
    held_out = _held_out_selection(cfg, unlabeled)
    unlabeled = [c for c in unlabeled if c not in held_out]
    val, val_source = resolve_val(cfg, info, file_val, source, test, unlabeled)
    unlabeled = [c for c in unlabeled if c not in set(val)]
    _check({"labeled": labeled, "unlabeled": unlabeled, "test": test, "val": val}, info, source, problems)
    if problems:
        read_as = f"\n  (the dataset {info.root} was read as the {info.layout})" if info.layout else ""
        raise ConfigError(f"bad split ({len(problems)} problem{'s' if len(problems) != 1 else ''}):\n  "
                          + "\n  ".join(problems) + read_as)
    unlabeled, test, val = _first_n(cfg, unlabeled, test, val)
    held = f" ({len(held_out)} data.selection cases held out of the unlabeled pool)" if held_out else ""
    logger.info("split from %s: %d labeled, %d unlabeled%s, %d validation, %d test", source, len(labeled),
                len(unlabeled), held, len(val), len(test))
    return Split(labeled=labeled, unlabeled=unlabeled, test=test, val=val, val_source=val_source)


def _first_n(cfg: DataConfig, unlabeled: list[str], test: list[str], val: list[str]) -> tuple[list[str], ...]:
    """``data.max_unlabeled`` / ``max_test`` / ``max_val``: the first N of each part."""
    if cfg.max_val is not None and len(val) > cfg.max_val:
        logger.info("data.max_val=%d: validating on the first %d of the %d validation cases", cfg.max_val,
                    cfg.max_val, len(val))
    cut = [(unlabeled, cfg.max_unlabeled), (test, cfg.max_test), (val, cfg.max_val)]
    return tuple(part if n is None else part[:n] for part, n in cut)


def resolve_val(cfg: DataConfig, info: DatasetInfo, file_val: list[str] | None, source: str, test: list[str],
                unlabeled: list[str]) -> tuple[list[str], str]:
    """(validation case ids, where from) of a run; ``([], "")`` when it has none (said in the log).

    The split file's ``val`` (``file_val``), else an SSL4MIS folder's ``val.list`` when the test split
    comes from ``test.list`` (the split is not read from a split file or explicit lists), else the last
    ``data.num_val`` cases of the unlabeled pool ``unlabeled`` that have a label file (the caller removes
    them from the pool); with fewer such cases, or a pool that would keep fewer than ``data.num_val``
    unlabeled cases, none. Labels are not opened here; ``_check`` and ``validate_cases`` check them."""
    if file_val is not None:
        return list(file_val), f"'val' of {source}"
    lists = info.split_lists
    if cfg.labeled is None and cfg.split_file is None and lists.get("val"):
        if "test" in lists:
            return list(lists["val"]), f"val.list of {info.root}"
        logger.info("no validation split: val.list of %s is the test split here (there is no test.list); the "
                    "best round is the last", info.root)
        return [], ""
    if not cfg.num_val:
        logger.info("no validation split (no 'val' in the split file, no val.list, data.num_val is 0): the best "
                    "round is the last")
        return [], ""
    candidates = [c for c in unlabeled if c in info.cases and info.cases[c].label is not None]
    if len(candidates) < cfg.num_val or len(unlabeled) - cfg.num_val < cfg.num_val:
        logger.warning("no validation split: data.num_val=%d asks for more than this set holds (%d unlabeled cases, "
                       "%d of them with labels; the pool must keep at least as many as it gives); the best round "
                       "is the last", cfg.num_val, len(unlabeled), len(candidates))
        return [], ""
    return candidates[-cfg.num_val:], f"the last {cfg.num_val} labeled cases of the unlabeled pool (data.num_val)"


def _held_out_selection(cfg: DataConfig, unlabeled: list[str]) -> set[str]:
    """The ``data.selection`` cases (the first ``data.max_selection``) that the split put in the unlabeled
    pool: held-out cases are scored with their labels, so they are taken out of it (a selection case that
    is labeled or test stays refused, :func:`resolve_selection`)."""
    if cfg.selection is None:
        return set()
    kept = cfg.selection[: cfg.max_selection] if cfg.max_selection is not None else cfg.selection
    return set(kept) & set(unlabeled)


def resolve_selection(cfg: DataConfig, info: DatasetInfo, split: Split) -> tuple[list[str], str]:
    """(case ids, where from) of the labeled cases that ``generalist.class_source: auto`` scores both
    sources on: ``data.selection``, else the validation split (``split.val``; for SSL4MIS ACDC that is
    ``val.list``: the same held-out cases choose the class sources and the best round, and neither trains
    on them), else an SSL4MIS folder's ``val.list`` (when the test split does not come from it), else the
    labeled training cases (the specialist's own training data: its Dice there is optimistic, which the
    caller says). ``data.max_selection`` keeps the first N. ConfigError listing every bad id, a case without
    a label, or a selection case that is also labeled, unlabeled or test."""
    if cfg.selection is not None:
        cases, source = list(cfg.selection), "data.selection"
    elif split.val:
        cases, source = list(split.val), f"the validation split ({split.val_source})"
    elif info.split_lists.get("val") and not set(info.split_lists["val"]) & set(split.test):
        cases, source = list(info.split_lists["val"]), f"val.list of {info.root}"
    else:
        cases, source = list(split.labeled), "the labeled training cases (no held-out labeled cases)"
        return cases[: cfg.max_selection] if cfg.max_selection is not None else cases, source
    problems: list[str] = []
    _check({"selection": cases}, info, source, problems)
    for c in cases:
        for part in ("labeled", "unlabeled", "test"):
            if c in getattr(split, part):
                problems.append(f"{source}: case {c!r} is also a {part} case; selection cases must be held out")
    if problems:
        raise ConfigError(f"bad selection cases ({len(problems)} problem{'s' if len(problems) != 1 else ''}):\n  "
                          + "\n  ".join(problems))
    return (cases[: cfg.max_selection] if cfg.max_selection is not None else cases), source
