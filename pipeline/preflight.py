"""Everything that can be checked before a run starts any work: dataset, split, SAM checkpoint, storage."""

from __future__ import annotations

import logging
import os
from dataclasses import replace

from pipeline.class_source import needs_selection
from pipeline.config import RunConfig
from pipeline.data.dataset import read_data
from pipeline.data.splits import resolve_selection, resolve_split
from pipeline.data.validate import labels_from_data, validate_cases, warn_derived_labels
from pipeline.errors import ConfigError
from pipeline.storage import Location, check_writable

log = logging.getLogger(__name__)


def check_not_in_job_package(cfg: RunConfig) -> None:
    """Under ``ray job submit --working-dir`` the driver runs in a temporary copy of the project that Ray
    deletes with the job: a run folder there would vanish."""
    run_dir = cfg.run_dir
    if run_dir.is_local and "runtime_resources" in run_dir.path.split(os.sep):
        raise ConfigError(
            f"the run folder {run_dir} is inside Ray's temporary job package (deleted when the job ends): give "
            "an absolute output_dir on storage every node sees, e.g. output_dir=/shared/runs or s3://bucket/runs")


def preflight(cfg: RunConfig) -> tuple[RunConfig, object, object]:
    """Everything that can be checked before any work starts: dataset, split, SAM checkpoint, storage.
    Returns (config, dataset info, split); the config gains ``data.labels`` when the classes had to be
    taken from the label values (:func:`pipeline.data.validate.labels_from_data`), so that every actor,
    and a resume, sees the same classes."""
    from pipeline.generalist.sam import check_sam_checkpoint

    check_not_in_job_package(cfg)
    info = read_data(cfg.data)
    split = resolve_split(cfg.data, info)
    derived = labels_from_data(info, split)
    if derived is not None:
        warn_derived_labels(info, derived, len(split.labeled) + len(split.test))
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"labels": derived})})
        info = read_data(cfg.data)
    validate_cases(info, split, check_unlabeled_labels=cfg.eval.audit_pseudo_labels,
                   slice_axis=cfg.data.slice_axis)
    g = cfg.generalist
    if g.backend == "sam" and cfg.train.pseudo_label.active and split.unlabeled:
        check_sam_checkpoint(g.sam)
        if g.cache_embeddings and g.cache_dir:
            # a shared cache that cannot be written would otherwise show as every case failing in a worker
            check_writable(Location.of(g.cache_dir, cfg.storage_options), "generalist.cache_dir")
    check_writable(cfg.run_dir)
    if cfg.train.pseudo_label.active and split.unlabeled and needs_selection(g.class_source, info.foreground_classes):
        cases, source = resolve_selection(cfg.data, info, split)
        if not cases:
            raise ConfigError("generalist.class_source: auto needs labeled selection cases (data.selection)")
        if source.startswith("the labeled training cases"):
            log.warning("generalist.class_source auto: no held-out labeled cases (data.selection, val.list); "
                        "scoring on %s, where the specialist's Dice is optimistic (it trained on them), so the "
                        "generalist is taken only where it beats the specialist on its own training data", source)
        else:
            log.info("generalist.class_source auto: %d selection cases from %s", len(cases), source)
        split = replace(split, selection=cases)
    if not split.unlabeled and cfg.rounds > 1:
        log.warning("no unlabeled cases: rounds after 0 only train further")
    return cfg, info, split


