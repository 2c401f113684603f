"""How DINO feature volumes are injected into U-Net skip features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv
from monai.networks.layers.utils import get_act_layer
from torch import nn

from .slice_profile import SliceProfile, group_norm

__all__ = ["AdditiveFusion", "CalibratedFusion"]


class CalibratedFusion(nn.Module):
    """Calibrated residual fusion: ``F = F_U + act(GN(W [F_U; GN_D(F_D)]))``.

    ``GN_D`` brings the DINO features to the scale of the U-Net's; ``W`` (1x1x1) learns how much of each
    to let through, so the skip starts from the U-Net's own features plus a learned correction. ``W`` is
    applied as ``W_U F_U + W_D GN_D(F_D)``, the second term on the DINO features' :class:`SliceProfile`,
    which is the same result without stacking a full-size copy of ``F_D``.

    Args:
        spatial_dims: must be 3.
        channels: channels ``C`` of both inputs and the output.
        act: activation spec. Default ``"gelu"``.
        num_groups: groups of both group norms. Default 8.
    """

    def __init__(
        self, spatial_dims: int, channels: int, act: str | tuple = "gelu", num_groups: int = 8
    ) -> None:
        super().__init__()
        if spatial_dims != 3:
            raise ValueError(f"CalibratedFusion is a 3D block, got spatial_dims={spatial_dims}.")
        self.dino_norm = nn.GroupNorm(num_groups, channels)
        self.mix = Conv[Conv.CONV, 3](2 * channels, channels, kernel_size=1)
        self.norm = nn.GroupNorm(num_groups, channels)
        self.act = get_act_layer(act)

    def forward(self, unet: torch.Tensor, dino: SliceProfile) -> torch.Tensor:
        """``unet``: (B, C, D, H, W); ``dino``: a (B, C, D, H, W) profile -> (B, C, D, H, W)."""
        channels = unet.shape[1]
        # W = [W_U | W_D] over the stacked channels [F_U; GN_D(F_D)]
        dino_term = F.conv3d(
            group_norm(dino, self.dino_norm).values, self.mix.weight[:, channels:], self.mix.bias
        )
        mixed = F.conv3d(unet, self.mix.weight[:, :channels]) + dino.with_values(dino_term).expand()
        return unet + self.act(self.norm(mixed))


class AdditiveFusion(nn.Module):
    """The "without calibration" ablation: ``F = F_U + F_D``, no parameters."""

    def forward(self, unet: torch.Tensor, dino: SliceProfile) -> torch.Tensor:
        """``unet``: (B, C, D, H, W); ``dino``: a (B, C, D, H, W) profile -> (B, C, D, H, W)."""
        return unet + dino.expand()
