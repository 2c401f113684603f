"""Calibrated fusion computed on slice profiles equals the paper's full-size formula, values and gradients."""

from __future__ import annotations

import pytest
import torch
from profile_cases import GEOMETRIES, randomise

from scripts.networks import CalibratedFusion, RoomLite


def fusion_reference(fusion: CalibratedFusion, unet: torch.Tensor, dino: torch.Tensor) -> torch.Tensor:
    """``F = F_U + GELU(GN(W [F_U; GN(F_D)]))`` on full volumes."""
    return unet + fusion.act(fusion.norm(fusion.mix(torch.cat([unet, fusion.dino_norm(dino)], dim=1))))


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
