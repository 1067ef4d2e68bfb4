"""One relabeling step for one case: specialist prediction -> prompts -> generalist masks.

Inputs are the case's image and the specialist; there is no label argument anywhere on this path, so
a label of an unlabeled case cannot reach a prompt (``tests/test_leak.py`` checks the files opened).
Slices with no predicted foreground, and constant slices (every voxel one value: blank or zeroed), get no
prompt and an all-background pseudo-label.

With ``prompts.ensemble`` = N > 1 every slice gets N prompt sets (:func:`pipeline.prompts.ensemble_prompts`,
member 0 = the single set), all decoded in one call on the slice's one embedding. Each member's masks
become a label map; the pseudo-label is their per-voxel majority (:func:`consensus`, ties to member 0)
and the uncertainty is the fraction of members that disagree with it: 0 where all agree, at most
1 - 1/N. The generalist's score of a class is the mean over the members that prompted it.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.class_source import as_json, compose, generalist_classes
from pipeline.config import RunConfig
from pipeline.data.validate import constant_slices
from pipeline.generalist.base import Generalist, SlicePrompt
from pipeline.generalist.cache import EmbeddingCache
from pipeline.models.inference import predict_volume
from pipeline.models.unet import UNet
from pipeline.prompts import ensemble_prompts, summarize_prompts


@dataclass
class CaseRelabel:
    """pseudo_label/specialist uint8 (S, H, W) slice-first; scores float32 (S, K); rows for the manifest;
    uncertainty float32 (S, H, W) in [0, 1) with a prompt ensemble, else None."""

    pseudo_label: np.ndarray
    specialist: np.ndarray
    scores: np.ndarray
    rows: list[dict]
    uncertainty: np.ndarray | None = None


def case_rng(seed: int, round_index: int, case_id: str, stream: int = 0) -> np.random.Generator:
    """The prompt sampler of a case in a round: the same whichever actor handles it. ``stream`` 0 draws
    the single (member 0) prompts, stream 1 the perturbations of the other ensemble members."""
    key = [seed, round_index, zlib.crc32(case_id.encode())]
    return np.random.default_rng(key if stream == 0 else [*key, stream])


def consensus(labels: np.ndarray, class_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Majority vote of N label maps: labels uint8 (N, ...), member 0 first, values in {0} | class_ids.

    Returns (majority uint8 (...), disagreement float32 (...) = 1 - votes for the majority / N). A tie
    goes to member 0's label when it is among the tied, else to the lowest tied value.
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    values = np.asarray([0, *class_ids], dtype=np.uint8)
    counts = np.stack([(labels == v).sum(0) for v in values]).astype(np.float32)  # (V, ...)
    counts += 0.5 * (labels[0][None] == values.reshape(-1, *([1] * (labels.ndim - 1))))
    majority = values[counts.argmax(0)]
    votes = (labels == majority[None]).sum(0)
    return majority, (1.0 - votes / n).astype(np.float32)


def merge_class_masks(masks: np.ndarray, logits: np.ndarray, class_ids: list[int],
                      overlap: str = "logit") -> np.ndarray:
    """Per-class masks (P, H, W) -> one label map (H, W). Where masks overlap: the higher logit wins
    (``logit``), or the smaller mask (``nested``: a structure inside another's region keeps its mask)."""
    if len(class_ids) == 0:
        return np.zeros(masks.shape[1:], np.uint8)
    if overlap == "nested":
        out = np.zeros(masks.shape[1:], np.uint8)
        for i in np.argsort(-masks.reshape(len(masks), -1).sum(1), kind="stable"):  # largest first
            out[masks[i]] = class_ids[i]
        return out
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
                 checkpoint_version: int, device: torch.device,
                 sources: dict[int, str] | None = None, checkpoint_sha256: str = "") -> CaseRelabel:
    """Relabel one case. image float32 (X, Y, Z), normalised as in training.

    ``sources`` (class id -> ``generalist``/``specialist``, :mod:`pipeline.class_source`; None: every class
    from the generalist): only generalist-sourced classes are prompted; each member's label map is the
    specialist's map with those classes replaced by the generalist's masks (:func:`compose`).
    ``checkpoint_version``/``checkpoint_sha256``: the specialist's checkpoint, recorded in every row."""
    prompted_ids = generalist_classes(sources, class_ids)
    axis = cfg.data.slice_axis
    n_members = cfg.prompts.ensemble
    logits = predict_volume(model, image, axis, tuple(cfg.model.patch_size), device)  # (C, X, Y, Z)
    logits = np.moveaxis(logits, axis + 1, 1)                                          # (C, S, H, W)
    specialist = logits.argmax(0).astype(np.uint8)                                     # (S, H, W)
    probs = None
    if n_members > 1:
        e = np.exp(logits - logits.max(0, keepdims=True))
        probs = e / e.sum(0, keepdims=True)                                            # (C, S, H, W)
    slices = np.ascontiguousarray(np.moveaxis(image, axis, 0))
    rng = case_rng(cfg.seed, round_index, case_id)
    perturb_rng = case_rng(cfg.seed, round_index, case_id, stream=1)
    use_logits = cfg.prompts.use_mask_prompt
    blank = constant_slices(image, axis)  # no anatomy: whatever the specialist predicts there, no prompt
    members = [ensemble_prompts(specialist[s], None if probs is None else probs[:, s], prompted_ids, cfg.prompts,
                                rng, perturb_rng, logits[:, s] if use_logits else None)
               if prompted_ids and not blank[s] else [[] for _ in range(n_members)]
               for s in range(len(slices))]                                             # [S][N][prompts]
    wanted = [s for s, ms in enumerate(members) if any(ms)]
    if cache is not None:
        embeddings, cached = cache.get(case_id, slices, wanted, generalist.embed)
    else:
        embeddings = dict(zip(wanted, generalist.embed(slices[wanted]), strict=True)) if wanted else {}
        cached = set()
    pseudo = compose(specialist, np.zeros_like(specialist), prompted_ids)  # unprompted slices: the specialist's
    uncertainty = np.zeros(specialist.shape, np.float32) if n_members > 1 else None
    scores = np.full((len(slices), len(class_ids)), np.nan, np.float32)
    rows = []
    source_json = as_json(sources if sources is not None else {c: "generalist" for c in class_ids})
    for s, slice_members in enumerate(members):
        score_by_class: dict[str, float] = {}
        member_maps = None  # uint8 (N, H, W) once decoded
        if any(slice_members):
            flat = [p for m in slice_members for p in m]
            res = generalist.decode(embeddings[s], slices[s].shape, flat)  # every member in one call
            maps, sums, counts, start = [], np.zeros(len(class_ids)), np.zeros(len(class_ids)), 0
            for m in slice_members:
                stop = start + len(m)
                maps.append(compose(specialist[s], merge_class_masks(
                    res.masks[start:stop], res.logits[start:stop], [p.class_id for p in m], cfg.generalist.overlap),
                    prompted_ids))
                for p, score in zip(m, res.scores[start:stop], strict=True):
                    sums[class_ids.index(p.class_id)] += score
                    counts[class_ids.index(p.class_id)] += 1
                start = stop
            member_maps = np.stack(maps)
            if n_members > 1:
                pseudo[s], uncertainty[s] = consensus(member_maps, class_ids)
            else:
                pseudo[s] = maps[0]
            for k, c in enumerate(class_ids):
                if counts[k]:
                    scores[s, k] = sums[k] / counts[k]
                    score_by_class[str(c)] = round(float(scores[s, k]), 4)
        rows.append({
            "round": round_index,
            "case_id": case_id,
            "slice": s,
            "checkpoint_version": checkpoint_version,
            "checkpoint_sha256": checkpoint_sha256,
            "generalist": generalist.name,
            "num_prompts": len(slice_members[0]),
            "prompts": summarize_prompts(slice_members[0]),
            "score_mean": float(np.mean(list(score_by_class.values()))) if score_by_class else float("nan"),
            "scores": json.dumps(score_by_class),
            "pseudo_fg_fraction": float((pseudo[s] > 0).mean()),
            "specialist_fg_fraction": float((specialist[s] > 0).mean()),
            "agreement_dice": _fg_dice(pseudo[s], specialist[s]),
            "embedding_cached": s in cached,
            "class_source": source_json,
            **ensemble_columns(slice_members, None if uncertainty is None else uncertainty[s], member_maps),
        })
    return CaseRelabel(pseudo, specialist, scores, rows, uncertainty)


def ensemble_columns(members: list[list[SlicePrompt]], uncertainty: np.ndarray | None,
                     maps: np.ndarray | None) -> dict:
    """The manifest's ensemble columns of one slice: ``ensemble`` (N), ``ensemble_prompts`` (JSON, the
    prompts of members 1..N-1), ``uncertain_fraction`` (share of the slice's pixels where a member
    disagrees with the consensus) and ``fg_uncertainty`` (mean uncertainty over the pixels any member
    calls foreground; NaN when none does or N = 1)."""
    n = len(members)
    if uncertainty is None:
        return {"ensemble": n, "ensemble_prompts": "[]", "uncertain_fraction": float("nan"),
                "fg_uncertainty": float("nan")}
    fg = (maps > 0).any(0) if maps is not None else np.zeros(uncertainty.shape, bool)
    return {
        "ensemble": n,
        "ensemble_prompts": "[" + ",".join(summarize_prompts(m) for m in members[1:]) + "]",
        "uncertain_fraction": float((uncertainty > 0).mean()),
        "fg_uncertainty": float(uncertainty[fg].mean()) if fg.any() else float("nan"),
    }
