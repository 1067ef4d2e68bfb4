"""The adapted generalist (``generalist.adapt``): SAM's mask decoder fine-tuned on the labeled slices.

A frozen box-prompted SAM cannot tell a ring from the disk it encloses: LiteMedSAM given a box around
ACDC's myocardium (a ring around the left-ventricle blood pool) returns the filled disk (Dice 0.03). Before
the first relabel round a SAM actor fine-tunes the mask decoder (optionally the prompt encoder) on the
*labeled training slices only*, prompted with the labels' boxes made wrong the way a specialist's are
(:func:`jitter_box`), loss BCE + soft Dice on the mask and MSE of the predicted IoU. The image encoder is
untouched, so its embeddings come from the embedding cache and the cache stays valid.

With ``class_tokens`` (the default) each prompt also carries one learned token per class, appended to the
prompt encoder's sparse embeddings: a box around the myocardium and one around the blood pool are nearly
the same box, and the token says which structure is meant. A SlicePrompt already names its class.

Frames (as :mod:`pipeline.generalist.sam`): a slice is ``(H, W)``; boxes are ``XYXY`` inclusive pixels of
the slice; the decoder's low-resolution output is ``(L, L)`` with ``L = 4 E`` (256 for LiteMedSAM and the
ViTs) and covers the padded encoder input ``(S, S)``; the slice sits in its top-left ``(h', w')`` corner
(``SamGeneralist.input_size``), so a target is the slice's mask resized to ``(h' L / S, w' L / S)`` and
padded with background.

The result is a run artifact (:func:`save_adapted`): a weights-only file holding the decoder's state dict,
the class tokens, the classes, the settings it was fitted with and the SHA-256 of the generalist checkpoint
it was fitted on; the file's own SHA-256 names it in state.json and in every manifest row
(``decoder_sha256``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.atomic import atomic_torch_save
from pipeline.config import AdaptConfig
from pipeline.errors import CheckpointError
from pipeline.storage import Location, file_sha256

log = logging.getLogger(__name__)

FORMAT = 1
"""Version of the adapted-decoder file's layout (:func:`save_adapted`)."""


