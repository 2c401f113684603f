"""The benchmark command runs end to end on tiny settings and ends with its machine-readable line."""

from __future__ import annotations

import math
import re

from conftest import TINY_DINOV3, TINY_IMAGE_SIZE

from scripts.benchmark import main
from scripts.inferers import cpu_bf16_supported

LAST_LINE = re.compile(
    r"train_step_ratio_nocache=(\S+) train_step_ratio_warm=(\S+) infer256_ratio=(\S+) peak_mem256_gib=(\S+) "
    r"steps_per_min_warm=(\S+) steps_per_min_warm_bf16=(\S+)"
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
    ratio_nocache, ratio_warm, infer_ratio, peak_gib, per_min, per_min_bf16 = map(float, match.groups())
    assert ratio_nocache > 0 and ratio_warm > 0 and per_min > 0
    # the bf16 row is there exactly where the CPU runs bf16 natively, as the training config decides
    assert ("DINO-3DRA, warm, bf16" in out) == cpu_bf16_supported() == (not math.isnan(per_min_bf16))
    assert math.isnan(infer_ratio) and math.isnan(peak_gib)
