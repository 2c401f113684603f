"""3DRA appearance: from lumen partial-volume to a reconstructed-looking intensity volume.

Order of the steps follows the physics loosely: the object (opacified lumen over soft tissue, plus bone)
is blurred by the system's point-spread function, then the reconstruction adds a smooth gain field
(cupping, heel effect), in-plane streaks from dense objects (the C-arm spins about Z, so streaks lie in
axial planes), and slightly correlated noise whose level grows with the signal. Units are the arbitrary
units documented in :mod:`scripts.data.centres`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .centres import Centre
from .raster import occupancy

__all__ = [
    "BoneSpec",
    "StreakSpec",
    "add_noise",
    "add_streaks",
    "bone_layer",
    "gain_field",
    "render_intensity",
]


class BoneSpec:
    """A curved bone-like plate: a cap of the spherical shell ``R <= |p - centre| <= R + thickness``.

    Args:
        centre: (3,) sphere centre in mm (outside the field of view).
        inner_radius: ``R`` in mm.
        thickness: plate thickness in mm.
        axis: (3,) unit vector from ``centre`` to the middle of the plate.
        half_angle: angular half-width of the plate (radians).
        intensity: AU of the cortical surface.
        rim: ``(amp, k, phase)`` harmonics of the rim in the azimuth ``phi`` about ``axis``: the plate
            reaches ``half_angle * (1 + sum amp cos(k phi + phase))``, so its outline is irregular.
    """

    def __init__(self, centre, inner_radius, thickness, axis, half_angle, intensity, rim=()):
        self.centre = np.asarray(centre, dtype=np.float64)
        self.inner_radius = float(inner_radius)
        self.thickness = float(thickness)
        self.axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
        self.half_angle = float(half_angle)
        self.intensity = float(intensity)
        self.rim = tuple(rim)

    @classmethod
    def sample(cls, rng: np.random.Generator, extent: np.ndarray, lumen: float) -> BoneSpec:
        """A plate crossing one side of the field of view (mostly below or to the side, like the skull base)."""
        v = rng.standard_normal(3)
        v[2] = -abs(v[2]) - 0.5  # mostly inferior
        v /= np.linalg.norm(v)
        inner = rng.uniform(25.0, 60.0)
        depth = rng.uniform(0.2, 0.4) * float(extent.min())  # from the volume centre to the plate
        centre = extent / 2.0 + v * (depth + inner)
        return cls(
            centre=centre,
            inner_radius=inner,
            thickness=rng.uniform(1.5, 4.0),
            axis=-v,
            half_angle=rng.uniform(8.0, 18.0) / inner,
            intensity=lumen * rng.uniform(0.5, 1.0),
            rim=[(rng.uniform(0.05, 0.25), k, rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)],
        )

    def to_info(self) -> dict:
        return {"thickness_mm": round(self.thickness, 2), "intensity": round(self.intensity, 1)}


class StreakSpec:
    """In-plane streaks radiating from ``source`` (mm): lines at ``angles`` with signed ``amplitudes`` (AU)."""

    def __init__(self, source, angles, amplitudes, width, decay, z_sigma):
        self.source = np.asarray(source, dtype=np.float64)
        self.angles = np.asarray(angles, dtype=np.float64)
        self.amplitudes = np.asarray(amplitudes, dtype=np.float64)
        self.width = float(width)
        self.decay = float(decay)
        self.z_sigma = float(z_sigma)

    @classmethod
    def sample(cls, rng: np.random.Generator, source: np.ndarray, lumen: float) -> StreakSpec:
        """6-16 lines, 60 % of them dark, of 4-15 % of the lumen intensity, fading over 15-40 mm."""
        n = int(rng.integers(6, 17))
        signs = rng.choice([-1.0, 1.0], size=n, p=[0.6, 0.4])
        return cls(
            source=source,
            angles=rng.uniform(0.0, np.pi, size=n),
            amplitudes=signs * rng.uniform(0.04, 0.15, size=n) * lumen,
            width=rng.uniform(0.25, 0.7),
            decay=rng.uniform(15.0, 40.0),
            z_sigma=rng.uniform(3.0, 10.0),
        )

    def to_info(self) -> dict:
        return {"lines": len(self.angles), "max_amplitude": round(float(np.abs(self.amplitudes).max()), 1)}


def _axes(shape, spacing) -> list[np.ndarray]:
    return [np.arange(n, dtype=np.float32) * np.float32(s) for n, s in zip(shape, spacing, strict=True)]


def bone_layer(spec: BoneSpec, shape, spacing) -> np.ndarray:
    """Bone intensity (AU) on the grid, 0 outside the plate; (X, Y, Z) float32."""
    x, y, z = _axes(shape, spacing)
    c = spec.centre.astype(np.float32)
    dx, dy, dz = (x - c[0])[:, None, None], (y - c[1])[None, :, None], (z - c[2])[None, None, :]
    r = np.sqrt((dx * dx + dy * dy) + dz * dz)
    mid = np.float32(spec.inner_radius + 0.5 * spec.thickness)
    shell = np.abs(r - mid) - np.float32(0.5 * spec.thickness)  # signed distance to the shell, mm
    a = spec.axis.astype(np.float32)
    cos_angle = (dx * a[0] + dy * a[1] + dz * a[2]) / np.maximum(r, 1e-3)
    angle = np.arccos(np.clip(cos_angle, -1.0, 1.0))
    reach = np.float32(spec.half_angle)
    if spec.rim:
        e1 = np.cross(spec.axis, [1.0, 0.0, 0.0] if abs(spec.axis[0]) < 0.9 else [0.0, 1.0, 0.0])
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(spec.axis, e1)
        u = dx * np.float32(e1[0]) + dy * np.float32(e1[1]) + dz * np.float32(e1[2])
        v = dx * np.float32(e2[0]) + dy * np.float32(e2[1]) + dz * np.float32(e2[2])
        phi = np.arctan2(v, u)  # azimuth about the plate's axis
        wobble = sum(
            np.float32(amp) * np.cos(np.float32(k) * phi + np.float32(ph)) for amp, k, ph in spec.rim
        )
        reach = reach * (np.float32(1.0) + wobble)
    lateral = (angle - reach) * np.float32(spec.inner_radius)  # mm beyond the rim
    occ = occupancy(np.maximum(shell, lateral), spacing)
    # cortical surfaces brighter than the cancellous middle
    depth = np.clip((r - np.float32(spec.inner_radius)) / np.float32(spec.thickness), 0.0, 1.0)
    texture = np.float32(1.0) - np.float32(0.35) * np.sin(np.float32(np.pi) * depth)
    return np.float32(spec.intensity) * occ * texture


def gain_field(rng: np.random.Generator, shape, spacing, terms: int = 3) -> np.ndarray:
    """Smooth field in about [-1, 1]: a few random plane waves with wavelengths of 40-150 mm; (X, Y, Z)."""
    x, y, z = _axes(shape, spacing)
    field = np.zeros(shape, dtype=np.float32)
    for _ in range(terms):
        k = rng.standard_normal(3)
        k *= 2 * np.pi / (np.linalg.norm(k) * rng.uniform(40.0, 150.0))
        phase = rng.uniform(0, 2 * np.pi)
        arg = (x * np.float32(k[0]))[:, None, None] + (y * np.float32(k[1]))[None, :, None]
        arg = arg + (z * np.float32(k[2]) + np.float32(phase))[None, None, :]
        field += np.cos(arg) * np.float32(1.0 / terms)
    return field


def add_streaks(image: np.ndarray, spec: StreakSpec, spacing) -> None:
    """Add the streak pattern to ``image`` (X, Y, Z) in place."""
    x, y, z = _axes(image.shape, spacing)
    dx, dy = (x - spec.source[0])[:, None], (y - spec.source[1])[None, :]
    plane = np.zeros((len(x), len(y)), dtype=np.float32)
    for angle, amp in zip(spec.angles, spec.amplitudes, strict=True):
        off = dx * np.float32(np.sin(angle)) - dy * np.float32(np.cos(angle))  # distance to the line, mm
        plane += np.float32(amp) * np.exp(-(off * off) / np.float32(2 * spec.width**2))
    plane *= np.exp(-np.sqrt(dx * dx + dy * dy) / np.float32(spec.decay))
    z_profile = np.exp(-((z - spec.source[2]) ** 2) / np.float32(2 * spec.z_sigma**2)).astype(np.float32)
    image += plane[:, :, None] * z_profile[None, None, :]


def add_noise(image: np.ndarray, rng: np.random.Generator, sigma: float, relative: float) -> None:
    """Add slightly correlated Gaussian noise, std ``sigma + relative * |signal|``, to ``image`` in place."""
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, 0.6, truncate=2.5)
    noise *= np.float32(1.0 / max(float(noise[::3, ::3, ::3].std()), 1e-6))
    scale = np.abs(image)
    scale *= np.float32(relative)
    scale += np.float32(sigma)
    noise *= scale
    image += noise


def render_intensity(
    distance: np.ndarray,
    value: np.ndarray,
    centre: Centre,
    rng: np.random.Generator,
    extent: np.ndarray,
    focus: np.ndarray,
) -> tuple[np.ndarray, dict]:
    """Turn a lumen signed distance and opacification into a 3DRA-like image.

    Args:
        distance: (X, Y, Z) signed distance to the lumen in mm (negative inside).
        value: (X, Y, Z) relative opacification of the owning lumen.
        centre: acquisition style.
        rng: random generator for the appearance.
        extent: (3,) field of view in mm.
        focus: (3,) a point (mm) on a large vessel, used as streak source when there is no bone.

    Returns:
        ``(image, info)``: (X, Y, Z) float32 image in AU and a JSON-serialisable summary.
    """
    spacing = centre.spacing
    lumen = float(rng.uniform(*centre.lumen_intensity))
    background = float(rng.uniform(*centre.background_intensity))
    info: dict = {"lumen_intensity": round(lumen, 1), "background_intensity": round(background, 1)}

    # object: background + (lumen - background) * partial volume
    image = occupancy(distance, spacing)
    image *= value * np.float32(lumen) - np.float32(background)
    image += np.float32(background)

    bone = None
    if rng.random() < centre.p_bone:
        bone = BoneSpec.sample(rng, extent, lumen)
        np.maximum(image, bone_layer(bone, image.shape, spacing) + np.float32(background), out=image)
        info["bone"] = bone.to_info()

    sigma_vox = [b / s for b, s in zip(centre.blur_mm, spacing, strict=True)]
    if max(sigma_vox) > 0:
        image = ndimage.gaussian_filter(image, sigma_vox, truncate=3.0)

    gain = gain_field(rng, image.shape, spacing)
    image *= np.float32(1.0) + np.float32(centre.inhomogeneity) * gain
    image += np.float32(0.3 * background) * gain_field(rng, image.shape, spacing, terms=2)

    if rng.random() < centre.p_streaks:
        if bone is not None:
            source = bone.centre + bone.axis * bone.inner_radius
        else:
            source = focus + rng.normal(0.0, 3.0, size=3)
        streaks = StreakSpec.sample(rng, source, lumen)
        add_streaks(image, streaks, spacing)
        info["streaks"] = streaks.to_info()

    add_noise(image, rng, centre.noise_sigma, centre.noise_relative)
    return image, info
