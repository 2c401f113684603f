"""``scripts.export_nnunet``: our datasets as nnU-Net v2 raw datasets that nnU-Net's integrity check accepts.

``check_nnunet_raw`` re-states what ``nnunetv2.experiment_planning.verify_dataset_integrity`` checks, in
plain Python with nibabel, so these tests need no ``nnunetv2`` (an optional dependency).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigParser

from scripts.export_nnunet import export_nnunet

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (12, 10, 8)
SPLITS = {"training": ["tr_a", "tr_b", "tr_c"], "validation": ["va_a", "va_b"], "test": ["ts_a"]}


# ---------------------------------------------------------------------------------------------------------
# nnU-Net v2's verify_dataset_integrity, restated


def _geometry(image: nib.Nifti1Image) -> tuple[tuple[int, ...], np.ndarray, np.ndarray, np.ndarray]:
    """``(shape, spacing, origin, direction)`` as SimpleITK would report them, from the nibabel affine."""
    spacing = np.linalg.norm(image.affine[:3, :3], axis=0)
    return image.shape, spacing, image.affine[:3, 3], image.affine[:3, :3] / spacing


def _check_pair(images: list[Path], label: Path, expected_labels: list[int]) -> None:
    """One case: no NaN, label values declared, every image's grid (shape, spacing, origin, direction) the label's."""
    seg = nib.load(label)
    values = np.unique(np.asanyarray(seg.dataobj))
    assert not np.isnan(values).any(), f"{label}: NaN"
    assert set(values.tolist()) <= set(expected_labels), f"{label}: labels {values} not in {expected_labels}"
    shape, spacing, origin, direction = _geometry(seg)
    for path in images:
        image = nib.load(path)
        assert not np.isnan(np.asanyarray(image.dataobj)).any(), f"{path}: NaN"
        other = _geometry(image)
        assert other[0] == shape, f"{path}: shape {other[0]} vs label {shape}"
        assert np.allclose(other[1], spacing), f"{path}: spacing {other[1]} vs label {spacing}"
        assert np.allclose(other[2], origin), f"{path}: origin {other[2]} vs label {origin}"
        assert np.allclose(other[3], direction), f"{path}: direction vs label {label}"


def _case_files(folder: Path, ending: str) -> dict[str, list[str]]:
    """``{case: [channel files]}`` the way nnU-Net finds them: strip the ending and a ``_XXXX`` suffix."""
    files = sorted(p.name for p in folder.iterdir() if p.name.endswith(ending))
    cases = sorted({name[: -len(ending) - 5] for name in files})
    pattern = {case: re.compile(re.escape(case) + r"_\d{4}" + re.escape(ending)) for case in cases}
    return {case: [f for f in files if pattern[case].fullmatch(f)] for case in cases}


def check_nnunet_raw(folder: Path) -> None:
    """Assert what nnU-Net v2 checks of a raw dataset (``nnUNetv2_plan_and_preprocess --verify_dataset_integrity``).

    ``dataset.json`` with ``labels``, ``channel_names``, ``numTraining``, ``file_ending``; labels with
    ``background`` 0 and consecutive integers; every training case with each channel ``<case>_{i:04d}`` and
    a label; ``numTraining`` cases; label values among the declared ones; no NaN; images and label on one
    grid. Test images, if any, follow the same naming.
    """
    meta = json.loads((folder / "dataset.json").read_text())
    missing = {"labels", "channel_names", "numTraining", "file_ending"} - set(meta)
    assert not missing, f"dataset.json lacks {missing}"
    labels = meta["labels"]
    assert labels.get("background") == 0 and labels["background"] is not False, f"no background 0: {labels}"
    values = sorted(labels.values())
    assert all(isinstance(v, int) and not isinstance(v, bool) for v in values), labels
    assert values[0] == 0 and all(np.diff(values) == 1), f"labels not consecutive: {values}"
    ending = meta["file_ending"]
    channels = meta["channel_names"]
    assert sorted(channels) == [str(i) for i in range(len(channels))], channels
    training = _case_files(folder / "imagesTr", ending)
    assert len(training) == meta["numTraining"], (
        f"{len(training)} cases in imagesTr, numTraining {meta['numTraining']}"
    )
    for case, files in training.items():
        assert files == [f"{case}_{i:04d}{ending}" for i in range(len(channels))], (
            f"{case}: channel files {files}"
        )
        label = folder / "labelsTr" / f"{case}{ending}"
        assert label.is_file(), f"{case}: no label {label}"
        _check_pair([folder / "imagesTr" / f for f in files], label, values)
    stray = {p.name for p in (folder / "imagesTr").iterdir()} - {f for fs in training.values() for f in fs}
    assert not stray, f"files nnU-Net would not read in imagesTr: {stray}"
    if (folder / "imagesTs").is_dir():
        for case, files in _case_files(folder / "imagesTs", ending).items():
            assert files == [f"{case}_{i:04d}{ending}" for i in range(len(channels))], f"{case}: {files}"


# ---------------------------------------------------------------------------------------------------------
# tiny datasets


def oblique_affine(seed: int) -> np.ndarray:
    """Anisotropic voxels (0.31, 0.47, 0.83 mm), x flipped (not RAS), rotated about z and x, origin off 0."""
    a, b = np.deg2rad(30 + 7 * seed), np.deg2rad(-15)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag([-1.0, 1.0, 1.0]) @ np.diag([0.31, 0.47, 0.83])
    affine[:3, 3] = [12.5, -30.25, 7.0 + seed]
    return affine


def write_volume(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine, dtype=array.dtype), path)


def write_case(root: Path, name: str, seed: int, ending: str = ".nii.gz") -> dict[str, str]:
    """A tube (1) with a bulge (2) in noise; images float32, int16, float64, int64 by turns, labels uint8 or float32."""
    rng = np.random.default_rng(seed)
    x, y, _ = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    label = np.zeros(SHAPE, np.uint8)
    label[(x - 6) ** 2 + (y - 5) ** 2 < 5] = 1
    label[2:4, 4:6, 3:5] = 2
    image = np.where(label > 0, 900.0, 80.0) + rng.normal(0, 25, SHAPE)
    image = image.astype((np.float32, np.int16, np.float64, np.int64)[seed % 4])
    entry = {"image": f"images/{name}{ending}", "label": f"labels/{name}{ending}"}
    write_volume(root / entry["image"], image, oblique_affine(seed))
    write_volume(
        root / entry["label"], label.astype(np.float32 if seed % 2 else np.uint8), oblique_affine(seed)
    )
    return entry


def make_dataset(root: Path, nii: tuple[str, ...] = ()) -> Path:
    """Our layout: ``dataset.json`` with training, validation and test lists (+ an extra per-case field)."""
    datalist: dict[str, list[dict]] = {}
    seed = 0
    for split, names in SPLITS.items():
        datalist[split] = []
        for name in names:
            entry = write_case(root, name, seed, ".nii" if name in nii else ".nii.gz")
            datalist[split].append({**entry, "case": name, "num_aneurysms": 1})
            seed += 1
    (root / "dataset.json").write_text(json.dumps(datalist))
    return root


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "ours")


def exported(tmp_path: Path, dataset_dir: Path, **kwargs) -> Path:
    return Path(
        export_nnunet(output_dir=str(tmp_path / "raw"), dataset_id=7, dataset_dir=str(dataset_dir), **kwargs)
    )


# ---------------------------------------------------------------------------------------------------------
# the checker itself refuses what nnU-Net refuses


def _edit_json(folder: Path, **changes) -> None:
    meta = json.loads((folder / "dataset.json").read_text())
    (folder / "dataset.json").write_text(json.dumps({**meta, **changes}))


def _rewrite_label(folder: Path, value: int = 1, shift_mm: float = 0.0) -> None:
    path = folder / "labelsTr" / "tr_b.nii.gz"
    label = nib.load(path)
    data = np.asanyarray(label.dataobj).copy()
    data[0, 0, 0] = value
    affine = label.affine.copy()
    affine[:3, 3] += shift_mm
    nib.save(nib.Nifti1Image(data, affine), path)


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda f: _edit_json(f, numTraining=6), "numTraining"),
        (lambda f: _edit_json(f, labels={"background": 0, "vessel": 1, "aneurysm": 3}), "consecutive"),
        (lambda f: _edit_json(f, labels={"vessel": 1, "aneurysm": 2}), "background"),
        (lambda f: (f / "labelsTr" / "va_a.nii.gz").unlink(), "no label"),
        (
            lambda f: (f / "imagesTr" / "va_a_0000.nii.gz").rename(f / "imagesTr" / "va_a_0001.nii.gz"),
            "channel",
        ),
        (lambda f: _rewrite_label(f, value=3), "not in"),
        (lambda f: _rewrite_label(f, shift_mm=0.5), "origin"),
    ],
    ids=[
        "numTraining",
        "labels-gap",
        "no-background",
        "missing-label",
        "channel-name",
        "label-value",
        "origin",
    ],
)
def test_checker_refuses_broken_datasets(tmp_path, dataset, spoil, message):
    folder = exported(tmp_path, dataset)
    spoil(folder)
    with pytest.raises(AssertionError, match=message):
        check_nnunet_raw(folder)


# ---------------------------------------------------------------------------------------------------------
# the export


def test_export_passes_nnunet_checks(tmp_path, dataset):
    folder = exported(tmp_path, dataset)
    assert folder == tmp_path / "raw" / "Dataset007_DINO3DRA"
    check_nnunet_raw(folder)
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "vessel": 1, "aneurysm": 2}
    assert meta["channel_names"] == {"0": "zscore"} and meta["file_ending"] == ".nii.gz"
    assert meta["numTraining"] == 5


def test_split_preserved_in_splits_final(tmp_path, dataset):
    folder = exported(tmp_path, dataset)
    splits = json.loads((folder / "splits_final.json").read_text())
    assert splits == [{"train": SPLITS["training"], "val": SPLITS["validation"]}]


def test_test_cases_go_to_imagesTs_only(tmp_path, dataset):
    folder = exported(tmp_path, dataset)
    assert sorted(p.name for p in (folder / "imagesTs").iterdir()) == ["ts_a_0000.nii.gz"]
    assert sorted(p.name for p in (folder / "labelsTs").iterdir()) == ["ts_a.nii.gz"]
    assert not any(p.name.startswith("ts_a") for p in (folder / "imagesTr").iterdir())
    assert not any(p.name.startswith("ts_a") for p in (folder / "labelsTr").iterdir())


@pytest.mark.parametrize("test_list", ["empty", "absent"])
def test_dataset_without_test_cases_exports(tmp_path, dataset, test_list):
    # the synthetic training default has "test": [] (its test phantoms are separate datasets)
    datalist = json.loads((dataset / "dataset.json").read_text())
    if test_list == "empty":
        datalist["test"] = []
    else:
        del datalist["test"]
    (dataset / "dataset.json").write_text(json.dumps(datalist))
    folder = exported(tmp_path, dataset)
    check_nnunet_raw(folder)
    assert not any((folder / "imagesTs").iterdir())


def test_voxels_and_affine_preserved_exactly(tmp_path, dataset):
    # a label whose affine is off by 50 nm: accepted, and written on the image's grid
    label_path = dataset / "labels" / "tr_c.nii.gz"
    nudged = oblique_affine(2)
    nudged[:3, 3] += 5e-5
    write_volume(label_path, np.asanyarray(nib.load(label_path).dataobj), nudged)
    folder = exported(tmp_path, dataset)
    for name, folder_tag in (("tr_a", "Tr"), ("tr_b", "Tr"), ("tr_c", "Tr"), ("va_a", "Tr"), ("ts_a", "Ts")):
        source = nib.load(dataset / "images" / f"{name}.nii.gz")
        image = nib.load(folder / f"images{folder_tag}" / f"{name}_0000.nii.gz")
        label = nib.load(folder / f"labels{folder_tag}" / f"{name}.nii.gz")
        assert image.get_data_dtype() == source.get_data_dtype()  # float32, int16, float64, int64 kept
        np.testing.assert_array_equal(np.asanyarray(image.dataobj), np.asanyarray(source.dataobj))
        np.testing.assert_array_equal(image.affine, source.affine)
        np.testing.assert_array_equal(label.affine, source.affine)
        assert label.get_data_dtype() == np.uint8
        source_label = np.asanyarray(nib.load(dataset / "labels" / f"{name}.nii.gz").dataobj)
        np.testing.assert_array_equal(np.asanyarray(label.dataobj), source_label)
        for written in (image, label):  # SimpleITK (qform) and nibabel (sform) read one geometry
            assert written.header["qform_code"] > 0 and written.header["sform_code"] > 0
            np.testing.assert_allclose(written.get_qform(), written.get_sform(), atol=1e-5)


def test_trailing_unit_axis_is_dropped(tmp_path, dataset):
    path = dataset / "images" / "tr_a.nii.gz"
    source = nib.load(path)
    write_volume(path, np.asanyarray(source.dataobj)[..., None], source.affine)  # (X, Y, Z, 1)
    folder = exported(tmp_path, dataset)
    assert nib.load(folder / "imagesTr" / "tr_a_0000.nii.gz").shape == SHAPE
    check_nnunet_raw(folder)


def test_nii_input_is_converted_to_nii_gz(tmp_path):
    dataset = make_dataset(tmp_path / "ours", nii=("va_a",))
    folder = exported(tmp_path, dataset)
    for written, source in (
        (folder / "imagesTr" / "va_a_0000.nii.gz", dataset / "images" / "va_a.nii"),
        (folder / "labelsTr" / "va_a.nii.gz", dataset / "labels" / "va_a.nii"),
    ):
        assert written.read_bytes()[:2] == b"\x1f\x8b"  # gzip
        np.testing.assert_array_equal(nib.load(written).get_fdata(), nib.load(source).get_fdata())
    check_nnunet_raw(folder)


def _collide(root: Path) -> str:
    """A test case stored elsewhere under a training case's file name."""
    entry = write_case(root / "other", "tr_a", 9)
    datalist = json.loads((root / "dataset.json").read_text())
    datalist["test"].append({k: f"other/{v}" for k, v in entry.items()})
    (root / "dataset.json").write_text(json.dumps(datalist))
    return "other/labels/tr_a.nii.gz"


