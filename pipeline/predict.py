"""``semisam predict``: segment scans with a run's specialist, one label file per scan.

    summary = predict(run_dir, [Path("imagesTs")], Path("out"), PredictOptions(round="best"), Predictor)

Inputs (:func:`find_scans`): folders (their ``*.nii.gz``, ``*.nii`` and ``*.h5`` files, not recursive) or
files. NIfTI scans are named as in MSD / nnU-Net (``<case>.nii.gz`` or ``<case>_0000.nii.gz``: channel
0000, the only one a specialist is trained on); h5 scans hold an ``image`` dataset (UA-MT, SSL4MIS
volumes; LA's ``<case>/mri_norm2.h5`` takes the folder's name). Each scan is read, normalised and
segmented as the run's evaluation does it (``pipeline.data.dataset.load_image`` with ``data.normalization``,
``pipeline.evaluation.segment_volume``), so a test case gets exactly the label map its test Dice scored.

Outputs: ``OUTPUT/<case>.nii.gz``, uint8 class values as in training (0 = background), the array in the
scan's own axis order. A NIfTI scan's label carries the scan's affine and header; an h5 scan's carries its
spacing where known (``data.spacing``, the run's ``dataset.json``, the file's ``spacing`` attribute), else
1 mm (logged). Files are written whole (write, then rename): a file that exists is finished, and a rerun
skips it (resume after Ctrl-C). With ``labels`` (a folder of ``<case>.nii.gz``, ``.nii`` or ``.h5``
labels): ``OUTPUT/metrics.csv``, one row per case and foreground class (``pipeline.metrics.case_metrics``,
the columns of the evaluation's tables), and ``OUTPUT/summary.json``, their means
(``pipeline.evaluation.round_means``).

With ``with_generalist`` each scan is segmented as relabeling makes a pseudo-label
(:func:`pipeline.relabel.relabel_case`, :func:`generalist_plan`): the specialist's prompts through the run's
generalist, each class from the run's class source; a scan of an unlabeled case then gets the mask the
run stored for it (no embedding cache is used, so a SAM cached in float16 may differ in the last bits).

Where the work runs: up to ``in_process_max`` scans (default :data:`IN_PROCESS_MAX`) are segmented in this
process; more go to Ray actors (the given worker class, placed with the run's ``workers.sam`` resources:
``num_workers`` actors, ``num_gpus`` each where asked; a local Ray is started unless one is reachable,
as for ``semisam run``), one scan per call, the specialist's weights shipped once through the object store.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import ray
import torch
from ray.exceptions import RayActorError, RayTaskError

from pipeline.atomic import atomic_write_bytes, atomic_write_text
from pipeline.checkpoint import load_checkpoint
from pipeline.class_source import configured_sources
from pipeline.config import RunConfig
from pipeline.data.dataset import CaseFiles, DatasetInfo, load_image, load_label
from pipeline.devices import pick_device
from pipeline.errors import CheckpointError, ConfigError, DatasetError, PlacementError
from pipeline.evaluation import dataset_json_spacing, has_spacing_attribute, round_means, segment_volume
from pipeline.generalist.factory import generalist_name, make_generalist
from pipeline.interrupt import POLL_SECONDS, StopFlag
from pipeline.metrics import case_metrics
from pipeline.models.unet import build_model
from pipeline.placement import alive_node_resources, describe, fits, request_of
from pipeline.progress import Progress
from pipeline.ray_runtime import init_ray, remote_actor
from pipeline.relabel import relabel_case
from pipeline.round_summary import best_round
from pipeline.run_folder import RunFolder
from pipeline.storage import read_table

log = logging.getLogger(__name__)

IN_PROCESS_MAX = 8
"""Up to this many scans are segmented in the driver's process. Starting Ray and an actor per worker,
each loading the model, costs 5-15 s; a small scan takes well under a second on a CPU, so below about
ten scans the actors would be slower than doing it here."""

_NIFTI_ENDINGS = (".nii.gz", ".nii")
_LABEL_ENDINGS = (*_NIFTI_ENDINGS, ".h5")
METRICS_CSV = "metrics.csv"
SUMMARY_JSON = "summary.json"

Spacing = tuple[float, float, float]


@dataclass(frozen=True)
class PredictOptions:
    """``round``: ``best`` (by validation Dice, state.json; the last round without a validation split),
    ``last`` or a round number. ``labels``: a folder of reference labels (metrics). ``in_process_max``: more
    scans than this go to Ray actors. ``with_generalist``: the pseudo-label of each scan instead of the
    specialist's own label map."""

    round: str = "best"
    labels: Path | None = None
    in_process_max: int = IN_PROCESS_MAX
    with_generalist: bool = False
    """Segment as relabeling does (:func:`pipeline.relabel.relabel_case`): the specialist's prompts through
    the run's generalist, each class from its source (:func:`generalist_plan`)."""


