"""LiteMedSAM's image encoder on the CPU: every way to run it, its time per slice and its masks (issue 19).

    .venv/bin/python -m benchmarks.generalist_speed [--quick] [--slices N]

Paths: eager fp32 (the reference), bf16 autocast, bf16 weights (``model.to(torch.bfloat16)``),
channels_last (fp32, bf16), int8 dynamic quantisation of the Linear layers, ``torch.compile`` with frozen
weights (fp32, bf16; the library's ``encoder_backend: compile``), ONNX Runtime and OpenVINO (fp32, bf16)
when importable (optional, not project dependencies: ``pip install onnx onnxruntime openvino``).
Slices: real ACDC slices of test.list (../shared/data/acdc) with at least one label box, in order; 100
(``--quick``: 8; ``--quick`` also leaves out channels_last bf16). On a CPU without native bf16 every bf16 path
is left out (emulated bf16 measured 20-60x fp32 there: the benchmark could not finish in 10 minutes). Each slice goes through every path in
turn (the order rotates per slice, so a load from another process falls on every path alike); the
per-slice times give medians. Every path's
embedding is decoded with the same fp32 decoder on the label boxes (every class with >= 4 pixels, as
``lite_medsam_precision.py``) and its masks are compared with eager fp32's (Dice per box).

Batching: bf16 autocast eager and compiled at batch 1, 4, 8, 16 (``--quick``: 1, 4), per-slice time.
FLOPs: counted once on one slice (``torch.utils.flop_counter``); peak: an estimate from the clock in
/proc/cpuinfo and FLOPs per cycle of the core (``peak_estimate``). One JSON line on stdout; the full
table in ``benchmarks/results/generalist_speed.json``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import torch

from benchmarks.common import ROOT, machine_info, setup_logging
from benchmarks.lite_medsam_precision import gt_boxes
from pipeline import hardware
from pipeline.atomic import atomic_write_text
from pipeline.config import SamConfig
from pipeline.generalist.base import SlicePrompt
from pipeline.generalist.encoder_runtime import (
    EncoderRunner,
    UnderAutocast,
    cpu_has_native_bf16,
    openvino_available,
)
from pipeline.generalist.sam import SamGeneralist, load_sam
from pipeline.metrics import dice

ACDC = ROOT.parent / "shared" / "data" / "acdc"
OUT = ROOT / "benchmarks" / "results" / "generalist_speed.json"
QUICK_OUT = ROOT / "benchmarks" / "results" / "generalist_speed_quick.json"  # --quick never overwrites OUT
CPU = torch.device("cpu")
THREADS = 2
log = logging.getLogger("benchmarks.generalist_speed")

Encoder = Callable[[torch.Tensor], torch.Tensor]
"""images float32 (B, 3, 256, 256) -> embeddings (B, 256, 64, 64), any float dtype."""


def acdc_slices(n: int) -> list[tuple[np.ndarray, list[SlicePrompt]]]:
    """The first ``n`` slices (H, W) of test.list's volumes, in order, that have at least one label box."""
    out = []
    for case in (ACDC / "test.list").read_text().split():
        with h5py.File(ACDC / "data" / f"{case}.h5", "r") as f:
            img, lab = f["image"][:].astype(np.float32), f["label"][:]
        for s in range(len(img)):
            boxes = gt_boxes(lab[s])
            if boxes:
                out.append((img[s], boxes))
            if len(out) == n:
                return out
    return out


