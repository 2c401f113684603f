"""Room-Lite and calibrated fusion computed on slice profiles equal the paper's full-size formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scripts.networks import CalibratedFusion, RoomLite
from scripts.networks.slice_profile import SliceProfile

# (spatial shape, slice axis): in-plane sizes of 1, 2, 3 and more, on every slice axis
GEOMETRIES = [((5, 7, 6), 2), ((8, 2, 4), 0), ((1, 9, 3), 1), ((3, 4, 16), 2)]


def broadcast(per_slice: torch.Tensor, shape, slice_axis: int) -> torch.Tensor:
    """(B, C, n) -> the full (B, C, *shape) volume repeating each slice's vector over its plane."""
    view = [*per_slice.shape[:2], 1, 1, 1]
    view[2 + slice_axis] = shape[slice_axis]
    return per_slice.reshape(view).expand(-1, -1, *shape)


def room_lite_reference(block: RoomLite, x: torch.Tensor) -> torch.Tensor:
    """``Y = X + GELU(GN(Conv1x1(DWConv3x3x3(X + B(z)))))`` on the full volume ``x``."""
    depth = x.shape[2 + block.slice_axis]
    bias = F.interpolate(block.depth_bias, size=depth, mode="linear", align_corners=True)
    view = [1, bias.shape[1], 1, 1, 1]
    view[2 + block.slice_axis] = depth
    return x + block.act(block.norm(block.pointwise(block.depthwise(x + bias.reshape(view)))))


def fusion_reference(fusion: CalibratedFusion, unet: torch.Tensor, dino: torch.Tensor) -> torch.Tensor:
    """``F = F_U + GELU(GN(W [F_U; GN(F_D)]))`` on full volumes."""
    return unet + fusion.act(fusion.norm(fusion.mix(torch.cat([unet, fusion.dino_norm(dino)], dim=1))))


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial parameters everywhere (the depth bias and norm affines start at 0 / 1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


@pytest.mark.parametrize(("shape", "slice_axis"), GEOMETRIES)
def test_profile_counts_and_expansion(shape, slice_axis):
    per_slice = torch.randn(2, 3, shape[slice_axis])
    profile = SliceProfile.from_slices(per_slice, shape, slice_axis)
    assert profile.counts().sum().item() == shape[0] * shape[1] * shape[2]
    assert torch.equal(profile.expand(), broadcast(per_slice, shape, slice_axis))
    assert max(profile.values.shape[2:]) <= max(3, shape[slice_axis])


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


@pytest.mark.parametrize(("shape", "slice_axis"), GEOMETRIES)
def test_calibrated_fusion_on_profiles_equals_full_volume_formula_and_gradients(shape, slice_axis):
    fusion = CalibratedFusion(3, 8, num_groups=2)
    block = RoomLite(3, 8, depth=shape[slice_axis], slice_axis=slice_axis, num_groups=4)
    randomise(fusion, seed=1)
    randomise(block, seed=2)
    unet = torch.randn(2, 8, *shape, requires_grad=True)
    per_slice = torch.randn(2, 8, shape[slice_axis])
    dino = block(per_slice, shape)  # a profile that varies at the in-plane borders

    expected = fusion_reference(fusion, unet, dino.expand())
    weights = torch.randn(expected.shape)
    (expected * weights).sum().backward()
    expected_grads = [p.grad.clone() for p in (unet, *fusion.parameters(), *block.parameters())]
    for p in (unet, *fusion.parameters(), *block.parameters()):
        p.grad = None

    dino = block(per_slice, shape)
    result = fusion(unet, dino)
    (result * weights).sum().backward()
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-5)
    got_grads = [p.grad for p in (unet, *fusion.parameters(), *block.parameters())]
    for got, want in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_profile_rejects_a_shape_with_another_number_of_slices():
    with pytest.raises(ValueError, match="5 slices on axis 2"):
        SliceProfile.from_slices(torch.zeros(1, 2, 5), (4, 4, 6), 2)
