"""The synthetic 3DRA generator and dataset writer: determinism, labels, geometry, layout, command line."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.data import load_decathlon_datalist
from scipy import ndimage

from scripts.data import (
    CENTRES,
    DistanceField,
    generate_case,
    generate_geometry,
    get_centre,
    occupancy,
    phantom_affine,
    save_preview,
    synthetic,
)
from scripts.data.synthetic import ensure_dataset, split_sizes, write_dataset
from scripts.data.vessel_tree import MAX_RADIUS_MM

ROOT = Path(__file__).resolve().parents[2]
SEEDS = [0, 1, 2, 3, 4, 5]
# look-alikes that must stay below aneurysm size: a wall bump below the smallest dome, an infundibulum < 3 mm
SMALL_LOOKALIKES = {"wall_bump": get_centre("A").aneurysm_min_mm, "infundibulum": 3.0}
KEYS = ["training", "validation", "test"]


@pytest.fixture(scope="module")
def cases():
    """A handful of default-centre cases, rendered once."""
    return {seed: generate_case(seed) for seed in SEEDS}


@pytest.fixture(scope="module")
def geometries():
    """Geometry (no voxels) of 50 default-centre cases, for distribution checks."""
    return [generate_geometry(seed) for seed in range(50)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A 3-case dataset written with the Python API."""
    folder = tmp_path_factory.mktemp("dataset")
    path = write_dataset(str(folder), num_cases=3, seed=7, centre="A", previews=1)
    return folder, path


def _ball(label: np.ndarray, centre_voxel, radius_mm: float, spacing) -> np.ndarray:
    """Label values inside a ball of ``radius_mm`` around ``centre_voxel``."""
    spacing = np.asarray(spacing)
    centre = np.asarray(centre_voxel)
    reach = np.ceil(radius_mm / spacing).astype(int)
    low = np.maximum(centre - reach, 0)
    high = np.minimum(centre + reach + 1, label.shape)
    grids = np.meshgrid(*[np.arange(lo, hi) for lo, hi in zip(low, high, strict=True)], indexing="ij")
    dist = np.sqrt(sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre, spacing, strict=True)))
    return label[tuple(slice(lo, hi) for lo, hi in zip(low, high, strict=True))][dist <= radius_mm]


# ------------------------------------------------------------------------------------------- generator
def test_same_seed_same_case_different_seed_different_case(cases):
    again = generate_case(SEEDS[1])
    np.testing.assert_array_equal(again.image, cases[SEEDS[1]].image)
    np.testing.assert_array_equal(again.label, cases[SEEDS[1]].label)
    assert again.info == cases[SEEDS[1]].info
    other = cases[SEEDS[2]]
    assert not np.array_equal(other.image, again.image)
    assert not np.array_equal(other.label, again.label)


@pytest.mark.parametrize("seed", SEEDS)
def test_arrays_labels_and_affine(cases, seed):
    case = cases[seed]
    centre = get_centre("A")
    assert case.image.shape == case.label.shape == centre.shape
    assert case.image.dtype == np.float32 and case.label.dtype == np.uint8
    assert set(np.unique(case.label).tolist()) <= {0, 1, 2}
    assert (case.label == 1).sum() > 1000, "a vessel tree must be visible"
    assert ((case.label == 2).sum() > 0) == (case.info["num_aneurysms"] > 0)
    assert case.spacing == centre.spacing
    np.testing.assert_allclose(case.affine, phantom_affine(centre.shape, centre.spacing))
    np.testing.assert_allclose(np.diag(case.affine)[:3], centre.spacing)
    assert np.all(np.isfinite(case.image))


@pytest.mark.parametrize("seed", SEEDS)
def test_every_aneurysm_component_touches_vessel(cases, seed):
    label = cases[seed].label
    components, count = ndimage.label(label == 2, structure=np.ones((3, 3, 3)))
    near_vessel = ndimage.binary_dilation(label == 1, structure=np.ones((3, 3, 3)))
    for index in range(1, count + 1):
        assert near_vessel[components == index].any(), f"seed {seed}: aneurysm component {index} floats"
    for record in cases[seed].info["aneurysms"]:
        assert record["voxels"] > 20, f"seed {seed}: aneurysm {record} barely drawn"


