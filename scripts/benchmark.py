"""Benchmark DINO-3DRA against the plain U-Net on this machine: training step, inference, encoder throughput.

Run from the bundle root::

    python -m scripts.benchmark                                            # full run: many minutes on a CPU
    python -m scripts.benchmark --sizes 64,96 --repeats 1 --batch_size 1   # a quick look

Every figure comes from the same run on the same machine, so the ratios to the plain U-Net compare like
with like. Inputs are synthetic (smoothed noise): the timings do not depend on the content, nor on the
encoder's weights, so ``--dino_model random`` (the default; the network warns loudly about it) times the real
method. What is measured:

1. Training step (forward + backward + AdamW step, ``DiceCELoss`` on a random 3-class label) for the plain
   U-Net, DINO-3DRA without a cache, and DINO-3DRA with a warm slice-embedding cache (pre-warmed with the same
   patches, so every step reuses every slice, as the cache-aligned training crops make slices recur). After
   one warm-up step each, ``--repeats`` rounds run one step of each network in turn and the median per
   network is reported: interleaving keeps a drift in the machine's speed from favouring one of them.
2. Sliding-window inference of one volume per size under ``torch.no_grad()`` (after one warm-up batch of
   windows), each (network, size) in a fresh process so that its peak memory is its own: the whole process's
   peak RSS (interpreter, torch and weights included; ``VmHWM``, since a spawned child's ``ru_maxrss`` starts
   at its parent's peak) and, on CUDA, ``torch.cuda.max_memory_allocated``. DINO-3DRA gets a fresh in-memory
   cache per volume, as inference does: windows that overlap along the slice axis reuse slices.
3. Slices per second of the frozen encoder alone.

The last line is machine-readable::

    train_step_ratio_nocache=A train_step_ratio_warm=B infer256_ratio=C peak_mem256_gib=D steps_per_min_warm=E
    steps_per_min_warm_bf16=F

``steps_per_min_warm`` and ``steps_per_min_warm_bf16`` are DINO-3DRA's warm-cache optimizer steps per minute
in float32 and under CPU bf16 autocast (what the training config runs on CPUs with native bf16; ``nan``
elsewhere).

``infer256_ratio`` (DINO-3DRA time / plain U-Net time) and ``peak_mem256_gib`` (DINO-3DRA's peak: CUDA memory
on CUDA, else the process's peak RSS) are those of the 256^3 volume, or of the largest size measured when 256
is not among ``--sizes`` (the names stay the same); both are ``nan`` with ``--skip_inference``.
"""

from __future__ import annotations

import math
import multiprocessing
import re
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import fire
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss

from scripts.embedding_cache import SliceEmbeddingCache
from scripts.inferers import cpu_bf16_supported, encoder_dtype
from scripts.networks import Dino3DRA

__all__ = ["main"]

GIB = 2**30
GOAL_TRAIN_RATIO = 1.3  # warm-cache training step / plain U-Net step
GOAL_INFER_RATIO = 2.0  # 256^3 inference time / plain U-Net time
GOAL_PEAK_GIB = 8.0  # 256^3 inference peak memory
DINO_INFER = "DINO-3DRA, cold cache"  # its inference row


def _parse_sizes(sizes: str | int | Sequence[int]) -> list[int]:
    """``"128,256"`` (or what ``fire`` makes of it: ``(128, 256)`` or ``128``) -> ``[128, 256]``."""
    if isinstance(sizes, str):
        sizes = [s for s in sizes.split(",") if s.strip()]
    elif isinstance(sizes, int):
        sizes = [sizes]
    parsed = [int(s) for s in sizes]
    if not parsed or min(parsed) < 1:
        raise ValueError(f"sizes must be positive volume sides, got {sizes!r}.")
    return parsed