@dataclass(frozen=True)
class Scan:
    """One scan to segment: its file, its output, its label (with ``--labels``) and its spacing in mm
    along X, Y, Z (None: unknown; distances then in voxels)."""

    case_id: str
    image: Path
    output: Path
    label: Path | None = None
    spacing: Spacing | None = None
    distances_in_mm: bool = True
    """False when some scan of the batch has no known spacing: then every scan is measured in voxels,
    so one table never mixes units (as the evaluation)."""

    @property
    def is_nifti(self) -> bool:
        return self.image.name.endswith(_NIFTI_ENDINGS)


# ---------------------------------------------------------------------------------------------- the model


def resolve_round(state: dict, which: str, run_dir: str) -> int:
    """The round whose checkpoint predicts: ``best`` (state.json's best round by validation Dice; the last
    completed round, logged, when the run has no validation split), ``last`` or a completed round number."""
    completed = sorted(state.get("completed", []))
    if not completed:
        raise CheckpointError(f"{run_dir} has no completed round yet: nothing to predict with")
    if which == "last":
        return completed[-1]
    if which == "best":
        best = state.get("best") or best_round([s for s in state.get("summaries", []) if s["round"] in completed])
        if best and best["round"] in completed:
            log.info("round %d is the best by validation Dice (%.4f)", best["round"], best["val_dice"])
            return int(best["round"])
        log.info("%s has no validation split (no validation Dice in state.json): using the last round, %d",
                 run_dir, completed[-1])
        return completed[-1]
    if not which.isdigit() or int(which) not in completed:
        raise ConfigError(f"--round {which}: give best, last or a completed round of {run_dir} ({completed})")
    return int(which)


def load_specialist(folder: RunFolder, state: dict, r: int) -> tuple[dict, dict, str]:
    """(model args, student weights, SHA-256) of checkpoint ``r``, verified against state.json."""
    sha = state["checkpoints"].get(str(r))
    ckpt = load_checkpoint(folder.checkpoint(r), expect_sha256=sha)
    return ckpt["model_args"], ckpt["trainer"]["student"], sha or ""


def generalist_plan(cfg: RunConfig, state: dict, r: int, class_ids: list[int]) -> dict:
    """What ``--with-generalist`` does with checkpoint ``r``: relabel as round ``r + 1`` would (its prompts'
    random streams are those of that round) with the class sources of that round: the configured ones, and
    for ``auto`` classes the choice the run recorded for round ``r + 1`` (made with checkpoint ``r``), else
    the run's latest recorded choice, else the specialist (logged). ``{"round", "sources"}`` (None: every
    class from the generalist)."""
    configured = configured_sources(cfg.generalist.class_source, class_ids)
    if set(configured.values()) == {"generalist"}:
        return {"round": r + 1, "sources": None}
    recorded = {s["round"]: s.get("relabel", {}).get("class_source") or {} for s in state.get("summaries", [])}
    choice = recorded.get(r + 1) or next((recorded[k] for k in sorted(recorded, reverse=True) if recorded[k]), {})
    sources = {}
    for c, source in configured.items():
        if source == "auto":
            source = choice.get(str(c), "specialist")
            if str(c) not in choice:
                log.warning("class %d: class_source auto, but the run recorded no choice for it: the specialist's", c)
        sources[c] = source
    log.info("--with-generalist: class sources %s (relabeling as round %d)", sources, r + 1)
    return {"round": r + 1, "sources": sources}


