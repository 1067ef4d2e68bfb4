"""Adapted vs frozen LiteMedSAM on ACDC: per class, from label boxes and from wrong (jittered) boxes.

    PYTHONPATH=$PWD nice -n 10 .venv/bin/python -m benchmarks.adapted_generalist

Fit: the adaptation (:mod:`pipeline.generalist.adapt`) on the slices of the first 3 labeled patients (the
first 68 lines of ``train_slices.list`` = the first 6 frames of ``train.list``), as a run's SAM actor does
it. Score: a fixed subset of ``val.list`` slices (never used to fit): from each of the 20 val frames the
slices at 1/4, 1/2 and 3/4 of its depth. Rows: the frozen and the adapted generalist, prompted with (a) the
labels' tight boxes and (b) the same boxes jittered with the configured distribution (a stand-in for a
round-0 specialist's boxes; see the JSON's ``notes``). Result: ``benchmarks/results/adapted_generalist.json``.
Embeddings come from an embedding cache under ``runs/adapted_generalist/`` (fp32, compiled encoder), so a
rerun costs only the decoding and the adaptation.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time

import numpy as np
import torch

from benchmarks.common import RESULTS, ROOT, SHARED, machine_info, setup_logging
from pipeline.atomic import atomic_write_text
from pipeline.config import AdaptConfig, load_config
from pipeline.data.dataset import load_image, load_label, read_data
from pipeline.data.splits import resolve_split
from pipeline.generalist.adapt import adapt_slices, fit_decoder, jitter_box, label_box, slices_to_embed
from pipeline.generalist.base import SlicePrompt
from pipeline.generalist.factory import make_generalist
from pipeline.generalist.sam import sam_embedding_cache
from pipeline.metrics import dice

log = logging.getLogger("benchmarks.adapted_generalist")

OUT = RESULTS / "adapted_generalist.json"
WORKDIR = ROOT / "runs" / "adapted_generalist"
CPU = torch.device("cpu")
OVERRIDES = [f"data.root={SHARED / 'acdc'}", "generalist.sam.precision=fp32", "generalist.sam.encoder_backend=compile",
             f"output_dir={ROOT / 'runs'}", "name=adapted_generalist"]
"""conf/acdc.yaml (3 labeled patients) with the encoder in fp32 (these cores have no native bf16), compiled."""


def val_slices(depth: int) -> list[int]:
    """The scored slices of a val frame of ``depth`` slices: at 1/4, 1/2 and 3/4 of its depth."""
    return sorted({depth // 4, depth // 2, (3 * depth) // 4})


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def load_fit_items(cfg, info, labeled: list[str], gen, cache) -> list:
    """The adaptation's slices: every labeled slice with a class, embeddings through the cache."""
    items = []
    for case_id in labeled:
        image, _ = load_image(info, case_id, cfg.data.normalization)
        labels = load_label(info, case_id)
        wanted = slices_to_embed(labels, info.foreground_classes, cfg.generalist.adapt.min_pixels)
        emb, _ = cache.get(case_id, np.ascontiguousarray(image), wanted, gen.embed)
        items += adapt_slices(emb, labels, info.foreground_classes, cfg.generalist.adapt.min_pixels)
    return items


def load_val(cfg, info, gen, cache, max_frames: int | None) -> list[tuple[np.ndarray, np.ndarray, tuple[int, int]]]:
    """(embedding (C, E, E), label (H, W), (case index, slice)) of every scored val slice."""
    frames = [ln.strip() for ln in (SHARED / "acdc" / "val.list").read_text().splitlines() if ln.strip()]
    out = []
    for i, case_id in enumerate(frames[:max_frames]):
        image, _ = load_image(info, case_id, cfg.data.normalization)
        labels = load_label(info, case_id)
        wanted = val_slices(image.shape[0])
        emb, _ = cache.get(case_id, np.ascontiguousarray(image), wanted, gen.embed)
        out += [(emb[s], labels[s], (i, s)) for s in wanted]
    return out


