"""bfloat16 autocast of any inferer on the CPU, float32 logits out; bf16 for the encoder only where it is native."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.inferers import SimpleInferer, SlidingWindowInferer

import scripts.inferers
from scripts.inferers import AutocastInferer, encoder_dtype

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class _Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 3, 3, padding=1)
        self.dtypes = []

    def forward(self, x):
        out = self.conv(x)
        self.dtypes.append(out.dtype)
        return out


@pytest.mark.parametrize("enabled, dtype", [(True, torch.bfloat16), (False, torch.float32)])
def test_the_network_runs_in_bf16_and_returns_float32(enabled, dtype):
    net = _Recorder()
    x = torch.rand(1, 1, 16, 16, 16)
    for inner in (SimpleInferer(), SlidingWindowInferer(roi_size=(8, 8, 8), sw_batch_size=2)):
        out = AutocastInferer(inner, enabled=enabled)(x, net)
        assert out.dtype == torch.float32 and out.shape == (1, 3, 16, 16, 16)
        with torch.no_grad():
            reference = inner(x, net.conv)
        torch.testing.assert_close(out, reference, atol=0.05, rtol=0.05)
    assert set(net.dtypes) == {dtype}


def test_settings_read_through_and_bad_switch_refused():
    inferer = AutocastInferer(SlidingWindowInferer(roi_size=(8, 8, 8), overlap=0.5))
    assert inferer.roi_size == (8, 8, 8) and inferer.overlap == 0.5
    with pytest.raises(ValueError, match="True or False"):
        AutocastInferer(SimpleInferer(), enabled="false")


def test_deeply_supervised_outputs_come_back_as_a_float32_list():
    net = _Recorder()
    deep = lambda x: [net(x), torch.nn.functional.avg_pool3d(net(x), 2)]  # noqa: E731
    x = torch.rand(1, 1, 16, 16, 16)
    outputs = AutocastInferer(SimpleInferer())(x, deep)
    assert [(o.dtype, o.shape) for o in outputs] == [
        (torch.float32, (1, 3, 16, 16, 16)),
        (torch.float32, (1, 3, 8, 8, 8)),
    ]
    assert set(net.dtypes) == {torch.bfloat16}


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("config", ["inference.yaml", "train.yaml"])
def test_the_encoder_runs_in_bf16_only_on_a_cpu_that_has_it(monkeypatch, native, config):
    # emulated bf16 made the encoder 6x slower than float32 on an AVX2-only CPU
    monkeypatch.setattr(scripts.inferers, "cpu_bf16_supported", lambda: native)
    expected = "bfloat16" if native else "float32"
    assert encoder_dtype("cpu") == encoder_dtype(torch.device("cpu")) == expected
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / config))
    parser["device"] = "$torch.device('cpu')"
    assert parser.get_parsed_content("dino_dtype") == expected
