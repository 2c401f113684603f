"""Named acquisition "centres": the appearance and geometry styles of the synthetic 3DRA phantoms.

A centre stands for one hospital's C-arm, reconstruction kernel and case mix. Training on one centre and
testing on the others is the synthetic cross-dataset experiment, so the centres differ in ways that a
model can notice: voxel spacing and field of view, contrast, noise, blur, bone and streak artifacts, and
the aneurysm size mix.

Intensity unit: the appearance is drawn in canonical arbitrary units (AU) shaped like a reconstructed,
non-subtracted 3DRA volume: an opacified lumen at full contrast at about 900-2000 AU, soft tissue at
``lumen / contrast_ratio``, bone at 0.25-1.3 times the lumen. Each case is then written in drawn units
(AU, 0..1, 12-bit, HU-like or 16-bit; see :mod:`scripts.data.appearance`), so training must rescale
each volume by its own statistics, never with fixed numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["CENTRES", "Centre", "get_centre"]


@dataclass(frozen=True)
class Centre:
    """Acquisition style of one synthetic centre. Ranges are ``(low, high)`` and drawn uniformly per case.

    Args:
        name: short name, e.g. ``"A"``.
        description: one line for humans and ``dataset.json``.
        spacing: voxel spacing in mm along (X, Y, Z).
        shape: volume shape in voxels along (X, Y, Z); the field of view is ``shape * spacing``.
        lumen_intensity: AU of a fully opacified lumen.
        contrast_ratio: lumen-to-soft-tissue intensity ratio (drawn log-uniformly).
        cnr: contrast-to-noise ratio ``(lumen - tissue) / noise std`` (drawn log-uniformly).
        noise_relative: extra noise standard deviation as a fraction of the local signal (quantum noise).
        blur_sigma_mm: Gaussian point-spread sigma in mm (drawn log-uniformly; sometimes stretched along
            one axis).
        inhomogeneity: relative amplitude of the smooth multiplicative gain field (cupping, heel effect).
        p_bone: probability that a case shows a bright bone-like plate (skull base, clinoid).
        p_streaks: probability that a case shows in-plane streak artifacts.
        aneurysm_median_mm: median of the log-normal dome-size distribution (largest dimension, mm); most
            unruptured aneurysms are 2-7 mm (ISUIA 2003, UCAS Japan 2012).
        aneurysm_sigma_log: sigma of that log-normal (natural log).
        aneurysm_min_mm: smallest dome size; anything smaller is a vessel bulge, not an aneurysm.
        aneurysm_max_mm: largest dome size (also capped by the field of view).
        aneurysm_count_probs: probabilities of 0, 1, 2, ... aneurysms per case (one entry per count).
    """

    name: str
    description: str
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    lumen_intensity: tuple[float, float]
    contrast_ratio: tuple[float, float]
    cnr: tuple[float, float]
    noise_relative: float
    blur_sigma_mm: tuple[float, float]
    inhomogeneity: float
    p_bone: float
    p_streaks: float
    aneurysm_median_mm: float
    aneurysm_sigma_log: float
    aneurysm_min_mm: float = 1.5
    aneurysm_max_mm: float = 25.0
    aneurysm_count_probs: tuple[float, ...] = (0.15, 0.65, 0.20)

    def __post_init__(self) -> None:
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"Centre {self.name!r}: spacing must be 3 positive numbers, got {self.spacing}.")
        if len(self.shape) != 3 or min(self.shape) < 16:
            raise ValueError(f"Centre {self.name!r}: shape must be 3 sizes >= 16, got {self.shape}.")
        for field in ("lumen_intensity", "contrast_ratio", "cnr", "blur_sigma_mm"):
            low, high = getattr(self, field)
            if not 0 < low <= high:
                raise ValueError(f"Centre {self.name!r}: {field} must be 0 < low <= high, got {(low, high)}.")
        if self.contrast_ratio[0] <= 1.0:
            raise ValueError(
                f"Centre {self.name!r}: contrast_ratio {self.contrast_ratio} must stay above 1 (lumen brighter)."
            )
        for field in ("p_bone", "p_streaks"):
            if not 0.0 <= getattr(self, field) <= 1.0:
                raise ValueError(
                    f"Centre {self.name!r}: {field} must be in [0, 1], got {getattr(self, field)}."
                )
        probs = self.aneurysm_count_probs
        if len(probs) < 1 or min(probs) < 0 or abs(sum(probs) - 1.0) > 1e-6:
            raise ValueError(
                f"Centre {self.name!r}: aneurysm_count_probs must be probabilities of 0, 1, 2, ... aneurysms "
                f"summing to 1, got {probs}."
            )
        if not 0 < self.aneurysm_min_mm < self.aneurysm_median_mm < self.aneurysm_max_mm:
            raise ValueError(
                f"Centre {self.name!r}: need 0 < aneurysm_min_mm < aneurysm_median_mm < aneurysm_max_mm, got "
                f"{self.aneurysm_min_mm}, {self.aneurysm_median_mm}, {self.aneurysm_max_mm}."
            )
        if self.noise_relative < 0 or self.inhomogeneity < 0:
            raise ValueError(f"Centre {self.name!r}: noise_relative and inhomogeneity must be >= 0.")

    @property
    def fov_mm(self) -> tuple[float, float, float]:
        """Field of view in mm along (X, Y, Z)."""
        return tuple(float(n * s) for n, s in zip(self.shape, self.spacing, strict=True))

    def to_dict(self) -> dict:
        """JSON-serialisable copy of every field (for ``dataset.json``)."""
        return dataclasses.asdict(self)


CENTRES: dict[str, Centre] = {
    "A": Centre(
        name="A",
        description="default: isotropic 0.4 mm, 41.6 mm field of view, broad contrast, noise and artefact mix",
        spacing=(0.4, 0.4, 0.4),
        shape=(104, 104, 104),
        lumen_intensity=(1300.0, 1900.0),
        contrast_ratio=(3.0, 30.0),
        cnr=(5.0, 80.0),
        noise_relative=0.02,
        blur_sigma_mm=(0.1, 0.5),
        inhomogeneity=0.08,
        p_bone=0.25,
        p_streaks=0.25,
        aneurysm_median_mm=4.7,
        aneurysm_sigma_log=0.55,
    ),
    "B": Centre(
        name="B",
        description="0.3 mm in-plane, 0.5 mm slices, 54 mm field of view, lower contrast, more noise",
        spacing=(0.3, 0.3, 0.5),
        shape=(180, 180, 100),
        lumen_intensity=(900.0, 1400.0),
        contrast_ratio=(2.5, 10.0),
        cnr=(3.0, 15.0),
        noise_relative=0.04,
        blur_sigma_mm=(0.1, 0.35),
        inhomogeneity=0.15,
        p_bone=0.3,
        p_streaks=0.4,
        aneurysm_median_mm=5.0,
        aneurysm_sigma_log=0.55,
    ),
    "C": Centre(
        name="C",
        description="isotropic 0.5 mm, 56 mm field of view, more blur, frequent bone and streaks, larger aneurysms",
        spacing=(0.5, 0.5, 0.5),
        shape=(112, 112, 112),
        lumen_intensity=(1200.0, 2000.0),
        contrast_ratio=(4.0, 25.0),
        cnr=(8.0, 50.0),
        noise_relative=0.03,
        blur_sigma_mm=(0.4, 0.7),
        inhomogeneity=0.1,
        p_bone=0.7,
        p_streaks=0.7,
        aneurysm_median_mm=8.0,
        aneurysm_sigma_log=0.5,
    ),
}

DEFAULT_CENTRE = "A"


def get_centre(centre: str | Centre) -> Centre:
    """Look a centre up by name (a :class:`Centre` passes through, so callers may use a modified one).

    Raises:
        ValueError: if the name is unknown; the message lists the known names.
    """
    if isinstance(centre, Centre):
        return centre
    if centre not in CENTRES:
        raise ValueError(f"Unknown centre {centre!r}; known centres: {sorted(CENTRES)}.")
    return CENTRES[centre]
