"""The DINO path: slice embeddings -> projected, stacked feature volumes at the U-Net's skip scales."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .room_lite import RoomLite
from .slice_encoder import SliceEncoder
from .slice_profile import SliceProfile

__all__ = ["DinoPath"]


class DinoPath(nn.Module):
    """Turn per-slice embeddings into one feature volume per skip scale.

    At scale ``s`` (spatial size divided by ``2**s``) the slice embeddings are average-pooled in groups of
    ``2**s`` consecutive slices, projected to ``channels[s]`` by a 1x1 (linear) projection, broadcast over
    the two in-plane axes and, optionally, passed through :class:`RoomLite`. The volumes are returned as
    :class:`SliceProfile` s, which hold them exactly at (B, C, n_s, 3, 3) instead of full size.

    Args:
        encoder: the frozen :class:`SliceEncoder` (its ``hidden_size`` and ``slice_axis`` are used).
        channels: channels per skip scale, finest first, e.g. ``(24, 48, 96)``.
        depth: slices of a training patch at full resolution (Room-Lite's depth bias length at scale 0).
        use_room_lite: apply Room-Lite at every scale. Default True.
        act: activation spec of Room-Lite. Default ``"gelu"``.
        num_groups: groups of Room-Lite's group norm. Default 8.
    """

    def __init__(
        self,
        encoder: SliceEncoder,
        channels: Sequence[int],
        depth: int,
        use_room_lite: bool = True,
        act: str | tuple = "gelu",
        num_groups: int = 8,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.slice_axis = encoder.slice_axis
        self.projections = nn.ModuleList(nn.Linear(encoder.hidden_size, c) for c in channels)
        self.coherence = (
            nn.ModuleList(
                RoomLite(3, c, max(1, depth // 2**s), encoder.slice_axis, act, num_groups)
                for s, c in enumerate(channels)
            )
            if use_room_lite
            else None
        )

    def forward(
        self,
        x: torch.Tensor,
        skip_shapes: Sequence[Sequence[int]],
        slice_embeddings: torch.Tensor | None = None,
    ) -> list[SliceProfile]:
        """Feature volumes for the skips.

        Args:
            x: (B, 1, D, H, W) input patch; only read when ``slice_embeddings`` is None.
            skip_shapes: spatial shape of each skip, finest first.
            slice_embeddings: (B, n_slices, hidden) embeddings computed earlier by ``self.encoder``.

        Returns:
            one (B, channels[s], *skip_shapes[s]) volume per scale, as a :class:`SliceProfile`.
        """
        if slice_embeddings is None:
            slice_embeddings = self.encoder(x)
        volumes = []
        coherences = self.coherence if self.coherence is not None else [None] * len(self.projections)
        for projection, coherence, shape in zip(self.projections, coherences, skip_shapes, strict=True):
            n_slices = shape[self.slice_axis]
            # (B, n, hidden) -> (B, hidden, n) -> (B, hidden, n_s): mean over groups of consecutive slices
            pooled = F.adaptive_avg_pool1d(slice_embeddings.transpose(1, 2), n_slices)
            # (B, hidden, n_s) -> (B, n_s, C) -> (B, C, n_s)
            projected = projection(pooled.transpose(1, 2)).transpose(1, 2)
            if coherence is None:
                volumes.append(SliceProfile.from_slices(projected, shape, self.slice_axis))
            else:
                volumes.append(coherence(projected, shape))
        return volumes
