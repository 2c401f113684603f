"""Room-Lite computed on slice profiles equals the paper's full-size formula, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from profile_cases import GEOMETRIES, broadcast, randomise

from scripts.networks import RoomLite


def room_lite_reference(block: RoomLite, x: torch.Tensor) -> torch.Tensor:
    """``Y = X + GELU(GN(Conv1x1(DWConv3x3x3(X + B(z)))))`` on the full volume ``x``."""
    depth = x.shape[2 + block.slice_axis]
    bias = F.interpolate(block.depth_bias, size=depth, mode="linear", align_corners=True)
    view = [1, bias.shape[1], 1, 1, 1]
    view[2 + block.slice_axis] = depth
    return x + block.act(block.norm(block.pointwise(block.depthwise(x + bias.reshape(view)))))


@pytest.mark.parametrize(("shape", "slice_axis"), GEOMETRIES)
def test_room_lite_on_profiles_equals_full_volume_formula_and_gradients(shape, slice_axis):
    block = RoomLite(3, 8, depth=4, slice_axis=slice_axis, num_groups=4)
    randomise(block, seed=0)
    per_slice = torch.randn(2, 8, shape[slice_axis], requires_grad=True)

    expected = room_lite_reference(block, broadcast(per_slice, shape, slice_axis))
    weights = torch.randn(expected.shape)
    (expected * weights).sum().backward()
    expected_grads = [p.grad.clone() for p in (per_slice, *block.parameters())]
    block.zero_grad()
    per_slice.grad = None

    result = block(per_slice, shape).expand()
    (result * weights).sum().backward()
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-5)
    for got, want in zip(
        (per_slice.grad, *(p.grad for p in block.parameters())), expected_grads, strict=True
    ):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
