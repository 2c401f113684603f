"""3DRA appearance: from lumen partial-volume to a reconstructed-looking intensity volume.

Every case draws its own appearance (domain randomisation at generation time: training caches encoder
embeddings per volume, so on-the-fly intensity augmentation would defeat the cache). The steps follow
the physics loosely, in canonical arbitrary units (AU, see :mod:`scripts.data.centres`):

1. object: soft tissue at ``background = lumen / contrast_ratio`` with a drawn texture (``plain``,
   ``smooth`` low-frequency tissue, ``blobby`` noise of 1-4 mm correlation length, or a mix), the lumen
   replacing it by partial volume, its opacification optionally fading or inhomogeneous; bone (a plate,
   a thin cortical line or textured cancellous bone) and sometimes a small metal-like spot (coil, clip);
2. the point-spread function: Gaussian blur, sometimes anisotropic;
3. reconstruction: smooth multiplicative and additive gain fields, in-plane streaks (the C-arm spins
   about Z), strong streaks from metal, ring or stripe artefacts;
4. noise whose level is set by a drawn contrast-to-noise ratio (white or slightly correlated, growing
   with the signal);
5. units: the same image written as AU, 0..1 floats, 12-bit integers, HU-like or 16-bit values (an
   offset and a scale per case, rounding and clipping for the integer kinds), and sometimes the dark
   outside of the cylindrical reconstruction field of view set to a constant.

Every draw is recorded in the returned ``info`` (JSON-serialisable). Appearance never touches labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .centres import Centre
from .raster import occupancy

__all__ = [
    "BONE_KINDS",
    "TEXTURE_KINDS",
    "UNIT_KINDS",
    "render_intensity",
]

TEXTURE_KINDS = ("plain", "smooth", "blobby")
UNIT_KINDS = ("au", "unit", "12bit", "hu", "16bit")
BONE_KINDS = ("plate", "cortical", "cancellous")

# probabilities and ranges shared by every centre (the centre-specific ones live in Centre)
P_TEXTURE = {"smooth": 0.5, "blobby": 0.5}  # each drawn independently; neither -> "plain"
P_OPACIFICATION = 0.5  # fading / inhomogeneous contrast
P_SECOND_BONE = 0.3
P_ANISOTROPIC_BLUR = 0.3
P_METAL = 0.12
P_RINGS = 0.25
P_STRIPES = 0.15
P_FOV = 0.4
P_WHITE_NOISE = 0.3


def _r(x: float, digits: int = 4) -> float:
    return float(round(float(x), digits))


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


@dataclass(eq=False)
class BoneSpec:
    """A curved bone-like plate: a cap of the spherical shell ``R <= |p - centre| <= R + thickness``.

    Array-likes are stored as float64 arrays, numbers as floats (``texture_seed`` as int).

    Args:
        centre: (3,) sphere centre in mm (outside the field of view).
        inner_radius: ``R`` in mm.
        thickness: plate thickness in mm.
        axis: (3,) vector from ``centre`` to the middle of the plate (stored as a unit vector).
        half_angle: angular half-width of the plate (radians).
        intensity: AU of the cortical surface.
        rim: ``(amp, k, phase)`` harmonics of the rim in the azimuth ``phi`` about ``axis``: the plate
            reaches ``half_angle * (1 + sum amp cos(k phi + phase))``, so its outline is irregular.
            Default none (stored as a tuple).
        kind: ``"plate"`` (cortical surfaces brighter than the middle), ``"cortical"`` (a thin uniform
            line) or ``"cancellous"`` (thick, with a blobby trabecular texture). Default ``"plate"``.
        texture_seed: seed of the cancellous texture (only used by ``"cancellous"``). Default 0.

    Raises:
        ValueError: for a ``kind`` not in :data:`BONE_KINDS`.
    """

    centre: np.ndarray
    inner_radius: float
    thickness: float
    axis: np.ndarray
    half_angle: float
    intensity: float
    rim: tuple = ()
    kind: str = "plate"
    texture_seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in BONE_KINDS:
            raise ValueError(f"BoneSpec kind must be one of {BONE_KINDS}, got {self.kind!r}.")
        self.centre = np.asarray(self.centre, dtype=np.float64)
        self.inner_radius = float(self.inner_radius)
        self.thickness = float(self.thickness)
        self.axis = np.asarray(self.axis, dtype=np.float64) / np.linalg.norm(self.axis)
        self.half_angle = float(self.half_angle)
        self.intensity = float(self.intensity)
        self.rim = tuple(self.rim)
        self.texture_seed = int(self.texture_seed)

    @classmethod
    def sample(
        cls, rng: np.random.Generator, extent: np.ndarray, lumen: float, kind: str = "plate"
    ) -> BoneSpec:
        """A bone crossing one side of the field of view (mostly below or to the side, like the skull base).

        ``plate``: 1.5-4 mm at 0.5-1.0 x lumen; ``cortical``: 0.3-0.9 mm at 0.6-1.3 x lumen;
        ``cancellous``: 3-7 mm at 0.25-0.6 x lumen.
        """
        v = rng.standard_normal(3)
        v[2] = -abs(v[2]) - 0.5  # mostly inferior
        v /= np.linalg.norm(v)
        inner = rng.uniform(25.0, 60.0)
        depth = rng.uniform(0.2, 0.4) * float(extent.min())  # from the volume centre to the plate
        centre = extent / 2.0 + v * (depth + inner)
        thickness, scale = {"plate": ((1.5, 4.0), (0.5, 1.0)), "cortical": ((0.3, 0.9), (0.6, 1.3))}.get(
            kind, ((3.0, 7.0), (0.25, 0.6))
        )
        return cls(
            centre=centre,
            inner_radius=inner,
            thickness=rng.uniform(*thickness),
            axis=-v,
            half_angle=rng.uniform(8.0, 18.0) / inner,
            intensity=lumen * rng.uniform(*scale),
            rim=[(rng.uniform(0.05, 0.25), k, rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)],
            kind=kind,
            texture_seed=int(rng.integers(2**31)),
        )

    def to_info(self) -> dict:
        return {"kind": self.kind, "thickness_mm": _r(self.thickness, 2), "intensity": _r(self.intensity, 1)}


@dataclass(eq=False)
class StreakSpec:
    """In-plane streaks radiating from ``source`` (mm): lines at ``angles`` with signed ``amplitudes`` (AU).

    Args:
        source: (3,) point the lines radiate from, in mm.
        angles: (L,) in-plane angle of each line (radians).
        amplitudes: (L,) signed amplitude of each line in AU.
        width: line width in mm.
        decay: distance (mm) over which the lines fade.
        z_sigma: extent (mm) of the lines along Z.
    """

    source: np.ndarray
    angles: np.ndarray
    amplitudes: np.ndarray
    width: float
    decay: float
    z_sigma: float

    def __post_init__(self) -> None:
        self.source = np.asarray(self.source, dtype=np.float64)
        self.angles = np.asarray(self.angles, dtype=np.float64)
        self.amplitudes = np.asarray(self.amplitudes, dtype=np.float64)
        self.width = float(self.width)
        self.decay = float(self.decay)
        self.z_sigma = float(self.z_sigma)

    @classmethod
    def sample(
        cls, rng: np.random.Generator, source: np.ndarray, lumen: float, strength: float = 1.0
    ) -> StreakSpec:
        """6-16 lines, 60 % of them dark, of ``strength`` x 4-15 % of the lumen intensity, fading over 15-40 mm."""
        n = int(rng.integers(6, 17))
        signs = rng.choice([-1.0, 1.0], size=n, p=[0.6, 0.4])
        return cls(
            source=source,
            angles=rng.uniform(0.0, np.pi, size=n),
            amplitudes=signs * rng.uniform(0.04, 0.15, size=n) * lumen * strength,
            width=rng.uniform(0.25, 0.7),
            decay=rng.uniform(15.0, 40.0),
            z_sigma=rng.uniform(3.0, 10.0),
        )

    def to_info(self) -> dict:
        return {"lines": len(self.angles), "max_amplitude": _r(np.abs(self.amplitudes).max(), 1)}


def _axes(shape, spacing) -> list[np.ndarray]:
    return [np.arange(n, dtype=np.float32) * np.float32(s) for n, s in zip(shape, spacing, strict=True)]


def correlated_noise(rng: np.random.Generator, shape, spacing, length_mm: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian noise with correlation length (Gaussian sigma) ``length_mm``; (X, Y, Z).

    Drawn on a grid coarser by up to ``length / 2`` voxels and linearly upsampled, so long correlation
    lengths cost no more than short ones.
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    sigma = length_mm / spacing  # voxels
    factor = np.maximum(np.floor(sigma / 2.0), 1.0).astype(int)
    coarse = np.ceil(np.asarray(shape) / factor).astype(int) + 2
    field = ndimage.gaussian_filter(
        rng.standard_normal(tuple(coarse), dtype=np.float32), sigma / factor, mode="wrap", truncate=3.0
    )
    if np.any(factor > 1):
        field = ndimage.zoom(field, factor, order=1, prefilter=False, grid_mode=False)
    field = field[: shape[0], : shape[1], : shape[2]]
    field -= field.mean()
    field *= np.float32(1.0 / max(float(field.std()), 1e-6))
    return np.ascontiguousarray(field, dtype=np.float32)


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
    if spec.kind == "cortical":
        return np.float32(spec.intensity) * occ
    if spec.kind == "cancellous":
        texture = correlated_noise(np.random.default_rng(spec.texture_seed), shape, spacing, 0.6)
        texture = np.clip(np.float32(0.7) + np.float32(0.35) * texture, 0.2, 1.2)
        return np.float32(spec.intensity) * occ * texture
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


def add_noise(
    image: np.ndarray, rng: np.random.Generator, sigma: float, relative: float, correlation: float = 0.6
) -> None:
    """Add Gaussian noise, std ``sigma + relative * |signal|``, to ``image`` (X, Y, Z) in place.

    Args:
        correlation: Gaussian sigma (voxels) of the noise correlation; 0 gives white noise. Default 0.6.
    """
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    if correlation > 0:
        noise = ndimage.gaussian_filter(noise, correlation, truncate=2.5)
        noise *= np.float32(1.0 / max(float(noise[::3, ::3, ::3].std()), 1e-6))
    scale = np.abs(image)
    scale *= np.float32(relative)
    scale += np.float32(sigma)
    noise *= scale
    image += noise


# ----------------------------------------------------------------------------------------- the steps
def _tissue(rng: np.random.Generator, shape, spacing, background: float, contrast: float, info: dict):
    """Soft-tissue background with its texture; (X, Y, Z) float32 AU."""
    tissue = np.full(shape, background, dtype=np.float32)
    kinds = []
    if rng.random() < P_TEXTURE["smooth"]:
        length, amp = rng.uniform(5.0, 15.0), rng.uniform(0.05, 0.3) * background
        tissue += np.float32(amp) * correlated_noise(rng, shape, spacing, length)
        kinds.append({"kind": "smooth", "length_mm": _r(length, 2), "amplitude": _r(amp, 2)})
    if rng.random() < P_TEXTURE["blobby"]:
        length, amp = rng.uniform(1.0, 4.0), rng.uniform(0.02, 0.15) * contrast
        tissue += np.float32(amp) * correlated_noise(rng, shape, spacing, length / 2.0)
        kinds.append({"kind": "blobby", "length_mm": _r(length, 2), "amplitude": _r(amp, 2)})
    np.maximum(tissue, np.float32(0.05 * background), out=tissue)
    info["textures"] = kinds or [{"kind": "plain"}]
    return tissue


def _opacification(rng, value, spacing, ratio: float, info: dict) -> np.ndarray:
    """Relative opacification: the tubes' own values, sometimes fading along a direction and patchy."""
    if rng.random() >= P_OPACIFICATION:
        return value
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    fade, patchy = rng.uniform(0.1, 0.6), rng.uniform(0.0, 0.25)
    x, y, z = _axes(value.shape, spacing)
    ramp = (x * np.float32(direction[0]))[:, None, None] + (y * np.float32(direction[1]))[None, :, None]
    ramp = ramp + (z * np.float32(direction[2]))[None, None, :]
    ramp -= ramp.min()
    ramp *= np.float32(fade / max(float(ramp.max()), 1e-6))
    factor = np.float32(1.0) - ramp
    if patchy > 0:
        factor += np.float32(patchy) * correlated_noise(rng, value.shape, spacing, rng.uniform(2.0, 6.0))
    floor = min(0.9, 2.0 / ratio)  # the lumen stays at least twice the tissue
    info["opacification"] = {"fade": _r(fade, 3), "patchy": _r(patchy, 3)}
    return np.maximum(value * factor, np.float32(floor))