def _unknown_label(root: Path) -> str:
    path = root / "labels" / "va_b.nii.gz"
    label = np.asanyarray(nib.load(path).dataobj).copy()
    label[0, 0, 0] = 3
    write_volume(path, label, oblique_affine(4))
    return "labels/va_b.nii.gz"


def _label_shape(root: Path) -> str:
    write_volume(root / "labels" / "ts_a.nii.gz", np.zeros((12, 10, 7), np.uint8), oblique_affine(5))
    return "labels/ts_a.nii.gz"


def _label_affine(root: Path) -> str:
    shifted = oblique_affine(5)
    shifted[:3, 3] += 0.5
    write_volume(root / "labels" / "ts_a.nii.gz", np.zeros(SHAPE, np.uint8), shifted)
    return "labels/ts_a.nii.gz"


def _nan_image(root: Path) -> str:
    image = np.zeros(SHAPE, np.float32)
    image[3, 3, 3] = np.nan
    write_volume(root / "images" / "va_b.nii.gz", image, oblique_affine(4))
    return "images/va_b.nii.gz"


def _two_channel_image(root: Path) -> str:
    write_volume(root / "images" / "va_b.nii.gz", np.zeros((*SHAPE, 2), np.float32), oblique_affine(4))
    return "images/va_b.nii.gz"


