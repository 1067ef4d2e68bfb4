"""What every benchmark script shares: the machine description written next to each result, and logging."""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path

import ray
import torch

ROOT = Path(__file__).resolve().parents[1]
"""The project's root (benchmarks run from anywhere)."""
SHARED = ROOT.parent / "shared" / "data"
"""The real data sets (``../shared/data``), never copied into the project."""
RESULTS = ROOT / "benchmarks" / "results"
"""Committed results: one JSON (or a folder of them) per benchmark."""
FIGURES = ROOT / "docs" / "figures"
DOCS = ROOT / "docs" / "benchmarks.md"


def machine_info() -> dict:
    """Platform, Python, CPU count and model, memory (GiB), torch and Ray versions, whether CUDA is seen."""
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu_model = ""
    try:
        cpu_model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                          if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "cpu_model": cpu_model, "memory_gib": round(mem_gib, 1), "torch": torch.__version__,
            "ray": ray.__version__, "gpu": torch.cuda.is_available()}


def setup_logging(verbose: bool, log: logging.Logger) -> None:
    """WARNING for the library (INFO with ``verbose``), INFO for the benchmark's own logger ``log``."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    log.setLevel(logging.INFO)


def fill_disk(folder: Path) -> Path:
    """Fill the filesystem holding ``folder`` with a file of zeros until it is full (a full-disk fault);
    returns the file, whose removal frees the space again. Unbuffered, so the last partial write fails here
    and not later when the file is closed."""
    filler = Path(folder) / "filler"
    try:
        with open(filler, "wb", buffering=0) as f:
            while True:
                f.write(b"\0" * 65536)
    except OSError:  # the disk is full
        pass
    return filler


def preset_overrides(preset: Path) -> list[str]:
    """The ``key.sub=value`` overrides that a config preset (a YAML file with ``base:``) lays on its base,
    ``base`` and ``name`` left out: how a benchmark row builds the preset's variant of the base config."""
    import yaml

    out: list[str] = []

    def walk(tree: dict, prefix: str) -> None:
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out.append(f"{prefix}{key}={value}")

    walk({k: v for k, v in yaml.safe_load(Path(preset).read_text()).items() if k not in ("base", "name")}, "")
    return out
