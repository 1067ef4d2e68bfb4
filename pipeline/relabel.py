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


@dataclass
class SliceWork:
    """One slice on its way through relabeling (one small record per slice, passed from step to step).

    ``members``: the N prompt sets (member 0 the single set; all empty when the slice is not prompted);
    ``pseudo`` uint8 (H, W), the specialist's map until decoded masks replace it; ``uncertainty`` float32
    (H, W) with a prompt ensemble; ``scores`` float32 (K,), the mean generalist score of each class over the
    members that prompted it (NaN: not prompted); ``maps`` uint8 (N, H, W), each member's label map."""

    index: int
    members: list[list[SlicePrompt]]
    pseudo: np.ndarray
    scores: np.ndarray
    uncertainty: np.ndarray | None = None
    maps: np.ndarray | None = None

    @property
    def prompted(self) -> bool:
        return any(self.members)


@dataclass
class SpecialistView:
    """The specialist's prediction of a case, slice-first: ``logits`` float32 (C, S, H, W), ``labels`` uint8
    (S, H, W) (argmax), ``probs`` float32 (C, S, H, W) (softmax; only for a prompt ensemble) and the
    image's ``slices`` float32 (S, H, W)."""

    logits: np.ndarray
    labels: np.ndarray
    probs: np.ndarray | None
    slices: np.ndarray


def specialist_view(model: UNet, image: np.ndarray, cfg: RunConfig, device: torch.device) -> SpecialistView:
    """Step 1: predict the case (image float32 (X, Y, Z)) with the specialist, slice-first."""
    axis = cfg.data.slice_axis
    logits = predict_volume(model, image, axis, tuple(cfg.model.patch_size), device)  # (C, X, Y, Z)
    logits = np.moveaxis(logits, axis + 1, 1)                                          # (C, S, H, W)
    probs = None
    if cfg.prompts.ensemble > 1:
        e = np.exp(logits - logits.max(0, keepdims=True))
        probs = e / e.sum(0, keepdims=True)
    return SpecialistView(logits, logits.argmax(0).astype(np.uint8), probs,
                          np.ascontiguousarray(np.moveaxis(image, axis, 0)))


def plan_slices(view: SpecialistView, image: np.ndarray, cfg: RunConfig, case_id: str, round_index: int,
                class_ids: list[int], prompted_ids: list[int], prompt_maps: np.ndarray | None = None) -> list[SliceWork]:
    """Step 2: the prompt sets of every slice, from the prediction only (no label is an input). Constant
    slices (no anatomy) get none, whatever the specialist predicts there. ``prompt_maps`` uint8 (S, H, W):
    the maps prompts are made from instead of the prediction: only the oracle control
    (:mod:`pipeline.oracle`) gives them, the case's labels."""
    maps = view.labels if prompt_maps is None else prompt_maps
    rng = case_rng(cfg.seed, round_index, case_id)
    perturb_rng = case_rng(cfg.seed, round_index, case_id, stream=1)
    blank = constant_slices(image, cfg.data.slice_axis)
    n = cfg.prompts.ensemble
    out = []
    for s in range(len(view.slices)):
        members = ([[] for _ in range(n)] if not prompted_ids or blank[s] else ensemble_prompts(
            maps[s], None if view.probs is None else view.probs[:, s], prompted_ids, cfg.prompts, rng,
            perturb_rng, view.logits[:, s] if cfg.prompts.use_mask_prompt else None))
        out.append(SliceWork(s, members, compose(view.labels[s], np.zeros_like(view.labels[s]), prompted_ids),
                             np.full(len(class_ids), np.nan, np.float32),
                             np.zeros(view.labels[s].shape, np.float32) if n > 1 else None))
    return out


def embed_prompted(work: list[SliceWork], slices: np.ndarray, case_id: str, generalist: Generalist,
                   cache: EmbeddingCache | None) -> tuple[dict[int, np.ndarray], set[int]]:
    """Step 3: the embeddings of the prompted slices {slice: embedding}, from the cache where it has them
    (computed and stored otherwise), and the set of slices read from the cache."""
    wanted = [w.index for w in work if w.prompted]
    if cache is not None:
        return cache.get(case_id, slices, wanted, generalist.embed)
    return (dict(zip(wanted, generalist.embed(slices[wanted]), strict=True)) if wanted else {}), set()


