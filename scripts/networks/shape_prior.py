"""A fixed shape prior for the U-Net's input: multi-scale Hessian blobness of the bright lumen.

On one axial slice a vessel and an aneurysm look alike; in 3D a vessel is a tube (one principal curvature
near zero, along its axis) and a saccular aneurysm is a blob (all three strongly negative). The network
learns this from the image alone only when it has seen many shapes: on 16 training phantoms it learnt
"wide = aneurysm" instead (docs/recipe.md). Hessian blob filters are the classic hand-made measure of this
difference in aneurysm detection (Arimura et al., Acad. Radiol. 2004; Frangi et al., MICCAI 1998, for the
eigenvalue analysis). This module computes one such measure per input channel, without parameters, and the
U-Net reads it as an extra channel beside the image.

Blobness describes the inside of a sac; at its wall it fades (the wall of a sac and of its parent artery look
alike to a Hessian at the sac's own scale). :class:`SurfaceConvexity` describes the wall: the smaller principal
curvature of the lumen's isosurface, near 0 on a tube (straight along its axis), about ``1 / radius`` on the
dome of a sac, negative in the crotch of a bifurcation or a neck. Shape index and curvedness of isosurfaces are
the classic cue of polyp and aneurysm detection in CT (Yoshida and Naeppi, IEEE TMI 2001).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from scripts.switches import check_switch

__all__ = ["CONVEXITY_SCALE", "HessianBlobness", "SurfaceConvexity", "symmetric_eigenvalue_range"]

# Scale-normalised curvature (sigma^2 * lambda, lumen at 1) at which a blob counts fully; weaker ones fade out.
STRENGTH = 0.15
# Gaussian kernels are cut at this many sigmas, as scipy.ndimage does.
TRUNCATE = 4.0
# Scale-normalised curvature (sigma * kappa) mapped to +-1; the dome of a sac of radius r gives about sigma / r.
CONVEXITY_SCALE = 0.3
# Scale-normalised gradient (sigma * |grad|, lumen at 1; a sharp wall gives about 0.4) at which a surface counts
# fully; flatter intensity (background noise, the inside of the lumen) fades out.
EDGE_STRENGTH = 0.1


@functools.lru_cache(maxsize=64)
def _derivative_matrices(length: int, sigma: float) -> torch.Tensor:
    """(3, length, length) float64: Gaussian smoothing of ``sigma`` voxels along one axis, and its first and
    second derivatives scaled by ``sigma`` and ``sigma**2``, as matrices acting on that axis, with the borders
    extended by replication."""
    radius = int(math.ceil(TRUNCATE * sigma))
    d = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (d / sigma) ** 2)
    g = g / g.sum()
    taps = torch.stack([g, -d / sigma * g, (d**2 / sigma**2 - 1) * g])  # (3, 2r+1)
    rows = torch.arange(length).repeat_interleave(d.numel())
    cols = (rows - d.long().repeat(length)).clamp(0, length - 1)  # out[i] = sum_d g(d) x[i - d]
    matrices = torch.zeros(3, length, length, dtype=torch.float64)
    for order in range(3):
        matrices[order].index_put_((rows, cols), taps[order].repeat(length), accumulate=True)
    return matrices


_GRADIENT_ORDERS = ((1, 0, 0), (0, 1, 0), (0, 0, 1))
_HESSIAN_ORDERS = ((2, 0, 0), (0, 2, 0), (0, 0, 2), (1, 1, 0), (1, 0, 1), (0, 1, 1))


def _gaussian_derivatives(
    image: torch.Tensor, sigma: float, orders: Sequence[tuple[int, int, int]]
) -> list[torch.Tensor]:
    """Scale-normalised Gaussian derivatives of (N, D, H, W) ``image``, one (N, D, H, W) tensor per (d, h, w)
    order triple of ``orders``.

    Separable: each axis is filtered by a small dense matrix product, much faster on a CPU than a convolution
    with a one-voxel-wide kernel."""
    d, h, w = (_derivative_matrices(n, sigma).to(image) for n in image.shape[1:])
    along_w = {ow: torch.einsum("ndhw,vw->ndhv", image, w[ow]) for _, _, ow in orders}
    along_hw = {(oh, ow): torch.einsum("ndhw,uh->nduw", along_w[ow], h[oh]) for _, oh, ow in orders}
    return [torch.einsum("ndhw,ud->nuhw", along_hw[oh, ow], d[od]) for od, oh, ow in orders]


def symmetric_eigenvalue_range(
    xx: torch.Tensor, yy: torch.Tensor, zz: torch.Tensor, xy: torch.Tensor, xz: torch.Tensor, yz: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest and largest eigenvalues of symmetric 3x3 matrices given by their six entries.

    Closed form (the trigonometric solution of the characteristic cubic), element-wise over any shape;
    float32 is accurate to about 1e-5 of the largest entry.

    Returns:
        (smallest, largest), each of the entries' shape.
    """
    q = (xx + yy + zz) / 3
    off = xy**2 + xz**2 + yz**2
    p = torch.sqrt(((xx - q) ** 2 + (yy - q) ** 2 + (zz - q) ** 2 + 2 * off) / 6).clamp_min(1e-12)
    a, b, c = (xx - q) / p, (yy - q) / p, (zz - q) / p
    u, v, w = xy / p, xz / p, yz / p
    half_det = (a * (b * c - w * w) - u * (u * c - w * v) + v * (u * w - b * v)) / 2
    phi = torch.acos(half_det.clamp(-1.0, 1.0)) / 3
    largest = q + 2 * p * torch.cos(phi)
    smallest = q + 2 * p * torch.cos(phi + 2 * math.pi / 3)
    return smallest, largest


