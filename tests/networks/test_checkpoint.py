"""Network checkpoints: read safely, the network's weights picked, loaded strictly, the file named in errors."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_DINOV3, TINY_IMAGE_SIZE

from scripts.networks import (
    Dino3DRA,
    EncoderMismatchError,
    EncoderWeightsError,
    load_network_weights,
    read_network_state,
    recorded_encoder,
)

CHANNELS = [8, 16, 32, 64]


def tiny_net(**kwargs) -> Dino3DRA:
    settings = {"dino_config": TINY_DINOV3, "dino_image_size": TINY_IMAGE_SIZE, "roi_size": [32, 32, 32]}
    return Dino3DRA(channels=CHANNELS, **{**settings, **kwargs})


@pytest.fixture
def saved(tmp_path):
    """A network of encoder random:7, saved as model.pt and inside a training checkpoint."""
    network = tiny_net(dino_model="random:7")
    torch.save(network.state_dict(), tmp_path / "model.pt")
    torch.save({"model": network.state_dict(), "optimizer": {}}, tmp_path / "checkpoint.pt")
    return network


def test_recorded_encoder_reads_the_source_a_model_was_trained_with(tmp_path, saved):
    expected = saved.slice_encoder.provenance.record()
    assert recorded_encoder(tmp_path / "model.pt") == expected
    assert recorded_encoder(tmp_path / "checkpoint.pt")["source"] == "random:7"

    plain = Dino3DRA(channels=CHANNELS, use_dino=False)
    torch.save(plain.state_dict(), tmp_path / "plain.pt")
    assert recorded_encoder(tmp_path / "plain.pt") is None
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderWeightsError, match="broken.pt"):
        recorded_encoder(tmp_path / "broken.pt")


@pytest.mark.parametrize("name", ["model.pt", "checkpoint.pt"])
def test_weights_load_from_a_model_or_a_training_checkpoint(tmp_path, saved, name):
    assert read_network_state(tmp_path / name).keys() == saved.state_dict().keys()
    loaded = load_network_weights(tiny_net(dino_model="random:7"), tmp_path / name)
    for key, value in saved.state_dict().items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


def test_load_errors_name_the_file(tmp_path, saved):
    with pytest.raises(EncoderMismatchError, match=r"model\.pt: .*random:7"):
        load_network_weights(tiny_net(dino_model="random:8"), tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"(?s)model\.pt does not fit network_def.*Unexpected key"):
        load_network_weights(
            tiny_net(dino_model="random:7", use_room_lite=False), tmp_path / "model.pt", "network_def"
        )
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(EncoderWeightsError, match=r"list\.pt holds no state dict"):
        read_network_state(tmp_path / "list.pt")