def decode_slice(w: SliceWork, embedding: np.ndarray, specialist: np.ndarray, generalist: Generalist,
                 class_ids: list[int], prompted_ids: list[int], overlap: str) -> None:
    """Step 4: decode every member's prompts in one call on the slice's embedding; fills ``w.maps`` (each
    member's masks merged into the specialist's map ``specialist`` (H, W)), ``w.scores``, and ``w.pseudo``
    / ``w.uncertainty`` (member 0's map, or the members' :func:`consensus`)."""
    res = generalist.decode(embedding, specialist.shape, [p for m in w.members for p in m])
    maps, sums, counts, start = [], np.zeros(len(class_ids)), np.zeros(len(class_ids)), 0
    for m in w.members:
        stop = start + len(m)
        merged = merge_class_masks(res.masks[start:stop], res.logits[start:stop], [p.class_id for p in m], overlap)
        maps.append(compose(specialist, merged, prompted_ids))
        for p, score in zip(m, res.scores[start:stop], strict=True):
            sums[class_ids.index(p.class_id)] += score
            counts[class_ids.index(p.class_id)] += 1
        start = stop
    w.maps = np.stack(maps)
    if len(w.members) > 1:
        w.pseudo, w.uncertainty = consensus(w.maps, class_ids)
    else:
        w.pseudo = maps[0]
    for k in range(len(class_ids)):
        if counts[k]:
            w.scores[k] = sums[k] / counts[k]


def manifest_row(w: SliceWork, specialist: np.ndarray, class_ids: list[int], cached: bool, meta: dict) -> dict:
    """Step 5: the slice's manifest row (see :mod:`pipeline.store`); ``meta``: the columns common to the
    case (round, case, checkpoint, generalist, class sources)."""
    score_by_class = {str(c): round(float(w.scores[k]), 4) for k, c in enumerate(class_ids) if not np.isnan(w.scores[k])}
    return {
        **meta,
        "slice": w.index,
        "num_prompts": len(w.members[0]),
        "prompts": summarize_prompts(w.members[0]),
        "score_mean": float(np.mean(list(score_by_class.values()))) if score_by_class else float("nan"),
        "scores": json.dumps(score_by_class),
        "pseudo_fg_fraction": float((w.pseudo > 0).mean()),
        "specialist_fg_fraction": float((specialist > 0).mean()),
        "agreement_dice": _fg_dice(w.pseudo, specialist),
        "embedding_cached": cached,
        **ensemble_columns(w.members, w.uncertainty, w.maps),
    }


def relabel_case(case_id: str, image: np.ndarray, model: UNet, generalist: Generalist,
                 cache: EmbeddingCache | None, cfg: RunConfig, class_ids: list[int], round_index: int,
                 checkpoint_version: int, device: torch.device,
                 sources: dict[int, str] | None = None, checkpoint_sha256: str = "",
                 oracle_labels: np.ndarray | None = None) -> CaseRelabel:
    """Relabel one case. image float32 (X, Y, Z), normalised as in training.

    ``sources`` (class id -> ``generalist``/``specialist``, :mod:`pipeline.class_source`; None: every class
    from the generalist): only generalist-sourced classes are prompted; each member's label map is the
    specialist's map with those classes replaced by the generalist's masks (:func:`compose`).
    ``checkpoint_version``/``checkpoint_sha256``: the specialist's checkpoint, recorded in every row.
    ``oracle_labels`` uint8 (S, H, W), slice-first: the case's labels, which prompts are then made from: the
    oracle control only (:mod:`pipeline.oracle`); None on every real run."""
    prompted_ids = generalist_classes(sources, class_ids)
    view = specialist_view(model, image, cfg, device)
    work = plan_slices(view, image, cfg, case_id, round_index, class_ids, prompted_ids, oracle_labels)
    embeddings, cached = embed_prompted(work, view.slices, case_id, generalist, cache)
    for w in work:
        if w.prompted:
            decode_slice(w, embeddings[w.index], view.labels[w.index], generalist, class_ids, prompted_ids,
                         cfg.generalist.overlap)
    meta = {"round": round_index, "case_id": case_id, "checkpoint_version": checkpoint_version,
            "checkpoint_sha256": checkpoint_sha256, "generalist": generalist.name,
            "decoder_sha256": getattr(generalist, "decoder_sha256", ""),
            "class_source": as_json(sources if sources is not None else {c: "generalist" for c in class_ids})}
    rows = [manifest_row(w, view.labels[w.index], class_ids, w.index in cached, meta) for w in work]
    uncertainty = np.stack([w.uncertainty for w in work]) if cfg.prompts.ensemble > 1 else None
    return CaseRelabel(np.stack([w.pseudo for w in work]), view.labels, np.stack([w.scores for w in work]),
                       rows, uncertainty)


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
