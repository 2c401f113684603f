"""Where the frozen slice encoder's weights come from, and a fingerprint of them.

``dino_model`` names the weights in one of five ways:

- a Hugging Face hub id, e.g. ``facebook/dinov3-vits16-pretrain-lvd1689m`` (gated: accept the licence
  and log in once) or ``facebook/dinov2-small`` for the ablation row;
- a local folder written by ``save_pretrained`` (``config.json`` + weights);
- Meta's original DINOv3 state dict, ``dinov3_vits16_pretrain_lvd1689m-*.pth``, mapped here to the
  ``transformers`` layout;
- ``random`` or ``random:SEED``: a randomly initialised, frozen DINOv3 ViT-S/16, reproducible from the seed.
  Only for explicit ablations and tests; it is logged as a warning every time.

Every loaded encoder carries an :class:`EncoderProvenance` (source and a SHA-256 of its weights), which the
network stores in its checkpoints and checks when they are loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, DINOv3ViTConfig, DINOv3ViTModel, PreTrainedModel

logger = logging.getLogger(__name__)

DEFAULT_DINO_MODEL = "facebook/dinov3-vits16-pretrain-lvd1689m"
# ImageNet statistics: what both DINOv2 and DINOv3 (LVD-1689M) were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# DINOv3 ViT-S/16 as released by Meta (the fields that differ from transformers' defaults).
VITS16_CONFIG: dict[str, Any] = {"num_register_tokens": 4}

_RANDOM = re.compile(r"^random(?::(\d+))?$")


class EncoderWeightsError(OSError):
    """The encoder weights named by ``dino_model`` could not be found or read."""


class EncoderMismatchError(RuntimeError):
    """A checkpoint was trained with other encoder weights than the ones loaded now."""


@dataclass(frozen=True)
class EncoderProvenance:
    """Which weights a frozen encoder holds.

    Args:
        source: the ``dino_model`` string it was loaded from (``random:SEED`` for random weights).
        sha256: SHA-256 over the names, shapes and bytes of every tensor of its state dict.
    """

    source: str
    sha256: str

    @property
    def is_random(self) -> bool:
        return _RANDOM.match(self.source) is not None


@dataclass(frozen=True)
class LoadedEncoder:
    """A frozen backbone with what is needed to feed it and to recognise it later."""

    model: PreTrainedModel
    provenance: EncoderProvenance
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_prefix_tokens(self) -> int:
        """CLS plus register tokens, which precede the patch tokens in ``last_hidden_state``."""
        return 1 + int(getattr(self.model.config, "num_register_tokens", 0) or 0)


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of every tensor in ``model.state_dict()``."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_encoder(
    dino_model: str = DEFAULT_DINO_MODEL,
    dino_config: dict[str, Any] | None = None,
    local_files_only: bool | None = None,
    cache_dir: str | None = None,
) -> LoadedEncoder:
    """Load a frozen DINOv3 (or DINOv2) backbone from any of the sources in the module docstring.

    Args:
        dino_model: hub id, local folder, Meta ``.pth`` file, or ``random`` / ``random:SEED``.
        dino_config: fields that override the architecture: for ``random``, on top of ViT-S/16 (tests use
            tiny configs this way); for a Meta ``.pth``, on top of what the state dict implies (e.g.
            ``num_attention_heads`` when the head width is not 64).
        local_files_only: for hub ids, never go online. ``None`` looks in the local cache first and goes
            online only if that fails and ``HF_HUB_OFFLINE`` is not set.
        cache_dir: Hugging Face cache folder for hub ids (default: the user's cache).

    Returns:
        the backbone in eval mode with ``requires_grad`` off, its provenance and image statistics.

    Raises:
        EncoderWeightsError: the weights cannot be found or read; the message says what to do.
    """
    random_match = _RANDOM.match(dino_model)
    if random_match:
        seed = int(random_match.group(1) or 0)
        model = _random_dinov3(seed, dino_config)
        source, mean, std = f"random:{seed}", IMAGENET_MEAN, IMAGENET_STD
    elif Path(dino_model).is_file():
        model = _meta_dinov3(Path(dino_model), dino_config)
        source, mean, std = dino_model, IMAGENET_MEAN, IMAGENET_STD
    elif Path(dino_model).is_dir():
        model = _from_pretrained(dino_model, local_files_only=True, cache_dir=None)
        mean, std = _folder_image_stats(Path(dino_model))
        source = dino_model
    elif _looks_like_hub_id(dino_model):
        model = _from_hub(dino_model, local_files_only, cache_dir)
        source, mean, std = dino_model, IMAGENET_MEAN, IMAGENET_STD
    else:
        raise EncoderWeightsError(
            f"dino_model={dino_model!r} is not an existing file or folder, a hub id (owner/name), or "
            "'random[:SEED]'."
        )

    model.eval().requires_grad_(False)
    provenance = EncoderProvenance(source=source, sha256=weights_sha256(model))
    if provenance.is_random:
        logger.warning(
            "!!! The slice encoder has RANDOM frozen weights (%s, sha256 %s...). Its features carry no "
            "pretrained semantics: use this only for ablations and tests. Set dino_model to the DINOv3 "
            "hub id, a local folder or Meta's .pth for the real method. !!!",
            source,
            provenance.sha256[:12],
        )
    else:
        logger.info("Slice encoder %s loaded (sha256 %s...)", source, provenance.sha256[:12])
    return LoadedEncoder(model=model, provenance=provenance, image_mean=mean, image_std=std)


def _random_dinov3(seed: int, overrides: dict[str, Any] | None) -> PreTrainedModel:
    config = DINOv3ViTConfig(**{**VITS16_CONFIG, **(overrides or {})})
    # Initialise from a private generator state so the weights depend on the seed alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DINOv3ViTModel(config)


def _looks_like_hub_id(name: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not name.endswith((".pth", ".pt"))


def _access_help(name: str) -> str:
    return (
        f"DINOv3 weights are gated. Either (1) accept the licence at https://huggingface.co/{name}, run "
        "`hf auth login` and load once with internet so the weights are cached; or (2) copy a folder "
        "written by `save_pretrained` (config.json + model.safetensors) and set dino_model to its path; "
        "or (3) set dino_model to Meta's original dinov3_vits16_pretrain_lvd1689m-*.pth file. For an "
        "ablation or a test without pretrained weights, set dino_model=random explicitly."
    )


def _from_hub(name: str, local_files_only: bool | None, cache_dir: str | None) -> PreTrainedModel:
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}
    try:
        return _from_pretrained(name, local_files_only=True, cache_dir=cache_dir)
    except EncoderWeightsError:
        if local_files_only or (local_files_only is None and offline):
            raise
    logger.info("%s is not in the local cache; trying the hub", name)
    return _from_pretrained(name, local_files_only=False, cache_dir=cache_dir)


def _from_pretrained(name: str, local_files_only: bool, cache_dir: str | None) -> PreTrainedModel:
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=local_files_only, cache_dir=cache_dir)
        if config.model_type not in {"dinov3_vit", "dinov2", "dinov2_with_registers"}:
            raise EncoderWeightsError(
                f"{name}: model_type {config.model_type!r} is not a DINOv3 or DINOv2 vision transformer."
            )
        return AutoModel.from_pretrained(name, local_files_only=local_files_only, cache_dir=cache_dir)
    except EncoderWeightsError:
        raise
    except (OSError, ValueError) as error:
        where = "in the local cache" if local_files_only else "on the hub or in the local cache"
        raise EncoderWeightsError(
            f"Could not load encoder weights {name!r} {where}: {error}\n{_access_help(name)}"
        ) from error


def _folder_image_stats(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Image mean/std from ``preprocessor_config.json`` when the folder has one, else ImageNet's."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return IMAGENET_MEAN, IMAGENET_STD
    try:
        processor = json.loads(path.read_text())
        return tuple(processor["image_mean"]), tuple(processor["image_std"])
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise EncoderWeightsError(f"{path}: cannot read image_mean/image_std ({error})") from error


def _meta_dinov3(path: Path, overrides: dict[str, Any] | None) -> PreTrainedModel:
    """Build a ``DINOv3ViTModel`` from Meta's original state dict (``facebookresearch/dinov3`` layout)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for unreadable or non-torch files
        raise EncoderWeightsError(f"{path}: cannot read as a torch state dict ({error})") from error
    if not isinstance(state, dict) or "cls_token" not in state or "patch_embed.proj.weight" not in state:
        raise EncoderWeightsError(
            f"{path}: not a DINOv3 state dict in Meta's layout (expected keys 'cls_token', "
            "'patch_embed.proj.weight', 'blocks.N.*')."
        )
    config = DINOv3ViTConfig(**{**_config_from_meta_state(state), **(overrides or {})})
    model = DINOv3ViTModel(config)
    try:
        model.load_state_dict(_meta_to_hf_state(state), strict=True)
    except RuntimeError as error:
        raise EncoderWeightsError(f"{path}: state dict does not fit a DINOv3 ViT ({error})") from error
    return model


def _config_from_meta_state(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    hidden = state["cls_token"].shape[-1]
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    gated = "blocks.0.mlp.w1.weight" in state
    intermediate = state["blocks.0.mlp.w1.weight" if gated else "blocks.0.mlp.fc1.weight"].shape[0]
    return {
        "hidden_size": hidden,
        "num_hidden_layers": len(blocks),
        # Meta's DINOv3 ViTs all use 64-wide heads; override num_attention_heads otherwise.
        "num_attention_heads": max(1, hidden // 64),
        "intermediate_size": intermediate,
        "patch_size": state["patch_embed.proj.weight"].shape[-1],
        "num_register_tokens": state["storage_tokens"].shape[1] if "storage_tokens" in state else 0,
        "use_gated_mlp": gated,
        "key_bias": False,  # Meta masks the key bias to zero ("bias_mask")
        "layerscale_value": 1.0,
    }


_META_RENAMES = [
    (r"^cls_token$", "embeddings.cls_token"),
    (r"^storage_tokens$", "embeddings.register_tokens"),
    (r"^mask_token$", "embeddings.mask_token"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embeddings."),
    (r"^blocks\.(\d+)\.norm(\d)\.", r"model.layer.\1.norm\2."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"model.layer.\1.attention.o_proj."),
    (r"^blocks\.(\d+)\.ls(\d)\.gamma$", r"model.layer.\1.layer_scale\2.lambda1"),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"model.layer.\1.mlp.up_proj."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"model.layer.\1.mlp.down_proj."),
    (r"^blocks\.(\d+)\.mlp\.w1\.", r"model.layer.\1.mlp.gate_proj."),
    (r"^blocks\.(\d+)\.mlp\.w2\.", r"model.layer.\1.mlp.up_proj."),
    (r"^blocks\.(\d+)\.mlp\.w3\.", r"model.layer.\1.mlp.down_proj."),
    (r"^norm\.", "norm."),
]
# Buffers the transformers model recomputes, and heads it does not have.
_META_IGNORED = re.compile(r"^(rope_embed\.|local_cls_norm\.|head\.)|\.bias_mask$")


def _meta_to_hf_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    converted: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    for key, value in state.items():
        if _META_IGNORED.search(key):
            continue
        qkv = re.match(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", key)
        if qkv:
            # (3*hidden, ...) -> q, k, v; the key bias is masked to zero in Meta's model, absent in HF's.
            prefix, kind = f"model.layer.{qkv.group(1)}.attention", qkv.group(2)
            q, k, v = value.chunk(3, dim=0)
            converted[f"{prefix}.q_proj.{kind}"] = q
            converted[f"{prefix}.v_proj.{kind}"] = v
            if kind == "weight":
                converted[f"{prefix}.k_proj.weight"] = k
            continue
        for pattern, replacement in _META_RENAMES:
            if re.search(pattern, key):
                converted[re.sub(pattern, replacement, key)] = value
                break
        else:
            unused.append(key)
    if "embeddings.mask_token" in converted:
        # Meta: (1, hidden); transformers: (1, 1, hidden)
        converted["embeddings.mask_token"] = converted["embeddings.mask_token"].reshape(1, 1, -1)
    if unused:
        logger.info("Ignored %d keys of the Meta state dict: %s", len(unused), unused[:5])
    return converted