@pytest.mark.parametrize("seed", SEEDS)
def test_hard_negatives_are_labelled_vessel(cases, seed):
    case = cases[seed]
    negatives = case.info["hard_negatives"]
    assert negatives, f"seed {seed}: no hard negative"
    for neg in negatives:
        if neg["kind"] in SMALL_LOOKALIKES:  # the others are normal vessels: wide, curved or branching
            assert neg["size_mm"] < SMALL_LOOKALIKES[neg["kind"]], f"seed {seed}: {neg} is aneurysm-sized"
        assert case.label[tuple(neg["centre_voxel"])] == 1, f"seed {seed}: {neg} is not vessel"
        values = _ball(case.label, neg["centre_voxel"], neg["radius_mm"], case.spacing)
        assert not np.any(values == 2), f"seed {seed}: {neg} overlaps an aneurysm label"


def test_partial_volume_at_the_lumen_boundary(cases):
    """Rendered from a signed distance: boundary voxels are darker than the lumen core, brighter than tissue."""
    case = cases[SEEDS[0]]
    vessel = case.label > 0
    core = ndimage.binary_erosion(vessel, iterations=2)
    rim = vessel & ~ndimage.binary_erosion(vessel)
    outside = ~ndimage.binary_dilation(vessel, iterations=4)
    units = case.info["appearance"]["units"]
    canonical = (case.image - units["offset"]) / units["scale"]  # back to AU, whatever units were drawn
    core_i, rim_i, bg_i = (float(np.median(canonical[m])) for m in (core, rim, outside))
    assert bg_i + 0.2 * (core_i - bg_i) < rim_i < core_i - 0.1 * (core_i - bg_i)
    assert 600 < core_i < 2100 and bg_i < 0.5 * core_i


def test_distance_field_and_occupancy():
    field = DistanceField((20, 20, 20), (0.5, 0.5, 0.5))
    field.add_capsule(np.array([5.0, 5.0, 2.0]), np.array([5.0, 5.0, 8.0]), 1.0, 1.0, value=0.8)
    # voxel (10, 12, 10) sits 1 mm from the axis: on the surface
    assert field.distance[10, 12, 10] == pytest.approx(0.0, abs=1e-5)
    assert field.distance[10, 10, 10] == pytest.approx(-1.0, abs=1e-5)
    assert field.value[10, 10, 10] == pytest.approx(0.8)
    occ = occupancy(field.distance, (0.5, 0.5, 0.5))
    assert occ[10, 10, 10] == 1.0 and occ[0, 0, 0] == 0.0 and occ[10, 12, 10] == pytest.approx(0.5)


# -------------------------------------------------------------------------------------- distributions
def test_aneurysm_counts_and_sizes_over_50_cases(geometries):
    centre = get_centre("A")
    counts = np.bincount([len(g.aneurysms) for g in geometries], minlength=3)
    assert len(counts) == 3, "at most two aneurysms per case"
    assert 0.04 <= counts[0] / 50 <= 0.30, f"cases without aneurysm: {counts}"
    assert 0.08 <= counts[2] / 50 <= 0.36, f"cases with two aneurysms: {counts}"
    sizes = np.array([a.size_mm for g in geometries for a in g.aneurysms])
    assert np.all((sizes >= centre.aneurysm_min_mm) & (sizes <= centre.aneurysm_max_mm))
    assert np.mean(sizes <= 10.0) >= 0.8, "most aneurysms are 1.5-10 mm"
    assert sizes.max() > 8.0 and np.median(sizes) > 4.0
    kinds = {a.kind for g in geometries for a in g.aneurysms}
    assert kinds == {"bifurcation", "sidewall"}
    for g in geometries:
        extent = (np.asarray(g.centre.shape) - 1) * g.spacing
        for a in g.aneurysms:
            assert a.width_mm <= a.size_mm and a.neck_mm <= 8.0
            assert 0.75 <= a.dome_neck_ratio <= 4.0, f"dome/neck {a.dome_neck_ratio:.2f}"
            assert np.all(a.dome_centre - a.reach >= 0) and np.all(a.dome_centre + a.reach <= extent)
    assert any(a.neck_mm >= a.width_mm for g in geometries for a in g.aneurysms), "domes no wider than necks"
    assert any(a.lobes for g in geometries for a in g.aneurysms), "multi-lobed domes"
    assert any(a.daughters for g in geometries for a in g.aneurysms), "daughter sacs"