def box_sets(val: list, class_ids: list[int], jitter: AdaptConfig, seed: int) -> dict[str, list[list[SlicePrompt]]]:
    """Per scored slice, the prompts of every class present (>= 4 px): ``label`` the label's tight box,
    ``jittered`` that box made wrong by ``jitter`` (one fixed draw, the same for every generalist)."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[list[SlicePrompt]]] = {"label": [], "jittered": []}
    for _, label, _ in val:
        tight, wrong = [], []
        for c in class_ids:
            if (label == c).sum() < 4:
                continue
            box = label_box(label == c)
            none = (np.zeros((0, 2), np.float32), np.zeros(0, np.int32))
            tight.append(SlicePrompt(c, *none, box))
            wrong.append(SlicePrompt(c, *none, jitter_box(box, label.shape, jitter, rng)))
        out["label"].append(tight)
        out["jittered"].append(wrong)
    return out


def score(gen, val: list, prompts: list[list[SlicePrompt]], class_ids: list[int]) -> dict:
    """Mean Dice per class over the (slice, class) pairs prompted, and their count."""
    got: dict[int, list[float]] = {c: [] for c in class_ids}
    with torch.inference_mode():
        for (emb, label, _), ps in zip(val, prompts, strict=True):
            if ps:
                res = gen.decode(emb, label.shape, ps)
                for p, m in zip(ps, res.masks, strict=True):
                    got[p.class_id].append(dice(m, label == p.class_id))
    return {str(c): {"dice": round(float(np.mean(v)), 4), "n": len(v)} for c, v in got.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=None, help="generalist.adapt.iterations (default: config's)")
    ap.add_argument("--max-val-frames", type=int, default=None, help="score only the first N val frames")
    ap.add_argument("--no-class-tokens", action="store_true", help="adapt without class tokens (ablation)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: see the notes)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more config overrides, e.g. generalist.adapt.slices_per_step=2")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    setup_logging(args.verbose, log)
    logging.getLogger("pipeline.generalist.adapt").setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    extra = [f"generalist.adapt.iterations={args.iterations}"] if args.iterations else []
    if args.no_class_tokens:
        extra.append("generalist.adapt.class_tokens=false")
    cfg = load_config(ROOT / "conf" / "acdc.yaml", [*OVERRIDES, "generalist.adapt.enabled=true", *extra, *args.set])
    info = read_data(cfg.data)
    split = resolve_split(cfg.data, info)
    classes = info.foreground_classes
    gen = make_generalist(cfg.generalist, CPU)
    cache = sam_embedding_cache(WORKDIR / "embedding_cache", gen.cfg, cfg.data.slice_axis, cfg.generalist.cache_dtype)

    t0, c0 = time.perf_counter(), _cpu_s()
    items = load_fit_items(cfg, info, split.labeled, gen, cache)
    val = load_val(cfg, info, gen, cache, args.max_val_frames)
    embed = {"wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(_cpu_s() - c0, 1), **cache.stats()}
    log.info("embeddings: %d fit slices, %d val slices (%s)", len(items), len(val), embed)
    prompts = box_sets(val, classes, cfg.generalist.adapt, seed=1)

    rows = {f"frozen|{k}": score(gen, val, ps, classes) for k, ps in prompts.items()}
    log.info("frozen: %s", rows)
    t0, c0 = time.perf_counter(), _cpu_s()
    fitted = fit_decoder(gen, items, classes, cfg.generalist.adapt, cfg.seed)
    fit = {"wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(_cpu_s() - c0, 1), **fitted["stats"]}
    log.info("fitted: %s", fit)
    rows.update({f"adapted|{k}": score(gen, val, ps, classes) for k, ps in prompts.items()})
    log.info("adapted: %s", {k: v for k, v in rows.items() if k.startswith("adapted")})

    result = {
        "fit_cases": split.labeled, "fit_slices": len(items), "fit_prompts": fitted["stats"]["prompts"],
        "val_frames": (SHARED / "acdc" / "val.list").read_text().split()[:args.max_val_frames],
        "val_slices": len(val), "val_slice_rule": "slices at 1/4, 1/2, 3/4 of each frame's depth",
        "classes": {str(c): info.labels.get(c, str(c)) for c in classes},
        "adapt": cfg.generalist.adapt.model_dump(mode="json"), "threads": args.threads,
        "embedding": embed, "fit": fit, "rows": rows,
        "notes": [
            "label: the label's tight box (no margin); jittered: that box moved/scaled/margined by the adapt "
            "jitter (shift_std, log_scale_std, margin_min..max), one draw shared by frozen and adapted",
            "no round-0 specialist was trained (not within the time box on 2 shared cores): the jittered "
            "label boxes stand in for a specialist's boxes, and there is no specialist Dice row",
            "fit: the first 6 frames of train.list (= the first 68 lines of train_slices.list), slices with a "
            "class of >= 4 px; val slices are never used to fit",
        ],
        "command": "python -m benchmarks.adapted_generalist " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(), "date": time.strftime("%Y-%m-%d"),
    }
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
