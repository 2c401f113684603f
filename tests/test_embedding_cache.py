"""The slice-embedding cache: identical results, no stale entries, warm restarts, real reuse."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import TINY_DINOV3, TINY_IMAGE_SIZE
from monai.inferers import sliding_window_inference

from scripts.data.crops import CacheAlignedRandCropByLabelClassesd, aligned_starts
from scripts.embedding_cache import SliceEmbeddingCache, attach_embedding_cache
from scripts.networks import Dino3DRA, SliceEncoder

ROI = (32, 32, 32)


def tiny_net(dino_model: str = "random", **kwargs) -> Dino3DRA:
    return Dino3DRA(
        dino_model=dino_model,
        dino_config=TINY_DINOV3,
        dino_image_size=TINY_IMAGE_SIZE,
        roi_size=ROI,
        **kwargs,
    ).eval()


def tiny_encoder(dino_model: str = "random", image_size: int = TINY_IMAGE_SIZE) -> SliceEncoder:
    return SliceEncoder(dino_model, image_size=image_size, dino_config=TINY_DINOV3)


class CountingEncoder:
    """Wraps ``encode_slices`` to count the slices that really reach the encoder."""

    def __init__(self, encoder: SliceEncoder) -> None:
        self.encoder, self.slices = encoder, 0

    def __call__(self, slices: torch.Tensor) -> torch.Tensor:
        self.slices += len(slices)
        return self.encoder.encode_slices(slices)


def test_cached_and_uncached_logits_are_equal():
    net = tiny_net()
    x = torch.rand(2, 1, *ROI)
    with torch.no_grad():
        plain = net(x)
        attach_embedding_cache(net, SliceEmbeddingCache())
        cold, warm = net(x), net(x)
    cache = net.slice_encoder.cache
    torch.testing.assert_close(cold, plain, rtol=0, atol=0)
    torch.testing.assert_close(warm, plain, rtol=0, atol=0)
    assert cache.stats["misses"] == 2 * ROI[2]
    assert cache.stats["memory_hits"] == 2 * ROI[2]


@pytest.mark.parametrize(
    "other",
    [lambda: tiny_encoder("random:1"), lambda: tiny_encoder(image_size=2 * TINY_IMAGE_SIZE)],
    ids=["encoder_weights", "image_size"],
)
def test_other_encoder_settings_miss_the_cache(other):
    cache = SliceEmbeddingCache()
    first, second = tiny_encoder(), other()
    slices = torch.rand(4, 16, 16)
    reference = cache.encode(slices, first.encode_slices, first.cache_namespace)
    cache.reset_stats()
    result = cache.encode(slices, second.encode_slices, second.cache_namespace)
    assert cache.stats["misses"] == 4 and cache.hit_rate == 0
    torch.testing.assert_close(result, second.encode_slices(slices))
    assert not torch.allclose(result, reference)


def test_crop_and_intensity_changes_miss_the_cache():
    encoder, cache = tiny_encoder(), SliceEmbeddingCache()
    volume = torch.rand(20, 20, 4)
    cache.encode(volume[:16, :16].movedim(2, 0), encoder.encode_slices, encoder.cache_namespace)
    cache.reset_stats()
    cache.encode(
        volume[1:17, :16].movedim(2, 0), encoder.encode_slices, encoder.cache_namespace
    )  # shifted crop
    cache.encode(
        volume[:16, :16].movedim(2, 0) * 0.9, encoder.encode_slices, encoder.cache_namespace
    )  # rescaled
    assert cache.stats["misses"] == 8 and cache.hit_rate == 0


def test_repeated_content_is_encoded_once():
    encoder, cache = tiny_encoder(), SliceEmbeddingCache()
    counter = CountingEncoder(encoder)
    slice_ = torch.rand(1, 16, 16)
    out = cache.encode(slice_.expand(5, -1, -1), counter, encoder.cache_namespace)
    assert counter.slices == 1 and out.shape == (5, TINY_DINOV3["hidden_size"])


def test_memory_bound_evicts_least_recently_used():
    encoder = tiny_encoder()
    entry_gib = TINY_DINOV3["hidden_size"] * 4 / 2**30
    cache = SliceEmbeddingCache(max_memory_gib=3.5 * entry_gib)
    cache.encode(torch.rand(6, 16, 16), encoder.encode_slices, encoder.cache_namespace)
    assert len(cache) == 3


def test_disk_cache_survives_a_restart_and_ignores_corrupted_entries(tmp_path, caplog):
    encoder = tiny_encoder()
    slices = torch.rand(3, 16, 16)
    first = SliceEmbeddingCache(cache_dir=tmp_path)
    expected = first.encode(slices, encoder.encode_slices, encoder.cache_namespace)
    files = sorted(tmp_path.rglob("*.npy"))
    assert len(files) == 3 and not list(tmp_path.rglob("*.tmp*"))

    restarted = SliceEmbeddingCache(cache_dir=tmp_path)
    counter = CountingEncoder(encoder)
    torch.testing.assert_close(
        restarted.encode(slices, counter, encoder.cache_namespace), expected, rtol=0, atol=0
    )
    assert counter.slices == 0 and restarted.stats["disk_hits"] == 3

    files[0].write_bytes(b"garbage")
    again = SliceEmbeddingCache(cache_dir=tmp_path)
    with caplog.at_level(logging.WARNING):
        result = again.encode(slices, counter, encoder.cache_namespace)
    assert "corrupted" in caplog.text and str(files[0]) in caplog.text
    assert counter.slices == 1
    torch.testing.assert_close(result, expected)  # recomputed alone: equal to float tolerance
    assert np.load(files[0]).shape == (TINY_DINOV3["hidden_size"],)  # rewritten


def test_sliding_window_inference_reuses_slices_across_overlapping_windows():
    net, cache = tiny_net(), SliceEmbeddingCache()
    attach_embedding_cache(net, cache)
    volume = torch.rand(1, 1, 32, 32, 96)
    with torch.no_grad():
        cached = sliding_window_inference(volume, ROI, 1, net, overlap=0.5)
    # 5 windows along the slice axis hold 32 slices each, but only 96 distinct slices exist.
    assert cache.stats["misses"] == 96 and cache.stats["memory_hits"] == 5 * 32 - 96
    with torch.no_grad():
        attach_embedding_cache(net, None)
        uncached = sliding_window_inference(volume, ROI, 1, net, overlap=0.5)
    torch.testing.assert_close(cached, uncached, rtol=0, atol=0)


def test_aligned_starts():
    np.testing.assert_array_equal(aligned_starts(96, 64, 32), [0, 32])
    np.testing.assert_array_equal(aligned_starts(112, 64, 32), [0, 32, 48])
    with pytest.raises(ValueError, match="pad"):
        aligned_starts(48, 64, 32)


def test_training_crops_are_aligned_balanced_and_hit_the_cache():
    label = np.zeros((1, 96, 96, 80), dtype=np.uint8)
    label[0, 10:80, 40:44, :] = 1  # a vessel
    label[0, 70:76, 60:66, 30:36] = 2  # an aneurysm
    data = {"image": torch.rand(1, 96, 96, 80), "label": torch.from_numpy(label)}
    crop = CacheAlignedRandCropByLabelClassesd(
        ["image", "label"], "label", (64, 64, 64), ratios=(0, 0, 1), num_samples=40, grid=32
    )
    crop.set_random_state(0)
    samples = crop(data)
    assert all(s["image"].shape == (1, 64, 64, 64) for s in samples)
    assert all((s["label"] == 2).any() for s in samples)  # every crop holds the aneurysm
    windows = {tuple(s["image"].meta["affine"][:2, 3].tolist()) for s in samples}
    assert len(windows) <= 4  # in-plane starts in {0, 32} x {0, 32}

    encoder, cache = tiny_encoder(), SliceEmbeddingCache()
    for sample in samples:
        cache.encode(sample["image"][0].movedim(2, 0), encoder.encode_slices, encoder.cache_namespace)
    # 40 crops x 64 slices, but at most 4 windows x 80 slices distinct
    assert cache.stats["misses"] <= 4 * 80
    assert cache.hit_rate >= 1 - 4 * 80 / (40 * 64)
