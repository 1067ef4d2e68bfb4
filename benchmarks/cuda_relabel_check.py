"""Does one relabel step give the same pseudo-labels on a GPU as on the CPU? (a check for GPU machines)

    python -m benchmarks.cuda_relabel_check --out result.json

A random-weight specialist (2D U-Net) and a tiny SAM (``segment_anything`` classes, random weights) relabel
one synthetic volume with a 3-member prompt ensemble, once on ``cpu`` and once on ``cuda``, in fp32;
everything random is seeded, so the two runs differ only by the devices' floating-point arithmetic.
Reported: the share of voxels whose specialist label, pseudo-label and uncertainty are equal, and
whether the prompts written to the manifest are the same. Needs no data set, no Ray and no weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from pipeline.config import config_from_dict
from pipeline.generalist.sam import SamGeneralist, build_sam_model
from pipeline.models.unet import build_model, model_args
from pipeline.relabel import relabel_case


def _volume(rng: np.random.Generator, shape=(12, 48, 40)) -> np.ndarray:
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    blob = np.hypot(y - 24, z - 20) < 9 + 2 * np.sin(x / 3)
    return ((blob * 2.0) + rng.normal(0, 0.5, shape)).astype(np.float32)


def relabel_on(device: torch.device, image: np.ndarray) -> dict:
    cfg = config_from_dict({"data": {"root": ".", "labeled": ["a"], "unlabeled": ["case_000"], "test": ["b"]}, "device": device.type, "prompts": {"ensemble": 3},
                            "model": {"kind": "unet2d", "base_channels": 8, "depth": 2, "patch_size": [48, 40]},
                            "generalist": {"backend": "sam", "sam": {"variant": "tiny"}}})
    torch.manual_seed(0)
    model = build_model(model_args(cfg.model, 3)).eval()
    torch.manual_seed(1)
    sam = build_sam_model("tiny")
    model, sam = model.to(device), sam.to(device)
    generalist = SamGeneralist(sam, cfg.generalist.sam, device)
    out = relabel_case("case_000", image, model, generalist, None, cfg, [1, 2], 1, 0, device)
    return {"specialist": out.specialist, "pseudo": out.pseudo_label, "uncertainty": out.uncertainty,
            "prompts": [r["prompts"] + r["ensemble_prompts"] for r in out.rows]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cuda_relabel_check", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to compare", file=sys.stderr)
        return 2
    image = _volume(np.random.default_rng(0))
    cpu, gpu = relabel_on(torch.device("cpu"), image), relabel_on(torch.device("cuda"), image)
    result = {
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "specialist_equal": float((cpu["specialist"] == gpu["specialist"]).mean()),
        "pseudo_equal": float((cpu["pseudo"] == gpu["pseudo"]).mean()),
        "uncertainty_equal": float((cpu["uncertainty"] == gpu["uncertainty"]).mean()),
        "prompts_equal_slices": float(np.mean([a == b for a, b in zip(cpu["prompts"], gpu["prompts"], strict=True)])),
        "pseudo_fg_voxels": [int((cpu["pseudo"] > 0).sum()), int((gpu["pseudo"] > 0).sum())],
        "uncertain_voxels": [int((cpu["uncertainty"] > 0).sum()), int((gpu["uncertainty"] > 0).sum())],
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
