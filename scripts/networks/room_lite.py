"""Room-Lite: a light depth-coherence block for slice-wise features stacked into a volume."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv
from monai.networks.layers.utils import get_act_layer
from torch import nn

from .slice_profile import SliceProfile, group_norm

__all__ = ["RoomLite"]


class RoomLite(nn.Module):
    """``Y = X + act(GN(Conv1x1(DWConv3x3x3(X + B(z)))))`` with a learnable depth bias ``B(z)``.

    Slice-wise features say nothing about where a slice sits along the slice axis or how neighbouring
    slices relate; the depth bias and the depthwise 3x3x3 convolution add exactly that, cheaply. ``X`` is
    the per-slice features broadcast over each slice's plane, so the block is computed exactly on a
    :class:`SliceProfile` (the zero padding of the convolution is what distinguishes the in-plane borders).

    Args:
        spatial_dims: must be 3.
        channels: feature channels ``C``.
        depth: number of slices the depth bias is learned for; inputs with another depth use the bias
            linearly interpolated to their depth.
        slice_axis: spatial axis (0, 1 or 2) along which ``z`` runs. Default 2.
        act: activation spec. Default ``"gelu"``.
        num_groups: groups of the group norm ``GN``. Default 8.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        depth: int,
        slice_axis: int = 2,
        act: str | tuple = "gelu",
        num_groups: int = 8,
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
        self.norm = nn.GroupNorm(num_groups, channels)
        self.act = get_act_layer(act)

    def forward(self, x: torch.Tensor, shape: Sequence[int]) -> SliceProfile:
        """Room-Lite of the volume that repeats ``x`` over each slice's plane.

        Args:
            x: (B, C, n) per-slice features.
            shape: spatial shape of the volume, with ``n`` slices on ``slice_axis``.

        Returns:
            the (B, C, *shape) result as a :class:`SliceProfile`.
        """
        bias = self.depth_bias
        if bias.shape[-1] != x.shape[-1]:
            bias = F.interpolate(bias, size=x.shape[-1], mode="linear", align_corners=True)
        shifted = SliceProfile.from_slices(x + bias, shape, self.slice_axis)
        mixed = shifted.with_values(self.pointwise(self.depthwise(shifted.values)))
        update = self.act(group_norm(mixed, self.norm).values)
        return shifted.with_values(SliceProfile.from_slices(x, shape, self.slice_axis).values + update)
