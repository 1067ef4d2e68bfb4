"""Pick the generalist named in config."""

from __future__ import annotations

import torch

from pipeline.config import GeneralistConfig, RunConfig
from pipeline.generalist.base import Generalist
from pipeline.generalist.cache import EmbeddingCache
from pipeline.run_folder import RunFolder
from pipeline.storage import Location


def generalist_class(cfg: GeneralistConfig) -> type:
    """The class of the configured generalist (imported, not built: no weights are read)."""
    if cfg.backend == "classical":
        from pipeline.generalist.classical import RandomWalkerGeneralist

        return RandomWalkerGeneralist
    from pipeline.generalist.sam import SamGeneralist

    return SamGeneralist


def caches_embeddings(cfg: GeneralistConfig) -> bool:
    """Whether a run with this generalist config keeps embeddings: the generalist makes some worth keeping
    (its ``cacheable``) and ``generalist.cache_embeddings`` is on."""
    return bool(cfg.cache_embeddings and generalist_class(cfg).cacheable)


def has_embeddings(generalist_id: str) -> bool:
    """Whether the generalist that a stored mask names (manifest column ``generalist``) had embeddings."""
    from pipeline.generalist.classical import RandomWalkerGeneralist

    return generalist_id != RandomWalkerGeneralist.name


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

        return RandomWalkerGeneralist(cfg.classical)
    from pipeline.generalist.sam import SamGeneralist, load_sam

    return SamGeneralist(load_sam(cfg.sam, device), cfg.sam, device)


def embedding_cache(cfg: RunConfig, generalist: Generalist) -> EmbeddingCache | None:
    """The embedding cache of a run's generalist (SAM only; None when it is not cached):
    ``generalist.cache_dir``, else the run folder's ``embeddings.zarr``, under the key of this checkpoint
    (its bytes hashed here: call once per actor) and preprocessing."""
    g = cfg.generalist
    if not (caches_embeddings(g) and generalist.cacheable):
        return None
    from pipeline.generalist.sam import sam_embedding_cache  # only SAM is cacheable

    root = Location.of(g.cache_dir, cfg.storage_options) if g.cache_dir else RunFolder(cfg.run_dir).embeddings
    # the generalist's own config: precision and backend resolved for its device (part of the key)
    return sam_embedding_cache(root, generalist.cfg, cfg.data.slice_axis, g.cache_dtype)
