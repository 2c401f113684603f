"""Saccular aneurysms on a vessel tree, and the look-alikes that are NOT aneurysms (hard negatives).

Aneurysms (label 2) sit at bifurcation apices or on the outer curve of a vessel wall. The dome is an
elongated, bumpy ellipsoid, sometimes with extra lobes and daughter sacs; the neck is where the dome cuts
the parent wall, narrower than the dome by construction (``neck < width``). Dome size (its largest
dimension, the clinical "aneurysm size") is log-normal, truncated to ``[aneurysm_min_mm,
aneurysm_max_mm]`` and to the field of view.

Hard negatives are drawn into the vessel (label 1) and recorded so that tests can check their label:

* ``infundibulum``: a conical widening (< 3 mm at its base) at the origin of a small branch;
* ``fusiform_bulge``: a smooth calibre increase of 15-30 % over a few mm;
* ``wall_bump``: a small saccular bulge (1.2-2.6 mm), below aneurysm size;
* ``overlapping_loop``: a helical loop so tight that its turns merge into one bright blob.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import numpy as np

from .raster import DistanceField
from .vessel_tree import Tube, VesselTree, _perpendicular, _unit

__all__ = ["Aneurysm", "HardNegative", "place_aneurysms", "place_hard_negatives", "sample_aneurysm_size"]

logger = logging.getLogger(__name__)


def _direction_in_cone(rng: np.random.Generator, axis: np.ndarray, min_cos: float) -> np.ndarray:
    """A random unit vector with ``u . axis >= min_cos``."""
    while True:
        u = _unit(rng.standard_normal(3))
        if u @ axis >= min_cos:
            return u


@dataclass
class Aneurysm:
    """One saccular aneurysm (all lengths in mm, points in the volume's mm index frame).

    Attributes:
        kind: ``"bifurcation"`` or ``"sidewall"``.
        tube: parent tube index; ``index`` the centreline point at the neck.
        base: (3,) centreline point at the neck; ``direction`` (3,) unit vector from base to dome.
        dome_centre: (3,) centre of the main dome.
        size_mm: largest dome dimension (the reported aneurysm size).
        width_mm: dome width across ``direction``; ``neck_mm`` neck diameter (< width).
        elongation: dome height / width ratio factor (>= 1).
        bumps: surface harmonics ``(amp, freq, w, phase)`` of the main dome.
        lobes: ``(centre, radius)`` extra lobes; ``daughters``: ``(centre, radius)`` daughter sacs.
        value: relative opacification; ``gradient`` (3,) its change per mm (contrast layering).
    """

    kind: str
    tube: int
    index: int
    base: np.ndarray
    direction: np.ndarray
    dome_centre: np.ndarray
    size_mm: float
    width_mm: float
    neck_mm: float
    elongation: float
    bumps: list = field(default_factory=list)
    lobes: list = field(default_factory=list)
    daughters: list = field(default_factory=list)
    value: float = 1.0
    gradient: np.ndarray | None = None

    @property
    def reach(self) -> float:
        """Radius (mm) around ``dome_centre`` that contains the whole sac."""
        radius = 0.5 * self.width_mm
        bump = sum(abs(b[0]) for b in self.bumps)
        reach = radius * self.elongation * (1.0 + bump)
        for centre, r in [*self.lobes, *self.daughters]:
            reach = max(reach, float(np.linalg.norm(centre - self.dome_centre)) + r)
        return reach

    def clearance(self, points: np.ndarray, bumps: bool = True) -> np.ndarray:
        """Approximate distance (mm) from ``points`` (N, 3) to the sac surface, negative inside; (N,).

        With ``bumps`` the dome is taken at its largest (every harmonic at its peak), else at its mean.
        """
        offset = points - self.dome_centre
        dist = np.linalg.norm(offset, axis=1)
        along = (offset @ self.direction) / np.maximum(dist, 1e-9)
        radius = 0.5 * self.width_mm
        scale = 1.0 / np.sqrt(np.maximum(1.0 - along**2 * (1.0 - 1.0 / self.elongation**2), 1e-6))
        bump = sum(abs(b[0]) for b in self.bumps) if bumps else 0.0
        out = dist - radius * (1.0 + bump) * scale
        for centre, r in [*self.lobes, *self.daughters]:
            out = np.minimum(out, np.linalg.norm(points - centre, axis=1) - r)
        return out

    def draw(self, field: DistanceField) -> None:
        """Rasterise the sac (dome, lobes, daughter sacs) into ``field``."""
        radius = 0.5 * self.width_mm
        field.add_dome(
            self.dome_centre,
            radius,
            self.direction,
            self.elongation,
            self.bumps,
            value=self.value,
            gradient=self.gradient,
        )
        for centre, r in [*self.lobes, *self.daughters]:
            field.add_dome(centre, r, value=self.value)

    def to_info(self, spacing: np.ndarray) -> dict:
        """JSON-serialisable summary; voxel indices are (X, Y, Z)."""
        return {
            "kind": self.kind,
            "size_mm": round(self.size_mm, 3),
            "width_mm": round(self.width_mm, 3),
            "neck_mm": round(self.neck_mm, 3),
            "elongation": round(self.elongation, 3),
            "lobes": len(self.lobes),
            "daughter_sacs": len(self.daughters),
            "reach_mm": round(self.reach, 3),
            "dome_centre_mm": [round(float(c), 3) for c in self.dome_centre],
            "dome_centre_voxel": [int(round(c / s)) for c, s in zip(self.dome_centre, spacing, strict=True)],
            "neck_centre_voxel": [
                int(round(c / s))
                for c, s in zip(self.base + self.direction * 0.5 * self.neck_mm, spacing, strict=True)
            ],
        }


@dataclass
class HardNegative:
    """A look-alike drawn as vessel (label 1).

    Attributes:
        kind: ``"infundibulum"``, ``"fusiform_bulge"``, ``"wall_bump"`` or ``"overlapping_loop"``.
        centre: (3,) a point well inside its lumen (mm).
        radius: radius (mm) around ``centre`` containing the whole structure.
        size_mm: its largest width in mm.
    """

    kind: str
    centre: np.ndarray
    radius: float
    size_mm: float

    def to_info(self, spacing: np.ndarray) -> dict:
        return {
            "kind": self.kind,
            "size_mm": round(self.size_mm, 3),
            "radius_mm": round(self.radius, 3),
            "centre_mm": [round(float(c), 3) for c in self.centre],
            "centre_voxel": [int(round(c / s)) for c, s in zip(self.centre, spacing, strict=True)],
        }


def sample_aneurysm_size(
    rng: np.random.Generator, median: float, sigma_log: float, low: float, high: float
) -> float:
    """Log-normal dome size truncated to ``[low, high]`` mm (by rejection, so no pile-up at the bounds)."""
    if not 0 < low < high:
        raise ValueError(f"need 0 < low < high, got low={low}, high={high}.")
    for _ in range(1000):
        size = float(median * np.exp(sigma_log * rng.standard_normal()))
        if low <= size <= high:
            return size
    return float(np.clip(median, low, high))


class _Placer:
    """Finds sites for aneurysms and hard negatives that keep them apart and inside the field of view."""

    def __init__(self, rng: np.random.Generator, tree: VesselTree):
        self.rng = rng
        self.tree = tree
        self.points = [t.points for t in tree.tubes]
        self.radii = [t.radii for t in tree.tubes]
        self.aneurysms: list[Aneurysm] = []
        self.negatives: list[HardNegative] = []

    # ----------------------------------------------------------------------------------------- aneurysms
    def sites(self, size: float) -> list[tuple[str, int, int]]:
        """Candidate ``(kind, tube, index)`` sites for a ``size`` mm dome.

        Bigger domes need bigger parents (radius >= 0.9 mm + 0.06 per mm of dome above 3 mm); dim passing
        vessels (another territory, poorly opacified) are skipped.
        """
        tree, out = self.tree, []
        need = 0.9 + 0.06 * max(size - 3.0, 0.0)
        for bif in tree.bifurcations:
            t1, t2 = (tree.tubes[c].tangents[min(2, len(tree.tubes[c].points) - 1)] for c in bif.children)
            wide = t1 @ t2 < np.cos(np.deg2rad(90.0))  # apex aneurysms need room between the branches
            if wide and bif.radius >= need and tree.inside(bif.point, margin=2.0):
                out.append(("bifurcation", bif.tube, len(tree.tubes[bif.tube].points) - 1))
        for t, tube in enumerate(tree.tubes):
            if tube.kind == "passing" and tube.value < 0.85:
                continue
            s = tube.arclength
            for j in range(0, len(tube.points), 3):
                if (
                    tube.radii[j] >= need
                    and 3.0 < s[j] < s[-1] - 3.0
                    and tree.inside(tube.points[j], margin=2.0)
                ):
                    out.append(("sidewall", t, j))
        return out

    def make_aneurysm(self, kind: str, t: int, j: int, size: float) -> Aneurysm:
        rng, tube = self.rng, self.tree.tubes[t]
        base = tube.points[j]
        r_vessel = float(tube.radii[j])
        if kind == "bifurcation":
            bif = next(b for b in self.tree.bifurcations if b.tube == t)
            # at the apex: between the two branches, in line with the parent's flow jet
            apex = _unit(sum(self.tree.tubes[c].tangents[2] for c in bif.children))
            direction = _unit(apex + 0.3 * bif.direction + 0.15 * rng.standard_normal(3))
            wall = r_vessel
        else:
            tangent = tube.tangents[j]
            lo, hi = max(j - 3, 0), min(j + 3, len(tube.points) - 1)
            curvature = tube.tangents[hi] - tube.tangents[lo]
            curvature -= (curvature @ tangent) * tangent
            if np.linalg.norm(curvature) > 0.15:
                direction = _unit(-curvature + 0.3 * _perpendicular(rng, tangent))  # outer curve
            else:
                direction = _perpendicular(rng, tangent)
            direction = _unit(direction - (direction @ tangent) * tangent)
            wall = r_vessel
        elongation = rng.uniform(1.0, 1.45)
        radius = 0.5 * size / elongation
        neck = min(rng.uniform(0.45, 0.85) * radius, 1.5 * r_vessel + 0.4)
        # keep the sac out of the far wall: it reaches elongation * (radius - h) into the parent
        while elongation * (radius - np.sqrt(radius**2 - neck**2)) > 0.8 * r_vessel and neck > 0.3 * radius:
            neck *= 0.9
        h = np.sqrt(radius**2 - neck**2)
        centre = base + direction * (wall + elongation * h)
        bumps = [
            (
                rng.uniform(0.03, 0.07),
                rng.uniform(2.0, 5.0),
                _unit(rng.standard_normal(3)),
                rng.uniform(0, 2 * np.pi),
            )
            for _ in range(int(rng.integers(2, 5)))
        ]
        lobes, daughters = [], []
        for _ in range(int(rng.choice([0, 1, 2], p=[0.35, 0.4, 0.25]))):
            u = _direction_in_cone(rng, direction, 0.3)
            along = u @ direction
            r_dir = radius / np.sqrt(max(1.0 - along**2 * (1.0 - 1.0 / elongation**2), 1e-6))
            r_lobe = rng.uniform(0.4, 0.6) * radius
            lobes.append((centre + u * (r_dir - r_lobe * rng.uniform(0.3, 0.7)), r_lobe))
        if rng.random() < 0.35:
            u = _direction_in_cone(rng, direction, 0.2)
            along = u @ direction
            r_dir = radius / np.sqrt(max(1.0 - along**2 * (1.0 - 1.0 / elongation**2), 1e-6))
            r_bleb = max(0.5, rng.uniform(0.18, 0.32) * radius)
            daughters.append((centre + u * (r_dir + 0.2 * r_bleb), r_bleb))
        gradient = _unit(rng.standard_normal(3)) * rng.uniform(0.0, 0.2) / (radius * elongation)
        return Aneurysm(
            kind=kind,
            tube=t,
            index=j,
            base=base.copy(),
            direction=direction,
            dome_centre=centre,
            size_mm=float(size),
            width_mm=float(2 * radius),
            neck_mm=float(2 * neck),
            elongation=float(elongation),
            bumps=bumps,
            lobes=lobes,
            daughters=daughters,
            value=float(tube.value * rng.uniform(0.88, 1.03)),
            gradient=gradient,
        )

    def fits(self, an: Aneurysm) -> bool:
        tree, reach = self.tree, an.reach
        if not tree.inside(an.dome_centre, margin=reach + 0.5):
            return False
        for other in self.aneurysms:
            if np.linalg.norm(other.dome_centre - an.dome_centre) < reach + other.reach + 1.5:
                return False
        for loop in tree.loops:
            if (
                np.linalg.norm(loop.centre - an.dome_centre)
                < reach + loop.loop_radius + loop.vessel_radius + 1.0
            ):
                return False
        # vessels may touch the sac but never run through it: far vessels keep their lumen out of the
        # sac, nearby branches (arising at the neck) and the parent keep their centrelines out
        geodesic = tree.geodesic(an.tube, an.index)
        local = an.size_mm + 3.0
        r_base = float(tree.tubes[an.tube].radii[an.index])
        for t, (pts, rad, geo) in enumerate(zip(self.points, self.radii, geodesic, strict=True)):
            if not np.any(np.linalg.norm(pts - an.dome_centre, axis=1) - rad < reach + 0.5):
                continue
            far = geo > local
            outside = an.clearance(pts, bumps=False)
            if np.any(outside[far] - rad[far] < 0.2):
                return False
            near = ~far & (geo > r_base)
            if t != an.tube and np.any(outside[near] < 0.25 * rad[near]):
                return False
            if np.any(outside[~far] < 0.1):
                return False
        return True

    def _pick(self, pool: list[tuple[str, int, int]]) -> tuple[str, int, int]:
        """A site, favouring the middle of the field of view (3DRA is centred on the lesion)."""
        points = np.array([self.tree.tubes[t].points[j] for _, t, j in pool])
        spread = 0.3 * float(self.tree.extent.min())
        weight = np.exp(-0.5 * np.sum((points - self.tree.extent / 2) ** 2, axis=1) / spread**2)
        return pool[int(self.rng.choice(len(pool), p=weight / weight.sum()))]

    def _recentre(self, an: Aneurysm) -> np.ndarray | None:
        """Shift (mm) that brings ``an``'s sac into the field of view, ``None`` if it cannot fit.

        3DRA is acquired centred on the lesion, so the first aneurysm may move the whole tree by up to a
        quarter of the field of view.
        """
        need = an.reach + 0.5
        low = np.clip(need - an.dome_centre, 0.0, None)
        high = np.clip(an.dome_centre + need - self.tree.extent, 0.0, None)
        if np.any((low > 0) & (high > 0)):
            return None
        shift = low - high
        return shift if np.abs(shift).max() <= 0.25 * float(self.tree.extent.min()) else None

    def place_aneurysms(self, sizes: list[float], min_size: float) -> None:
        for size in sorted(sizes, reverse=True):  # the largest first: it may recentre the field of view
            placed = False
            for attempt in range(120):
                if attempt % 40 == 0:
                    if attempt:
                        size = max(min_size, 0.85 * size)
                    sites = self.sites(size)
                    bif_sites = [s for s in sites if s[0] == "bifurcation"]
                    wall_sites = [s for s in sites if s[0] == "sidewall"]
                if not sites:
                    continue
                pool = bif_sites if bif_sites and self.rng.random() < 0.6 else (wall_sites or bif_sites)
                kind, t, j = self._pick(pool)
                an = self.make_aneurysm(kind, t, j, size)
                shift = self._recentre(an) if not self.aneurysms else None
                if shift is not None and np.any(shift != 0):
                    self.tree.translate(shift)
                    an = self.make_aneurysm_shifted(an, shift)
                    if self.fits(an):
                        self.aneurysms.append(an)
                        placed = True
                        break
                    self.tree.translate(-shift)
                elif self.fits(an):
                    self.aneurysms.append(an)
                    placed = True
                    break
            if not placed:
                logger.debug("could not place a %.1f mm aneurysm; case keeps %d", size, len(self.aneurysms))

    @staticmethod
    def make_aneurysm_shifted(an: Aneurysm, shift: np.ndarray) -> Aneurysm:
        """``an`` moved by ``shift`` mm."""
        return dataclasses.replace(
            an,
            base=an.base + shift,
            dome_centre=an.dome_centre + shift,
            lobes=[(c + shift, r) for c, r in an.lobes],
            daughters=[(c + shift, r) for c, r in an.daughters],
        )

    # ------------------------------------------------------------------------------------ hard negatives
    def clear_of_aneurysms(self, centre: np.ndarray, radius: float) -> bool:
        if not self.tree.inside(centre, margin=max(radius, 1.0)):
            return False
        return all(
            np.linalg.norm(a.dome_centre - centre) > a.reach + radius + 1.0 for a in self.aneurysms
        ) and all(np.linalg.norm(a.base - centre) > 0.5 * a.neck_mm + radius + 1.5 for a in self.aneurysms)

    def clear_of_negatives(self, centre: np.ndarray, radius: float) -> bool:
        return all(np.linalg.norm(n.centre - centre) > n.radius + radius + 0.5 for n in self.negatives)

    def add_infundibulum(self) -> bool:
        rng, tree = self.rng, self.tree
        options = [
            i
            for i, tube in enumerate(tree.tubes)
            if tube.parent is not None
            and tube.kind in ("side", "branch")
            and tube.radii[0] <= 0.9
            and tree.tubes[tube.parent].radii[tube.parent_index] >= tube.radii[0] + 0.3
        ]
        rng.shuffle(options)
        for i in options:
            tube = tree.tubes[i]
            parent_r = float(tree.tubes[tube.parent].radii[tube.parent_index])
            origin, d = tube.points[0], tube.tangents[0]
            r_tip = float(tube.radii[0])
            r_base = rng.uniform(max(1.35 * r_tip, 0.75), 1.4)
            length = rng.uniform(1.2, 2.5)
            a = origin + d * 0.7 * parent_r
            b = origin + d * (parent_r + length)
            centre = origin + d * (parent_r + 0.3 * length)
            radius = max(np.linalg.norm(a - centre) + r_base, np.linalg.norm(b - centre) + r_tip)
            if self.clear_of_aneurysms(centre, radius) and self.clear_of_negatives(centre, radius):
                tree.tubes.append(
                    Tube(
                        np.stack([a, b]),
                        np.array([r_base, r_tip]),
                        "infundibulum",
                        tube.generation,
                        tube.value,
                    )
                )
                self.negatives.append(HardNegative("infundibulum", centre, float(radius), float(2 * r_base)))
                return True
        return False

    def _wall_points(self, r_low: float, r_high: float) -> list[tuple[int, int]]:
        out = []
        for t, tube in enumerate(self.tree.tubes):
            if tube.kind not in ("trunk", "branch", "side", "passing"):
                continue
            s = tube.arclength
            for j in range(0, len(tube.points), 2):
                if r_low <= tube.radii[j] <= r_high and 2.5 < s[j] < s[-1] - 2.5:
                    out.append((t, j))
        return out

    def add_fusiform_bulge(self) -> bool:
        rng = self.rng
        options = self._wall_points(0.7, 1.1)
        for _ in range(20):
            if not options:
                return False
            t, j = options[int(rng.integers(len(options)))]
            tube = self.tree.tubes[t]
            amount, width = rng.uniform(0.15, 0.3), rng.uniform(1.5, 3.0)
            r_peak = float(tube.radii[j]) * (1 + amount)
            centre = tube.points[j].copy()
            radius = r_peak + width
            if self.clear_of_aneurysms(centre, radius) and self.clear_of_negatives(centre, radius):
                s = tube.arclength
                tube.radii = tube.radii * (1.0 + amount * np.exp(-(((s - s[j]) / width) ** 2)))
                self.negatives.append(
                    HardNegative("fusiform_bulge", centre, float(radius), float(2 * r_peak))
                )
                return True
        return False

    def add_wall_bump(self) -> bool:
        rng = self.rng
        options = self._wall_points(0.8, 2.5)
        for _ in range(20):
            if not options:
                return False
            t, j = options[int(rng.integers(len(options)))]
            tube = self.tree.tubes[t]
            r_bump = rng.uniform(0.6, 1.3)
            normal = _perpendicular(rng, tube.tangents[j])
            centre = tube.points[j] + normal * (tube.radii[j] + 0.1 * r_bump)
            if self.clear_of_aneurysms(centre, r_bump) and self.clear_of_negatives(centre, r_bump):
                pts = np.stack([tube.points[j] + normal * 0.5 * tube.radii[j], centre])
                self.tree.tubes.append(
                    Tube(pts, np.array([0.8 * r_bump, r_bump]), "wall_bump", tube.generation, tube.value)
                )
                self.negatives.append(HardNegative("wall_bump", centre, float(r_bump), float(2 * r_bump)))
                return True
        return False

    def add_overlapping_loops(self) -> None:
        for loop in self.tree.loops:
            if not loop.overlapping:
                continue
            tube = self.tree.tubes[loop.tube]
            mid = (loop.start + loop.stop) // 2
            point = tube.points[mid]
            radius = (
                float(np.linalg.norm(point - loop.centre))
                + loop.loop_radius
                + loop.vessel_radius
                + loop.pitch
            )
            size = 2 * (loop.loop_radius + loop.vessel_radius)
            if self.tree.inside(point, margin=1.0) and self.clear_of_aneurysms(point, radius):
                self.negatives.append(HardNegative("overlapping_loop", point.copy(), radius, float(size)))


def place_aneurysms(
    rng: np.random.Generator,
    tree: VesselTree,
    count: int,
    median_mm: float,
    sigma_log: float,
    min_mm: float,
    max_mm: float,
) -> list[Aneurysm]:
    """Place ``count`` aneurysms (fewer if the tree has no room) on ``tree``.

    Args:
        rng: random generator.
        tree: the vessel tree (not modified).
        count: how many to try.
        median_mm, sigma_log, min_mm, max_mm: size distribution (see :func:`sample_aneurysm_size`);
            ``max_mm`` is further capped at 0.45 of the smallest field-of-view side.

    Returns:
        the placed aneurysms.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}.")
    high = min(max_mm, 0.45 * float(np.min(tree.extent)))
    if high <= min_mm:
        raise ValueError(f"field of view {tree.extent.tolist()} mm is too small for {min_mm} mm aneurysms.")
    sizes = [sample_aneurysm_size(rng, median_mm, sigma_log, min_mm, high) for _ in range(count)]
    placer = _Placer(rng, tree)
    placer.place_aneurysms(sizes, min_mm)
    return placer.aneurysms


def place_hard_negatives(
    rng: np.random.Generator, tree: VesselTree, aneurysms: list[Aneurysm]
) -> list[HardNegative]:
    """Add look-alikes to ``tree`` (in place: new tubes, wider radii) away from ``aneurysms``.

    Every case gets at least one when the tree has room: 1-2 infundibula, 0-2 fusiform bulges,
    0-2 wall bumps, and every overlapping loop the tree grew.

    Returns:
        the hard negatives, each drawn as vessel.
    """
    placer = _Placer(rng, tree)
    placer.aneurysms = list(aneurysms)
    placer.add_overlapping_loops()
    for _ in range(int(rng.integers(1, 3))):
        placer.add_infundibulum()
    for _ in range(int(rng.integers(0, 3))):
        placer.add_fusiform_bulge()
    for _ in range(int(rng.integers(0, 3))):
        placer.add_wall_bump()
    if not placer.negatives:
        placer.add_wall_bump() or placer.add_infundibulum()
    return placer.negatives