def test_trees_and_hard_negatives_over_50_cases(geometries):
    kinds = {n.kind for g in geometries for n in g.hard_negatives}
    assert {"infundibulum", "fusiform_bulge", "wall_bump", "overlapping_loop", "siphon_bend"} <= kinds
    assert all(g.hard_negatives for g in geometries)
    radii = np.concatenate(
        [t.radii for g in geometries for t in g.tree.tubes if t.kind in ("trunk", "branch", "side")]
    )
    assert 2.2 <= radii.max() <= MAX_RADIUS_MM and np.percentile(radii, 1) >= 0.3
    assert np.mean([len(g.tree.bifurcations) for g in geometries]) >= 3
    assert np.mean([len(g.tree.crossings) > 0 for g in geometries]) > 0.5, "vessels passing close by"
    # long stretches along Z: in most trees some tube runs within 25 degrees of Z for >= 5 mm
    along_z = 0
    for g in geometries:
        found = False
        for tube in g.tree.tubes:
            steep = np.abs(tube.tangents[:, 2]) > np.cos(np.deg2rad(25))
            run = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], steep.astype(int), [0]]))))[::2]
            found = found or (run.size > 0 and run.max() * 0.6 >= 5.0)
        along_z += found
    assert along_z >= 40


def test_centres_differ_measurably():
    stats = {}
    for name in CENTRES:
        case = generate_case(11, name)
        far = ~ndimage.binary_dilation(case.label > 0, iterations=4)
        lumen = case.image[ndimage.binary_erosion(case.label > 0, iterations=2)]
        # noise from neighbour differences (the smooth background cancels out)
        step = np.diff(case.image, axis=0)[far[1:] & far[:-1]]
        stats[name] = {
            "spacing": case.spacing,
            "fov": tuple(n * s for n, s in zip(case.image.shape, case.spacing, strict=True)),
            "noise": float(np.std(step) / np.sqrt(2)),
            "contrast": float(np.median(lumen) - np.median(case.image[far])),
        }
    assert len({s["spacing"] for s in stats.values()}) == 3
    assert stats["B"]["spacing"][2] > stats["B"]["spacing"][0], "B has thicker slices"
    assert min(stats["B"]["fov"]) > max(stats["A"]["fov"])
    # units differ per case: B is noisier relative to its own contrast (test_appearance checks more seeds)
    assert stats["B"]["noise"] / stats["B"]["contrast"] > stats["A"]["noise"] / stats["A"]["contrast"]
    sizes = {
        n: np.mean([a.size_mm for s in range(25) for a in generate_geometry(s, n).aneurysms]) for n in "AC"
    }
    assert sizes["C"] > sizes["A"] + 1.0, "centre C has larger aneurysms"


@pytest.mark.parametrize(
    "call", [lambda: get_centre("Z"), lambda: generate_case(0, "nope"), lambda: generate_geometry(0, "a")]
)
def test_unknown_centre_raises(call):
    with pytest.raises(ValueError, match="known centres: \\['A', 'B', 'C'\\]"):
        call()


@pytest.mark.parametrize("seed", [-1, 1.5, "3"])
def test_bad_seed_raises(seed):
    with pytest.raises(ValueError, match="seed"):
        generate_geometry(seed)


def test_centre_validates_its_fields():
    with pytest.raises(ValueError, match="aneurysm_count_probs"):
        dataclasses.replace(get_centre("A"), aneurysm_count_probs=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="spacing"):
        dataclasses.replace(get_centre("A"), spacing=(0.4, 0.0, 0.4))


def test_small_custom_centre_works():
    small = dataclasses.replace(get_centre("A"), shape=(64, 64, 64))
    case = generate_case(2, small)
    assert case.image.shape == (64, 64, 64) and case.info["centre"] == "A"


