"""What this machine's processor can do, in one place: the facts every ``auto`` setting decides from.

The trainer (``pipeline.training.runtime``) and SAM's image encoder (``pipeline.generalist.encoder_runtime``)
pick their precision and backend from these facts, never from a guess about the machine:

- **native bf16**: a CPU with bf16 dot-product instructions (``avx512_bf16`` or AMX tiles), or a CUDA
  device that reports bf16 support (Ampere and newer). Without them bf16 is *emulated*: on an AVX2-only
  CPU a bf16 encoder pass measured 23x slower than compiled fp32 (docs/benchmarks.md, "Generalist speed").
- the **vector width** PyTorch's CPU kernels were dispatched to (``AVX2``, ``AVX512``, ...), and the cores.

``describe`` returns the facts as plain data (they go into logs and into every benchmark's result file).
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

_FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "avx_vnni")


@dataclass(frozen=True)
class Machine:
    """The facts an ``auto`` setting reads. ``cpu_flags``: those of ``_FLAGS_OF_INTEREST`` that
    /proc/cpuinfo lists; ``cpu_capability``: PyTorch's kernel dispatch level (``AVX2``, ``AVX512``, ...)."""

    cpu_model: str
    cpu_flags: tuple[str, ...]
    cpu_capability: str
    cpu_native_bf16: bool
    cores: int
    torch_threads: int
    cuda: str | None
    """The CUDA device's name (device 0 as this process sees it), or None."""
    cuda_bf16: bool

    def as_dict(self) -> dict:
        out = asdict(self)
        out["cpu_flags"] = list(self.cpu_flags)
        return out

    def summary(self) -> str:
        """One phrase for a log line: the processor and what it has, e.g. "AMD EPYC, AVX2 (no native bf16), 2 cores"."""
        bf16 = "native bf16" if self.cpu_native_bf16 else "no native bf16"
        text = f"{self.cpu_model or 'unknown CPU'}, {self.cpu_capability} ({bf16}), {self.cores} cores"
        if self.cuda:
            text += f"; CUDA {self.cuda} ({'bf16' if self.cuda_bf16 else 'no bf16'})"
        return text


def _cpuinfo() -> tuple[str, set[str]]:
    """The model name and the flags of the first processor in /proc/cpuinfo ("", {} where it cannot be read)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "", set()
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    return model, set(flags)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (avx512_bf16, or AMX tiles), as PyTorch's own
    oneDNN checks see it; without them bf16 is emulated and far slower than fp32."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


@functools.lru_cache(maxsize=1)
def describe() -> Machine:
    """The facts of this process's machine (read once per process)."""
    model, flags = _cpuinfo()
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - an old torch without it: the facts stay usable
        capability = "unknown"
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return Machine(
        cpu_model=model, cpu_flags=tuple(f for f in _FLAGS_OF_INTEREST if f in flags),
        cpu_capability=capability, cpu_native_bf16=cpu_has_native_bf16(),
        cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1),
        torch_threads=torch.get_num_threads(), cuda=cuda,
        cuda_bf16=bool(cuda) and torch.cuda.is_bf16_supported())


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 is native on ``device`` (a CUDA device reporting bf16 support, or a CPU with
    avx512_bf16/AMX)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return device.type == "cpu" and cpu_has_native_bf16()
