"""The slice-embedding cache: identical results, no stale entries, warm restarts, real reuse."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY_DINOV3, TINY_IMAGE_SIZE
from monai.inferers import sliding_window_inference
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from scripts.data.crops import CacheAlignedRandCropByLabelClassesd, aligned_starts
from scripts.embedding_cache import SliceEmbeddingCache
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


def cached_twin(net: Dino3DRA, cache: SliceEmbeddingCache, **kwargs) -> Dino3DRA:
    """``net`` built again with ``cache``, given ``net``'s weights: the cache is not in the state dict."""
    twin = tiny_net(embedding_cache=cache, **kwargs)
    twin.load_state_dict(net.state_dict(), strict=True)
    assert twin.state_dict().keys() == net.state_dict().keys()
    return twin


def test_cached_and_uncached_logits_are_equal():
    net, cache = tiny_net(), SliceEmbeddingCache()
    cached = cached_twin(net, cache)
    x = torch.rand(2, 1, *ROI)
    with torch.no_grad():
        plain = net(x)
        cold, warm = cached(x), cached(x)
    torch.testing.assert_close(cold, plain, rtol=0, atol=0)
    torch.testing.assert_close(warm, plain, rtol=0, atol=0)
    assert cache.stats["misses"] == 2 * ROI[2]
    assert cache.stats["memory_hits"] == 2 * ROI[2]


def copy_folder(source, target, config=None, processor=None):
    """A copy of a saved encoder folder, with ``config.json`` fields changed and/or a preprocessor config."""
    shutil.copytree(source, target)
    if config:
        path = target / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if processor:
        (target / "preprocessor_config.json").write_text(json.dumps(processor))
    return target


def other_weights(folder, target):
    torch.manual_seed(1)
    DINOv3ViTModel(DINOv3ViTConfig(**json.loads((folder / "config.json").read_text()))).save_pretrained(
        target
    )
    return target


# Each changes exactly one input of an embedding besides the slice content: (folder, tmp_path) -> encoder
NAMESPACE_INPUTS = {
    "weights": lambda folder, tmp: SliceEncoder(
        str(other_weights(folder, tmp / "w")), image_size=TINY_IMAGE_SIZE
    ),
    "architecture": lambda folder, tmp: SliceEncoder(
        str(copy_folder(folder, tmp / "a", config={"rope_theta": 1000.0})), image_size=TINY_IMAGE_SIZE
    ),
    "image_size": lambda folder, tmp: SliceEncoder(str(folder), image_size=2 * TINY_IMAGE_SIZE),
    "image_statistics": lambda folder, tmp: SliceEncoder(
        str(copy_folder(folder, tmp / "s", processor={"image_mean": [0.5] * 3, "image_std": [0.25] * 3})),
        image_size=TINY_IMAGE_SIZE,
    ),
    "dtype": lambda folder, tmp: SliceEncoder(str(folder), image_size=TINY_IMAGE_SIZE, dtype="bfloat16"),
}


@pytest.mark.parametrize("changed", [*NAMESPACE_INPUTS, "preprocessing_version"])
def test_every_encoder_setting_changes_the_namespace_and_misses_the_cache(
    changed, tiny_dinov3_dir, tmp_path, monkeypatch
):
    reference = SliceEncoder(str(tiny_dinov3_dir), image_size=TINY_IMAGE_SIZE)
    assert reference.cache_namespace  # computed (and kept) before anything changes
    if changed == "preprocessing_version":
        monkeypatch.setattr("scripts.networks.slice_encoder.PREPROCESSING_VERSION", 2)
        other = SliceEncoder(str(tiny_dinov3_dir), image_size=TINY_IMAGE_SIZE)
    else:
        other = NAMESPACE_INPUTS[changed](tiny_dinov3_dir, tmp_path)
    assert other.cache_namespace != reference.cache_namespace

    cache, slices = SliceEmbeddingCache(), torch.rand(4, 16, 16)
    cache.encode(slices, reference.encode_slices, reference.cache_namespace)
    cache.reset_stats()
    result = cache.encode(slices, other.encode_slices, other.cache_namespace)
    assert cache.stats["misses"] == 4 and cache.hit_rate == 0
    torch.testing.assert_close(result, other.encode_slices(slices), rtol=0, atol=0)


def test_the_same_encoder_from_another_folder_shares_the_namespace(tiny_dinov3_dir, tmp_path):
    """Where the weights lie is no input: a copied folder (or Meta's .pth of the same model) starts warm."""
    reference = SliceEncoder(str(tiny_dinov3_dir), image_size=TINY_IMAGE_SIZE)
    copy = SliceEncoder(str(copy_folder(tiny_dinov3_dir, tmp_path / "copy")), image_size=TINY_IMAGE_SIZE)
    assert copy.cache_namespace == reference.cache_namespace


