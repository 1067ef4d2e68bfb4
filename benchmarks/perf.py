"""Performance figures of semisam, each a ratio of two things measured in the same run.

    .venv/bin/python -m benchmarks.perf                        # all figures (~15-20 min on 2 CPU cores)
    .venv/bin/python -m benchmarks.perf --quick                # tiny sizes (~2 min), for development
    .venv/bin/python -m benchmarks.perf --only pool_scaling    # one figure; the others stay in the file
    .venv/bin/python -m benchmarks.perf --missing              # only figures not yet in the file

Figures (``FIGURES``; see benchmarks/README.md for what each means):

1. ``embedding_cache``   a relabeling round with cached SAM ViT-B embeddings against the first (cold) round
2. ``online_cost``       our embed-once schedule against the released SemiSAM one (encoder every iteration)
3. ``pool_scaling``      relabeling throughput of 2 SAM actors against 1 (Coordinator.relabel_round)
4. ``pipeline_overhead`` the Ray pool with one actor writing Zarr against a plain in-process loop
5. ``trainer_overhead``  training iterations/s in the TrainerWorker actor against the same loop in-process
6. ``memory``            peak memory of the trainer and the SAM actors; SAM actor RSS over a whole round

Results go to ``benchmarks/results/perf.json`` (``perf_quick.json`` with ``--quick``): one entry per
figure with its measured numbers, ratio, goal and pass/short, the command, machine and date. A run
merges its figures into the file (written after each figure), so finished figures are kept.
Everything runs on the real MSD Hippocampus data (``../shared/data/hippocampus``), read in place.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import ray
import torch

from benchmarks.common import RESULTS, ROOT, machine_info, setup_logging
from pipeline.atomic import atomic_write_text
from pipeline.checkpoint import checkpoint_path, save_checkpoint
from pipeline.config import RunConfig, load_config
from pipeline.coordinator import Actors, Coordinator
from pipeline.data.dataset import DatasetInfo, load_image, load_label, read_data, read_image_shape
from pipeline.data.splits import Split, resolve_split
from pipeline.devices import set_threads
from pipeline.generalist.base import Generalist, SlicePrompt
from pipeline.generalist.cache import EmbeddingCache
from pipeline.generalist.factory import make_generalist
from pipeline.generalist.sam import build_sam_model
from pipeline.models.unet import UNet, build_model
from pipeline.prompts import prompts_for_slice
from pipeline.ray_runtime import init_ray, remote_actor
from pipeline.relabel import relabel_case
from pipeline.store import PseudoLabelStore
from pipeline.training.loop import SpecialistTrainer, TrainVolume
from semisam.launch import ACTORS
from workers.common import process_info, return_free_heap
from workers.sam_worker import SamWorker
from workers.trainer import TrainerWorker

log = logging.getLogger("benchmarks.perf")

CONFIG = ROOT / "conf" / "hippocampus.yaml"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hippocampus"
CPU = torch.device("cpu")

# The released SemiSAM schedule (figure 2): per training iteration the unlabeled batch goes through SAM's
# image encoder, and each image gets 10 single-prompt decoder passes; a run is 6000 iterations.
ONLINE_ITERATIONS = 6000
ONLINE_UNLABELED_BATCH = 4
ONLINE_DECODER_PASSES = 40


@dataclass(frozen=True)
class Sizes:
    """How much work each figure does (``FULL`` for the committed numbers, ``QUICK`` for development)."""

    specialist_iterations: int     # supervised iterations of the specialist that prompts every figure
    cache_cases: int               # fig 1: unlabeled cases ...
    cache_slices_per_case: int     # ... and their central slices relabeled with SAM ViT-B
    vit_image_size: int | None     # ViT-B encoder input (None: 1024, the real one)
    encoder_reps: int              # fig 2: timed ViT-B encoder passes (tiny: 10x as many)
    decoder_reps: int              # fig 2: timed decoder calls per prompt count (tiny: 10x as many)
    check_iterations: int          # fig 2: iterations of the executed tiny-SAM schedules
    pool_cases: int                # fig 3: cases per relabeling round
    overhead_cases: int            # fig 4: cases per relabeling round
    trainer_iterations: int        # fig 5: iterations per timed training round
    repeats: int                   # figs 3-5: timed repeats, the fastest counts
    memory_cases: int | None       # fig 6: unlabeled cases relabeled (None: all of the split)
    memory_train_iterations: int   # fig 6: trainer iterations before and after the relabeling round
    memory_test_cases: int | None  # fig 6: test cases the trainer holds and evaluates (None: all)


FULL = Sizes(specialist_iterations=100, cache_cases=2, cache_slices_per_case=3, vit_image_size=None,
             encoder_reps=2, decoder_reps=5, check_iterations=40, pool_cases=36, overhead_cases=30,
             trainer_iterations=300, repeats=3, memory_cases=None, memory_train_iterations=100,
             memory_test_cases=None)
QUICK = Sizes(specialist_iterations=30, cache_cases=2, cache_slices_per_case=2, vit_image_size=256,
              encoder_reps=2, decoder_reps=3, check_iterations=8, pool_cases=6, overhead_cases=6,
              trainer_iterations=30, repeats=1, memory_cases=12, memory_train_iterations=10,
              memory_test_cases=2)


# ---------------------------------------------------------------------------------------------- helpers


def timed(fn: Callable, *args, **kwargs) -> tuple[float, object]:
    """(wall seconds, result) of one call."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def vmrss_mib() -> float:
    """This process's current resident memory (VmRSS of /proc/self/status) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def rss_after_trim() -> float | None:
    """VmRSS after ``gc.collect()`` and glibc's ``malloc_trim(0)`` (None where there is no glibc)."""
    gc.collect()
    return vmrss_mib() if return_free_heap() else None