# ---------------------------------------------------------------------------------------------- inputs


def _case_id(path: Path) -> tuple[str, str | None]:
    """(case id, nnU-Net channel or None) of a scan file."""
    if path.name == "mri_norm2.h5":  # LA: <case>/mri_norm2.h5
        return path.parent.name, None
    stem = path.name.removesuffix(".gz").removesuffix(".nii").removesuffix(".h5")
    base, _, channel = stem.rpartition("_")
    if base and len(channel) == 4 and channel.isdigit():
        return base, channel
    return stem, None


def _scan_files(inputs: list[Path], problems: list[str]) -> list[Path]:
    files: list[Path] = []
    for path in inputs:
        if path.is_dir():
            found = [p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")
                     and p.name.endswith((*_NIFTI_ENDINGS, ".h5"))]
            if not found:
                problems.append(f"{path}: holds no .nii.gz, .nii or .h5 scans (give the images folder, e.g. "
                                "imagesTs, or the files)")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            problems.append(f"{path}: no such file or folder")
    return files


def _label_file(labels: Path, case_id: str) -> Path | None:
    for ending in _LABEL_ENDINGS:
        if (labels / f"{case_id}{ending}").is_file():
            return labels / f"{case_id}{ending}"
    return None


def find_scans(inputs: list[Path], output: Path, labels: Path | None) -> list[Scan]:
    """The scans of ``inputs`` (folders or files), each with its output file and label; DatasetError
    listing every problem: a missing input, a file that is not a scan, a channel other than 0000, two
    files of one case, an output that would overwrite an input, a case without a label file."""
    problems: list[str] = []
    scans: dict[str, Scan] = {}
    for path in _scan_files(inputs, problems):
        if not path.name.endswith((*_NIFTI_ENDINGS, ".h5")):
            problems.append(f"{path}: not a scan (.nii.gz, .nii or .h5)")
            continue
        case_id, channel = _case_id(path)
        if channel not in (None, "0000"):
            problems.append(f"{path}: channel {channel} of case {case_id!r}; the specialist was trained on one "
                            "channel (_0000): give only the _0000 files")
            continue
        if case_id in scans:
            problems.append(f"{path}: case {case_id!r} again (also {scans[case_id].image})")
            continue
        out = output / f"{case_id}.nii.gz"
        if out.resolve() == path.resolve():
            problems.append(f"{path}: the output {out} would overwrite it; give another output folder")
            continue
        label = None
        if labels is not None:
            label = _label_file(labels, case_id)
            if label is None:
                problems.append(f"{path}: no label for case {case_id!r} in {labels} (looked for "
                                f"{case_id}.nii.gz, .nii, .h5)")
        scans[case_id] = Scan(case_id, path, out, label)
    if problems:
        raise DatasetError(problems)
    if not scans:
        raise DatasetError(f"no scans in {', '.join(map(str, inputs))}")
    return list(scans.values())


def _stored_shape(path: Path) -> tuple[int, ...]:
    """The image's shape from the header (NIfTI) or the dataset's shape (h5); no voxel data is read."""
    if path.name.endswith(_NIFTI_ENDINGS):
        return tuple(nib.load(path).shape)
    with h5py.File(path, "r") as f:
        if "image" not in f:
            raise DatasetError(f"{path}: h5 file has no 'image' dataset")
        return tuple(f["image"].shape)


def scan_problem(scan: Scan, in_channels: int) -> str | None:
    """One line naming the file when a scan cannot be segmented (unreadable, not 3D, a channel count the
    model did not see), from its header; None when it can."""
    try:
        shape = _stored_shape(scan.image)
    except DatasetError as e:
        return e.problems[0]
    except Exception as e:  # noqa: BLE001 - whatever nibabel / h5py raise for a damaged or foreign file
        return f"{scan.image}: unreadable ({type(e).__name__}: {e})"
    channels = shape[3] if len(shape) == 4 else 1
    if len(shape) == 4 and channels != in_channels:
        return (f"{scan.image}: has {channels} channels (shape {shape}); the specialist was trained on "
                f"{in_channels}")
    if len(shape) not in (3, 4):
        return f"{scan.image}: a {len(shape)}D array (shape {shape}); a scan must be a 3D volume (X, Y, Z)"
    return None