@pytest.mark.parametrize(
    "spoil, message",
    [
        (_collide, "both become nnU-Net case 'tr_a'"),
        (_unknown_label, r"unknown label values \[3\]"),
        (_label_shape, "does not match image"),
        (_label_affine, "geometry"),
        (_nan_image, "NaN"),
        (_two_channel_image, "single-channel 3D"),
    ],
    ids=["collision", "unknown-label", "label-shape", "label-affine", "nan", "dimensions"],
)
def test_bad_case_refused_naming_file_and_nothing_left(tmp_path, dataset, spoil, message):
    bad_file = spoil(dataset)
    with pytest.raises(ValueError, match=message) as error:
        exported(tmp_path, dataset)
    assert bad_file in str(error.value)
    assert not (tmp_path / "raw").exists() or list((tmp_path / "raw").iterdir()) == []


def test_existing_dataset_refused_without_overwrite(tmp_path, dataset):
    folder = exported(tmp_path, dataset)
    (folder / "marker").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite"):
        exported(tmp_path, dataset)
    assert (folder / "marker").is_file()
    assert exported(tmp_path, dataset, overwrite=True) == folder
    assert not (folder / "marker").exists()
    check_nnunet_raw(folder)
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == [folder.name]  # no leftovers


def test_overwrite_must_be_a_real_bool(tmp_path, dataset):
    folder = exported(tmp_path, dataset)
    (folder / "marker").write_text("old")
    command = ["--output_dir", str(tmp_path / "raw"), "--dataset_id", "7", "--dataset_dir", str(dataset)]
    with pytest.raises(ValueError, match="overwrite must be True or False"):
        fire.Fire(export_nnunet, command=[*command, "--overwrite", "false"])
    assert (folder / "marker").is_file()


