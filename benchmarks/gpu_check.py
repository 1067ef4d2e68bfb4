"""The GPU path in one script, for a machine with CUDA (a lent device; never CI):

    python -m benchmarks.gpu_check --out OUT_DIR [--data ACDC_DIR]

1. ``benchmarks.trainer_speed --quick --device cuda``: eager fp32 against the chosen path (bf16 or fp16
   autocast, channels_last, compiled) and its parts, same seed and batches, test Dice of each;
2. the SAM image encoder (LiteMedSAM) on CUDA: eager fp32 against every precision and backend the config
   offers, seconds per slice (synchronised) and mask Dice against eager fp32 on the labels' boxes;
3. a short ``semisam run conf/acdc.yaml`` on CUDA (trainer and SAM actors each given a GPU share), its
   per-round Dice and the device each actor ran on;
4. ``benchmarks.cuda_relabel_check`` (CPU and GPU give the same pseudo-labels).

Each step writes its JSON into OUT_DIR; a step that cannot run (no CUDA, no ACDC) is recorded with the
reason, and the others still run. ``summary.json`` lists them. ACDC defaults to ../shared/data/acdc; on a
device machine, copy its folder into the checkout (ignored) and pass ``--data``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import ROOT, SHARED, machine_info

log = logging.getLogger("benchmarks.gpu_check")


def _step(name: str, cmd: list[str], out: Path, timeout: int, env: dict | None = None) -> dict:
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"step": name, "ok": False, "reason": f"timed out after {timeout} s"}
    (out / f"{name}.log").write_text(proc.stdout + "\n" + proc.stderr)
    last = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("{")), None)
    return {"step": name, "ok": proc.returncode == 0, "returncode": proc.returncode, "seconds": round(time.time() - t0),
            "result": json.loads(last) if last else None}


def encoder_on_cuda(out: Path, data: Path, slices: int = 20) -> dict:
    """LiteMedSAM's encoder on CUDA per precision and backend: s/slice and mask Dice against eager fp32."""
    import statistics

    import torch

    import benchmarks.generalist_speed as gs
    from benchmarks.generalist_speed import acdc_slices
    from pipeline.config import SamConfig
    from pipeline.generalist.sam import SamGeneralist, load_sam
    from pipeline.metrics import dice
    gs.ACDC = data
    dev = torch.device("cuda", 0)
    base = SamConfig(variant="lite_medsam", precision="fp32", encoder_backend="eager")
    sam = load_sam(base, dev)
    variants = {f"{b} {p}": SamGeneralist(sam, base.model_copy(update={"precision": p, "encoder_backend": b}), dev)
                for b in ("eager", "compile") for p in ("fp32", "bf16", "fp16")}
    rows = {}
    samples = acdc_slices(slices)
    ref_masks = []
    for name, gen in variants.items():
        times, agree = [], []
        for i, (img, boxes) in enumerate(samples):
            x = gen.preprocess(img[None]).to(dev)
            with torch.inference_mode():
                torch.cuda.synchronize()
                t = time.perf_counter()
                emb = gen.encoder(x)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            masks = gen.decode(emb[0].float().cpu().numpy(), img.shape, boxes).masks
            if name == "eager fp32":
                ref_masks.append(masks)
            agree += [dice(a, b) for a, b in zip(masks, ref_masks[i], strict=True)]
        rows[name] = {"s_per_slice": statistics.median(times[1:]), "first_s": times[0],
                      "dice_vs_eager_fp32_mean": float(sum(agree) / len(agree)), "dice_min": float(min(agree))}
    result = {"device": torch.cuda.get_device_name(0), "slices": len(samples), "paths": rows}
    (out / "encoder_cuda.json").write_text(json.dumps(result, indent=1))
    return {"step": "encoder_cuda", "ok": True, "result": {k: round(v["s_per_slice"], 4) for k, v in rows.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=SHARED / "acdc", help="the ACDC folder (SSL4MIS layout)")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per step")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    steps: list[dict] = []
    if not torch.cuda.is_available():
        steps.append({"step": "all", "ok": False, "reason": "no CUDA device is visible"})
    else:
        py = sys.executable
        steps.append(_step("cuda_relabel_check", [py, "-m", "benchmarks.cuda_relabel_check", "--out",
                                                  str(args.out / "cuda_relabel_check.json")], args.out, args.timeout))
        if not args.data.exists():
            steps.append({"step": "acdc", "ok": False, "reason": f"{args.data} is absent: pass --data"})
        else:
            env = {"SEMISAM_ACDC": str(args.data)}
            steps.append(_step("trainer_speed", [py, "-m", "benchmarks.trainer_speed", "--quick", "--device", "cuda",
                                                 "--paths", "eager_fp32", "chosen", "compile_fp32", "bf16",
                                                 "--out", str(args.out / "trainer_speed_cuda.json")],
                               args.out, args.timeout, env))
            try:
                steps.append(encoder_on_cuda(args.out, args.data))
            except Exception as e:  # noqa: BLE001 - recorded, the other steps still run
                steps.append({"step": "encoder_cuda", "ok": False, "reason": f"{type(e).__name__}: {e}"})
            semisam = str(Path(py).parent / "semisam")
            steps.append(_step("acdc_run", [semisam, "run", str(ROOT / "conf" / "acdc.yaml"), f"data.root={args.data}",
                                            f"output_dir={args.out / 'runs'}", "device=cuda", "rounds=2",
                                            "train.iterations=200", "data.max_unlabeled=16", "data.max_test=8",
                                            "workers.local_num_gpus=1", "workers.trainer.num_gpus=0.5",
                                            "workers.sam.num_workers=1", "workers.sam.num_gpus=0.5"],
                               args.out, args.timeout, env))
    summary = {"machine": machine_info(), "steps": steps}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({s["step"]: s.get("ok") for s in steps}))
    return 0 if all(s.get("ok") for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
