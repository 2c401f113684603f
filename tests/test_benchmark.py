"""The benchmark command runs end to end on tiny settings, and the figures it prints agree with each other,
with the volume it measured and with the memory the process really used."""

from __future__ import annotations

import contextlib
import io
import math
import re
import resource
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_DINOV3, TINY_IMAGE_SIZE

from scripts import benchmark
from scripts.inferers import cpu_bf16_supported

ROI = 32
OVERLAP = 0.25
SIZES = (32, 36)  # one window, then 2 x 2 x 2; not 256: the last line must report the largest
LAST_LINE = re.compile(
    r"train_step_ratio_nocache=(?P<nocache>\S+) train_step_ratio_warm=(?P<warm>\S+) "
    r"infer256_ratio=(?P<infer>\S+) peak_mem256_gib=(?P<peak>\S+) "
    r"steps_per_min_warm=(?P<per_min>\S+) steps_per_min_warm_bf16=(?P<per_min_bf16>\S+)"
)
TRAIN_LINE = re.compile(
    r"  (?P<name>\S.*?)\s+(?P<seconds>\S+) s/step\s+(?P<per_min>\S+) steps/min\s+(?P<ratio>\S+)x plain"
)
INFER_LINE = re.compile(
    r"  (?P<size>\d+)\^3  (?P<name>plain U-Net|DINO-3DRA, cold cache)\s+(?P<seconds>\S+) s\s+(?P<ratio>\S+)x plain  "
    r"peak RSS\s+(?P<peak>\S+) GiB(?:  slice cache hits (?P<hits>\d+)%, (?P<encoded>\d+) slices encoded.*)?"
)
DINO = "DINO-3DRA, cold cache"
ROUNDING = 0.0051  # half the last decimal of a figure printed with two, and a little


def own_peak_gib() -> float:
    """This process's peak resident memory in GiB, as Linux reports it (``VmHWM``, in kB = KiB).

    Elsewhere ``ru_maxrss`` (KiB on Linux too), which may also count the peak of the process that started
    this one, so it is an upper bound.
    """
    status = Path("/proc/self/status")
    if status.exists():
        (kib,) = [line.split()[1] for line in status.read_text().splitlines() if line.startswith("VmHWM:")]
    else:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kib) / 2**20


def printable(printed: str, lowest: float, highest: float) -> bool:
    """Whether ``printed`` (a rounded figure) can come from a value in [lowest, highest]."""
    decimals = len(printed.partition(".")[2])
    half = 0.5 * 10**-decimals + 1e-9
    return lowest - half <= float(printed) <= highest + half


def seconds_range(printed: str) -> tuple[float, float]:
    """The durations that print as ``printed`` (two decimals)."""
    seconds = float(printed)
    assert seconds > 0.005, printed
    return seconds - 0.005, seconds + 0.005


def windows_per_axis(size: int) -> int:
    """Sliding windows along one axis of a ``size`` volume (MONAI's scan: step ROI * (1 - OVERLAP))."""
    return math.ceil((size - ROI) / int(ROI * (1 - OVERLAP))) + 1


@pytest.fixture(scope="module")
def report() -> dict:
    """What ``main`` prints, inference included, parsed; and this process's peak memory afterwards.

    Inference runs in this process instead of a fresh one per volume: each fresh interpreter alone takes
    10-15 s here (``test_inference_in_a_fresh_process_reports_its_own_peak`` runs that path).
    """
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
        patch.setattr(benchmark, "_in_fresh_process", lambda threads, **job: benchmark._infer_volume(**job))
        benchmark.main(
            sizes=",".join(map(str, SIZES)),
            batch_size=1,
            repeats=1,
            overlap=OVERLAP,
            roi=ROI,
            dino_image_size=TINY_IMAGE_SIZE,
            dino_config=TINY_DINOV3,
            device="cpu",
        )
    text = out.getvalue()
    lines = text.strip().splitlines()
    last = LAST_LINE.fullmatch(lines[-1])
    assert last, text
    return {
        "text": text,
        "last": {key: float(value) for key, value in last.groupdict().items()},
        "train": {m["name"]: m for line in lines if (m := TRAIN_LINE.fullmatch(line))},
        "infer": {(int(m["size"]), m["name"]): m for line in lines if (m := INFER_LINE.fullmatch(line))},
        "peak_gib": own_peak_gib(),
    }


