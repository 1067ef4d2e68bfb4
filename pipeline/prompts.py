"""Prompts for one slice, derived ONLY from the specialist's prediction (never from a label).

The released SemiSAM code builds the prompts of *unlabeled* scans from their ground truth, which leaks
the labels into training. Here every prompt comes from the specialist's own argmax map (and, optionally,
its logits); nothing in this module ever sees a label.

Conventions (those of :mod:`pipeline.generalist.base`, i.e. ``segment_anything``'s):

- a slice / label map is indexed ``[row, col]`` = ``[y, x]``, shape ``(H, W)``;
- ``np.argwhere`` gives ``(row, col)``; ``points_xy`` hold ``(x, y)`` = ``(col, row)``;
- ``box_xyxy`` = ``(x0, y0, x1, y1)`` are the inclusive pixel coordinates of the top-left and bottom-right
  pixels covered by the box.

For one class ``c`` on a slice:

- the *component* is the largest 8-connected component of ``pred == c``; a class whose component has
  fewer than ``min_component_pixels`` pixels gets no prompt;
- positives: the most interior pixel of the component (maximum of its Euclidean distance transform)
  then ``num_random_positive`` distinct random pixels of the component;
- box: the bounding box of every component of ``pred == c`` with at least ``min_component_pixels``
  pixels and at least ``box_min_component_fraction`` of the largest component (so an organ predicted in
  two pieces stays inside its box, while a stray false positive far away cannot blow the box up), grown by ``box_margin`` on each side and clipped to the slice;
- negatives: ``num_negative`` distinct random pixels with ``pred != c`` inside the margined box, or, when
  the box holds none, in a ring around the box;
- mask prompt: ``class_logits[c] - class_logits[0]`` (foreground minus background logit).
"""

from __future__ import annotations

import json
import logging

import numpy as np
from scipy import ndimage

from pipeline.config import PromptConfig
from pipeline.generalist.base import SlicePrompt

log = logging.getLogger(__name__)

_EIGHT = np.ones((3, 3), dtype=bool)