def _synthetic_volume(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """(batch, 1, size, size, size) smoothed noise scaled to [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    volume = F.avg_pool3d(torch.rand(batch, 1, size, size, size, generator=generator), 5, 1, 2)
    return (volume - volume.min()) / (volume.max() - volume.min())


def _build(use_dino: bool, network_kwargs: dict[str, Any], device: str) -> Dino3DRA:
    """DINO-3DRA from ``network_kwargs``, or the plain U-Net (which takes only ``roi_size`` of them)."""
    torch.manual_seed(0)
    kwargs = network_kwargs if use_dino else {"roi_size": network_kwargs["roi_size"]}
    return Dino3DRA(use_dino=use_dino, **kwargs).to(device)


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _train_step(
    net: Dino3DRA, image: torch.Tensor, label: torch.Tensor, autocast: bool = False
) -> Callable[[], None]:
    """One forward + DiceCE loss + backward + AdamW step on one batch; the forward under CPU bf16 autocast
    when ``autocast`` (as ``scripts.inferers.AutocastInferer`` runs it in the training config)."""
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    net.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = net(image)
        loss_fn(logits.float(), label).backward()
        optimizer.step()

    return step


def _interleaved_median_seconds(
    steps: dict[str, Callable[[], object]], repeats: int, device: str
) -> dict[str, float]:
    """Median wall time of each step: one warm-up call each, then ``repeats`` rounds calling each in turn."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(repeats + 1):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def _infer_volume(
    use_dino: bool, network_kwargs: dict[str, Any], size: int, overlap: float, sw_batch_size: int, device: str
) -> dict[str, float | None]:
    """Sliding-window inference of one volume; meant to run in a fresh process (see ``_in_fresh_process``)."""
    cache = SliceEmbeddingCache() if use_dino else None
    net = _build(use_dino, {**network_kwargs, "embedding_cache": cache}, device).eval()
    roi = network_kwargs["roi_size"]
    volume = _synthetic_volume(1, size).to(device)
    with torch.no_grad():
        net(torch.rand(sw_batch_size, 1, *roi, device=device))  # warm-up, on slices the volume does not have
        if cache is not None:
            cache.reset_stats()
        _sync(device)
        start = time.perf_counter()
        sliding_window_inference(volume, roi, sw_batch_size, net, overlap=overlap)
        _sync(device)
        seconds = time.perf_counter() - start
    cuda = torch.device(device).type == "cuda"
    return {
        "seconds": seconds,
        "peak_rss_gib": _peak_rss_gib(),
        "cuda_peak_gib": torch.cuda.max_memory_allocated(device) / GIB if cuda else None,
        "hit_rate": cache.hit_rate if cache is not None else None,
        "encoded": cache.stats["misses"] if cache is not None else None,
    }


def _peak_rss_gib() -> float:
    """Peak resident memory of this process: ``VmHWM`` of its own address space where Linux reports it.

    ``ru_maxrss`` is only the fallback: on Linux it survives ``execve``, so a spawned child would report at
    least the peak of the parent it was started from.
    """
    status = Path("/proc/self/status")
    found = re.search(r"^VmHWM:\s*(\d+) kB", status.read_text(), re.MULTILINE) if status.exists() else None
    kib = int(found.group(1)) if found else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib * 1024 / GIB


def _in_fresh_process(threads: int | None, **job: Any) -> dict[str, float | None]:
    """Run :func:`_infer_volume` in a new (spawned) process, so its peak memory is its own."""
    with ProcessPoolExecutor(1, multiprocessing.get_context("spawn"), _set_threads, (threads,)) as pool:
        return pool.submit(_infer_volume, **job).result()


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def _goal_line(name: str, value: float, met: bool, unit: str) -> str:
    """``name: value -> met / NOT met``, or ``not measured`` for nan."""
    if math.isnan(value):
        return f"  {name}: not measured"
    return f"  {name}: {value:.2f}{unit} -> {'met' if met else 'NOT met'}"


