"""A content-addressed cache of frozen-encoder slice embeddings, in memory and optionally on disk.

The slice encoder is frozen, so the embedding of a slice is a pure function of (a) the slice's pixels
and (b) everything else the encoder does to them: its weights and the settings that change its output
(attention heads, RoPE theta, ...), input size, image statistics, dtype and preprocessing version. The key of
an entry is a hash of exactly these: ``namespace`` (b, from :attr:`SliceEncoder.cache_namespace`) and the
slice's float32 values and shape (a). A change of weights, encoder settings, image size, slice axis, crop,
resampling or intensity scaling changes one of them, so a stale entry can never be returned; identical slice
content is encoded once, whichever patch, window or epoch it comes from.

A network is given its cache when it is built (``Dino3DRA(..., embedding_cache=SliceEmbeddingCache(...))``,
as the configs' ``network_def`` does), and so is the handler that reports its hit rate
(:class:`scripts.handlers.EmbeddingCacheStats`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from scripts.atomic_io import replace_atomically

__all__ = ["SliceEmbeddingCache"]

logger = logging.getLogger(__name__)


class SliceEmbeddingCache:
    """LRU memory cache of slice embeddings with an optional on-disk store behind it.

    Args:
        max_memory_gib: memory bound of the in-memory entries; least recently used entries go first.
            Default 2.
        cache_dir: folder for the on-disk store (one ``.npy`` per entry, written atomically), so that a
            second run starts warm. Default None: memory only.
    """

    def __init__(self, max_memory_gib: float = 2.0, cache_dir: str | os.PathLike | None = None) -> None:
        if max_memory_gib <= 0:
            raise ValueError(f"max_memory_gib must be positive, got {max_memory_gib}.")
        self.max_bytes = int(max_memory_gib * 2**30)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.stats = {"memory_hits": 0, "disk_hits": 0, "misses": 0}

    def __len__(self) -> int:
        return len(self._memory)

    def __repr__(self) -> str:
        return f"SliceEmbeddingCache(memory bound {self.max_bytes / 2**30:.1f} GiB, disk {self.cache_dir})"

    @property
    def hit_rate(self) -> float:
        """Share of slice lookups answered without running the encoder, since the last reset."""
        total = sum(self.stats.values())
        return (self.stats["memory_hits"] + self.stats["disk_hits"]) / total if total else 0.0

    def reset_stats(self) -> None:
        self.stats = dict.fromkeys(self.stats, 0)

    def encode(
        self, slices: torch.Tensor, encode_fn: Callable[[torch.Tensor], torch.Tensor], namespace: str
    ) -> torch.Tensor:
        """Embeddings of ``slices``, running ``encode_fn`` only on content not seen before.

        Args:
            slices: (N, h, w) slices exactly as the encoder would receive them.
            encode_fn: (M, h, w) -> (M, hidden), the frozen encoder.
            namespace: hash of everything besides the pixels that determines an embedding.

        Returns:
            (N, hidden) float32 embeddings on ``slices.device``.
        """
        host = slices.detach().to("cpu", torch.float32).contiguous().numpy()
        keys = [self._key(namespace, s) for s in host]
        found: dict[str, torch.Tensor] = {}
        todo: dict[str, int] = {}  # key -> index of its first slice: repeated content is encoded once
        for index, key in enumerate(keys):
            if key in found or key in todo:
                self.stats["memory_hits"] += 1  # same content earlier in this batch
                continue
            cached = self._lookup(key)
            if cached is None:
                todo[key] = index
            else:
                found[key] = cached
        if todo:
            self.stats["misses"] += len(todo)
            computed = encode_fn(slices[list(todo.values())]).detach().to("cpu", torch.float32)
            for key, embedding in zip(todo, computed, strict=True):
                embedding = embedding.clone()  # not a view that keeps the whole batch alive
                self._remember(key, embedding)
                self._store(key, embedding)
                found[key] = embedding
        return torch.stack([found[k] for k in keys]).to(slices.device)

    @staticmethod
    def _key(namespace: str, pixels: np.ndarray) -> str:
        digest = hashlib.blake2b(namespace.encode(), digest_size=20)
        digest.update(repr(pixels.shape).encode())
        digest.update(pixels.tobytes())
        return digest.hexdigest()

    def _lookup(self, key: str) -> torch.Tensor | None:
        embedding = self._memory.get(key)
        if embedding is not None:
            self._memory.move_to_end(key)
            self.stats["memory_hits"] += 1
            return embedding
        embedding = self._load(key)
        if embedding is not None:
            self.stats["disk_hits"] += 1
            self._remember(key, embedding)
        return embedding

    def _remember(self, key: str, embedding: torch.Tensor) -> None:
        self._memory[key] = embedding
        self._bytes += embedding.numel() * embedding.element_size()
        while self._bytes > self.max_bytes and self._memory:
            _, evicted = self._memory.popitem(last=False)
            self._bytes -= evicted.numel() * evicted.element_size()

    def _path(self, key: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / key[:2] / f"{key}.npy"

    def _load(self, key: str) -> torch.Tensor | None:
        if self.cache_dir is None:
            return None
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            array = np.load(path, allow_pickle=False)
            if array.ndim != 1 or array.dtype != np.float32 or not np.isfinite(array).all():
                raise ValueError(f"expected a finite float32 vector, got {array.dtype} {array.shape}")
        except (OSError, ValueError, EOFError) as error:
            logger.warning("Ignoring corrupted embedding cache entry %s (%s); recomputing it.", path, error)
            return None
        return torch.from_numpy(array)

    def _store(self, key: str, embedding: torch.Tensor) -> None:
        if self.cache_dir is None:
            return
        # A reader (or a second process) never sees half an entry; no fsync: a lost entry is recomputed.
        array = embedding.numpy()
        replace_atomically(self._path(key), lambda tmp: np.save(tmp, array), suffix=".tmp.npy", durable=False)
