"""How DINO feature volumes are injected into U-Net skip features."""

from __future__ import annotations

import torch
from monai.networks.layers.factories import Conv
from monai.networks.layers.utils import get_act_layer, get_norm_layer
from torch import nn


class CalibratedFusion(nn.Module):
    """Calibrated residual fusion: ``F = F_U + act(norm(W [F_U; norm_D(F_D)]))``.

    ``norm_D`` brings the DINO features to the scale of the U-Net's; ``W`` (1x1x1) learns how much of each
    to let through, so the skip starts from the U-Net's own features plus a learned correction.

    Args:
        spatial_dims: must be 3.
        channels: channels ``C`` of both inputs and the output.
        act: activation spec. Default ``"gelu"``.
        norm: normalisation spec, used for both norms. Default ``("group", {"num_groups": 8})``.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        act: str | tuple = "gelu",
        norm: str | tuple = ("group", {"num_groups": 8}),
    ) -> None:
        super().__init__()
        if spatial_dims != 3:
            raise ValueError(f"CalibratedFusion is a 3D block, got spatial_dims={spatial_dims}.")
        self.dino_norm = get_norm_layer(norm, spatial_dims=3, channels=channels)
        self.mix = Conv[Conv.CONV, 3](2 * channels, channels, kernel_size=1)
        self.norm = get_norm_layer(norm, spatial_dims=3, channels=channels)
        self.act = get_act_layer(act)

    def forward(self, unet: torch.Tensor, dino: torch.Tensor) -> torch.Tensor:
        """``unet``, ``dino``: (B, C, D, H, W) -> (B, C, D, H, W)."""
        # (B, C, ...) ; (B, C, ...) -> (B, 2C, ...)
        stacked = torch.cat([unet, self.dino_norm(dino)], dim=1)
        return unet + self.act(self.norm(self.mix(stacked)))


class AdditiveFusion(nn.Module):
    """The "without calibration" ablation: ``F = F_U + F_D``, no parameters."""

    def forward(self, unet: torch.Tensor, dino: torch.Tensor) -> torch.Tensor:
        """``unet``, ``dino``: (B, C, D, H, W) -> (B, C, D, H, W)."""
        return unet + dino