def _bones(rng, centre: Centre, extent, lumen: float, shape, info: dict) -> list[BoneSpec]:
    if rng.random() >= centre.p_bone:
        return []
    count = 2 if rng.random() < P_SECOND_BONE else 1
    bones = [
        BoneSpec.sample(rng, extent, lumen, str(rng.choice(BONE_KINDS, p=[0.45, 0.3, 0.25])))
        for _ in range(count)
    ]
    info["bones"] = [b.to_info() for b in bones]
    return bones


def _metal(rng, distance: np.ndarray, spacing, lumen: float, info: dict) -> tuple[np.ndarray, float] | None:
    """A small very bright sphere (coil, clip) in the background, clear of any lumen; None if not drawn."""
    if rng.random() >= P_METAL:
        return None
    shape = np.asarray(distance.shape)
    radius, scale = rng.uniform(0.4, 1.2), rng.uniform(3.0, 10.0)
    far = float(distance.max())  # the distance field stops at a margin: "far" means beyond it
    reach = np.ceil((radius + 1.0) / np.asarray(spacing)).astype(int)
    for candidate in rng.uniform(0.1, 0.9, size=(40, 3)) * (shape - 1):
        index = np.round(candidate).astype(int)
        box = tuple(slice(max(i - r, 0), i + r + 1) for i, r in zip(index, reach, strict=True))
        if distance[box].min() >= far:
            info["metal"] = {"radius_mm": _r(radius, 2), "intensity": _r(scale * lumen, 1)}
            return candidate * np.asarray(spacing), radius
    return None


