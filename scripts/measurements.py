"""Per-aneurysm measurements in world millimetres: size, neck, height, dome/neck ratio and position.

:func:`measure_aneurysms` takes one label volume (0 background, 1 vessel, 2 aneurysm) in its own voxel
grid and the 4x4 voxel-to-world affine that goes with it (``nibabel.load(f).affine``, or a MONAI
MetaTensor's ``.affine``, both RAS), and returns one :class:`AneurysmMeasurement` per aneurysm component.
:func:`write_case_measurements` writes one case as JSON and :func:`write_run_table` a whole run as CSV,
one row per aneurysm. :func:`aneurysm_components` adds the voxel map of the components under those
numbers (for per-component comparisons, e.g. which true aneurysm a prediction found).

Conventions:

* **World coordinates** are the affine's: RAS+ millimetres for NIfTI (+x towards the patient's right,
  +y anterior, +z superior). DICOM / ITK (LPS+) coordinates of the same point are ``(-x, -y, z)``.
  Every voxel centre is mapped through the full affine, so anisotropic spacing, flipped or permuted
  axes and oblique orientations are all handled exactly; no measurement assumes the grid is
  axis-aligned with the world.
* **Components** are the 26-connected components of label 2 (as the detection metric and the
  post-processing count them), numbered 1..N by descending voxel count, ties broken by the centroid's
  (x, y, z) in ascending order.
* **Surface samples.** A *boundary face* is a face between an aneurysm voxel and a 6-neighbour that is
  not in the component (outside the volume counts as background); its centre is the midpoint of the two
  voxel centres. A *boundary voxel* is a voxel with at least one boundary face. A *neck face* is a face
  between an aneurysm voxel and a vessel voxel; the neck is the set of neck faces, i.e. the digital
  aneurysm-vessel interface.

Definitions (all distances in mm between world points):

* ``voxels``: voxel count; ``volume_mm3``: ``voxels * |det(affine[:3, :3])|``.
* ``centroid_ras_mm``: mean of the component's voxel centres in world coordinates.
* ``max_diameter_mm``: the largest distance between two boundary voxel centres. No voxel-size
  correction: a voxel is labelled when its centre lies inside the object, so boundary centres lie just
  inside the surface, and a maximum over all directions finds a pair within a small fraction of a voxel
  of the true diameter. On digitised spheres (r = 4 to 16 voxels, random sub-voxel centres) it reads
  0.03 to 0.32 voxel short, whereas adding one voxel (or using face centres) reads 0.6 to 0.95 voxel
  long.
* ``touches_vessel``: the component has at least one neck face. A component that meets the vessel only
  at an edge or a corner does not touch it here (the post-processing's 26-neighbour rule would say it
  does); it has no neck to measure.
* ``neck_width_mm``: the largest distance between two neck-face centres; 0 when the aneurysm touches no
  vessel, and also 0 for a neck of a single face (narrower than the resolution).
* **Neck plane**: the plane through the area-weighted mean of the neck-face centres whose normal is the
  direction of least area-weighted variance of those centres (a least-squares fit), oriented from the
  neck towards the aneurysm's centroid. When the neck faces do not span a plane (the second principal
  standard deviation is below a quarter of the smallest voxel size, e.g. a neck one face wide along a
  line, or a single face), the normal is the unit vector from the neck centre to the aneurysm centroid.
* ``height_mm``: the largest signed distance of a boundary-face centre from the neck plane (how far the
  dome rises above the neck). Face centres, not voxel centres: along one fixed direction the outermost
  face is the unbiased sample of the surface, while the outermost voxel centre reads about half a voxel
  short at each end. None when there is no neck.
* ``dome_width_mm``: the largest distance between two boundary voxel centres projected onto the neck
  plane (the dome's largest width parallel to the neck). None when there is no neck.
* ``dome_neck_ratio`` = ``dome_width_mm / neck_width_mm`` and ``aspect_ratio`` = ``height_mm /
  neck_width_mm``; None when the neck width is 0.

Tolerances, as tested in ``tests/test_measurements.py`` (``h`` = the largest voxel size):

* volume within 3% for spheres of radius >= 8 voxels, or 5 voxels along the coarsest axis (measured
  -1.7% to +0.9%);
* maximum diameter within ``h / 2`` of ``2 r`` (measured 0 to 0.05 mm short at h = 0.6 to 1 mm);
* on a sphere capping a cylinder (axis-aligned at 1 mm, and oblique at 0.8 x 0.8 x 1 mm): neck width
  within ``1.5 h`` of the largest extent of the continuous contact patch (the part of the cylinder's
  surface inside the sphere), height within ``h / 2`` of the dome's distance from that patch's
  least-squares plane, dome width within ``h / 2`` (measured: neck +0.00 / +0.36 mm, height -0.04 /
  +0.15 mm, dome width -0.32 / -0.13 mm). Over random sub-voxel placements the neck reads up to 0.4 h
  short and 1.1 h long, because the digital interface sits up to a voxel off the continuous surface,
  where the sphere's chord differs; the height stays within 0.42 h.
* exact values (1e-9) for voxel-aligned blocks under any affine, and centroids equal to the known world
  point when the grid is symmetric about it.

Cost: one ``scipy.ndimage.label`` of the volume, then work on each component's bounding box only; the
pairwise maxima use the points' convex hull (``scipy.spatial.ConvexHull``) when there are many, so a
256^3 volume with three aneurysms takes 0.35 s on one CPU core.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from scripts.atomic_io import write_atomically
from scripts.labels import ANEURYSM_LABEL, BACKGROUND_LABEL, COMPONENT_CONNECTIVITY, VESSEL_LABEL

__all__ = [
    "COORDINATE_SYSTEM",
    "RUN_TABLE_COLUMNS",
    "AneurysmMeasurement",
    "aneurysm_components",
    "measure_aneurysms",
    "table_rows",
    "write_case_measurements",
    "write_run_table",
]

logger = logging.getLogger(__name__)

COORDINATE_SYSTEM = "RAS+ world millimetres of the label's affine (NIfTI); LPS+ (DICOM, ITK) is (-x, -y, z)"
"""Stated in every case file next to the centroids."""

RUN_TABLE_COLUMNS: tuple[str, ...] = (
    "case",
    "index",
    "voxels",
    "volume_mm3",
    "max_diameter_mm",
    "neck_width_mm",
    "height_mm",
    "dome_width_mm",
    "dome_neck_ratio",
    "aspect_ratio",
    "centroid_x_ras_mm",
    "centroid_y_ras_mm",
    "centroid_z_ras_mm",
    "touches_vessel",
)
"""The run table's first columns, in this order; any further keys of the rows follow in the order they
first appear. Empty cells are None values (no neck)."""

# Below this many points the pairwise maximum is computed directly; above, over the convex hull's vertices.
_DIRECT_POINTS = 512
# Rows of the pairwise distance matrix held at once (memory: rows x points x 3 doubles).
_DISTANCE_CHUNK = 256
# A neck whose second principal standard deviation is below this fraction of the smallest voxel size
# does not span a plane; its normal then points from the neck centre to the aneurysm centroid.
_FLAT_NECK_FRACTION = 0.25


@dataclass(frozen=True)
class AneurysmMeasurement:
    """Measurements of one aneurysm component; see the module docstring for every definition.

    Attributes:
        index: 1..N, by descending ``voxels``, ties by ascending centroid (x, y, z).
        voxels: voxel count.
        volume_mm3: volume in mm^3.
        max_diameter_mm: largest distance between two boundary voxel centres.
        neck_width_mm: largest distance between two neck-face centres; 0 without a neck.
        height_mm: largest distance of the surface from the neck plane; None without a neck.
        dome_width_mm: largest width parallel to the neck plane; None without a neck.
        dome_neck_ratio: ``dome_width_mm / neck_width_mm``; None when the neck width is 0.
        aspect_ratio: ``height_mm / neck_width_mm``; None when the neck width is 0.
        centroid_ras_mm: (x, y, z) mean voxel centre in RAS+ world mm.
        touches_vessel: at least one face shared with a vessel voxel.
    """

    index: int
    voxels: int
    volume_mm3: float
    max_diameter_mm: float
    neck_width_mm: float
    height_mm: float | None
    dome_width_mm: float | None
    dome_neck_ratio: float | None
    aspect_ratio: float | None
    centroid_ras_mm: tuple[float, float, float]
    touches_vessel: bool

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the fields in declaration order; the centroid as a list ``[x, y, z]``."""
        out = asdict(self)
        out["centroid_ras_mm"] = list(self.centroid_ras_mm)
        return out