def scan_spacing(scan: Scan, cfg: RunConfig) -> Spacing | None:
    """Spacing in mm (X, Y, Z) for distances and an h5 scan's output: a NIfTI header's; for h5 as the
    evaluation (``pipeline.evaluation.distance_spacing``): ``data.spacing``, else the run's
    ``dataset.json``, else the file's ``spacing`` attribute, else None."""
    if scan.is_nifti:
        zooms = nib.load(scan.image).header.get_zooms()[:3]
        return (float(zooms[0]), float(zooms[1]), float(zooms[2])) if len(zooms) == 3 else None
    if cfg.data.spacing is not None:
        return (float(cfg.data.spacing[0]), float(cfg.data.spacing[1]), float(cfg.data.spacing[2]))
    try:
        given = dataset_json_spacing(cfg.data.root)
    except (OSError, ValueError, DatasetError):
        given = None
    if given is not None:
        return given
    if has_spacing_attribute(scan.image):
        return _single_case(scan.image, scan.case_id, {0: "background"}, "image")[1]
    return None


# ---------------------------------------------------------------------------------------------- one scan


def _single_case(path: Path, case_id: str, labels: dict[int, str], what: str):
    """``load_image`` / ``load_label`` of one file, read as the dataset reader reads its layout."""
    fmt = "msd" if path.name.endswith(_NIFTI_ENDINGS) else "h5"
    info = DatasetInfo(root=path.parent, format=fmt, labels=labels,
                       cases={case_id: CaseFiles(case_id=case_id, image=path, label=path)})
    return load_image(info, case_id) if what == "image" else load_label(info, case_id)


def label_nifti(scan: Scan, pred: np.ndarray) -> nib.Nifti1Image:
    """The label image of a scan: the scan's affine and header (NIfTI), or its spacing (h5), uint8."""
    if scan.is_nifti:
        src = nib.load(scan.image)
        header = src.header.copy()
        header.set_data_dtype(np.uint8)
        img = type(src)(pred, src.affine, header)
        img.header.set_slope_inter(1.0, 0.0)
        return img
    spacing = scan.spacing or (1.0, 1.0, 1.0)
    img = nib.Nifti1Image(pred, np.diag([*spacing, 1.0]))
    img.header.set_data_dtype(np.uint8)
    img.header.set_xyzt_units("mm")
    return img


def write_label(scan: Scan, pred: np.ndarray) -> None:
    """``scan.output`` written whole (a rerun takes an existing file as finished)."""
    data = label_nifti(scan, pred).to_bytes()
    atomic_write_bytes(scan.output, gzip.compress(data, compresslevel=6))


def metric_rows(scan: Scan, pred: np.ndarray, class_names: dict[int, str], percentile: float) -> list[dict]:
    """Per foreground class of one scan: the evaluation's metrics against its label file."""
    label = _single_case(scan.label, scan.case_id, class_names, "label")
    if label.shape != pred.shape:
        raise DatasetError(f"{scan.label}: label shape {label.shape} differs from the scan's {pred.shape} "
                           f"({scan.image})")
    rows = case_metrics(pred, label, scan.spacing if scan.distances_in_mm else None, [c for c in sorted(class_names) if c != 0], percentile)
    return [{"case_id": scan.case_id, "class_id": r["class_id"], "class_name": class_names[r["class_id"]],
             **{k: v for k, v in r.items() if k != "class_id"}} for r in rows]


