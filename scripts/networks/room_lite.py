"""Room-Lite: a light depth-coherence block for slice-wise features stacked into a volume."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv
from monai.networks.layers.utils import get_act_layer, get_norm_layer
from torch import nn


class RoomLite(nn.Module):
    """``Y = X + act(norm(Conv1x1(DWConv3x3x3(X + B(z)))))`` with a learnable depth bias ``B(z)``.

    Slice-wise features say nothing about where a slice sits along the slice axis or how neighbouring
    slices relate; the depth bias and the depthwise 3x3x3 convolution add exactly that, cheaply.

    Args:
        spatial_dims: must be 3.
        channels: feature channels ``C``.
        depth: number of slices the depth bias is learned for; inputs with another depth use the bias
            linearly interpolated to their depth.
        slice_axis: spatial axis (0, 1 or 2) along which ``z`` runs. Default 2.
        act: activation spec. Default ``"gelu"``.
        norm: normalisation spec. Default ``("group", {"num_groups": 8})``.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        depth: int,
        slice_axis: int = 2,
        act: str | tuple = "gelu",
        norm: str | tuple = ("group", {"num_groups": 8}),
    ) -> None:
        super().__init__()
        if spatial_dims != 3:
            raise ValueError(f"RoomLite is a 3D block, got spatial_dims={spatial_dims}.")
        if depth < 1:
            raise ValueError(f"depth must be positive, got {depth}.")
        self.slice_axis = slice_axis
        self.depth_bias = nn.Parameter(torch.zeros(1, channels, depth))  # B(z): (1, C, depth)
        self.depthwise = Conv[Conv.CONV, 3](channels, channels, kernel_size=3, padding=1, groups=channels)
        self.pointwise = Conv[Conv.CONV, 3](channels, channels, kernel_size=1)
        self.norm = get_norm_layer(norm, spatial_dims=3, channels=channels)
        self.act = get_act_layer(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, C, D, H, W) -> (B, C, D, H, W)."""
        depth = x.shape[2 + self.slice_axis]
        bias = self.depth_bias
        if bias.shape[-1] != depth:
            bias = F.interpolate(bias, size=depth, mode="linear", align_corners=True)
        # (1, C, depth) -> (1, C, depth, 1, 1) with depth on the slice axis
        shape = [1, bias.shape[1], 1, 1, 1]
        shape[2 + self.slice_axis] = depth
        return x + self.act(self.norm(self.pointwise(self.depthwise(x + bias.reshape(shape)))))