def test_preview_png(cases, tmp_path):
    case = next(c for c in cases.values() if c.info["num_aneurysms"])
    middle = tuple(n // 2 for n in case.image.shape)
    path = save_preview(
        case.image, case.label, case.spacing, tmp_path / "p.png", scale=2.0, markers=[(middle, 3.0)]
    )
    from PIL import Image

    with Image.open(path) as png:
        fov = case.image.shape[0] * case.spacing[0] * 2.0
        assert png.width >= 3 * int(fov) and png.height >= 2 * int(fov)
        rgb = np.asarray(png.convert("RGB")).reshape(-1, 3)
    assert np.any((rgb[:, 0] > 200) & (rgb[:, 1] < 100)), "aneurysm overlay in red"
    assert np.any(np.all(rgb == (255, 230, 0), axis=1)), "marker circled in yellow"


# ------------------------------------------------------------------------------------------- datasets
@pytest.mark.parametrize(
    ("num_cases", "expected"), [(3, (1, 1, 1)), (10, (6, 2, 2)), (16, (11, 2, 3)), (50, (32, 8, 10))]
)
def test_split_sizes(num_cases, expected):
    assert split_sizes(num_cases) == expected
    assert sum(expected) == num_cases


@pytest.mark.parametrize("num_cases", [0, 2, -5])
def test_split_sizes_too_few_cases(num_cases):
    with pytest.raises(ValueError, match=str(num_cases)):
        split_sizes(num_cases)


@pytest.mark.parametrize("key", KEYS)
def test_datalist_loads_and_files_exist(dataset, key):
    folder, path = dataset
    items = load_decathlon_datalist(path, data_list_key=key, base_dir=str(folder))
    assert len(items) == 1
    folder_tag = "Ts" if key == "test" else "Tr"
    for item in items:
        for field in ("image", "label"):
            assert os.path.isfile(item[field])
            assert f"{field}s{folder_tag}" in item[field]
        assert item["num_aneurysms"] == len(item["aneurysm_diameters_mm"])


def test_dataset_json_metadata(dataset):
    folder, path = dataset
    with open(path) as handle:
        meta = json.load(handle)
    assert meta["labels"] == {"0": "background", "1": "vessel", "2": "aneurysm"}
    assert meta["centre"] == "A" and meta["seed"] == 7 and meta["generator_version"]
    for key in KEYS:
        for entry in meta[key]:
            assert not os.path.isabs(entry["image"]) and not os.path.isabs(entry["label"])
    # written last and without leftovers
    newest = max(p.stat().st_mtime for p in folder.rglob("*.nii.gz"))
    assert Path(path).stat().st_mtime >= newest
    assert not [p for p in folder.rglob(".*")], "temporary files left behind"
    assert len(list((folder / "previews").glob("*.png"))) == 1


def test_nifti_spacing_affine_and_dtypes(dataset):
    folder, path = dataset
    centre = get_centre("A")
    item = load_decathlon_datalist(path, data_list_key="training", base_dir=str(folder))[0]
    image, label = nib.load(item["image"]), nib.load(item["label"])
    for nifti in (image, label):
        assert nifti.shape == centre.shape
        np.testing.assert_allclose(nifti.header.get_zooms(), centre.spacing, rtol=1e-6)
        np.testing.assert_allclose(nifti.affine, phantom_affine(centre.shape, centre.spacing), atol=1e-5)
        assert nib.aff2axcodes(nifti.affine) == ("R", "A", "S")
    assert image.get_data_dtype() == np.float32 and label.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(label.dataobj)).tolist()) <= {0, 1, 2}
    regenerated = generate_case(item["seed"], "A")
    np.testing.assert_array_equal(np.asarray(label.dataobj), regenerated.label)


