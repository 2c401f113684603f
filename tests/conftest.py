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
