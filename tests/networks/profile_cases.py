"""Cases shared by the slice-profile tests: geometries, the full-volume broadcast, random parameters."""

from __future__ import annotations

import torch

# (spatial shape, slice axis): in-plane sizes of 1, 2, 3 and more, on every slice axis
GEOMETRIES = [((5, 7, 6), 2), ((8, 2, 4), 0), ((1, 9, 3), 1), ((3, 4, 16), 2)]


def broadcast(per_slice: torch.Tensor, shape, slice_axis: int) -> torch.Tensor:
    """(B, C, n) -> the full (B, C, *shape) volume repeating each slice's vector over its plane."""
    view = [*per_slice.shape[:2], 1, 1, 1]
    view[2 + slice_axis] = shape[slice_axis]
    return per_slice.reshape(view).expand(-1, -1, *shape)


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial parameters everywhere (the depth bias and norm affines start at 0 / 1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
