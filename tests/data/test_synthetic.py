"""The dataset writer (``scripts.data.synthetic``): splits, layout, dataset.json, reuse, command line.

The phantoms it writes are checked in ``test_phantom.py`` (cases), ``test_anatomy.py`` (geometry against
morphometry), ``test_appearance.py``, ``test_centres.py``, ``test_raster.py`` and ``test_preview.py``.
"""

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

from scripts.data import generate_case, get_centre, phantom_affine, synthetic
from scripts.data.lesions import aneurysm_size_at
from scripts.data.synthetic import ensure_dataset, split_sizes, write_dataset

ROOT = Path(__file__).resolve().parents[2]
KEYS = ["training", "validation", "test"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A 3-case dataset written with the Python API."""
    folder = tmp_path_factory.mktemp("dataset")
    path = write_dataset(str(folder), num_cases=3, seed=7, centre="A", previews=1)
    return folder, path


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
        {"training_aneurysms": (0.0, 0.0, 1.0)},
        {"training_p_bone": 1.0},
        {"training_stratified_sizes": True},
        {"training_overlapping_loops": True},
        {"generator_version": "0.0.1"},
    ],
    ids=[
        "case_count",
        "seed",
        "spacing",
        "centre",
        "splits",
        "training_aneurysms",
        "training_p_bone",
        "training_stratified_sizes",
        "training_overlapping_loops",
        "generator_version",
    ],
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


@pytest.mark.parametrize("first", [True, False])
def test_the_regeneration_warning_names_a_setting_turned_on_or_off(tmp_path, caplog, first):
    """Settings recorded only when on are named whichever way they changed."""
    asked = {"num_cases": 3, "seed": 1, "centre": SMALL_A, "splits": (2, 0, 1)}
    ensure_dataset(str(tmp_path), training_stratified_sizes=first, **asked)
    with caplog.at_level("WARNING", logger="scripts.data.synthetic"):
        ensure_dataset(str(tmp_path), training_stratified_sizes=not first, **asked)
    was, asked_now = (True, None) if first else (None, True)
    assert f"'training_stratified_sizes': ({was}, {asked_now})" in caplog.text


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

    def flaky(seed, *args, **kwargs):
        calls.append(seed)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(seed, *args, **kwargs)

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
    assert "case 3/3" in result.stdout  # progress logged through configs/logging.conf (a stdout handler)
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


def test_training_aneurysms_change_the_training_phantoms_only(tmp_path):
    """``training_aneurysms`` draws the training phantoms' aneurysm counts; validation and test keep the centre's."""
    path = write_dataset(
        str(tmp_path), num_cases=6, seed=5, centre=SMALL_A, splits=(4, 1, 1), training_aneurysms=[0, 0, 0, 1]
    )
    written = json.loads(Path(path).read_text())
    centre_counts = [
        generate_case(synthetic.case_seed(5, i), SMALL_A).info["num_aneurysms"] for i in range(6)
    ]
    training = [e["num_aneurysms"] for e in written["training"]]
    assert sum(training) > sum(centre_counts[:4])  # 3 asked each; the centre's mix gives 0-2
    assert max(training) == 3
    held_out = [e["num_aneurysms"] for e in written["validation"] + written["test"]]
    assert held_out == centre_counts[4:]
    assert written["synthetic_recipe"]["training_aneurysms"] == [0.0, 0.0, 0.0, 1.0]


def bones(entry: dict) -> int:
    return len(entry["info"]["appearance"].get("bones", []))


def test_training_p_bone_changes_the_training_phantoms_only(tmp_path):
    """``training_p_bone`` 1 gives every training phantom bone, vessel-free ones too; the others keep the centre's."""
    no_bone = dataclasses.replace(SMALL_A, p_bone=0.0)
    path = write_dataset(
        str(tmp_path), num_cases=6, seed=5, centre=no_bone, splits=(4, 1, 1), negatives=1, training_p_bone=1.0
    )
    written = json.loads(Path(path).read_text())
    assert all(bones(e) >= 1 for e in written["training"])
    assert written["training"][-1]["info"]["background_only"]  # the vessel-free one has bone too
    assert not any(bones(e) for e in written["validation"] + written["test"])
    assert written["synthetic_recipe"]["training_p_bone"] == 1.0


def test_a_recipe_without_training_p_bone_is_the_recipe_written_before_it_existed():
    # datasets written by 0.9.2 have no training_p_bone in their recipe: they must still be reused
    recipe = synthetic.dataset_recipe(3, 1, SMALL_A)
    assert "training_p_bone" not in recipe
    assert synthetic.dataset_recipe(3, 1, SMALL_A, training_p_bone=0.25)["training_p_bone"] == 0.25


def test_training_stratified_sizes_spread_the_training_sacs_only(tmp_path):
    """The training phantoms with an aneurysm take one spread quantile each for their first sac's size; the
    validation and test phantoms are those of the plain recipe."""
    asked = {"num_cases": 12, "seed": 5, "centre": SMALL_A, "splits": (10, 1, 1), "negatives": 1}
    written = json.loads(
        Path(write_dataset(str(tmp_path), training_stratified_sizes=True, **asked)).read_text()
    )
    with_sac = [e for e in written["training"] if e["num_aneurysms"]]
    quantiles = sorted(e["info"]["first_aneurysm_size_quantile"] for e in with_sac)
    assert quantiles == pytest.approx([(k + 0.5) / len(with_sac) for k in range(len(with_sac))])
    assert len(with_sac) >= 6
    high = min(
        SMALL_A.aneurysm_max_mm, 0.45 * float(np.min((np.asarray(SMALL_A.shape) - 1) * SMALL_A.spacing))
    )
    distribution = (SMALL_A.aneurysm_median_mm, SMALL_A.aneurysm_sigma_log, SMALL_A.aneurysm_min_mm, high)
    for entry in with_sac:
        wanted = aneurysm_size_at(entry["info"]["first_aneurysm_size_quantile"], *distribution)
        # placement shrinks a dome that finds no room by 15 % at a time, never below the smallest size
        assert any(
            max(0.85**3 * wanted, SMALL_A.aneurysm_min_mm) - 1e-3 <= d <= wanted + 1e-3
            for d in entry["aneurysm_diameters_mm"]
        ), (wanted, entry["aneurysm_diameters_mm"])
    plain = json.loads(Path(write_dataset(str(tmp_path / "plain"), **asked)).read_text())
    assert_only_training_changed(written, plain, "training_stratified_sizes", "first_aneurysm_size_quantile")


def assert_only_training_changed(written: dict, plain: dict, setting: str, info_key: str) -> None:
    """Validation and test phantoms are the plain recipe's, the vessel-free training case (the last) has no
    ``info_key``, and ``setting`` is in the recipe only when on."""
    for key in ("validation", "test"):
        assert [e["info"] for e in written[key]] == [e["info"] for e in plain[key]]
    vessel_free = written["training"][-1]["info"]
    assert vessel_free["background_only"] and info_key not in vessel_free
    assert written["synthetic_recipe"][setting] is True
    assert setting not in plain["synthetic_recipe"]  # as written before the key existed


@pytest.mark.parametrize("key", ["training_stratified_sizes", "training_overlapping_loops"])
@pytest.mark.parametrize("value", ["True", "false", 1, None])
def test_boolean_recipe_settings_refuse_anything_but_a_boolean(tmp_path, key, value):
    with pytest.raises(ValueError, match=f"{key} must be True or False, got {value!r}"):
        ensure_dataset(str(tmp_path), num_cases=3, centre=SMALL_A, **{key: value})
    assert not (tmp_path / "dataset.json").exists()


def test_training_overlapping_loops_coil_the_training_trees_only(tmp_path):
    """Each training phantom with vessels is grown with a forced overlapping loop, and most trees get one; the
    validation and test phantoms are those of the plain recipe (full-size phantoms: a 16 mm field of view has
    little room for a loop)."""
    asked = {"num_cases": 9, "seed": 0, "centre": "A", "splits": (7, 1, 1), "negatives": 1}
    written = json.loads(
        Path(write_dataset(str(tmp_path), training_overlapping_loops=True, **asked)).read_text()
    )
    plain = json.loads(Path(write_dataset(str(tmp_path / "plain"), **asked)).read_text())
    with_vessels = written["training"][:-1]
    assert all(e["info"].get("forced_overlapping_loop") for e in with_vessels)
    assert not any("forced_overlapping_loop" in e["info"] for e in plain["training"])
    coiled = [e["info"]["overlapping_loops"] > 0 for e in with_vessels]
    drawn = [e["info"]["overlapping_loops"] > 0 for e in plain["training"][:-1]]
    assert sum(coiled) >= len(coiled) // 2 > sum(drawn), (coiled, drawn)
    assert_only_training_changed(written, plain, "training_overlapping_loops", "forced_overlapping_loop")


@pytest.mark.parametrize(
    ("p_bone", "match"), [(1.5, r"p_bone must be in \[0, 1\]"), ("0.7", "a number"), (True, "a number")]
)
def test_training_p_bone_refused(tmp_path, p_bone, match):
    with pytest.raises(ValueError, match=f"training_p_bone.*{match}"):
        ensure_dataset(str(tmp_path), num_cases=3, centre=SMALL_A, training_p_bone=p_bone)
    assert not (tmp_path / "dataset.json").exists()


@pytest.mark.parametrize(
    ("probs", "match"),
    [
        ([0.5, 0.6], "summing to 1"),
        ([-0.5, 1.5], "summing to 1"),
        ([], "summing to 1"),
        ("0,1", "list of probabilities"),
        (["one"], "numbers"),
    ],
)
def test_training_aneurysms_refused(tmp_path, probs, match):
    with pytest.raises(ValueError, match=f"training_aneurysms.*{match}|{match}"):
        ensure_dataset(str(tmp_path), num_cases=3, centre=SMALL_A, training_aneurysms=probs)
    assert not (tmp_path / "dataset.json").exists()
