"""How SAM's image encoder runs: the precision and the backend (eager or ``torch.compile``), per device.

On a CPU the image encoder is nearly all of a relabel round's time (LiteMedSAM's TinyViT: 75 GFLOPs a
256 x 256 slice). Eager PyTorch reaches a fraction of the cores' peak there: most of the time goes to
memory-bound elementwise ops (batch norm, GELU, the casts autocast inserts, window reshapes) between the
matrix products. ``torch.compile`` with frozen weights fuses those ops, folds batch norm into the
convolutions and prepacks the weights for oneDNN; with bf16 on a CPU with native bf16 dot products that
is 3x eager fp32 on 2 Zen 5 cores, 0.26 s a slice (issue 19; ``benchmarks/generalist_speed.py``,
docs/benchmarks.md, which also measures channels_last, ONNX Runtime and OpenVINO).

``SamConfig.precision`` and ``SamConfig.encoder_backend`` default to ``auto``, resolved here against the
device once (``resolve_sam_config``): a CPU gets the fast path, CUDA keeps eager fp32, and the test model
``tiny`` stays eager fp32 everywhere (compiling it costs seconds; it runs in milliseconds).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from pipeline.config import SamConfig

log = logging.getLogger(__name__)

_STAYS_EAGER_FP32 = {"tiny"}  # the test model: compiling costs more than it saves
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (avx512_bf16, or AMX tiles); without them
    bf16 is emulated and no faster than fp32."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(cfg: SamConfig, device: torch.device) -> str:
    """``cfg.precision`` with ``auto`` replaced: bf16 on a native-bf16 CPU (not for tiny), else fp32."""
    if cfg.precision != "auto":
        return cfg.precision
    cpu_fast = device.type == "cpu" and cfg.variant not in _STAYS_EAGER_FP32 and cpu_has_native_bf16()
    return "bf16" if cpu_fast else "fp32"


def resolve_backend(cfg: SamConfig, device: torch.device) -> str:
    """``cfg.encoder_backend`` with ``auto`` replaced: compile on a CPU (not for tiny), else eager."""
    if cfg.encoder_backend != "auto":
        return cfg.encoder_backend
    return "compile" if device.type == "cpu" and cfg.variant not in _STAYS_EAGER_FP32 else "eager"


def resolve_sam_config(cfg: SamConfig, device: torch.device) -> SamConfig:
    """The config with no ``auto`` left in ``precision`` and ``encoder_backend`` (what runs on ``device``;
    the embedding cache key is built from it)."""
    return cfg.model_copy(update={"precision": resolve_precision(cfg, device),
                                  "encoder_backend": resolve_backend(cfg, device)})


def autocast(device: torch.device, precision: str):
    """The autocast context of a resolved precision (fp32: autocast off)."""
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


class EncoderBackendChanged(RuntimeError):
    """Compiling the encoder failed during this call, and it now runs eager: the embeddings of the call
    are not returned, because whoever keys them by backend (the embedding cache) must rebuild its key
    first (``SamGeneralist.cfg`` says ``eager`` from now on). Retrying the call gives eager embeddings."""


class UnderAutocast(torch.nn.Module):
    """The encoder's forward inside its autocast context, so that ``torch.compile`` traces the casts."""

    def __init__(self, encoder: torch.nn.Module, device: torch.device, precision: str):
        super().__init__()
        self.encoder, self.device, self.precision = encoder, device, precision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.precision):
            return self.encoder(x)


class EncoderRunner:
    """Runs an image encoder at a resolved precision and backend: images float32 (B, 3, S, S) ->
    embeddings (B, C, E, E) (float32, or the autocast dtype).

    ``compile`` feeds the compiled graph one slice per call (a static shape: it compiles once, on the
    first call, whatever the batch sizes); if compiling fails (no C++ compiler, an unsupported op) the
    error is logged once and the eager encoder is used from then on. Call under ``torch.inference_mode``
    (frozen weights are constants of the graph).
    """

    def __init__(self, encoder: torch.nn.Module, device: torch.device, precision: str, backend: str):
        if precision == "auto" or backend == "auto":
            raise ValueError("EncoderRunner takes a resolved precision and backend (resolve_sam_config)")
        self.eager = UnderAutocast(encoder, device, precision)
        self.backend = backend
        self._compiled: Callable[[torch.Tensor], torch.Tensor] | None = None
        if backend == "compile":
            self._compiled = torch.compile(self.eager, dynamic=False, options={"freezing": True})

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._compiled is None:
            return self.eager(x)
        try:
            return torch.cat([self._compiled(x[i:i + 1]) for i in range(len(x))])
        except Exception as e:  # noqa: BLE001 - any compile failure means the same thing: run eager
            log.warning("torch.compile of the SAM image encoder failed (%s: %s); running it eager from now "
                        "on (generalist.sam.encoder_backend=eager silences this)",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            self._compiled, self.backend = None, "eager"
            return self.eager(x)