class ScanSegmenter:
    """The specialist of one checkpoint, loaded once: segments a scan, writes its label file and, with a
    label, measures it. Used in the driver and inside ``workers.predictor.Predictor``."""

    def __init__(self, cfg: RunConfig, model_args: dict, weights: dict, device: torch.device,
                 generalist: dict | None = None):
        """``generalist``: :func:`generalist_plan`'s answer, to segment as relabeling does; None: the
        specialist alone."""
        self.cfg, self.device, self.plan = cfg, device, generalist
        self.model = build_model(model_args).to(device)
        self.model.load_state_dict(weights)
        self.model.eval()
        names = cfg.data.labels or {}
        self.class_names = {c: names.get(c, f"class{c}") for c in range(model_args["num_classes"])}
        self.generalist = make_generalist(cfg.generalist, device) if generalist is not None else None

    def label_map(self, scan: Scan, image: np.ndarray) -> np.ndarray:
        """uint8 (X, Y, Z): the specialist's segmentation, or with a generalist the composed pseudo-label of
        relabeling (no embedding cache: new scans would only fill the run's)."""
        with torch.inference_mode():
            if self.generalist is None:
                return segment_volume(self.model, image, self.cfg, self.device)
            out = relabel_case(scan.case_id, image, self.model, self.generalist, None, self.cfg,
                               [c for c in self.class_names if c != 0], self.plan["round"], self.plan["round"] - 1,
                               self.device, self.plan["sources"])
        return np.ascontiguousarray(np.moveaxis(out.pseudo_label, 0, self.cfg.data.slice_axis))

    def segment(self, scan: Scan) -> dict:
        """``{"case_id", "rows", "seconds"}``, or ``{"case_id", "error"}`` naming the file."""
        start = time.perf_counter()
        try:
            image, _ = _single_case(scan.image, scan.case_id, self.class_names, "image")
            pred = self.label_map(scan, image)
            write_label(scan, pred)
            rows = metric_rows(scan, pred, self.class_names, self.cfg.eval.hd_percentile) if scan.label else []
        except DatasetError as e:
            return {"case_id": scan.case_id, "error": "; ".join(e.problems)}
        return {"case_id": scan.case_id, "rows": rows, "seconds": time.perf_counter() - start}

    def measure(self, scan: Scan) -> dict:
        """The metrics of a scan whose output exists (a resumed prediction), from that file."""
        try:
            pred = np.asarray(nib.load(scan.output).dataobj).astype(np.uint8)
            return {"case_id": scan.case_id, "rows": metric_rows(scan, pred, self.class_names,
                                                                 self.cfg.eval.hd_percentile)}
        except DatasetError as e:
            return {"case_id": scan.case_id, "error": "; ".join(e.problems)}


# ---------------------------------------------------------------------------------------------- many scans


def _in_process(segmenter: ScanSegmenter, todo: list[Scan], stop: StopFlag, progress: Progress,
                on_scan) -> list[dict]:
    out = []
    for scan in todo:
        out.append(segmenter.segment(scan))
        progress.advance(1)
        on_scan(scan.case_id)
        stop.check()
    return out


def _actor_count(cfg: RunConfig, num_scans: int) -> int:
    """How many predictor actors to start: ``workers.sam.num_workers`` (``auto``: as many as the cluster
    places, up to ``max_workers``), never more than scans, at most what fits; PlacementError if none fits."""
    sam = cfg.workers.sam
    req = request_of(sam)
    placeable = sum(min(fits(node, req), 10**4) for node in alive_node_resources())
    wanted = placeable if sam.num_workers == "auto" else sam.num_workers
    if sam.max_workers is not None:
        wanted = min(wanted, sam.max_workers)
    if placeable < 1:
        raise PlacementError(f"the Ray cluster cannot place one predictor actor of {describe(req)} "
                             "(workers.sam resources of the run); lower them, or add a node")
    if placeable < wanted:
        log.warning("starting %d predictor actors of %d asked for (workers.sam.num_workers): the cluster holds "
                    "no more of %s", placeable, wanted, describe(req))
    return max(1, min(wanted, placeable, num_scans))


