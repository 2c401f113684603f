"""Loading the frozen encoder from every source a user has: hub id, HF folder, Meta .pth, random."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import TINY_DINOV3, TINY_IMAGE_SIZE
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from scripts.networks import EncoderWeightsError, SliceEncoder, load_encoder


def hf_to_meta(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Write a transformers DINOv3 state dict in Meta's original layout (the inverse of what we load)."""
    meta: dict[str, torch.Tensor] = {}
    hidden = state["embeddings.cls_token"].shape[-1]
    layers = {int(m.group(1)) for k in state if (m := re.match(r"model\.layer\.(\d+)\.", k))}
    meta["cls_token"] = state["embeddings.cls_token"]
    meta["storage_tokens"] = state["embeddings.register_tokens"]
    meta["mask_token"] = state["embeddings.mask_token"].reshape(1, hidden)
    meta["patch_embed.proj.weight"] = state["embeddings.patch_embeddings.weight"]
    meta["patch_embed.proj.bias"] = state["embeddings.patch_embeddings.bias"]
    meta["rope_embed.periods"] = torch.ones(hidden // 4)
    for i in layers:
        hf, mt = f"model.layer.{i}", f"blocks.{i}"
        for part in ("norm1", "norm2"):
            for kind in ("weight", "bias"):
                meta[f"{mt}.{part}.{kind}"] = state[f"{hf}.{part}.{kind}"]
        att = f"{hf}.attention"
        meta[f"{mt}.attn.qkv.weight"] = torch.cat([state[f"{att}.{p}_proj.weight"] for p in "qkv"])
        zeros = torch.zeros_like(state[f"{att}.q_proj.bias"])
        meta[f"{mt}.attn.qkv.bias"] = torch.cat(
            [state[f"{att}.q_proj.bias"], zeros, state[f"{att}.v_proj.bias"]]
        )
        meta[f"{mt}.attn.qkv.bias_mask"] = torch.cat([torch.ones_like(zeros), zeros, torch.ones_like(zeros)])
        meta[f"{mt}.attn.proj.weight"] = state[f"{att}.o_proj.weight"]
        meta[f"{mt}.attn.proj.bias"] = state[f"{att}.o_proj.bias"]
        meta[f"{mt}.ls1.gamma"] = state[f"{hf}.layer_scale1.lambda1"]
        meta[f"{mt}.ls2.gamma"] = state[f"{hf}.layer_scale2.lambda1"]
        names = {"gate_proj": "w1", "up_proj": "w2", "down_proj": "w3"}
        if f"{hf}.mlp.gate_proj.weight" not in state:
            names = {"up_proj": "fc1", "down_proj": "fc2"}
        for hf_name, meta_name in names.items():
            for kind in ("weight", "bias"):
                meta[f"{mt}.mlp.{meta_name}.{kind}"] = state[f"{hf}.mlp.{hf_name}.{kind}"]
    meta["norm.weight"], meta["norm.bias"] = state["norm.weight"], state["norm.bias"]
    return meta


@pytest.mark.parametrize("gated", [False, True], ids=["mlp", "swiglu"])
def test_meta_and_hf_files_of_one_model_embed_identically(tmp_path, gated):
    torch.manual_seed(1)
    model = DINOv3ViTModel(DINOv3ViTConfig(**TINY_DINOV3, use_gated_mlp=gated))
    model.save_pretrained(tmp_path / "hf")
    meta_path = tmp_path / "dinov3_tiny_pretrain-0000.pth"
    torch.save(hf_to_meta(model.state_dict()), meta_path)

    encoders = [SliceEncoder(str(p), image_size=TINY_IMAGE_SIZE) for p in (tmp_path / "hf", meta_path)]
    assert encoders[0].provenance.sha256 == encoders[1].provenance.sha256
    x = torch.rand(2, 1, 8, 8, 6)
    torch.testing.assert_close(encoders[0](x), encoders[1](x), rtol=1e-6, atol=1e-6)


def test_uncached_hub_id_says_what_to_do(tmp_path):
    with pytest.raises(EncoderWeightsError) as error:
        load_encoder(
            "facebook/dinov3-vits16-pretrain-lvd1689m", local_files_only=True, cache_dir=str(tmp_path)
        )
    message = str(error.value)
    assert (
        "licence" in message and "hf auth login" in message and "dino_model" in message and ".pth" in message
    )


@pytest.mark.parametrize(
    "name, message",
    [("no/such/file.pth", "not an existing file"), ("not a name", "not an existing file")],
)
def test_unknown_source_raises(name, message):
    with pytest.raises(EncoderWeightsError, match=message):
        load_encoder(name)


def test_unreadable_meta_file_names_the_file(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderWeightsError, match="broken.pth"):
        load_encoder(str(bad))
    wrong = tmp_path / "wrong.pth"
    torch.save({"weight": torch.zeros(1)}, wrong)
    with pytest.raises(EncoderWeightsError, match="wrong.pth.*Meta's layout"):
        load_encoder(str(wrong))


def test_random_weights_are_reproducible_and_loud(caplog):
    with caplog.at_level("WARNING"):
        first = load_encoder("random:5", dino_config=TINY_DINOV3)
    assert "RANDOM" in caplog.text
    assert load_encoder("random:5", dino_config=TINY_DINOV3).provenance == first.provenance
    assert load_encoder("random:6", dino_config=TINY_DINOV3).provenance.sha256 != first.provenance.sha256
    assert first.provenance.source == "random:5" and first.provenance.is_random


def test_folder_image_statistics_are_used(tiny_dinov3_dir, tmp_path):
    import shutil

    folder = tmp_path / "with_processor"
    shutil.copytree(tiny_dinov3_dir, folder)
    (folder / "preprocessor_config.json").write_text(
        '{"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}'
    )
    loaded = load_encoder(str(folder))
    assert loaded.image_mean == (0.5, 0.5, 0.5) and loaded.image_std == (0.25, 0.25, 0.25)
    assert load_encoder(str(tiny_dinov3_dir)).image_mean == (0.485, 0.456, 0.406)


def test_slice_embedding_is_the_mean_of_patch_tokens(tiny_dinov3_dir):
    """CLS and the 4 registers are dropped; exactly the patch tokens are averaged."""
    encoder = SliceEncoder(str(tiny_dinov3_dir), image_size=TINY_IMAGE_SIZE)
    slices = torch.rand(3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)  # already at encoder size: no resampling
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    images = (slices.unsqueeze(1).expand(-1, 3, -1, -1) - mean) / std
    with torch.no_grad():
        tokens = encoder.backbone(pixel_values=images).last_hidden_state
    assert tokens.shape[1] == 1 + 4 + (TINY_IMAGE_SIZE // 16) ** 2
    torch.testing.assert_close(encoder.encode_slices(slices), tokens[:, 5:].mean(dim=1))