# --------------------------------------------------------------------------------------------------------
# input checks


def _as_numpy(value: Any) -> np.ndarray:
    """numpy arrays and anything array-like, torch tensors (MetaTensors included) on any device."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _check_label(label: Any) -> np.ndarray:
    """``label`` as a 3D uint8 array of values 0/1/2; ValueError naming the problem otherwise."""
    array = _as_numpy(label)
    if array.ndim != 3:
        raise ValueError(
            f"label must be a 3D volume (D, H, W), got shape {array.shape}; squeeze a channel axis first"
        )
    if not (array.dtype == bool or np.issubdtype(array.dtype, np.number)):
        raise ValueError(f"label must hold integer labels 0/1/2, got dtype {array.dtype}")
    allowed = (BACKGROUND_LABEL, VESSEL_LABEL, ANEURYSM_LABEL)
    unknown = np.unique(array[~np.isin(array, allowed)]) if array.size else np.empty(0)
    if unknown.size:
        raise ValueError(f"label holds values {unknown[:10].tolist()} outside {list(allowed)}")
    return array.astype(np.uint8)


def _check_affine(affine: Any) -> np.ndarray:
    """``affine`` as a float (4, 4) array with an invertible linear part; ValueError naming the problem."""
    array = _as_numpy(affine).astype(float)
    if array.shape != (4, 4):
        raise ValueError(f"affine must be a 4x4 voxel-to-world matrix, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"affine must be finite, got {array.tolist()}")
    if not np.allclose(array[3], (0.0, 0.0, 0.0, 1.0)):
        raise ValueError(f"affine's last row must be [0, 0, 0, 1], got {array[3].tolist()}")
    if abs(np.linalg.det(array[:3, :3])) < 1e-12:
        raise ValueError(f"affine's 3x3 part is singular (zero voxel volume): {array[:3, :3].tolist()}")
    return array


# --------------------------------------------------------------------------------------------------------
# geometry helpers


def _shifted(mask: np.ndarray, axis: int, step: int) -> np.ndarray:
    """``out[i] = mask[i + step * e_axis]``, False where that falls outside the array."""
    out = np.zeros_like(mask)
    src = [slice(None)] * 3
    dst = [slice(None)] * 3
    if step > 0:
        src[axis], dst[axis] = slice(step, None), slice(None, -step)
    else:
        src[axis], dst[axis] = slice(None, step), slice(-step, None)
    out[tuple(dst)] = mask[tuple(src)]
    return out


def _max_distance(points: np.ndarray) -> float:
    """Largest pairwise Euclidean distance of ``points`` (N, 2 or 3); 0 for fewer than two points.

    The farthest pair of a point set are vertices of its convex hull, so for many points the search runs
    over the hull's vertices only; flat or collinear sets are hulled with Qhull's joggle (``QJ``), whose
    vertices are still input points.
    """
    if len(points) < 2:
        return 0.0
    if len(points) > _DIRECT_POINTS:
        try:
            points = points[ConvexHull(points).vertices]
        except QhullError:  # all points in a plane (3D) or on a line
            points = points[ConvexHull(points, qhull_options="QJ").vertices]
    best = 0.0
    for start in range(0, len(points), _DISTANCE_CHUNK):
        chunk = points[start : start + _DISTANCE_CHUNK]
        # (chunk, 1, dims) - (1, N, dims) -> (chunk, N) squared distances
        squared = ((chunk[:, None, :] - points[None, :, :]) ** 2).sum(axis=-1)
        best = max(best, float(squared.max()))
    return math.sqrt(best)


def _neck_plane(
    centres: np.ndarray, areas: np.ndarray, towards: np.ndarray, min_voxel_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares plane of the neck-face centres, weighted by face area.

    Args:
        centres: (F, 3) neck-face centres in world mm, F >= 1.
        areas: (F,) face areas in mm^2.
        towards: (3,) the aneurysm's centroid; the normal points to its side.
        min_voxel_mm: smallest voxel size, the scale of "does not span a plane".

    Returns:
        ``(point, normal)``: the area-weighted mean of the centres and a unit normal.
    """
    weights = areas / areas.sum()
    point = weights @ centres  # (F,) @ (F, 3) -> (3,)
    offsets = centres - point
    covariance = (offsets * weights[:, None]).T @ offsets  # (3, 3)
    variances, axes = np.linalg.eigh(covariance)  # ascending
    if math.sqrt(max(variances[1], 0.0)) >= _FLAT_NECK_FRACTION * min_voxel_mm:
        normal = axes[:, 0]
    else:  # a line or a single face: no plane to fit
        normal = towards - point
        length = np.linalg.norm(normal)
        normal = normal / length if length > 0 else axes[:, 0]
    if normal @ (towards - point) < 0:
        normal = -normal
    return point, normal