# -- boxes: pure functions of arrays and an explicit generator --------------------------------------------
def label_box(mask: np.ndarray) -> np.ndarray:
    """The tight box ``XYXY`` float32 (4,) (inclusive pixels) of a non-empty bool mask (H, W)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], np.float32)


def jitter_box(box_xyxy: np.ndarray, shape: tuple[int, int], cfg: AdaptConfig, rng: np.random.Generator) -> np.ndarray:
    """A box as a specialist's may be wrong: the centre moved by ``N(0, shift_std * side)`` along x and y,
    each side length scaled by ``exp(N(0, log_scale_std))``, then a margin drawn uniformly from
    ``margin_min..margin_max`` pixels added on every side; rounded and clipped to the slice ``shape`` (H, W),
    at least one pixel wide. box_xyxy float (4,) inclusive pixels -> float32 (4,)."""
    h, w = shape
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    size = np.array([x1 - x0 + 1, y1 - y0 + 1])
    centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2]) + rng.normal(0.0, cfg.shift_std, 2) * size
    size = size * np.exp(rng.normal(0.0, cfg.log_scale_std, 2))
    margin = rng.integers(cfg.margin_min, cfg.margin_max + 1)
    lo = np.round(centre - (size - 1) / 2) - margin
    hi = np.round(centre + (size - 1) / 2) + margin
    lo = np.clip(lo, 0, [w - 1, h - 1])
    hi = np.clip(np.maximum(hi, lo), 0, [w - 1, h - 1])
    return np.array([lo[0], lo[1], hi[0], hi[1]], np.float32)


def low_res_target(mask: np.ndarray, input_size: tuple[int, int], image_size: int, low_res: int) -> torch.Tensor:
    """A slice's class mask bool (H, W) in the decoder's low-resolution frame: float32 (L, L) in {0, 1},
    the mask resized (bilinear, > 0.5) to the slice's part of the padded input ``input_size`` = (h', w')
    scaled by ``L / image_size``, background elsewhere."""
    ih, iw = (max(1, round(v * low_res / image_size)) for v in input_size)
    x = torch.from_numpy(np.asarray(mask, np.float32))[None, None]
    x = (F.interpolate(x, (ih, iw), mode="bilinear", align_corners=False) > 0.5).float()
    return F.pad(x, (0, low_res - iw, 0, low_res - ih))[0, 0]


@dataclass(frozen=True)
class AdaptSlice:
    """One labeled slice to learn from: its cached embedding float32 (C, E, E), its label uint8 (H, W) and
    the foreground classes present with at least ``min_pixels`` pixels (``classes``)."""

    embedding: np.ndarray
    label: np.ndarray
    classes: tuple[int, ...]


def adapt_slices(embeddings: dict[int, np.ndarray], labels: np.ndarray, class_ids: list[int],
                 min_pixels: int) -> list[AdaptSlice]:
    """The slices of one labeled case worth learning from: labels uint8 (S, H, W) slice-first, embeddings
    {slice: (C, E, E)} of the slices with any class of ``class_ids`` of at least ``min_pixels`` pixels."""
    out = []
    for s, emb in sorted(embeddings.items()):
        present = tuple(int(c) for c in class_ids if (labels[s] == c).sum() >= min_pixels)
        if present:
            out.append(AdaptSlice(emb, labels[s], present))
    return out


def slices_to_embed(labels: np.ndarray, class_ids: list[int], min_pixels: int) -> list[int]:
    """Indices of the slices (labels uint8 (S, H, W)) that hold a class of at least ``min_pixels`` pixels."""
    return [s for s in range(len(labels)) if any((labels[s] == c).sum() >= min_pixels for c in class_ids)]


# -- the class tokens -----------------------------------------------------------------------------------
class ClassTokens(torch.nn.Module):
    """One learned sparse-prompt token per class id (0..max), appended after the box's two corner tokens.
    Zero at the start: training finds what each class needs."""

    def __init__(self, num_ids: int, dim: int):
        super().__init__()
        self.embed = torch.nn.Embedding(num_ids, dim)
        torch.nn.init.zeros_(self.embed.weight)

    def forward(self, sparse: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        """sparse (P, N, C) prompt tokens, class_ids int64 (P,) -> (P, N + 1, C)."""
        return torch.cat([sparse, self.embed(class_ids)[:, None, :]], dim=1)


# -- fitting ---------------------------------------------------------------------------------------------
def _step_loss(sam, tokens: ClassTokens | None, item: AdaptSlice, boxes: np.ndarray, classes: list[int],
               frame: dict, device: torch.device) -> tuple[torch.Tensor, dict]:
    """Loss of one slice's prompts: boxes float32 (P, 4) in the encoder's input frame, classes (P,)."""
    sparse, dense = sam.prompt_encoder(points=None, boxes=torch.from_numpy(boxes).to(device), masks=None)
    if tokens is not None:
        sparse = tokens(sparse, torch.tensor(classes, dtype=torch.int64, device=device))
    emb = torch.from_numpy(np.asarray(item.embedding, np.float32))[None].to(device)
    low, iou = sam.mask_decoder(image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
                                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                multimask_output=False)
    low = low[:, 0]  # (P, L, L)
    target = torch.stack([low_res_target(item.label == c, frame["input_size"], frame["image_size"], low.shape[-1])
                          for c in classes]).to(device)
    bce = F.binary_cross_entropy_with_logits(low, target)
    prob = torch.sigmoid(low)
    inter = (prob * target).sum((1, 2))
    soft_dice = 1 - (2 * inter + 1) / (prob.sum((1, 2)) + target.sum((1, 2)) + 1)
    with torch.no_grad():
        hard = (low > 0).float()
        true_iou = (hard * target).sum((1, 2)) / ((hard + target) > 0).float().sum((1, 2)).clamp_min(1)
    iou_mse = F.mse_loss(iou[:, 0], true_iou)
    return bce + soft_dice.mean() + iou_mse, {"bce": bce.item(), "dice": 1 - soft_dice.mean().item(),
                                              "iou_mse": iou_mse.item()}


def fit_decoder(generalist, items: list[AdaptSlice], class_ids: list[int], cfg: AdaptConfig, seed: int) -> dict:
    """Fine-tune ``generalist.sam``'s mask decoder (and prompt encoder with ``cfg.train_prompt_encoder``) in
    place on ``items``, with class tokens when ``cfg.class_tokens``; returns what :func:`save_adapted`
    stores: {"state": {name: tensor}, "class_ids", "stats"}. Each step draws ``cfg.slices_per_step`` slices
    (with replacement, from ``seed``), prompts every class present with a jittered label box and takes one
    Adam step on the mean loss. ``generalist``: a :class:`pipeline.generalist.sam.SamGeneralist`; its
    decode uses the result (:meth:`SamGeneralist.use_adapted`)."""
    if not items:
        raise CheckpointError("generalist.adapt: the labeled cases hold no slice with a foreground class of at "
                              f"least {cfg.min_pixels} pixels; nothing to fit the decoder on")
    sam, device = generalist.sam, generalist.device
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 2812])
    tokens = ClassTokens(max(class_ids) + 1, sam.prompt_encoder.embed_dim).to(device) if cfg.class_tokens else None
    params = list(sam.mask_decoder.parameters())
    if cfg.train_prompt_encoder:
        params += list(sam.prompt_encoder.parameters())
    groups = [{"params": params, "lr": cfg.lr}]
    if tokens is not None:
        groups.append({"params": list(tokens.parameters()), "lr": cfg.class_token_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sam.mask_decoder.train()
    start, history = time.perf_counter(), []
    with torch.enable_grad():
        for step in range(cfg.iterations):
            opt.zero_grad(set_to_none=True)
            logs = []
            for i in rng.integers(0, len(items), cfg.slices_per_step):
                item = items[i]
                shape = item.label.shape
                boxes = np.stack([jitter_box(label_box(item.label == c), shape, cfg, rng) for c in item.classes])
                frame = {"input_size": generalist.input_size(shape), "image_size": generalist.image_size}
                loss, parts = _step_loss(sam, tokens, item, generalist.boxes_in_input_frame(boxes, shape),
                                         list(item.classes), frame, device)
                (loss / cfg.slices_per_step).backward()
                logs.append(parts)
            opt.step()
            history.append({k: float(np.mean([p[k] for p in logs])) for k in logs[0]})
            if (step + 1) % max(1, cfg.iterations // 5) == 0:
                recent = {k: round(float(np.mean([h[k] for h in history[-20:]])), 4) for k in history[-1]}
                log.info("adapting the decoder: step %d/%d %s (%.0f s)", step + 1, cfg.iterations, recent,
                         time.perf_counter() - start)
    sam.mask_decoder.eval()
    state = {f"mask_decoder.{k}": v.detach().cpu().clone() for k, v in sam.mask_decoder.state_dict().items()}
    if cfg.train_prompt_encoder:
        state.update({f"prompt_encoder.{k}": v.detach().cpu().clone() for k, v in sam.prompt_encoder.state_dict().items()})
    if tokens is not None:
        state["class_tokens.embed.weight"] = tokens.embed.weight.detach().cpu().clone()
        generalist.class_tokens = tokens.eval()
    last = history[-min(20, len(history)):]
    stats = {"iterations": cfg.iterations, "slices": len(items),
             "prompts": int(sum(len(it.classes) for it in items)), "seconds": round(time.perf_counter() - start, 1),
             **{f"final_{k}": round(float(np.mean([h[k] for h in last])), 4) for k in last[0]}}
    return {"state": state, "class_ids": [int(c) for c in class_ids], "stats": stats}


# -- the run artifact --------------------------------------------------------------------------------------
def save_adapted(loc: Location | str | Path, fitted: dict, cfg: AdaptConfig, base_sha256: str) -> str:
    """Write the adapted decoder (weights-only readable: tensors and plain values) atomically; returns the
    file's SHA-256. ``base_sha256``: the generalist checkpoint it was fitted on."""
    loc = Location.of(loc)
    payload = {"format": FORMAT, "base_checkpoint_sha256": base_sha256, "class_ids": fitted["class_ids"],
               "settings": cfg.model_dump(mode="json"), "stats": fitted["stats"], "state": fitted["state"]}
    if loc.is_local:
        atomic_torch_save(payload, Path(loc.path))
    else:
        import io

        buf = io.BytesIO()
        torch.save(payload, buf)
        loc.write_bytes(buf.getvalue())
    return file_sha256(loc)


