"""Loading the stored generalist masks for training, with the per-slice score gate, the optional
voxel gate on agreement with the specialist, and the optional voxel weights from the prompt
ensemble's certainty."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.class_source import from_json, generalist_classes
from pipeline.errors import StoreError
from pipeline.store import PseudoLabelStore


@dataclass
class PseudoLabel:
    """Stored generalist masks of an unlabeled case, in the volume's axis order.

    labels uint8 (X, Y, Z); slice_weight float32 (S,) along ``slice_axis``: 1 keeps a slice, 0 drops it
    (gating by generalist score, decided when the pseudo-labels are loaded); voxel_weight float32 (X, Y, Z)
    in [0, 1] or None: per-voxel weights (the consensus gate's 0/1, the prompt ensemble's certainty),
    multiplied with the slice weight.
    """

    labels: np.ndarray
    slice_weight: np.ndarray
    voxel_weight: np.ndarray | None = None

    def weight(self, shape: tuple[int, ...], slice_axis: int) -> np.ndarray:
        """float32 ``shape`` (the volume's): slice weight broadcast along ``slice_axis``, times voxel weight."""
        view = [1, 1, 1]
        view[slice_axis] = -1
        w = np.broadcast_to(self.slice_weight.reshape(view).astype(np.float32), shape)
        return w if self.voxel_weight is None else w * self.voxel_weight


def slice_scores(scores: np.ndarray) -> np.ndarray:
    """Mean generalist score per slice over prompted classes: (S, K) -> (S,), NaN where none was prompted."""
    prompted = ~np.isnan(scores)
    total = np.where(prompted, scores, 0.0).sum(axis=1)
    count = prompted.sum(axis=1)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def empty_prompted(pseudo_label: np.ndarray, scores: np.ndarray, class_ids: list[int]) -> np.ndarray:
    """bool (S,): slices where a class was prompted (its score is not NaN) but its mask came back empty. The
    specialist saw the class there (that is why it was prompted); an empty answer is a failed mask, however
    confident its score, not evidence that the class is absent."""
    out = np.zeros(len(scores), bool)
    for k, c in enumerate(class_ids):
        prompted = ~np.isnan(scores[:, k])
        if prompted.any():
            present = (pseudo_label == c).reshape(len(pseudo_label), -1).any(axis=1)
            out |= prompted & ~present
    return out


def gated_pseudo_label(pseudo_label: np.ndarray, specialist: np.ndarray, scores: np.ndarray, slice_axis: int,
                       min_score: float, consensus_only: bool = False,
                       uncertainty: np.ndarray | None = None, class_ids: list[int] | None = None,
                       from_generalist: list[int] | None = None) -> PseudoLabel:
    """One case's relabel output (``pseudo_label``, ``specialist`` uint8 (S, H, W) slice-first, ``scores``
    float32 (S, K)) as a training :class:`PseudoLabel` in volume axis order, with slice weights 1/0.

    A slice without any prompt (score NaN) is kept: its pseudo-label is background, which the specialist
    itself predicted there. A prompted slice is kept when its mean score reaches ``min_score`` and, with
    ``class_ids`` (the store's foreground classes, the columns of ``scores``), no prompted class came back
    as an empty mask (:func:`empty_prompted`: such masks scored 0.59 and passed a 0.5 gate).
    ``consensus_only``: voxels where the pseudo-label differs from the specialist prediction stored with
    it (the one its prompts came from) get weight 0 (``PseudoLabel.voxel_weight``).
    ``uncertainty`` float (S, H, W) (the prompt ensemble's disagreement, slice-first): every voxel is
    weighted by 1 - uncertainty, times the consensus gate when both are on.
    ``from_generalist`` (the case's classes taken from the generalist; None: no such gate): only voxels where
    the pseudo-label or the specialist prediction is one of them keep their weight; an empty list gates the
    whole case out.
    """
    mean = slice_scores(scores)
    keep = np.where(np.isnan(mean), 1.0, mean >= min_score).astype(np.float32)
    if class_ids is not None:
        keep[empty_prompted(pseudo_label, scores, class_ids)] = 0.0
    labels = np.moveaxis(pseudo_label, 0, slice_axis)
    voxel = None
    if consensus_only:
        voxel = (pseudo_label == specialist).astype(np.float32)
    if from_generalist is not None:
        decided = (np.isin(pseudo_label, from_generalist) | np.isin(specialist, from_generalist)).astype(np.float32)
        voxel = decided if voxel is None else voxel * decided
    if uncertainty is not None:
        certainty = np.clip(1.0 - np.asarray(uncertainty, np.float32), 0.0, 1.0)
        voxel = certainty if voxel is None else voxel * certainty
    if voxel is not None:
        voxel = np.ascontiguousarray(np.moveaxis(voxel, 0, slice_axis))
    return PseudoLabel(np.ascontiguousarray(labels), keep, voxel)


def generalist_classes_by_case(store: PseudoLabelStore, round_index: int) -> dict[str, list[int]]:
    """{case: its classes taken from the generalist in ``round_index``} from the manifest's ``class_source``
    (an empty record, as in stores made before per-class sources, means every class from the generalist)."""
    return {str(case_id): generalist_classes(from_json(rows["class_source"].iloc[0]), store.class_ids)
            for case_id, rows in store.manifest(round_index).groupby("case_id")}


def load_pseudo_labels(store: PseudoLabelStore, round_index: int, case_ids: list[str], slice_axis: int,
                       min_score: float, consensus_only: bool = False,
                       uncertainty_weighting: bool = False, generalist_voxels_only: bool = False) -> dict[str, PseudoLabel]:
    """The masks of ``round_index`` for ``case_ids`` from the store, gated as :func:`gated_pseudo_label`;
    with ``uncertainty_weighting`` each case must have its ensemble ``uncertainty`` array; with
    ``generalist_voxels_only`` each case's generalist classes come from the manifest."""
    from_generalist = generalist_classes_by_case(store, round_index) if generalist_voxels_only else {}
    out = {}
    for case_id in case_ids:
        stored = store.read_case(round_index, case_id)
        if uncertainty_weighting and stored["uncertainty"] is None:
            raise StoreError(f"case {case_id} in round {round_index} of {store.loc} has no uncertainty array (it "
                             "was relabeled with one prompt set): train.pseudo_label.uncertainty_weighting needs "
                             "prompts.ensemble > 1 when the round is relabeled")
        out[case_id] = gated_pseudo_label(stored["pseudo_label"], stored["specialist"], stored["scores"],
                                          slice_axis, min_score, consensus_only,
                                          stored["uncertainty"] if uncertainty_weighting else None,
                                          store.class_ids,
                                          from_generalist.get(case_id, []) if generalist_voxels_only else None)
    return out
