"""Loading the frozen encoder from every source a user has: hub id, HF folder, Meta .pth, random."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import TINY_DINOV3, TINY_IMAGE_SIZE
from dinov3_vits16_layout import VITS16_KEYS, published_state_dict
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from scripts.networks import EncoderWeightsError, SliceEncoder, load_encoder


def hf_to_meta(state: dict[str, torch.Tensor], heads: int) -> dict[str, torch.Tensor]:
    """Write a transformers DINOv3 state dict in Meta's original layout (the inverse of what we load)."""
    meta: dict[str, torch.Tensor] = {}
    hidden = state["embeddings.cls_token"].shape[-1]
    layers = {int(m.group(1)) for k in state if (m := re.match(r"model\.layer\.(\d+)\.", k))}
    meta["cls_token"] = state["embeddings.cls_token"]
    meta["storage_tokens"] = state["embeddings.register_tokens"]
    meta["mask_token"] = state["embeddings.mask_token"].reshape(1, hidden)
    meta["patch_embed.proj.weight"] = state["embeddings.patch_embeddings.weight"]
    meta["patch_embed.proj.bias"] = state["embeddings.patch_embeddings.bias"]
    head_dim = hidden // heads
    meta["rope_embed.periods"] = 100.0 ** (4 * torch.arange(head_dim // 4) / head_dim)  # Meta's RoPE periods
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


@pytest.mark.parametrize(
    "gated, heads", [(False, 1), (True, 1), (False, 2)], ids=["mlp", "swiglu", "2_heads"]
)
def test_meta_and_hf_files_of_one_model_embed_identically(tmp_path, gated, heads):
    """Same encoder, same identity; the head count comes from the RoPE periods (head_dim / 4 of them)."""
    torch.manual_seed(1)
    config = {**TINY_DINOV3, "num_attention_heads": heads, "use_gated_mlp": gated}
    model = DINOv3ViTModel(DINOv3ViTConfig(**config))
    model.save_pretrained(tmp_path / "hf")
    meta_path = tmp_path / "dinov3_tiny_pretrain-0000.pth"
    torch.save(hf_to_meta(model.state_dict(), heads), meta_path)

    encoders = [SliceEncoder(str(p), image_size=TINY_IMAGE_SIZE) for p in (tmp_path / "hf", meta_path)]
    assert encoders[0].provenance.sha256 == encoders[1].provenance.sha256
    x = torch.rand(2, 1, 8, 8, 6)
    torch.testing.assert_close(encoders[0](x), encoders[1](x), rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def vits16_state() -> dict[str, torch.Tensor]:
    """Meta's ViT-S/16 checkpoint layout at full size (see ``dinov3_vits16_layout``), random values."""
    return published_state_dict(seed=0)


def test_meta_vits16_checkpoint_loads_every_tensor_of_the_published_layout(tmp_path, vits16_state):
    path = tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    torch.save(vits16_state, path)
    loaded = load_encoder(str(path))

    config = loaded.model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (384, 12, 6)
    assert (config.num_register_tokens, config.patch_size, config.intermediate_size) == (4, 16, 1536)
    assert (config.rope_theta, config.layer_norm_eps, config.use_gated_mlp) == (100.0, 1e-5, False)
    assert loaded.num_prefix_tokens == 5 and loaded.hidden_size == 384
    assert loaded.provenance.source == str(path) and not loaded.provenance.is_random

    # Every weight arrives (strict loading refuses missing and unexpected keys); only the two buffers Meta
    # keeps for recomputable values and the masked-out key bias are not carried over.
    state = loaded.model.state_dict()
    buffers = sum(v.numel() for k, v in vits16_state.items() if k.endswith(("periods", "bias_mask")))
    key_bias = 12 * 384
    assert (
        sum(v.numel() for v in state.values())
        == sum(v.numel() for v in vits16_state.values()) - buffers - key_bias
    )
    # transformers' names for Meta's tensors (the layout of facebook/dinov3-vits16-pretrain-lvd1689m)
    same = {
        "embeddings.cls_token": vits16_state["cls_token"],
        "embeddings.register_tokens": vits16_state["storage_tokens"],
        "embeddings.mask_token": vits16_state["mask_token"].reshape(1, 1, 384),
        "embeddings.patch_embeddings.weight": vits16_state["patch_embed.proj.weight"],
        "model.layer.11.layer_scale2.lambda1": vits16_state["blocks.11.ls2.gamma"],
        "model.layer.5.mlp.up_proj.weight": vits16_state["blocks.5.mlp.fc1.weight"],
        "model.layer.5.mlp.down_proj.bias": vits16_state["blocks.5.mlp.fc2.bias"],
        "model.layer.0.attention.o_proj.weight": vits16_state["blocks.0.attn.proj.weight"],
        "model.layer.3.norm2.weight": vits16_state["blocks.3.norm2.weight"],
        "norm.bias": vits16_state["norm.bias"],
    }
    for name in "qkv":
        same[f"model.layer.7.attention.{name}_proj.weight"] = vits16_state["blocks.7.attn.qkv.weight"][
            "qkv".index(name) * 384 : ("qkv".index(name) + 1) * 384
        ]
    same["model.layer.7.attention.v_proj.bias"] = vits16_state["blocks.7.attn.qkv.bias"][768:]
    for name, expected in same.items():
        torch.testing.assert_close(state[name], expected, rtol=0, atol=0, msg=name)
    with torch.no_grad():
        tokens = loaded.model(pixel_values=torch.rand(1, 3, 32, 32)).last_hidden_state
    assert tokens.shape == (1, 5 + 4, 384) and torch.isfinite(tokens).all()


def test_published_layout_fixture_is_vits16():
    """The pinned names and shapes add up to DINOv3 ViT-S/16: 188 tensors, 21.6 M parameters."""
    assert len(VITS16_KEYS) == len({name for name, _ in VITS16_KEYS}) == 6 + 12 * 15 + 2
    buffers = {"rope_embed.periods", *(f"blocks.{i}.attn.qkv.bias_mask" for i in range(12))}
    parameters = sum(torch.Size(shape).numel() for name, shape in VITS16_KEYS if name not in buffers)
    assert parameters == 21_601_152


@pytest.mark.parametrize(
    "change, message",
    [
        (
            ("blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc_1.weight"),
            r"not in Meta's.*blocks\.0\.mlp\.fc_1\.weight",
        ),
        (
            ("blocks.7.attn.qkv.weight", "blocks.7.attn.qkv.weights"),
            r"not in Meta's.*blocks\.7\.attn\.qkv\.weights",
        ),
        (("norm.bias", "norm_bias"), r"not in Meta's.*norm_bias"),
        (("blocks.4.ls1.gamma", None), r"does not fit.*layer_scale1"),
        (("storage_tokens", None), r"does not fit.*register_tokens"),
    ],
    ids=[
        "misspelt_first_block_mlp",
        "misspelt_qkv",
        "renamed_final_norm",
        "missing_layer_scale",
        "missing_registers",
    ],
)
def test_meta_checkpoint_with_a_wrong_key_is_refused_naming_file_and_key(
    tmp_path, vits16_state, change, message
):
    old, new = change
    state = dict(vits16_state)
    value = state.pop(old)
    if new is not None:
        state[new] = value
    path = tmp_path / "dinov3_vits16_pretrain_lvd1689m-edited.pth"
    torch.save(state, path)
    with pytest.raises(
        EncoderWeightsError, match="(?s)dinov3_vits16_pretrain_lvd1689m-edited.pth.*" + message
    ):
        load_encoder(str(path))


def test_meta_checkpoint_with_other_rope_periods_is_refused(tmp_path, vits16_state):
    """transformers recomputes RoPE from rope_theta: periods of another base must not load silently."""
    state = dict(vits16_state)
    state["rope_embed.periods"] = 1000.0 ** (4 * torch.arange(16) / 64)
    path = tmp_path / "other_rope.pth"
    torch.save(state, path)
    with pytest.raises(
        EncoderWeightsError, match=r"other_rope.pth.*rope_theta=100.0.*imply rope_theta ~ 1000"
    ):
        load_encoder(str(path))
    assert load_encoder(str(path), dino_config={"rope_theta": 1000.0}).model.config.rope_theta == 1000.0


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
