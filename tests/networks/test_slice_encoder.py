"""The slice encoder: which encoder it is (cache namespace, checkpoint check), and which slices it embeds."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import TINY_DINOV3, TINY_IMAGE_SIZE

from scripts.embedding_cache import SliceEmbeddingCache
from scripts.networks import EncoderMismatchError, SliceEncoder
from scripts.networks.encoder_weights import NOT_IDENTITY_FIELDS


def tiny_encoder(dino_model: str = "random", slice_axis: int = 2, cache=None, **config) -> SliceEncoder:
    return SliceEncoder(
        dino_model,
        image_size=TINY_IMAGE_SIZE,
        slice_axis=slice_axis,
        dino_config={**TINY_DINOV3, **config},
        cache=cache,
    )


# Settings that change what the encoder computes but not its weights: same seed, same tensors, other output.
OUTPUT_CHANGING = [
    {"num_attention_heads": 2},
    {"rope_theta": 1000.0},
    {"layer_norm_eps": 0.5},
    {"hidden_act": "silu"},
]


@pytest.mark.parametrize("change", OUTPUT_CHANGING, ids=lambda c: next(iter(c)))
def test_encoders_differing_in_one_setting_are_told_apart(change):
    reference, other = tiny_encoder(), tiny_encoder(**change)
    slices = torch.rand(2, 16, 16)
    # the same weights, another output
    assert other.provenance.weights_sha256 == reference.provenance.weights_sha256
    assert not torch.allclose(other.encode_slices(slices), reference.encode_slices(slices))

    assert other.provenance.sha256 != reference.provenance.sha256
    assert other.cache_namespace != reference.cache_namespace
    (field,) = change
    with pytest.raises(EncoderMismatchError, match=rf"'random:0'.*'random:0'.*{field}: checkpoint"):
        other.load_state_dict(reference.state_dict())
    with pytest.raises(EncoderMismatchError, match=field):
        reference.load_state_dict(other.state_dict())


@pytest.mark.parametrize(
    "change",
    [{"drop_path_rate": 0.2}, {"attention_dropout": 0.2}, {"pos_embed_rescale": None}],
    ids=lambda c: next(iter(c)),
)
def test_training_only_settings_keep_the_identity(change):
    """The encoder runs in eval mode: settings read only in training must not split caches or refuse checkpoints."""
    assert set(change) <= NOT_IDENTITY_FIELDS
    reference, other = tiny_encoder(), tiny_encoder(**change)
    slices = torch.rand(2, 16, 16)
    torch.testing.assert_close(other.encode_slices(slices), reference.encode_slices(slices), rtol=0, atol=0)
    assert other.cache_namespace == reference.cache_namespace
    other.load_state_dict(reference.state_dict())


def test_a_setting_this_project_does_not_know_is_part_of_the_identity():
    """Identity is the whole config minus known-irrelevant fields, so a field added later is never left out."""
    assert tiny_encoder(future_field=1).provenance.sha256 != tiny_encoder().provenance.sha256


def test_other_weights_are_refused_naming_both_sources():
    reference, other = tiny_encoder("random:0"), tiny_encoder("random:1")
    with pytest.raises(
        EncoderMismatchError, match=r"'random:0'.*'random:1'.*weights differ.*dino_model='random:0'"
    ):
        other.load_state_dict(reference.state_dict())


def test_checkpoint_from_before_architecture_records_is_checked_by_its_weights(caplog):
    """Checkpoints written when the identity was the weights' hash alone still load, and only with those weights."""
    reference = tiny_encoder()
    legacy = {"source": "random:0", "sha256": reference.provenance.weights_sha256}
    with caplog.at_level(logging.WARNING):
        reference.load_state_dict({"_extra_state": legacy})
    assert "cannot be checked" in caplog.text
    other_weights = {"source": "random:1", "sha256": tiny_encoder("random:1").provenance.weights_sha256}
    with pytest.raises(EncoderMismatchError, match=r"'random:1'.*weights differ"):
        reference.load_state_dict({"_extra_state": other_weights})


def test_checkpoint_record_survives_a_safe_torch_load(tmp_path):
    encoder = tiny_encoder(rope_theta=1000.0)
    torch.save(encoder.state_dict(), tmp_path / "model.pt")
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert state["_extra_state"]["architecture"]["rope_theta"] == 1000.0
    encoder.load_state_dict(state)


# -- which slices are embedded ----------------------------------------------------------------------------

SHAPE = (5, 7, 9)  # non-cubic: every axis has its own length


def take(x: torch.Tensor, axis: int, index: int) -> torch.Tensor:
    """Slice ``index`` across spatial ``axis`` of a (B, 1, D, H, W) volume: (B, h, w), in-plane order kept."""
    return x[:, 0].select(1 + axis, index)


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_each_embedding_is_that_of_its_slice(slice_axis):
    encoder = tiny_encoder(slice_axis=slice_axis)
    x = torch.rand(2, 1, *SHAPE)
    embeddings = encoder(x)
    n = SHAPE[slice_axis]
    assert embeddings.shape == (2, n, TINY_DINOV3["hidden_size"])
    for index in range(n):
        torch.testing.assert_close(embeddings[:, index], encoder.encode_slices(take(x, slice_axis, index)))


@pytest.mark.parametrize("slice_axis, order", [(0, (0, 1, 3, 4, 2)), (1, (0, 1, 2, 4, 3))])
def test_other_slice_axes_equal_axial_slices_of_the_permuted_patch(slice_axis, order):
    """Slicing across axis 0 (or 1) is slicing across axis 2 of the patch turned so that axis becomes last."""
    x = torch.rand(2, 1, *SHAPE)
    across = tiny_encoder(slice_axis=slice_axis)(x)
    axial = tiny_encoder(slice_axis=2)(x.permute(order))
    torch.testing.assert_close(across, axial)


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_a_distinctive_slice_lands_at_its_index(slice_axis):
    encoder = tiny_encoder(slice_axis=slice_axis)
    x = torch.full((2, 1, *SHAPE), 0.2)
    marked = {0: 1, 1: SHAPE[slice_axis] - 2}  # batch item -> index of its one bright, striped slice
    for item, index in marked.items():
        plane = take(x, slice_axis, index)[item]
        plane[::2] = 1.0
    embeddings = encoder(x)
    plain = encoder.encode_slices(torch.full((1, *take(x, slice_axis, 0).shape[1:]), 0.2))[0]
    for item, index in marked.items():
        torch.testing.assert_close(
            embeddings[item, index], encoder.encode_slices(take(x, slice_axis, index)[item : item + 1])[0]
        )
        assert not torch.allclose(embeddings[item, index], plain, atol=1e-3)
        others = [i for i in range(SHAPE[slice_axis]) if i != index]
        torch.testing.assert_close(embeddings[item, others], plain.expand(len(others), -1))


@pytest.mark.parametrize("slice_axis", [0, 1])
def test_cached_embeddings_across_other_axes_equal_uncached(slice_axis):
    cache = SliceEmbeddingCache()
    encoder, cached = tiny_encoder(slice_axis=slice_axis), tiny_encoder(slice_axis=slice_axis, cache=cache)
    x = torch.rand(2, 1, *SHAPE)
    plain = encoder(x)
    cold, warm = cached(x), cached(x)
    torch.testing.assert_close(cold, plain, rtol=0, atol=0)
    torch.testing.assert_close(warm, plain, rtol=0, atol=0)
    assert cache.stats["misses"] == 2 * SHAPE[slice_axis] == cache.stats["memory_hits"]
    assert cached.state_dict().keys() == encoder.state_dict().keys()  # the cache holds no weights