def _check_2d(mask: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be 2D (H, W), got shape {arr.shape}")
    return arr


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a 2D mask.

    mask: (H, W), anything truthy is foreground. Returns bool (H, W); all False when ``mask`` is empty.
    Ties between equally large components go to the one met first in row-major order.
    """
    m = _check_2d(mask, "mask").astype(bool)
    labels, n = ndimage.label(m, structure=_EIGHT)
    if n == 0:
        return np.zeros(m.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def interior_point(mask: np.ndarray) -> tuple[int, int] | None:
    """(row, col) of the most interior pixel of a 2D mask, or None when the mask is empty.

    The most interior pixel is the maximum of the Euclidean distance transform (distance to the nearest
    background pixel). Pixels outside the slice count as background, so a mask touching the slice border
    does not get its interior point pushed onto the border. Ties go to the first pixel in
    ``np.argwhere`` (row-major) order.
    """
    m = _check_2d(mask, "mask").astype(bool)
    if not m.any():
        return None
    dist = ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(dist)), m.shape)  # argmax: first maximum, row-major
    return int(row), int(col)


def _pick(rc: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Up to k distinct rows of ``rc`` (N, 2), drawn without replacement."""
    k = min(k, len(rc))
    if k <= 0:
        return rc[:0]
    return rc[rng.choice(len(rc), size=k, replace=False)]


def _box_rc(mask: np.ndarray, margin: int) -> tuple[int, int, int, int]:
    """Inclusive (r0, c0, r1, c1) bounding box of a non-empty mask, grown by ``margin`` and clipped."""
    h, w = mask.shape
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return (max(int(rows[0]) - margin, 0), max(int(cols[0]) - margin, 0),
            min(int(rows[-1]) + margin, h - 1), min(int(cols[-1]) + margin, w - 1))


def _box_region(shape: tuple[int, int], r0: int, c0: int, r1: int, c1: int) -> np.ndarray:
    region = np.zeros(shape, dtype=bool)
    region[r0:r1 + 1, c0:c1 + 1] = True
    return region


def _class_extent(cls: np.ndarray, component: np.ndarray, min_pixels: int, min_fraction: float = 0.0) -> np.ndarray:
    """Union of the 8-connected components of ``cls`` with >= max(min_pixels, min_fraction * the largest
    component) pixels (always incl. ``component``, the largest)."""
    labels, n = ndimage.label(cls, structure=_EIGHT)
    if n <= 1:
        return component
    sizes = np.bincount(labels.ravel())
    keep = sizes >= max(min_pixels, min_fraction * int(component.sum()))
    keep[0] = False
    return keep[labels] | component


def _rc_to_xy(rc: np.ndarray) -> np.ndarray:
    """(N, 2) (row, col) -> float32 (N, 2) (x, y) = (col, row)."""
    return np.asarray(rc, dtype=np.float32).reshape(-1, 2)[:, ::-1].copy()


def prompts_for_slice(
    pred: np.ndarray,
    class_ids: list[int],
    cfg: PromptConfig,
    rng: np.random.Generator,
    class_logits: np.ndarray | None = None,
) -> list[SlicePrompt]:
    """Prompts for the classes present in the specialist's prediction of one slice.

    pred: int (H, W), the specialist's argmax label map. class_ids: the foreground classes to prompt.
    cfg: how many points, box margin, mask prompt, minimum component size. rng: the only source of
    randomness (same rng state -> same prompts). class_logits: optional float (C, H, W), C classes incl.
    background (index = class id); used only for the mask prompt (``cfg.use_mask_prompt``).

    Returns one :class:`SlicePrompt` per class that has a component of at least
    ``cfg.min_component_pixels`` pixels, in the order of ``class_ids``. Points are positives first (the
    interior point, then the random ones), then negatives; ``points_xy`` float32 (N, 2) = (x, y),
    ``point_labels`` int32 (N,) 1/0, ``box_xyxy`` float32 (4,) inclusive pixel coordinates or None,
    ``mask_logits`` float32 (H, W) or None.
    """
    pred = _check_2d(pred, "pred")
    h, w = pred.shape
    if class_logits is not None:
        class_logits = np.asarray(class_logits)
        if class_logits.ndim != 3 or class_logits.shape[1:] != (h, w):
            raise ValueError(f"class_logits must be (C, {h}, {w}), got {class_logits.shape}")
    prompts: list[SlicePrompt] = []
    for c in class_ids:
        c = int(c)
        cls = pred == c
        comp = largest_component(cls)
        n_comp = int(comp.sum())
        if n_comp < cfg.min_component_pixels:
            if n_comp:
                log.debug("class %d: largest component %d px < %d, no prompt", c, n_comp, cfg.min_component_pixels)
            continue
        pos_rc = _positive_points(comp, cfg.num_random_positive, rng)
        # Box around every sizeable piece of the class, grown by the margin.
        r0, c0, r1, c1 = _box_rc(_class_extent(cls, comp, cfg.min_component_pixels, cfg.box_min_component_fraction), cfg.box_margin)
        box = np.array([c0, r0, c1, r1], dtype=np.float32) if cfg.use_box else None
        neg_rc = _negative_points(cls, (r0, c0, r1, c1), cfg, rng)
        mask_logits = None
        if cfg.use_mask_prompt and class_logits is not None:
            if not 0 <= c < class_logits.shape[0]:
                raise ValueError(f"class id {c} has no channel in class_logits of shape {class_logits.shape}")
            mask_logits = (class_logits[c].astype(np.float32) - class_logits[0].astype(np.float32))
        points_xy = np.concatenate([_rc_to_xy(pos_rc), _rc_to_xy(neg_rc)]).astype(np.float32)
        labels = np.concatenate([np.ones(len(pos_rc), np.int32), np.zeros(len(neg_rc), np.int32)])
        if not cfg.use_points:  # box only (LiteMedSAM was trained on boxes); the rng advanced the same way
            points_xy, labels = points_xy[:0], labels[:0]
        prompts.append(SlicePrompt(class_id=c, points_xy=points_xy, point_labels=labels,
                                   box_xyxy=box, mask_logits=mask_logits))
    return prompts


def _positive_points(comp: np.ndarray, num_random: int, rng: np.random.Generator) -> np.ndarray:
    """int (1 + num_random, 2) (row, col): the most interior pixel of the component ``comp`` (bool (H, W),
    non-empty), then ``num_random`` distinct random pixels of it."""
    centre = interior_point(comp)
    assert centre is not None  # comp is non-empty
    others = np.argwhere(comp)
    others = others[(others[:, 0] != centre[0]) | (others[:, 1] != centre[1])]
    return np.concatenate([np.array([centre]), _pick(others, num_random, rng)])


def _negative_points(cls: np.ndarray, box_rc: tuple[int, int, int, int], cfg: PromptConfig,
                     rng: np.random.Generator) -> np.ndarray:
    """int (N, 2) (row, col): ``cfg.num_negative`` pixels that are not the class (``cls`` bool (H, W)),
    inside the margined box ``box_rc`` (r0, c0, r1, c1); else in a ring around the box."""
    if cfg.num_negative <= 0:
        return np.zeros((0, 2), dtype=np.int64)
    h, w = cls.shape
    r0, c0, r1, c1 = box_rc
    inside = _box_region((h, w), r0, c0, r1, c1)
    cand = np.argwhere(inside & ~cls)
    if len(cand) == 0:
        g = max(cfg.box_margin, 2)
        outer = _box_region((h, w), max(r0 - g, 0), max(c0 - g, 0), min(r1 + g, h - 1), min(c1 + g, w - 1))
        cand = np.argwhere(outer & ~inside & ~cls)
    return _pick(cand, cfg.num_negative, rng)


def summarize_prompts(prompts: list[SlicePrompt]) -> str:
    """A compact JSON string (a list of :meth:`SlicePrompt.summary` records) for the manifest."""
    return json.dumps([p.summary() for p in prompts], separators=(",", ":"))


# -- the prompt ensemble (prompts.ensemble > 1) ------------------------------------------------------
def specialist_region(probs: np.ndarray, class_ids: list[int], threshold: float) -> np.ndarray:
    """The specialist's label map at another threshold: uint8 (H, W), the most probable foreground class of
    ``class_ids`` where its probability reaches ``threshold``, else 0.

    probs: float (C, H, W), the specialist's softmax incl. background (index = class id). At threshold 0.5
    this is the argmax map wherever one class holds the majority; lower thresholds grow the regions (and
    can join pieces into another largest component), higher ones shrink them.
    """
    probs = np.asarray(probs)
    ids = np.asarray(class_ids, dtype=np.int64)
    if probs.ndim != 3 or len(ids) == 0:
        raise ValueError(f"probs must be (C, H, W) with foreground classes, got {probs.shape} and {class_ids}")
    fg = probs[ids]                                     # (K, H, W)
    best = fg.argmax(0)
    top = np.take_along_axis(fg, best[None], 0)[0]
    return np.where(top >= threshold, ids[best], 0).astype(np.uint8)


def _jitter_points(points_xy: np.ndarray, labels: np.ndarray, cls: np.ndarray, shift: int,
                   rng: np.random.Generator) -> np.ndarray:
    """Move each point by up to ``shift`` pixels in x and y; a positive that would leave ``cls`` (bool
    (H, W), the class region it was drawn from) or a negative that would enter it stays where it was."""
    if shift <= 0 or len(points_xy) == 0:
        return points_xy
    h, w = cls.shape
    moved = points_xy + rng.integers(-shift, shift + 1, size=points_xy.shape)
    moved[:, 0] = np.clip(moved[:, 0], 0, w - 1)
    moved[:, 1] = np.clip(moved[:, 1], 0, h - 1)
    inside = cls[moved[:, 1].astype(np.int64), moved[:, 0].astype(np.int64)]
    ok = np.where(labels == 1, inside, ~inside)
    return np.where(ok[:, None], moved, points_xy).astype(np.float32)


def _jitter_box(box: np.ndarray | None, shift: int, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray | None:
    """Grow or shrink each side of an inclusive XYXY box by up to ``shift`` pixels (margin drawn from
    box_margin +- shift per side), clipped to the slice and never inverted."""
    if box is None or shift <= 0:
        return box
    h, w = shape
    d = rng.integers(-shift, shift + 1, size=4)
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, y0 = np.clip(x0 - d[0], 0, w - 1), np.clip(y0 - d[1], 0, h - 1)
    x1, y1 = np.clip(x1 + d[2], 0, w - 1), np.clip(y1 + d[3], 0, h - 1)
    return np.array([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], dtype=np.float32)


def ensemble_prompts(pred: np.ndarray, probs: np.ndarray | None, class_ids: list[int], cfg: PromptConfig,
                     rng: np.random.Generator, perturb_rng: np.random.Generator,
                     class_logits: np.ndarray | None = None) -> list[list[SlicePrompt]]:
    """``cfg.ensemble`` prompt sets for one slice, member 0 first.

    Member 0 is :func:`prompts_for_slice` on ``pred`` with ``rng``: exactly the prompts of an ensemble of
    one (``perturb_rng`` is not touched for it, so ``rng`` advances the same way). Members 1..N-1 (all
    their randomness from ``perturb_rng``): the class region is the specialist's probability ``probs``
    (float (C, H, W) softmax) re-thresholded at 0.5 +- ``threshold_jitter`` (:func:`specialist_region`),
    prompts are built from it with fresh random positives and negatives, then every point moves by up
    to ``point_jitter`` pixels (staying on its side of the region) and every box side by up to
    ``box_margin_jitter``. A member may prompt a class member 0 does not, or miss one: that is part of
    the spread the ensemble measures.
    """
    members = [prompts_for_slice(pred, class_ids, cfg, rng, class_logits)]
    if cfg.ensemble == 1:
        return members
    if probs is None:
        raise ValueError("an ensemble of prompts needs the specialist's probabilities (probs)")
    shape = pred.shape
    for _ in range(1, cfg.ensemble):
        threshold = 0.5 + float(perturb_rng.uniform(-cfg.threshold_jitter, cfg.threshold_jitter))
        region = specialist_region(probs, class_ids, threshold)
        member = []
        for p in prompts_for_slice(region, class_ids, cfg, perturb_rng, class_logits):
            member.append(SlicePrompt(
                class_id=p.class_id,
                points_xy=_jitter_points(p.points_xy, p.point_labels, region == p.class_id, cfg.point_jitter,
                                         perturb_rng),
                point_labels=p.point_labels,
                box_xyxy=_jitter_box(p.box_xyxy, cfg.box_margin_jitter, shape, perturb_rng),
                mask_logits=p.mask_logits,
            ))
        members.append(member)
    return members
