"""Geometry with a known answer: the real inference and evaluation workflows around a network whose output
is known, on a scan that is odd-sized, anisotropic and not RAS.

The network is replaced by a fixed intensity threshold (:class:`IntensityThreshold`), so the right
segmentation of any scan is its thresholded intensity, voxel for voxel. The scan's spacings (0.8, 1.2 and
1.6 mm) are multiples of the 0.4 mm working spacing, so the preprocessing's resampling (reorientation to RAS,
up-sampling by 2, 3 and 4) passes through every input voxel centre and bilinear inversion returns exactly
the value computed there: anything but the thresholded scan, on the scan's own grid, is a bug in inverting
the preprocessing. Evaluation must then score that output Dice 1 and HD95 0, and a label moved by one voxel
along a file axis the HD95 of that axis' own spacing.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE_ROOT, bundle_workflow, run_workflow
from scipy import ndimage
from torch import nn

CONFIGS = BUNDLE_ROOT / "configs"

# The scan, in its file's voxel axes: 37 x 29 x 23 voxels of 0.8 x 1.2 x 1.6 mm. The affine permutes and
# flips the axes: file axis 0 runs posterior (-y), axis 1 superior (+z), axis 2 left (-x), i.e. "PSL".
SHAPE = (37, 29, 23)
SPACING = (0.8, 1.2, 1.6)
AFFINE = np.array(
    [
        [0.0, 0.0, -SPACING[2], 20.0],
        [-SPACING[0], 0.0, 0.0, 10.0],
        [0.0, SPACING[1], 0.0, -5.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
VESSEL_LEVEL, ANEURYSM_LEVEL = 500.0, 1000.0  # background 0; robust scaling maps them to 0.5 and 1
# Boxes away from the centre of every axis (a flip moves them) and from the borders (a shift keeps them whole).
VESSEL_BOX = (slice(6, 30), slice(9, 14), slice(4, 9))  # 24 x 5 x 5 voxels
ANEURYSM_BOX = (slice(18, 23), slice(14, 19), slice(4, 9))  # 5 x 5 x 5 voxels, on the vessel's side
SECOND_VESSEL_BOX = (slice(3, 8), slice(20, 26), slice(13, 20))  # 5 x 6 x 7 voxels, apart


class IntensityThreshold(nn.Module):
    """A stand-in network with a known answer: label 1 where the scaled intensity is in [low, high), 2 above.

    Args:
        low: threshold of vessel. Default 0.25.
        high: threshold of aneurysm. Default 0.75.
        steepness: logit slope per unit of intensity, so that probabilities are all but one-hot. Default 50.
    """

    def __init__(self, low: float = 0.25, high: float = 0.75, steepness: float = 50.0) -> None:
        super().__init__()
        self.register_buffer("thresholds", torch.tensor([low, high]))  # in model.pt, loaded by the workflow
        self.steepness = steepness

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 1, D, H, W) -> logits (B, 3, D, H, W); element-wise, so autocast leaves it in float32."""
        vessel = self.steepness * (x - self.thresholds[0])
        aneurysm = vessel + self.steepness * (x - self.thresholds[1])
        return torch.cat([torch.zeros_like(x), vessel, aneurysm], dim=1)


# The bundle's network replaced through the config, as a user would swap in their own; the working spacing
# stated, since the exact answer rests on the scan's spacings being multiples of it (0.4 mm is the default).
OVERRIDES = {
    "network_def": {"_target_": f"{__name__}.{IntensityThreshold.__name__}"},
    "spacing": [0.4, 0.4, 0.4],
}


def known_label() -> np.ndarray:
    """(37, 29, 23) labels 0/1/2 in the file's voxel axes: two vessel boxes and an aneurysm on one of them."""
    label = np.zeros(SHAPE, np.uint8)
    label[VESSEL_BOX] = 1
    label[SECOND_VESSEL_BOX] = 1
    label[ANEURYSM_BOX] = 2
    return label


def save(path: Path, volume: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(volume, AFFINE), path)
    return path


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> tuple[Path, Path]:
    """The scan (intensities 0 / 500 / 1000 where ``known_label`` is 0 / 1 / 2) and model.pt of the threshold."""
    folder = tmp_path_factory.mktemp("geometry")
    (folder / "images").mkdir()
    levels = np.array([0.0, VESSEL_LEVEL, ANEURYSM_LEVEL], np.float32)
    image = save(folder / "images" / "scan.nii.gz", levels[known_label()])
    model = folder / "model.pt"
    torch.save(IntensityThreshold().state_dict(), model)
    return image, model


def test_inference_returns_the_thresholded_scan_on_its_own_grid(scan, tmp_path):
    image, model = scan
    run_workflow(
        bundle_workflow(
            str(CONFIGS / "inference.yaml"),
            "infer",
            input_files=[str(image)],
            model_path=str(model),
            output_dir=str(tmp_path),
            **OVERRIDES,
        )
    )
    result = nib.load(tmp_path / "scan_seg.nii.gz")
    np.testing.assert_allclose(result.affine, AFFINE, atol=1e-5)
    # robust scaling maps the brightest level to 1, so the thresholds are fractions of it
    thresholds = ANEURYSM_LEVEL * np.asarray(IntensityThreshold().thresholds)
    thresholded = np.digitize(nib.load(image).get_fdata(), thresholds)
    np.testing.assert_array_equal(np.asarray(result.dataobj), thresholded)
    np.testing.assert_array_equal(thresholded, known_label())  # all three labels, where they were put