def _sphere(shape, spacing, centre_mm, radius: float) -> np.ndarray:
    x, y, z = _axes(shape, spacing)
    d2 = (x - np.float32(centre_mm[0]))[:, None, None] ** 2 + (y - np.float32(centre_mm[1]))[
        None, :, None
    ] ** 2
    d2 = d2 + (z - np.float32(centre_mm[2]))[None, None, :] ** 2
    return occupancy(np.sqrt(d2) - np.float32(radius), spacing)


def _blur(rng, image: np.ndarray, centre: Centre, spacing, info: dict) -> np.ndarray:
    sigma = np.full(3, _log_uniform(rng, *centre.blur_sigma_mm))
    if rng.random() < P_ANISOTROPIC_BLUR:
        sigma[int(rng.choice(3, p=[0.2, 0.2, 0.6]))] *= rng.uniform(1.3, 2.2)
    sigma = np.minimum(sigma, 1.0)
    info["blur_sigma_mm"] = [_r(s, 3) for s in sigma]
    return ndimage.gaussian_filter(image, sigma / np.asarray(spacing), truncate=3.0)


def _rings_and_stripes(rng, image: np.ndarray, spacing, contrast: float, info: dict) -> None:
    """Concentric rings about the rotation (Z) axis and/or plane-wave stripes, added in place."""
    x, y, z = _axes(image.shape, spacing)
    if rng.random() < P_RINGS:
        cx, cy = x[-1] / 2 + rng.normal(0, 2.0), y[-1] / 2 + rng.normal(0, 2.0)
        r = np.sqrt((x - np.float32(cx))[:, None] ** 2 + (y - np.float32(cy))[None, :] ** 2)
        n, width = int(rng.integers(3, 11)), rng.uniform(0.2, 0.6)
        plane = np.zeros(r.shape, dtype=np.float32)
        amps = rng.choice([-1.0, 1.0], size=n) * rng.uniform(0.01, 0.08, size=n) * contrast
        for radius, amp in zip(rng.uniform(1.0, float(r.max()), size=n), amps, strict=True):
            plane += np.float32(amp) * np.exp(-((r - np.float32(radius)) ** 2) / np.float32(2 * width**2))
        image += plane[:, :, None]
        info["rings"] = {"count": n, "max_amplitude": _r(np.abs(amps).max(), 2)}
    if rng.random() < P_STRIPES:
        k = rng.standard_normal(3) * np.array([0.3, 0.3, 1.0])  # mostly slice-wise banding
        period, amp = rng.uniform(1.0, 4.0), rng.uniform(0.01, 0.05) * contrast
        k *= 2 * np.pi / (np.linalg.norm(k) * period)
        arg = (x * np.float32(k[0]))[:, None, None] + (y * np.float32(k[1]))[None, :, None]
        image += np.float32(amp) * np.cos(arg + (z * np.float32(k[2]))[None, None, :])
        info["stripes"] = {"period_mm": _r(period, 2), "amplitude": _r(amp, 2)}


