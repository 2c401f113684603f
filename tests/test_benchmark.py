"""The benchmark command runs end to end on tiny settings and ends with its machine-readable line."""

from __future__ import annotations

import math
import re

from conftest import TINY_DINOV3, TINY_IMAGE_SIZE

from scripts.benchmark import main

LAST_LINE = re.compile(
    r"train_step_ratio_nocache=(\S+) train_step_ratio_warm=(\S+) infer256_ratio=(\S+) peak_mem256_gib=(\S+)"
)


def test_benchmark_smoke(capsys):
    # Inference is skipped: each of its runs spawns a fresh interpreter, which alone takes ~10 s here.
    main(
        batch_size=1,
        repeats=1,
        roi=32,
        dino_image_size=TINY_IMAGE_SIZE,
        dino_config=TINY_DINOV3,
        device="cpu",
        skip_inference=True,
    )
    out = capsys.readouterr().out
    assert "100% of the slice lookups were hits" in out
    match = LAST_LINE.fullmatch(out.strip().splitlines()[-1])
    assert match, out
    ratio_nocache, ratio_warm, infer_ratio, peak_gib = map(float, match.groups())
    assert ratio_nocache > 0 and ratio_warm > 0
    assert math.isnan(infer_ratio) and math.isnan(peak_gib)
