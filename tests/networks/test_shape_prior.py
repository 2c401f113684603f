"""The shape priors (Hessian blobness, surface convexity): blobs and domes against tubes, their filtering and
eigenvalues, and their place in the net."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from scripts.networks import Dino3DRA, count_parameters
from scripts.networks.checkpoint import load_network_weights
from scripts.networks.shape_prior import (
    CONVEXITY_SCALE,
    HessianBlobness,
    SurfaceConvexity,
    symmetric_eigenvalue_range,
)

SIGMAS = (1.5, 2.0, 3.0)


def _grid(size: int = 48) -> tuple[torch.Tensor, ...]:
    return torch.meshgrid(*(torch.arange(size, dtype=torch.float32) - size / 2,) * 3, indexing="ij")


def _ball(radius: float) -> torch.Tensor:
    d, h, w = _grid()
    return ((d**2 + h**2 + w**2) <= radius**2).float()


def _tube(radius: float, axis: int = 2) -> torch.Tensor:
    coords = [c for i, c in enumerate(_grid()) if i != axis]
    return ((coords[0] ** 2 + coords[1] ** 2) <= radius**2).float()


def test_a_ball_is_a_blob_and_a_tube_of_the_same_width_is_not():
    prior = HessianBlobness(SIGMAS)
    ball = prior(_ball(5.0)[None, None])[0, 0]
    centre = (24, 24, 24)
    assert ball[centre] > 0.9
    assert ball[0, 0, 0] == 0  # background
    for axis in range(3):  # the tube runs through the whole window, along each axis in turn
        tube = prior(_tube(5.0, axis)[None, None])[0, 0]
        assert tube[centre] < 0.1, axis
        assert tube.max() < 0.3 * ball.max()


def test_dark_structures_and_weak_blobs_fade_out():
    prior = HessianBlobness(SIGMAS)
    assert prior((1 - _ball(5.0))[None, None]).max() < 0.05  # a dark hole in a bright field
    # a ball at 15 % of the lumen level: its blobness falls in proportion (full strength: 0.15 scale-normalised)
    bright, faint = (prior(level * _ball(5.0)[None, None])[0, 0, 24, 24, 24] for level in (1.0, 0.15))
    assert bright > 0.9
    assert 0.1 < faint < 0.5


@pytest.mark.parametrize("order", [(2, 0, 0), (0, 2, 0), (0, 0, 2), (1, 1, 0), (1, 0, 1), (0, 1, 1)])
def test_second_derivatives_are_scipys_with_replicated_borders(order):
    image = torch.rand(1, 20, 24, 28, generator=torch.Generator().manual_seed(0))
    sigma = 2.0
    names = [(2, 0, 0), (0, 2, 0), (0, 0, 2), (1, 1, 0), (1, 0, 1), (0, 1, 1)]
    ours = HessianBlobness([sigma])._hessian(image, sigma)[names.index(order)][0].numpy()
    ref = ndimage.gaussian_filter(image[0].double().numpy(), sigma, order=order, mode="nearest") * sigma**2
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_eigenvalue_range_matches_torch():
    a = torch.randn(5000, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a = (a + a.transpose(1, 2)) / 2
    a[0] = torch.eye(3) * 0.7  # a repeated eigenvalue
    entries = (a[:, 0, 0], a[:, 1, 1], a[:, 2, 2], a[:, 0, 1], a[:, 0, 2], a[:, 1, 2])
    smallest, largest = symmetric_eigenvalue_range(*entries)
    expected = torch.linalg.eigvalsh(a)
    torch.testing.assert_close(smallest, expected[:, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(largest, expected[:, 2], atol=1e-6, rtol=0)


def _reference_blobness(image: np.ndarray, sigmas: tuple[float, ...]) -> np.ndarray:
    """The docstring's definition, in float64 with scipy and numpy."""
    out = np.zeros_like(image, dtype=np.float64)
    for sigma in sigmas:
        h = {}
        for i in range(3):
            for j in range(i, 3):
                order = [0, 0, 0]
                order[i] += 1
                order[j] += 1
                h[i, j] = h[j, i] = (
                    ndimage.gaussian_filter(image, sigma, order=order, mode="nearest") * sigma**2
                )
        eig = np.linalg.eigvalsh(np.stack([np.stack([h[i, j] for j in range(3)], -1) for i in range(3)], -2))
        ratio = np.where(eig[..., 2] < 0, eig[..., 2] / np.minimum(eig[..., 0], -1e-12), 0.0)
        out = np.maximum(out, ratio * np.clip(-eig[..., 0] / 0.15, 0.0, 1.0))
    return out


def test_blobness_is_its_definition_in_float32_also_under_autocast():
    prior = HessianBlobness(SIGMAS)
    noise = torch.rand(48, 48, 48, generator=torch.Generator().manual_seed(2))
    x = torch.stack([_ball(5.0) + 0.1 * noise, _tube(4.0)])[None]  # (1, 2, ...): each channel on its own
    expected = np.stack([_reference_blobness(c.double().numpy(), SIGMAS) for c in x[0]])[None]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the bundle trains on CPUs with bf16
        out = prior(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-4)