def test_another_dataset_with_the_same_id_refused(tmp_path, dataset):
    (tmp_path / "raw" / "Dataset007_Other").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="Dataset007_Other"):
        exported(tmp_path, dataset)


def test_export_into_its_own_source_refused(tmp_path):
    source = make_dataset(tmp_path / "raw" / "Dataset007_DINO3DRA")
    with pytest.raises(ValueError, match="holds the source datalist"):
        exported(tmp_path, source, overwrite=True)
    assert (source / "dataset.json").is_file()


def test_default_is_train_yaml_synthetic_dataset(tmp_path, dataset, monkeypatch):
    import scripts.data.synthetic

    asked = {}

    def fake_ensure_dataset(dataset_dir, **kwargs):
        asked.update(dataset_dir=dataset_dir, **kwargs)
        return str(dataset / "dataset.json")

    monkeypatch.setattr(scripts.data.synthetic, "ensure_dataset", fake_ensure_dataset)
    folder = export_nnunet(output_dir=str(tmp_path / "raw"), dataset_id=7)
    assert Path(asked.pop("dataset_dir")) == ROOT / "data" / "synthetic"
    train = ConfigParser()
    train.read_config(ROOT / "configs" / "train.yaml")
    # the datalist's synthetic_<argument> keys of ensure_dataset (synthetic_cases for num_cases)
    keys = [key for key in train["datalist"] if key.startswith("synthetic_") and key != "synthetic_dir"]
    expected = {key.removeprefix("synthetic_"): train.get_parsed_content(key) for key in keys}
    assert asked == {"num_cases": expected.pop("cases"), **expected}
    check_nnunet_raw(Path(folder))


def test_command_line(tmp_path, dataset):
    out = tmp_path / "raw"
    command = [
        "--dataset_dir",
        str(dataset),
        "--output_dir",
        str(out),
        "--dataset_id",
        "12",
        "--name",
        "Tiny",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "scripts.export_nnunet", *command], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    check_nnunet_raw(out / "Dataset012_Tiny")
    assert "splits_final.json" in result.stdout  # the log says where it goes