def _units(rng, image: np.ndarray, lumen: float, background: float, info: dict) -> tuple[float, float]:
    """Rewrite ``image`` in place in drawn units; returns the unit range ``(low, high)`` (may be infinite)."""
    kind = str(rng.choice(UNIT_KINDS))
    low, high = -np.inf, np.inf
    if kind == "au":
        scale, offset = 1.0, 0.0
    elif kind == "unit":
        scale, offset = 1.0 / (lumen * rng.uniform(1.0, 1.5)), rng.uniform(-0.02, 0.05)
    elif kind == "12bit":
        scale, offset, low, high = rng.uniform(1200.0, 3800.0) / lumen, rng.uniform(0.0, 300.0), 0.0, 4095.0
    elif kind == "hu":
        tissue_hu, lumen_hu = rng.uniform(0.0, 100.0), rng.uniform(300.0, 2800.0)
        scale = (lumen_hu - tissue_hu) / (lumen - background)
        offset, low, high = tissue_hu - scale * background, -1024.0, 3071.0
    else:
        signed = bool(rng.random() < 0.5)
        scale = rng.uniform(8000.0, 30000.0 if signed else 60000.0) / lumen
        offset = rng.uniform(0.0, 2000.0) - 32768.0 * signed * rng.random()
        low, high = (-32768.0, 32767.0) if signed else (0.0, 65535.0)
    image *= np.float32(scale)
    image += np.float32(offset)
    if np.isfinite(low):
        np.rint(image, out=image)
        np.clip(image, low, high, out=image)
    info["units"] = {"kind": kind, "scale": float(f"{scale:.6g}"), "offset": _r(offset, 4)}
    return low, high


