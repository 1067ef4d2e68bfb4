"""How the specialist trains on a device: precision, memory format and compilation, chosen by the machine.

``train.precision``, ``train.channels_last`` and ``train.compile`` default to ``auto``, resolved once per
trainer against the facts of ``pipeline.hardware``:

- **precision**: bf16 autocast where bf16 is native (a CUDA device with bf16; a CPU with avx512_bf16 or
  AMX), fp16 autocast with a gradient scaler on a CUDA device without bf16, else fp32. Emulated bf16 on an
  AVX2-only CPU is many times slower than fp32, so it is never chosen there (a pinned bf16 there is
  warned about once).
- **channels_last** (2D only): on CUDA, where cuDNN's NHWC kernels pay with mixed precision. On CPUs it
  is off: on an AVX2 EPYC a U-Net step in channels_last fp32 was slower than contiguous (0.079 against
  0.102 it/s, 8 x 160 x 160), oneDNN reordering between its blocked formats either way.
- **compile**: ``torch.compile`` of the student's and the teacher's forward passes (AOTAutograd compiles
  the backward too): it fuses instance norm, LeakyReLU and the casts between the convolutions. On an AVX2
  EPYC (2 cores, quiet) a compiled ACDC step was only 3% faster than eager (0.763 against 0.738 it/s): the
  convolutions, which oneDNN runs the same either way, are the time; and a cold compile costs minutes of
  CPU. So ``auto`` compiles on CUDA only, for a round of at least ``COMPILE_MIN_VOXELS`` crop voxels
  (iterations x batch x crop size); ``train.compile: true`` compiles anywhere. If compiling fails (no C++
  compiler, an unsupported op) the trainer logs it once and runs eager.
- **prefetch** (``train.prefetch_batches``, ``pipeline.training.prefetch``): the next batches are built in a
  background thread; the same batches, 3% faster on that CPU.

Losses are always computed in fp32 (the model's output is cast back before any loss), so a bf16 run
changes the network's arithmetic, not the losses' reductions. Measured on the machine it runs on:
``python -m benchmarks.trainer_speed --quick`` (docs/benchmarks.md, "Trainer speed").
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from pipeline import hardware
from pipeline.config import ModelConfig, TrainConfig

log = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_MIN_VOXELS = 50_000_000
"""``auto`` compiles a round of at least this many crop voxels (iterations x batch x crop voxels; ACDC's
preset: 600 x 8 x 160 x 160 = 1.2e8; the demo: 150 x 8 x 32 x 32 = 1.2e6)."""


@dataclass(frozen=True)
class TrainRuntime:
    """A resolved trainer path: ``precision`` fp32|bf16|fp16, ``channels_last`` and ``compile`` booleans,
    and ``reason``, the sentence that says why (logged once)."""

    device: torch.device
    precision: str
    channels_last: bool
    compile: bool
    reason: str

    def autocast(self):
        """The autocast context of the forward passes (fp32: none)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.precision])

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A gradient scaler for fp16 on CUDA (bf16 and fp32 need none)."""
        if self.precision == "fp16" and self.device.type == "cuda":
            return torch.amp.GradScaler("cuda")
        return None

    def describe(self) -> str:
        path = f"{self.precision}, {'channels_last' if self.channels_last else 'contiguous'}, " \
               f"{'compiled' if self.compile else 'eager'}"
        return f"trainer on {self.device}: {path} ({self.reason}; {hardware.describe().summary()})"


def _auto_precision(device: torch.device) -> tuple[str, str]:
    if device.type == "cuda":
        if hardware.native_bf16(device):
            return "bf16", "CUDA with bf16"
        return "fp16", "CUDA without bf16: fp16 with a gradient scaler"
    if hardware.native_bf16(device):
        return "bf16", "native bf16 on this CPU"
    return "fp32", "no native bf16 on this CPU (emulated bf16 is many times slower), so fp32"


def round_voxels(cfg: TrainConfig, model: ModelConfig) -> int:
    """Crop voxels one training round processes: iterations x (labeled + unlabeled batch) x crop voxels."""
    return cfg.iterations * (cfg.labeled_batch_size + cfg.unlabeled_batch_size) * math.prod(model.patch_size)


def resolve_train_runtime(cfg: TrainConfig, model: ModelConfig, device: torch.device) -> TrainRuntime:
    """``cfg``'s precision, channels_last and compile with every ``auto`` replaced for ``device`` and the
    network ``model`` (channels_last is for 2D; compile pays for large rounds only)."""
    dims = 2 if model.kind == "unet2d" else 3
    reasons = []
    if cfg.precision == "auto":
        precision, why = _auto_precision(device)
        reasons.append(why)
    else:
        precision = cfg.precision
        reasons.append(f"precision {precision} as configured")
        if device.type == "cpu" and precision != "fp32" and not hardware.native_bf16(device):
            log.warning("train.precision is %s but this CPU has no native bf16 (%s): training will run several "
                        "times slower than fp32. Use train.precision=auto (fp32 here)", precision,
                        hardware.describe().summary())
        if device.type == "cpu" and precision == "fp16":
            raise ValueError("train.precision fp16 needs a CUDA device (a gradient scaler); use auto, fp32 or bf16")
    channels_last = (device.type == "cuda") if cfg.channels_last == "auto" else bool(cfg.channels_last)
    channels_last = channels_last and dims == 2
    if cfg.compile == "auto":
        compiled = device.type == "cuda" and round_voxels(cfg, model) >= COMPILE_MIN_VOXELS
        if device.type == "cuda":
            reasons.append("compiled: a large round repays the compile" if compiled
                           else "eager: a round this small does not repay compiling")
        else:
            reasons.append("eager: compiling measured no real gain on a CPU and costs minutes")
    else:
        compiled = bool(cfg.compile)
    return TrainRuntime(device, precision, channels_last, compiled, "; ".join(reasons))


class _Forward(nn.Module):
    """A network's forward under the runtime's autocast, returning float32 logits in the contiguous layout
    (losses and the rest of the loop never see bf16 or channels_last)."""

    def __init__(self, net: nn.Module, runtime: TrainRuntime):
        super().__init__()
        self.net, self.runtime = net, runtime

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.runtime.autocast():
            out = self.net(x)
        return out.float().contiguous()


class RuntimeForward:
    """Calls a network the way ``runtime`` says: ``(B, 1, *S)`` float32 -> logits ``(B, C, *S)`` float32.

    Holds the eager wrapper and, with ``compile``, its compiled twin (``dynamic=False``: one graph per batch
    shape; a round uses two or three). A compile error on a call is logged once and the eager path is used
    from then on; the parameters are the network's own either way (no copy), so the optimizer, the EMA
    update and ``state_dict`` see one set of weights. ``train()``/``eval()``/``training`` reach the network.
    """

    def __init__(self, net: nn.Module, runtime: TrainRuntime, name: str):
        if runtime.channels_last:
            net.to(memory_format=torch.channels_last)
        self.net, self.name = net, name
        self.eager = _Forward(net, runtime)
        self.compiled = torch.compile(self.eager, dynamic=False) if runtime.compile else None

    @property
    def training(self) -> bool:
        return self.net.training

    def train(self, mode: bool = True) -> RuntimeForward:
        self.net.train(mode)
        return self

    def eval(self) -> RuntimeForward:
        return self.train(False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is None:
            return self.eager(x)
        try:
            return self.compiled(x)
        except Exception as e:  # noqa: BLE001 - any compile failure means the same thing: run eager
            log.warning("torch.compile of the %s failed (%s: %s); training it eager from now on "
                        "(train.compile=false silences this)", self.name, type(e).__name__,
                        str(e).splitlines()[0] if str(e) else "")
            self.compiled = None
            return self.eager(x)
