"""LiteMedSAM in fp32 and bf16 on the CPU: encoder time and mask agreement on real ACDC slices.

    .venv/bin/python -m benchmarks.lite_medsam_precision [--volumes 4]

Embeds the first ``--volumes`` even-numbered volumes of ACDC's test.list (../shared/data/acdc) in both
precisions (batch 1, 2 threads), decodes box prompts taken from the labels (every class with >= 4 pixels
on a slice), and reports the encoder seconds per slice, each precision's Dice against the labels per
class, and the Dice between the fp32 and bf16 masks of every box. Writes
``benchmarks/results/lite_medsam_precision.json``. The question (``conf/acdc.yaml`` uses bf16): does bf16
change the masks? Issue 19 asks for the full speed study (compile, ONNX, batching).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time

import h5py
import numpy as np
import torch

from benchmarks.common import ROOT, machine_info
from pipeline.atomic import atomic_write_text
from pipeline.config import SamConfig
from pipeline.generalist.base import SlicePrompt
from pipeline.generalist.sam import SamGeneralist, load_sam
from pipeline.metrics import dice

ACDC = ROOT.parent / "shared" / "data" / "acdc"
OUT = ROOT / "benchmarks" / "results" / "lite_medsam_precision.json"


def gt_boxes(label: np.ndarray) -> list[SlicePrompt]:
    out = []
    for c in (1, 2, 3):
        m = label == c
        if m.sum() >= 4:
            r, cc = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
            out.append(SlicePrompt(c, np.zeros((0, 2), np.float32), np.zeros(0, np.int32),
                                   np.array([cc[0], r[0], cc[-1], r[-1]], np.float32)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lite_medsam_precision", description=__doc__.split("\n")[0])
    p.add_argument("--volumes", type=int, default=4)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    gens = {}
    for prec in ("fp32", "bf16"):
        cfg = SamConfig(variant="lite_medsam", precision=prec, embed_batch_size=1)
        gens[prec] = SamGeneralist(load_sam(cfg, torch.device("cpu")), cfg, torch.device("cpu"))
    cases = (ACDC / "test.list").read_text().split()[: 2 * args.volumes: 2]
    seconds = {p: 0.0 for p in gens}
    dices: dict[str, dict[int, list[float]]] = {p: {1: [], 2: [], 3: []} for p in gens}
    agreement: list[float] = []
    slices_total = 0
    for case in cases:
        with h5py.File(ACDC / "data" / f"{case}.h5", "r") as f:
            img, lab = f["image"][:].astype(np.float32), f["label"][:]
        slices_total += len(img)
        masks = {}
        for prec, g in gens.items():
            t = time.perf_counter()
            emb = g.embed(img)
            seconds[prec] += time.perf_counter() - t
            masks[prec] = []
            for s in range(len(img)):
                prompts = gt_boxes(lab[s])
                if prompts:
                    res = g.decode(emb[s], img[s].shape, prompts)
                    for pr, m in zip(prompts, res.masks, strict=True):
                        dices[prec][pr.class_id].append(dice(m, lab[s] == pr.class_id))
                    masks[prec].extend(res.masks)
        agreement += [dice(a, b) for a, b in zip(masks["fp32"], masks["bf16"], strict=True)]
    result = {
        "cases": cases, "slices": slices_total, "boxes": len(agreement),
        "encoder_seconds_per_slice": {p: round(s / slices_total, 3) for p, s in seconds.items()},
        "dice_vs_labels": {p: {str(c): round(float(np.mean(v)), 4) for c, v in d.items()} for p, d in dices.items()},
        "fp32_vs_bf16_mask_dice": {"mean": round(float(np.mean(agreement)), 4),
                                   "min": round(float(np.min(agreement)), 4)},
        "command": "python -m benchmarks.lite_medsam_precision " + " ".join(argv or []),
        "machine": machine_info(), "date": dt.datetime.now(dt.timezone.utc).isoformat(),
    }
    atomic_write_text(OUT, json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("slices", "boxes", "encoder_seconds_per_slice", "dice_vs_labels",
                                             "fp32_vs_bf16_mask_dice")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