def test_the_unet_reads_the_prior_beside_the_image():
    torch.manual_seed(0)
    net = Dino3DRA(use_dino=False, channels=(8, 16, 32, 64), shape_prior_sigmas=SIGMAS).eval()
    plain = Dino3DRA(use_dino=False, channels=(8, 16, 32, 64))
    assert net.conv_0.conv_0.conv.in_channels == 2
    assert (
        count_parameters(net)["total"] - count_parameters(plain)["total"] == 8 * 27
    )  # one more input channel
    x = _ball(6.0)[None, None] * 0.8 + 0.1 * torch.rand(1, 1, 48, 48, 48)
    logits = net(x)
    blobness = net.shape_prior(x)
    with torch.no_grad():  # zeroing the prior's input weights must change the output: the channel is read
        net.conv_0.conv_0.conv.weight[:, 1] = 0
    assert blobness.max() > 0.5
    assert not torch.allclose(net(x), logits)


def test_a_checkpoint_loads_only_with_its_own_scales(tmp_path):
    trained = Dino3DRA(use_dino=False, channels=(8, 16, 32, 64), shape_prior_sigmas=SIGMAS)
    path = tmp_path / "model.pt"
    torch.save(trained.state_dict(), path)
    load_network_weights(
        Dino3DRA(use_dino=False, channels=(8, 16, 32, 64), shape_prior_sigmas=list(SIGMAS)), path
    )
    with pytest.raises(ValueError, match=r"model.pt.*sigmas \(1.5, 2.0, 3.0\).*\(2.0,\)"):
        load_network_weights(
            Dino3DRA(use_dino=False, channels=(8, 16, 32, 64), shape_prior_sigmas=[2.0]), path
        )
    with pytest.raises(ValueError, match=r"(?s)model.pt does not fit.*shape_prior"):
        load_network_weights(Dino3DRA(use_dino=False, channels=(8, 16, 32, 64)), path)


def test_per_scale_blobness_gives_each_scale_its_own_channel_and_their_maximum_is_the_default():
    sigmas = (1.5, 3.0, 6.5)
    image = torch.stack([_ball(2.0), 0.7 * _ball(8.0)])[None]  # (1, 2, 48, 48, 48): two input channels
    per_scale = HessianBlobness(sigmas, per_scale=True)(image)
    assert per_scale.shape == (1, 2 * len(sigmas), 48, 48, 48)
    for c in range(2):
        for s, sigma in enumerate(sigmas):
            torch.testing.assert_close(
                per_scale[:, c * len(sigmas) + s], HessianBlobness([sigma])(image)[:, c], atol=1e-6, rtol=0.0
            )
        channels = per_scale[:, c * len(sigmas) : (c + 1) * len(sigmas)]
        torch.testing.assert_close(
            channels.amax(1), HessianBlobness(sigmas)(image)[:, c], atol=1e-6, rtol=0.0
        )
    # the maximum calls both centres a blob; the scales tell the 1.6 mm ball from the 6.4 mm one
    small, large = per_scale[0, :3, 24, 24, 24], per_scale[0, 3:, 24, 24, 24]
    assert small[0] > 0.9 and small[2] < 0.1
    assert large[0] < 0.1 and large[2] > 0.9


def test_the_unet_reads_one_channel_per_scale_and_loads_only_the_same_layout(tmp_path):
    net = Dino3DRA(
        use_dino=False, channels=(8, 16, 32, 64), shape_prior_sigmas=SIGMAS, shape_prior_per_scale=True
    )
    assert net.conv_0.conv_0.conv.in_channels == 1 + len(SIGMAS)
    x = _ball(6.0)[None, None] * 0.8 + 0.1 * torch.rand(1, 1, 48, 48, 48)
    net.eval()
    logits = net(x)
    with torch.no_grad():  # the last scale's channel is read: zeroing its weights changes the output
        net.conv_0.conv_0.conv.weight[:, len(SIGMAS)] = 0
    assert not torch.allclose(net(x), logits)
    path = tmp_path / "model.pt"
    torch.save(net.state_dict(), path)
    maximum = Dino3DRA(use_dino=False, channels=(8, 16, 32, 64), shape_prior_sigmas=SIGMAS)
    with pytest.raises(ValueError, match=r"model.pt.*per_scale True.*shape_prior_per_scale to True"):
        load_network_weights(maximum, path)
    # a checkpoint of 0.9.0, which recorded only the scales, loads as the maximum and is refused per scale
    old = maximum.state_dict()
    old["shape_prior._extra_state"] = {"sigmas": list(SIGMAS)}
    torch.save(old, path)
    load_network_weights(Dino3DRA(use_dino=False, channels=(8, 16, 32, 64), shape_prior_sigmas=SIGMAS), path)
    with pytest.raises(ValueError, match=r"model.pt.*per_scale False"):
        load_network_weights(net, path)