def peak_estimate() -> dict:
    """Peak FLOP/s of this machine's cores, an estimate: cores x clock (``cpu MHz`` of /proc/cpuinfo, the
    nominal clock a VM reports; boost is not seen) x FLOPs per cycle per core. AMD family 26 (Zen 5) has
    two full-width 512-bit FMA pipes: fp32 2 x 16 lanes x 2 = 64 FLOPs/cycle; ``vdpbf16ps`` does 32 bf16
    products and sums into 16 fp32 lanes per instruction (64 FLOPs), two a cycle: 128. Zen 4 (family 25)
    double-pumps 256-bit pipes: half of each. Other CPUs: the Zen 4 numbers, marked as a guess."""
    info = Path("/proc/cpuinfo").read_text().splitlines()
    field = {ln.split(":", 1)[0].strip(): ln.split(":", 1)[1].strip() for ln in reversed(info) if ":" in ln}
    mhz, family = float(field.get("cpu MHz", "0")), int(field.get("cpu family", "0"))
    per_cycle = {26: (64, 128), 25: (32, 64)}.get(family, (32, 64))
    flags = field.get("flags", "").split()
    cores = min(THREADS, torch.get_num_threads())
    return {"cores": cores, "clock_ghz": round(mhz / 1000, 3), "cpu_family": family,
            "fp32_flops_per_cycle": per_cycle[0], "bf16_flops_per_cycle": per_cycle[1],
            "fp32_gflops": round(cores * mhz / 1000 * per_cycle[0], 1),
            "bf16_gflops": round(cores * mhz / 1000 * per_cycle[1], 1),
            "avx512_bf16": "avx512_bf16" in flags, "amx": any(f.startswith("amx") for f in flags),
            "guess": family not in (25, 26)}


def encoder_gflops(encoder: torch.nn.Module) -> float:
    """GFLOPs of one 256 x 256 slice through the encoder (a multiply-add counts 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        encoder(torch.rand(1, 3, 256, 256))
    return counter.get_total_flops() / 1e9


def _cast_input(enc: torch.nn.Module, dtype: torch.dtype, channels_last: bool) -> Encoder:
    """An eager encoder whose weights were converted (dtype, memory format): the input is converted alike."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return lambda x: enc(x.to(dtype).contiguous(memory_format=fmt))


def torch_paths(encoder: torch.nn.Module, quick: bool, bf16: bool) -> dict[str, tuple[Encoder, str]]:
    """name -> (encoder, peak dtype) of the eager PyTorch paths (no set-up time); the bf16 ones only with
    ``bf16`` (a CPU with native bf16: emulated, they cost 20-60x fp32 and cannot finish in minutes)."""
    paths = {"eager fp32": (EncoderRunner(encoder, CPU, "fp32", "eager"), "fp32")}
    if bf16:
        paths["eager bf16 autocast"] = (EncoderRunner(encoder, CPU, "bf16", "eager"), "bf16")
        paths["eager bf16 weights"] = (_cast_input(copy.deepcopy(encoder).to(torch.bfloat16), torch.bfloat16, False),
                                       "bf16")
    cl = copy.deepcopy(encoder).to(memory_format=torch.channels_last)
    paths["channels_last fp32"] = (_cast_input(cl, torch.float32, True), "fp32")
    if not quick and bf16:
        cl_ac = UnderAutocast(cl, CPU, "bf16")
        paths["channels_last bf16 autocast"] = (_cast_input(cl_ac, torch.float32, True), "bf16")
    try:
        q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(encoder), {torch.nn.Linear}, dtype=torch.qint8)
        paths["eager int8 dynamic (Linear)"] = (q, "int8")
    except Exception as e:  # noqa: BLE001 - a path that cannot be built is reported, not fatal
        log.warning("int8 dynamic quantisation unavailable: %s", e)
    return paths


def compiled_paths(encoder: torch.nn.Module, x: torch.Tensor, bf16: bool) -> tuple[dict[str, tuple[Encoder, str]], dict]:
    """The library's compiled encoders (``compile``, and ``openvino`` when installed; fp32, and bf16 with
    ``bf16``) and their first-call (build) seconds."""
    paths, setup = {}, {}
    backends = ["compile", *(["openvino"] if openvino_available() else [])]
    for backend in backends:
        for precision in ("fp32", "bf16") if bf16 else ("fp32",):
            runner = EncoderRunner(encoder, CPU, precision, backend)
            name = f"{backend} {precision}" + (" (library backend)" if backend == "openvino" else "")
            t = time.perf_counter()
            with torch.inference_mode():
                runner(x)
            setup[name] = round(time.perf_counter() - t, 1)
            if runner.backend != backend:
                log.warning("the %s encoder at %s failed; the path is left out", backend, precision)
                continue
            paths[name] = (runner, precision)
    return paths, setup


