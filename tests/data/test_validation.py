"""Bad cases are refused with an error that names the file and the problem."""

from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import Compose, LoadImaged

from scripts.data.datalist import inference_inputs, load_split, resolve_datalist
from scripts.data.validation import ValidateCased


def save(path, array, affine=None):
    nib.save(nib.Nifti1Image(array, np.diag([0.4, 0.4, 0.4, 1.0]) if affine is None else affine), path)
    return str(path)


def load_and_validate(image, label=None):
    keys = ["image", "label"] if label else ["image"]
    pipeline = Compose([LoadImaged(keys, ensure_channel_first=True, image_only=True), ValidateCased()])
    return pipeline({"image": image, "label": label} if label else {"image": image})


GOOD = np.ones((8, 8, 8), np.float32)
LABEL = np.zeros((8, 8, 8), np.uint8)


@pytest.mark.parametrize(
    "image, label, label_affine, bad, message",
    [
        (GOOD.copy(), LABEL, None, "image", "NaN or infinite"),
        (np.ones((8, 8, 8, 2), np.float32), None, None, "image", "single-channel 3D"),
        (GOOD, np.full((8, 8, 8), 5, np.uint8), None, "label", r"unknown label values \[5\]"),
        (GOOD, np.zeros((8, 8, 6), np.uint8), None, "label", "does not match image"),
        (GOOD, LABEL, np.diag([0.5, 0.4, 0.4, 1.0]), "label", "geometry"),
    ],
    ids=["nan", "dimensions", "labels", "shape", "affine"],
)
def test_bad_case_names_file_and_problem(tmp_path, image, label, label_affine, bad, message):
    if message.startswith("NaN"):
        image[1, 2, 3] = np.nan
    image_path = save(tmp_path / "image.nii.gz", image)
    label_path = save(tmp_path / "label.nii.gz", label, label_affine) if label is not None else None
    with pytest.raises(RuntimeError) as error:  # MONAI's Compose wraps our ValueError as the cause
        load_and_validate(image_path, label_path)
    cause = error.value.__cause__
    assert isinstance(cause, ValueError) and re.search(message, str(cause))
    assert f"{bad}.nii.gz" in str(cause)


def test_good_case_passes(tmp_path):
    data = load_and_validate(save(tmp_path / "i.nii.gz", GOOD), save(tmp_path / "l.nii.gz", LABEL))
    assert data["image"].shape == (1, 8, 8, 8)


def test_unreadable_file_is_named(tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti")
    with pytest.raises(RuntimeError) as error:
        load_and_validate(str(broken))
    assert "broken.nii.gz" in str(error.value) + str(error.value.__cause__)


def test_dataset_dir_without_datalist_says_what_is_needed(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset.json.*training"):
        resolve_datalist(str(tmp_path), synthetic_dir=str(tmp_path / "synthetic"))


def test_datalist_naming_a_missing_file(tmp_path):
    (tmp_path / "dataset.json").write_text(
        json.dumps({"training": [{"image": "nope.nii.gz", "label": "x.nii.gz"}]})
    )
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        load_split(str(tmp_path / "dataset.json"), "training")
    with pytest.raises(ValueError, match="no 'test' list"):
        load_split(str(tmp_path / "dataset.json"), "test")


def test_load_split_keeps_only_what_the_pipeline_reads(tiny_dataset, tmp_path):
    entries = json.loads((tiny_dataset / "dataset.json").read_text())
    entries["training"][0]["info"] = {"anything": [1, 2]}
    (tmp_path / "dataset.json").write_text(json.dumps(entries))
    (split,) = load_split(str(tmp_path / "dataset.json"), "training", base_dir=str(tiny_dataset))
    assert set(split) == {"image", "label"}


def _with_hard_negatives(tiny_dataset, tmp_path, info) -> str:
    """tiny_dataset's datalist with ``info`` on its training case and a second training case without any."""
    entries = json.loads((tiny_dataset / "dataset.json").read_text())
    entries["training"][0]["info"] = info
    entries["training"].append(dict(entries["validation"][0]))
    (tmp_path / "dataset.json").write_text(json.dumps(entries))
    return str(tmp_path / "dataset.json")


def test_load_split_gives_the_hard_negatives_on_request(tiny_dataset, tmp_path):
    negatives = [{"kind": "loop", "centre_voxel": [4, 5, 6]}, {"kind": "bump", "centre_voxel": [7, 8, 9]}]
    datalist = _with_hard_negatives(tiny_dataset, tmp_path, {"hard_negatives": negatives})
    first, second = load_split(datalist, "training", str(tiny_dataset), hard_negatives=True)
    assert first["hard_negatives"].tolist() == [[4, 5, 6], [7, 8, 9]]
    assert second["hard_negatives"].shape == (0, 3)  # no info: none
    for kinds, expected in ((["bump"], [[7, 8, 9]]), (["bump", "loop"], [[4, 5, 6], [7, 8, 9]]), ([], [])):
        first, _ = load_split(datalist, "training", str(tiny_dataset), True, kinds)
        assert first["hard_negatives"].tolist() == expected
    with pytest.raises(ValueError, match="hard_negative_kinds"):
        load_split(datalist, "training", str(tiny_dataset), True, "bump")


def test_load_split_warns_when_no_case_has_the_hard_negatives_asked_for(tiny_dataset, tmp_path, caplog):
    datalist = _with_hard_negatives(
        tiny_dataset, tmp_path, {"hard_negatives": [{"kind": "loop", "centre_voxel": [1, 2, 3]}]}
    )
    with caplog.at_level("WARNING", logger="scripts.data.datalist"):
        load_split(datalist, "training", str(tiny_dataset), True)
        assert not caplog.records
        load_split(datalist, "training", str(tiny_dataset), True, ["bump"])
    (record,) = caplog.records
    assert "dataset.json" in record.getMessage() and "['bump']" in record.getMessage()


@pytest.mark.parametrize(
    "info, problem",
    [
        ("a phantom", "list 'hard_negatives'"),
        ({"hard_negatives": {"centre_voxel": [1, 2, 3]}}, "list 'hard_negatives'"),
        ({"hard_negatives": [{"centre_mm": [1.0, 2.0, 3.0]}]}, "centre_voxel"),
        ({"hard_negatives": [{"centre_voxel": [1, 2]}]}, "centre_voxel"),
    ],
)
def test_load_split_names_the_case_of_a_malformed_hard_negative(tiny_dataset, tmp_path, info, problem):
    datalist = _with_hard_negatives(tiny_dataset, tmp_path, info)
    with pytest.raises(ValueError, match=rf"dataset.json.*case_000.nii.gz.*{problem}"):
        load_split(datalist, "training", str(tiny_dataset), hard_negatives=True)


def test_inference_inputs(tmp_path):
    with pytest.raises(ValueError, match="input_files"):
        inference_inputs()
    with pytest.raises(ValueError, match="no .nii"):
        inference_inputs(dataset_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        inference_inputs(input_files=[str(tmp_path / "missing.nii.gz")])
    path = save(tmp_path / "a.nii.gz", GOOD)
    assert inference_inputs(dataset_dir=str(tmp_path)) == [{"image": path}]
