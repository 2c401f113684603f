"""DICOM input for inference (``scripts.data.dicom``): a folder holding one DICOM series reads as one volume whose
affine puts every voxel on its DICOM world point (in RAS, as a NIfTI's), and the outputs are written there.

The series is written here with pydicom from a known (X, Y, Z) volume: slice ``k`` holds ``volume[:, :, k]``,
its pixel (column i, row j) at ``ImagePositionPatient + i * dx * row_cosine + j * dy * column_cosine`` (DICOM
PS3.3 C.7.6.2.1.1), so the expected world point of every voxel comes from the DICOM definition, not from
MONAI. The orientation is sagittal tilted by 30 degrees about the patient's left-right axis, the spacing 0.4
x 0.8 x 1.2 mm: anisotropic, and multiples of the 0.4 mm working spacing so that the stand-in network of
``test_geometry`` (a fixed intensity threshold) gives back the thresholded volume voxel for voxel.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_DINOV3, TINY_IMAGE_SIZE
from monai.bundle import ConfigParser
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from test_batch_inference import ANEURYSM, CONFIGS, VESSEL, infer
from test_geometry import IntensityThreshold

from scripts.batch_inference import CasesFailed, case_name
from scripts.data.datalist import inference_inputs

SHAPE = (24, 20, 16)  # (X, Y, Z): columns, rows, slices
SPACING = (0.4, 0.8, 1.2)  # mm: along a row, down a column, between slices
TILT = np.deg2rad(30.0)
# LPS direction cosines: rows run posterior, columns inferior (sagittal), tilted about the L axis
TILT_ABOUT_L = np.array([[1, 0, 0], [0, np.cos(TILT), -np.sin(TILT)], [0, np.sin(TILT), np.cos(TILT)]])
ROW, COLUMN = TILT_ABOUT_L @ [0.0, 1.0, 0.0], TILT_ABOUT_L @ [0.0, 0.0, -1.0]
NORMAL = np.cross(ROW, COLUMN)
ORIGIN = np.array([-12.5, 30.0, 45.0])  # ImagePositionPatient of the first slice, LPS mm
MARK, MARK_VALUE = (17, 3, 11), 77  # one voxel of a value found nowhere else, below the vessel level
VESSEL_BOX = (slice(4, 20), slice(4, 8), slice(6, 13))
ANEURYSM_BOX = (slice(10, 14), slice(8, 11), slice(8, 11))  # 36 voxels touching the vessel


def world_ras(voxel) -> np.ndarray:
    """The RAS point (mm) of voxel (i, j, k) of the series, from DICOM's definition of its geometry."""
    i, j, k = voxel
    lps = ORIGIN + i * SPACING[0] * ROW + j * SPACING[1] * COLUMN + k * SPACING[2] * NORMAL
    return lps * [-1, -1, 1]


def expected_affine() -> np.ndarray:
    """(4, 4) voxel -> RAS mm, built from :func:`world_ras`."""
    affine = np.eye(4)
    affine[:3, 3] = world_ras((0, 0, 0))
    for axis in range(3):
        affine[:3, axis] = world_ras(np.eye(3)[axis]) - affine[:3, 3]
    return affine


def known_volume() -> np.ndarray:
    """(24, 20, 16) uint16: a vessel box at the stand-in's vessel level, an aneurysm box on it, one marked voxel."""
    volume = np.zeros(SHAPE, np.uint16)
    volume[VESSEL_BOX] = VESSEL
    volume[ANEURYSM_BOX] = ANEURYSM
    volume[MARK] = MARK_VALUE
    return volume


