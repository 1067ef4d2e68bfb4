"""What a prompt ensemble costs with SAM: image encoder vs mask decoder time per slice, by ensemble size.

    .venv/bin/python -m benchmarks.sam_ensemble_cost                      # this machine (CPU, or its GPU)
    .venv/bin/python -m benchmarks.sam_ensemble_cost --variant vit_b --device cuda --out results.json

SAM ViT-B (or another variant) built from ``segment_anything``'s classes with random weights (timing does
not depend on the weights; none can be downloaded here), wrapped in :class:`SamGeneralist` exactly as the
SAM actors use it. Slices are hippocampus-sized (50 x 35); each is padded to SAM's 1024 input. For each
precision: the encoder's time per slice (batches of ``--batch``), then the decoder's time per slice when
it decodes N prompt sets x 2 classes in one call (:func:`pipeline.prompts.ensemble_prompts`, as
``pipeline.relabel`` does), for N in ``--members``. The encoder runs once per slice per run (cached); the
decoder once per slice per relabel round, so the ensemble's extra cost per round is
``decode(N) - decode(1)`` against ``decode(1)`` (cached) or ``encode + decode(1)`` (uncached).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import PromptConfig, SamConfig
from pipeline.generalist.sam import SamGeneralist, build_sam_model
from pipeline.prompts import ensemble_prompts

log = logging.getLogger("benchmarks.sam_ensemble_cost")
RESULTS = Path(__file__).resolve().parent / "results" / "sam_ensemble_cost.json"


def _slice_and_probs(rng: np.random.Generator, h: int = 50, w: int = 35) -> tuple[np.ndarray, np.ndarray]:
    """A slice float32 (H, W) and a specialist softmax (3, H, W) with two touching blobs (classes 1, 2)."""
    yy, xx = np.mgrid[:h, :w]
    p1 = np.clip(1.3 - np.hypot(yy - 20, xx - 15) / 8, 0.01, 0.97)
    p2 = np.clip(1.3 - np.hypot(yy - 32, xx - 20) / 7, 0.01, 0.97) * (1 - p1)
    probs = np.stack([np.clip(1 - p1 - p2, 0, 1), p1, p2])
    image = (100 * p1 + 60 * p2 + rng.normal(0, 5, (h, w))).astype(np.float32)
    return image, probs / probs.sum(0)


def _time(fn, repeats: int, sync) -> float:
    fn()  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def measure(variant: str, device: torch.device, precisions: list[str], members: list[int], batch: int,
            repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    sam = build_sam_model(variant).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    image, probs = _slice_and_probs(rng)
    pred = probs.argmax(0).astype(np.uint8)
    out = []
    for precision in precisions:
        g = SamGeneralist(sam, SamConfig(variant=variant, precision=precision, embed_batch_size=batch), device)
        slices = np.repeat(image[None], batch, 0)
        encode_s = _time(lambda: g.embed(slices), repeats, sync) / batch  # noqa: B023
        embedding = g.embed(image[None])[0]
        row = {"variant": variant, "device": str(device), "precision": precision,
               "encode_ms_per_slice": round(1000 * encode_s, 2), "decode_ms_per_slice": {}}
        for n in members:
            prompts = ensemble_prompts(pred, probs, [1, 2], PromptConfig(ensemble=n), np.random.default_rng(1),
                                       np.random.default_rng(2))
            flat = [p for m in prompts for p in m]
            decode_s = _time(lambda: g.decode(embedding, image.shape, flat), repeats, sync)  # noqa: B023
            row["decode_ms_per_slice"][str(n)] = round(1000 * decode_s, 2)
            log.info("%s %s %s: encode %.1f ms/slice, decode N=%d (%d prompts) %.2f ms/slice", variant, device,
                     precision, 1000 * encode_s, n, len(flat), 1000 * decode_s)
        d1 = row["decode_ms_per_slice"][str(members[0])]
        row["extra_per_member_vs_cached_round"] = {
            str(n): round((row["decode_ms_per_slice"][str(n)] - d1) / d1, 3) for n in members}
        row["extra_vs_uncached_round"] = {
            str(n): round((row["decode_ms_per_slice"][str(n)] - d1) / (row["encode_ms_per_slice"] + d1), 4)
            for n in members}
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sam_ensemble_cost", description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="vit_b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", nargs="+", default=None, help="default: fp32 bf16 on cuda, fp32 on cpu")
    p.add_argument("--members", type=int, nargs="+", default=[1, 3, 5, 8])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=None, help="default: 20 on cuda, 2 on cpu")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    precisions = args.precision or (["fp32", "bf16"] if cuda else ["fp32"])
    rows = measure(args.variant, device, precisions, args.members, args.batch if cuda else 2,
                   args.repeats or (20 if cuda else 2))
    machine = {"device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
               "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}
    result = {"command": "python -m benchmarks.sam_ensemble_cost " + " ".join(sys.argv[1:] if argv is None else argv),
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine,
              "rows": rows}
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    runs = [r for r in previous.get("runs", []) if r["machine"]["device_name"] != machine["device_name"]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": [*runs, result]}, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
