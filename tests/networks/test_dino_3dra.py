"""The DINO-3DRA network: shapes per ablation row, parameter budget, frozen encoder, checkpoints, inputs."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_DINOV3, TINY_IMAGE_SIZE

from scripts.networks import Dino3DRA, EncoderMismatchError, count_parameters

ROI = (32, 32, 32)


def tiny_net(**kwargs) -> Dino3DRA:
    args = {
        "dino_model": "random",
        "dino_config": TINY_DINOV3,
        "dino_image_size": TINY_IMAGE_SIZE,
        "dino_chunk_size": 16,
        "roi_size": ROI,
        **kwargs,
    }
    return Dino3DRA(**args)


ABLATIONS = {
    "plain_unet": {"use_dino": False},
    "full": {},
    "random_features": {"dino_model": "random:3"},
    "without_calibration": {"use_calibration": False},
    "without_room_lite": {"use_room_lite": False},
    "sagittal_slices": {"slice_axis": 0},
}


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("settings", ABLATIONS.values(), ids=ABLATIONS.keys())
def test_logits_shape(settings, batch):
    net = tiny_net(**settings)
    assert net(torch.rand(batch, 1, *ROI)).shape == (batch, 3, *ROI)


@pytest.mark.parametrize("batch", [1, 2])
def test_dinov2_ablation_row(tiny_dinov2_dir, batch):
    net = tiny_net(dino_model=str(tiny_dinov2_dir))
    assert net.slice_encoder.num_prefix_tokens == 1  # CLS only, no registers
    assert net(torch.rand(batch, 1, *ROI)).shape == (batch, 3, *ROI)


def test_ablations_change_only_the_dino_path():
    full = count_parameters(tiny_net())
    assert count_parameters(tiny_net(use_room_lite=False))["room_lite"] == 0
    assert count_parameters(tiny_net(use_calibration=False))["dino_path"] < full["dino_path"]
    plain = tiny_net(use_dino=False)
    # The plain U-Net is exactly the full network without its DINO path.
    missing, unexpected = tiny_net().load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected
    assert missing and all(k.startswith(("dino.", "fusions.")) for k in missing)
    assert count_parameters(plain)["total"] == full["total"] - full["dino_path"]


def test_full_size_parameter_budget():
    """Full-size ViT-S/16 encoder (random weights): the paper's 5.72M / 116K / 21K within 10%."""
    counts = count_parameters(Dino3DRA(dino_model="random"))
    assert counts["total"] == pytest.approx(5.72e6, rel=0.10)
    assert counts["dino_path"] == pytest.approx(116e3, rel=0.10)
    assert counts["room_lite"] == pytest.approx(21e3, rel=0.10)


def test_encoder_stays_frozen_through_an_optimizer_step():
    net = tiny_net()
    backbone = net.slice_encoder.backbone
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    backbone_ids = {id(p) for p in backbone.parameters()}
    assert not backbone_ids & {id(p) for group in optimizer.param_groups for p in group["params"]}

    net.train()
    assert not backbone.training
    loss = net(torch.rand(2, 1, *ROI)).square().mean()
    loss.backward()
    optimizer.step()

    assert all(p.grad is None and not p.requires_grad for p in backbone.parameters())
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    assert not any(k.startswith("dino.encoder.backbone") for k in net.state_dict())


def test_precomputed_embeddings_give_identical_logits():
    net = tiny_net().eval()
    x = torch.rand(2, 1, *ROI)
    with torch.no_grad():
        embeddings = net.slice_encoder(x)
        assert embeddings.shape == (2, ROI[2], TINY_DINOV3["hidden_size"])
        torch.testing.assert_close(net(x, slice_embeddings=embeddings), net(x), rtol=0, atol=0)


def gradients(net: Dino3DRA) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in net.named_parameters() if p.requires_grad}


