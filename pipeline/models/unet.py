"""One U-Net for 2D slices and 3D patches (the dimension is a constructor argument, not a subclass).

Input ``(B, C_in, *spatial)``, output logits ``(B, num_classes, *spatial)``; every spatial size must be a
multiple of ``2**depth`` (``pipeline.models.inference`` pads). Instance norm, because batches are small
(4 + 4 slices or 2 + 2 patches on a CPU) and batch statistics would be noisy. Dropout sits at the
bottleneck so UA-MT's Monte Carlo passes have a source of randomness besides input noise.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import ModelConfig


def _ops(dims: int) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module], type[nn.Module]]:
    if dims == 2:
        return nn.Conv2d, nn.InstanceNorm2d, nn.MaxPool2d, nn.ConvTranspose2d
    if dims == 3:
        return nn.Conv3d, nn.InstanceNorm3d, nn.MaxPool3d, nn.ConvTranspose3d
    raise ValueError(f"dims must be 2 or 3, got {dims}")


class _DoubleConv(nn.Sequential):
    def __init__(self, dims: int, cin: int, cout: int, dropout: float = 0.0):
        conv, norm, _, _ = _ops(dims)
        drop = nn.Dropout2d if dims == 2 else nn.Dropout3d
        layers: list[nn.Module] = [
            conv(cin, cout, 3, padding=1), norm(cout, affine=True), nn.LeakyReLU(0.01, inplace=True),
        ]
        if dropout > 0:
            layers.append(drop(dropout))
        layers += [conv(cout, cout, 3, padding=1), norm(cout, affine=True), nn.LeakyReLU(0.01, inplace=True)]
        super().__init__(*layers)


class UNet(nn.Module):
    """U-Net with ``depth`` downsamplings and ``base_channels * 2**level`` channels per level."""

    def __init__(self, dims: int, in_channels: int, num_classes: int, base_channels: int = 16,
                 depth: int = 3, dropout: float = 0.1):
        super().__init__()
        _, _, pool, up = _ops(dims)
        self.dims, self.depth = dims, depth
        ch = [base_channels * 2**i for i in range(depth + 1)]
        self.encoders = nn.ModuleList([_DoubleConv(dims, in_channels, ch[0])])
        self.encoders.extend(
            _DoubleConv(dims, ch[i - 1], ch[i], dropout if i == depth else 0.0) for i in range(1, depth + 1)
        )
        self.pool = pool(2)
        self.ups = nn.ModuleList(up(ch[i], ch[i - 1], 2, stride=2) for i in range(depth, 0, -1))
        self.decoders = nn.ModuleList(_DoubleConv(dims, 2 * ch[i - 1], ch[i - 1]) for i in range(depth, 0, -1))
        self.head = (nn.Conv2d if dims == 2 else nn.Conv3d)(ch[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, enc in enumerate(self.encoders):
            x = enc(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.ups, self.decoders, strict=True):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


def model_args(cfg: ModelConfig, num_classes: int) -> dict:
    """The shape arguments of the specialist, stored in every checkpoint."""
    return {
        "dims": 2 if cfg.kind == "unet2d" else 3,
        "in_channels": 1,
        "num_classes": num_classes,
        "base_channels": cfg.base_channels,
        "depth": cfg.depth,
        "dropout": cfg.dropout,
    }


def build_model(args: dict) -> UNet:
    """Build from ``model_args(...)`` (or the copy of it in a checkpoint)."""
    return UNet(**args)
