"""Device choice. Devices are passed in; nothing calls ``.cuda()``.

Inside a Ray actor with ``num_gpus=1`` Ray sets ``CUDA_VISIBLE_DEVICES`` to that actor's GPU, so the
actor's own GPU is always ``cuda:0``.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def pick_device(choice: str = "auto") -> torch.device:
    """"auto" -> cuda:0 if torch sees a GPU, else cpu; "cuda" without a GPU falls back to cpu with a warning."""
    if choice == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda:0")
    if choice == "cuda":
        log.warning("device 'cuda' requested but torch sees no GPU: using cpu")
    return torch.device("cpu")


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)