@pytest.mark.parametrize("per_scale", ["False", "false", 1, None])
def test_per_scale_takes_only_a_real_bool(per_scale):
    with pytest.raises(ValueError, match=r"shape_prior_per_scale must be True or False"):
        Dino3DRA(use_dino=False, shape_prior_sigmas=SIGMAS, shape_prior_per_scale=per_scale)


@pytest.mark.parametrize("sigmas", [True, "1.5", [], [0.0], [-1.0, 2.0], [float("nan")]])
def test_bad_scales_are_refused(sigmas):
    with pytest.raises(ValueError, match="sigmas"):
        Dino3DRA(use_dino=False, shape_prior_sigmas=sigmas)


def _shell(radius: float, distance: torch.Tensor) -> torch.Tensor:
    return (distance - radius).abs() < 0.6


def test_convexity_is_the_inverse_radius_on_a_dome_zero_on_a_tube_and_negative_in_a_hollow():
    sigma = 1.5
    convexity = SurfaceConvexity(sigma)
    d, h, w = _grid()
    to_centre = (d**2 + h**2 + w**2).sqrt()
    for radius in (6.0, 10.0):  # sigma * kappa = sigma / radius, mapped to 1 at CONVEXITY_SCALE
        expected = sigma / radius / CONVEXITY_SCALE
        dome = convexity(_ball(radius)[None, None])[0, 0][_shell(radius, to_centre)].median()
        hollow = convexity((1 - _ball(radius))[None, None])[0, 0][_shell(radius, to_centre)].median()
        assert dome == pytest.approx(expected, rel=0.15), radius
        assert hollow == pytest.approx(-expected, rel=0.15), radius
    for axis in range(3):  # straight along its axis: the smaller curvature of a tube's wall is 0
        off_axis = [c for i, c in enumerate((d, h, w)) if i != axis]
        wall = _shell(6.0, (off_axis[0] ** 2 + off_axis[1] ** 2).sqrt())
        assert convexity(_tube(6.0, axis)[None, None])[0, 0][wall].abs().max() < 0.05, axis
    assert convexity(_ball(6.0)[None, None])[0, 0][to_centre > 14].abs().max() < 0.01  # no edge, no surface


def test_convexity_fades_with_the_edge_and_keeps_the_inputs_shape_and_dtype():
    convexity = SurfaceConvexity(1.5)
    ball = _ball(6.0)[None, None]
    shell = _shell(6.0, torch.stack(_grid()).pow(2).sum(0).sqrt())
    sharp, faint = (convexity(level * ball)[0, 0][shell].median() for level in (1.0, 0.05))
    assert 0.1 < faint / sharp < 0.4  # an edge of 5 % of the lumen level: weight about 0.2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = convexity(ball.repeat(2, 2, 1, 1, 1).bfloat16())
    assert out.shape == (2, 2, 48, 48, 48) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out[1, 1].float(), convexity(ball)[0, 0], atol=0.01, rtol=0.0)


def test_the_unet_reads_the_convexity_beside_the_image_and_the_blobness():
    net = Dino3DRA(
        use_dino=False, channels=(8, 16, 32, 64), shape_prior_sigmas=SIGMAS, shape_prior_convexity_sigma=1.5
    )
    only = Dino3DRA(use_dino=False, channels=(8, 16, 32, 64), shape_prior_convexity_sigma=1.5)
    assert net.conv_0.conv_0.conv.in_channels == 3 and only.conv_0.conv_0.conv.in_channels == 2
    x = _ball(6.0)[None, None] * 0.8 + 0.1 * torch.rand(1, 1, 48, 48, 48)
    net.eval()
    logits = net(x)
    with torch.no_grad():  # the third input channel is the convexity: zeroing its weights changes the output
        net.conv_0.conv_0.conv.weight[:, 2] = 0
    assert not torch.allclose(net(x), logits)


def test_a_checkpoint_loads_only_with_its_own_convexity_scale(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(
        Dino3DRA(use_dino=False, channels=(8, 16, 32, 64), shape_prior_convexity_sigma=1.5).state_dict(), path
    )
    load_network_weights(
        Dino3DRA(use_dino=False, channels=(8, 16, 32, 64), shape_prior_convexity_sigma=1.5), path
    )
    with pytest.raises(ValueError, match=r"model.pt.*sigma 1.5.*2.0"):
        load_network_weights(
            Dino3DRA(use_dino=False, channels=(8, 16, 32, 64), shape_prior_convexity_sigma=2), path
        )
    with pytest.raises(ValueError, match=r"(?s)model.pt does not fit.*convexity"):
        load_network_weights(Dino3DRA(use_dino=False, channels=(8, 16, 32, 64)), path)


@pytest.mark.parametrize("sigma", [True, "1.5", [1.5], 0.0, -1.0, float("nan")])
def test_bad_convexity_scales_are_refused(sigma):
    with pytest.raises(ValueError, match="shape_prior_convexity_sigma"):
        Dino3DRA(use_dino=False, shape_prior_convexity_sigma=sigma)