def _mtimes(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_ensure_dataset_reuses_a_dataset_of_the_same_recipe(tmp_path, caplog):
    path = ensure_dataset(str(tmp_path), num_cases=3, seed=1)
    before = _mtimes(tmp_path)
    with caplog.at_level("INFO", logger="scripts.data.synthetic"):
        again = ensure_dataset(str(tmp_path), num_cases=3, seed=1)
    assert again == path
    assert _mtimes(tmp_path) == before
    assert "reusing" in caplog.text


SMALL_A = dataclasses.replace(get_centre("A"), shape=(40, 40, 40))


@pytest.mark.parametrize(
    "change",
    [
        {"num_cases": 4, "splits": (3, 0, 1)},
        {"seed": 2},
        {"centre": dataclasses.replace(SMALL_A, spacing=(0.5, 0.5, 0.5))},
        {"centre": dataclasses.replace(SMALL_A, name="B")},
        {"splits": (1, 1, 1)},
        {"generator_version": "0.0.1"},
    ],
    ids=["case_count", "seed", "spacing", "centre", "splits", "generator_version"],
)
def test_ensure_dataset_regenerates_when_the_recipe_differs(tmp_path, caplog, monkeypatch, change):
    """Whatever shapes the data (count, seed, centre settings, splits, generator) forces a new dataset."""
    asked = {"num_cases": 3, "seed": 1, "centre": SMALL_A, "splits": (2, 0, 1)}
    path = ensure_dataset(str(tmp_path), **asked)
    if "generator_version" in change:
        monkeypatch.setattr(synthetic, "GENERATOR_VERSION", change["generator_version"])
    else:
        asked.update(change)
    with caplog.at_level("WARNING", logger="scripts.data.synthetic"):
        again = ensure_dataset(str(tmp_path), **asked)
    assert again == path and "REGENERATING" in caplog.text
    written = json.loads(Path(path).read_text())
    assert written["synthetic_recipe"] == synthetic.dataset_recipe(**asked)
    assert sum(len(written[k]) for k in KEYS) == asked["num_cases"]


def test_ensure_dataset_never_overwrites_a_foreign_datalist(tmp_path):
    foreign = {"training": [{"image": "a.nii.gz", "label": "b.nii.gz"}]}
    (tmp_path / "dataset.json").write_text(json.dumps(foreign))
    with pytest.raises(ValueError, match="not written by the synthetic generator"):
        ensure_dataset(str(tmp_path), num_cases=3)
    assert json.loads((tmp_path / "dataset.json").read_text()) == foreign


def test_test_only_dataset(tmp_path):
    path = write_dataset(str(tmp_path), num_cases=2, seed=3, centre=SMALL_A, splits=(0, 0, 2))
    written = json.loads(Path(path).read_text())
    assert [len(written[k]) for k in KEYS] == [0, 0, 2]
    with pytest.raises(ValueError, match="summing to num_cases"):
        write_dataset(str(tmp_path / "bad"), num_cases=2, splits=(1, 0, 0))


def test_interrupted_write_leaves_no_dataset_json(tmp_path, monkeypatch):
    real = synthetic.generate_case
    calls = []

    def flaky(seed, centre="A"):
        calls.append(seed)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(seed, centre)

    monkeypatch.setattr(synthetic, "generate_case", flaky)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(str(tmp_path), num_cases=3)
    assert not (tmp_path / "dataset.json").exists()
    monkeypatch.setattr(synthetic, "generate_case", real)
    path = ensure_dataset(str(tmp_path), num_cases=3)
    assert len(load_decathlon_datalist(path, data_list_key="training")) == 1


def test_ensure_dataset_unknown_centre(tmp_path):
    with pytest.raises(ValueError, match="Unknown centre"):
        ensure_dataset(str(tmp_path), centre="Z")
    assert not (tmp_path / "dataset.json").exists()


def test_command_line_writes_the_layout(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "scripts.data.synthetic", "--output_dir", str(out), "--num_cases", "3"]
    cmd += ["--seed", "2", "--centre", "A", "--previews", "1"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs", "previews"):
        assert any((out / sub).iterdir()), sub
    assert (out / "dataset.json").is_file()
    assert "case 3/3" in result.stderr
    for key in KEYS:
        assert load_decathlon_datalist(str(out / "dataset.json"), data_list_key=key, base_dir=str(out))


def test_vessel_free_training_cases(tmp_path):
    """The last ``negatives`` training cases show background texture and noise with an all-zero label."""
    path = write_dataset(str(tmp_path), num_cases=3, seed=4, centre=SMALL_A, splits=(3, 0, 0), negatives=2)
    entries = json.loads(Path(path).read_text())["training"]
    labels = [np.asarray(nib.load(tmp_path / e["label"]).dataobj) for e in entries]
    images = [np.asarray(nib.load(tmp_path / e["image"]).dataobj) for e in entries]
    assert labels[0].any() and not labels[1].any() and not labels[2].any()
    assert all(np.isfinite(i).all() and i.std() > 0 for i in images)
    with pytest.raises(ValueError, match="negatives"):
        write_dataset(str(tmp_path / "bad"), num_cases=3, splits=(1, 1, 1), negatives=2)