def write_series(
    folder: Path, volume: np.ndarray, offsets: np.ndarray | None = None, skip=(), prefix: str = "IM"
) -> Path:
    """Write ``volume`` (X, Y, Z) as a DICOM series, one extension-less file per slice, into ``folder``.

    Args:
        offsets: (Z,) slice positions along the normal, mm. Default ``k * SPACING[2]``.
        skip: slice numbers not written (a missing slice).
        prefix: file names; a second call with another prefix puts a second series in the folder.
    """
    folder.mkdir(parents=True, exist_ok=True)
    offsets = np.arange(volume.shape[2]) * SPACING[2] if offsets is None else offsets
    study, series = generate_uid(), generate_uid()
    for k in range(volume.shape[2]):
        if k in skip:
            continue
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, "CT"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [round(v, 6) for v in ORIGIN + offsets[k] * NORMAL]
        ds.ImageOrientationPatient = [round(v, 6) for v in (*ROW, *COLUMN)]
        ds.PixelSpacing = [SPACING[1], SPACING[0]]  # between rows, between columns
        ds.SliceThickness = SPACING[2]
        ds.set_pixel_data(np.ascontiguousarray(volume[:, :, k].T), "MONOCHROME2", 16)  # (rows, columns)
        ds.save_as(folder / f"{prefix}{k + 1:04d}", enforce_file_format=True)
    return folder


def load(path: Path):
    """The image as ``configs/inference.yaml`` loads it: (1, X, Y, Z) MetaTensor."""
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.yaml"))
    return parser.get_parsed_content("loading#0")({"image": str(path)})["image"]


def test_a_series_folder_loads_with_each_voxel_on_its_dicom_world_point(tmp_path):
    folder = write_series(tmp_path / "series", known_volume())
    image = load(folder)
    assert tuple(image.shape) == (1, *SHAPE)
    np.testing.assert_array_equal(image[0].numpy(), known_volume())  # voxel (i, j, k) is DICOM's (i, j, k)
    np.testing.assert_allclose(image.affine.numpy(), expected_affine(), atol=1e-4)
    (mark,) = np.argwhere(image[0].numpy() == MARK_VALUE)
    np.testing.assert_allclose(image.affine.numpy() @ [*mark, 1], [*world_ras(MARK), 1], atol=1e-4)
    np.testing.assert_allclose(image.pixdim, SPACING, atol=1e-5)
    # the same volume as a NIfTI with that affine loads the same
    nib.save(nib.Nifti1Image(known_volume(), expected_affine()), tmp_path / "same.nii.gz")
    nifti = load(tmp_path / "same.nii.gz")
    np.testing.assert_array_equal(nifti.numpy(), image.numpy())
    np.testing.assert_allclose(nifti.affine.numpy(), image.affine.numpy(), atol=1e-4)


BAD_SERIES = {
    "two_series": (
        lambda f: write_series(write_series(f, known_volume(), prefix="A"), known_volume(), prefix="B"),
        r"holds 2 DICOM series .*put each in a folder of its own",
    ),
    "missing_slice": (
        lambda f: write_series(f, known_volume(), skip=(7,)),
        r"slices are 1.2 mm apart but 2.4 mm between instances 7 and 9 \(a missing slice",
    ),
    "varying_spacing": (
        lambda f: write_series(f, known_volume(), offsets=np.r_[0, np.cumsum([1.2] * 7 + [1.5] * 8)]),
        r"1.5 mm apart but 1.2 mm between instances 1 and 2 \(a missing slice or varying",
    ),
    "sub_folder": (
        lambda f: (write_series(f, known_volume()) / "extra").mkdir(),
        r"holds sub-folders \['extra'\]",
    ),
    "no_dicom": (
        lambda f: (f.mkdir(), (f / "notes.txt").write_text("not an image")),
        r"no DICOM files in this folder",
    ),
}


@pytest.mark.parametrize("kind", BAD_SERIES)
def test_a_folder_that_is_not_one_evenly_spaced_series_is_refused_naming_it(kind, tmp_path):
    make, problem = BAD_SERIES[kind]
    folder = tmp_path / kind
    make(folder)
    with pytest.raises(ValueError, match=problem) as error:
        load(folder)
    assert str(error.value).startswith(f"{folder}: ")