def _field_of_view(rng, image: np.ndarray, distance: np.ndarray, spacing, low: float, info: dict) -> None:
    """Set the outside of an axial reconstruction circle to a constant, never cutting the lumen; in place."""
    if rng.random() >= P_FOV:
        return
    x, y, _ = _axes(image.shape, spacing)
    cx, cy = x[-1] / 2 + rng.normal(0, 1.0), y[-1] / 2 + rng.normal(0, 1.0)
    r = np.sqrt((x - np.float32(cx))[:, None] ** 2 + (y - np.float32(cy))[None, :] ** 2)  # (X, Y)
    radius = rng.uniform(0.42, 0.6) * min(x[-1], y[-1])
    lumen_xy = (distance <= 0.5 * float(max(spacing))).any(axis=2)
    if lumen_xy.any():
        radius = max(radius, float(r[lumen_xy].max()) + 1.0)
    fills = {"floor": low if np.isfinite(low) else info["units"]["offset"], "zero": 0.0}
    fill_kind = str(rng.choice(list(fills)))
    fill = fills[fill_kind]
    weight = np.clip((np.float32(radius) - r) / np.float32(spacing[0]) + 0.5, 0.0, 1.0)[:, :, None]
    image -= np.float32(fill)
    image *= weight
    image += np.float32(fill)
    info["fov"] = {"radius_mm": _r(radius, 2), "fill": fill_kind, "visible": bool((weight < 1).any())}


