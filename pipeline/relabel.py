"""One relabeling step for one case: specialist prediction -> prompts -> generalist masks.

Inputs are the case's image and the specialist; there is no label argument anywhere on this path, so
a label of an unlabeled case cannot reach a prompt (``tests/test_leak.py`` checks the files opened).
Slices with no predicted foreground get no prompt and an all-background pseudo-label.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import RunConfig
from pipeline.generalist.base import Generalist
from pipeline.generalist.cache import EmbeddingCache
from pipeline.models.inference import predict_volume
from pipeline.models.unet import UNet
from pipeline.prompts import prompts_for_slice


@dataclass
class CaseRelabel:
    """pseudo_label/specialist uint8 (S, H, W) slice-first; scores float32 (S, K); rows for the manifest."""

    pseudo_label: np.ndarray
    specialist: np.ndarray
    scores: np.ndarray
    rows: list[dict]


def case_rng(seed: int, round_index: int, case_id: str) -> np.random.Generator:
    """The prompt sampler of a case in a round: the same whichever actor handles it."""
    return np.random.default_rng([seed, round_index, zlib.crc32(case_id.encode())])


def merge_class_masks(masks: np.ndarray, logits: np.ndarray, class_ids: list[int]) -> np.ndarray:
    """Per-class masks (P, H, W) -> one label map (H, W): where masks overlap the higher logit wins."""
    if len(class_ids) == 0:
        return np.zeros(masks.shape[1:], np.uint8)
    scored = np.where(masks, logits, -np.inf)
    best = scored.argmax(0)
    out = np.asarray(class_ids, np.uint8)[best]
    out[~masks.any(0)] = 0
    return out


def _fg_dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    total = a.sum() + b.sum()
    return float("nan") if total == 0 else float(2 * (a & b).sum() / total)


def relabel_case(case_id: str, image: np.ndarray, model: UNet, generalist: Generalist,
                 cache: EmbeddingCache | None, cfg: RunConfig, class_ids: list[int], round_index: int,
                 checkpoint_version: int, device: torch.device) -> CaseRelabel:
    """Relabel one case. image float32 (X, Y, Z), normalised as in training."""
    axis = cfg.data.slice_axis
    logits = predict_volume(model, image, axis, tuple(cfg.model.patch_size), device)  # (C, X, Y, Z)
    logits = np.moveaxis(logits, axis + 1, 1)                                          # (C, S, H, W)
    specialist = logits.argmax(0).astype(np.uint8)                                     # (S, H, W)
    slices = np.ascontiguousarray(np.moveaxis(image, axis, 0))
    rng = case_rng(cfg.seed, round_index, case_id)
    use_logits = cfg.prompts.use_mask_prompt
    prompts = [prompts_for_slice(specialist[s], class_ids, cfg.prompts, rng, logits[:, s] if use_logits else None)
               for s in range(len(slices))]
    wanted = [s for s, p in enumerate(prompts) if p]
    if cache is not None:
        embeddings, cached = cache.get(case_id, slices, wanted, generalist.embed)
    else:
        embeddings = dict(zip(wanted, generalist.embed(slices[wanted]), strict=True)) if wanted else {}
        cached = set()
    pseudo = np.zeros_like(specialist)
    scores = np.full((len(slices), len(class_ids)), np.nan, np.float32)
    rows = []
    for s, slice_prompts in enumerate(prompts):
        score_by_class: dict[str, float] = {}
        if slice_prompts:
            res = generalist.decode(embeddings[s], slices[s].shape, slice_prompts)
            ids = [p.class_id for p in slice_prompts]
            pseudo[s] = merge_class_masks(res.masks, res.logits, ids)
            for p, score in zip(slice_prompts, res.scores, strict=True):
                scores[s, class_ids.index(p.class_id)] = score
                score_by_class[str(p.class_id)] = round(float(score), 4)
        rows.append({
            "round": round_index,
            "case_id": case_id,
            "slice": s,
            "checkpoint_version": checkpoint_version,
            "generalist": generalist.name,
            "num_prompts": len(slice_prompts),
            "prompts": json.dumps([p.summary() for p in slice_prompts]),
            "score_mean": float(np.mean(list(score_by_class.values()))) if score_by_class else float("nan"),
            "scores": json.dumps(score_by_class),
            "pseudo_fg_fraction": float((pseudo[s] > 0).mean()),
            "specialist_fg_fraction": float((specialist[s] > 0).mean()),
            "agreement_dice": _fg_dice(pseudo[s], specialist[s]),
            "embedding_cached": s in cached,
        })
    return CaseRelabel(pseudo, specialist, scores, rows)