def test_inputs_are_nifti_files_and_series_folders_named_after_them(tmp_path, monkeypatch):
    root = tmp_path / "in"
    root.mkdir()
    for name in ("a.nii.gz", "c.nii"):
        nib.save(nib.Nifti1Image(known_volume(), expected_affine()), root / name)
    write_series(root / "b_series", known_volume()[..., :3])
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("no DICOM here")  # skipped, as is a hidden folder
    shutil.copytree(root / "b_series", root / ".hidden")
    expected = [str(root / "a.nii.gz"), str(root / "b_series"), str(root / "c.nii")]
    assert inference_inputs(dataset_dir=str(root)) == [{"image": p} for p in expected]
    # a series folder itself, given as dataset_dir or as an input
    assert inference_inputs(dataset_dir=str(root / "b_series")) == [{"image": str(root / "b_series")}]
    assert inference_inputs(input_files=[str(root / "b_series")]) == [{"image": str(root / "b_series")}]
    monkeypatch.chdir(root / "b_series")
    assert [case_name(c["image"]) for c in inference_inputs(dataset_dir=".")] == ["b_series"]


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory) -> tuple[Path, Path, CasesFailed | None]:
    """Inference (the stand-in network) on a folder of a NIfTI case, a DICOM series and two bad series folders."""
    root = tmp_path_factory.mktemp("dicom_run")
    folder = root / "in"
    folder.mkdir()
    nib.save(
        nib.Nifti1Image(known_volume().astype(np.float32), np.diag([*SPACING, 1.0])), folder / "a.nii.gz"
    )
    write_series(folder / "dicom_case", known_volume())
    for kind in ("two_series", "missing_slice"):
        BAD_SERIES[kind][0](folder / kind)
    torch.save(IntensityThreshold().state_dict(), root / "model.pt")
    out = root / "out"
    return folder, out, infer(folder, out)


def test_the_segmentation_of_a_series_is_written_in_its_geometry(mixed_run):
    folder, out, _ = mixed_run
    label = nib.load(out / "dicom_case_seg.nii.gz")
    assert label.shape == SHAPE
    np.testing.assert_allclose(label.affine, expected_affine(), atol=1e-4)
    thresholded = np.digitize(known_volume(), [VESSEL / 2, (VESSEL + ANEURYSM) / 2]).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(label.dataobj), thresholded)
    # the aneurysm measured where it is in the world: its centroid is the box centre's DICOM world point
    document = json.loads((out / "dicom_case_aneurysms.json").read_text())
    assert document["image"] == str(folder / "dicom_case")
    (aneurysm,) = document["aneurysms"]
    centre = [(box.start + box.stop - 1) / 2 for box in ANEURYSM_BOX]
    assert aneurysm["voxels"] == 36
    np.testing.assert_allclose(aneurysm["centroid_ras_mm"], world_ras(centre), atol=1e-3)
    assert (out / "dicom_case_mip.png").is_file() and (out / "a_seg.nii.gz").is_file()


def test_bad_series_folders_fail_as_cases_naming_the_folder_and_the_others_are_written(mixed_run):
    folder, out, failed = mixed_run
    summary = json.loads((out / "summary.json").read_text())
    assert [c["case"] for c in summary["done"]] == ["a", "dicom_case"]
    problems = {f["image"]: f["problem"] for f in summary["failed"]}
    assert set(problems) == {str(folder / "missing_slice"), str(folder / "two_series")}
    for image, problem in problems.items():
        kind = Path(image).name
        assert re.search(BAD_SERIES[kind][1], problem), problem
        assert f"{image} ({problem})" in str(failed)  # the run's last line names the folder and the problem
    assert isinstance(failed, CasesFailed) and [f["case"] for f in failed.failed] == [
        "missing_slice",
        "two_series",
    ]


def test_the_bundle_network_segments_a_series_folder_given_as_dataset_dir(mixed_run, tmp_path):
    """The real network (tiny random encoder and U-Net), the series folder itself as ``dataset_dir``."""
    folder, _, _ = mixed_run
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.yaml"))
    tiny = {
        "roi_size": [32, 32, 32],
        "dino_model": "random:0",
        "dino_config": TINY_DINOV3,
        "dino_image_size": TINY_IMAGE_SIZE,
        "network_def": {**parser["network_def"], "channels": [8, 16, 32, 64]},
    }
    parser.update(tiny)
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "model.pt")
    out = tmp_path / "out"
    assert infer(folder / "dicom_case", out, model_path=str(tmp_path / "model.pt"), **tiny) is None
    label = nib.load(out / "dicom_case_seg.nii.gz")
    assert label.shape == SHAPE and label.get_data_dtype() == np.uint8
    np.testing.assert_allclose(label.affine, expected_affine(), atol=1e-4)