def main(
    sizes: str | int | Sequence[int] = "128,256",
    batch_size: int = 2,
    repeats: int = 3,
    overlap: float = 0.25,
    sw_batch_size: int = 4,
    dino_model: str = "random",
    dino_dtype: str | None = None,
    device: str | None = None,
    threads: int | None = None,
    skip_inference: bool = False,
    roi: int = 64,
    dino_image_size: int = 224,
    dino_config: dict[str, Any] | None = None,
) -> None:
    """Print the benchmark, ending with the machine-readable line (see the module docstring).

    Args:
        sizes: sides of the cubic volumes for inference, comma-separated. Default ``"128,256"``.
        batch_size: training batch size. Default 2.
        repeats: measured training rounds (median reported), after one warm-up round. Default 3.
        overlap: sliding-window overlap. Default 0.25.
        sw_batch_size: windows per network call at inference. Default 4.
        dino_model: encoder weights; timing does not depend on them. Default ``"random"``.
        dino_dtype: encoder dtype, ``"bfloat16"`` or ``"float32"``. Default: the configs' choice for the device
            (:func:`~scripts.inferers.encoder_dtype`).
        device: ``"cuda"`` or ``"cpu"``. Default: cuda if available, else cpu.
        threads: torch CPU threads. Default: torch's default.
        skip_inference: measure training and the encoder only.
        roi: side of the training patch and inference window. Default 64.
        dino_image_size: side of the encoder's input image. Default 224.
        dino_config: encoder architecture overrides for random weights (the smoke test uses a tiny one).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    _set_threads(threads)
    dino_dtype = dino_dtype or encoder_dtype(device)
    volume_sizes = _parse_sizes(sizes)
    network_kwargs = {
        "dino_model": dino_model,
        "dino_dtype": dino_dtype,
        "dino_image_size": dino_image_size,
        "dino_config": dino_config,
        "roi_size": (roi, roi, roi),
    }
    print(
        f"DINO-3DRA benchmark on {device} (torch {torch.__version__}, {torch.get_num_threads()} CPU "
        f"threads); encoder {dino_model!r} in {dino_dtype} at {dino_image_size}^2."
    )
    if dino_model.startswith("random"):
        print("Random encoder weights: timing does not depend on the weights (the warning is expected).")
    train, dino = _benchmark_training(network_kwargs, batch_size, repeats, device)
    slices_per_second = _benchmark_encoder(dino, network_kwargs, repeats, device)
    largest = 256 if 256 in volume_sizes else max(volume_sizes)
    infer = peak = math.nan
    if not skip_inference:
        infer, peak = _benchmark_inference(
            volume_sizes, largest, network_kwargs, overlap, sw_batch_size, slices_per_second, threads, device
        )
    _print_goals(train, infer, peak, largest)


def _benchmark_training(
    network_kwargs: dict[str, Any], batch_size: int, repeats: int, device: str
) -> tuple[dict[str, float], Dino3DRA]:
    """Print the training-step table; return the median seconds per step by row name, and the no-cache network
    (whose encoder :func:`_benchmark_encoder` times)."""
    roi = network_kwargs["roi_size"][0]
    image = _synthetic_volume(batch_size, roi).to(device)
    label = torch.randint(0, 3, image.shape, generator=torch.Generator().manual_seed(1)).to(device)
    print(
        f"\nTraining step: batch {batch_size}, {roi}^3 patches, forward + backward + AdamW, "
        f"median of {repeats} interleaved rounds after 1 warm-up"
    )
    cache = SliceEmbeddingCache()
    dino = _build(True, network_kwargs, device)
    warm_dino = _build(True, {**network_kwargs, "embedding_cache": cache}, device)
    with torch.no_grad():
        warm_dino.slice_encoder(image)  # pre-warm: these patches have been seen before
    cache.reset_stats()
    steps = {
        "plain U-Net": _train_step(_build(False, network_kwargs, device), image, label),
        "DINO-3DRA, no cache": _train_step(dino, image, label),
        "DINO-3DRA, warm cache": _train_step(warm_dino, image, label),
    }
    bf16 = torch.device(device).type == "cpu" and cpu_bf16_supported()
    if bf16:  # what the training config runs on this CPU
        steps["plain U-Net, bf16"] = _train_step(_build(False, network_kwargs, device), image, label, True)
        steps["DINO-3DRA, warm, bf16"] = _train_step(warm_dino, image, label, True)
    train = _interleaved_median_seconds(steps, repeats, device)
    for name, seconds in train.items():
        print(
            f"  {name:<24} {seconds:8.2f} s/step  {60 / seconds:6.1f} steps/min  "
            f"{seconds / train['plain U-Net']:5.2f}x plain"
        )
    if not bf16:
        print("  (no bf16 autocast rows: this CPU has no native bf16, so the configs train in float32)")
    print(f"  (warm cache: {cache.hit_rate:.0%} of the slice lookups were hits)")
    return train, dino


def _benchmark_encoder(dino: Dino3DRA, network_kwargs: dict[str, Any], repeats: int, device: str) -> float:
    """Print and return the slices per second of ``dino``'s frozen encoder alone (64 slices of ROI side)."""
    roi = network_kwargs["roi_size"][0]
    slices = torch.rand(64, roi, roi, generator=torch.Generator().manual_seed(2)).to(device)
    encode = {"encoder": lambda: dino.slice_encoder.encode_slices(slices)}
    seconds = _interleaved_median_seconds(encode, repeats, device)["encoder"]
    slices_per_second = len(slices) / seconds
    print(
        f"\nSlice encoder alone: {slices_per_second:.1f} slices/s ({len(slices)} slices of {roi}x{roi} -> "
        f"{network_kwargs['dino_image_size']}^2, median of {repeats} after 1 warm-up)"
    )
    return slices_per_second


