"""Branching, tortuous, tapering arterial trees grown as random walks with smooth curvature.

All coordinates are millimetres in the volume's index frame (voxel ``(i, j, k)`` centre at
``(i * sx, j * sy, k * sz)``); the field of view is the box ``[0, extent]``. Z (the last axis) is the
superior-inferior direction, so a vessel running along Z crosses the axial slices as a bright disc.

What a tree contains, and why each piece is there:

* a trunk (radius 1.6-2.5 mm, like the supraclinoid ICA) that usually enters from below and runs along Z;
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

__all__ = ["Bifurcation", "Crossing", "Loop", "Tube", "VesselTree", "grow_vessel_tree"]

logger = logging.getLogger(__name__)

MIN_RADIUS_MM = 0.5
MAX_RADIUS_MM = 2.5
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
    """

    points: np.ndarray
    radii: np.ndarray
    kind: str
    generation: int
    value: float = 1.0
    parent: int | None = None
    parent_index: int | None = None

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
    """Where ``tube`` ends and splits into ``children``; ``direction`` is the parent's flow direction."""

    tube: int
    children: tuple[int, int]
    point: np.ndarray
    direction: np.ndarray
    radius: float


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

    def translate(self, shift: np.ndarray) -> None:
        """Move the whole tree by ``shift`` (mm), in place (the field of view stays where it is)."""
        shift = np.asarray(shift, dtype=np.float64)
        for tube in self.tubes:
            tube.points += shift
        for landmark in (*self.bifurcations, *self.crossings):
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


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def _perpendicular(rng: np.random.Generator, d: np.ndarray) -> np.ndarray:
    """A random unit vector perpendicular to unit ``d``."""
    v = rng.standard_normal(3)
    v -= (v @ d) * d
    return _unit(v)


