"""The generalist interface: embed a slice once (costly), decode many prompts against it (cheap).

Conventions (as in ``segment_anything``):
- a slice is a 2D array indexed ``[row, col]`` = ``[y, x]``, shape ``(H, W)``;
- points are ``points_xy``: float ``(N, 2)`` holding ``(x, y)`` = ``(col, row)`` in pixels of the slice;
  ``np.argwhere`` gives ``(row, col)``, so flip it;
- boxes are ``box_xyxy``: float ``(4,)`` = ``(x0, y0, x1, y1)``, the pixel coordinates of the top-left and
  bottom-right pixels covered (inclusive);
- point labels: 1 = foreground (positive), 0 = background (negative).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class SlicePrompt:
    """Prompts for one class on one slice, all derived from the specialist's prediction.

    points_xy: float32 (N, 2), (x, y) pixel coordinates; may be empty (0, 2).
    point_labels: int32 (N,), 1 positive / 0 negative.
    box_xyxy: float32 (4,) or None.
    mask_logits: float32 (H, W) specialist logit map for this class (foreground minus background), or None.
    """

    class_id: int
    points_xy: np.ndarray
    point_labels: np.ndarray
    box_xyxy: np.ndarray | None = None
    mask_logits: np.ndarray | None = None

    def summary(self) -> dict:
        """A small JSON-able record of the prompt, stored with the pseudo-label for traceability."""
        return {
            "class_id": int(self.class_id),
            "points_xy": np.asarray(self.points_xy, dtype=float).round(1).tolist(),
            "point_labels": np.asarray(self.point_labels, dtype=int).tolist(),
            "box_xyxy": None if self.box_xyxy is None else np.asarray(self.box_xyxy, dtype=float).round(1).tolist(),
            "mask_prompt": self.mask_logits is not None,
        }


@dataclass(frozen=True)
class DecodeResult:
    """Masks for P prompts on one slice of shape (H, W).

    masks: bool (P, H, W); scores: float32 (P,) the generalist's own quality estimate in [0, 1]
    (SAM's predicted IoU; the random walker's mean probability inside the mask);
    logits: float32 (P, H, W), higher = more foreground, used to settle overlaps between classes.
    """

    masks: np.ndarray
    scores: np.ndarray
    logits: np.ndarray


class Generalist(Protocol):
    """A frozen promptable segmenter."""

    name: str
    """Short id stored with every mask (e.g. ``sam-vit_b``, ``sam-tiny``, ``classical-random-walker``)."""
    cacheable: bool
    """Whether ``embed`` computes something worth keeping (SAM's image embeddings); a weight-free generalist
    returns the slices themselves and is never cached. The one place this is decided (see
    :func:`pipeline.generalist.factory.caches_embeddings`)."""

    def embed(self, slices: np.ndarray) -> np.ndarray:
        """Embed a batch of slices. slices: float32 (B, H, W), any intensity scale (each slice is windowed
        on its own). Returns an array (B, ...) whose rows can be stored and passed back to ``decode``."""
        ...

    def decode(self, embedding: np.ndarray, slice_shape: tuple[int, int], prompts: list[SlicePrompt]) -> DecodeResult:
        """Decode prompts against one slice's embedding (one row of ``embed``'s output)."""
        ...