def float32_step(net: Dino3DRA, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and gradients (loss: mean squared logit) of one float32 pass; leaves the gradients cleared."""
    logits = net(x)
    logits.square().mean().backward()
    grads = {name: g.clone() for name, g in gradients(net).items()}
    net.zero_grad(set_to_none=True)
    return logits, grads


def bf16_step(net: Dino3DRA, x: torch.Tensor) -> torch.Tensor:
    """Logits of one pass under CPU bf16 autocast, its gradients left in the network."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(x)
    logits.float().square().mean().backward()
    return logits


def test_mixed_precision_forward_and_backward_follow_float32():
    # the bundle trains with AMP on GPUs; CPU bfloat16 autocast exercises the same casts. 24^3, one case
    # (levels 24 to 3 voxels deep): on a CPU without native bf16 autocast is emulated, about 10x slower
    net = tiny_net(roi_size=(24, 24, 24))
    x = torch.rand(1, 1, 24, 24, 24)
    reference, reference_grads = float32_step(net, x)
    logits = bf16_step(net, x)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), reference, atol=0.1, rtol=0.05)
    for name, grad in gradients(net).items():
        expected = reference_grads[name]
        if expected.norm() > 1e-6:  # conv biases before a normalisation get no gradient
            # bf16 rounding: up to ~0.4 of a random network's small gradients, not the 1e30 of a broken kernel
            assert (grad - expected).norm() < expected.norm(), name


def test_a_two_voxel_deep_level_runs_in_float32_under_cpu_bf16_autocast(caplog):
    # A 16^3 patch has a 2-deep bottleneck, where oneDNN's bf16 weight gradients of 3x3x3 convolutions are
    # garbage that changes from call to call: the network runs such inputs in float32 and says so once.
    net = tiny_net(roi_size=(16, 16, 16))
    x = torch.rand(2, 1, 16, 16, 16)
    reference, reference_grads = float32_step(net, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(x)
    logits = bf16_step(net, x)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference, rtol=0, atol=0)
    for name, grad in gradients(net).items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=0, atol=0, msg=name)
    warnings = [r for r in caplog.records if "2 voxels deep" in r.getMessage()]
    assert len(warnings) == 1 and "depth 16" in warnings[0].getMessage()


def test_checkpoint_round_trip_with_random_encoder(tmp_path):
    x = torch.rand(1, 1, *ROI)
    trained = tiny_net(dino_model="random:7").eval()
    torch.nn.init.normal_(trained.fusions[0].mix.weight)  # something a fresh network would not have
    path = tmp_path / "model.pt"
    torch.save(trained.state_dict(), path)

    restored = tiny_net(dino_model="random:7").eval()
    restored.load_state_dict(torch.load(path, weights_only=False))
    with torch.no_grad():
        torch.testing.assert_close(restored(x), trained(x), rtol=0, atol=0)

    with pytest.raises(EncoderMismatchError, match="random:7"):
        tiny_net(dino_model="random:8").load_state_dict(torch.load(path, weights_only=False))


@pytest.mark.parametrize("heads", [1, 2])
def test_deep_supervision_adds_coarser_logits_in_training_only(heads):
    net = tiny_net(deep_supervision=heads)
    x = torch.rand(2, 1, *ROI)
    outputs = net.train()(x)
    assert [o.shape for o in outputs] == [(2, 3, *(s // 2**level for s in ROI)) for level in range(heads + 1)]
    # no batch statistics or dropout: eval mode gives the training-mode full-resolution logits, alone
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), outputs[0].detach(), rtol=0, atol=0)
    sum(o.square().mean() for o in outputs[1:]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.heads.parameters())
    assert net.final_conv.weight.grad is None


def test_deep_supervision_heads_are_in_the_checkpoint():
    supervised = tiny_net(use_dino=False, deep_supervision=2)
    assert {f"heads.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")} <= set(supervised.state_dict())
    with pytest.raises(RuntimeError, match="heads.0.weight"):
        tiny_net(use_dino=False).load_state_dict(supervised.state_dict())


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.rand(1, 32, 32, 32), "rank 4"),
        (torch.rand(1, 2, 32, 32, 32), "input channel"),
        (torch.rand(1, 1, 32, 30, 32), "divisible by 8"),
        (torch.full((1, 1, 32, 32, 32), float("nan")), "NaN"),
    ],
    ids=["rank", "channels", "size", "nan"],
)
def test_bad_input_raises(x, message):
    with pytest.raises(ValueError, match=message):
        tiny_net(use_dino=False)(x)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"spatial_dims": 2}, "spatial_dims"),
        ({"channels": (8, 16, 32)}, "levels"),
        ({"slice_axis": 3}, "slice_axis"),
        ({"deep_supervision": 3}, "deep_supervision must be an int from 0 to 2"),
        ({"deep_supervision": -1}, "deep_supervision"),
        ({"deep_supervision": True}, "deep_supervision"),
        ({"deep_supervision": "1"}, "deep_supervision"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_net(**kwargs)