def _benchmark_inference(
    volume_sizes: list[int],
    largest: int,
    network_kwargs: dict[str, Any],
    overlap: float,
    sw_batch_size: int,
    slices_per_second: float,
    threads: int | None,
    device: str,
) -> tuple[float, float]:
    """Print the inference table, each (network, size) run in a fresh process; return DINO-3DRA's time ratio
    to the plain U-Net and its peak memory in GiB (CUDA's on CUDA, else the process's RSS) on the ``largest``
    volume."""
    roi = network_kwargs["roi_size"][0]
    print(
        f"\nInference: sliding window {roi}^3, overlap {overlap}, sw_batch_size {sw_batch_size}, "
        "no_grad, one volume, each in a fresh process; peak RSS is the whole process's"
    )
    infer = peak = math.nan
    for size in volume_sizes:
        runs = {
            name: _in_fresh_process(
                threads,
                use_dino=use_dino,
                network_kwargs=network_kwargs,
                size=size,
                overlap=overlap,
                sw_batch_size=sw_batch_size,
                device=device,
            )
            for name, use_dino in (("plain U-Net", False), (DINO_INFER, True))
        }
        _print_inference(size, runs, slices_per_second)
        if size == largest:
            infer = runs[DINO_INFER]["seconds"] / runs["plain U-Net"]["seconds"]
            cuda_peak = runs[DINO_INFER]["cuda_peak_gib"]
            peak = cuda_peak if cuda_peak is not None else runs[DINO_INFER]["peak_rss_gib"]
    return infer, peak


def _print_inference(size: int, runs: dict[str, dict[str, float | None]], slices_per_second: float) -> None:
    """One line per network for the ``size``^3 volume: time, ratio to the plain U-Net, peak memory, cache."""
    for name, run in runs.items():
        line = (
            f"  {size}^3  {name:<22} {run['seconds']:8.2f} s  "
            f"{run['seconds'] / runs['plain U-Net']['seconds']:5.2f}x plain  "
            f"peak RSS {run['peak_rss_gib']:6.2f} GiB"
        )
        if run["cuda_peak_gib"] is not None:
            line += f"  CUDA peak {run['cuda_peak_gib']:6.2f} GiB"
        if run["hit_rate"] is not None:
            line += (
                f"  slice cache hits {run['hit_rate']:.0%}, {run['encoded']} slices encoded "
                f"(~{run['encoded'] / slices_per_second:.0f} s at the encoder's rate)"
            )
        print(line)


def _print_goals(train: dict[str, float], infer: float, peak: float, largest: int) -> None:
    """The goals met or not, then the machine-readable last line (see the module docstring)."""
    nocache = train["DINO-3DRA, no cache"] / train["plain U-Net"]
    warm = train["DINO-3DRA, warm cache"] / train["plain U-Net"]
    print("\nGoals:")
    goals = {
        f"warm-cache training step <= {GOAL_TRAIN_RATIO}x plain": (warm, warm <= GOAL_TRAIN_RATIO, "x"),
        f"{largest}^3 inference <= {GOAL_INFER_RATIO}x plain": (infer, infer <= GOAL_INFER_RATIO, "x"),
        f"{largest}^3 peak memory < {GOAL_PEAK_GIB} GiB": (peak, peak < GOAL_PEAK_GIB, " GiB"),
    }
    for name, (value, met, unit) in goals.items():
        print(_goal_line(name, value, met, unit))
    warm_bf16 = train.get("DINO-3DRA, warm, bf16", math.nan)
    last = (
        f"train_step_ratio_nocache={nocache:.3f} train_step_ratio_warm={warm:.3f} "
        f"infer256_ratio={infer:.3f} peak_mem256_gib={peak:.3f} "
        f"steps_per_min_warm={60 / train['DINO-3DRA, warm cache']:.2f} steps_per_min_warm_bf16={60 / warm_bf16:.2f}"
    )
    print(last)


if __name__ == "__main__":
    from scripts.cli import configure_logging

    configure_logging()
    fire.Fire(main)
