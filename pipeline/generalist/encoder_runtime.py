"""How SAM's image encoder runs: the precision and the backend (eager or ``torch.compile``), per device.

On a CPU the image encoder is nearly all of a relabel round's time (LiteMedSAM's TinyViT: 75 GFLOPs a
256 x 256 slice). Eager PyTorch reaches a fraction of the cores' peak there: most of the time goes to
memory-bound elementwise ops (batch norm, GELU, the casts autocast inserts, window reshapes) between the
matrix products. ``torch.compile`` with frozen weights fuses those ops, folds batch norm into the
convolutions and prepacks the weights for oneDNN. Which path is fastest depends on the CPU: with native
bf16 dot products, compiled bf16; on an AVX2-only CPU, compiled fp32 (emulated bf16 is ~20x slower there)
(``benchmarks/generalist_speed.py``, docs/benchmarks.md "Generalist speed", which also measures
channels_last, int8, ONNX Runtime and OpenVINO).

``SamConfig.precision`` and ``SamConfig.encoder_backend`` default to ``auto``, resolved here against the
device once (``resolve_sam_config``, from the facts of ``pipeline.hardware``): a CPU compiles the encoder,
in bf16 only where bf16 is native; CUDA keeps eager fp32; the test model ``tiny`` stays eager fp32
everywhere (compiling it costs seconds; it runs in milliseconds). ``describe_choice`` says which path and
why in one log line; a bf16 pinned on a CPU without native bf16 is warned about once.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable

import torch

from pipeline import hardware
from pipeline.config import SamConfig
from pipeline.hardware import cpu_has_native_bf16

log = logging.getLogger(__name__)

_STAYS_EAGER_FP32 = {"tiny"}  # the test model: compiling costs more than it saves
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


EMULATED_BF16_SLOWDOWN = 20
"""Measured: the compiled LiteMedSAM encoder in bf16 on an AVX2-only EPYC took 23x the time of compiled fp32
(45.5 s against 1.98 s a slice; docs/benchmarks.md, "Generalist speed"): the cost a pinned bf16 warns of."""


def resolve_precision(cfg: SamConfig, device: torch.device) -> str:
    """``cfg.precision`` with ``auto`` replaced: bf16 on a native-bf16 CPU (not for tiny), else fp32."""
    if cfg.precision != "auto":
        return cfg.precision
    cpu_fast = device.type == "cpu" and cfg.variant not in _STAYS_EAGER_FP32 and cpu_has_native_bf16()
    return "bf16" if cpu_fast else "fp32"


def resolve_backend(cfg: SamConfig, device: torch.device) -> str:
    """``cfg.encoder_backend`` with ``auto`` replaced: on a CPU (not for tiny) OpenVINO where the optional
    package is installed (1.6x compiled fp32 on an AVX2 EPYC, 1.5x compiled bf16 on a Zen 5:
    docs/benchmarks.md, "The generalist's speed on a CPU"), else compile; eager on CUDA."""
    if cfg.encoder_backend != "auto":
        return cfg.encoder_backend
    if device.type != "cpu" or cfg.variant in _STAYS_EAGER_FP32:
        return "eager"
    return "openvino" if openvino_available() else "compile"


def resolve_sam_config(cfg: SamConfig, device: torch.device) -> SamConfig:
    """The config with no ``auto`` left in ``precision`` and ``encoder_backend`` (what runs on ``device``;
    the embedding cache key is built from it)."""
    return cfg.model_copy(update={"precision": resolve_precision(cfg, device),
                                  "encoder_backend": resolve_backend(cfg, device)})


def describe_choice(cfg: SamConfig, device: torch.device) -> str:
    """Why the encoder runs as it does on ``device``: one line naming the path, the machine and the reason
    (logged by ``SamGeneralist``). ``cfg`` is the configured (unresolved) one."""
    resolved = resolve_sam_config(cfg, device)
    if cfg.variant in _STAYS_EAGER_FP32:
        why = "the test model stays eager fp32"
    elif cfg.precision != "auto":
        why = f"precision {cfg.precision} as configured"
    elif device.type == "cuda":
        why = "CUDA: fp32"
    elif resolved.precision == "bf16":
        why = "native bf16 dot products on this CPU"
    else:
        why = "no native bf16 on this CPU (emulated bf16 is ~20x slower), so fp32"
    if cfg.encoder_backend == "auto" and resolved.encoder_backend == "compile":
        why += "; compiled: fused ops, frozen weights (pip install -e '.[openvino]' is faster on CPUs)"
    elif cfg.encoder_backend == "auto" and resolved.encoder_backend == "openvino":
        why += "; OpenVINO is installed: its CPU runtime is the fastest path measured"
    return (f"SAM image encoder ({cfg.variant}) on {device}: {resolved.encoder_backend} {resolved.precision} "
            f"({why}; {hardware.describe().summary()})")


_warned_emulated = False


def warn_if_emulated_bf16(cfg: SamConfig, device: torch.device) -> bool:
    """Warn once per process when bf16 or fp16 is pinned for the encoder on a CPU that only emulates it;
    returns whether this call warned."""
    global _warned_emulated
    if (device.type != "cpu" or cfg.precision not in AUTOCAST_DTYPES or cfg.variant in _STAYS_EAGER_FP32
            or cpu_has_native_bf16() or _warned_emulated):
        return False
    _warned_emulated = True
    log.warning("generalist.sam.precision is %s but this CPU has no native bf16 (%s): the SAM encoder will run "
                "about %dx slower than fp32. Use generalist.sam.precision=auto (fp32 here)", cfg.precision,
                hardware.describe().summary(), EMULATED_BF16_SLOWDOWN)
    return True


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


def openvino_available() -> bool:
    """Whether the optional OpenVINO runtime is installed (``pip install -e ".[openvino]"``)."""
    return importlib.util.find_spec("openvino") is not None


class OpenVinoEncoder:
    """The encoder converted to OpenVINO (``openvino.convert_model`` from the PyTorch module, no ONNX file)
    and compiled for the CPU at ``precision`` (fp32, or bf16 where native), one static (1, 3, S, S) graph:
    images float32 (1, 3, S, S) -> embeddings float32 (1, C, E, E). Built on the first call (seconds)."""

    HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}

    def __init__(self, encoder: torch.nn.Module, precision: str):
        self.encoder, self.precision = encoder, precision
        self._compiled = None

    def _build(self, x: torch.Tensor) -> None:
        import openvino as ov

        model = ov.convert_model(self.encoder.eval(), example_input=torch.zeros_like(x[:1]),
                                 input=[tuple(x[:1].shape)])
        self._compiled = ov.Core().compile_model(
            model, "CPU", {"INFERENCE_PRECISION_HINT": self.HINTS[self.precision],
                           "INFERENCE_NUM_THREADS": torch.get_num_threads()})

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._compiled is None:
            self._build(x)
        out = [torch.from_numpy(self._compiled(x[i:i + 1].float().numpy())[0]) for i in range(len(x))]
        return torch.cat(out)


class EncoderRunner:
    """Runs an image encoder at a resolved precision and backend: images float32 (B, 3, S, S) ->
    embeddings (B, C, E, E) (float32, or the autocast dtype).

    ``compile`` feeds the compiled graph one slice per call (a static shape: it compiles once, on the
    first call, whatever the batch sizes); ``openvino`` likewise through OpenVINO's CPU runtime. If building
    either fails (no C++ compiler, an unsupported op, OpenVINO missing) the error is logged once and the
    eager encoder is used from then on. Call under ``torch.inference_mode`` (frozen weights are constants
    of the graph).
    """

    def __init__(self, encoder: torch.nn.Module, device: torch.device, precision: str, backend: str):
        if precision == "auto" or backend == "auto":
            raise ValueError("EncoderRunner takes a resolved precision and backend (resolve_sam_config)")
        if backend == "openvino" and device.type != "cpu":
            raise ValueError(f"encoder_backend openvino runs on a CPU, not on {device}")
        self.eager = UnderAutocast(encoder, device, precision)
        self.backend = backend
        self._compiled: Callable[[torch.Tensor], torch.Tensor] | None = None
        if backend == "compile":
            self._compiled = torch.compile(self.eager, dynamic=False, options={"freezing": True})
        elif backend == "openvino":
            self._compiled = OpenVinoEncoder(encoder, precision)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._compiled is None:
            return self.eager(x)
        try:
            return torch.cat([self._compiled(x[i:i + 1]) for i in range(len(x))])
        except Exception as e:  # noqa: BLE001 - any build failure means the same thing: run eager
            log.warning("the %s SAM image encoder failed (%s: %s); running it eager from now on "
                        "(generalist.sam.encoder_backend=eager silences this)", self.backend,
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            self._compiled, self.backend = None, "eager"
            return self.eager(x)
