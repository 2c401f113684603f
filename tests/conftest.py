"""Shared fixtures. The repository root is the bundle root and must be importable as ``scripts``."""

from __future__ import annotations

import sys
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))

import pytest  # noqa: E402

# A DINOv3 ViT small enough for CPU tests: 2 layers, hidden 64, one 64-wide head, 4 registers.
TINY_DINOV3 = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 1,
    "intermediate_size": 128,
    "num_register_tokens": 4,
}
TINY_IMAGE_SIZE = 32


@pytest.fixture(scope="session")
def tiny_dinov3_dir(tmp_path_factory) -> Path:
    """A tiny random DINOv3 saved as a local Hugging Face folder."""
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    folder = tmp_path_factory.mktemp("tiny_dinov3")
    torch.manual_seed(0)
    DINOv3ViTModel(DINOv3ViTConfig(**TINY_DINOV3)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dinov2_dir(tmp_path_factory) -> Path:
    """A tiny random DINOv2 (ablation row) saved as a local Hugging Face folder."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("tiny_dinov2")
    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=1,
        intermediate_size=128,
        patch_size=8,
        image_size=32,
    )
    Dinov2Model(config).save_pretrained(folder)
    return folder


def write_tiny_case(
    path_image: Path, path_label: Path, seed: int, shape=(40, 40, 40), spacing=(0.4, 0.4, 0.4)
):
    """A bright tube along the last axis with a spherical bulge: labels 1 (tube) and 2 (bulge)."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    cx, cy = shape[0] / 2 + rng.uniform(-4, 4), shape[1] / 2 + rng.uniform(-4, 4)
    label = np.zeros(shape, np.uint8)
    label[(x - cx) ** 2 + (y - cy) ** 2 < 9] = 1
    cz = shape[2] / 2 + rng.uniform(-5, 5)
    label[((x - cx - 4) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 < 16) & (label == 0)] = 2
    image = np.where(label > 0, 1000.0, 50.0) + rng.normal(0, 20, shape)
    affine = np.diag([*spacing, 1.0])
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), path_image)
    nib.save(nib.Nifti1Image(label, affine), path_label)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """Three tiny labelled cases (training, validation, test) with a dataset.json datalist."""
    import json

    root = tmp_path_factory.mktemp("tiny_dataset")
    entries = {}
    for split, seed in (("training", 0), ("validation", 1), ("test", 2)):
        for folder in ("images", "labels"):
            (root / folder).mkdir(exist_ok=True)
        name = f"case_{seed:03d}.nii.gz"
        write_tiny_case(root / "images" / name, root / "labels" / name, seed)
        entries[split] = [{"image": f"images/{name}", "label": f"labels/{name}"}]
    (root / "dataset.json").write_text(json.dumps(entries))
    return root