def goal_met(ratio: float, op: str, value: float) -> bool:
    return bool(ratio <= value) if op == "<=" else bool(ratio >= value)


def figure(name: str, title: str, measured: dict, ratio: float, ratio_means: str, goal: tuple[str, float, str],
           summary: str, why: str | None = None, passed: bool | None = None, **extra) -> dict:
    """One figure's entry in perf.json. goal: (op, value, text), op ``<=`` or ``>=``; ``passed`` overrides
    the comparison of the ratio with the goal (for a goal with two ways to pass)."""
    op, value, text = goal
    if passed is None:
        passed = goal_met(ratio, op, value)
    out = {"name": name, "title": title, "ratio": round(float(ratio), 4), "ratio_means": ratio_means,
           "goal": {"op": op, "value": value, "text": text}, "pass": passed,
           "status": "pass" if passed else "short", "summary": summary, "measured": measured, **extra}
    if why and not passed:
        out["why"] = why
    return out


def central_slab(image: np.ndarray, axis: int, count: int) -> np.ndarray:
    """The ``count`` central slices of a volume along ``axis``, as a volume (a fixed set of real slices)."""
    n = image.shape[axis]
    lo = max((n - count) // 2, 0)
    return np.ascontiguousarray(np.take(image, np.arange(lo, min(lo + count, n)), axis=axis))


def timing_prompts(shape: tuple[int, int], class_ids: list[int], cfg: RunConfig) -> list[SlicePrompt]:
    """Prompts of the configured kind (points + box per class) for decoder timing, built by
    ``prompts_for_slice`` from a fixed map with one block per class in the slice's centre (no label)."""
    h, w = shape
    pred = np.zeros((h, w), np.uint8)
    k = len(class_ids)
    r0, r1 = h // 3, 2 * h // 3
    for i, c in enumerate(class_ids):
        pred[r0:r1, w // 4 + i * w // (2 * k): w // 4 + (i + 1) * w // (2 * k)] = c
    return prompts_for_slice(pred, class_ids, cfg.prompts, np.random.default_rng(0))


def flatness(samples: list[tuple[int, float]]) -> dict:
    """RSS samples [(cases done, MiB)] of one actor -> RSS after 10% and 100% of its cases, growth, slope
    (least squares from the 10% point on, MiB per 100 cases) and whether it is flat (< 10% or < 50 MiB)."""
    total = samples[-1][0]
    at10 = next(s for s in samples if s[0] >= 0.1 * total)
    end = samples[-1]
    tail = [s for s in samples if s[0] >= at10[0]]
    x = np.array([s[0] for s in tail], float)
    y = np.array([s[1] for s in tail], float)
    slope = float(np.polyfit(x, y, 1)[0] * 100) if len(tail) > 1 and np.ptp(x) > 0 else 0.0
    growth = end[1] - at10[1]
    return {"cases": total, "rss_after_10pct_mib": round(at10[1], 1), "rss_after_100pct_mib": round(end[1], 1),
            "growth_mib": round(growth, 1), "growth_fraction": round(growth / at10[1], 4),
            "slope_mib_per_100_cases": round(slope, 2),
            "flat": bool(growth < 0.10 * at10[1] or growth < 50.0)}


class MeteredSamWorker(SamWorker):
    """A SamWorker that samples its own current RSS after every case batch it relabels (figure 6)."""

    def __init__(self, cfg_dict: dict, worker_index: int = 0):
        super().__init__(cfg_dict, worker_index)
        self.cases_done = 0
        self.rss_samples: list[tuple[int, float]] = [(0, vmrss_mib())]

    def relabel(self, case_ids: list[str], round_index: int, *specialist) -> dict:
        rows = super().relabel(case_ids, round_index, *specialist)
        self.cases_done += len(case_ids)
        self.rss_samples.append((self.cases_done, vmrss_mib()))
        return rows

    def memory(self) -> dict:
        """RSS samples, current and peak RSS, and the RSS once freed heap is handed back to the OS (what
        is left after ``malloc_trim`` is held, not fragmentation)."""
        return {"samples": self.rss_samples, "rss_mib": vmrss_mib(), **process_info(),
                "rss_after_malloc_trim_mib": rss_after_trim()}


class MeteredTrainerWorker(TrainerWorker):
    """A TrainerWorker that also reports its current RSS (figure 6)."""

    def memory(self) -> dict:
        return {"rss_mib": vmrss_mib(), **process_info()}


# ---------------------------------------------------------------------------------------------- the bench


class Bench:
    """What the figures share: sizes, the data, a scratch folder, configs, the specialist, Ray."""

    def __init__(self, sizes: Sizes, data_root: Path, scratch: Path):
        self.sizes, self.data_root, self.scratch = sizes, data_root, scratch
        self._specialist: tuple[dict, dict] | None = None

    def config(self, name: str, *overrides: str) -> RunConfig:
        """conf/hippocampus.yaml on the real data, run folder in the scratch folder, CPU, no audit."""
        return load_config(CONFIG, [
            f"data.root={self.data_root}", f"data.split_file={self.data_root / 'splits.json'}",
            f"output_dir={self.scratch}", f"name={name}", "device=cpu", "eval.audit_pseudo_labels=false",
            *overrides,
        ])

    def pool_config(self, name: str, workers: int, cases: int, *overrides: str) -> RunConfig:
        """A relabeling pool: ``workers`` SAM actors of 1 CPU and 1 torch thread each, the classical
        generalist (the hippocampus config's), ``cases`` unlabeled cases; the idle trainer asks no CPU."""
        return self.config(name, f"workers.sam.num_workers={workers}", "workers.sam.num_cpus=1",
                           "workers.sam.torch_threads=1", "workers.trainer.num_cpus=0",
                           "workers.trainer.torch_threads=1", f"data.max_unlabeled={cases}", "data.max_test=0",
                           *overrides)

    @staticmethod
    def dataset(cfg: RunConfig) -> tuple[DatasetInfo, Split]:
        info = read_data(cfg.data)
        return info, resolve_split(cfg.data, info)

    def specialist(self) -> tuple[dict, dict]:
        """(model_args, SpecialistTrainer state) of a 2D U-Net trained (supervised, in this process) on the
        labeled case of the split, so that prompts exist; trained once and shared by the figures."""
        if self._specialist is None:
            cfg = self.config("specialist")
            info, split = self.dataset(cfg)
            set_threads(os.cpu_count())  # the same specialist whichever figure asks first
            trainer = SpecialistTrainer(cfg, info.num_classes, CPU)
            labeled = [TrainVolume(c, load_image(info, c, cfg.data.normalization)[0], load_label(info, c))
                       for c in split.labeled]
            seconds, _ = timed(trainer.train, labeled, [], None, self.sizes.specialist_iterations)
            log.info("specialist: %d iterations in %.1f s", self.sizes.specialist_iterations, seconds)
            self._specialist = (dict(trainer.model_args), trainer.state_dict())
        return self._specialist

    def specialist_model(self) -> UNet:
        model_args, state = self.specialist()
        model = build_model(model_args)
        model.load_state_dict(state["student"])
        return model.eval()

    def sam_overrides(self, variant: str, image_size: int | None) -> list[str]:
        """Config overrides for a SAM of ``variant`` with random weights, written as a plain state dict with
        ``torch.save`` (the normal ``load_sam`` path reads it; speed does not depend on the weights)."""
        path = self.scratch / f"sam_{variant}_{image_size or 'default'}.pt"
        if not path.exists():
            torch.manual_seed(0)
            torch.save(build_sam_model(variant, image_size).state_dict(), path)
        out = ["generalist.backend=sam", f"generalist.sam.variant={variant}", f"generalist.sam.checkpoint={path}"]
        if image_size:
            out.append(f"generalist.sam.image_size={image_size}")
        return out

    def start_ray(self) -> None:
        """A real local Ray cluster of 2 CPUs (hippocampus config's ``local_num_cpus``), started once."""
        init_ray(self.config("ray").workers)

    @contextmanager
    def coordinator(self, cfg: RunConfig, metered: bool = False, specialist: bool = True):
        """A Coordinator of ``cfg`` with every actor started; with ``specialist`` its trainer holds the
        shared specialist as checkpoint 0. ``metered``: the Metered* actor classes."""
        self.start_ray()
        if specialist:
            model_args, state = self.specialist()
            save_checkpoint(checkpoint_path(cfg.run_dir, 0), 0, state, model_args, cfg)
        actors = Actors(trainer=MeteredTrainerWorker, sam=MeteredSamWorker) if metered else ACTORS
        coord = Coordinator(cfg, actors)
        try:
            ray.get([coord.trainer.process_info.remote(), *[m.handle.stats.remote() for m in coord.pool.alive()]])
            if specialist:
                ray.get(coord.trainer.restore.remote(0))
            yield coord
        finally:
            coord.shutdown()

    @staticmethod
    def timed_round(coord: Coordinator, round_index: int) -> dict:
        """One ``Coordinator.relabel_round`` of the split's unlabeled cases with checkpoint 0: wall seconds,
        cases, slices, the driver's CPU seconds (manifest appends, Ray) and each actor's seconds inside
        ``relabel`` during it."""
        busy0 = [st["seconds"] for st in coord.worker_stats()]
        cpu0 = cpu_seconds()
        seconds, summary = timed(coord.relabel_round, round_index, 0)
        cpu = cpu_seconds() - cpu0
        busy = [st["seconds"] - b0 for st, b0 in zip(coord.worker_stats(), busy0, strict=True)]
        log.info("%s round %d: %d cases in %.2f s", coord.cfg.name, round_index, summary["cases"], seconds)
        return {"round": round_index, "seconds": round(seconds, 3), "cases": summary["cases"],
                "slices": summary["slices"], "driver_cpu_seconds": round(cpu, 3),
                "actor_seconds": [round(x, 3) for x in busy]}


# ---------------------------------------------------------------------------------------------- figure 1


def relabel_cases(images: dict[str, np.ndarray], model: UNet, generalist: Generalist, cache: EmbeddingCache,
                  cfg: RunConfig, class_ids: list[int], round_index: int) -> dict:
    """One relabeling round of ``relabel_case`` over in-memory images; seconds and counters."""
    enc0, dec0 = generalist.encoder_calls, generalist.decoder_calls
    hits0, misses0 = cache.hits, cache.misses
    prompted = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for case_id, image in images.items():
            out = relabel_case(case_id, image, model, generalist, cache, cfg, class_ids, round_index, 0, CPU)
            prompted += sum(row["num_prompts"] > 0 for row in out.rows)
    return {"seconds": round(time.perf_counter() - start, 3), "slices": sum(i.shape[cfg.data.slice_axis] for i in images.values()),
            "prompted_slices": prompted, "encoder_calls": generalist.encoder_calls - enc0,
            "decoder_calls": generalist.decoder_calls - dec0, "cache_hits": cache.hits - hits0,
            "cache_misses": cache.misses - misses0}


def fig_embedding_cache(b: Bench) -> dict:
    """Figure 1: a relabeling round with cached ViT-B embeddings against the cold first round."""
    s = b.sizes
    set_threads(os.cpu_count())
    cfg = b.config("cache", *b.sam_overrides("vit_b", s.vit_image_size))
    info, split = b.dataset(cfg)
    axis = cfg.data.slice_axis
    model = b.specialist_model()
    generalist = make_generalist(cfg.generalist, CPU)  # load_sam: the normal checkpoint path
    cases = split.unlabeled[: s.cache_cases]
    images = {c: central_slab(load_image(info, c, cfg.data.normalization)[0], axis, s.cache_slices_per_case)
              for c in cases}
    # Warm up encoder and decoder on a slice outside the set, so the cold round is the steady state.
    warm_slice = np.moveaxis(load_image(info, split.unlabeled[s.cache_cases])[0], axis, 0)[:1]
    emb = generalist.embed(warm_slice)
    generalist.decode(emb[0], warm_slice.shape[1:], timing_prompts(warm_slice.shape[1:], info.foreground_classes, cfg))
    root = cfg.run_dir / "embeddings.zarr"
    cold = relabel_cases(images, model, generalist, EmbeddingCache(root, generalist.name), cfg,
                         info.foreground_classes, round_index=1)
    log.info("cold round: %s", cold)
    # A later round opens the cache afresh from disk, as a new SAM actor would.
    warm = relabel_cases(images, model, generalist, EmbeddingCache(root, generalist.name), cfg,
                         info.foreground_classes, round_index=2)
    log.info("warm round: %s", warm)
    ratio = warm["seconds"] / cold["seconds"]
    variant = f"vit_b at {generalist.image_size}"
    return figure(
        "embedding_cache", "Embedding cache: warm relabeling round / cold round (SAM ViT-B)",
        {"cold": cold, "warm": warm, "cases": cases, "slices_per_case": s.cache_slices_per_case,
         "sam": variant, "torch_threads": torch.get_num_threads(),
         "specialist_iterations": s.specialist_iterations},
        ratio, "warm round seconds / cold round seconds", ("<=", 0.05, "warm round costs at most 5% of the cold one"),
        f"{len(cases)} cases x {s.cache_slices_per_case} slices, SAM {variant}: cold {cold['seconds']:.1f} s "
        f"({cold['encoder_calls']} encoder calls), warm {warm['seconds']:.2f} s ({warm['encoder_calls']} encoder "
        f"calls, {warm['cache_hits']} cache hits)",
        why=(f"the warm round still decodes {warm['decoder_calls']} prompts and predicts with the specialist; "
             "at this encoder input the decode is not small against the encode"),
    )


# ---------------------------------------------------------------------------------------------- figure 2


def encoder_seconds(generalist: Generalist, slices: np.ndarray, batch: int, reps: int) -> float:
    """Seconds per image of ``embed`` on batches of ``batch`` real slices (after one warm-up batch)."""
    generalist.embed(slices[:batch])
    total = 0.0
    for i in range(reps):
        idx = [(i * batch + j) % len(slices) for j in range(batch)]
        total += timed(generalist.embed, slices[idx])[0]
    return total / (reps * batch)


def decoder_seconds(generalist: Generalist, embedding: np.ndarray, shape: tuple[int, int],
                    prompts: list[SlicePrompt], reps: int) -> float:
    """Seconds per ``decode`` call with ``prompts`` (after one warm-up call)."""
    generalist.decode(embedding, shape, prompts)
    return timed(lambda: [generalist.decode(embedding, shape, prompts) for _ in range(reps)])[0] / reps


def cache_read_seconds(cache: EmbeddingCache, slices: np.ndarray, embeddings: np.ndarray) -> float:
    """Seconds per slice to read embeddings back from the cache (stored first without the encoder)."""
    wanted = list(range(len(slices)))
    cache.get("timing", slices, wanted, lambda _: embeddings)
    return timed(cache.get, "timing", slices, wanted, lambda _: embeddings)[0] / len(wanted)


def schedule_costs(t: dict, unique_slices: int, relabel_rounds: int, prompts_per_slice: int,
                   iterations: int) -> dict:
    """Passes and modelled wall seconds of one training run of ``iterations`` both ways, from measured
    per-pass times ``t`` (encoder_s, decoder_1_s, decoder_k_s per call, cache_read_s per slice)."""
    online_enc = iterations * ONLINE_UNLABELED_BATCH
    online_dec = iterations * ONLINE_DECODER_PASSES
    online_s = online_enc * t["encoder_s"] + online_dec * t["decoder_1_s"]
    ours_dec_calls = relabel_rounds * unique_slices
    ours_s = unique_slices * t["encoder_s"] + ours_dec_calls * (t["decoder_k_s"] + t["cache_read_s"])
    return {"iterations": iterations,
            "online": {"encoder_passes": online_enc, "decoder_passes": online_dec, "seconds": round(online_s, 2)},
            "ours": {"encoder_passes": unique_slices, "decoder_passes": ours_dec_calls * prompts_per_slice,
                     "decoder_calls": ours_dec_calls, "relabel_rounds": relabel_rounds,
                     "seconds": round(ours_s, 2)},
            "ratio_seconds": round(ours_s / online_s, 4),
            "ratio_encoder_passes": round(unique_slices / online_enc, 4)}


def run_online(generalist: Generalist, slices: np.ndarray, iterations: int, prompt: list[SlicePrompt],
               rng: np.random.Generator) -> float:
    """Execute the released schedule: per iteration embed 4 random slices, 10 single-prompt decodes each."""
    per_image = ONLINE_DECODER_PASSES // ONLINE_UNLABELED_BATCH
    start = time.perf_counter()
    for _ in range(iterations):
        batch = slices[rng.choice(len(slices), ONLINE_UNLABELED_BATCH, replace=False)]
        for emb in generalist.embed(batch):
            for _ in range(per_image):
                generalist.decode(emb, batch.shape[1:], prompt)
    return time.perf_counter() - start


def run_ours(generalist: Generalist, cache: EmbeddingCache, cases: dict[str, np.ndarray], rounds: int,
             prompts: list[SlicePrompt]) -> float:
    """Execute our schedule: every round reads each case's embeddings through the cache (computed in the
    first round only) and decodes every slice once with all class prompts."""
    start = time.perf_counter()
    for _ in range(rounds):
        for case_id, slices in cases.items():
            embs, _ = cache.get(case_id, slices, list(range(len(slices))), generalist.embed)
            for emb in embs.values():
                generalist.decode(emb, slices.shape[1:], prompts)
    return time.perf_counter() - start


def fig_online_cost(b: Bench) -> dict:
    """Figure 2: our embed-once-decode-per-round schedule against the released online one."""
    s = b.sizes
    set_threads(os.cpu_count())
    base = b.config("online")
    info, split = b.dataset(base)
    axis, classes = base.data.slice_axis, info.foreground_classes
    # Slices of the split's unlabeled cases (headers only): what our schedule embeds once.
    unique = sum(read_image_shape(info, c)[axis] for c in split.unlabeled)
    relabel_rounds = ONLINE_ITERATIONS // base.train.iterations - 1
    case_id = split.unlabeled[0]
    slices = np.ascontiguousarray(np.moveaxis(load_image(info, case_id)[0], axis, 0))  # (S, H, W) real slices
    shape = slices.shape[1:]
    prompts = timing_prompts(shape, classes, base)
    variants = {}
    for variant, image_size, batch, enc_reps, dec_reps in (
            ("tiny", None, ONLINE_UNLABELED_BATCH, 10 * s.encoder_reps, 10 * s.decoder_reps),
            ("vit_b", s.vit_image_size, 1, s.encoder_reps, s.decoder_reps)):
        cfg = b.config(f"online_{variant}", *b.sam_overrides(variant, image_size),
                       f"generalist.sam.embed_batch_size={ONLINE_UNLABELED_BATCH}")
        gen = make_generalist(cfg.generalist, CPU)
        t = {"encoder_s": encoder_seconds(gen, slices, batch, enc_reps)}
        emb = gen.embed(slices[:1])[0]
        t["decoder_1_s"] = decoder_seconds(gen, emb, shape, prompts[:1], dec_reps)
        t["decoder_k_s"] = decoder_seconds(gen, emb, shape, prompts, dec_reps)
        t["decoder_per_prompt_k_s"] = t["decoder_k_s"] / len(prompts)
        t["cache_read_s"] = cache_read_seconds(EmbeddingCache(cfg.run_dir / "emb.zarr", gen.name), slices[:2],
                                               gen.embed(slices[:2]))
        entry = {"sam": f"{variant} at {gen.image_size}", "encoder_batch": batch,
                 "per_pass_seconds": {k: round(v, 5) for k, v in t.items()},
                 "run": schedule_costs(t, unique, relabel_rounds, len(prompts), ONLINE_ITERATIONS)}
        if variant == "tiny":
            entry["check"] = execute_check(b, cfg, gen, t, case_id, slices, prompts)
        variants[variant] = entry
        log.info("%s: %s", variant, entry)
    vit = variants["vit_b"]["run"]
    check = variants["tiny"]["check"]
    return figure(
        "online_cost", "Against the released SemiSAM cost model: our schedule / online encoder every iteration",
        {"variants": variants, "unique_slices": unique, "unlabeled_cases": len(split.unlabeled),
         "prompts_per_slice": len(prompts), "torch_threads": torch.get_num_threads(),
         "assumptions": [
             f"online (released SemiSAM): each of {ONLINE_ITERATIONS} iterations embeds the unlabeled batch "
             f"({ONLINE_UNLABELED_BATCH} slices) and runs {ONLINE_DECODER_PASSES} single-prompt decoder passes "
             f"({ONLINE_DECODER_PASSES // ONLINE_UNLABELED_BATCH} per image)",
             f"ours: every slice of the {len(split.unlabeled)} unlabeled cases ({unique} slices, image headers) is "
             f"embedded once; a relabel round every train.iterations={base.train.iterations} iterations "
             f"({relabel_rounds} rounds in {ONLINE_ITERATIONS}) reads each slice's embedding from the cache and "
             f"decodes it with one call of {len(prompts)} prompts (every class on every slice: an upper bound, "
             "only slices the specialist prompts are embedded and decoded)",
             "wall time = measured per-pass time x passes, in this process on real hippocampus slices; "
             "specialist prediction and prompt building are left out of both (the online method runs the "
             "specialist every iteration too)",
             "ViT-B encoder timed at batch 1 (CPU time per image hardly depends on the batch), tiny at batch 4",
         ]},
        vit["ratio_seconds"], "ours / online modelled wall seconds for one 6000-iteration run, SAM ViT-B",
        ("<=", 1.0, "ours costs less than the online schedule"),
        f"ViT-B: online {vit['online']['encoder_passes']} encoder + {vit['online']['decoder_passes']} decoder passes "
        f"= {vit['online']['seconds'] / 3600:.1f} h; ours {vit['ours']['encoder_passes']} + "
        f"{vit['ours']['decoder_passes']} = {vit['ours']['seconds'] / 3600:.1f} h; tiny model vs executed: "
        f"online {check['online']['model_error']:+.0%}, ours {check['ours']['model_error']:+.0%}",
        why="the unlabeled pool is large against 6000 x 4 iterations, and every round decodes every slice",
    )


def execute_check(b: Bench, cfg: RunConfig, gen: Generalist, t: dict, case_id: str, slices: np.ndarray,
                  prompts: list[SlicePrompt]) -> dict:
    """Execute both schedules with the tiny SAM on one case's slices for a short run (3 relabel rounds)
    and compare the measured wall time with the cost model's."""
    iterations, rounds = b.sizes.check_iterations, 3
    online_s = run_online(gen, slices, iterations, prompts[:1], np.random.default_rng(0))
    cache = EmbeddingCache(cfg.run_dir / "check.zarr", gen.name)
    ours_s = run_ours(gen, cache, {case_id: slices}, rounds, prompts)
    model = schedule_costs(t, len(slices), rounds, len(prompts), iterations)
    out = {"iterations": iterations, "relabel_rounds": rounds, "slices": len(slices)}
    for name, measured in (("online", online_s), ("ours", ours_s)):
        predicted = model[name]["seconds"]
        out[name] = {"measured_seconds": round(measured, 3), "model_seconds": round(predicted, 3),
                     "model_error": round(predicted / measured - 1, 4)}
    out["model_within_25pct"] = all(abs(out[n]["model_error"]) <= 0.25 for n in ("online", "ours"))
    return out


# ---------------------------------------------------------------------------------------------- figure 3


def fig_pool_scaling(b: Bench) -> dict:
    """Figure 3: relabeling throughput with 2 SAM actors against 1 (Coordinator.relabel_round, 2 CPUs).

    The two pools cannot both hold 1 CPU per actor on a 2-CPU cluster, so they take turns (1, 2, 2, 1, ...),
    each turn a fresh Coordinator relabeling a new round; the fastest round of each counts."""
    s = b.sizes
    rounds: dict[int, list[dict]] = {1: [], 2: []}
    order = [n for i in range(s.repeats) for n in ((1, 2) if i % 2 == 0 else (2, 1))]
    for n in order:
        cfg = b.pool_config(f"pool{n}", n, s.pool_cases)
        with b.coordinator(cfg) as coord:
            rounds[n].append(b.timed_round(coord, len(rounds[n]) + 1))
    runs = {}
    for n, rs in rounds.items():
        best = min(rs, key=lambda r: r["seconds"])
        runs[n] = {"rounds": rs, "cases_per_second": round(best["cases"] / best["seconds"], 3),
                   "actor_busy_fraction": round(sum(best["actor_seconds"]) / (n * best["seconds"]), 3),
                   "driver_cpu_fraction": round(best["driver_cpu_seconds"] / best["seconds"], 3)}
    ratio = runs[2]["cases_per_second"] / runs[1]["cases_per_second"]
    return figure(
        "pool_scaling", "Pool scaling: relabeling throughput, 2 SAM actors / 1 (2-core machine)",
        {"actors_1": runs[1], "actors_2": runs[2], "cases": s.pool_cases, "order": order,
         "generalist": "classical-random-walker", "actor": "num_cpus=1, torch_threads=1",
         "ray": "local, num_cpus=2", "dispatch": "Coordinator.relabel_round"},
        ratio, "cases/s with 2 actors / cases/s with 1 (fastest round of each)",
        (">=", 1.7, "2 actors give at least 1.7x"),
        f"{s.pool_cases} cases: {runs[1]['cases_per_second']:.2f} cases/s with 1 actor, "
        f"{runs[2]['cases_per_second']:.2f} with 2",
        why=(f"with 2 actors they were busy {runs[2]['actor_busy_fraction']:.0%} of the round while the driver "
             f"(manifest appends, Ray) took {runs[2]['driver_cpu_fraction']:.0%} of a core on the same 2 cores"),
    )


# ---------------------------------------------------------------------------------------------- figure 4


def plain_loop(info: DatasetInfo, cases: list[str], model: UNet, generalist: Generalist, cfg: RunConfig,
               round_index: int) -> tuple[float, list]:
    """The same load + predict + prompt + generalist work as a SAM actor, in this process, writing nothing."""
    outs = []
    start = time.perf_counter()
    with torch.inference_mode():
        for case_id in cases:
            image, _ = load_image(info, case_id, cfg.data.normalization)
            outs.append((case_id, relabel_case(case_id, image, model, generalist, None, cfg,
                                               info.foreground_classes, round_index, 0, CPU)))
    return time.perf_counter() - start, outs


def fig_pipeline_overhead(b: Bench) -> dict:
    """Figure 4: the Ray pool with one actor writing to Zarr against a plain in-process loop.

    Taking turns on the same rounds (same prompt samplers): the pool round, the plain loop, and, to tell
    where a difference comes from, the same SamWorker class in this process (writes Zarr, no Ray)."""
    s = b.sizes
    cfg = b.pool_config("overhead", 1, s.overhead_cases)
    info, split = b.dataset(cfg)
    model_args, state = b.specialist()
    # The in-process worker writes into a store of its own (another run folder) with the same config.
    local_cfg = b.pool_config("overhead_local", 1, s.overhead_cases)
    local_store = PseudoLabelStore(local_cfg.run_dir / "pseudo_labels", create=True, class_ids=info.foreground_classes)
    pool, plain, local = [], [], []
    with b.coordinator(cfg) as coord:
        local_worker = SamWorker(local_cfg.model_dump(mode="json"))  # sets this process's torch threads
        local_worker.load_specialist(0, model_args, state["student"])
        for r in range(1, s.repeats + 1):
            pool.append(b.timed_round(coord, r))
            seconds, outs = plain_loop(info, split.unlabeled, local_worker.model, local_worker.generalist, cfg, r)
            plain.append(round(seconds, 3))
            local_store.ensure_round(r, 0, local_worker.generalist.name)
            local.append(round(timed(local_worker.relabel, split.unlabeled, r, 0, model_args, [None])[0], 3))
            log.info("round %d: pool %.2f s, plain loop %.2f s, in-process SamWorker %.2f s",
                     r, pool[-1]["seconds"], plain[-1], local[-1])
    pool_s, plain_s, local_s = min(r["seconds"] for r in pool), min(plain), min(local)
    ratio = pool_s / plain_s
    return figure(
        "pipeline_overhead", "Pipeline overhead: Ray pool of one actor writing Zarr / plain in-process loop",
        {"pool_rounds": pool, "plain_seconds": plain, "in_process_worker_seconds": local,
         "cases": s.overhead_cases, "generalist": local_worker.generalist.name,
         "torch_threads": cfg.workers.sam.torch_threads,
         "split": {"zarr_writes": round(local_s / plain_s - 1, 4), "ray": round(pool_s / local_s - 1, 4)}},
        ratio, "pool round seconds / plain loop seconds (fastest of the repeats)",
        ("<=", 1.15, "the pool costs at most 15% more than a plain loop"),
        f"{s.overhead_cases} cases: pool {pool_s:.2f} s, plain loop {plain_s:.2f} s, "
        f"the same SamWorker in-process (writes, no Ray) {local_s:.2f} s",
        why=(f"writing the masks (3 Zarr arrays per case, one chunk each) adds {local_s / plain_s - 1:.0%}, "
             f"Ray and the driver {pool_s / local_s - 1:+.0%}"),
    )


# ---------------------------------------------------------------------------------------------- figure 5


def fig_trainer_overhead(b: Bench) -> dict:
    """Figure 5: training iterations/s in the TrainerWorker actor against the same class in this process
    (same config, same torch threads), taking turns round by round; the fastest round of each counts."""
    s = b.sizes
    cfg = b.config("trainer", f"train.iterations={s.trainer_iterations}", "data.max_unlabeled=20",
                   "data.max_test=0")
    cfg_dict = cfg.model_dump(mode="json")
    b.start_ray()
    actor = remote_actor(TrainerWorker, cfg.workers.trainer).remote(cfg_dict)
    in_actor, in_process = [], []
    try:
        ray.get(actor.process_info.remote())
        local = TrainerWorker(cfg_dict)  # the same class without Ray
        for _ in range(s.repeats):
            in_actor.append(timed(ray.get, actor.train_round.remote(0, None))[0])
            in_process.append(timed(local.train_round, 0, None)[0])
    finally:
        ray.kill(actor)
    actor_ips = s.trainer_iterations / min(in_actor)
    local_ips = s.trainer_iterations / min(in_process)
    ratio = local_ips / actor_ips
    return figure(
        "trainer_overhead", "Trainer overhead: iterations/s in this process / in the TrainerWorker actor",
        {"iterations": s.trainer_iterations, "actor_seconds": [round(x, 3) for x in in_actor],
         "process_seconds": [round(x, 3) for x in in_process], "actor_iterations_per_second": round(actor_ips, 3),
         "process_iterations_per_second": round(local_ips, 3), "method": cfg.train.method,
         "torch_threads": cfg.workers.trainer.torch_threads, "actor_num_cpus": cfg.workers.trainer.num_cpus},
        ratio, "in-process it/s / actor it/s (fastest round of each)", ("<=", 1.05, "the actor is at most 5% slower"),
        f"{s.trainer_iterations} {cfg.train.method} iterations: actor {actor_ips:.2f} it/s, "
        f"plain process {local_ips:.2f} it/s",
    )


# ---------------------------------------------------------------------------------------------- figure 6


def fig_memory(b: Bench) -> dict:
    """Figure 6: peak memory of the trainer and of each SAM actor (tiny SAM, 2 actors) and whether the
    actors' RSS stays flat over a relabeling round of the whole unlabeled split."""
    s = b.sizes
    overrides = [f"train.iterations={s.memory_train_iterations}", "workers.sam.num_workers=2",
                 "workers.sam.num_cpus=1", "workers.sam.torch_threads=1", "workers.trainer.num_cpus=0",
                 "workers.trainer.torch_threads=1", *b.sam_overrides("tiny", None)]
    if s.memory_cases is not None:
        overrides.append(f"data.max_unlabeled={s.memory_cases}")
    if s.memory_test_cases is not None:
        overrides.append(f"data.max_test={s.memory_test_cases}")
    cfg = b.config("memory", *overrides)
    trainer_samples = {}
    with b.coordinator(cfg, metered=True, specialist=False) as coord:
        t = coord.trainer
        trainer_samples["after_start"] = ray.get(t.memory.remote())
        ray.get(t.train_round.remote(0, None))
        ray.get(t.publish.remote(0))
        trainer_samples["after_train_0"] = ray.get(t.memory.remote())
        relabel = b.timed_round(coord, 1)
        ray.get(t.train_round.remote(1, 1))  # with the round's pseudo-labels from the store
        trainer_samples["after_train_1"] = ray.get(t.memory.remote())
        ray.get(t.evaluate.remote(1))
        trainer_samples["after_eval"] = ray.get(t.memory.remote())
        actors = ray.get([m.handle.memory.remote() for m in coord.pool.alive()])
    per_actor = []
    for a in actors:
        trimmed = a["rss_after_malloc_trim_mib"]
        per_actor.append({"pid": a["pid"], "peak_rss_mib": round(a["peak_rss_mib"], 1), **flatness(a["samples"]),
                          "rss_after_malloc_trim_mib": None if trimmed is None else round(trimmed, 1),
                          "samples": [(n, round(m, 1)) for n, m in a["samples"]]})
    trainer = {k: {"rss_mib": round(v["rss_mib"], 1), "peak_rss_mib": round(v["peak_rss_mib"], 1)}
               for k, v in trainer_samples.items()}
    worst = max(per_actor, key=lambda a: a["growth_fraction"])
    growths = ", ".join(f"{a['growth_mib']:+.0f} MiB ({a['slope_mib_per_100_cases']:.0f} MiB/100 cases, "
                        f"{a['rss_after_malloc_trim_mib']} MiB after malloc_trim)" for a in per_actor)
    return figure(
        "memory", "Memory: SAM actor RSS after 100% / after 10% of a relabeling round; trainer peak",
        {"sam_actors": per_actor, "trainer": trainer, "relabel_round": relabel, "generalist": "sam-tiny",
         "trainer_iterations_per_round": s.memory_train_iterations},
        worst["rss_after_100pct_mib"] / worst["rss_after_10pct_mib"],
        "worst SAM actor: RSS after all its cases / RSS after 10% of them",
        ("<=", 1.10, "flat: growth < 10% or < 50 MiB"),
        f"{relabel['cases']} cases on 2 actors: SAM actor peak {max(a['peak_rss_mib'] for a in per_actor):.0f} MiB, "
        f"growth {growths}; trainer peak {trainer['after_eval']['peak_rss_mib']:.0f} MiB",
        why=(f"RSS of actor {worst['pid']} grew {worst['growth_mib']:.0f} MiB; "
             f"{worst['rss_after_malloc_trim_mib']} MiB once freed heap is handed back (malloc_trim)"),
        passed=all(a["flat"] for a in per_actor),
    )


# ---------------------------------------------------------------------------------------------- driver


FIGURES: dict[str, Callable[[Bench], dict]] = {
    "embedding_cache": fig_embedding_cache,
    "online_cost": fig_online_cost,
    "pool_scaling": fig_pool_scaling,
    "pipeline_overhead": fig_pipeline_overhead,
    "trainer_overhead": fig_trainer_overhead,
    "memory": fig_memory,
}


def load_results(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {"figures": {}}


_NUMBER_LIST = re.compile(r"\[\s*(-?[\d.eE+-]+(?:,\s*-?[\d.eE+-]+)*)\s*\]")


def save_results(path: Path, results: dict) -> None:
    """Write the results as indented JSON with lists of numbers kept on one line."""
    text = json.dumps(results, indent=1, default=float)
    text = _NUMBER_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    atomic_write_text(path, text + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.perf", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (~2 min), written to perf_quick.json")
    p.add_argument("--only", nargs="+", choices=list(FIGURES), metavar="NAME",
                   help=f"run only these figures ({', '.join(FIGURES)})")
    p.add_argument("--missing", action="store_true", help="run only the figures not yet in the output file")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MSD Hippocampus folder (read in place)")
    p.add_argument("--out", type=Path, default=None, help="results file (default benchmarks/results/perf.json)")
    p.add_argument("--keep-scratch", action="store_true", help="keep the scratch run folders")
    p.add_argument("-v", "--verbose", action="store_true", help="library INFO logs too")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose, log)
    if not (args.data / "splits.json").is_file():
        log.error("%s has no splits.json: point --data at the MSD Hippocampus folder", args.data)
        return 2
    out = args.out or RESULTS / ("perf_quick.json" if args.quick else "perf.json")
    results = load_results(out)
    names = args.only or list(FIGURES)
    if args.missing:
        names = [n for n in names if results["figures"].get(n, {}).get("status") not in ("pass", "short")]
    log.info("figures to run: %s", ", ".join(names) if names else f"none (all are in {out})")
    sizes = QUICK if args.quick else FULL
    command = "python -m benchmarks.perf " + " ".join(sys.argv[1:] if argv is None else argv)
    machine = machine_info()
    scratch = Path(tempfile.mkdtemp(prefix="semisam-perf-"))
    bench = Bench(sizes, args.data.resolve(), scratch)
    failed = 0
    try:
        for name in names:
            log.info("figure %s ...", name)
            load0 = os.getloadavg()[0]
            try:
                seconds, entry = timed(FIGURES[name], bench)
            except Exception as e:  # one failed figure is reported and the others still run
                log.exception("figure %s failed", name)
                entry, seconds, failed = {"name": name, "status": "error", "error": f"{type(e).__name__}: {e}"}, 0.0, failed + 1
            entry.update({"command": command.strip(), "machine": machine, "quick": args.quick,
                          "sizes": asdict(sizes), "seconds": round(seconds, 1),
                          "load_average_1min_before": round(load0, 2),
                          "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
            results["figures"][name] = entry
            results["updated"] = entry["date"]
            save_results(out, results)
            log.info("figure %s: %s in %.0f s: %s", name, entry.get("status"), seconds,
                     entry.get("summary", entry.get("error")))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if not args.keep_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    log.info("results in %s", out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