def test_entries_are_keyed_by_exact_pixels_and_shape():
    encoder, cache = tiny_encoder(), SliceEmbeddingCache()
    counter = CountingEncoder(encoder)
    slice_ = torch.rand(16, 16)

    def misses(variant: torch.Tensor) -> int:
        before = counter.slices
        cache.encode(variant[None], counter, encoder.cache_namespace)
        return counter.slices - before

    assert misses(slice_) == 1
    assert misses(slice_.clone()) == 0  # same content in another tensor
    assert misses(slice_.double()) == 0  # the encoder sees float32 values: same content
    one_pixel = slice_.clone()
    one_pixel[3, 5] = torch.nextafter(one_pixel[3, 5], torch.tensor(2.0))
    assert misses(one_pixel) == 1  # one pixel, one ulp
    assert misses(slice_.reshape(8, 32)) == 1  # same bytes, other shape
    assert misses(slice_.T) == 1  # same values, other layout


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


def test_memory_bound_evicts_the_least_recently_used_and_a_lookup_refreshes():
    encoder = tiny_encoder()
    counter = CountingEncoder(encoder)
    entry_gib = TINY_DINOV3["hidden_size"] * 4 / 2**30
    cache = SliceEmbeddingCache(max_memory_gib=3.5 * entry_gib)  # room for 3 entries
    a, b, c, d = torch.rand(4, 1, 16, 16)

    def encoded(slice_: torch.Tensor) -> int:
        before = counter.slices
        cache.encode(slice_, counter, encoder.cache_namespace)
        return counter.slices - before

    assert [encoded(s) for s in (a, b, c)] == [1, 1, 1]
    assert encoded(a) == 0  # a hit, which makes a the most recently used
    assert encoded(d) == 1 and len(cache) == 3  # evicts b, the least recently used
    assert [encoded(s) for s in (a, c, d)] == [0, 0, 0]
    assert encoded(b) == 1


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
    volume = torch.rand(1, 1, 32, 32, 96)
    with torch.no_grad():
        cached = sliding_window_inference(volume, ROI, 1, cached_twin(net, cache), overlap=0.5)
    # 5 windows along the slice axis hold 32 slices each, but only 96 distinct slices exist.
    assert cache.stats["misses"] == 96 and cache.stats["memory_hits"] == 5 * 32 - 96
    with torch.no_grad():
        uncached = sliding_window_inference(volume, ROI, 1, net, overlap=0.5)
    torch.testing.assert_close(cached, uncached, rtol=0, atol=0)


def test_aligned_starts():
    np.testing.assert_array_equal(aligned_starts(96, 64, 32), [0, 32])
    np.testing.assert_array_equal(aligned_starts(112, 64, 32), [0, 32, 48])
    with pytest.raises(ValueError, match="pad"):
        aligned_starts(48, 64, 32)


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_training_crops_are_aligned_balanced_and_hit_the_cache(slice_axis):
    shape = (96, 96, 80)
    label = np.zeros((1, *shape), dtype=np.uint8)
    label[0, 10:80, 40:44, :] = 1  # a vessel
    label[0, 70:76, 60:66, 30:36] = 2  # an aneurysm
    data = {"image": torch.rand(1, *shape), "label": torch.from_numpy(label)}
    crop = CacheAlignedRandCropByLabelClassesd(
        ["image", "label"], "label", (64, 64, 64), ratios=(0, 0, 1), num_samples=24, grid=32,
        slice_axis=slice_axis,
    )  # fmt: skip
    crop.set_random_state(0)
    samples = crop(data)
    assert all(s["image"].shape == (1, 64, 64, 64) for s in samples)
    assert all((s["label"] == 2).any() for s in samples)  # every crop holds the aneurysm
    in_plane = [a for a in range(3) if a != slice_axis]
    windows = {tuple(s["image"].meta["affine"][in_plane, 3].tolist()) for s in samples}
    allowed = [set(aligned_starts(shape[a], 64, 32).tolist()) for a in in_plane]
    assert all(w[0] in allowed[0] and w[1] in allowed[1] for w in windows)  # {0, 32} or {0, 16} per axis

    cache = SliceEmbeddingCache()
    encoder = SliceEncoder(
        "random", image_size=TINY_IMAGE_SIZE, slice_axis=slice_axis, dino_config=TINY_DINOV3, cache=cache
    )
    for sample in samples:
        encoder(sample["image"][None])
    # 24 crops x 64 slices, but at most 4 windows x (length of the slice axis) distinct slices
    distinct = len(windows) * shape[slice_axis]
    assert len(windows) <= 4 and cache.stats["misses"] <= distinct
    assert cache.hit_rate >= 1 - distinct / (24 * 64)
