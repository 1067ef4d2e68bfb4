"""The weight-free baseline generalist: a random walker (Grady 2006) seeded by the prompts.

``embed`` is the windowed slice scaled to [0, 1] (cheap, no weights); ``decode`` runs
``skimage.segmentation.random_walker`` once per prompt with seeds

- label 1 (foreground) at the positive points,
- label 2 (background) at the negative points, on every pixel outside the box
  (``box_outside_is_background``), and on a rectangle ``background_ring`` pixels outside the box (the
  sides of it that fall inside the slice); when the box gives no background seed (no box, or neither
  option applies), the slice border is seeded as background too.

Positives win where a positive and a background seed fall on the same pixel. ``mask = p_fg > 0.5``
restricted to the box, ``score`` = mean ``p_fg`` inside the mask (0 when empty), ``logits`` =
``log(p / (1 - p))`` clipped to +-20, and -20 outside the box (so the logits agree with the mask when
classes are merged).

When everything outside the box is seeded, the walk is solved on the box grown by one pixel only: the
unseeded pixels all lie inside the box and their equations only reach their 4-neighbours, so the
solution is the same as on the whole slice, provided the edge weights are. skimage scales ``beta`` by
``1 / (10 * std(data))``; ``beta`` is rescaled by ``std(crop) / std(slice)`` so the weights are the
slice's own.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
from skimage.segmentation import random_walker

from pipeline.config import ClassicalConfig
from pipeline.generalist.base import DecodeResult, SlicePrompt
from pipeline.generalist.windowing import window_to_uint8

log = logging.getLogger(__name__)

_FG, _BG = 1, 2
_LOGIT_CLIP = 20.0
_BF_MAX_UNKNOWNS = 300_000
"""Direct sparse solve ("bf", exact, fastest on slices) up to this many unseeded pixels; "cg_j" above."""


def _seed_rc(points_xy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """float (N, 2) (x, y) -> int (N, 2) (row, col), rounded to the nearest pixel and clipped to the slice."""
    xy = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
    rc = np.rint(xy[:, ::-1]).astype(np.int64)
    rc[:, 0] = np.clip(rc[:, 0], 0, shape[0] - 1)
    rc[:, 1] = np.clip(rc[:, 1], 0, shape[1] - 1)
    return rc


def _box_rc(box_xyxy: np.ndarray, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """float (4,) inclusive XYXY -> int (r0, c0, r1, c1) inclusive, clipped to the slice (r0 <= r1, c0 <= c1)."""
    h, w = shape
    x0, y0, x1, y1 = np.rint(np.asarray(box_xyxy, dtype=np.float64).reshape(4)).astype(np.int64)
    c0, c1 = sorted((int(np.clip(x0, 0, w - 1)), int(np.clip(x1, 0, w - 1))))
    r0, r1 = sorted((int(np.clip(y0, 0, h - 1)), int(np.clip(y1, 0, h - 1))))
    return r0, c0, r1, c1


def _ring(shape: tuple[int, int], box: tuple[int, int, int, int], gap: int) -> np.ndarray:
    """bool (H, W): the outline of the box grown by ``gap``, only the sides that lie inside the slice."""
    h, w = shape
    r0, c0, r1, c1 = box
    ring = np.zeros(shape, dtype=bool)
    rt, rb, cl, cr = r0 - gap, r1 + gap, c0 - gap, c1 + gap
    rs, re = max(rt, 0), min(rb, h - 1)
    cs, ce = max(cl, 0), min(cr, w - 1)
    if rt >= 0:
        ring[rt, cs:ce + 1] = True
    if rb < h:
        ring[rb, cs:ce + 1] = True
    if cl >= 0:
        ring[rs:re + 1, cl] = True
    if cr < w:
        ring[rs:re + 1, cr] = True
    return ring


def _walk(data: np.ndarray, seeds: np.ndarray, scale: float | None) -> np.ndarray | None:
    """Foreground probability float64 (h, w) of the random walk on ``data`` with ``seeds`` (0 / FG / BG).

    scale: the weight scale ``beta / (10 * std)`` wanted (None: the slice is flat, all weights equal).
    Returns None (and logs) when skimage fails or answers in an unexpected shape.
    """
    if not (seeds == 0).any() or not (seeds == _FG).any() or not (seeds == _BG).any():
        # Nothing to solve, or one label only (skimage would answer in another shape): the seeds decide,
        # unseeded pixels follow the only label present.
        return np.where(seeds == 0, float((seeds == _FG).any()), (seeds == _FG).astype(np.float64))
    std = float(data.std())
    if scale is None or std == 0.0:
        # No gradient anywhere: every edge weight equal. A checkerboard has the same |gradient| on every
        # edge, so it gives equal weights too, and a non-zero std for skimage to divide by.
        rows, cols = np.indices(data.shape)
        data = ((rows + cols) % 2).astype(np.float64)
        beta = 1e-6
    else:
        beta = scale * 10.0 * std
    unknowns = int((seeds == 0).sum())
    mode = "bf" if unknowns <= _BF_MAX_UNKNOWNS else "cg_j"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prob = random_walker(data, seeds, beta=beta, mode=mode, return_full_prob=True)
        for w in caught:
            log.debug("random_walker: %s", w.message)
    except Exception as e:  # a failed walk yields an empty mask, never a crashed worker
        log.warning("random_walker failed (%s: %s); returning an empty mask", type(e).__name__, e)
        return None
    prob = np.asarray(prob, dtype=np.float64)
    if prob.shape != (2,) + seeds.shape:
        log.warning("random_walker returned shape %s for seeds %s; returning an empty mask", prob.shape, seeds.shape)
        return None
    return np.clip(prob[0], 0.0, 1.0)


class RandomWalkerGeneralist:
    """Random-walker generalist: weight-free, CPU only; the baseline against SAM."""

    name = "classical-random-walker"
    cacheable = False  # its "embedding" is the windowed slice itself

    def __init__(self, cfg: ClassicalConfig) -> None:
        self.cfg = cfg
        self.window_percentiles = (float(cfg.window_percentiles[0]), float(cfg.window_percentiles[1]))

    def embed(self, slices: np.ndarray) -> np.ndarray:
        """slices float (B, H, W), any intensity scale -> float32 (B, H, W): each slice windowed to [0, 1]."""
        slices = np.asarray(slices)
        if slices.ndim != 3:
            raise ValueError(f"slices must be (B, H, W), got shape {slices.shape}")
        out = np.empty(slices.shape, dtype=np.float32)
        for i, s in enumerate(slices):
            out[i] = window_to_uint8(s, self.window_percentiles).astype(np.float32) / 255.0
        return out

    def decode(self, embedding: np.ndarray, slice_shape: tuple[int, int], prompts: list[SlicePrompt]) -> DecodeResult:
        """One slice's embedding float (H, W) and P prompts -> masks bool (P, H, W), scores float32 (P,),
        logits float32 (P, H, W)."""
        h, w = int(slice_shape[0]), int(slice_shape[1])
        img = np.asarray(embedding, dtype=np.float64)
        if img.shape != (h, w):
            raise ValueError(f"embedding shape {img.shape} does not match slice_shape {(h, w)}")
        if not np.isfinite(img).all():
            raise ValueError("embedding holds NaN or infinite values")
        std = float(img.std())
        scale = self.cfg.beta / (10.0 * std) if std > 0 else None
        masks = np.zeros((len(prompts), h, w), dtype=bool)
        scores = np.zeros(len(prompts), dtype=np.float32)
        logits = np.full((len(prompts), h, w), -_LOGIT_CLIP, dtype=np.float32)
        for i, p in enumerate(prompts):
            masks[i], scores[i], logits[i] = self._decode_one(img, scale, p)
        return DecodeResult(masks=masks, scores=scores, logits=logits)

    def _decode_one(self, img: np.ndarray, scale: float | None, p: SlicePrompt) -> tuple[np.ndarray, float, np.ndarray]:
        shape = img.shape
        empty = (np.zeros(shape, bool), 0.0, np.full(shape, -_LOGIT_CLIP, np.float32))
        labels = np.asarray(p.point_labels).reshape(-1)
        rc = _seed_rc(p.points_xy, shape)
        if len(rc) != len(labels):
            raise ValueError(f"class {p.class_id}: {len(rc)} points but {len(labels)} point labels")
        pos, neg = rc[labels == 1], rc[labels == 0]
        if len(pos) == 0:
            return empty

        seeds = np.zeros(shape, dtype=np.int32)
        box = _box_rc(p.box_xyxy, shape) if p.box_xyxy is not None else None
        in_box = np.ones(shape, dtype=bool)
        if box is not None:
            r0, c0, r1, c1 = box
            in_box[:] = False
            in_box[r0:r1 + 1, c0:c1 + 1] = True
            if self.cfg.box_outside_is_background:
                seeds[~in_box] = _BG
            if self.cfg.background_ring > 0:
                seeds[_ring(shape, box, self.cfg.background_ring)] = _BG
        if not (seeds == _BG).any():
            # No background from the box: the slice border is background (a few negative points alone
            # leave the rest of the slice floating between the labels).
            border = np.zeros(shape, dtype=bool)
            border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
            seeds[border] = _BG
        seeds[neg[:, 0], neg[:, 1]] = _BG
        seeds[pos[:, 0], pos[:, 1]] = _FG

        if box is not None and self.cfg.box_outside_is_background:
            # Solve on the box grown by one pixel only; see the module docstring.
            r0, c0, r1, c1 = box
            sl = (slice(max(r0 - 1, 0), min(r1 + 2, shape[0])), slice(max(c0 - 1, 0), min(c1 + 2, shape[1])))
            prob = np.zeros(shape)
            sub = _walk(img[sl], seeds[sl], scale)
            if sub is None:
                return empty
            prob[sl] = sub
        else:
            prob = _walk(img, seeds, scale)
            if prob is None:
                return empty

        mask = (prob > 0.5) & in_box
        score = float(prob[mask].mean()) if mask.any() else 0.0
        eps = 1e-9
        pc = np.clip(prob, eps, 1.0 - eps)
        logit = np.clip(np.log(pc) - np.log1p(-pc), -_LOGIT_CLIP, _LOGIT_CLIP)
        logit[~in_box] = -_LOGIT_CLIP
        return mask, score, logit.astype(np.float32)
