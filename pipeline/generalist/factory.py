"""Pick the generalist named in config."""

from __future__ import annotations

import torch

from pipeline.config import GeneralistConfig
from pipeline.generalist.base import Generalist


def generalist_name(cfg: GeneralistConfig) -> str:
    """The id stored with every mask, known without loading any weights."""
    if cfg.backend == "classical":
        from pipeline.generalist.classical import RandomWalkerGeneralist

        return RandomWalkerGeneralist.name
    from pipeline.generalist.sam import sam_name

    return sam_name(cfg.sam)


def make_generalist(cfg: GeneralistConfig, device: torch.device) -> Generalist:
    if cfg.backend == "classical":
        from pipeline.generalist.classical import RandomWalkerGeneralist

        return RandomWalkerGeneralist(cfg.classical, tuple(cfg.sam.window_percentiles))
    from pipeline.generalist.sam import SamGeneralist, load_sam

    return SamGeneralist(load_sam(cfg.sam, device), cfg.sam, device)