def _on_ray(cfg: RunConfig, worker_cls: type, model_args: dict, weights: dict, plan: dict | None, todo: list[Scan],
            stop: StopFlag, progress: Progress, on_scan) -> list[dict]:
    """Segment ``todo`` on predictor actors, one scan per call; a lost actor's scan is reported failed."""
    started = init_ray(cfg.workers)
    actors = []
    try:
        n = _actor_count(cfg, len(todo))
        log.info("segmenting %d scans on %d Ray actors (%s each)", len(todo), n, describe(request_of(cfg.workers.sam)))
        remote = remote_actor(worker_cls, cfg.workers.sam, max_restarts=0)  # a lost actor's scan is re-queued
        weights_ref, cfg_dict = ray.put(weights), cfg.model_dump(mode="json")
        actors = [remote.remote(cfg_dict, model_args, weights_ref, plan) for _ in range(n)]
        return _drain(actors, list(todo), stop, progress, on_scan)
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()


def _drain(actors: list, queue: list[Scan], stop: StopFlag, progress: Progress, on_scan) -> list[dict]:
    """Keep every actor busy with one scan until ``queue`` is empty. An actor that dies is dropped and its
    scan goes back to the queue once (a scan that kills a second actor is reported failed); with no actor
    left, what remains is reported failed."""
    out, running, attempts, idle = [], {}, {}, []

    def give(actor) -> None:
        if not queue:
            idle.append(actor)
            return
        scan = queue.pop(0)
        attempts[scan.case_id] = attempts.get(scan.case_id, 0) + 1
        running[actor.segment.remote(scan)] = (actor, scan)

    for actor in actors:
        give(actor)
    while running:
        done, _ = ray.wait(list(running), num_returns=1, timeout=POLL_SECONDS)
        stop.check()
        for ref in done:
            actor, scan = running.pop(ref)
            try:
                out.append(ray.get(ref))
            except (RayActorError, RayTaskError) as e:
                cause = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                if isinstance(e, RayActorError) and attempts[scan.case_id] < 2:
                    log.warning("%s: its predictor actor was lost (%s); the scan goes back to the queue", scan.image, cause)
                    queue.insert(0, scan)
                    if idle:
                        give(idle.pop())
                    continue  # the dead actor gets no more work
                out.append({"case_id": scan.case_id, "error": f"{scan.image}: the predictor failed ({cause})"})
            progress.advance(1)
            on_scan(scan.case_id)
            give(actor)
        if queue and not running:
            out += [{"case_id": s.case_id, "error": f"{s.image}: not segmented, every predictor actor was lost"}
                    for s in queue]
            queue.clear()
    return out


# ---------------------------------------------------------------------------------------------- the command


def _prepared_scans(cfg: RunConfig, inputs: list[Path], output: Path, labels: Path | None,
                    in_channels: int) -> list[Scan]:
    """The scans, header-checked (DatasetError: one line per bad file), with their spacing."""
    scans = find_scans(inputs, output, labels)
    problems = [p for p in (scan_problem(s, in_channels) for s in scans) if p]
    if problems:
        raise DatasetError(problems)
    scans = [replace(s, spacing=scan_spacing(s, cfg)) for s in scans]
    for s in scans:
        if s.spacing is None:
            log.info("%s: no voxel spacing known (h5): its label file says 1 mm", s.image)
    in_mm = all(s.spacing is not None for s in scans if s.label is not None)
    if labels is not None and not in_mm:
        log.warning("no voxel spacing for some scans: HD95/ASD of every scan in voxels")
    return [replace(s, distances_in_mm=in_mm) for s in scans]


def _with_class_names(folder: RunFolder) -> RunConfig:
    """The run's config, with ``data.labels`` from its eval tables' ``class_name`` (the dataset's names)
    when the config has none, so that the metrics name the classes as ``semisam eval`` does."""
    cfg = folder.load_config()
    tables = folder.tables("eval") or folder.val_tables()
    if cfg.data.labels is not None or not tables:
        return cfg
    table = read_table(tables[-1])
    if "class_name" not in table:
        return cfg
    names = {0: "background", **dict(zip(table["class_id"].astype(int), table["class_name"].astype(str), strict=True))}
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"labels": names})})