def _rotate(d: np.ndarray, axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues rotation of ``d`` about unit ``axis``."""
    return d * np.cos(angle) + np.cross(axis, d) * np.sin(angle) + axis * (axis @ d) * (1.0 - np.cos(angle))


@dataclass
class _WalkResult:
    points: np.ndarray
    radii: np.ndarray
    side_points: list[int]
    loops: list[tuple[int, int, np.ndarray, float, float, float, bool]]
    exited: bool


class _TreeGrower:
    """Grows one tree; holds the random generator and the field of view."""

    def __init__(self, rng: np.random.Generator, extent: np.ndarray, length_budget: float, max_tubes: int):
        self.rng = rng
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
        """Random walk with smooth curvature. Rates are per mm; curvature std ``tortuosity`` (1/mm)."""
        rng, step = self.rng, _STEP_MM
        corr = 4.0  # curvature correlation length, mm
        n_steps = max(3, int(round(length / step)))
        p, d = np.asarray(start, float).copy(), _unit(np.asarray(direction, float))
        kappa = np.zeros(3)
        points, radii, side, loops = [p.copy()], [r0], [], []
        zrun_left, z_target = zrun_first, _EZ * (1.0 if d[2] >= 0 else -1.0)
        forced_at = (
            int(rng.integers(n_steps // 4, max(n_steps // 4 + 1, 3 * n_steps // 4)))
            if force_overlapping_loop
            else -1
        )
        k, exited = 0, False
        half, margin = self.extent / 2.0, 4.0
        while k < n_steps:
            r = r0 + (r1 - r0) * k / n_steps
            u = rng.random(4)
            want_loop = k == forced_at or (loop_rate > 0 and u[0] < loop_rate * step and 3 < k < n_steps - 6)
            if want_loop and r <= 1.6 and zrun_left <= 0:
                overlapping = k == forced_at or rng.random() < 0.4
                k += self._loop(points, radii, loops, d, r, overlapping)
                p = points[-1].copy()
                d = _unit(points[-1] - points[-2])
                continue
            if u[1] < kink_rate * step:
                d = _rotate(d, _perpendicular(rng, d), np.deg2rad(rng.uniform(30.0, 65.0)))
            if zrun_left <= 0 and u[2] < zrun_rate * step:
                zrun_left = rng.uniform(8.0, 18.0)
                z_target = _EZ * (1.0 if d[2] >= 0 else -1.0)
            noise = rng.standard_normal(3)
            kappa = kappa * (1.0 - step / corr) + tortuosity * np.sqrt(step / corr) * noise
            kappa -= (kappa @ d) * d
            if zrun_left > 0:
                d = d + 0.35 * (z_target - d)
                zrun_left -= step
                bend = 0.25 * kappa
            else:
                bend = kappa
            d = d + bend * step
            if steer:
                q = p - self.centre
                over = np.abs(q) - (half - margin)
                if np.any(over > 0):
                    push = -np.sign(q) * np.clip(over, 0.0, None)
                    if d @ push < 0.2 * np.linalg.norm(push):
                        d = d + 0.15 * _unit(push)
            d = _unit(d)
            p = p + d * step
            points.append(p.copy())
            radii.append(r)
            k += 1
            if u[3] < side_rate * step and r >= 0.9:
                side.append(len(points) - 1)
            if np.any(p < -(r + 1.5)) or np.any(p > self.extent + r + 1.5):
                exited = True
                break
        radii_arr = np.asarray(radii)
        # smooth +-4 % calibre wobble
        wobble = np.convolve(rng.standard_normal(len(radii_arr) + 8), np.ones(9) / 3.0, mode="valid")
        radii_arr = np.clip(radii_arr * (1.0 + 0.04 * wobble), min_radius, MAX_RADIUS_MM)
        return _WalkResult(np.asarray(points), radii_arr, side, loops, exited)

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
        m = _perpendicular(rng, d)
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
        self, result: _WalkResult, kind: str, generation: int, value: float, parent=None, parent_index=None
    ):
        tube = Tube(result.points, result.radii, kind, generation, value, parent, parent_index)
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

    def grow(self) -> VesselTree:
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
        queue = deque([self.add(trunk, "trunk", 0, float(rng.uniform(0.97, 1.03)))])
        overlapping_loop_due = rng.random() < 0.4
        while queue:
            index = queue.popleft()
            tube = self.tree.tubes[index]
            children = []
            can_split = (
                self.room() and not self._exited(tube) and tube.radii[-1] >= 0.75 and tube.generation < 4
            )
            if can_split and rng.random() < 0.9:
                children.extend(self._bifurcate(index))
            for j in self._side_points(index):
                if not self.room():
                    break
                child = self._side_branch(index, j, force_loop=overlapping_loop_due)
                if child is not None:
                    overlapping_loop_due = overlapping_loop_due and not any(
                        lp.tube == child and lp.overlapping for lp in self.tree.loops
                    )
                    children.append(child)
            queue.extend(children)
        self._add_tails()
        self._passing_vessels()
        return self.tree

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
            direction = _unit(_EZ + 0.25 * rng.standard_normal(3) * np.array([1.0, 1.0, 0.0]))
            return start, direction, True
        axis = int(rng.integers(0, 2))
        side = int(rng.integers(0, 2))
        start[axis] = -1.0 if side == 0 else extent[axis] + 1.0
        direction = np.zeros(3)
        direction[axis] = 1.0 if side == 0 else -1.0
        direction = _unit(direction + 0.4 * rng.standard_normal(3))
        return start, direction, False

    def _bifurcate(self, index: int) -> list[int]:
        """Murray bifurcation at the end of tube ``index``: returns the two children."""
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
        m = _perpendicular(rng, d0)
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
        d = _rotate(tube.tangents[j], _perpendicular(rng, tube.tangents[j]), np.deg2rad(rng.uniform(45, 90)))
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
            normal = _perpendicular(rng, tangent)
            r = rng.uniform(0.6, 1.4)
            gap = rng.uniform(0.2, 1.2)
            anchor = near.points[j] + normal * (near.radii[j] + r + gap)
            direction = _perpendicular(rng, normal)
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
) -> VesselTree:
    """Grow a random intracranial-like arterial tree in the box ``[0, extent]`` (mm).

    Args:
        rng: random generator (the tree is a deterministic function of its state).
        extent: (3,) field of view in mm along (X, Y, Z).
        length_budget: stop branching once this much centreline (mm) lies inside the field of view.
            Default ``9 * mean(extent)``.
        max_tubes: stop branching after this many tubes. Default 40.
        min_length: regrow (up to ``attempts`` times) if less centreline than this lies inside.
            Default ``5 * mean(extent)``.
        attempts: how many trees to try before keeping the longest.

    Returns:
        the tree.
    """
    extent_arr = np.asarray(extent, dtype=np.float64)
    if extent_arr.shape != (3,) or np.any(extent_arr <= 10.0):
        raise ValueError(f"extent must be 3 lengths > 10 mm, got {extent}.")
    budget = 9.0 * float(extent_arr.mean()) if length_budget is None else float(length_budget)
    need = 5.0 * float(extent_arr.mean()) if min_length is None else float(min_length)
    best, best_length = None, -1.0
    for attempt in range(attempts):
        grower = _TreeGrower(rng, extent_arr, budget, max_tubes)
        tree = grower.grow()
        length = tree.length_inside()
        if length > best_length:
            best, best_length = tree, length
        if length >= need:
            break
        logger.debug("tree attempt %d has only %.0f mm inside the field of view; regrowing", attempt, length)
    return best