def runtime_paths(encoder: torch.nn.Module, x: torch.Tensor, bf16: bool) -> tuple[dict[str, tuple[Encoder, str]], dict]:
    """ONNX Runtime (fp32) and OpenVINO (fp32, bf16) from one ONNX export, when the packages import;
    their set-up seconds (export + session/compile)."""
    paths, setup = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = str(Path(tmp) / "encoder.onnx")
        t = time.perf_counter()
        try:
            torch.onnx.export(encoder, (x,), onnx_path, input_names=["x"], output_names=["y"], dynamo=False,
                              opset_version=17)
        except Exception as e:  # noqa: BLE001 - e.g. the onnx package missing: the runtimes are left out
            log.warning("ONNX export failed (%s); ONNX Runtime and OpenVINO are left out", e)
            return paths, setup
        export_s = time.perf_counter() - t
        try:
            import onnxruntime as ort

            t = time.perf_counter()
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = THREADS, 1
            sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
            paths["onnxruntime fp32"] = (lambda x: torch.from_numpy(sess.run(None, {"x": x.numpy()})[0]), "fp32")
            setup["onnxruntime fp32"] = round(export_s + time.perf_counter() - t, 1)
        except ImportError:
            log.warning("onnxruntime is not installed; left out")
        try:
            import openvino as ov

            core = ov.Core()
            for precision, hint in (("fp32", "f32"), ("bf16", "bf16")) if bf16 else (("fp32", "f32"),):
                t = time.perf_counter()
                net = core.compile_model(core.read_model(onnx_path), "CPU",
                                         {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": THREADS})
                paths[f"openvino {precision}"] = (lambda x, n=net: torch.from_numpy(n(x.numpy())[0]), precision)
                setup[f"openvino {precision}"] = round(export_s + time.perf_counter() - t, 1)
        except ImportError:
            log.warning("openvino is not installed; left out")
    return paths, setup


def run_paths(paths: dict[str, Encoder], gen: SamGeneralist,
              slices: list[tuple[np.ndarray, list[SlicePrompt]]]) -> dict[str, dict]:
    """Every slice through every path (rotating order): per-path seconds per slice and, per box, the Dice
    of its mask against eager fp32's (the first path)."""
    names = list(paths)
    ref = names[0]
    seconds: dict[str, list[float]] = {n: [] for n in names}
    agree: dict[str, list[float]] = {n: [] for n in names}
    for i, (img, boxes) in enumerate(slices):
        x = gen.preprocess(img[None])
        masks = {}
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            with torch.inference_mode():
                t = time.perf_counter()
                emb = paths[name](x)
                seconds[name].append(time.perf_counter() - t)
            masks[name] = gen.decode(emb[0].float().numpy(), img.shape, boxes).masks
        for name in names:
            agree[name] += [dice(a, b) for a, b in zip(masks[name], masks[ref], strict=True)]
        log.info("slice %d/%d: %s", i + 1, len(slices), {n: round(seconds[n][-1], 2) for n in names})
    return {n: {"seconds": seconds[n], "dice": agree[n]} for n in names}


def batch_times(encoder: torch.nn.Module, x: torch.Tensor, sizes: list[int], repeats: int,
                precision: str) -> list[dict]:
    """Seconds per slice of the eager and compiled encoder at ``precision`` (one graph per batch size) at
    each batch size; ``x`` (max(sizes), 3, S, S) real slices. Interleaved repeats, medians; first-call seconds."""
    eager = UnderAutocast(encoder, CPU, precision)
    compiled = torch.compile(UnderAutocast(encoder, CPU, precision), dynamic=False, options={"freezing": True})
    name = "autocast" if precision != "fp32" else ""
    paths = {f"eager {precision} {name}".strip(): eager, f"compile {precision}": compiled}
    first: dict[tuple[str, int], float] = {}
    times: dict[tuple[str, int], list[float]] = {(n, b): [] for n in paths for b in sizes}
    with torch.inference_mode():
        for rep in range(repeats + 1):  # the first round compiles (compiled) or warms up (eager)
            for b in sizes:
                for name, enc in paths.items():
                    t = time.perf_counter()
                    enc(x[:b])
                    elapsed = time.perf_counter() - t
                    if rep:
                        times[(name, b)].append(elapsed / b)
                    else:
                        first[(name, b)] = elapsed
    return [{"path": n, "batch": b, "s_per_slice": round(statistics.median(times[(n, b)]), 3),
             "min_s_per_slice": round(min(times[(n, b)]), 3), "first_call_s": round(first[(n, b)], 1)}
            for n in paths for b in sizes]


def table(results: dict[str, dict], kinds: dict[str, str], setup: dict, gflops: float, peak: dict) -> list[dict]:
    """One row per path: median and min seconds per slice, slices/s, achieved GFLOP/s and its share of
    the peak of the path's arithmetic (fp32, bf16; int8 against bf16's), speed-up over eager fp32 (ratio
    of medians measured in this run), mask Dice against eager fp32 (mean, min), set-up seconds."""
    ref = statistics.median(results["eager fp32"]["seconds"])
    rows = []
    for name, r in results.items():
        med = statistics.median(r["seconds"])
        peak_key = "fp32_gflops" if kinds[name] == "fp32" else "bf16_gflops"
        rows.append({
            "path": name, "s_per_slice": round(med, 3), "min_s_per_slice": round(min(r["seconds"]), 3),
            "slices_per_s": round(1 / med, 2), "gflop_per_s": round(gflops / med, 1),
            "peak_share": round(gflops / med / peak[peak_key], 3), "peak_of": peak_key,
            "speedup_vs_eager_fp32": round(ref / med, 2),
            "dice_vs_eager_fp32_mean": round(float(np.mean(r["dice"])), 4),
            "dice_vs_eager_fp32_min": round(float(np.min(r["dice"])), 4),
            "setup_s": setup.get(name, 0.0)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.generalist_speed", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="8 slices, batches 1 and 4, fewer paths (minutes)")
    p.add_argument("--slices", type=int, default=None, help="slices for the timing and agreement (default 100)")
    p.add_argument("--no-runtimes", action="store_true", help="leave out ONNX Runtime and OpenVINO")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--figure", type=Path, default=None,
                   help="only draw the saved results as a PNG here (e.g. docs/figures/generalist_speed.png)")
    args = p.parse_args(argv)
    if args.figure is not None:
        figure(OUT, args.figure)
        return 0
    setup_logging(args.verbose, log)
    torch.set_num_threads(THREADS)
    n = args.slices or (8 if args.quick else 100)
    bf16 = cpu_has_native_bf16()
    if not bf16:
        log.info("no native bf16 on this CPU (%s): the bf16 paths are left out (emulated, they measured 20-60x "
                 "fp32 on an AVX2 EPYC)", hardware.describe().summary())
    cfg = SamConfig(variant="lite_medsam", precision="fp32", encoder_backend="eager")
    gen = SamGeneralist(load_sam(cfg, CPU), cfg, CPU)  # preprocessing and the fp32 decoder of every path
    default = SamGeneralist(gen.sam, SamConfig(variant="lite_medsam"), CPU).cfg  # what a CPU gets by default
    chosen = f"{default.encoder_backend} {default.precision}"
    slices = acdc_slices(n)
    encoder = gen.sam.image_encoder
    x1 = gen.preprocess(slices[0][0][None])
    gflops, peak = encoder_gflops(encoder), peak_estimate()
    paths = torch_paths(encoder, args.quick, bf16)
    compiled, setup = compiled_paths(encoder, x1, bf16)
    paths.update(compiled)
    if not args.no_runtimes:
        rt, rt_setup = runtime_paths(encoder, x1, bf16)
        paths.update(rt)
        setup.update(rt_setup)
    log.info("paths: %s; %d slices", list(paths), len(slices))
    results = run_paths({k: v[0] for k, v in paths.items()}, gen, slices)
    rows = table(results, {k: v[1] for k, v in paths.items()}, setup, gflops, peak)
    sizes = [1, 4] if args.quick else [1, 4, 8, 16]
    batch_x = torch.cat([gen.preprocess(s[0][None]) for s in slices[:max(sizes)]]) if len(slices) >= max(sizes) \
        else x1.expand(max(sizes), -1, -1, -1).contiguous()
    batching = batch_times(encoder, batch_x, sizes, repeats=2 if args.quick else 3,
                           precision="bf16" if bf16 else "fp32")
    write(argv, rows, batching, chosen, gflops, peak, len(slices), results)
    return 0


def write(argv: list[str] | None, rows: list[dict], batching: list[dict], chosen: str,
          gflops: float, peak: dict, n_slices: int, results: dict) -> None:
    """The full table to ``OUT`` (``QUICK_OUT`` with ``--quick``, so that the committed 100-slice table stays);
    one JSON line (eager and chosen times, agreement) on stdout."""
    by = {r["path"]: r for r in rows}
    result = {
        "slices": n_slices, "boxes": len(results["eager fp32"]["dice"]), "threads": THREADS,
        "encoder_gflop_per_slice": round(gflops, 2), "peak_estimate": peak, "chosen_path": chosen,
        "paths": rows, "batching": batching,
        "command": "python -m benchmarks.generalist_speed " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {**machine_info(), **hardware.describe().as_dict()},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(),
    }
    atomic_write_text(QUICK_OUT if n_slices < 100 and "--quick" in result["command"] else OUT,
                      json.dumps(result, indent=1))
    c = by.get(chosen, {})
    best_builtin = min((r for r in rows if not r["path"].startswith(("onnxruntime", "openvino"))),
                       key=lambda r: r["s_per_slice"])
    runtimes = [r for r in rows if r["path"].startswith(("onnxruntime", "openvino"))]
    best_runtime = min(runtimes, key=lambda r: r["s_per_slice"]) if runtimes else None
    machine = hardware.describe()
    print(json.dumps({"slices": n_slices, "boxes": result["boxes"], "chosen_path": chosen,
                      "cpu_model": machine.cpu_model, "cpu_flags": list(machine.cpu_flags),
                      "native_bf16": machine.cpu_native_bf16,
                      "best_builtin": best_builtin["path"],
                      "best_runtime": None if best_runtime is None else best_runtime["path"],
                      "best_runtime_vs_best_builtin": None if best_runtime is None else
                      round(best_builtin["s_per_slice"] / best_runtime["s_per_slice"], 2),
                      "eager_fp32_s_per_slice": by["eager fp32"]["s_per_slice"],
                      "chosen_s_per_slice": c.get("s_per_slice"), "speedup": c.get("speedup_vs_eager_fp32"),
                      "chosen_vs_eager_fp32": None if not c else round(c["s_per_slice"] / by["eager fp32"]["s_per_slice"], 3),
                      "chosen_dice_vs_eager_fp32": {"mean": c.get("dice_vs_eager_fp32_mean"),
                                                    "min": c.get("dice_vs_eager_fp32_min")},
                      "goal_0.3_s_met": c.get("s_per_slice") is not None and c["s_per_slice"] <= 0.3}))


def figure(results_json: Path, png: Path) -> None:
    """Seconds per slice of every path (median, and min as a tick), the 0.3 s goal as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = json.loads(Path(results_json).read_text())
    rows = sorted(r["paths"], key=lambda row: row["s_per_slice"])
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
    y = np.arange(len(rows))
    ax.barh(y, [row["s_per_slice"] for row in rows], color=["C1" if row["path"] == r["chosen_path"] else "C0"
                                                             for row in rows])
    ax.plot([row["min_s_per_slice"] for row in rows], y, "k|", markersize=10, label="min")
    ax.axvline(0.3, color="C3", linestyle="--", label="goal 0.3 s")
    ax.set_yticks(y, [f"{row['path']} (Dice {row['dice_vs_eager_fp32_mean']:.3f})" for row in rows])
    ax.set_xlabel(f"s per slice (median of {r['slices']}, {r['threads']} threads)")
    ax.set_title(f"{r['machine']['cpu_model']} ({r['date'][:10]}); orange: the CPU default", fontsize=9)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
