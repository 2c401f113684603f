"""Saccular aneurysms on a vessel tree, and the look-alikes that are NOT aneurysms (hard negatives).

Aneurysms (label 2) sit where real ones do (ISUIA 2003, UCAS Japan 2012): at the apex of the MCA
bifurcation, the basilar tip, the ACom/A1-A2 junction and the ICA terminus, and on the outer curve of a
bend (ICA side wall, e.g. on the siphon, or another artery); ``location`` names the site. The dome is an
elongated, bumpy ellipsoid, sometimes with extra lobes and daughter sacs. Dome size (its largest
dimension, the clinical "aneurysm size") is log-normal, truncated to ``[aneurysm_min_mm,
aneurysm_max_mm]`` and to the field of view; bigger domes need wider parents. The neck is drawn from the
dome-to-neck ratio ``size / neck`` (0.8-3, Parlea et al. 1999), so some necks are wider than the dome:
where the dome's own cut through the wall is narrower than the neck, a collar along the parent wall
("neck ridge", a tube of radius below the parent's lying on its wall) widens the neck to its full size.

Hard negatives are drawn into the vessel (label 1) and recorded so that tests can check their label:

* ``infundibulum``: a conical widening (< 3 mm at its base) at the origin of a small branch;
* ``fusiform_bulge``: a smooth calibre increase of 15-30 % over a few mm;
* ``wall_bump``: a small saccular bulge (1.2-2.6 mm), below aneurysm size;
* ``overlapping_loop``: a helical loop so tight that its turns merge into one bright blob;
* wide, curved and branching normal anatomy recorded by the templates (:class:`Landmark`):
  ``siphon_bend`` (the ICA genu whose limbs pass close to each other), ``tortuous_basilar``,
  ``vertebrobasilar_junction`` and ``ica_terminus`` (only where no aneurysm sits there).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

from .raster import DistanceField
from .vectors import perpendicular, unit
from .vessel_tree import Tube, VesselTree

__all__ = [
    "LOCATIONS",
    "Aneurysm",
    "HardNegative",
    "aneurysm_size_at",
    "place_aneurysms",
    "place_hard_negatives",
    "sample_aneurysm_size",
]

logger = logging.getLogger(__name__)

# relative frequency of each site when the tree offers it (ISUIA / UCAS: MCA ~36 %, ICA ~34 %, ACom ~16 %,
# basilar tip ~7 % of all aneurysms; the basilar tip dominates in posterior-circulation cases)
LOCATIONS = {
    "mca_bifurcation": 3.0,
    "ica_sidewall": 3.0,
    "acom": 2.5,
    "basilar_tip": 3.0,
    "ica_terminus": 1.0,
    "other_bifurcation": 1.0,
    "other_sidewall": 0.7,
}
_NAMED_SITES = ("mca_bifurcation", "basilar_tip", "acom", "ica_terminus")


def _direction_in_cone(rng: np.random.Generator, axis: np.ndarray, min_cos: float) -> np.ndarray:
    """A random unit vector with ``u . axis >= min_cos``."""
    while True:
        u = unit(rng.standard_normal(3))
        if u @ axis >= min_cos:
            return u


@dataclass
class Aneurysm:
    """One saccular aneurysm (all lengths in mm, points in the volume's mm index frame).

    Attributes:
        kind: ``"bifurcation"`` or ``"sidewall"``.
        tube: parent tube index; ``index`` the centreline point at the neck.
        location: anatomical site, one of :data:`LOCATIONS`.
        base: (3,) centreline point at the neck; ``direction`` (3,) unit vector from base to dome.
        dome_centre: (3,) centre of the main dome.
        size_mm: largest dome dimension (the reported aneurysm size).
        width_mm: dome width across ``direction``; ``neck_mm`` neck width (largest dimension of the neck).
        elongation: dome height / width ratio factor (>= 1).
        bumps: surface harmonics ``(amp, freq, w, phase)`` of the main dome.
        lobes: ``(centre, radius)`` extra lobes; ``daughters``: ``(centre, radius)`` daughter sacs.
        value: relative opacification; ``gradient`` (3,) its change per mm (contrast layering).
        parent_radius: lumen radius (mm) of the parent at the neck.
        ridge: (K, 3) axis of the neck collar along the parent wall (``None`` when the dome's own cut is the
            whole neck); ``ridge_radius`` its radius in mm.
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
    location: str = "other_sidewall"
    parent_radius: float = 1.0
    ridge: np.ndarray | None = None
    ridge_radius: float = 0.0

    @property
    def dome_neck_ratio(self) -> float:
        """Dome size over neck width (< 2 is a wide neck; < 1 a dome no wider than its neck)."""
        return self.size_mm / self.neck_mm

    @property
    def reach(self) -> float:
        """Radius (mm) around ``dome_centre`` that contains the whole sac."""
        radius = 0.5 * self.width_mm
        bump = sum(abs(b[0]) for b in self.bumps)
        reach = radius * self.elongation * (1.0 + bump)
        for centre, r in [*self.lobes, *self.daughters]:
            reach = max(reach, float(np.linalg.norm(centre - self.dome_centre)) + r)
        if self.ridge is not None:
            far = np.linalg.norm(self.ridge - self.dome_centre, axis=1).max()
            reach = max(reach, float(far) + self.ridge_radius)
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
        if self.ridge is not None:
            for a, b in zip(self.ridge[:-1], self.ridge[1:], strict=True):
                ab = b - a
                t = np.clip((points - a) @ ab / max(float(ab @ ab), 1e-12), 0.0, 1.0)
                near = a + t[:, None] * ab
                out = np.minimum(out, np.linalg.norm(points - near, axis=1) - self.ridge_radius)
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
        if self.ridge is not None:
            field.add_tube(self.ridge, np.full(len(self.ridge), self.ridge_radius), value=self.value)

    def to_info(self, spacing: np.ndarray) -> dict:
        """JSON-serialisable summary; voxel indices are (X, Y, Z)."""
        return {
            "kind": self.kind,
            "location": self.location,
            "size_mm": round(self.size_mm, 3),
            "width_mm": round(self.width_mm, 3),
            "neck_mm": round(self.neck_mm, 3),
            "dome_neck_ratio": round(self.dome_neck_ratio, 3),
            "parent_diameter_mm": round(2 * self.parent_radius, 3),
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


def aneurysm_size_at(quantile: float, median: float, sigma_log: float, low: float, high: float) -> float:
    """The dome size (mm) at ``quantile`` (0 < q < 1) of :func:`sample_aneurysm_size`'s truncated log-normal."""
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be between 0 and 1 (exclusive), got {quantile!r}.")
    if not 0 < low < high:
        raise ValueError(f"need 0 < low < high, got low={low}, high={high}.")
    normal = NormalDist()
    below, up_to = (normal.cdf(math.log(bound / median) / sigma_log) for bound in (low, high))
    return float(median * math.exp(sigma_log * normal.inv_cdf(below + quantile * (up_to - below))))


def _dome_radius_towards(u: np.ndarray, direction: np.ndarray, radius: float, elongation: float) -> float:
    """Distance (mm) from a smooth dome's centre to its surface along the unit vector ``u``.

    The dome is a sphere of ``radius`` mm stretched by ``elongation`` along ``direction``.
    """
    cos = u @ direction
    return radius / np.sqrt(max(1.0 - cos**2 * (1.0 - 1.0 / elongation**2), 1e-6))


@dataclass
class _Neck:
    """How a dome meets its parent wall (mm).

    Attributes:
        width: neck width (its largest dimension).
        depth: distance from the wall to the dome's centre, before the dome's elongation.
        ridge: (K, 3) axis of the neck collar, ``None`` (default) when the dome's own cut is the whole neck.
        ridge_radius: the collar's radius (default 0).
    """

    width: float
    depth: float
    ridge: np.ndarray | None = None
    ridge_radius: float = 0.0


@dataclass
class _Placer:
    """Finds sites for aneurysms and hard negatives that keep them apart and inside the field of view.

    Attributes:
        rng: random generator.
        tree: the vessel tree; placing hard negatives adds tubes and widens radii.
        aneurysms: aneurysms placed so far (default none).
        negatives: hard negatives placed so far (default none).
        points, radii: the tubes' (N, 3) centrelines and (N,) radii when the placer was made.
    """

    rng: np.random.Generator
    tree: VesselTree
    aneurysms: list[Aneurysm] = field(default_factory=list)
    negatives: list[HardNegative] = field(default_factory=list)
    points: list[np.ndarray] = field(init=False)
    radii: list[np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        self.points = [t.points for t in self.tree.tubes]
        self.radii = [t.radii for t in self.tree.tubes]

    # ----------------------------------------------------------------------------------------- aneurysms
    def sites(self, size: float) -> dict[str, list[tuple[str, int, int]]]:
        """Candidate ``(kind, tube, index)`` sites for a ``size`` mm dome, grouped by location.

        Bigger domes need wider parents (radius >= 0.6 mm + 0.06 per mm of dome above 3 mm); apex sites need
        room between the branches; ICA side-wall sites are on bends (the outer curve) or at the PComm
        origin; dim passing vessels (another territory, poorly opacified) are skipped.
        """
        tree, out = self.tree, {name: [] for name in LOCATIONS}
        need = 0.6 + 0.06 * max(size - 3.0, 0.0)
        for bif in tree.bifurcations:
            t1, t2 = (tree.tubes[c].tangents[min(2, len(tree.tubes[c].points) - 1)] for c in bif.children)
            named = bif.name in _NAMED_SITES
            wide = t1 @ t2 < np.cos(np.deg2rad(60.0 if named else 90.0))
            if wide and bif.radius >= need and tree.inside(bif.point, margin=2.0):
                location = bif.name if named else "other_bifurcation"
                out[location].append(("bifurcation", bif.tube, len(tree.tubes[bif.tube].points) - 1))
        for t, tube in enumerate(tree.tubes):
            if tube.kind == "passing" and tube.value < 0.85:
                continue
            s = tube.arclength
            tangents = tube.tangents
            origins = [c.parent_index for c in tree.tubes if c.parent == t and c.name == "pcomm"]
            for j in range(0, len(tube.points), 3):
                if not (
                    tube.radii[j] >= need
                    and 3.0 < s[j] < s[-1] - 3.0
                    and tree.inside(tube.points[j], margin=2.0)
                ):
                    continue
                if tube.name == "ica":
                    lo, hi = max(j - 3, 0), min(j + 3, len(tube.points) - 1)
                    bend = np.linalg.norm(tangents[hi] - tangents[lo])
                    if bend > 0.3 or any(abs(j - o) <= 3 for o in origins):
                        out["ica_sidewall"].append(("sidewall", t, j))
                else:
                    out["other_sidewall"].append(("sidewall", t, j))
        return {name: pool for name, pool in out.items() if pool}

    def _neck(self, size: float) -> float:
        """Neck width (mm) from a dome-to-neck ratio: log-normal, median 1.6, within ``[0.8, 3]``, neck <= 8 mm."""
        low = max(0.8, size / 8.0)
        for _ in range(100):
            ratio = 1.6 * np.exp(0.35 * self.rng.standard_normal())
            if low <= ratio <= 3.0:
                return size / ratio
        return size / max(low, 1.6)

    def make_aneurysm(self, kind: str, location: str, t: int, j: int, size: float) -> Aneurysm:
        """Draw a ``size`` mm aneurysm of ``kind`` at point ``j`` of tube ``t`` (not checked for room).

        Phases, in the order they draw from ``rng``: the dome's direction, its elongation and neck, its
        surface (bumps, lobes, daughter sacs), its contrast gradient, its opacification.
        """
        rng, tube = self.rng, self.tree.tubes[t]
        base = tube.points[j]
        r_vessel = float(tube.radii[j])
        direction, along, spread = self._orientation(kind, t, j)
        elongation = rng.uniform(1.0, 1.45)
        radius = 0.5 * size / elongation
        neck = self._fit_neck(kind, t, j, size, radius, elongation, direction, along, spread)
        centre = base + direction * (r_vessel + elongation * neck.depth)
        bumps, lobes, daughters = self._surface(centre, direction, radius, elongation)
        gradient = unit(rng.standard_normal(3)) * rng.uniform(0.0, 0.2) / (radius * elongation)
        return Aneurysm(
            kind=kind,
            tube=t,
            index=j,
            base=base.copy(),
            direction=direction,
            dome_centre=centre,
            size_mm=float(size),
            width_mm=float(2 * radius),
            neck_mm=float(neck.width),
            elongation=float(elongation),
            bumps=bumps,
            lobes=lobes,
            daughters=daughters,
            value=float(tube.value * rng.uniform(0.88, 1.03)),
            gradient=gradient,
            location=location,
            parent_radius=r_vessel,
            ridge=neck.ridge,
            ridge_radius=float(neck.ridge_radius),
        )

    def _orientation(self, kind: str, t: int, j: int) -> tuple[np.ndarray, np.ndarray, float]:
        """Where a dome at point ``j`` of tube ``t`` points.

        Returns:
            ``(direction, along, spread)``: (3,) unit vector from the neck to the dome, (3,) unit vector along
            which the neck spreads on the wall, and (apex only, else 0) the angle of each branch from the apex.
        """
        rng, tube = self.rng, self.tree.tubes[t]
        if kind == "bifurcation":
            bif = next(b for b in self.tree.bifurcations if b.tube == t)
            # at the apex: between the two branches, in line with the parent's flow jet
            t1, t2 = (self.tree.tubes[c].tangents[2] for c in bif.children)
            apex = unit(t1 + t2)
            direction = unit(apex + 0.1 * bif.direction + 0.05 * rng.standard_normal(3))
            along = unit(t1 - t2)  # the neck spreads onto both branches
            spread = 0.5 * np.arccos(np.clip(t1 @ t2, -1.0, 1.0))  # angle of each branch from the apex
            return direction, along, spread
        tangent = tube.tangents[j]
        lo, hi = max(j - 3, 0), min(j + 3, len(tube.points) - 1)
        curvature = tube.tangents[hi] - tube.tangents[lo]
        curvature -= (curvature @ tangent) * tangent
        if np.linalg.norm(curvature) > 0.15:
            direction = unit(-curvature + 0.3 * perpendicular(rng, tangent))  # outer curve
        else:
            direction = perpendicular(rng, tangent)
        direction = unit(direction - (direction @ tangent) * tangent)
        return direction, tangent, 0.0

    def _fit_neck(
        self,
        kind: str,
        t: int,
        j: int,
        size: float,
        radius: float,
        elongation: float,
        direction: np.ndarray,
        along: np.ndarray,
        spread: float,
    ) -> _Neck:
        """Draw the neck width and fit the dome's cut through the wall and, where that is narrower, a collar."""
        wall = float(self.tree.tubes[t].radii[j])
        neck_mm = self._neck(size)
        # the dome's own cut through the wall; it must not reach through the far wall of the parent
        half = min(0.5 * neck_mm, 0.85 * radius, 1.5 * wall + 0.4)
        ridge_half = 0.5 * neck_mm
        if kind == "bifurcation":
            # lift the dome off the carina until the branches clear it, and keep the collar off their axes
            across = radius * (1.0 + 0.6 * (elongation - 1.0)) + 0.3  # the dome's half-width towards a branch
            lift = (across / max(np.sin(spread), 0.2) - wall) / elongation
            half = min(half, np.sqrt(max(radius**2 - min(lift, 0.98 * radius) ** 2, 0.0)))
            ridge_half = min(ridge_half, max(0.45 * wall - 0.15, 0.0) * np.tan(min(spread, 1.4)) + 0.5 * wall)
        while elongation * (radius - np.sqrt(radius**2 - half**2)) > 0.8 * wall and half > 0.3 * radius:
            half *= 0.9
        depth = np.sqrt(radius**2 - half**2)
        if ridge_half <= half + 0.05:
            return _Neck(width=2 * half, depth=depth)
        ridge_radius = min((0.5 if kind == "bifurcation" else 0.7) * wall, radius, ridge_half)
        ridge = self._ridge(kind, t, j, direction, along, ridge_half - ridge_radius)
        return _Neck(width=2 * ridge_half, depth=depth, ridge=ridge, ridge_radius=ridge_radius)

    def _surface(
        self, centre: np.ndarray, direction: np.ndarray, radius: float, elongation: float
    ) -> tuple[list, list, list]:
        """Draw the dome's surface harmonics, its 0-2 extra lobes and (35 %) a daughter sac.

        Returns:
            ``(bumps, lobes, daughters)`` as :class:`Aneurysm` stores them.
        """
        rng = self.rng
        bumps = [
            (
                rng.uniform(0.03, 0.07),
                rng.uniform(2.0, 5.0),
                unit(rng.standard_normal(3)),
                rng.uniform(0, 2 * np.pi),
            )
            for _ in range(int(rng.integers(2, 5)))
        ]
        lobes, daughters = [], []
        for _ in range(int(rng.choice([0, 1, 2], p=[0.35, 0.4, 0.25]))):
            u = _direction_in_cone(rng, direction, 0.3)
            r_dir = _dome_radius_towards(u, direction, radius, elongation)
            r_lobe = rng.uniform(0.4, 0.6) * radius
            lobes.append((centre + u * (r_dir - r_lobe * rng.uniform(0.3, 0.7)), r_lobe))
        if rng.random() < 0.35:
            u = _direction_in_cone(rng, direction, 0.2)
            r_dir = _dome_radius_towards(u, direction, radius, elongation)
            r_bleb = max(0.5, rng.uniform(0.18, 0.32) * radius)
            daughters.append((centre + u * (r_dir + 0.2 * r_bleb), r_bleb))
        return bumps, lobes, daughters

    def _ridge(
        self, kind: str, t: int, j: int, direction: np.ndarray, along: np.ndarray, half: float
    ) -> np.ndarray:
        """(K, 3) axis of a neck collar of half-length ``half`` mm lying on the parent wall at the neck.

        On a side wall it follows the parent's centreline, offset onto the wall on the dome's side; at an
        apex it is a straight segment across the carina, along ``along``.
        """
        tube = self.tree.tubes[t]
        wall_point = tube.points[j] + direction * tube.radii[j]
        if kind == "bifurcation" or half < 0.6:
            return np.stack([wall_point - along * half, wall_point + along * half])
        s = tube.arclength
        keep = np.flatnonzero(np.abs(s - s[j]) <= half)
        tangents = tube.tangents[keep]
        normal = direction[None, :] - (tangents @ direction)[:, None] * tangents
        normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-9)
        return tube.points[keep] + normal * tube.radii[keep, None]

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
        # an apex sac may take in the origins of its own branches, as real ones do, but not their axes
        own = {an.tube}
        if an.kind == "bifurcation":
            own.update(next(b.children for b in tree.bifurcations if b.tube == an.tube))
        for t, (pts, rad, geo) in enumerate(zip(self.points, self.radii, geodesic, strict=True)):
            if not np.any(np.linalg.norm(pts - an.dome_centre, axis=1) - rad < reach + 0.5):
                continue
            far = geo > local
            outside = an.clearance(pts, bumps=False)
            if np.any(outside[far] - rad[far] < 0.2):
                return False
            near = ~far & (geo > r_base)
            if t not in own and np.any(outside[near] < 0.25 * rad[near]):
                return False
            if np.any(outside[~far] < 0.1):
                return False
        return True

    def _pick(self, sites: dict[str, list[tuple[str, int, int]]]) -> tuple[str, str, int, int]:
        """A site: its location by :data:`LOCATIONS` weight, then a point favouring the middle of the view.

        Returns:
            ``(kind, location, tube, index)``.
        """
        names = sorted(sites)
        weight = np.array([LOCATIONS[n] for n in names])
        location = names[int(self.rng.choice(len(names), p=weight / weight.sum()))]
        pool = sites[location]
        points = np.array([self.tree.tubes[t].points[j] for _, t, j in pool])
        spread = 0.3 * float(self.tree.extent.min())
        weight = np.exp(-0.5 * np.sum((points - self.tree.extent / 2) ** 2, axis=1) / spread**2) + 1e-3
        kind, t, j = pool[int(self.rng.choice(len(pool), p=weight / weight.sum()))]
        return kind, location, t, j

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
        """Place a dome of each size, the largest first: it may recentre the field of view."""
        for size in sorted(sizes, reverse=True):
            self._place_aneurysm(size, min_size)

    def _place_aneurysm(self, size: float, min_size: float) -> bool:
        """Try 120 sites for a ``size`` mm dome, shrinking it by 15 % (not below ``min_size``) every 40."""
        for attempt in range(120):
            if attempt % 40 == 0:
                if attempt:
                    size = max(min_size, 0.85 * size)
                sites = self.sites(size)
            if sites and self._keep(self.make_aneurysm(*self._pick(sites), size)):
                return True
        logger.debug("could not place a %.1f mm aneurysm; case keeps %d", size, len(self.aneurysms))
        return False

    def _keep(self, an: Aneurysm) -> bool:
        """Add ``an`` if it fits; the first aneurysm may move the tree to bring its sac into view."""
        shift = self._recentre(an) if not self.aneurysms else None
        moved = shift is not None and bool(np.any(shift != 0))
        if moved:
            self.tree.translate(shift)
            an = self.make_aneurysm_shifted(an, shift)
        if self.fits(an):
            self.aneurysms.append(an)
            return True
        if moved:
            self.tree.translate(-shift)
        return False

    @staticmethod
    def make_aneurysm_shifted(an: Aneurysm, shift: np.ndarray) -> Aneurysm:
        """``an`` moved by ``shift`` mm."""
        return dataclasses.replace(
            an,
            base=an.base + shift,
            dome_centre=an.dome_centre + shift,
            lobes=[(c + shift, r) for c, r in an.lobes],
            daughters=[(c + shift, r) for c, r in an.daughters],
            ridge=None if an.ridge is None else an.ridge + shift,
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

    def _place_first_clear(self, candidates: Iterable[tuple[HardNegative, Callable[[], None]]]) -> bool:
        """Keep the first candidate clear of the aneurysms and of the look-alikes placed so far.

        The placers' one retry loop: ``candidates`` is lazy, so each candidate is drawn only after the one
        before it was refused, and drawing stops at the first that fits.

        Args:
            candidates: ``(negative, add_to_tree)`` pairs; ``add_to_tree()`` draws the accepted one into the
                tree (new tubes or wider radii).

        Returns:
            whether one was placed.
        """
        for negative, add_to_tree in candidates:
            if self.clear_of_aneurysms(negative.centre, negative.radius) and self.clear_of_negatives(
                negative.centre, negative.radius
            ):
                add_to_tree()
                self.negatives.append(negative)
                return True
        return False

    def _random_sites(self, options: list[tuple[int, int]], tries: int = 20) -> Iterator[tuple[Tube, int]]:
        """Up to ``tries`` (default 20) ``(tube, index)`` sites drawn with replacement from ``options``."""
        for _ in range(tries if options else 0):
            t, j = options[int(self.rng.integers(len(options)))]
            yield self.tree.tubes[t], j

    def add_infundibulum(self) -> bool:
        """Widen the origin of a small branch into a cone (< 3 mm at its base), trying every branch once."""
        tree = self.tree
        options = [
            i
            for i, tube in enumerate(tree.tubes)
            if tube.parent is not None
            and tube.kind in ("side", "branch")
            and tube.radii[0] <= 0.9
            and tree.tubes[tube.parent].radii[tube.parent_index] >= tube.radii[0] + 0.3
        ]
        self.rng.shuffle(options)
        return self._place_first_clear(self._infundibulum(tree.tubes[i]) for i in options)

    def _infundibulum(self, tube: Tube) -> tuple[HardNegative, Callable[[], None]]:
        rng, tree = self.rng, self.tree
        parent_r = float(tree.tubes[tube.parent].radii[tube.parent_index])
        origin, d = tube.points[0], tube.tangents[0]
        r_tip = float(tube.radii[0])
        r_base = rng.uniform(max(1.35 * r_tip, 0.75), 1.4)
        length = rng.uniform(1.2, 2.5)
        a = origin + d * 0.7 * parent_r
        b = origin + d * (parent_r + length)
        centre = origin + d * (parent_r + 0.3 * length)
        radius = max(np.linalg.norm(a - centre) + r_base, np.linalg.norm(b - centre) + r_tip)
        cone = Tube(np.stack([a, b]), np.array([r_base, r_tip]), "infundibulum", tube.generation, tube.value)
        negative = HardNegative("infundibulum", centre, float(radius), float(2 * r_base))
        return negative, lambda: tree.tubes.append(cone)

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
        """Widen a 1.4-4 mm vessel by 15-30 % over a few mm, at up to 20 random sites."""
        sites = self._random_sites(self._wall_points(0.7, 2.0))
        return self._place_first_clear(self._fusiform_bulge(tube, j) for tube, j in sites)

    def _fusiform_bulge(self, tube: Tube, j: int) -> tuple[HardNegative, Callable[[], None]]:
        amount, width = self.rng.uniform(0.15, 0.3), self.rng.uniform(1.5, 3.0)
        r_peak = float(tube.radii[j]) * (1 + amount)
        centre = tube.points[j].copy()

        def widen() -> None:
            s = tube.arclength
            tube.radii = tube.radii * (1.0 + amount * np.exp(-(((s - s[j]) / width) ** 2)))

        return HardNegative("fusiform_bulge", centre, float(r_peak + width), float(2 * r_peak)), widen

    def add_wall_bump(self) -> bool:
        """Put a small saccular bulge (below aneurysm size) on a 1.6-5 mm vessel, at up to 20 random sites."""
        sites = self._random_sites(self._wall_points(0.8, 2.5))
        return self._place_first_clear(self._wall_bump(tube, j) for tube, j in sites)

    def _wall_bump(self, tube: Tube, j: int) -> tuple[HardNegative, Callable[[], None]]:
        r_bump = self.rng.uniform(0.45, 0.72)  # below the smallest aneurysm (1.5 mm)
        normal = perpendicular(self.rng, tube.tangents[j])
        centre = tube.points[j] + normal * (tube.radii[j] + 0.1 * r_bump)
        pts = np.stack([tube.points[j] + normal * 0.5 * tube.radii[j], centre])
        bump = Tube(pts, np.array([0.8 * r_bump, r_bump]), "wall_bump", tube.generation, tube.value)
        negative = HardNegative("wall_bump", centre, float(r_bump), float(2 * r_bump))
        return negative, lambda: self.tree.tubes.append(bump)

    def add_landmarks(self) -> None:
        """Record the templates' wide, curved and branching anatomy (siphon, junctions) away from aneurysms."""
        for mark in self.tree.landmarks:
            clear = all(
                np.linalg.norm(a.dome_centre - mark.point) > a.reach + mark.radius + 0.5
                and np.linalg.norm(a.base - mark.point) > 0.5 * a.neck_mm + mark.radius + 0.5
                for a in self.aneurysms
            )
            if clear and self.tree.inside(mark.point, margin=1.0):
                self.negatives.append(HardNegative(mark.name, mark.point.copy(), mark.radius, mark.size_mm))

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
    first_size_quantile: float | None = None,
) -> list[Aneurysm]:
    """Place ``count`` aneurysms (fewer if the tree has no room) on ``tree``.

    Args:
        rng: random generator.
        tree: the vessel tree (not modified).
        count: how many to try.
        median_mm, sigma_log, min_mm, max_mm: size distribution (see :func:`sample_aneurysm_size`);
            ``max_mm`` is further capped at 0.45 of the smallest field-of-view side.
        first_size_quantile: if set, the first aneurysm's size is the distribution's value at this quantile
            (:func:`aneurysm_size_at`) instead of a random draw; the draw is still made, so that ``rng``
            goes on as it would without it.

    Returns:
        the placed aneurysms.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}.")
    high = min(max_mm, 0.45 * float(np.min(tree.extent)))
    if high <= min_mm:
        raise ValueError(f"field of view {tree.extent.tolist()} mm is too small for {min_mm} mm aneurysms.")
    sizes = [sample_aneurysm_size(rng, median_mm, sigma_log, min_mm, high) for _ in range(count)]
    if sizes and first_size_quantile is not None:
        sizes[0] = aneurysm_size_at(first_size_quantile, median_mm, sigma_log, min_mm, high)
    placer = _Placer(rng, tree)
    placer.place_aneurysms(sizes, min_mm)
    return placer.aneurysms


def place_hard_negatives(
    rng: np.random.Generator, tree: VesselTree, aneurysms: list[Aneurysm]
) -> list[HardNegative]:
    """Add look-alikes to ``tree`` (in place: new tubes, wider radii) away from ``aneurysms``.

    Every case gets at least one when the tree has room: 1-2 infundibula, 0-2 fusiform bulges,
    0-2 wall bumps, every overlapping loop the tree grew and every template landmark (siphon bend,
    tortuous basilar, vertebrobasilar junction, ICA terminus) clear of the aneurysms.

    Returns:
        the hard negatives, each drawn as vessel.
    """
    placer = _Placer(rng, tree, aneurysms=list(aneurysms))
    placer.add_overlapping_loops()
    for _ in range(int(rng.integers(1, 3))):
        placer.add_infundibulum()
    for _ in range(int(rng.integers(0, 3))):
        placer.add_fusiform_bulge()
    for _ in range(int(rng.integers(0, 3))):
        placer.add_wall_bump()
    if not placer.negatives:
        placer.add_wall_bump() or placer.add_infundibulum()
    placer.add_landmarks()
    return placer.negatives
