"""Previews of a phantom (``save_preview``): three views with the labels overlaid and markers circled.

The oriented previews of inference and evaluation are checked in ``tests/test_batch_inference.py`` and
``tests/test_evaluation_report.py``, on those commands' outputs.
"""

from __future__ import annotations

import numpy as np

from scripts.data import generate_case, save_preview


def test_preview_png(tmp_path):
    case = next(c for c in map(generate_case, range(6)) if c.info["num_aneurysms"])
    middle = tuple(n // 2 for n in case.image.shape)
    path = save_preview(
        case.image, case.label, case.spacing, tmp_path / "p.png", scale=2.0, markers=[(middle, 3.0)]
    )
    from PIL import Image

    with Image.open(path) as png:
        fov = case.image.shape[0] * case.spacing[0] * 2.0
        assert png.width >= 3 * int(fov) and png.height >= 2 * int(fov)
        rgb = np.asarray(png.convert("RGB")).reshape(-1, 3)
    assert np.any((rgb[:, 0] > 200) & (rgb[:, 1] < 100)), "aneurysm overlay in red"
    assert np.any(np.all(rgb == (255, 230, 0), axis=1)), "marker circled in yellow"