def _in_plane(points: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """(N, 3) world points -> (N, 2) coordinates in the plane orthogonal to ``normal``."""
    # two orthonormal vectors spanning the plane: the last two right-singular vectors of the normal
    basis = np.linalg.svd(normal[None, :])[2][1:]  # (2, 3)
    return points @ basis.T


# --------------------------------------------------------------------------------------------------------
# measurement


def _faces(
    component: np.ndarray, vessel: np.ndarray, to_world: np.ndarray, face_areas: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Boundary voxels, boundary-face centres and neck faces of one component in a padded box.

    Args:
        component: (d, h, w) bool, the component, with at least one background voxel around it.
        vessel: (d, h, w) bool vessel mask of the same box.
        to_world: (4, 4) affine of the box's voxel indices.
        face_areas: (3,) area (mm^2) of a face orthogonal to each voxel axis.

    Returns:
        ``(boundary_voxels, surface_points, neck_points, neck_areas)``: (d, h, w) bool, then world
        points (N, 3), (F, 3) and areas (F,).
    """
    linear, shift = to_world[:3, :3], to_world[:3, 3]
    boundary = np.zeros_like(component)
    surface, neck, neck_areas = [], [], []
    for axis in range(3):
        for step in (-1, 1):
            neighbour_in = _shifted(component, axis, step)
            neighbour_vessel = _shifted(vessel, axis, step)
            outer = component & ~neighbour_in
            boundary |= outer
            half = np.zeros(3)
            half[axis] = 0.5 * step
            # face centre = voxel centre + half a step towards the neighbour, in voxel indices
            surface.append(np.argwhere(outer) + half)
            touching = component & neighbour_vessel
            neck.append(np.argwhere(touching) + half)
            neck_areas.append(np.full(len(neck[-1]), face_areas[axis]))
    surface_points = np.concatenate(surface) @ linear.T + shift
    neck_points = np.concatenate(neck) @ linear.T + shift
    return boundary, surface_points, neck_points, np.concatenate(neck_areas)


def _measure_component(component: np.ndarray, vessel: np.ndarray, to_world: np.ndarray) -> dict[str, Any]:
    """Every measurement but ``index`` of one component in its padded bounding box."""
    linear, shift = to_world[:3, :3], to_world[:3, 3]
    columns = [linear[:, axis] for axis in range(3)]
    face_areas = np.array(
        [np.linalg.norm(np.cross(columns[(a + 1) % 3], columns[(a + 2) % 3])) for a in range(3)]
    )
    min_voxel_mm = float(np.linalg.norm(linear, axis=0).min())

    voxels = int(np.count_nonzero(component))
    centroid = np.argwhere(component).mean(axis=0) @ linear.T + shift
    boundary, surface_points, neck_points, neck_areas = _faces(component, vessel, to_world, face_areas)
    boundary_points = np.argwhere(boundary) @ linear.T + shift
    result: dict[str, Any] = {
        "voxels": voxels,
        "volume_mm3": voxels * abs(float(np.linalg.det(linear))),
        "max_diameter_mm": _max_distance(boundary_points),
        "neck_width_mm": 0.0,
        "height_mm": None,
        "dome_width_mm": None,
        "dome_neck_ratio": None,
        "aspect_ratio": None,
        "centroid_ras_mm": tuple(float(c) for c in centroid),
        "touches_vessel": len(neck_points) > 0,
    }
    if not result["touches_vessel"]:
        return result
    neck_width = _max_distance(neck_points)
    point, normal = _neck_plane(neck_points, neck_areas, centroid, min_voxel_mm)
    height = float(((surface_points - point) @ normal).max())
    dome_width = _max_distance(_in_plane(boundary_points, normal))
    result.update(neck_width_mm=neck_width, height_mm=height, dome_width_mm=dome_width)
    if neck_width > 0:
        result.update(dome_neck_ratio=dome_width / neck_width, aspect_ratio=height / neck_width)
    return result


def measure_aneurysms(label: np.ndarray, affine: np.ndarray) -> list[AneurysmMeasurement]:
    """Measure every aneurysm component of one label volume in world millimetres.

    Example::

        image = nibabel.load("case_007_pred.nii.gz")
        found = measure_aneurysms(np.asarray(image.dataobj), image.affine)

    Args:
        label: (D, H, W) integer labels 0 background, 1 vessel, 2 aneurysm, in the volume's own voxel
            grid (bool or integral floats accepted).
        affine: (4, 4) voxel-index-to-world matrix (RAS+ mm for NIfTI), as nibabel gives it; any
            spacing, axis order, flips or obliquity.

    Returns:
        One :class:`AneurysmMeasurement` per 26-connected component of label 2, numbered 1..N by
        descending voxel count, ties by ascending centroid (x, y, z); empty when there is no aneurysm.

    Raises:
        ValueError: when ``label`` is not 3D or holds other values than 0/1/2, or ``affine`` is not a
            finite 4x4 matrix with last row [0, 0, 0, 1] and an invertible 3x3 part.
    """
    array = _check_label(label)
    matrix = _check_affine(affine)
    # one background voxel around the volume, so every padded bounding box below lies inside the array
    padded = np.pad(array, 1)
    components, count = ndimage.label(padded == ANEURYSM_LABEL, structure=COMPONENT_CONNECTIVITY)
    measured = []
    for number, box in enumerate(ndimage.find_objects(components), start=1):
        box = tuple(slice(s.start - 1, s.stop + 1) for s in box)
        # padded-box index i is original voxel index i + start - 1
        to_world = matrix.copy()
        to_world[:3, 3] = matrix[:3, :3] @ np.array([s.start - 1 for s in box], dtype=float) + matrix[:3, 3]
        measured.append(_measure_component(components[box] == number, padded[box] == VESSEL_LABEL, to_world))
    measured.sort(key=lambda m: (-m["voxels"], *m["centroid_ras_mm"]))
    logger.debug("measured %d aneurysm components", count)
    return [AneurysmMeasurement(index=i, **m) for i, m in enumerate(measured, start=1)]


def aneurysm_components(
    label: np.ndarray, affine: np.ndarray
) -> tuple[list[AneurysmMeasurement], np.ndarray]:
    """:func:`measure_aneurysms` and where each measured aneurysm is, under the same numbers.

    Each 26-connected component of label 2 is matched to its measurement by voxel count and centroid
    (the nearest of the components of that count), so the map follows :func:`measure_aneurysms`'s
    numbering whatever that rule is.

    Args:
        label: (D, H, W) labels 0/1/2, as for :func:`measure_aneurysms`.
        affine: (4, 4) voxel-to-world matrix, as for :func:`measure_aneurysms`.

    Returns:
        ``(measurements, numbers)``: the measurements, and a (D, H, W) int32 map holding each aneurysm
        voxel's ``index`` (1..N) and 0 elsewhere.

    Raises:
        ValueError: as :func:`measure_aneurysms`.
    """
    measurements = measure_aneurysms(label, affine)
    array, matrix = _check_label(label), _check_affine(affine)
    components, count = ndimage.label(array == ANEURYSM_LABEL, structure=COMPONENT_CONNECTIVITY)
    voxels, centres = np.zeros(count, dtype=np.int64), np.zeros((count, 3))
    for number, box in enumerate(ndimage.find_objects(components), start=1):
        inside = np.argwhere(components[box] == number)  # (n, 3) voxel indices within the box
        voxels[number - 1] = len(inside)
        centres[number - 1] = inside.mean(axis=0) + [s.start for s in box]
    centres = centres @ matrix[:3, :3].T + matrix[:3, 3]  # (count, 3) mean voxel index -> world mm
    number_of = np.zeros(count + 1, dtype=np.int32)
    for m in measurements:
        candidates = np.flatnonzero((voxels == m.voxels) & (number_of[1:] == 0))
        distances = np.linalg.norm(centres[candidates] - np.asarray(m.centroid_ras_mm), axis=1)
        number_of[candidates[int(np.argmin(distances))] + 1] = m.index
    return measurements, number_of[components]


# --------------------------------------------------------------------------------------------------------
# files


def write_case_measurements(
    path: str | os.PathLike,
    case_name: str,
    measurements: Sequence[AneurysmMeasurement],
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write one case's measurements as JSON, atomically.

    The file holds ``{"case", "coordinate_system", **extra, "aneurysm_count", "aneurysms"}``, where
    ``aneurysms`` is the list of :meth:`AneurysmMeasurement.as_dict` in index order and missing values
    are ``null``.

    Args:
        path: the JSON file to create or replace.
        case_name: the case's name, non-empty.
        measurements: from :func:`measure_aneurysms`.
        extra: further JSON-serialisable top-level entries (e.g. ``{"source": "pred"}``); may not reuse
            the keys above.

    Raises:
        ValueError: on an empty case name or an ``extra`` key that collides with the file's own keys.
    """
    if not isinstance(case_name, str) or not case_name:
        raise ValueError(f"case_name must be a non-empty string, got {case_name!r}")
    extra = dict(extra or {})
    reserved = {"case", "coordinate_system", "aneurysm_count", "aneurysms"}
    clashes = sorted(reserved & set(extra))
    if clashes:
        raise ValueError(f"extra may not set the case file's own keys {clashes}")
    document = {
        "case": case_name,
        "coordinate_system": COORDINATE_SYSTEM,
        **extra,
        "aneurysm_count": len(measurements),
        "aneurysms": [m.as_dict() for m in measurements],
    }
    write_atomically(path, json.dumps(document, indent=2, allow_nan=False) + "\n")


def table_rows(case_name: str, measurements: Iterable[AneurysmMeasurement]) -> list[dict[str, Any]]:
    """One run-table row (keys :data:`RUN_TABLE_COLUMNS`) per aneurysm of a case."""
    rows = []
    for m in measurements:
        row = {"case": case_name, **m.as_dict()}
        x, y, z = row.pop("centroid_ras_mm")
        row.update(centroid_x_ras_mm=x, centroid_y_ras_mm=y, centroid_z_ras_mm=z)
        rows.append({key: row[key] for key in RUN_TABLE_COLUMNS})
    return rows


def write_run_table(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write the run's aneurysms as CSV, one row each, atomically.

    Columns: :data:`RUN_TABLE_COLUMNS` in that order, then any further keys of the rows (e.g. a
    ``source`` of ``pred`` or ``label``) in the order they first appear; None and absent further keys are
    empty cells. A run without aneurysms gets the header only.

    Args:
        path: the CSV file to create or replace.
        rows: mappings with at least the keys :data:`RUN_TABLE_COLUMNS`, e.g. from :func:`table_rows`.

    Raises:
        ValueError: naming the row and the key when a row lacks one of :data:`RUN_TABLE_COLUMNS`.
    """
    rows = list(rows)
    columns = list(RUN_TABLE_COLUMNS)
    for number, row in enumerate(rows):
        missing = [key for key in RUN_TABLE_COLUMNS if key not in row]
        if missing:
            raise ValueError(f"run table row {number} lacks {missing}; rows need {list(RUN_TABLE_COLUMNS)}")
        columns += [key for key in row if key not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)  # the csv module writes None as an empty cell
    write_atomically(path, buffer.getvalue())
