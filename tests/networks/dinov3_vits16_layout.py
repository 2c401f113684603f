"""The key layout of Meta's DINOv3 ViT-S/16 checkpoint, ``dinov3_vits16_pretrain_lvd1689m-08c60483.pth``.

Written from the published model definition, not from this project's loader: github.com/facebookresearch/dinov3
at commit 6876159a11b4df116f30f667f8c9888617df0751.

- ``dinov3/hub/backbones.py``, ``dinov3_vits16``: ``embed_dim=384, depth=12, num_heads=6, ffn_ratio=4,
  patch_size=16, in_chans=3, n_storage_tokens=4, qkv_bias=True, proj_bias=True, ffn_bias=True,
  ffn_layer="mlp", layerscale_init=1e-5, mask_k_bias=True, norm_layer="layernormbf16",
  pos_embed_rope_base=100, pos_embed_rope_dtype="fp32"``.
- ``dinov3/models/vision_transformer.py``, ``DinoVisionTransformer``: parameters ``cls_token (1, 1, D)``,
  ``storage_tokens (1, n_storage_tokens, D)``, ``mask_token (1, D)``; then the modules ``patch_embed``,
  ``rope_embed``, ``blocks``, ``norm``, ``head`` (an ``nn.Identity``; ``cls_norm`` and ``local_cls_norm`` are
  ``None`` for ViT-S).
- ``dinov3/layers``: ``PatchEmbed.proj`` (a ``Conv2d(3, D, 16, 16)``); ``RopePositionEmbedding.periods`` (a
  persistent buffer of ``head_dim // 4`` values ``base ** (2 i / (head_dim // 2))``); ``SelfAttentionBlock``
  = ``norm1, attn, ls1, norm2, mlp, ls2``; ``SelfAttention`` = ``qkv`` (``LinearKMaskedBias`` when
  ``mask_k_bias``: a persistent ``bias_mask`` buffer, 1 on the query and value thirds, 0 on the key third) and
  ``proj``; ``LayerScale.gamma``; ``Mlp`` = ``fc1, fc2``.

The names are in state-dict order: a module's own parameters and buffers before its children's.
"""

from __future__ import annotations

import torch

HIDDEN, DEPTH, HEAD_DIM, ROPE_BASE = 384, 12, 64, 100.0  # embed_dim, depth, embed_dim // num_heads, rope base

_TOP: list[tuple[str, tuple[int, ...]]] = [
    ("cls_token", (1, 1, 384)),
    ("storage_tokens", (1, 4, 384)),
    ("mask_token", (1, 384)),
    ("patch_embed.proj.weight", (384, 3, 16, 16)),
    ("patch_embed.proj.bias", (384,)),
    ("rope_embed.periods", (16,)),
]
_BLOCK: list[tuple[str, tuple[int, ...]]] = [
    ("norm1.weight", (384,)),
    ("norm1.bias", (384,)),
    ("attn.qkv.weight", (1152, 384)),
    ("attn.qkv.bias", (1152,)),
    ("attn.qkv.bias_mask", (1152,)),
    ("attn.proj.weight", (384, 384)),
    ("attn.proj.bias", (384,)),
    ("ls1.gamma", (384,)),
    ("norm2.weight", (384,)),
    ("norm2.bias", (384,)),
    ("mlp.fc1.weight", (1536, 384)),
    ("mlp.fc1.bias", (1536,)),
    ("mlp.fc2.weight", (384, 1536)),
    ("mlp.fc2.bias", (384,)),
    ("ls2.gamma", (384,)),
]
_TAIL: list[tuple[str, tuple[int, ...]]] = [
    ("norm.weight", (384,)),
    ("norm.bias", (384,)),
]

VITS16_KEYS: list[tuple[str, tuple[int, ...]]] = [
    *_TOP,
    *[(f"blocks.{i}.{name}", shape) for i in range(DEPTH) for name, shape in _BLOCK],
    *_TAIL,
]


def published_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict of the published layout: small random weights, the two buffers as Meta writes them."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in VITS16_KEYS:
        if name == "rope_embed.periods":
            # RopePositionEmbedding._init_weights: base ** (2 * arange(D_head // 4) / (D_head // 2)), fp32
            state[name] = ROPE_BASE ** (
                2 * torch.arange(HEAD_DIM // 4, dtype=torch.float32) / (HEAD_DIM // 2)
            )
        elif name.endswith("bias_mask"):
            # init_weights_vit: bias_mask.fill_(1); bias_mask[o // 3 : 2 * o // 3].fill_(0)
            state[name] = torch.cat([torch.ones(HIDDEN), torch.zeros(HIDDEN), torch.ones(HIDDEN)])
        else:
            state[name] = 0.02 * torch.randn(shape, generator=generator)
    return state