def predict(run_dir: str, inputs: list[Path], output: Path, options: PredictOptions, worker_cls: type,
            on_scan=None) -> dict:
    """Segment every scan of ``inputs`` with run ``run_dir``'s specialist into ``output`` (see the module
    docstring). Returns the summary: run, round, checkpoint, scans done / skipped / failed, and with labels
    the means (:func:`pipeline.evaluation.round_means`). Raises :class:`pipeline.errors.Interrupted` on
    SIGINT/SIGTERM after the scans in hand are written; ``on_scan(case_id)`` is called after each."""
    folder = RunFolder(run_dir)
    if not folder.is_run():
        raise ConfigError(f"{run_dir} is not a run folder (no {RunFolder.CONFIG}); give the folder `semisam run` wrote")
    cfg, state = _with_class_names(folder), folder.read_state()
    r = resolve_round(state, options.round, str(run_dir))
    model_args, weights, sha = load_specialist(folder, state, r)
    scans = _prepared_scans(cfg, [Path(p) for p in inputs], Path(output), options.labels, model_args["in_channels"])
    todo = [s for s in scans if not s.output.is_file()]
    log.info("predicting %d scans with checkpoint %d of %s into %s (%d already written, skipped)", len(todo), r,
             run_dir, output, len(scans) - len(todo))
    plan = generalist_plan(cfg, state, r, list(range(1, model_args["num_classes"]))) if options.with_generalist else None
    segmenter = ScanSegmenter(cfg, model_args, weights, pick_device(cfg.device), plan)
    progress = Progress(f"predict with round {r}", total=len(todo), unit="scans", logger=log)
    on_scan = on_scan or (lambda case_id: None)
    with StopFlag() as stop:
        if len(todo) <= options.in_process_max:
            results = _in_process(segmenter, todo, stop, progress, on_scan)
        else:
            results = _on_ray(cfg, worker_cls, model_args, weights, plan, todo, stop, progress, on_scan)
    results += [segmenter.measure(s) for s in scans if s not in todo and s.label is not None]
    return _report(results, scans, Path(output), {
        "run": str(run_dir), "round": r, "checkpoint_sha256": sha, "scans": len(scans), "written_now": len(todo),
        "class_names": {str(c): n for c, n in segmenter.class_names.items()},
        "generalist": generalist_name(cfg.generalist) if plan else None})


def _report(results: list[dict], scans: list[Scan], output: Path, head: dict) -> dict:
    """Log each failed scan (one line naming its file); write metrics.csv and summary.json when measured."""
    failed = sorted((r for r in results if "error" in r), key=lambda r: r["case_id"])
    for r in failed:
        log.error("%s", r["error"])
    summary = {**head, "failed": [r["case_id"] for r in failed]}
    rows = [row for r in results if "rows" in r for row in r["rows"]]
    if rows:
        table = pd.DataFrame(rows).sort_values(["case_id", "class_id"], kind="stable").reset_index(drop=True)
        atomic_write_text(output / METRICS_CSV, table.to_csv(index=False))
        summary["measured"] = int(table["case_id"].nunique())
        summary["means"] = round_means(table)
        atomic_write_text(output / SUMMARY_JSON, json.dumps(_plain(summary), indent=1) + "\n")
    return summary


def _plain(value):
    """JSON-safe: NaN -> None, numpy scalars -> Python."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, float | np.floating):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def summary_text(summary: dict) -> str:
    """The closing lines of ``semisam predict``."""
    lines = [f"round {summary['round']} of {summary['run']}: {summary['scans']} scans, {summary['written_now']} "
             f"written now, {len(summary['failed'])} failed" + (f" ({', '.join(summary['failed'])})"
                                                              if summary["failed"] else "")]
    if "means" in summary:
        m = summary["means"]
        unit = "mm" if "hd95_mm" in m else "vox"
        names = summary.get("class_names", {})
        per_class = ", ".join(f"{names.get(k.removeprefix('dice_class'), k.removeprefix('dice_'))} {v:.4f}"
                              for k, v in m.items() if k.startswith("dice_class"))
        lines.append(f"{summary['measured']} scans measured: mean Dice {m['dice']:.4f} ({per_class}), HD95 "
                     f"{m[f'hd95_{unit}']:.2f} {unit}")
    return "\n".join(lines)

