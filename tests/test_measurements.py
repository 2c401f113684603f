"""Per-aneurysm measurements on shapes of known size, at anisotropic spacing and in any orientation.

Every shape is built in world millimetres (a voxel is labelled when its centre, mapped through the
affine, lies inside), so the expected values are those of the continuous shape; ``h`` is the largest
voxel size. Tolerances are those stated in ``scripts/measurements.py``.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from scipy.spatial.distance import pdist

from scripts.measurements import (
    COORDINATE_SYSTEM,
    RUN_TABLE_COLUMNS,
    _max_distance,
    _neck_plane,
    measure_aneurysms,
    table_rows,
    write_case_measurements,
    write_run_table,
)


def _affine(linear, origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = origin
    return affine


def _world(shape, affine) -> np.ndarray:
    """(D, H, W, 3) world coordinates of the voxel centres."""
    index = np.indices(shape).reshape(3, -1).T.astype(float)  # (N, 3) voxel indices
    return (index @ affine[:3, :3].T + affine[:3, 3]).reshape(*shape, 3)


def _sphere(shape, affine, centre, radius) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    label[((_world(shape, affine) - centre) ** 2).sum(-1) <= radius**2] = 2
    return label


def _capped_cylinder(shape, affine, vessel_radius, sac_radius, sac_distance) -> np.ndarray:
    """Vessel: cylinder along world z through the origin. Aneurysm: sphere centred at x = sac_distance,
    minus the vessel (the sac beyond the parent wall)."""
    world = _world(shape, affine)
    vessel = world[..., 0] ** 2 + world[..., 1] ** 2 <= vessel_radius**2
    sac = ((world - (sac_distance, 0.0, 0.0)) ** 2).sum(-1) <= sac_radius**2
    label = np.zeros(shape, np.uint8)
    label[vessel] = 1
    label[sac & ~vessel] = 2
    return label


def _capped_cylinder_truth(vessel_radius, sac_radius, sac_distance) -> tuple[float, float]:
    """Neck width and height of the continuous capped cylinder.

    The contact patch is the part of the cylinder's surface inside the sphere: at angle t from the sac's
    side, |z| <= zmax(t) with zmax^2 = R^2 - r^2 - d^2 + 2 r d cos t. Its widest extent is along the axis
    at t = 0 (the chord 2 sqrt(R^2 - (d - r)^2)); its least-squares plane is x = the area-weighted mean
    of r cos t; the dome's top is at x = d + R.
    """
    r, big_r, d = vessel_radius, sac_radius, sac_distance
    neck = 2.0 * math.sqrt(big_r**2 - (d - r) ** 2)
    angle = np.linspace(-math.pi, math.pi, 200_001)
    length = 2.0 * np.sqrt(np.clip(big_r**2 - r**2 - d**2 + 2 * r * d * np.cos(angle), 0.0, None))
    plane_x = float((r * np.cos(angle) * length).sum() / length.sum())
    return neck, d + big_r - plane_x


def _rotation(axis, degrees) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = math.radians(degrees)
    return np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * k @ k  # Rodrigues


# --------------------------------------------------------------------------------------------------------
# spheres


@pytest.mark.parametrize("radius, offset", [(8, (0.0, 0.0, 0.0)), (10, (0.31, -0.17, 0.44))])
def test_sphere_volume_diameter_and_centroid(radius, offset):
    affine = _affine(np.eye(3), origin=(-16.0, -16.0, -16.0))
    centre = np.array(offset)
    (m,) = measure_aneurysms(_sphere((33, 33, 33), affine, centre, radius), affine)
    assert m.index == 1 and not m.touches_vessel
    assert m.volume_mm3 == pytest.approx(4 / 3 * math.pi * radius**3, rel=0.03)
    assert abs(m.max_diameter_mm - 2 * radius) <= 0.5  # h = 1 mm
    np.testing.assert_allclose(m.centroid_ras_mm, centre, atol=0.1)


def test_anisotropic_sphere_in_world_mm():
    spacing = (0.3, 0.3, 0.6)
    affine = _affine(np.diag(spacing), origin=(-6.0, -6.0, -6.0))
    centre, radius = np.array([0.07, -0.11, 0.2]), 3.0
    (m,) = measure_aneurysms(_sphere((41, 41, 21), affine, centre, radius), affine)
    assert m.voxels * 0.3 * 0.3 * 0.6 == pytest.approx(m.volume_mm3)
    assert m.volume_mm3 == pytest.approx(4 / 3 * math.pi * radius**3, rel=0.03)
    assert abs(m.max_diameter_mm - 2 * radius) <= 0.5 * max(spacing)
    np.testing.assert_allclose(m.centroid_ras_mm, centre, atol=0.1 * max(spacing))


def test_orientation_changes_nothing_but_the_grid():
    """The same world lattice as an RAS diagonal grid and as an LPS-like, axis-permuted, flipped grid."""
    centre, radius = np.array([10.0, -20.0, 30.0]), 3.1
    ras = _affine(np.diag([0.4, 0.5, 0.6]), origin=centre - (16 * 0.4, 14 * 0.5, 12 * 0.6))
    # voxel axis 0 -> world -y, axis 1 -> world +z, axis 2 -> world -x; the centre is voxel (14, 12, 16)
    lps = _affine([[0, 0, -0.4], [-0.5, 0, 0], [0, 0.6, 0]], origin=centre - (-16 * 0.4, -14 * 0.5, 12 * 0.6))
    (a,) = measure_aneurysms(_sphere((33, 29, 25), ras, centre, radius), ras)
    (b,) = measure_aneurysms(_sphere((29, 25, 33), lps, centre, radius), lps)
    assert a.voxels == b.voxels > 0
    assert b.volume_mm3 == pytest.approx(a.volume_mm3, rel=1e-12)
    assert b.max_diameter_mm == pytest.approx(a.max_diameter_mm, abs=1e-9)
    assert abs(b.max_diameter_mm - 2 * radius) <= 0.5 * 0.6
    # a grid symmetric about the centre: the centroid is the known world point
    np.testing.assert_allclose(a.centroid_ras_mm, centre, atol=1e-9)
    np.testing.assert_allclose(b.centroid_ras_mm, centre, atol=1e-9)


# --------------------------------------------------------------------------------------------------------
# necks


@pytest.mark.parametrize(
    "linear, shape, origin_shift",
    [
        (np.eye(3), (40, 40, 40), (0.2, -0.3, 0.1)),
        (_rotation((1.0, 2.0, 3.0), 40.0) @ np.diag([0.8, 0.8, 1.0]), (40, 40, 32), (-0.1, 0.15, 0.05)),
    ],
    ids=["axis_aligned", "oblique_anisotropic"],
)
def test_sphere_capping_a_cylinder(linear, shape, origin_shift):
    vessel_radius, sac_radius, sac_distance = 4.0, 6.0, 8.0
    # grid centred near the world origin, where the vessel axis passes
    origin = -(linear @ (np.array(shape) / 2.0)) + origin_shift
    affine = _affine(linear, origin)
    h = float(np.linalg.norm(linear, axis=0).max())
    label = _capped_cylinder(shape, affine, vessel_radius, sac_radius, sac_distance)
    (m,) = measure_aneurysms(label, affine)
    neck, height = _capped_cylinder_truth(vessel_radius, sac_radius, sac_distance)
    assert m.touches_vessel
    assert abs(m.neck_width_mm - neck) <= 1.5 * h, (m.neck_width_mm, neck)
    assert abs(m.height_mm - height) <= 0.5 * h, (m.height_mm, height)
    # the sac's equator (x = 8, a disc of radius 6) lies clear of the vessel: dome width 12
    assert abs(m.dome_width_mm - 2 * sac_radius) <= 0.5 * h
    assert m.dome_neck_ratio == pytest.approx(m.dome_width_mm / m.neck_width_mm)
    assert m.aspect_ratio == pytest.approx(m.height_mm / m.neck_width_mm)


def test_block_on_a_slab_hand_computed():
    """A 4 x 4 x 10 voxel block standing on a vessel slab, anisotropic and axis-permuted: exact values.

    In voxel indices the slab fills axis-2 layers 0..2 and the block layers 3..12 over a 4 x 4 square;
    the neck faces lie in the plane between layers 2 and 3, their centres 3 voxels apart per side.
    """
    sx, sy, sz = 0.5, 0.7, 0.9  # voxel sizes along voxel axes 0, 1, 2
    # voxel axis 0 -> world -z, axis 1 -> world +x, axis 2 -> world -y
    affine = _affine([[0, sy, 0], [0, 0, -sz], [-sx, 0, 0]], origin=(1.0, 2.0, 3.0))
    label = np.zeros((8, 8, 16), np.uint8)
    label[:, :, 0:3] = 1
    label[2:6, 2:6, 3:13] = 2
    (m,) = measure_aneurysms(label, affine)
    neck = math.hypot(3 * sx, 3 * sy)
    assert m.voxels == 160 and m.volume_mm3 == pytest.approx(160 * sx * sy * sz)
    assert m.max_diameter_mm == pytest.approx(math.sqrt((3 * sx) ** 2 + (3 * sy) ** 2 + (9 * sz) ** 2))
    assert m.neck_width_mm == pytest.approx(neck)
    assert m.height_mm == pytest.approx(10 * sz)  # neck plane to the block's top face
    assert m.dome_width_mm == pytest.approx(neck)  # the block's width parallel to the neck
    assert m.dome_neck_ratio == pytest.approx(1.0)
    assert m.aspect_ratio == pytest.approx(10 * sz / neck)
    centre_index = np.array([3.5, 3.5, 7.5])
    np.testing.assert_allclose(m.centroid_ras_mm, affine[:3, :3] @ centre_index + affine[:3, 3], atol=1e-12)


def test_single_face_neck_has_no_width_and_height_along_the_centroid():
    label = np.zeros((7, 7, 10), np.uint8)
    label[3, 3, 0:4] = 1  # a thin vessel ending under the middle of the sac
    label[2:5, 2:5, 4:7] = 2  # 3 x 3 x 3 sac; one face shared with the vessel, at z = 3.5
    (m,) = measure_aneurysms(label, np.eye(4))
    assert m.touches_vessel and m.neck_width_mm == 0.0
    assert m.dome_neck_ratio is None and m.aspect_ratio is None
    # no plane through one face: the normal points from the face to the centroid, (0, 0, 1)
    assert m.height_mm == pytest.approx(3.0)  # top face z = 6.5 minus 3.5
    assert m.dome_width_mm == pytest.approx(math.hypot(2, 2))


def test_detached_aneurysm_has_no_neck():
    label = np.zeros((20, 12, 12), np.uint8)
    label[:, 5:7, 5:7] = 1
    label[2:5, 9:12, 2:5] = 2  # clear of the vessel
    label[14, 7, 7] = 2  # meets the vessel at an edge only: no shared face, no neck
    found = measure_aneurysms(label, np.eye(4))
    assert [m.voxels for m in found] == [27, 1]
    for m in found:
        assert not m.touches_vessel and m.neck_width_mm == 0.0
        assert m.height_mm is None and m.dome_width_mm is None and m.dome_neck_ratio is None


def test_neck_plane_weights_faces_by_area():
    """Faces orthogonal to a coarse axis are larger: the plane goes through the area-weighted centre."""
    centres = np.array([[0.0, 0.0, 1.0], [4.0, 0.0, 1.0], [0.0, 2.0, 1.0], [4.0, 2.0, 1.0]])
    areas = np.array([1.0, 3.0, 1.0, 3.0])
    point, normal = _neck_plane(centres, areas, towards=np.array([0.0, 0.0, -5.0]), min_voxel_mm=1.0)
    np.testing.assert_allclose(point, [3.0, 1.0, 1.0])
    np.testing.assert_allclose(normal, [0.0, 0.0, -1.0], atol=1e-12)  # towards the aneurysm's side


# --------------------------------------------------------------------------------------------------------
# components, numbering, inputs


def test_components_are_26_connected_and_numbered_by_size_then_centroid():
    label = np.zeros((20, 20, 20), np.uint8)
    label[1:3, 1:3, 1:3] = 2  # 8 voxels
    label[3, 3, 3] = 2  # corner-adjacent: the same component, 9 voxels
    label[10:14, 10:14, 10:14] = 2  # 64 voxels
    label[16:18, 16:18, 16:18] = 2  # 8 voxels
    label[16:18, 1:3, 16:18] = 2  # 8 voxels
    # voxel axis 0 -> world -x: the array's scan order is the reverse of the x order
    affine = _affine([[-1, 0, 0], [0, 1, 0], [0, 0, 1]])
    found = measure_aneurysms(label, affine)
    assert [m.index for m in found] == [1, 2, 3, 4]
    assert [m.voxels for m in found] == [64, 9, 8, 8]
    # the two 8-voxel cubes tie: x = -16.5 for both, then y = 1.5 before y = 16.5
    assert [m.centroid_ras_mm for m in found[2:]] == [(-16.5, 1.5, 16.5), (-16.5, 16.5, 16.5)]


def test_ties_broken_by_x_first():
    label = np.zeros((20, 6, 6), np.uint8)
    label[2:4, 2:4, 2:4] = 2
    label[14:16, 2:4, 2:4] = 2
    flipped = _affine([[-1, 0, 0], [0, 1, 0], [0, 0, 1]])
    found = measure_aneurysms(label, flipped)
    assert [m.centroid_ras_mm[0] for m in found] == [-14.5, -2.5]


def test_empty_label_gives_no_measurement():
    assert measure_aneurysms(np.zeros((5, 5, 5), np.int64), np.eye(4)) == []
    assert measure_aneurysms(np.ones((5, 5, 5), np.int64), np.eye(4)) == []  # vessel only


@pytest.mark.parametrize(
    "label, affine, match",
    [
        (np.zeros((1, 5, 5, 5)), np.eye(4), "3D volume"),
        (np.zeros((5, 5)), np.eye(4), "3D volume"),
        (np.full((5, 5, 5), 3), np.eye(4), r"values \[3\]"),
        (np.full((5, 5, 5), 1.5), np.eye(4), "outside"),
        (np.zeros((5, 5, 5)), np.eye(3), "4x4"),
        (np.zeros((5, 5, 5)), np.eye(4)[:3], "4x4"),
        (np.zeros((5, 5, 5)), np.diag([1.0, 1.0, 0.0, 1.0]), "singular"),
        (np.zeros((5, 5, 5)), np.full((4, 4), np.nan), "finite"),
        (np.zeros((5, 5, 5)), np.ones((4, 4)), "last row"),
    ],
)
def test_bad_input_raises(label, affine, match):
    with pytest.raises(ValueError, match=match):
        measure_aneurysms(label, affine)


def test_flat_plate_is_measured_through_the_joggled_hull():
    label = np.zeros((32, 32, 3), np.uint8)
    label[1:31, 1:31, 1] = 2  # 900 coplanar voxel centres: Qhull needs its joggle
    (m,) = measure_aneurysms(label, _affine(np.diag([0.5, 0.25, 1.0])))
    assert m.max_diameter_mm == pytest.approx(math.hypot(29 * 0.5, 29 * 0.25))


@pytest.mark.parametrize("dims, count", [(3, 2000), (2, 1500), (3, 40)])
def test_pairwise_maximum_agrees_with_brute_force(dims, count):
    points = np.random.default_rng(dims * count).normal(size=(count, dims)) * (1.0, 3.0, 0.5)[:dims]
    assert _max_distance(points) == pytest.approx(pdist(points).max(), rel=1e-12)
    assert _max_distance(points[:1]) == 0.0


# --------------------------------------------------------------------------------------------------------
# files


def _scene():
    label = np.zeros((20, 12, 12), np.uint8)
    label[:, 5:7, 5:7] = 1
    label[8:11, 7:10, 4:7] = 2  # on the vessel
    label[2:4, 9:11, 1:3] = 2  # detached
    affine = _affine(np.diag([0.5, 0.4, 0.6]), origin=(-5.0, 7.0, 1.0))
    return measure_aneurysms(label, affine)


def test_case_json_round_trip(tmp_path):
    found = _scene()
    path = tmp_path / "cases" / "case_007.json"
    write_case_measurements(path, "case_007", found, extra={"source": "pred"})
    document = json.loads(path.read_text())
    assert list(document) == ["case", "coordinate_system", "source", "aneurysm_count", "aneurysms"]
    assert document["case"] == "case_007" and document["source"] == "pred"
    assert document["coordinate_system"] == COORDINATE_SYSTEM and "RAS" in COORDINATE_SYSTEM
    assert document["aneurysm_count"] == 2
    assert document["aneurysms"] == [m.as_dict() for m in found]
    assert document["aneurysms"][1]["height_mm"] is None
    assert document["aneurysms"][0]["centroid_ras_mm"] == list(found[0].centroid_ras_mm)
    assert [p.name for p in path.parent.iterdir()] == ["case_007.json"]  # no temporary left behind
    with pytest.raises(ValueError, match="aneurysms"):
        write_case_measurements(path, "case_007", found, extra={"aneurysms": []})
    with pytest.raises(ValueError, match="case_name"):
        write_case_measurements(path, "", found)


def test_run_table_round_trip(tmp_path):
    found = _scene()
    rows = [{**row, "source": "pred"} for row in table_rows("case_007", found)]
    rows += table_rows("case_008", [])  # a case without aneurysms adds no row
    path = tmp_path / "aneurysms.csv"
    write_run_table(path, rows)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        read = list(reader)
    assert reader.fieldnames == [*RUN_TABLE_COLUMNS, "source"]
    assert len(read) == 2 and {row["case"] for row in read} == {"case_007"}
    for row, m in zip(read, found, strict=True):
        assert int(row["index"]) == m.index and int(row["voxels"]) == m.voxels
        assert float(row["volume_mm3"]) == m.volume_mm3
        assert float(row["max_diameter_mm"]) == m.max_diameter_mm
        centroid = (float(row[f"centroid_{axis}_ras_mm"]) for axis in "xyz")
        assert tuple(centroid) == m.centroid_ras_mm
        assert row["touches_vessel"] == str(m.touches_vessel)
    assert float(read[0]["height_mm"]) == found[0].height_mm
    assert read[1]["height_mm"] == "" and read[1]["dome_neck_ratio"] == ""  # None: empty cell

    write_run_table(path, [])
    assert path.read_text() == ",".join(RUN_TABLE_COLUMNS) + "\n"
    with pytest.raises(ValueError, match="row 0 lacks"):
        write_run_table(path, [{"case": "x"}])