@dataclass(frozen=True)
class _Contrast:
    """A case's drawn contrast: lumen AU, lumen-to-tissue ratio and contrast-to-noise ratio."""

    lumen: float
    ratio: float
    cnr: float

    @property
    def background(self) -> float:
        """Soft-tissue AU."""
        return self.lumen / self.ratio

    @property
    def contrast(self) -> float:
        """Lumen minus tissue, AU."""
        return self.lumen - self.background

    @classmethod
    def sample(cls, rng: np.random.Generator, centre: Centre, info: dict) -> _Contrast:
        """Draw from ``centre``'s ranges and record the draws in ``info``."""
        lumen = float(rng.uniform(*centre.lumen_intensity))
        ratio = _log_uniform(rng, *centre.contrast_ratio)
        cnr = _log_uniform(rng, *centre.cnr)
        drawn = cls(lumen, ratio, cnr)
        info["lumen_intensity"] = _r(lumen, 1)
        info["background_intensity"] = _r(drawn.background, 1)
        info["contrast_ratio"] = _r(ratio, 3)
        info["cnr"] = _r(cnr, 2)
        return drawn


def _object(
    rng, distance: np.ndarray, value: np.ndarray, spacing, drawn: _Contrast, info: dict
) -> np.ndarray:
    """Tissue plus ``(lumen - tissue) * partial volume``; (X, Y, Z) float32 AU."""
    tissue = _tissue(rng, distance.shape, spacing, drawn.background, drawn.contrast, info)
    image = occupancy(distance, spacing)
    image *= _opacification(rng, value, spacing, drawn.ratio, info) * np.float32(drawn.lumen) - tissue
    image += tissue
    return image


def _dense_objects(
    rng, image: np.ndarray, distance: np.ndarray, centre: Centre, extent, drawn: _Contrast, info: dict
) -> tuple[list[BoneSpec], tuple[np.ndarray, float] | None]:
    """Draw bone plates and a metal sphere into ``image`` in place.

    Returns:
        ``(bones, metal)``: the bones drawn and the metal's ``(centre_mm, radius)``, ``None`` if none.
    """
    shape, spacing = image.shape, centre.spacing
    bones = _bones(rng, centre, extent, drawn.lumen, shape, info)
    for bone in bones:
        np.maximum(image, bone_layer(bone, shape, spacing) + np.float32(drawn.background), out=image)
    metal = _metal(rng, distance, spacing, drawn.lumen, info)
    if metal is not None:
        image += np.float32(info["metal"]["intensity"]) * _sphere(shape, spacing, *metal)
    return bones, metal


def _inhomogeneity(rng, image: np.ndarray, centre: Centre, background: float, info: dict) -> None:
    """Multiply by a smooth gain field and add a smooth offset, in place."""
    shape, spacing = image.shape, centre.spacing
    inhomogeneity = centre.inhomogeneity * rng.uniform(0.3, 1.5)
    image *= np.float32(1.0) + np.float32(inhomogeneity) * gain_field(rng, shape, spacing)
    image += np.float32(0.3 * background) * gain_field(rng, shape, spacing, terms=2)
    info["inhomogeneity"] = _r(inhomogeneity, 3)