def read_adapted(loc: Location | str | Path, expect_sha256: str | None = None) -> dict:
    """The adapted decoder file, weights-only; a missing file, other bytes than ``expect_sha256`` or a file
    that is not one raise :class:`CheckpointError` naming it."""
    loc = Location.of(loc)
    if not loc.is_file():
        raise CheckpointError(f"the adapted decoder {loc} is missing")
    if expect_sha256 is not None:
        sha = file_sha256(loc)
        if sha != expect_sha256:
            raise CheckpointError(f"the adapted decoder {loc} has SHA-256 {sha[:16]}..., not the recorded "
                                  f"{expect_sha256[:16]}...: it was changed or damaged")
    local = loc.local_copy(".pt")
    try:
        payload = torch.load(local, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same problem
        raise CheckpointError(f"the adapted decoder {loc} cannot be read weights-only: {type(e).__name__}") from None
    finally:
        if local != loc.path:
            Path(local).unlink(missing_ok=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "state" not in payload:
        raise CheckpointError(f"{loc} is not an adapted decoder file (format {FORMAT})")
    return payload


# -- provenance in state.json ------------------------------------------------------------------------------
def decoder_sha(state: dict) -> str:
    """The SHA-256 of the run's adapted decoder that state.json records ("" when none: the checkpoint's own
    decoder, or not fitted yet). Manifest rows made with it carry it (``decoder_sha256``)."""
    return (state.get("adapted_decoder") or {}).get("sha256", "")


def forget_stale_decoder(folder, state: dict) -> bool:
    """On a resume: when the adapted decoder that state.json records is missing from the run folder
    (``folder``: a :class:`pipeline.run_folder.RunFolder`) or its bytes changed, forget it (``state`` saved):
    it is fitted again before the next relabel round, and what was made with the old one no longer matches
    (``pipeline.resume.check_chain`` redoes those rounds). Returns whether it was forgotten."""
    sha = decoder_sha(state)
    if not sha:
        return False
    loc = folder.adapted_decoder
    why = "is missing" if not loc.is_file() else None
    if why is None and file_sha256(loc) != sha:
        why = "has other bytes than state.json records"
    if why is None:
        return False
    log.warning("the adapted decoder %s %s (SHA-256 %s...): it is fitted again, and what was made with it is "
                "redone", loc, why, sha[:12])
    del state["adapted_decoder"]
    folder.save_state(state)
    return True