class HessianBlobness(nn.Module):
    """Multi-scale blobness of bright structures, one channel per input channel, in [0, 1].

    At each scale ``s`` (voxels) the Hessian of the Gaussian-smoothed image, scale-normalised by ``s**2``, has
    eigenvalues ``l_min <= ... <= l_max``. Where all three are negative (a bright blob) the measure is
    ``(l_max / l_min) * min(-l_min / STRENGTH, 1)``: 1 in the centre of a bright ball, near 0 on a tube (whose
    axis has ``l_max`` near 0), 0 on background, edges and dark structures. The output is its maximum over
    the scales. The image borders are extended by replication, so a vessel that leaves the window stays a
    tube. It runs in float32 (also under autocast) and without gradients; it has no parameters, and records
    its scales (and ``per_scale``) in the state dict, so a model cannot be loaded with other scales than it
    was trained with.

    Args:
        sigmas: Gaussian scales in voxels of the network's grid (0.4 mm in this bundle: ``(1.5, 2, 3, 4.5,
            6.5)`` spans 0.6-2.6 mm, blobs of about 2-9 mm).
        per_scale: one channel per scale instead of their maximum, so the reader also knows at which scale a
            structure is a blob (a sac is a blob at its own width, its parent artery at none). Default False.
    """

    def __init__(self, sigmas: Sequence[float], per_scale: bool = False) -> None:
        super().__init__()
        if isinstance(sigmas, (str, bytes, bool)) or not isinstance(sigmas, Sequence):
            raise ValueError(
                "shape_prior_sigmas must be None (no shape prior) or a list of Gaussian scales in voxels such as "
                f"[1.5, 2, 3, 4.5, 6.5], got {sigmas!r}."
            )
        sigmas = tuple(float(s) for s in sigmas)
        if not sigmas or any(not math.isfinite(s) or s <= 0 for s in sigmas):
            raise ValueError(f"shape_prior_sigmas must be positive voxel scales, got {sigmas!r}.")
        check_switch("shape_prior_per_scale", per_scale)
        self.sigmas = sigmas
        self.per_scale = per_scale

    @property
    def channels_per_input(self) -> int:
        """Output channels per input channel: one per scale with ``per_scale``, else one."""
        return len(self.sigmas) if self.per_scale else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) image, lumen near 1 -> (B, C * channels_per_input, D, H, W) blobness in [0, 1], ``x``'s
        dtype; with ``per_scale`` the scales of input channel ``c`` are output channels ``c * S`` to ``c * S + S - 1``
        in the order of ``sigmas``."""
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            b, c = x.shape[:2]
            image = x.detach().float().reshape(b * c, *x.shape[2:])
            scales = []
            for sigma in self.sigmas:
                smallest, largest = symmetric_eigenvalue_range(*self._hessian(image, sigma))
                ratio = torch.where(largest < 0, largest / smallest.clamp_max(-1e-12), 0.0)
                scales.append(ratio * (-smallest / STRENGTH).clamp(0.0, 1.0))
            out = torch.stack(scales, dim=1) if self.per_scale else functools.reduce(torch.maximum, scales)
        return out.reshape(b, c * self.channels_per_input, *x.shape[2:]).to(x.dtype)

    def _hessian(self, image: torch.Tensor, sigma: float) -> list[torch.Tensor]:
        """The six scale-normalised second derivatives dd, hh, ww, dh, dw, hw of (N, D, H, W) ``image``."""
        return _gaussian_derivatives(image, sigma, _HESSIAN_ORDERS)

    def get_extra_state(self) -> dict[str, Any]:
        return {"sigmas": list(self.sigmas), "per_scale": self.per_scale}

    def set_extra_state(self, state: Any) -> None:
        recorded = tuple(float(s) for s in state.get("sigmas", ())) if isinstance(state, dict) else None
        if recorded != self.sigmas:
            raise ValueError(
                f"the checkpoint's shape prior was trained with sigmas {recorded}, this network has "
                f"{self.sigmas}: set shape_prior_sigmas to the checkpoint's."
            )
        per_scale = state.get("per_scale", False)  # 0.9.0 and 0.9.1 recorded only the scales: the maximum
        if per_scale != self.per_scale:
            raise ValueError(
                f"the checkpoint's shape prior was trained with per_scale {per_scale}, this network has "
                f"{self.per_scale}: set shape_prior_per_scale to {per_scale}."
            )


class SurfaceConvexity(nn.Module):
    """Convexity of the bright lumen's surface, one channel per input channel, in [-1, 1].

    At scale ``sigma`` (voxels) the isosurface through each voxel has two principal curvatures, the eigenvalues
    of the Hessian projected onto the surface's tangent plane, divided by the gradient's length (positive where
    the bright side is convex). The output is the smaller of the two, scale-normalised (``sigma * kappa``) and
    mapped to +-1 at :data:`CONVEXITY_SCALE`, times the edge weight ``min(sigma * |grad| / EDGE_STRENGTH, 1)``:
    about 0 on the wall of a tube of any width and away from edges, positive on the dome of a sac (more for a
    small one), negative in the crotch of a bifurcation and at a sac's neck. Like :class:`HessianBlobness` it
    runs in float32 without gradients, has no parameters and records its scale in the state dict.

    Args:
        sigma: Gaussian scale in voxels of the network's grid (1.5: 0.6 mm in this bundle).
    """

    channels_per_input = 1

    def __init__(self, sigma: float) -> None:
        super().__init__()
        if (
            isinstance(sigma, bool)
            or not isinstance(sigma, (int, float))
            or not math.isfinite(sigma)
            or sigma <= 0
        ):
            raise ValueError(
                "shape_prior_convexity_sigma must be None (no convexity channel) or a positive Gaussian scale in "
                f"voxels such as 1.5, got {sigma!r}."
            )
        self.sigma = float(sigma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) image, lumen near 1 -> (B, C, D, H, W) convexity in [-1, 1], ``x``'s dtype."""
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            b, c = x.shape[:2]
            image = x.detach().float().reshape(b * c, *x.shape[2:])
            # one call: the first and second derivatives share their filtering along w and h
            *g, dd, hh, ww, dh, dw, hw = _gaussian_derivatives(
                image, self.sigma, _GRADIENT_ORDERS + _HESSIAN_ORDERS
            )
            length = torch.sqrt(g[0] ** 2 + g[1] ** 2 + g[2] ** 2).clamp_min(1e-12)
            n = [gi / length for gi in g]
            hessian = ((dd, dh, dw), (dh, hh, hw), (dw, hw, ww))
            hn = [hessian[i][0] * n[0] + hessian[i][1] * n[1] + hessian[i][2] * n[2] for i in range(3)]
            normal = n[0] * hn[0] + n[1] * hn[1] + n[2] * hn[2]

            def tangential(i: int, j: int) -> torch.Tensor:  # (P H P)_ij, P = I - n n^T
                return hessian[i][j] - n[i] * hn[j] - hn[i] * n[j] + normal * n[i] * n[j]

            m = {(i, j): tangential(i, j) for i in range(3) for j in range(i, 3)}
            trace = m[0, 0] + m[1, 1] + m[2, 2]
            minors = (
                m[0, 0] * m[1, 1]
                - m[0, 1] ** 2
                + m[0, 0] * m[2, 2]
                - m[0, 2] ** 2
                + m[1, 1] * m[2, 2]
                - m[1, 2] ** 2
            )
            # P H P has eigenvalue 0 along n; the other two are the roots of l^2 - trace l + minors. The curvature
            # of the bright side is -l / |grad|, so the smaller curvature comes from the larger root.
            larger = (trace + torch.sqrt((trace**2 - 4 * minors).clamp_min(0.0))) / 2
            kappa = -larger / length  # scale-normalised derivatives: sigma * kappa
            convexity = (kappa / CONVEXITY_SCALE).clamp(-1.0, 1.0) * (length / EDGE_STRENGTH).clamp(0.0, 1.0)
        return convexity.reshape(x.shape).to(x.dtype)

    def get_extra_state(self) -> dict[str, Any]:
        return {"sigma": self.sigma}

    def set_extra_state(self, state: Any) -> None:
        recorded = float(state["sigma"]) if isinstance(state, dict) and "sigma" in state else None
        if recorded != self.sigma:
            raise ValueError(
                f"the checkpoint's convexity channel was trained with sigma {recorded}, this network has "
                f"{self.sigma}: set shape_prior_convexity_sigma to the checkpoint's."
            )
