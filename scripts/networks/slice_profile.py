"""Slice-wise feature volumes stored at the size of what they can vary by: slice, and in-plane border.

A DINO feature volume holds one vector per slice, broadcast over the slice's plane. Room-Lite's zero-padded
3x3x3 convolution then makes the first and last row and column of each plane differ from the interior, and
everything after it (1x1 convolutions, group norm, activations) is pointwise in space or reduces over it. So
along each in-plane axis a voxel is one of at most three kinds, the first row, an interior row or the last
row, and the whole volume is exactly described by a (B, C, n, 3, 3) tensor (slice axis last) plus how many
voxels each entry stands for. Computing on that instead of on (B, C, n, 64, 64) is what keeps the DINO path
cheap next to the U-Net.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["SliceProfile", "group_norm"]

BORDER_CLASSES = 3  # first row, interior rows, last row


def _classes(size: int) -> int:
    """Distinct in-plane positions along an axis of ``size`` voxels: 1, 2 or 3."""
    return min(size, BORDER_CLASSES)


@dataclasses.dataclass(frozen=True)
class SliceProfile:
    """A (B, C, *shape) volume whose values depend on the slice and on in-plane border position only.

    Attributes:
        values: (B, C, *compact), where ``compact`` equals ``shape`` on the slice axis and is ``min(size, 3)``
            on each in-plane axis: index 0 is the first row, 1 every interior row, 2 the last row.
        shape: the full spatial shape (3 sizes).
        slice_axis: spatial axis (0, 1 or 2) the slices are taken across.
    """

    values: torch.Tensor
    shape: tuple[int, int, int]
    slice_axis: int

    @classmethod
    def from_slices(cls, per_slice: torch.Tensor, shape: Sequence[int], slice_axis: int) -> SliceProfile:
        """The volume that repeats ``per_slice`` (B, C, n) over each slice's plane; ``shape[slice_axis] == n``."""
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or shape[slice_axis] != per_slice.shape[-1]:
            raise ValueError(
                f"Expected a 3D shape with {per_slice.shape[-1]} slices on axis {slice_axis}, got {shape}."
            )
        compact = [s if axis == slice_axis else _classes(s) for axis, s in enumerate(shape)]
        view = [*per_slice.shape[:2], 1, 1, 1]
        view[2 + slice_axis] = shape[slice_axis]
        return cls(per_slice.reshape(view).expand(-1, -1, *compact), shape, slice_axis)

    def with_values(self, values: torch.Tensor) -> SliceProfile:
        """The same geometry with new (B, C', *compact) values."""
        return dataclasses.replace(self, values=values)

    @property
    def in_plane_axes(self) -> tuple[int, int]:
        """The two spatial axes within a slice."""
        first, second = (axis for axis in range(3) if axis != self.slice_axis)
        return first, second

    def counts(self) -> torch.Tensor:
        """(1, 1, *compact) number of voxels of the full volume that each entry of ``values`` stands for."""
        counts = torch.ones((1, 1, *self.values.shape[2:]), dtype=torch.float32, device=self.values.device)
        for axis in self.in_plane_axes:
            size = self.shape[axis]
            if size > BORDER_CLASSES - 1:
                per_class = torch.tensor([1.0, size - 2.0, 1.0], device=counts.device)
                view = [1, 1, 1, 1, 1]
                view[2 + axis] = BORDER_CLASSES
                counts = counts * per_class.reshape(view)
        return counts

    def expand(self) -> torch.Tensor:
        """The full (B, C, *shape) volume."""
        full = self.values
        for axis in self.in_plane_axes:
            size = self.shape[axis]
            index = torch.arange(size, device=full.device)
            if size > BORDER_CLASSES - 1:
                index = index.clamp(max=1)
                index[-1] = 2
            full = full.index_select(2 + axis, index)
        return full


def group_norm(profile: SliceProfile, norm: nn.GroupNorm) -> SliceProfile:
    """``norm`` applied to the full volume, computed on the profile: statistics weighted by voxel counts.

    Computed in float32 (as autocast runs group norm), so large counts cannot overflow half precision.
    """
    values = profile.values.float()
    batch, channels = values.shape[:2]
    groups = norm.num_groups
    # (B, C, *compact) -> (B, G, C/G, *compact); counts (1, 1, *compact) -> (1, 1, 1, *compact)
    grouped = values.reshape(batch, groups, channels // groups, *values.shape[2:])
    counts = profile.counts().unsqueeze(1)
    dims = tuple(range(2, grouped.ndim))
    total = math.prod(profile.shape) * (channels // groups)  # voxels per group of the full volume
    mean = (grouped * counts).sum(dims, keepdim=True) / total
    centred = grouped - mean
    variance = (centred.square() * counts).sum(dims, keepdim=True) / total
    normed = (centred * torch.rsqrt(variance + norm.eps)).reshape(values.shape)
    if norm.affine:
        affine = (1, channels, 1, 1, 1)
        normed = normed * norm.weight.reshape(affine) + norm.bias.reshape(affine)
    return profile.with_values(normed)