def rim_scan() -> tuple[np.ndarray, np.ndarray]:
    """The scan with a one-voxel shell around the second vessel box at 0.22 of the brightest level, and the
    shell: under the network's vessel threshold (0.25), over 0.4 of the box's own level (0.5)."""
    box = np.zeros(SHAPE, bool)
    box[SECOND_VESSEL_BOX] = True
    shell = ndimage.binary_dilation(box, structure=ndimage.generate_binary_structure(3, 1)) & ~box
    levels = np.array([0.0, VESSEL_LEVEL, ANEURYSM_LEVEL], np.float32)
    image = levels[known_label()]
    image[shell] = 0.22 * ANEURYSM_LEVEL
    return image, shell


@pytest.mark.parametrize("steps", [6, 0])
def test_inference_grows_the_labels_into_a_dim_rim_on_the_scan_s_own_grid(scan, tmp_path, steps):
    """The post-processing's growth to the lumen's edge labels :func:`rim_scan`'s dim shell vessel, voxel for
    voxel in the file's axes; with no growth steps it stays out."""
    _, model = scan
    image, shell = rim_scan()
    (tmp_path / "images").mkdir()
    run_workflow(
        bundle_workflow(
            str(CONFIGS / "inference.yaml"),
            "infer",
            input_files=[str(save(tmp_path / "images" / "rim.nii.gz", image))],
            model_path=str(model),
            output_dir=str(tmp_path / "out"),
            postprocess_lumen_steps=steps,
            **OVERRIDES,
        )
    )
    expected = known_label()
    if steps:
        expected[shell] = 1
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "out" / "rim_seg.nii.gz").dataobj), expected)


def shifted(label: np.ndarray, axis: int) -> np.ndarray:
    """``label`` moved by one voxel along a file axis (the boxes stay clear of the border)."""
    return np.roll(label, 1, axis=axis)


def dice_after_shift(boxes: list[tuple[slice, ...]], axis: int) -> float:
    """Dice of boxes against themselves moved one voxel along ``axis``: each keeps (n - 1) / n of its volume."""
    volumes = [np.prod([s.stop - s.start for s in box]) for box in boxes]
    lengths = [box[axis].stop - box[axis].start for box in boxes]
    return sum(v * (n - 1) / n for v, n in zip(volumes, lengths, strict=True)) / sum(volumes)


def evaluate(bundle_root: Path, data: Path, model: Path, **overrides) -> dict[str, dict]:
    """The evaluate workflow on ``data/dataset.json``'s test split with the threshold network; its
    ``per_case.csv`` rows by case name."""
    run_workflow(
        bundle_workflow(
            [str(CONFIGS / "train.yaml"), str(CONFIGS / "evaluate.yaml")],
            "eval",
            bundle_root=str(bundle_root),
            dataset_dir=str(data),
            model_path=str(model),
            **OVERRIDES,
            **overrides,
        ),
        check_properties=False,  # MONAI's "eval" properties name a top-level `dataset`; ours is validate#dataset
    )
    with open(bundle_root / "outputs" / "eval" / "per_case.csv", newline="") as handle:
        return {row["case"].removesuffix(".nii.gz"): row for row in csv.DictReader(handle)}


def test_evaluation_scores_at_the_label_s_own_spacing(scan, tmp_path):
    """Dice 1 and HD95 0 for the right answer; a one-voxel shift along file axis k costs SPACING[k] mm.

    Each box's surface moves by one voxel: its leading face (at least 25 % of its surface voxels) lies one
    step of SPACING[k] from the other surface and no voxel further, so the 95th percentile is SPACING[k];
    each box keeps (n - 1) / n of its voxels, n its length along k.
    """
    image, model = scan
    data = tmp_path / "data"
    (data / "labels").mkdir(parents=True)
    labels = {"exact": known_label(), **{f"shift{axis}": shifted(known_label(), axis) for axis in range(3)}}
    entries = [
        {"image": str(image), "label": str(save(data / "labels" / f"{name}.nii.gz", label))}
        for name, label in labels.items()
    ]
    (data / "dataset.json").write_text(json.dumps({"test": entries}))
    records = evaluate(tmp_path, data, model)
    assert set(records) == set(labels)
    for name in ("vessel", "aneurysm"):
        assert float(records["exact"][f"{name}_dice"]) == 1.0
        assert float(records["exact"][f"{name}_hd95"]) == 0.0
    for axis, spacing in enumerate(SPACING):
        record = records[f"shift{axis}"]
        assert float(record["vessel_hd95"]) == pytest.approx(spacing)
        assert float(record["aneurysm_hd95"]) == pytest.approx(spacing)
        assert float(record["vessel_dice"]) == pytest.approx(
            dice_after_shift([VESSEL_BOX, SECOND_VESSEL_BOX], axis)
        )
        assert float(record["aneurysm_dice"]) == pytest.approx(dice_after_shift([ANEURYSM_BOX], axis))


@pytest.mark.parametrize("steps", [6, 0])
def test_evaluation_scores_the_labels_grown_into_a_dim_rim(scan, tmp_path, steps):
    """Evaluation post-processes as inference does: the dim shell of :func:`rim_scan`, labelled vessel in the
    truth, is found by the growth (vessel Dice 1) and missed without it."""
    _, model = scan
    image, shell = rim_scan()
    label = known_label()
    label[shell] = 1
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    entry = {
        "image": str(save(data / "images" / "rim.nii.gz", image)),
        "label": str(save(data / "labels" / "rim.nii.gz", label)),
    }
    (data / "dataset.json").write_text(json.dumps({"test": [entry]}))
    (record,) = evaluate(tmp_path, data, model, postprocess_lumen_steps=steps).values()
    vessel = label == 1
    missed = 2 * (vessel & ~shell).sum() / (vessel.sum() + (vessel & ~shell).sum())
    assert float(record["vessel_dice"]) == pytest.approx(1.0 if steps else missed)
    assert float(record["aneurysm_dice"]) == 1.0
