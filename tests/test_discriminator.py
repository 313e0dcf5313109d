"""Tests for the 3D PatchGAN discriminator and the adversarial loss helpers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vdm.models.discriminator import (
    PatchDiscriminator3d,
    adaptive_generator_weight,
    disc_factor,
    hinge_d_loss,
    hinge_g_loss,
    vanilla_d_loss,
)

TINY = dict(base_channels=8, num_layers=2, norm_groups=4)


def video(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen) * 2 - 1


def smooth_videos(batch: int, seed: int, frames: int = 5, size: int = 24) -> torch.Tensor:
    """Slowly drifting sinusoidal gratings in [-1, 1], (B, 3, T, size, size)."""
    gen = torch.Generator().manual_seed(seed)
    freq = 1.0 + 2.0 * torch.rand(batch, 3, 1, 1, 1, generator=gen)
    phase = 6.28 * torch.rand(batch, 3, 1, 1, 1, generator=gen)
    t = torch.arange(frames).view(1, 1, frames, 1, 1) * 0.2
    y = torch.linspace(0, 6.28, size).view(1, 1, 1, size, 1)
    x = torch.linspace(0, 6.28, size).view(1, 1, 1, 1, size)
    return torch.sin(freq * (x + 0.5 * y) + phase + t)


# --- shapes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, shape, expected",
    [
        (TINY, (2, 3, 9, 32, 32), (2, 1, 5, 6, 6)),  # (False, True): 9 -> 9 -> 5; 32 -> 16 -> 8 -> 7 -> 6
        (dict(TINY, temporal_downsample=(True, True)), (1, 3, 9, 32, 32), (1, 1, 3, 6, 6)),
        (dict(TINY, temporal_downsample=(False, False)), (1, 3, 8, 24, 40), (1, 1, 8, 4, 8)),
        (dict(base_channels=8, num_layers=3, norm_groups=8), (1, 3, 5, 32, 32), (1, 1, 2, 2, 2)),
        (dict(TINY, norm="batch"), (2, 3, 5, 16, 16), (2, 1, 3, 2, 2)),
        (dict(TINY, norm="none", temporal_kernel_size=1), (2, 3, 5, 16, 16), (2, 1, 3, 2, 2)),
    ],
)
def test_video_logits_shape(config: dict, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    disc = PatchDiscriminator3d(**config)
    logits = disc(video(shape, 0))
    assert logits.shape == expected
    assert disc.logits_shape(*shape[2:]) == expected[2:]


def test_images_are_one_frame_videos() -> None:
    torch.manual_seed(0)
    disc = PatchDiscriminator3d(**TINY).eval()
    image = video((2, 3, 32, 32), 1)
    logits_image = disc(image)
    logits_video = disc(image.unsqueeze(2))
    assert logits_image.shape == (2, 1, 6, 6) and logits_video.shape == (2, 1, 1, 6, 6)
    torch.testing.assert_close(logits_image, logits_video[:, :, 0])
    # replicate padding + per-frame norms: every frame of a static clip scores like the image
    static = disc(image.unsqueeze(2).expand(-1, -1, 3, -1, -1).contiguous())
    assert static.shape == (2, 1, 2, 6, 6)
    torch.testing.assert_close(static, logits_video.expand_as(static))


def test_input_and_config_errors() -> None:
    disc = PatchDiscriminator3d(**TINY)
    with pytest.raises(ValueError, match=r"H and W must be >= 12"):
        disc(video((1, 3, 5, 8, 8), 0))
    with pytest.raises(ValueError, match=r"expects \(B, 3, T, H, W\)"):
        disc(video((1, 4, 5, 16, 16), 0))
    with pytest.raises(ValueError, match="norm must be one of"):
        PatchDiscriminator3d(norm="layer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="norm_groups=32 must divide"):
        PatchDiscriminator3d(base_channels=8)
    with pytest.raises(ValueError, match="one flag per strided layer"):
        PatchDiscriminator3d(**TINY, temporal_downsample=(True,))
    with pytest.raises(ValueError, match="temporal_kernel_size must be odd"):
        PatchDiscriminator3d(**TINY, temporal_kernel_size=4)


# --- init, checkpoints -------------------------------------------------------------------------


def test_init_statistics() -> None:
    torch.manual_seed(0)
    disc = PatchDiscriminator3d()  # default widths: enough weights for tight statistics
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv3d)]
    assert len(convs) == 5
    for conv in convs:
        if conv.weight.numel() > 10_000:
            assert abs(conv.weight.std().item() - 0.02) < 0.002 and abs(conv.weight.mean().item()) < 0.002
        if conv.bias is not None:
            assert torch.equal(conv.bias, torch.zeros_like(conv.bias))
    norms = [m for m in disc.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 3
    for norm in norms:
        assert abs(norm.weight.mean().item() - 1.0) < 0.01
        assert torch.equal(norm.bias, torch.zeros_like(norm.bias))
    # the first block is un-normalised and keeps its bias; normalised blocks drop it
    assert disc.blocks[0].conv.bias is not None and disc.blocks[1].conv.bias is None


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_state_dict_round_trip(fmt: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    disc = PatchDiscriminator3d(**TINY, norm="batch")
    disc(video((2, 3, 5, 16, 16), 0))  # move the running statistics away from their init
    disc.eval()
    path = tmp_path / f"disc.{fmt}"
    state = {k: v.contiguous() for k, v in disc.state_dict().items()}
    if fmt == "pt":
        torch.save(state, path)
        loaded_state = torch.load(path, weights_only=True)
    else:
        save_file(state, str(path))
        loaded_state = load_file(str(path))
    torch.manual_seed(1)
    other = PatchDiscriminator3d(**TINY, norm="batch").eval()
    other.load_state_dict(loaded_state, strict=True)
    x = video((1, 3, 5, 16, 16), 2)
    assert torch.equal(disc(x), other(x))


def test_discriminator_learns_real_from_noise() -> None:
    torch.manual_seed(0)
    disc = PatchDiscriminator3d(**TINY)
    optimizer = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.9))
    real, fake = smooth_videos(4, seed=0), video((4, 3, 5, 24, 24), 1)
    losses = []
    for _ in range(8):
        loss = hinge_d_loss(disc(real), disc(fake))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = hinge_d_loss(disc(real), disc(fake)).item()
    assert final < losses[0] - 0.1, losses


# --- losses ------------------------------------------------------------------------------------


def test_hinge_losses_exact() -> None:
    real = torch.tensor([2.0, 0.5, -1.0, 1.0])  # relu(1 - r) = 0, 0.5, 2, 0 -> mean 0.625
    fake = torch.tensor([-2.0, 0.0, 0.5, -0.5])  # relu(1 + f) = 0, 1, 1.5, 0.5 -> mean 0.75
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.625 + 0.75))
    assert hinge_g_loss(fake).item() == pytest.approx(0.5)
    assert hinge_d_loss(torch.full((3,), 5.0), torch.full((3,), -5.0)).item() == 0.0
    # bf16 logits are reduced in float32
    assert hinge_g_loss(fake.bfloat16()).dtype == torch.float32


def test_vanilla_d_loss_exact() -> None:
    zeros = torch.zeros(2, 1, 1, 2, 2)
    assert vanilla_d_loss(zeros, zeros).item() == pytest.approx(math.log(2.0))
    real, fake = torch.tensor([1.0]), torch.tensor([-2.0])
    expected = 0.5 * (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(-2.0)))
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected)


def test_adaptive_generator_weight_hand_computed() -> None:
    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0]]))
    x = torch.tensor([3.0, 4.0])  # |x| = 5
    y = layer(x)  # 1*3 + 2*4 = 11
    rec = (y - 1.0).square().sum()  # d/dW = 2 (y - 1) x = 20 x -> norm 100
    g = -3.0 * y.sum()  # d/dW = -3 x -> norm 15
    weight = adaptive_generator_weight(rec, g, layer.weight)
    assert weight.item() == pytest.approx(100.0 / (15.0 + 1e-4))
    assert weight.ndim == 0 and not weight.requires_grad and weight.grad_fn is None
    (rec + weight * g).backward()  # graph retained
    torch.testing.assert_close(layer.weight.grad, (20.0 - 3.0 * weight) * x.view(1, 2))
    # the clamp: vanishing GAN gradient
    y = layer(x)
    rec, g = (y - 1.0).square().sum(), 0.0 * y.sum()
    capped = adaptive_generator_weight(rec, g, layer.weight, max_weight=50.0)
    assert capped.item() == 50.0


def test_adaptive_generator_weight_errors() -> None:
    layer, other = nn.Linear(2, 1), nn.Linear(2, 1)
    y = layer(torch.ones(2)).sum()
    with pytest.raises(ValueError, match="does not depend on last_layer"):
        adaptive_generator_weight(y, y, other.weight)
    with torch.no_grad():
        z = layer(torch.ones(2)).sum()
    with pytest.raises(ValueError, match="no autograd graph"):
        adaptive_generator_weight(z, z, layer.weight)


def test_disc_factor() -> None:
    assert [disc_factor(s, 3) for s in range(5)] == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert disc_factor(0, 0) == 1.0
    with pytest.raises(ValueError, match="start_step"):
        disc_factor(0, -1)
