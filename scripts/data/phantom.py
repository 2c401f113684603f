"""Synthetic 3DRA phantoms: a vessel tree with aneurysms and look-alikes, rendered like a 3DRA volume.

``generate_case(seed, centre)`` is a deterministic function of its arguments. Two independent random
streams are spawned from the seed, one for the geometry and one for the appearance, so that
``generate_geometry(seed, centre)`` (cheap, no volume) describes exactly the geometry that
``generate_case`` renders.

Arrays are (X, Y, Z) in RAS, as MONAI's ``LoadImage`` returns a NIfTI: the last axis is Z (inferior to
superior) and axial slices are ``volume[:, :, k]``. The affine is diagonal with the spacing on the
diagonal and puts the volume centre at the world origin (the C-arm's isocentre).

Labels: 0 background, 1 vessel, 2 aneurysm. A voxel is lumen when its centre is inside the surface;
where a sac overlaps a vessel the vessel wins, so the aneurysm label is the sac beyond the parent wall.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from scripts.labels import ANEURYSM_LABEL, BACKGROUND_LABEL, COMPONENT_CONNECTIVITY, LABEL_NAMES, VESSEL_LABEL

from .appearance import render_intensity
from .centres import Centre, get_centre
from .lesions import Aneurysm, HardNegative, place_aneurysms, place_hard_negatives
from .raster import DistanceField
from .vessel_tree import VesselTree, grow_vessel_tree

__all__ = [
    "GENERATOR_VERSION",
    "LABELS",
    "Phantom",
    "generate_case",
    "generate_geometry",
    "local_diameter",
    "phantom_affine",
    "render_background_only",
    "render_labels",
]

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "2.0.0"
# dataset.json's "labels": names by label value, as strings (JSON keys)
LABELS = {str(label): name for label, name in LABEL_NAMES.items()}


@dataclass
class PhantomGeometry:
    """Everything about a case except its voxels.

    Attributes:
        seed: the case seed.
        centre: acquisition style (its ``shape`` and ``spacing`` define the grid).
        tree: the vessel tree, hard negatives included.
        aneurysms: placed aneurysms (0, 1 or 2).
        hard_negatives: look-alikes drawn as vessel.
    """

    seed: int
    centre: Centre
    tree: VesselTree
    aneurysms: list[Aneurysm]
    hard_negatives: list[HardNegative]

    @property
    def spacing(self) -> np.ndarray:
        return np.asarray(self.centre.spacing, dtype=np.float64)

    def info(self) -> dict:
        """JSON-serialisable description of the geometry."""
        spacing = self.spacing
        kinds: dict[str, int] = {}
        for tube in self.tree.tubes:
            kinds[tube.kind] = kinds.get(tube.kind, 0) + 1
        return {
            "seed": int(self.seed),
            "centre": self.centre.name,
            "generator_version": GENERATOR_VERSION,
            "template": self.tree.template,
            "shape": list(self.centre.shape),
            "spacing": [float(s) for s in self.centre.spacing],
            "num_aneurysms": len(self.aneurysms),
            "aneurysm_diameters_mm": [round(a.size_mm, 3) for a in self.aneurysms],
            "aneurysms": [a.to_info(spacing) for a in self.aneurysms],
            "hard_negatives": [n.to_info(spacing) for n in self.hard_negatives],
            "vessel_length_mm": round(self.tree.length_inside(), 1),
            "tubes": kinds,
            "segments": sorted({t.name for t in self.tree.tubes if t.name}),
            "bifurcations": len(self.tree.bifurcations),
            "loops": len(self.tree.loops),
            "overlapping_loops": sum(loop.overlapping for loop in self.tree.loops),
            "crossings": [round(c.gap_mm, 3) for c in self.tree.crossings],
        }


@dataclass
class Phantom:
    """One rendered case.

    Attributes:
        image: (X, Y, Z) float32 intensities in AU (see :mod:`scripts.data.centres`).
        label: (X, Y, Z) uint8, 0 background, 1 vessel, 2 aneurysm.
        spacing: voxel spacing in mm along (X, Y, Z).
        affine: (4, 4) voxel-to-RAS-world matrix.
        info: JSON-serialisable per-case description (geometry, appearance draws, label counts).
    """

    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    info: dict = field(default_factory=dict)


def phantom_affine(shape, spacing) -> np.ndarray:
    """Diagonal RAS affine with ``spacing`` on the diagonal and the volume centre at the origin."""
    spacing = np.asarray(spacing, dtype=np.float64)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -0.5 * (np.asarray(shape) - 1) * spacing
    return affine


def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    geometry, appearance = np.random.SeedSequence(int(seed)).spawn(2)
    return np.random.default_rng(geometry), np.random.default_rng(appearance)


def generate_geometry(
    seed: int,
    centre: str | Centre = "A",
    size_quantile: float | None = None,
    overlapping_loop: bool = False,
) -> PhantomGeometry:
    """Draw the geometry of case ``seed`` (tree, aneurysms, hard negatives) without rendering voxels.

    Args:
        seed: non-negative integer.
        centre: centre name or a :class:`Centre` (e.g. one with a smaller ``shape`` for quick tests).
        size_quantile: if set, the first aneurysm (if any) takes the size at this quantile of the centre's
            size distribution instead of a random one; the tree and the aneurysm count stay as drawn.
        overlapping_loop: grow the tree so that one of its distal branches coils into a tight, overlapping
            loop (a sac-like hard negative) where a branch thin enough allows it, whatever its template;
            otherwise only the random template tries one (on its side branches, in 40 % of its trees).

    Returns:
        the geometry ``generate_case(seed, centre)`` renders.
    """
    style = get_centre(centre)
    rng, _ = _streams(seed)
    extent = (np.asarray(style.shape) - 1) * np.asarray(style.spacing)
    tree = grow_vessel_tree(rng, extent, force_overlapping_loop=overlapping_loop)
    count = int(rng.choice(len(style.aneurysm_count_probs), p=style.aneurysm_count_probs))
    aneurysms = place_aneurysms(
        rng,
        tree,
        count,
        style.aneurysm_median_mm,
        style.aneurysm_sigma_log,
        style.aneurysm_min_mm,
        style.aneurysm_max_mm,
        first_size_quantile=size_quantile,
    )
    negatives = place_hard_negatives(rng, tree, aneurysms)
    return PhantomGeometry(int(seed), style, tree, aneurysms, negatives)


def render_labels(geometry: PhantomGeometry) -> tuple[np.ndarray, DistanceField, DistanceField]:
    """Rasterise the geometry.

    Returns:
        ``(label, vessel_field, aneurysm_field)``: (X, Y, Z) uint8 labels and the two distance fields.
    """
    style = geometry.centre
    margin = 1.5 * float(max(style.spacing))
    vessels = DistanceField(style.shape, style.spacing, margin=margin)
    for tube in geometry.tree.tubes:
        vessels.add_tube(tube.points, tube.radii, tube.value)
    sacs = DistanceField(style.shape, style.spacing, margin=margin)
    for aneurysm in geometry.aneurysms:
        aneurysm.draw(sacs)

    label = np.full(style.shape, BACKGROUND_LABEL, dtype=np.uint8)
    label[vessels.distance <= 0] = VESSEL_LABEL
    if geometry.aneurysms:
        sac = (sacs.distance <= 0) & (label == BACKGROUND_LABEL)
        label[sac] = ANEURYSM_LABEL
        _drop_orphans(label)
    return label, vessels, sacs


def local_diameter(geometry: PhantomGeometry) -> np.ndarray:
    """Local lumen diameter (mm) of every vessel voxel: twice the radius of the tube that owns the voxel.

    A voxel belongs to the tube whose surface is nearest (deepest inside); the tube's radius there is that
    of the capsule (centreline step) that owns it. Aneurysm sacs are not vessel and get 0.

    Returns:
        (X, Y, Z) float32, 0 outside the vessel label.
    """
    style = geometry.centre
    field = DistanceField(style.shape, style.spacing, margin=float(max(style.spacing)))
    for tube in geometry.tree.tubes:
        for a, b, ra, rb in zip(
            tube.points[:-1], tube.points[1:], tube.radii[:-1], tube.radii[1:], strict=True
        ):
            field.add_capsule(a, b, ra, rb, value=float(ra + rb))
    return np.where(field.distance <= 0, field.value, np.float32(0.0)).astype(np.float32)


def _drop_orphans(label: np.ndarray) -> None:
    """Set aneurysm components that do not touch (26-adjacency) the vessel label to background, in place.

    By construction every sac cuts its parent wall; this only removes sub-voxel-thin appendages that fell
    apart on the grid.
    """
    box = ndimage.find_objects((label == ANEURYSM_LABEL).astype(np.uint8))
    if not box or box[0] is None:
        return
    crop = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box[0])
    sub = label[crop]
    components, count = ndimage.label(sub == ANEURYSM_LABEL, structure=COMPONENT_CONNECTIVITY)
    near_vessel = ndimage.binary_dilation(sub == VESSEL_LABEL, structure=COMPONENT_CONNECTIVITY)
    touching = set(np.unique(components[near_vessel & (components > 0)]).tolist())
    for index in range(1, count + 1):
        if index not in touching:
            sub[components == index] = BACKGROUND_LABEL
            logger.debug("dropped an aneurysm fragment that does not touch the vessel")


def generate_case(
    seed: int,
    centre: str | Centre = "A",
    size_quantile: float | None = None,
    overlapping_loop: bool = False,
) -> Phantom:
    """Generate one synthetic 3DRA case.

    Args:
        seed: non-negative integer; the case is a deterministic function of its arguments.
        centre: centre name (``"A"``, ``"B"``, ``"C"``) or a :class:`Centre`.
        size_quantile: the first aneurysm's size quantile (see :func:`generate_geometry`); default random.
        overlapping_loop: force a tight overlapping loop into the tree (see :func:`generate_geometry`).

    Returns:
        the :class:`Phantom` with image (X, Y, Z) float32, label (X, Y, Z) uint8, spacing, affine, info.

    Raises:
        ValueError: for an unknown centre or a negative seed.
    """
    style = get_centre(centre)
    geometry = generate_geometry(seed, style, size_quantile, overlapping_loop)
    _, appearance_rng = _streams(seed)
    label, vessels, sacs = render_labels(geometry)

    distance = np.minimum(vessels.distance, sacs.distance)
    value = np.where(sacs.distance < vessels.distance, sacs.value, vessels.value)
    extent = (np.asarray(style.shape) - 1) * geometry.spacing
    trunk = geometry.tree.tubes[0]
    inside = [p for p in trunk.points if geometry.tree.inside(p)]
    focus = inside[len(inside) // 2] if inside else extent / 2
    image, appearance = render_intensity(distance, value, style, appearance_rng, extent, focus)

    info = geometry.info()
    if size_quantile is not None:
        info["first_aneurysm_size_quantile"] = float(size_quantile)
    if overlapping_loop:
        info["forced_overlapping_loop"] = True
    info["appearance"] = appearance
    counts = np.bincount(label.ravel(), minlength=3)
    info["label_voxels"] = [int(c) for c in counts[:3]]
    for record, aneurysm in zip(info["aneurysms"], geometry.aneurysms, strict=True):
        record["voxels"] = _count_near(label, aneurysm, geometry.spacing)
    return Phantom(
        image=image.astype(np.float32, copy=False),
        label=label,
        spacing=tuple(float(s) for s in style.spacing),
        affine=phantom_affine(style.shape, style.spacing),
        info=info,
    )


def render_background_only(seed: int, centre: str | Centre = "A") -> tuple[np.ndarray, np.ndarray, dict]:
    """Render case ``seed``'s appearance with no vessels at all: tissue texture, bone, artefacts, noise.

    Uses the same appearance stream as :func:`generate_case` (so the draws are those of the case without its
    lumen), for tests and negative training cases.

    Args:
        seed: non-negative integer.
        centre: centre name or a :class:`Centre`.

    Returns:
        ``(image, label, info)``: (X, Y, Z) float32 image, (X, Y, Z) uint8 label (all 0) and the
        appearance record with ``"background_only": True``.
    """
    style = get_centre(centre)
    _, rng = _streams(seed)
    extent = (np.asarray(style.shape) - 1) * np.asarray(style.spacing)
    distance = np.full(style.shape, 10.0, dtype=np.float32)  # no lumen anywhere
    value = np.zeros(style.shape, dtype=np.float32)
    focus = extent / 2.0
    image, info = render_intensity(distance, value, style, rng, extent, focus)
    info = {"seed": int(seed), "centre": style.name, "background_only": True, "appearance": info}
    return image, np.zeros(style.shape, dtype=np.uint8), info


def _count_near(label: np.ndarray, aneurysm: Aneurysm, spacing: np.ndarray) -> int:
    """Aneurysm-label voxels within ``reach`` of the dome centre."""
    low = np.maximum(np.floor((aneurysm.dome_centre - aneurysm.reach - 1) / spacing), 0).astype(int)
    high = np.ceil((aneurysm.dome_centre + aneurysm.reach + 1) / spacing).astype(int) + 1
    crop = tuple(slice(lo, hi) for lo, hi in zip(low, high, strict=True))
    return int((label[crop] == ANEURYSM_LABEL).sum())