def _streak_artefacts(
    rng,
    image: np.ndarray,
    centre: Centre,
    lumen: float,
    bones: list[BoneSpec],
    metal: tuple[np.ndarray, float] | None,
    focus: np.ndarray,
    info: dict,
) -> None:
    """Streaks from the first bone (or near ``focus``) with the centre's probability, and from any metal; in place."""
    if rng.random() < centre.p_streaks:
        if bones:
            source = bones[0].centre + bones[0].axis * bones[0].inner_radius
        else:
            source = focus + rng.normal(0.0, 3.0, size=3)
        streaks = StreakSpec.sample(rng, source, lumen, strength=_log_uniform(rng, 0.3, 3.0))
        add_streaks(image, streaks, centre.spacing)
        info["streaks"] = streaks.to_info()
    if metal is not None:
        streaks = StreakSpec.sample(rng, metal[0], lumen, strength=rng.uniform(3.0, 8.0))
        streaks.decay *= 1.5
        add_streaks(image, streaks, centre.spacing)
        info["metal"]["streaks"] = streaks.to_info()


def _noise(rng, image: np.ndarray, centre: Centre, drawn: _Contrast, info: dict) -> None:
    """White or correlated noise of std ``contrast / cnr`` plus signal-dependent noise, in place."""
    correlation = 0.0 if rng.random() < P_WHITE_NOISE else rng.uniform(0.4, 1.2)
    relative = centre.noise_relative * rng.uniform(0.3, 1.5)
    add_noise(image, rng, drawn.contrast / drawn.cnr, relative, correlation)
    info["noise"] = {
        "sigma": _r(drawn.contrast / drawn.cnr, 2),
        "relative": _r(relative, 4),
        "correlation_vox": _r(correlation, 3),
    }


def render_intensity(
    distance: np.ndarray,
    value: np.ndarray,
    centre: Centre,
    rng: np.random.Generator,
    extent: np.ndarray,
    focus: np.ndarray,
) -> tuple[np.ndarray, dict]:
    """Turn a lumen signed distance and opacification into a 3DRA-like image with drawn appearance.

    The steps, in the order they draw from ``rng``: contrast, object (tissue and lumen), bone and metal,
    blur, inhomogeneity, streaks, rings and stripes, noise, units, reconstruction circle.

    Args:
        distance: (X, Y, Z) signed distance to the lumen in mm (negative inside); not modified.
        value: (X, Y, Z) relative opacification of the owning lumen; not modified.
        centre: acquisition style (the ranges the draws come from).
        rng: random generator for the appearance.
        extent: (3,) field of view in mm.
        focus: (3,) a point (mm) on a large vessel, used as streak source when there is no bone.

    Returns:
        ``(image, info)``: (X, Y, Z) float32 image in the drawn units and a JSON-serialisable record of
        every draw.

    Raises:
        RuntimeError: if the result is not finite or constant (never expected; a blank volume must not be
            produced by accident).
    """
    spacing = centre.spacing
    info: dict = {}
    drawn = _Contrast.sample(rng, centre, info)
    image = _object(rng, distance, value, spacing, drawn, info)
    bones, metal = _dense_objects(rng, image, distance, centre, extent, drawn, info)
    image = _blur(rng, image, centre, spacing, info)
    _inhomogeneity(rng, image, centre, drawn.background, info)
    _streak_artefacts(rng, image, centre, drawn.lumen, bones, metal, focus, info)
    _rings_and_stripes(rng, image, spacing, drawn.contrast, info)
    _noise(rng, image, centre, drawn, info)
    low, _ = _units(rng, image, drawn.lumen, drawn.background, info)
    _field_of_view(rng, image, distance, spacing, low, info)
    if not np.all(np.isfinite(image)) or float(image.max()) <= float(image.min()):
        raise RuntimeError(f"render_intensity produced a non-finite or constant volume; draws: {info}")
    return image, info
