"""Whole-volume prediction with the specialist.

Volumes are ``(X, Y, Z)`` float32 arrays as read from disk. The 2D model runs on slices taken along
``slice_axis`` (batched); the 3D model runs on overlapping patches (sliding window, stride half a patch,
logits averaged). Returned logits are ``(C, X, Y, Z)`` float32 in the volume's own axis order.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.models.unet import UNet


def _pad_to_multiple(x: torch.Tensor, multiple: int, min_size: tuple[int, ...] | None = None,
                     value: float = 0.0) -> tuple[torch.Tensor, tuple]:
    """Pad the trailing spatial dims of ``x`` (B, C, *S) with ``value`` up to a multiple (and at least
    min_size)."""
    spatial = x.shape[2:]
    target = [int(np.ceil(s / multiple) * multiple) for s in spatial]
    if min_size is not None:
        target = [max(t, m) for t, m in zip(target, min_size, strict=True)]
    pad = []
    for s, t in zip(reversed(spatial), reversed(target), strict=True):
        pad += [0, t - s]
    return F.pad(x, pad, value=value), tuple(spatial)


@torch.inference_mode()
def predict_slices(model: UNet, slices: np.ndarray, device: torch.device, batch_size: int = 16) -> np.ndarray:
    """slices float32 (S, H, W) -> logits float32 (C, S, H, W).

    Padding takes the minimum of ``slices`` (pass a whole volume's slices): training crops are padded with
    their image's minimum too (in 2D the slice's, which is at most slightly above the volume's).
    """
    model.eval()
    out = []
    fill = float(slices.min()) if slices.size else 0.0
    for start in range(0, slices.shape[0], batch_size):
        x = torch.from_numpy(np.ascontiguousarray(slices[start:start + batch_size]))[:, None].to(device)
        xp, (h, w) = _pad_to_multiple(x, 2**model.depth, value=fill)
        out.append(model(xp)[:, :, :h, :w].float().cpu().numpy())
    return np.concatenate(out, axis=0).transpose(1, 0, 2, 3)


def _window_starts(size: int, patch: int) -> list[int]:
    if size <= patch:
        return [0]
    stride = max(1, patch // 2)
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


@torch.inference_mode()
def predict_patches(model: UNet, volume: np.ndarray, patch_size: tuple[int, int, int], device: torch.device) -> np.ndarray:
    """volume float32 (X, Y, Z) -> logits float32 (C, X, Y, Z), sliding window with half-patch stride.
    Padding takes the volume's minimum, as training crops do."""
    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(volume))[None, None]
    mult = 2**model.depth
    patch = tuple(int(np.ceil(p / mult) * mult) for p in patch_size)
    xp, shape = _pad_to_multiple(x, mult, min_size=patch, value=float(volume.min()))
    size = xp.shape[2:]
    logits = None
    counts = torch.zeros(size)
    for sx, sy, sz in itertools.product(*(_window_starts(s, p) for s, p in zip(size, patch, strict=True))):
        sl = (slice(sx, sx + patch[0]), slice(sy, sy + patch[1]), slice(sz, sz + patch[2]))
        out = model(xp[(..., *sl)].to(device)).float().cpu()[0]
        if logits is None:
            logits = torch.zeros((out.shape[0], *size))
        logits[(slice(None), *sl)] += out
        counts[sl] += 1
    logits = logits / counts
    return logits[:, : shape[0], : shape[1], : shape[2]].numpy()


def predict_volume(model: UNet, volume: np.ndarray, slice_axis: int, patch_size: tuple[int, ...],
                   device: torch.device) -> np.ndarray:
    """Logits (C, X, Y, Z) of the specialist for one volume (X, Y, Z), 2D or 3D as the model is."""
    if model.dims == 2:
        slices = np.moveaxis(volume, slice_axis, 0)
        logits = predict_slices(model, slices, device)  # (C, S, H, W)
        return np.moveaxis(logits, 1, slice_axis + 1)
    return predict_patches(model, volume, tuple(patch_size), device)