def test_training_figures_agree_with_each_other(report):
    text, train, last = report["text"], report["train"], report["last"]
    assert "100% of the slice lookups were hits" in text  # the warm cache was warm
    # the bf16 rows are there exactly where the CPU runs bf16 natively, as the training config decides
    assert (
        ("DINO-3DRA, warm, bf16" in train) == cpu_bf16_supported() == (not math.isnan(last["per_min_bf16"]))
    )
    plain_low, plain_high = seconds_range(train["plain U-Net"]["seconds"])
    for line in train.values():
        low, high = seconds_range(line["seconds"])
        assert printable(line["per_min"], 60 / high, 60 / low), line[0]
        assert printable(line["ratio"], low / plain_high, high / plain_low), line[0]
    # the machine-readable line repeats the table's figures, under the right names
    assert last["nocache"] == pytest.approx(float(train["DINO-3DRA, no cache"]["ratio"]), abs=ROUNDING)
    assert last["warm"] == pytest.approx(float(train["DINO-3DRA, warm cache"]["ratio"]), abs=ROUNDING)
    assert last["per_min"] == pytest.approx(float(train["DINO-3DRA, warm cache"]["per_min"]), abs=0.051)
    if cpu_bf16_supported():
        assert last["per_min_bf16"] == pytest.approx(
            float(train["DINO-3DRA, warm, bf16"]["per_min"]), abs=0.051
        )


@pytest.mark.parametrize("size", SIZES)
def test_inference_encodes_each_distinct_slice_window_once(report, size):
    """n x n in-plane window positions cover the volume, each over all ``size`` slices: so many encodings;
    the other lookups (n^3 windows of ROI slices each) are cache hits. n is 1 for 32^3, 2 for 36^3."""
    plain, dino = report["infer"][size, "plain U-Net"], report["infer"][size, DINO]
    assert plain["hits"] is None and plain["encoded"] is None  # no encoder, no cache
    assert float(plain["ratio"]) == 1.0
    n = windows_per_axis(size)
    encoded, lookups = n * n * size, n**3 * ROI
    assert int(dino["encoded"]) == encoded
    assert int(dino["hits"]) == pytest.approx(100 * (1 - encoded / lookups), abs=0.5)
    (low, high), (plain_low, plain_high) = seconds_range(dino["seconds"]), seconds_range(plain["seconds"])
    assert printable(dino["ratio"], low / plain_high, high / plain_low), dino[0]


def test_peak_memory_is_the_process_s_in_gib(report):
    peaks = [float(line["peak"]) for line in report["infer"].values()]
    assert all(0.1 < peak <= report["peak_gib"] + ROUNDING for peak in peaks)  # torch alone takes > 100 MiB
    # the last volume ran last, in this process: its figure is this process's peak, in GiB
    assert float(report["infer"][max(SIZES), DINO]["peak"]) == pytest.approx(report["peak_gib"], abs=ROUNDING)


def test_last_line_reports_the_largest_volume_measured(report):
    largest, last = report["infer"][max(SIZES), DINO], report["last"]
    assert last["infer"] == pytest.approx(float(largest["ratio"]), abs=ROUNDING)
    assert last["peak"] == pytest.approx(float(largest["peak"]), abs=ROUNDING)
    assert f"{max(SIZES)}^3 inference <= " in report["text"]
    assert f"{max(SIZES)}^3 peak memory < " in report["text"]


def test_inference_in_a_fresh_process_reports_its_own_peak():
    """Each (network, size) runs in a spawned process so that its peak memory is its own, not this one's."""
    # 1 GiB, touched: this process now peaks about that much above a child with the same imports
    ballast = np.ones(2**27)
    parent_peak = own_peak_gib()
    run = benchmark._in_fresh_process(
        None,
        use_dino=False,
        network_kwargs={"roi_size": (ROI,) * 3},
        size=ROI,
        overlap=OVERLAP,
        sw_batch_size=1,
        device="cpu",
    )
    del ballast
    assert 0.1 < run["peak_rss_gib"] < parent_peak - 0.5
    assert run["seconds"] > 0
    assert run["hit_rate"] is None and run["encoded"] is None and run["cuda_peak_gib"] is None
