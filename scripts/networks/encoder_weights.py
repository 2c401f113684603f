"""Where the frozen slice encoder's weights come from, and a fingerprint of them.

``dino_model`` names the weights in one of five ways:

- a Hugging Face hub id, e.g. ``facebook/dinov3-vits16-pretrain-lvd1689m`` (gated: accept the licence
  and log in once) or ``facebook/dinov2-small`` for the ablation row;
- a local folder written by ``save_pretrained`` (``config.json`` + weights);
- Meta's original DINOv3 state dict, ``dinov3_vits16_pretrain_lvd1689m-*.pth``, mapped here to the
  ``transformers`` layout;
- ``random`` or ``random:SEED``: a randomly initialised, frozen DINOv3 ViT-S/16, reproducible from the seed.
  Only for explicit ablations and tests; it is logged as a warning every time.

Every loaded encoder carries an :class:`EncoderProvenance`: its source and a SHA-256 of its identity, i.e.
its weights *and* every configuration field that changes what it computes from them (number of attention
heads, RoPE theta, layer-norm epsilon, activation, ...; see :func:`architecture_of`). The network stores it in
its checkpoints and checks it when they are loaded, and the slice-embedding cache files entries under it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    DINOv3ViTConfig,
    DINOv3ViTModel,
    PreTrainedConfig,
    PreTrainedModel,
)

__all__ = [
    "DEFAULT_DINO_MODEL",
    "NOT_IDENTITY_FIELDS",
    "EncoderMismatchError",
    "EncoderProvenance",
    "EncoderWeightsError",
    "load_encoder",
    "looks_like_hub_id",
    "random_seed_of",
    "read_state_file",
]

logger = logging.getLogger(__name__)

DEFAULT_DINO_MODEL = "facebook/dinov3-vits16-pretrain-lvd1689m"
# ImageNet statistics: what both DINOv2 and DINOv3 (LVD-1689M) were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# DINOv3 ViT-S/16 as released by Meta (the fields that differ from transformers' defaults).
VITS16_CONFIG: dict[str, Any] = {"num_register_tokens": 4}

_RANDOM = re.compile(r"^random(?::(\d+))?$")

# Configuration fields that cannot change what a frozen encoder in eval mode computes from given weights. They
# are left out of its identity; every other field of its config is in it, including fields a later
# transformers release adds, so that the identity errs on the side of telling encoders apart.
NOT_IDENTITY_FIELDS = frozenset(
    {
        # read in training mode only; the encoder always runs in eval mode
        "attention_dropout",
        "attention_probs_dropout_prob",
        "hidden_dropout_prob",
        "drop_path_rate",
        "pos_embed_shift",
        "pos_embed_jitter",
        "pos_embed_rescale",
        # initialisation only; the initialised or loaded weights are hashed themselves
        "initializer_range",
        "layerscale_value",
        # read by the *Backbone classes only, never by the *Model the encoder runs
        "apply_layernorm",
        "reshape_hidden_states",
        "stage_names",
        "out_features",
        "out_indices",
    }
)


class EncoderWeightsError(OSError):
    """The encoder weights named by ``dino_model`` could not be found or read."""


class EncoderMismatchError(RuntimeError):
    """A checkpoint was trained with other encoder weights than the ones loaded now."""


@dataclass(frozen=True)
class EncoderProvenance:
    """Which encoder a network was built with: where its weights came from, and what it computes.

    Args:
        source: the ``dino_model`` string it was loaded from (``random:SEED`` for random weights).
        sha256: the encoder's identity, SHA-256 over ``architecture`` and ``weights_sha256``: two encoders
            share it when they hold the same weights and settings, i.e. compute the same function, wherever
            their weights were loaded from.
        weights_sha256: SHA-256 over the names, shapes, dtypes and bytes of every tensor of its state dict
            (``""`` where unknown).
        architecture: every configuration field that changes the encoder's output (:func:`architecture_of`).
    """

    source: str
    sha256: str
    weights_sha256: str = ""
    architecture: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @classmethod
    def of(cls, model: PreTrainedModel, source: str) -> EncoderProvenance:
        """The provenance of a loaded ``model``."""
        architecture = architecture_of(model.config)
        weights = weights_sha256(model)
        return cls(source, identity_sha256(architecture, weights), weights, architecture)

    @property
    def is_random(self) -> bool:
        return random_seed_of(self.source) is not None

    def record(self) -> dict[str, Any]:
        """What a checkpoint stores (plain types only, readable with ``torch.load(weights_only=True)``)."""
        return {
            "source": self.source,
            "sha256": self.sha256,
            "weights_sha256": self.weights_sha256,
            "architecture": dict(self.architecture),
        }

    def check_record(self, record: Mapping[str, Any]) -> None:
        """Refuse a checkpoint's :meth:`record` of another encoder than this one.

        Records written before the architecture was part of the identity hold ``sha256`` = the weights' hash
        alone; they are accepted when the weights match, with a warning that the rest cannot be checked.

        Raises:
            EncoderMismatchError: naming both sources and what differs (weights, architecture fields).
        """
        source, sha256 = record.get("source"), str(record.get("sha256"))
        if "weights_sha256" not in record:
            if sha256 == self.weights_sha256:
                logger.warning(
                    "The checkpoint predates encoder-architecture records: its encoder weights match "
                    "(%s, sha256 %s...), but settings such as attention heads or RoPE theta cannot be checked.",
                    source,
                    sha256[:12],
                )
                return
            differences = ["the encoder weights differ"]
        elif sha256 == self.sha256:
            return
        else:
            differences = []
            if record.get("weights_sha256") != self.weights_sha256:
                differences.append("the encoder weights differ")
            recorded = record.get("architecture") or {}
            fields = [
                f"{name}: checkpoint {recorded.get(name)!r}, now {self.architecture.get(name)!r}"
                for name in sorted(set(recorded) | set(self.architecture))
                if _canonical(recorded.get(name)) != _canonical(self.architecture.get(name))
            ]
            if fields:
                differences.append("encoder settings differ (" + "; ".join(fields) + ")")
        raise EncoderMismatchError(
            f"The checkpoint was trained with slice encoder {source!r} (sha256 {sha256[:12]}...), but this "
            f"network loaded {self.source!r} (sha256 {self.sha256[:12]}...): "
            f"{', and '.join(differences) or 'their identities differ'}. Its features would not match what "
            f"the fusion layers learned: set dino_model={source!r} (and dino_config, if any) to load it."
        )


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


def architecture_of(config: PreTrainedConfig) -> dict[str, Any]:
    """Every field of ``config`` that can change the encoder's output for given weights.

    That is the whole config minus :data:`NOT_IDENTITY_FIELDS`, minus bookkeeping every transformers config
    has (``_name_or_path``, ``architectures``, ``dtype``, output flags, labels, ...), plus ``model_type``.
    """
    bookkeeping = _generic_config_fields()
    fields = {
        name: value
        for name, value in config.to_dict().items()
        if name not in bookkeeping and name not in NOT_IDENTITY_FIELDS and not name.startswith("_")
    }
    return {**fields, "model_type": config.model_type}


def identity_sha256(architecture: Mapping[str, Any], weights_sha: str) -> str:
    """SHA-256 over an encoder's :func:`architecture_of` and :func:`weights_sha256`."""
    text = json.dumps(
        {"architecture": _canonical(dict(architecture)), "weights": weights_sha}, sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _canonical(value: Any) -> Any:
    """JSON-ready with tuples as lists, so a field reads the same from a config object and from a record."""
    return json.loads(json.dumps(value, sort_keys=True, default=repr))


@functools.cache
def _generic_config_fields() -> frozenset[str]:
    return frozenset(PreTrainedConfig().to_dict())


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
    seed = random_seed_of(dino_model)
    if seed is not None:
        model = _random_dinov3(seed, dino_config)
        source, mean, std = f"random:{seed}", IMAGENET_MEAN, IMAGENET_STD
    elif Path(dino_model).is_file():
        model = _meta_dinov3(Path(dino_model), dino_config)
        source, mean, std = dino_model, IMAGENET_MEAN, IMAGENET_STD
    elif Path(dino_model).is_dir():
        model = _from_pretrained(dino_model, local_files_only=True, cache_dir=None)
        mean, std = _folder_image_stats(Path(dino_model))
        source = dino_model
    elif looks_like_hub_id(dino_model):
        model = _from_hub(dino_model, local_files_only, cache_dir)
        source, mean, std = dino_model, IMAGENET_MEAN, IMAGENET_STD
    else:
        raise EncoderWeightsError(
            f"dino_model={dino_model!r} is not an existing file or folder, a hub id (owner/name), or "
            "'random[:SEED]'."
        )

    model.eval().requires_grad_(False)
    provenance = EncoderProvenance.of(model, source)
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


def random_seed_of(dino_model: str) -> int | None:
    """The seed of ``random`` (0) or ``random:SEED``; None for any other ``dino_model``."""
    match = _RANDOM.match(dino_model)
    return int(match.group(1) or 0) if match else None


def looks_like_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a Hugging Face hub id (``owner/name``, not a ``.pth`` / ``.pt`` file)."""
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


def read_state_file(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU: tensors and plain types only, never code.

    Raises:
        EncoderWeightsError: naming ``path``, when it cannot be read as such a file.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for unreadable or non-torch files
        raise EncoderWeightsError(f"{path}: cannot read as a torch state dict ({error})") from error


def _meta_dinov3(path: Path, overrides: dict[str, Any] | None) -> PreTrainedModel:
    """Build a ``DINOv3ViTModel`` from Meta's original state dict (``facebookresearch/dinov3`` layout).

    Every key must be one the layout has: a key this loader does not know (a renamed or foreign tensor) is
    refused rather than skipped, and so is a RoPE period buffer that the configured ``rope_theta`` and head
    width would not reproduce.
    """
    state = read_state_file(path)
    if not isinstance(state, dict) or "cls_token" not in state or "patch_embed.proj.weight" not in state:
        raise EncoderWeightsError(
            f"{path}: not a DINOv3 state dict in Meta's layout (expected keys 'cls_token', "
            "'patch_embed.proj.weight', 'blocks.N.*')."
        )
    converted, unknown = _meta_to_hf_state(state)
    if unknown:
        raise EncoderWeightsError(
            f"{path}: {len(unknown)} key(s) are not in Meta's DINOv3 ViT layout: {unknown[:8]} (expected "
            "'blocks.N.attn.qkv.weight', 'blocks.N.mlp.fc1.weight', 'norm.weight', ...)."
        )
    try:
        config = DINOv3ViTConfig(**{**_config_from_meta_state(state), **(overrides or {})})
    except KeyError as error:
        raise EncoderWeightsError(f"{path}: Meta's DINOv3 ViT layout has no key {error}.") from error
    _check_rope_periods(path, state.get("rope_embed.periods"), config)
    model = DINOv3ViTModel(config)
    try:
        model.load_state_dict(converted, strict=True)
    except RuntimeError as error:
        raise EncoderWeightsError(f"{path}: state dict does not fit a DINOv3 ViT ({error})") from error
    return model


def _config_from_meta_state(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    hidden = state["cls_token"].shape[-1]
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    gated = "blocks.0.mlp.w1.weight" in state
    intermediate = state["blocks.0.mlp.w1.weight" if gated else "blocks.0.mlp.fc1.weight"].shape[0]
    periods = state.get("rope_embed.periods")
    # RoPE keeps head_dim / 4 periods; without them assume Meta's 64-wide heads (override otherwise).
    head_dim = 4 * periods.numel() if periods is not None and periods.numel() else 64
    return {
        "hidden_size": hidden,
        "num_hidden_layers": len(blocks),
        "num_attention_heads": max(1, hidden // head_dim),
        "intermediate_size": intermediate,
        "patch_size": state["patch_embed.proj.weight"].shape[-1],
        "num_register_tokens": state["storage_tokens"].shape[1] if "storage_tokens" in state else 0,
        "use_gated_mlp": gated,
        "key_bias": False,  # Meta masks the key bias to zero ("bias_mask")
        "layerscale_value": 1.0,
    }


def _check_rope_periods(path: Path, periods: torch.Tensor | None, config: DINOv3ViTConfig) -> None:
    """Meta stores RoPE as periods ``theta ** (4 i / head_dim)``; transformers recomputes them from the config."""
    if periods is None:
        return
    head_dim = config.hidden_size // config.num_attention_heads
    exponents = torch.arange(head_dim // 4, dtype=torch.float64) * 4 / head_dim
    expected = config.rope_theta**exponents
    if periods.shape != expected.shape or not torch.allclose(periods.double(), expected, rtol=1e-4):
        count = periods.numel()  # the checkpoint's heads are 4 * count wide: periods[-1] = theta ** ((n-1)/n)
        implied = periods.double()[-1].item() ** (count / (count - 1)) if count > 1 else math.nan
        raise EncoderWeightsError(
            f"{path}: rope_embed.periods ({periods.numel()} values) are not those of rope_theta="
            f"{config.rope_theta} with {config.num_attention_heads} attention heads of width {head_dim} "
            f"(they imply rope_theta ~ {implied:.6g} for {4 * periods.numel()}-wide heads): set dino_config's "
            "rope_theta / num_attention_heads to the checkpoint's."
        )


# Meta's name -> transformers' name, whole names only, so that a misspelt key is reported, never renamed.
_META_RENAMES = [
    (r"^cls_token$", "embeddings.cls_token"),
    (r"^storage_tokens$", "embeddings.register_tokens"),
    (r"^mask_token$", "embeddings.mask_token"),
    (r"^patch_embed\.proj\.(weight|bias)$", r"embeddings.patch_embeddings.\1"),
    (r"^blocks\.(\d+)\.norm([12])\.(weight|bias)$", r"model.layer.\1.norm\2.\3"),
    (r"^blocks\.(\d+)\.attn\.proj\.(weight|bias)$", r"model.layer.\1.attention.o_proj.\2"),
    (r"^blocks\.(\d+)\.ls([12])\.gamma$", r"model.layer.\1.layer_scale\2.lambda1"),
    (r"^blocks\.(\d+)\.mlp\.fc1\.(weight|bias)$", r"model.layer.\1.mlp.up_proj.\2"),
    (r"^blocks\.(\d+)\.mlp\.fc2\.(weight|bias)$", r"model.layer.\1.mlp.down_proj.\2"),
    (r"^blocks\.(\d+)\.mlp\.w1\.(weight|bias)$", r"model.layer.\1.mlp.gate_proj.\2"),
    (r"^blocks\.(\d+)\.mlp\.w2\.(weight|bias)$", r"model.layer.\1.mlp.up_proj.\2"),
    (r"^blocks\.(\d+)\.mlp\.w3\.(weight|bias)$", r"model.layer.\1.mlp.down_proj.\2"),
    (r"^norm\.(weight|bias)$", r"norm.\1"),
]
# Buffers the transformers model recomputes (the RoPE periods are checked against the config instead), the
# key-bias mask, a norm used in training only, and heads it does not have.
_META_IGNORED = re.compile(
    r"^(rope_embed\.periods|local_cls_norm\.(weight|bias)|head\..*)$|\.attn\.qkv\.bias_mask$"
)


def _meta_to_hf_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Meta's keys renamed to transformers' (qkv split), and the keys that are in neither layout."""
    converted: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
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
            unknown.append(key)
    if "embeddings.mask_token" in converted:
        # Meta: (1, hidden); transformers: (1, 1, hidden)
        converted["embeddings.mask_token"] = converted["embeddings.mask_token"].reshape(1, 1, -1)
    return converted, unknown
