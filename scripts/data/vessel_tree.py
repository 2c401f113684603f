"""Cerebral arterial territories: anatomical templates and random trees, grown with smooth curvature.

All coordinates are millimetres in the volume's index frame (voxel ``(i, j, k)`` centre at
``(i * sx, j * sy, k * sz)``); the field of view is the box ``[0, extent]``. Z (the last axis) is the
superior-inferior direction, so a vessel running along Z crosses the axial slices as a bright disc.

Each case is one selectively injected territory drawn from a template (see ``docs/phantoms.md`` for the
morphometry and its sources); lumen diameters follow angiographic measurements:

* ``"anterior"``: an internal carotid artery (ICA, 3.5-5 mm) entering from below with a tortuous siphon
  (C-shaped genu whose limbs pass close to each other, sometimes an extra S-bend), ophthalmic, posterior
  communicating (PComm) and anterior choroidal (AChA) side branches, and the ICA terminus splitting into
  M1 (2.3-3.2 mm, on to an MCA bi- or trifurcation into M2s) and A1 (1.5-2.5 mm, on to the ACom/A1-A2
  junction);
* ``"posterior"``: one or two vertebral arteries (2.5-4 mm) joining into the basilar artery (3-4 mm,
  sometimes tortuous), with AICAs and SCAs, ending in the basilar tip that splits into two P1s (1.5-2.5 mm);
* ``"mca"``: an M1 entering from the side, lenticulostriate branches, an MCA bi- or trifurcation;
* ``"random"``: a generic random tree:
* its trunk (radius 1.6-2.7 mm) usually enters from below and runs along Z;
* branches from Murray's law (``r0^3 = r1^3 + r2^3``) with the matching optimal bifurcation angles, widened
  by a random factor, down to 0.5 mm radius; smaller side branches leave at 45-90 degrees;
* curvature from an Ornstein-Uhlenbeck process (tortuosity), occasional kinks, helical loops (some so
  tight that their turns overlap, a classic look-alike of an aneurysm), and stretches steered along Z;
* "passing" vessels from another territory that run 0.2-1.2 mm from the tree wall without joining it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .vectors import perpendicular, rotate, unit

__all__ = [
    "MAX_RADIUS_MM",
    "TEMPLATES",
    "Tube",
    "VesselTree",
    "grow_vessel_tree",
]

logger = logging.getLogger(__name__)

MIN_RADIUS_MM = 0.5
MAX_RADIUS_MM = 2.7  # a wide cavernous ICA (5.4 mm lumen)
TEMPLATES = ("anterior", "posterior", "mca", "random")
TEMPLATE_PROBS = (0.45, 0.25, 0.12, 0.18)
_STEP_MM = 0.6  # centreline sampling; rasterised as one capsule per step
_EZ = np.array([0.0, 0.0, 1.0])


@dataclass
class Tube:
    """One vessel segment between branch points.

    Attributes:
        points: (N, 3) centreline in mm.
        radii: (N,) lumen radius in mm.
        kind: ``"trunk"``, ``"branch"``, ``"side"``, ``"passing"`` or a hard-negative kind.
        generation: 0 for the trunk, +1 per branching.
        value: relative opacification of the lumen (1 = fully opacified).
        parent: index of the parent tube, ``None`` for roots.
        parent_index: index of the parent's centreline point this tube starts from.
        name: anatomical segment (``"ica"``, ``"m1"``, ``"m2"``, ``"a1"``, ``"a2"``, ``"acom"``,
            ``"ophthalmic"``, ``"pcomm"``, ``"acha"``, ``"vertebral"``, ``"basilar"``, ``"p1"``, ``"sca"``,
            ``"aica"``, ``"lenticulostriate"``), ``""`` for unnamed branches.
    """

    points: np.ndarray
    radii: np.ndarray
    kind: str
    generation: int
    value: float = 1.0
    parent: int | None = None
    parent_index: int | None = None
    name: str = ""

    @property
    def arclength(self) -> np.ndarray:
        """(N,) cumulative arc length in mm."""
        steps = np.linalg.norm(np.diff(self.points, axis=0), axis=1)
        return np.concatenate([[0.0], np.cumsum(steps)])

    @property
    def tangents(self) -> np.ndarray:
        """(N, 3) unit tangents (central differences)."""
        grad = np.gradient(self.points, axis=0)
        return grad / np.maximum(np.linalg.norm(grad, axis=1, keepdims=True), 1e-9)


@dataclass
class Bifurcation:
    """Where ``tube`` ends and splits into ``children``; ``direction`` is the parent's flow direction.

    ``name`` is the anatomical site (``"ica_terminus"``, ``"mca_bifurcation"``, ``"basilar_tip"``,
    ``"acom"``) or ``"bifurcation"`` for an unnamed one.
    """

    tube: int
    children: tuple[int, int]
    point: np.ndarray
    direction: np.ndarray
    radius: float
    name: str = "bifurcation"


@dataclass
class Landmark:
    """A named place that looks like a lesion but is normal anatomy (a hard-negative candidate).

    Attributes:
        name: ``"siphon_bend"``, ``"vertebrobasilar_junction"``, ``"ica_terminus"`` or ``"tortuous_basilar"``.
        tube: tube index; ``index`` the centreline point at the landmark.
        point: (3,) centreline point (mm), inside the lumen.
        radius: radius (mm) around ``point`` that contains the structure.
        size_mm: its largest width in mm.
    """

    name: str
    tube: int
    index: int
    point: np.ndarray
    radius: float
    size_mm: float


@dataclass
class Loop:
    """A helical loop of ``tube`` between ``start`` and ``stop`` (point indices).

    ``centre`` is the circle centre, ``loop_radius`` the circle radius, ``pitch`` the advance per turn;
    ``overlapping`` loops have ``pitch < 2 * vessel radius`` so that their turns merge into one blob.
    """

    tube: int
    start: int
    stop: int
    centre: np.ndarray
    loop_radius: float
    pitch: float
    vessel_radius: float
    overlapping: bool


@dataclass
class Crossing:
    """A passing vessel ``tube`` running ``gap_mm`` from the wall of tube ``near`` at ``point``."""

    tube: int
    near: int
    point: np.ndarray
    gap_mm: float


@dataclass
class VesselTree:
    """Tubes plus the landmarks the lesion placement needs."""

    extent: np.ndarray
    tubes: list[Tube] = field(default_factory=list)
    bifurcations: list[Bifurcation] = field(default_factory=list)
    loops: list[Loop] = field(default_factory=list)
    crossings: list[Crossing] = field(default_factory=list)
    landmarks: list[Landmark] = field(default_factory=list)
    template: str = "random"

    def translate(self, shift: np.ndarray) -> None:
        """Move the whole tree by ``shift`` (mm), in place (the field of view stays where it is)."""
        shift = np.asarray(shift, dtype=np.float64)
        for tube in self.tubes:
            tube.points += shift
        for landmark in (*self.bifurcations, *self.crossings, *self.landmarks):
            landmark.point = landmark.point + shift
        for loop in self.loops:
            loop.centre = loop.centre + shift

    def inside(self, point: np.ndarray, margin: float = 0.0) -> bool:
        """Whether ``point`` (mm) lies in the field of view shrunk by ``margin`` mm."""
        return bool(np.all(point >= margin) and np.all(point <= self.extent - margin))

    def length_inside(self) -> float:
        """Total centreline length (mm) inside the field of view."""
        total = 0.0
        for tube in self.tubes:
            mid = 0.5 * (tube.points[1:] + tube.points[:-1])
            inside = np.all((mid >= 0) & (mid <= self.extent), axis=1)
            total += float(np.linalg.norm(np.diff(tube.points, axis=0), axis=1)[inside].sum())
        return total

    def calibre(self) -> tuple[np.ndarray, np.ndarray]:
        """Local lumen diameter of every centreline step inside the field of view, with its lumen volume.

        The diameter is twice the radius of the tube that owns the lumen, so a histogram weighted by the
        volumes is the calibre distribution over vessel voxels (overlaps at junctions counted twice).

        Returns:
            ``(diameters, volumes)``: (M,) mm and (M,) mm^3.
        """
        diameters, volumes = [], []
        for tube in self.tubes:
            mid = 0.5 * (tube.points[1:] + tube.points[:-1])
            r = 0.5 * (tube.radii[1:] + tube.radii[:-1])
            inside = np.all((mid >= 0) & (mid <= self.extent), axis=1)
            steps = np.linalg.norm(np.diff(tube.points, axis=0), axis=1)
            diameters.append(2.0 * r[inside])
            volumes.append(np.pi * r[inside] ** 2 * steps[inside])
        return np.concatenate(diameters), np.concatenate(volumes)

    def empty_fraction(self, clearance_mm: float = 8.0, grid_mm: float = 2.0) -> float:
        """Share of the field of view farther than ``clearance_mm`` from every vessel wall.

        Sampled on a ``grid_mm`` grid; distances go to the nearest centreline point minus its radius.
        """
        from scipy.spatial import cKDTree

        points = np.concatenate([t.points for t in self.tubes])
        radii = np.concatenate([t.radii for t in self.tubes])
        axes = [np.arange(grid_mm / 2, e, grid_mm) for e in self.extent]
        grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
        dist, nearest = cKDTree(points).query(grid)
        return float(np.mean(dist - radii[nearest] > clearance_mm))

    def children(self, index: int) -> list[int]:
        """Tubes that start on tube ``index``."""
        return [i for i, tube in enumerate(self.tubes) if tube.parent == index]

    def geodesic(self, tube: int, index: int) -> list[np.ndarray]:
        """Arc-length distance (mm) along the tree from point ``index`` of ``tube`` to every centreline point.

        Returns:
            one (N_t,) array per tube, ``inf`` for tubes not connected to ``tube`` (passing vessels).
        """
        dist: list[np.ndarray | None] = [None] * len(self.tubes)
        s = self.tubes[tube].arclength
        dist[tube] = np.abs(s - s[index])
        todo = [tube]
        while todo:
            t = todo.pop()
            for child in self.children(t):
                if dist[child] is None:
                    dist[child] = dist[t][self.tubes[child].parent_index] + self.tubes[child].arclength
                    todo.append(child)
            parent = self.tubes[t].parent
            if parent is not None and dist[parent] is None:
                sp = self.tubes[parent].arclength
                dist[parent] = dist[t][0] + np.abs(sp - sp[self.tubes[t].parent_index])
                todo.append(parent)
        return [
            d if d is not None else np.full(len(tb.radii), np.inf)
            for d, tb in zip(dist, self.tubes, strict=True)
        ]


@dataclass
class _WalkResult:
    points: np.ndarray
    radii: np.ndarray
    side_points: list[int]
    loops: list[tuple[int, int, np.ndarray, float, float, float, bool]]
    exited: bool
    marks: list[int] = field(default_factory=list)


@dataclass
class _Heading:
    """The state a random walk carries from step to step.

    Attributes:
        direction: (3,) unit tangent.
        curvature: (3,) current curvature (1/mm), perpendicular to ``direction``; default zero.
        zrun_left: mm left of the current run along Z (none when <= 0); default 0.
        z_target: (3,) the direction a Z run pulls towards; default up (+Z) when the walk starts upwards.
    """

    direction: np.ndarray
    curvature: np.ndarray = field(default_factory=lambda: np.zeros(3))
    zrun_left: float = 0.0
    z_target: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.z_target is None:
            self.z_target = _EZ * (1.0 if self.direction[2] >= 0 else -1.0)


class _TreeGrower:
    """Grows one tree; holds the random generator and the field of view."""

    def __init__(
        self,
        rng: np.random.Generator,
        extent: np.ndarray,
        length_budget: float,
        max_tubes: int,
        force_overlapping_loop: bool = False,
    ):
        self.rng = rng
        self.force_loop = force_overlapping_loop
        self.extent = extent
        self.centre = extent / 2.0
        self.budget = length_budget
        self.max_tubes = max_tubes
        self.tree = VesselTree(extent=extent.copy())
        self.used = 0.0
        self.pending_side: dict[int, list[int]] = {}  # side-branch points proposed by each tube's walk

    # ----------------------------------------------------------------------------------------- walking
    def walk(
        self,
        start: np.ndarray,
        direction: np.ndarray,
        r0: float,
        r1: float,
        length: float,
        *,
        tortuosity: float,
        steer: bool,
        loop_rate: float = 0.006,
        kink_rate: float = 0.02,
        zrun_rate: float = 0.02,
        side_rate: float = 0.05,
        zrun_first: float = 0.0,
        force_overlapping_loop: bool = False,
        min_radius: float = MIN_RADIUS_MM,
    ) -> _WalkResult:
        """Random walk with smooth curvature. Rates are per mm; curvature std ``tortuosity`` (1/mm).

        Each step either coils into a helical loop (:meth:`_loop`) or turns (:meth:`_turn`: kinks, runs
        along Z, curvature noise), is steered back from the faces (``steer``) and advances ``_STEP_MM``;
        the walk stops early once it leaves the field of view.
        """
        rng, step = self.rng, _STEP_MM
        n_steps = max(3, int(round(length / step)))
        p = np.asarray(start, float).copy()
        heading = _Heading(unit(np.asarray(direction, float)), zrun_left=zrun_first)
        points, radii, side, loops = [p.copy()], [r0], [], []
        forced_at = (
            int(rng.integers(n_steps // 4, max(n_steps // 4 + 1, 3 * n_steps // 4)))
            if force_overlapping_loop
            else -1
        )
        k, exited = 0, False
        while k < n_steps:
            r = r0 + (r1 - r0) * k / n_steps
            u = rng.random(4)
            want_loop = k == forced_at or (loop_rate > 0 and u[0] < loop_rate * step and 3 < k < n_steps - 6)
            if want_loop and r <= 1.6 and heading.zrun_left <= 0:
                overlapping = k == forced_at or rng.random() < 0.4
                k += self._loop(points, radii, loops, heading.direction, r, overlapping)
                p = points[-1].copy()
                heading.direction = unit(points[-1] - points[-2])
                continue
            d = self._turn(heading, u, tortuosity, kink_rate, zrun_rate)
            if steer:
                d = self._steer_inward(p, d)
            heading.direction = d = unit(d)
            p = p + d * step
            points.append(p.copy())
            radii.append(r)
            k += 1
            if u[3] < side_rate * step and r >= 0.9:
                side.append(len(points) - 1)
            if np.any(p < -(r + 1.5)) or np.any(p > self.extent + r + 1.5):
                exited = True
                break
        radii_arr = self._wobble(np.asarray(radii), min_radius)
        return _WalkResult(np.asarray(points), radii_arr, side, loops, exited)

    def _turn(
        self, heading: _Heading, u: np.ndarray, tortuosity: float, kink_rate: float, zrun_rate: float
    ) -> np.ndarray:
        """One step's change of direction; updates ``heading``'s curvature and Z run, returns the new tangent.

        A kink (probability ``kink_rate`` per mm, decided by ``u[1]``) turns the tangent by 30-65 degrees; a
        Z run (``zrun_rate``, by ``u[2]``) pulls it towards Z for 8-18 mm; the curvature is an
        Ornstein-Uhlenbeck process of std ``tortuosity`` (1/mm) with a 4 mm correlation length.

        Returns:
            (3,) the new tangent, not yet normalised.
        """
        rng, step, corr = self.rng, _STEP_MM, 4.0
        d = heading.direction
        if u[1] < kink_rate * step:
            d = rotate(d, perpendicular(rng, d), np.deg2rad(rng.uniform(30.0, 65.0)))
        if heading.zrun_left <= 0 and u[2] < zrun_rate * step:
            heading.zrun_left = rng.uniform(8.0, 18.0)
            heading.z_target = _EZ * (1.0 if d[2] >= 0 else -1.0)
        noise = rng.standard_normal(3)
        kappa = heading.curvature * (1.0 - step / corr) + tortuosity * np.sqrt(step / corr) * noise
        kappa -= (kappa @ d) * d
        heading.curvature = kappa
        if heading.zrun_left > 0:
            d = d + 0.35 * (heading.z_target - d)
            heading.zrun_left -= step
            bend = 0.25 * kappa
        else:
            bend = kappa
        return d + bend * step

    def _steer_inward(self, p: np.ndarray, d: np.ndarray) -> np.ndarray:
        """``d`` nudged back towards the centre when ``p`` is within 4 mm of a face and not already turning in."""
        q = p - self.centre
        over = np.abs(q) - (self.extent / 2.0 - 4.0)
        if np.any(over > 0):
            push = -np.sign(q) * np.clip(over, 0.0, None)
            if d @ push < 0.2 * np.linalg.norm(push):
                d = d + 0.15 * unit(push)
        return d

    def _loop(
        self, points: list, radii: list, loops: list, d: np.ndarray, r: float, overlapping: bool
    ) -> int:
        """Append a helical loop starting at ``points[-1]`` with tangent ``d``; return the steps used.

        The walk goes on along the loop's final tangent, so a loop can also turn the vessel round.
        """
        rng = self.rng
        if overlapping:
            # a tight coil: the hole closes and the turns merge into one bright, sac-like blob
            loop_radius = rng.uniform(1.05, 1.4) * r + 0.2
            pitch = rng.uniform(0.8, 1.5) * r
            turns = rng.uniform(1.0, 1.6)
        else:
            loop_radius = rng.uniform(max(1.5 * r + 0.4, 1.4), max(1.5 * r + 0.5, 3.5))
            pitch = rng.uniform(2.5, 3.5) * r + 0.6
            turns = 1.0
        m = perpendicular(rng, d)
        axis = np.cross(d, m)
        p0 = points[-1]
        centre = p0 + loop_radius * m
        n = max(8, int(np.ceil(2 * np.pi * turns * loop_radius / _STEP_MM)))
        phi = np.linspace(0.0, 2 * np.pi * turns, n + 1)[1:]
        ring = (
            centre
            - loop_radius * np.cos(phi)[:, None] * m
            + loop_radius * np.sin(phi)[:, None] * d
            + (pitch * phi / (2 * np.pi))[:, None] * axis
        )
        start = len(points) - 1
        points.extend(list(ring))
        radii.extend([r] * n)
        loops.append(
            (start, len(points) - 1, centre + 0.5 * turns * pitch * axis, loop_radius, pitch, r, overlapping)
        )
        return n

    # ---------------------------------------------------------------------------------------- building
    def add(
        self,
        result: _WalkResult,
        kind: str,
        generation: int,
        value: float,
        parent: int | None = None,
        parent_index: int | None = None,
        name: str = "",
    ) -> int:
        tube = Tube(result.points, result.radii, kind, generation, value, parent, parent_index, name)
        self.tree.tubes.append(tube)
        index = len(self.tree.tubes) - 1
        self.pending_side[index] = list(result.side_points)
        for start, stop, centre, loop_radius, pitch, r, overlapping in result.loops:
            self.tree.loops.append(Loop(index, start, stop, centre, loop_radius, pitch, r, overlapping))
        mid = 0.5 * (tube.points[1:] + tube.points[:-1])
        inside = np.all((mid >= 0) & (mid <= self.extent), axis=1)
        self.used += float(np.linalg.norm(np.diff(tube.points, axis=0), axis=1)[inside].sum())
        return index

    def room(self) -> bool:
        return self.used < self.budget and len(self.tree.tubes) < self.max_tubes

    def grow(self, template: str = "random") -> VesselTree:
        """Build the ``template`` skeleton, branch its distal vessels, add tails and passing vessels."""
        self.tree.template = template
        distal = {
            "anterior": self._grow_anterior,
            "posterior": self._grow_posterior,
            "mca": self._grow_mca,
            "random": self._grow_random,
        }[template]()
        self._expand(deque(distal))
        self._add_tails()
        self._passing_vessels()
        return self.tree

    def _grow_random(self) -> list[int]:
        """A generic trunk (radius 1.6-2.7 mm) entering from below or through a side face."""
        rng = self.rng
        start, direction, from_below = self._entry()
        r0 = rng.uniform(1.6, MAX_RADIUS_MM)
        trunk = self.walk(
            start,
            direction,
            r0,
            r0 * rng.uniform(0.85, 0.95),
            rng.uniform(15.0, 30.0),
            tortuosity=rng.uniform(0.08, 0.18),
            steer=True,
            zrun_first=rng.uniform(6.0, 16.0) if from_below else 0.0,
            side_rate=0.07,
            loop_rate=0.0,
        )
        return [self.add(trunk, "trunk", 0, float(rng.uniform(0.97, 1.03)))]

    def _expand(self, queue: deque) -> None:
        """Branch the tubes in ``queue`` (and their children) by Murray's law while the budget lasts."""
        rng = self.rng
        overlapping_loop_due = rng.random() < 0.4  # the random template's side branches, 40 % of trees
        while queue:
            index = queue.popleft()
            tube = self.tree.tubes[index]
            children = []
            can_split = (
                self.room() and not self._exited(tube) and tube.radii[-1] >= 0.65 and tube.generation < 4
            )
            # ``force_overlapping_loop``: every distal branch tries until the tree has one (a loop needs a
            # vessel of radius <= 1.6 mm where it falls, so a tree can still end without one)
            forced = self.force_loop and not any(lp.overlapping for lp in self.tree.loops)
            if can_split and rng.random() < 0.9:
                children.extend(self._bifurcate(index, force_loop=forced))
            for j in self._side_points(index):
                if not self.room():
                    break
                child = self._side_branch(index, j, force_loop=overlapping_loop_due or forced)
                if child is not None:
                    overlapping_loop_due = overlapping_loop_due and not any(
                        lp.tube == child and lp.overlapping for lp in self.tree.loops
                    )
                    children.append(child)
            queue.extend(children)

    # ------------------------------------------------------------------------------- anatomical templates
    def arc(
        self,
        start: np.ndarray,
        direction: np.ndarray,
        r0: float,
        r1: float,
        plan: Sequence[tuple[float, float, np.ndarray | None]],
        *,
        noise: float = 0.03,
        stop_outside: bool = True,
    ) -> _WalkResult:
        """A planned centreline: pieces of constant curvature plus a little smooth noise.

        Args:
            start: (3,) first point (mm); ``direction`` (3,) its tangent.
            r0, r1: radius at the start and at the end (linear taper, with a +-4 % wobble).
            plan: ``(length_mm, turn_deg, target)`` pieces: each turns the tangent by ``turn_deg`` towards
                the unit vector ``target`` (away from it when negative); ``None`` goes straight.
            noise: curvature noise (1/mm), the tortuosity on top of the plan.
            stop_outside: stop once the centreline leaves the field of view.

        Returns:
            the walk; ``marks`` holds the point index where each piece ends.
        """
        rng, step, corr = self.rng, _STEP_MM, 4.0
        p, d = np.asarray(start, float).copy(), unit(np.asarray(direction, float))
        kappa = np.zeros(3)
        points, marks, exited = [p.copy()], [], False
        for length, turn, target in plan:
            n = max(1, int(round(length / step)))
            dtheta = np.deg2rad(turn) / n
            for _ in range(n):
                if target is not None:
                    axis = np.cross(d, target)
                    if np.linalg.norm(axis) > 1e-6:
                        d = rotate(d, unit(axis), dtheta)
                kappa = kappa * (1.0 - step / corr) + noise * np.sqrt(step / corr) * rng.standard_normal(3)
                kappa -= (kappa @ d) * d
                d = unit(d + kappa * step)
                p = p + d * step
                points.append(p.copy())
                if stop_outside and (np.any(p < -(r0 + 1.5)) or np.any(p > self.extent + r0 + 1.5)):
                    exited = True
                    break
            marks.append(len(points) - 1)
            if exited:
                break
        radii = np.linspace(r0, r1, len(points))
        return _WalkResult(np.asarray(points), self._wobble(radii, MIN_RADIUS_MM), [], [], exited, marks)

    def _wobble(self, radii: np.ndarray, min_radius: float) -> np.ndarray:
        """Smooth +-4 % calibre wobble, clipped to ``[min_radius, MAX_RADIUS_MM]``."""
        wobble = np.convolve(self.rng.standard_normal(len(radii) + 8), np.ones(9) / 3.0, mode="valid")
        return np.clip(radii * (1.0 + 0.04 * wobble), min_radius, MAX_RADIUS_MM)

    def _frame(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Patient axes ``(up, lateral, anterior)`` with a random head tilt, side and C-arm rotation."""
        rng = self.rng
        up = unit(_EZ + 0.15 * rng.standard_normal(3) * np.array([1.0, 1.0, 0.0]))
        lateral = perpendicular(rng, up)
        anterior = np.cross(up, lateral) * rng.choice([-1.0, 1.0])
        return up, lateral, anterior

    def _place(self, result: _WalkResult, anchor: int, low: Sequence[float], high: Sequence[float]) -> None:
        """Move ``result`` so that point ``anchor`` lands at ``extent * U(low, high)`` per axis (in place)."""
        target = self.extent * self.rng.uniform(low, high)
        result.points += target - result.points[anchor]

    def _enter(self, result: _WalkResult) -> int:
        """Prolong ``result`` backwards, straight, until it enters from outside the field of view.

        Returns:
            how many points were prepended (indices into the walk shift by this).
        """
        p0, r0 = result.points[0], float(result.radii[0])
        back = -unit(result.points[min(3, len(result.points) - 1)] - p0)
        extra = []
        p = p0.copy()
        while self.tree.inside(p, margin=-(r0 + 1.5)) and len(extra) < 200:
            p = p + back * _STEP_MM
            extra.append(p.copy())
        if extra:
            result.points = np.concatenate([np.asarray(extra[::-1]), result.points])
            result.radii = np.concatenate([np.full(len(extra), result.radii[0]), result.radii])
            result.side_points = [j + len(extra) for j in result.side_points]
            result.marks = [j + len(extra) for j in result.marks]
        return len(extra)

    def _twig(
        self,
        parent: int,
        j: int,
        direction: np.ndarray,
        r: float,
        length: float,
        name: str,
        generation: int | None = None,
    ) -> int:
        """A named side branch of radius ``r`` leaving tube ``parent`` at point ``j``."""
        rng, tube = self.rng, self.tree.tubes[parent]
        res = self.walk(
            tube.points[j],
            direction,
            r,
            max(MIN_RADIUS_MM, r * rng.uniform(0.75, 0.92)),
            length,
            tortuosity=rng.uniform(0.12, 0.3),
            steer=False,
            loop_rate=0.0,
            side_rate=0.0,
            zrun_rate=0.0,
        )
        gen = tube.generation + 1 if generation is None else generation
        value = float(np.clip(tube.value * rng.uniform(0.9, 1.0), 0.7, 1.05))
        return self.add(res, "side", gen, value, parent, j, name)

    def _split(
        self,
        parent: int,
        results: Sequence[_WalkResult],
        names: Sequence[str],
        site: str,
        generation: int,
    ) -> list[int]:
        """Attach ``results`` at the end of tube ``parent``: a named bifurcation (plus a third branch)."""
        tube = self.tree.tubes[parent]
        end = len(tube.points) - 1
        children = [
            self.add(
                res,
                "branch",
                generation,
                float(np.clip(tube.value * self.rng.uniform(0.95, 1.02), 0.7, 1.05)),
                parent,
                end,
                name,
            )
            for res, name in zip(results, names, strict=True)
        ]
        self.tree.bifurcations.append(
            Bifurcation(
                parent,
                (children[0], children[1]),
                tube.points[-1].copy(),
                tube.tangents[-1],
                float(tube.radii[-1]),
                site,
            )
        )
        return children

    def _murray_pair(self, r0: float, low: float, high: float) -> tuple[float, float, float, float]:
        """Daughter radii ``r1 >= r2`` with ``r0^3 = r1^3 + r2^3`` and Murray's optimal angles (radians)."""
        ratio = self.rng.uniform(low, high)
        r1 = r0 / (1.0 + ratio**3) ** (1.0 / 3.0)
        r2 = ratio * r1
        cos1 = np.clip((r0**4 + r1**4 - r2**4) / (2 * r0**2 * r1**2), -1, 1)
        cos2 = np.clip((r0**4 + r2**4 - r1**4) / (2 * r0**2 * r2**2), -1, 1)
        return r1, r2, float(np.arccos(cos1)), float(np.arccos(cos2))

    def _mca(self, m1: int, up: np.ndarray, anterior: np.ndarray) -> list[int]:
        """MCA bifurcation (65 %) or trifurcation at the end of tube ``m1``; returns the M2 trunks.

        The M2s leave at a wide angle (90-160 degrees in all) and turn up and back into the insula.
        """
        rng, tube = self.rng, self.tree.tubes[m1]
        r0, t = float(tube.radii[-1]), tube.tangents[-1]
        trifurcation = rng.random() < 0.35
        r_split = r0 * (2.0 / 3.0) ** (1.0 / 3.0) if trifurcation else r0  # Murray: a third of the flow goes
        r1, r2, th1, th2 = self._murray_pair(r_split, 0.7, 1.0)
        total = np.deg2rad(rng.uniform(100.0, 160.0))
        th1, th2 = th1 * total / (th1 + th2), th2 * total / (th1 + th2)
        m = unit(up - (up @ t) * t + 0.5 * perpendicular(rng, t))
        dirs = [np.cos(th1) * t + np.sin(th1) * m, np.cos(th2) * t - np.sin(th2) * m]
        results = []
        for r, d in zip((max(r1, MIN_RADIUS_MM), max(r2, MIN_RADIUS_MM)), dirs, strict=True):
            length = rng.uniform(12.0, 22.0)
            plan = [
                (0.4 * length, rng.uniform(20.0, 60.0), unit(up - anterior)),
                (0.6 * length, rng.uniform(-20, 20), up),
            ]
            results.append(self.arc(tube.points[-1], d, r, r * rng.uniform(0.8, 0.92), plan, noise=0.06))
        children = self._split(m1, results, ("m2", "m2"), "mca_bifurcation", 2)
        if trifurcation:
            r3 = (r0**3 - r1**3 - r2**3) ** (1.0 / 3.0) if r0**3 > r1**3 + r2**3 else r2
            d3 = unit(t + 0.4 * np.cross(t, m) * rng.choice([-1.0, 1.0]))
            res = self.arc(
                tube.points[-1],
                d3,
                max(r3, MIN_RADIUS_MM),
                max(r3 * 0.85, MIN_RADIUS_MM),
                [(rng.uniform(10, 18), rng.uniform(10, 40), up)],
                noise=0.06,
            )
            children.append(self.add(res, "branch", 2, tube.value, m1, len(tube.points) - 1, "m2"))
        return children

    def _grow_anterior(self) -> list[int]:
        """ICA siphon from below, ophthalmic/PComm/AChA, ICA terminus into M1 (to the MCA) and A1 (to ACom)."""
        rng = self.rng
        frame = self._frame()
        r_m1, r_a1 = rng.uniform(1.15, 1.6), rng.uniform(0.75, 1.25)
        r_term = (r_m1**3 + r_a1**3) ** (1.0 / 3.0)  # Murray at the ICA terminus
        trunk, supra = self._ica_siphon(frame, r_term)
        self._ica_twigs(trunk, supra, frame)
        i_m1, i_a1 = self._ica_terminus(trunk, r_m1, r_a1, r_term, frame)
        m2 = self._mca(i_m1, frame[0], frame[2])
        return [*m2, self._acom_complex(i_a1, frame)]

    def _ica_siphon(self, frame: tuple[np.ndarray, np.ndarray, np.ndarray], r_term: float) -> tuple[int, int]:
        """The ICA trunk from below through the siphon (its genu recorded as a landmark), ending at ``r_term``.

        Returns:
            ``(trunk, supra)``: the trunk's tube index and the point where its supraclinoid piece starts.
        """
        rng = self.rng
        up, lateral, anterior = frame
        r_ica = float(np.clip(rng.uniform(1.85, 2.6), r_term / 0.85, MAX_RADIUS_MM))
        bend = r_ica * rng.uniform(1.3, 2.2)  # radius of curvature of the anterior genu
        genu = rng.uniform(150.0, 195.0)
        back = -anterior
        plan = [(rng.uniform(4.0, 9.0), rng.uniform(-15.0, 15.0), anterior)]
        if rng.random() < 0.35:  # an extra S-bend in the frontal plane
            swing = rng.uniform(35.0, 60.0) * rng.choice([-1.0, 1.0])
            plan += [(rng.uniform(3.0, 5.0), swing, lateral), (rng.uniform(3.0, 5.0), -swing, lateral)]
        plan += [
            (rng.uniform(4.0, 7.0), rng.uniform(70.0, 100.0), anterior),  # posterior bend: up -> forward
            (rng.uniform(3.0, 8.0), rng.uniform(-10.0, 10.0), up),  # horizontal cavernous segment
            (np.pi * bend * genu / 180.0, genu, back),  # anterior genu: forward -> up -> back
            (rng.uniform(5.0, 9.0), rng.uniform(30.0, 70.0), up),  # supraclinoid: back, then up
        ]
        # the genu turns towards "back" through "up": split it so that the turn passes over the top
        genu_piece = plan[-2]
        plan[-2:-1] = [(genu_piece[0] / 2, genu / 2, up), (genu_piece[0] / 2, genu / 2, back)]
        ica = self.arc(np.zeros(3), up, r_ica, r_term, plan, noise=0.02, stop_outside=False)
        self._place(ica, -1, (0.3, 0.3, 0.5), (0.7, 0.7, 0.8))
        self._enter(ica)
        genu_mid, supra = ica.marks[-3], ica.marks[-2]
        trunk = self.add(ica, "trunk", 0, float(rng.uniform(0.97, 1.03)), name="ica")
        point = self.tree.tubes[trunk].points[genu_mid].copy()
        self.tree.landmarks.append(
            Landmark("siphon_bend", trunk, genu_mid, point, bend + r_ica + 1.0, 2 * (bend + r_ica))
        )
        return trunk, supra

    def _ica_twigs(self, trunk: int, supra: int, frame: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        """The ophthalmic, PComm (80 %) and AChA arteries off the supraclinoid ICA."""
        rng = self.rng
        up, lateral, anterior = frame
        back = -anterior
        n = len(self.tree.tubes[trunk].points)
        self._twig(
            trunk,
            min(supra + 1, n - 3),
            unit(anterior + 0.3 * up),
            rng.uniform(0.5, 0.75),
            rng.uniform(8, 14),
            "ophthalmic",
        )
        j_pcomm = min(supra + max(2, (n - supra) // 2), n - 3)
        if rng.random() < 0.8:
            self._twig(
                trunk,
                j_pcomm,
                unit(back - 0.3 * up + 0.2 * lateral),
                rng.uniform(0.5, 0.85),
                rng.uniform(10, 18),
                "pcomm",
            )
        self._twig(
            trunk,
            min(j_pcomm + 3, n - 2),
            unit(back + 0.7 * lateral + 0.2 * up),
            rng.uniform(0.5, 0.6),
            rng.uniform(10, 16),
            "acha",
        )

    def _ica_terminus(
        self,
        trunk: int,
        r_m1: float,
        r_a1: float,
        r_term: float,
        frame: tuple[np.ndarray, np.ndarray, np.ndarray],
    ) -> tuple[int, int]:
        """M1 laterally and A1 medially and forward, 90-110 degrees from the ICA each; returns ``(m1, a1)``."""
        rng = self.rng
        up, lateral, anterior = frame
        tube = self.tree.tubes[trunk]
        end = tube.points[-1]
        m1 = self.arc(
            end,
            unit(lateral + 0.2 * up + 0.15 * rng.standard_normal(3)),
            r_m1,
            r_m1 * rng.uniform(0.88, 0.95),
            [
                (rng.uniform(6, 10), rng.uniform(-25, 25), up),
                (rng.uniform(6, 10), rng.uniform(-20, 20), anterior),
            ],
            noise=0.03,
        )
        a1 = self.arc(
            end,
            unit(-lateral + 0.5 * anterior + 0.25 * up),
            r_a1,
            r_a1 * rng.uniform(0.9, 0.97),
            [(rng.uniform(9, 14), rng.uniform(10, 35), anterior)],
            noise=0.03,
        )
        i_m1, i_a1 = self._split(trunk, [m1, a1], ("m1", "a1"), "ica_terminus", 1)
        self.tree.landmarks.append(
            Landmark("ica_terminus", trunk, len(tube.points) - 1, end.copy(), r_term + 1.5, 2 * r_term + 1.0)
        )
        return i_m1, i_a1

    def _acom_complex(self, i_a1: int, frame: tuple[np.ndarray, np.ndarray, np.ndarray]) -> int:
        """The A1-A2 junction: the A2 runs up and forward, the ACom crosses the midline; returns the A2."""
        rng = self.rng
        up, _, anterior = frame
        a1_tube = self.tree.tubes[i_a1]
        r_a2, r_acom, _, _ = self._murray_pair(float(a1_tube.radii[-1]), 0.5, 0.85)
        t = a1_tube.tangents[-1]
        t = unit(t - (t @ up) * up)  # the ACom runs across the midline, the A2 turns up: 100-130 degrees
        a2 = self.arc(
            a1_tube.points[-1],
            unit(up + 0.3 * anterior - rng.uniform(0.2, 0.6) * t),
            r_a2,
            r_a2 * 0.85,
            [(rng.uniform(10, 18), rng.uniform(20, 50), unit(-anterior + up))],
            noise=0.05,
        )
        acom = self.arc(
            a1_tube.points[-1],
            unit(t - rng.uniform(0.0, 0.3) * up),
            max(r_acom, MIN_RADIUS_MM),
            max(r_acom, MIN_RADIUS_MM),
            [(rng.uniform(3, 5), 0.0, None)],
            noise=0.02,
        )
        i_a2, _ = self._split(i_a1, [a2, acom], ("a2", "acom"), "acom", 2)
        return i_a2

    def _grow_posterior(self) -> list[int]:
        """Vertebral arteries into the basilar (AICAs, SCAs), the basilar tip into two P1s."""
        rng = self.rng
        frame = self._frame()
        r_p1 = rng.uniform(0.75, 1.25, size=2)
        r_tip = float(np.sum(r_p1**3) ** (1.0 / 3.0))  # Murray at the basilar tip
        sides = [1.0, -1.0] if rng.random() < 0.7 else [float(rng.choice([-1.0, 1.0]))]
        r_vert = rng.uniform(1.25, 2.0, size=len(sides))
        r_ba = float(np.clip(np.sum(r_vert**3) ** (1.0 / 3.0) * rng.uniform(0.8, 0.95), 1.5, 2.0))
        r_ba = max(r_ba, min(1.08 * r_tip, MAX_RADIUS_MM))
        trunk = self._basilar(frame, r_ba, r_tip)
        self._vertebrals(trunk, sides, r_vert, r_ba, frame)
        distal = self._cerebellar_arteries(trunk, frame)
        distal.extend(self._basilar_tip(trunk, r_p1, frame))
        return distal

    def _basilar(self, frame: tuple[np.ndarray, np.ndarray, np.ndarray], r_ba: float, r_tip: float) -> int:
        """The basilar trunk, straight or (40 %) bowed sideways (recorded as a landmark); returns its index."""
        rng = self.rng
        up, lateral, anterior = frame
        length = rng.uniform(18.0, 30.0)
        tortuous = rng.random() < 0.4
        bow = lateral * rng.choice([-1.0, 1.0])
        if tortuous:  # a lateral bow of the basilar (dolichoectatic look, but normal calibre)
            swing = rng.uniform(30.0, 55.0)
            plan = [(0.3 * length, swing, bow), (0.4 * length, 2 * swing, -bow), (0.3 * length, swing, bow)]
        else:
            plan = [
                (0.5 * length, rng.uniform(-10.0, 10.0), bow),
                (0.5 * length, rng.uniform(-15.0, 15.0), anterior),
            ]
        basilar = self.arc(np.zeros(3), up, r_ba, 1.02 * r_tip, plan, noise=0.02, stop_outside=False)
        self._place(basilar, -1, (0.3, 0.3, 0.55), (0.7, 0.7, 0.85))
        trunk = self.add(basilar, "trunk", 0, float(rng.uniform(0.97, 1.03)), name="basilar")
        if tortuous:
            j = basilar.marks[0]
            point = self.tree.tubes[trunk].points[j].copy()
            self.tree.landmarks.append(Landmark("tortuous_basilar", trunk, j, point, r_ba + 2.5, 2 * r_ba))
        return trunk

    def _vertebrals(
        self,
        trunk: int,
        sides: Sequence[float],
        r_vert: np.ndarray,
        r_ba: float,
        frame: tuple[np.ndarray, np.ndarray, np.ndarray],
    ) -> None:
        """Vertebral arteries: down and apart from the junction, then straight down out of the field of view."""
        rng = self.rng
        up, lateral, anterior = frame
        tube = self.tree.tubes[trunk]
        for side, r in zip(sides, r_vert, strict=True):
            d = unit(-up + side * rng.uniform(0.5, 1.0) * lateral + 0.2 * anterior)
            res = self.arc(
                tube.points[0],
                d,
                r_ba if len(sides) == 1 else float(r),
                float(r),
                [
                    (rng.uniform(3.0, 6.0), 0.0, None),
                    (rng.uniform(5.0, 9.0), rng.uniform(30.0, 60.0), -up),
                    (40.0, 0.0, None),
                ],
                noise=0.04,
            )
            self.add(res, "branch", 1, tube.value, trunk, 0, "vertebral")
        if len(sides) == 2:
            self.tree.landmarks.append(
                Landmark(
                    "vertebrobasilar_junction", trunk, 0, tube.points[0].copy(), r_ba + 2.0, 2 * r_ba + 2.0
                )
            )

    def _cerebellar_arteries(self, trunk: int, frame: tuple[np.ndarray, np.ndarray, np.ndarray]) -> list[int]:
        """An AICA (70 %) and an SCA off each side of the basilar; returns the SCAs."""
        rng = self.rng
        up, lateral, anterior = frame
        n = len(self.tree.tubes[trunk].points)
        scas = []
        j_aica = int(n * rng.uniform(0.2, 0.35))
        j_sca = max(n - 1 - int(rng.uniform(1.5, 3.0) / _STEP_MM), 1)
        for side in (1.0, -1.0):
            if rng.random() < 0.7:
                self._twig(
                    trunk,
                    j_aica,
                    unit(side * lateral - 0.3 * up + 0.2 * rng.standard_normal(3)),
                    rng.uniform(0.5, 0.65),
                    rng.uniform(10, 16),
                    "aica",
                )
            scas.append(
                self._twig(
                    trunk,
                    j_sca,
                    unit(side * lateral - 0.3 * anterior),
                    rng.uniform(0.55, 0.85),
                    rng.uniform(12, 20),
                    "sca",
                    generation=2,
                )
            )
        return scas

    def _basilar_tip(
        self, trunk: int, r_p1: np.ndarray, frame: tuple[np.ndarray, np.ndarray, np.ndarray]
    ) -> list[int]:
        """A wide T into the P1s, which curve back round the midbrain into the P2s; returns the P1s."""
        rng = self.rng
        up, lateral, anterior = frame
        end = self.tree.tubes[trunk].points[-1]
        results = []
        for side, r in zip((1.0, -1.0), r_p1, strict=True):
            d = unit(side * lateral + 0.25 * up + 0.1 * rng.standard_normal(3))
            pl = [
                (rng.uniform(5.0, 8.0), rng.uniform(-10.0, 20.0), up),
                (rng.uniform(6.0, 10.0), rng.uniform(60.0, 100.0), -anterior),
                (rng.uniform(8.0, 14.0), rng.uniform(-20.0, 20.0), up),
            ]
            results.append(self.arc(end, d, float(r), float(r) * rng.uniform(0.8, 0.9), pl, noise=0.04))
        return self._split(trunk, results, ("p1", "p1"), "basilar_tip", 2)

    def _grow_mca(self) -> list[int]:
        """An M1 entering from the side, with lenticulostriate branches, ending in the MCA bi/trifurcation."""
        rng = self.rng
        up, lateral, anterior = self._frame()
        r_m1 = rng.uniform(1.15, 1.6)
        plan = [
            (rng.uniform(5.0, 9.0), rng.uniform(-25.0, 25.0), up),
            (rng.uniform(5.0, 9.0), rng.uniform(-25.0, 25.0), anterior),
        ]
        m1 = self.arc(
            np.zeros(3), lateral, r_m1, r_m1 * rng.uniform(0.88, 0.95), plan, noise=0.03, stop_outside=False
        )
        self._place(m1, -1, (0.35, 0.35, 0.35), (0.65, 0.65, 0.65))
        self._enter(m1)
        trunk = self.add(m1, "trunk", 1, float(rng.uniform(0.97, 1.03)), name="m1")
        n = len(self.tree.tubes[trunk].points)
        for _ in range(int(rng.integers(1, 4))):
            j = int(rng.integers(n // 3, max(n // 3 + 1, n - 4)))
            self._twig(
                trunk,
                j,
                unit(up + 0.3 * rng.standard_normal(3)),
                0.5,
                rng.uniform(8.0, 14.0),
                "lenticulostriate",
            )
        return self._mca(trunk, up, anterior)

    def _add_tails(self) -> None:
        """Let vessels that end inside the field of view fade out: a 2-5 mm tail tapering to 0.3 mm.

        Real small arteries do not stop; they thin below the resolution and vanish into partial volume.
        """
        split = {b.tube for b in self.tree.bifurcations}  # tubes whose end is a bifurcation
        for index, tube in enumerate(self.tree.tubes):
            if index in split or self._exited(tube) or tube.kind == "passing":
                continue
            tail = self.walk(
                tube.points[-1],
                tube.tangents[-1],
                float(tube.radii[-1]),
                0.3,
                self.rng.uniform(2.0, 5.0),
                tortuosity=0.2,
                steer=False,
                loop_rate=0.0,
                kink_rate=0.0,
                zrun_rate=0.0,
                side_rate=0.0,
                min_radius=0.3,
            )
            tube.points = np.concatenate([tube.points, tail.points[1:]])
            tube.radii = np.concatenate([tube.radii, tail.radii[1:]])

    def _exited(self, tube: Tube) -> bool:
        p = tube.points[-1]
        return bool(np.any(p < -tube.radii[-1]) or np.any(p > self.extent + tube.radii[-1]))

    def _entry(self) -> tuple[np.ndarray, np.ndarray, bool]:
        """Where the trunk enters: mostly from below (running up along Z), else through a side face."""
        rng, extent = self.rng, self.extent
        start = extent * rng.uniform(0.3, 0.7, size=3)
        if rng.random() < 0.65:
            start[2] = -1.0
            direction = unit(_EZ + 0.25 * rng.standard_normal(3) * np.array([1.0, 1.0, 0.0]))
            return start, direction, True
        axis = int(rng.integers(0, 2))
        side = int(rng.integers(0, 2))
        start[axis] = -1.0 if side == 0 else extent[axis] + 1.0
        direction = np.zeros(3)
        direction[axis] = 1.0 if side == 0 else -1.0
        direction = unit(direction + 0.4 * rng.standard_normal(3))
        return start, direction, False

    def _bifurcate(self, index: int, force_loop: bool = False) -> list[int]:
        """Murray bifurcation at the end of tube ``index``: returns the two children.

        With ``force_loop`` the first child tries to coil into a tight overlapping loop (see :meth:`walk`).
        """
        rng, tube = self.rng, self.tree.tubes[index]
        r0 = float(tube.radii[-1])
        ratio = rng.uniform(0.55, 1.0)
        r1 = r0 / (1.0 + ratio**3) ** (1.0 / 3.0)
        r2 = ratio * r1
        # Murray's optimal angles, widened: real intracranial bifurcations are often 70-130 degrees in total
        cos1 = np.clip((r0**4 + r1**4 - r2**4) / (2 * r0**2 * r1**2), -1, 1)
        cos2 = np.clip((r0**4 + r2**4 - r1**4) / (2 * r0**2 * r2**2), -1, 1)
        theta1, theta2 = np.arccos(cos1), np.arccos(cos2)
        if rng.random() < 0.35:
            # wide, T-shaped bifurcation (MCA-like), the typical home of an apex aneurysm
            widen = np.deg2rad(rng.uniform(120.0, 170.0)) / (theta1 + theta2)
        else:
            widen = rng.uniform(1.0, 1.6)
        theta1 = theta1 * widen + np.deg2rad(rng.normal(0, 6))
        theta2 = theta2 * widen + np.deg2rad(rng.normal(0, 6))
        d0 = tube.tangents[-1]
        m = perpendicular(rng, d0)
        d1 = np.cos(theta1) * d0 + np.sin(theta1) * m
        d2 = np.cos(theta2) * d0 - np.sin(theta2) * m
        end = len(tube.points) - 1
        children = []
        for r, d in ((r1, d1), (r2, d2)):
            r = max(r, MIN_RADIUS_MM)
            res = self.walk(
                tube.points[-1],
                d,
                r,
                max(MIN_RADIUS_MM, r * rng.uniform(0.75, 0.92)),
                rng.uniform(8.0, 20.0) * np.sqrt(r / 1.2),
                tortuosity=rng.uniform(0.1, 0.3),
                steer=rng.random() < 0.75,
                force_overlapping_loop=force_loop and not children,
            )
            value = float(np.clip(tube.value * rng.uniform(0.95, 1.02), 0.7, 1.05))
            children.append(self.add(res, "branch", tube.generation + 1, value, index, end))
        self.tree.bifurcations.append(Bifurcation(index, (children[0], children[1]), tube.points[-1], d0, r0))
        return children

    def _side_points(self, index: int) -> list[int]:
        tube = self.tree.tubes[index]
        s = tube.arclength
        # side branches drawn during the walk, kept away from both ends
        return [j for j in self.pending_side.get(index, []) if 2.0 < s[j] < s[-1] - 2.0]

    def _side_branch(self, index: int, j: int, force_loop: bool) -> int | None:
        rng, tube = self.rng, self.tree.tubes[index]
        r_parent = float(tube.radii[j])
        r = max(MIN_RADIUS_MM, r_parent * rng.uniform(0.3, 0.55))
        if not self.tree.inside(tube.points[j], margin=1.0):
            return None
        d = rotate(tube.tangents[j], perpendicular(rng, tube.tangents[j]), np.deg2rad(rng.uniform(45, 90)))
        res = self.walk(
            tube.points[j],
            d,
            r,
            max(MIN_RADIUS_MM, r * rng.uniform(0.75, 0.95)),
            rng.uniform(6.0, 16.0),
            tortuosity=rng.uniform(0.12, 0.35),
            steer=rng.random() < 0.6,
            side_rate=0.02,
            force_overlapping_loop=force_loop,
        )
        value = float(np.clip(tube.value * rng.uniform(0.9, 1.0), 0.7, 1.05))
        return self.add(res, "side", tube.generation + 1, value, index, j)

    def _passing_vessels(self) -> None:
        """Vessels of another territory that pass close by the tree without joining it."""
        rng, tree = self.rng, self.tree
        count = int(rng.choice([0, 1, 2], p=[0.25, 0.45, 0.30]))
        for _ in range(count):
            candidates = [
                (t, j)
                for t, tube in enumerate(tree.tubes)
                if tube.kind != "passing"
                for j in range(0, len(tube.points), 4)
                if tree.inside(tube.points[j], margin=6.0)
            ]
            if not candidates:
                return
            t, j = candidates[int(rng.integers(len(candidates)))]
            near = tree.tubes[t]
            tangent = near.tangents[j]
            normal = perpendicular(rng, tangent)
            r = rng.uniform(0.6, 1.4)
            gap = rng.uniform(0.2, 1.2)
            anchor = near.points[j] + normal * (near.radii[j] + r + gap)
            direction = perpendicular(rng, normal)
            halves = []
            for sign in (1.0, -1.0):
                halves.append(
                    self.walk(
                        anchor,
                        sign * direction,
                        r,
                        r * rng.uniform(0.85, 1.0),
                        rng.uniform(15.0, 30.0),
                        tortuosity=rng.uniform(0.05, 0.15),
                        steer=False,
                        loop_rate=0.0,
                        side_rate=0.0,
                    )
                )
            fwd, back = halves
            points = np.concatenate([back.points[::-1], fwd.points[1:]])
            radii = np.concatenate([back.radii[::-1], fwd.radii[1:]])
            result = _WalkResult(points, radii, [], [], True)
            index = self.add(result, "passing", 1, float(rng.uniform(0.55, 1.0)))
            tree.crossings.append(Crossing(index, t, anchor, float(gap)))


def grow_vessel_tree(
    rng: np.random.Generator,
    extent: Sequence[float],
    length_budget: float | None = None,
    max_tubes: int = 40,
    min_length: float | None = None,
    attempts: int = 5,
    template: str | None = None,
    force_overlapping_loop: bool = False,
) -> VesselTree:
    """Grow one arterial territory in the box ``[0, extent]`` (mm).

    Args:
        rng: random generator (the tree is a deterministic function of its state).
        extent: (3,) field of view in mm along (X, Y, Z).
        length_budget: stop branching once this much centreline (mm) lies inside the field of view.
            Default ``9 * mean(extent)`` for the random template, ``U(2.5, 7) * mean(extent)`` for the
            anatomical ones (so that some territories leave much of the field of view empty).
        max_tubes: stop branching after this many tubes. Default 40.
        min_length: regrow (up to ``attempts`` times) if less centreline than this lies inside.
            Default ``5 * mean(extent)`` for the random template, ``2 * mean(extent)`` otherwise.
        attempts: how many trees to try before keeping the longest.
        template: one of :data:`TEMPLATES`; default: drawn with probabilities ``TEMPLATE_PROBS``.
        force_overlapping_loop: every distal branch tries a tight, overlapping loop until the tree has one,
            whatever the template (otherwise the random template's side branches try one in 40 % of its trees).
            The draws change, so the tree is another one than without it.

    Returns:
        the tree; ``tree.template`` names its template.
    """
    extent_arr = np.asarray(extent, dtype=np.float64)
    if extent_arr.shape != (3,) or np.any(extent_arr <= 10.0):
        raise ValueError(f"extent must be 3 lengths > 10 mm, got {extent}.")
    if template is None:
        template = TEMPLATES[int(rng.choice(len(TEMPLATES), p=TEMPLATE_PROBS))]
    if template not in TEMPLATES:
        raise ValueError(f"Unknown template {template!r}; known templates: {list(TEMPLATES)}.")
    mean = float(extent_arr.mean())
    if length_budget is not None:
        budget = float(length_budget)
    else:
        budget = 9.0 * mean if template == "random" else rng.uniform(4.0, 10.0) * mean
    need = float(min_length) if min_length is not None else (5.0 if template == "random" else 2.0) * mean
    best, best_length = None, -1.0
    for attempt in range(attempts):
        grower = _TreeGrower(rng, extent_arr, budget, max_tubes, force_overlapping_loop)
        tree = grower.grow(template)
        length = tree.length_inside()
        if length > best_length:
            best, best_length = tree, length
        if length >= need:
            break
        logger.debug("tree attempt %d has only %.0f mm inside the field of view; regrowing", attempt, length)
    return best
