"""Signed-distance rasterisation of tubes and domes, each primitive only inside its own bounding box.

Geometry lives in millimetres in the volume's index frame: the centre of voxel ``(i, j, k)`` sits at
``(i * sx, j * sy, k * sz)``. A :class:`DistanceField` keeps, per voxel, the smallest signed distance (mm,
negative inside) to any primitive drawn so far and the relative opacification of the primitive that owns
the voxel. Voxels further than ``margin`` from every primitive keep ``far`` and are never visited.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["DistanceField", "occupancy"]


class DistanceField:
    """Union of primitives as a signed-distance volume.

    Args:
        shape: volume shape (X, Y, Z).
        spacing: voxel spacing in mm along (X, Y, Z).
        margin: how far (mm) outside a primitive distances are still computed; at least the width of the
            partial-volume ramp so that the ramp is never cut. Default 1.0.
    """

    def __init__(self, shape: Sequence[int], spacing: Sequence[float], margin: float = 1.0) -> None:
        if len(shape) != 3 or len(spacing) != 3:
            raise ValueError(f"shape and spacing must have 3 entries, got {shape} and {spacing}.")
        if margin <= 0:
            raise ValueError(f"margin must be > 0 mm, got {margin}.")
        self.shape = tuple(int(n) for n in shape)
        self.spacing = np.asarray(spacing, dtype=np.float64)
        self.margin = float(margin)
        self.far = np.float32(margin + 1.0)
        # (X, Y, Z) signed distance in mm and the opacification of the owning primitive
        self.distance = np.full(self.shape, self.far, dtype=np.float32)
        self.value = np.zeros(self.shape, dtype=np.float32)
        # voxel-centre coordinates in mm per axis
        self._axes = [
            np.arange(n, dtype=np.float32) * np.float32(s)
            for n, s in zip(self.shape, self.spacing, strict=True)
        ]

    def _box(self, low_mm: np.ndarray, high_mm: np.ndarray) -> tuple[slice, slice, slice] | None:
        low = np.maximum(np.ceil((low_mm - self.margin) / self.spacing), 0).astype(int)
        high = np.minimum(np.floor((high_mm + self.margin) / self.spacing) + 1, self.shape).astype(int)
        if np.any(high <= low):
            return None
        return tuple(slice(lo, hi) for lo, hi in zip(low, high, strict=True))

    def _local(self, box: tuple[slice, slice, slice], origin: np.ndarray):
        """Coordinates relative to ``origin`` inside ``box``, broadcastable: (nx,1,1), (1,ny,1), (1,1,nz)."""
        x = self._axes[0][box[0]] - np.float32(origin[0])
        y = self._axes[1][box[1]] - np.float32(origin[1])
        z = self._axes[2][box[2]] - np.float32(origin[2])
        return x[:, None, None], y[None, :, None], z[None, None, :]

    def _merge(self, box: tuple[slice, slice, slice], dist: np.ndarray, value: float | np.ndarray) -> None:
        region = self.distance[box]
        closer = dist < region
        np.minimum(region, dist, out=region)
        np.copyto(self.value[box], np.asarray(value, dtype=np.float32), where=closer)

    def add_tube(self, points: np.ndarray, radii: np.ndarray, value: float = 1.0) -> None:
        """Draw a polyline tube as a chain of tapered capsules.

        Args:
            points: (N, 3) centreline in mm, N >= 2.
            radii: (N,) lumen radius in mm at each point.
            value: relative opacification of this tube's lumen.
        """
        points = np.asarray(points, dtype=np.float64)
        radii = np.asarray(radii, dtype=np.float64)
        if points.ndim != 2 or points.shape[1] != 3 or points.shape[0] < 2 or radii.shape != points.shape[:1]:
            raise ValueError(
                f"add_tube needs points (N>=2, 3) and radii (N,), got {points.shape}, {radii.shape}."
            )
        for a, b, ra, rb in zip(points[:-1], points[1:], radii[:-1], radii[1:], strict=True):
            self.add_capsule(a, b, ra, rb, value)

    def add_capsule(self, a: np.ndarray, b: np.ndarray, ra: float, rb: float, value: float = 1.0) -> None:
        """Draw a tapered capsule from ``a`` (radius ``ra``) to ``b`` (radius ``rb``); coordinates in mm."""
        rmax = max(ra, rb)
        box = self._box(np.minimum(a, b) - rmax, np.maximum(a, b) + rmax)
        if box is None:
            return
        ab = (np.asarray(b) - np.asarray(a)).astype(np.float32)
        len2 = float(ab @ ab)
        x, y, z = self._local(box, a)
        # projection of each voxel onto the axis: dot in mm^2, t in [0, 1] along the segment
        dot = x * ab[0] + y * ab[1] + z * ab[2]
        t = np.clip(dot * np.float32(1.0 / max(len2, 1e-12)), 0.0, 1.0)
        # squared distance to the closest axis point: |p-a|^2 - 2 t dot + t^2 |ab|^2
        dist2 = (x * x + y * y) + z * z - t * (2.0 * dot - t * np.float32(len2))
        dist = np.sqrt(np.maximum(dist2, 0.0, out=dist2), out=dist2)
        dist -= np.float32(ra) + t * np.float32(rb - ra)
        self._merge(box, dist, value)

    def add_dome(
        self,
        centre: np.ndarray,
        radius: float,
        axis: np.ndarray | None = None,
        elongation: float = 1.0,
        bumps: Sequence[tuple[float, float, np.ndarray, float]] = (),
        value: float = 1.0,
        gradient: np.ndarray | None = None,
    ) -> None:
        """Draw a (bumpy, elongated) ellipsoidal dome.

        The surface is ``rho = radius * (1 + sum_k amp_k cos(freq_k * (u . w_k) + phase_k))`` where ``u`` is the
        unit direction from ``centre`` and ``rho`` the distance with the component along ``axis`` divided by
        ``elongation``; ``rho - surface`` is an approximate signed distance (exact for a plain sphere).

        Args:
            centre: (3,) dome centre in mm.
            radius: radius across ``axis`` in mm; the dome reaches ``radius * elongation`` along ``axis``.
            axis: (3,) unit direction of elongation; ignored when ``elongation == 1``.
            elongation: >= 1.
            bumps: ``(amp, freq, w, phase)`` surface harmonics making the dome irregular.
            value: relative opacification of the dome.
            gradient: (3,) optional relative opacification change per mm (contrast layering in the sac).
        """
        if radius <= 0 or elongation < 1:
            raise ValueError(f"add_dome needs radius > 0 and elongation >= 1, got {radius}, {elongation}.")
        bump_max = sum(abs(b[0]) for b in bumps)
        reach = radius * elongation * (1.0 + bump_max)
        centre = np.asarray(centre, dtype=np.float64)
        box = self._box(centre - reach, centre + reach)
        if box is None:
            return
        x, y, z = self._local(box, centre)
        r2 = (x * x + y * y) + z * z
        if elongation != 1.0 and axis is not None:
            n = np.asarray(axis, dtype=np.float32)
            along = x * n[0] + y * n[1] + z * n[2]
            rho2 = r2 - along * along * np.float32(1.0 - 1.0 / elongation**2)
        else:
            rho2 = r2
        rho = np.sqrt(np.maximum(rho2, 0.0))
        surface = np.full_like(rho, np.float32(radius))
        if bumps:
            inv_r = 1.0 / np.sqrt(np.maximum(r2, 1e-6))
            for amp, freq, w, phase in bumps:
                cos_angle = (x * np.float32(w[0]) + y * np.float32(w[1]) + z * np.float32(w[2])) * inv_r
                surface += np.float32(radius * amp) * np.cos(np.float32(freq) * cos_angle + np.float32(phase))
        dist = rho - surface
        if gradient is not None:
            g = np.asarray(gradient, dtype=np.float32)
            local_value = np.float32(value) + (x * g[0] + y * g[1] + z * g[2])
        else:
            local_value = np.float32(value)
        self._merge(box, dist, np.broadcast_to(local_value, dist.shape))


def occupancy(distance: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Partial-volume fraction of each voxel from a signed distance (mm).

    A linear ramp one voxel wide (geometric-mean spacing) centred on the surface: the exact fraction for a
    plane cutting a cubic voxel face-on and a close approximation for smooth surfaces, i.e. what
    supersampling would give, without its cost.

    Args:
        distance: (X, Y, Z) signed distance in mm, negative inside.
        spacing: voxel spacing in mm.

    Returns:
        (X, Y, Z) float32 in [0, 1].
    """
    width = float(np.prod(np.asarray(spacing, dtype=np.float64)) ** (1.0 / 3.0))
    occ = np.float32(0.5) - distance * np.float32(1.0 / width)
    return np.clip(occ, 0.0, 1.0, out=occ)
