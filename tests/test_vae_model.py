"""Tests for the causal 3D video VAE: shapes, causality, checkpoints, determinism, init, training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vdm.models.layers import CausalConv3d, ChannelRMSNorm, Downsample3d, Upsample3d
from vdm.models.vae import LOGVAR_INIT, DiagonalGaussian, VideoVAE

TINY = dict(
    base_channels=16, channel_mults=(1, 2), num_res_blocks=1, temporal_downsample=(True,), latent_channels=4
)
# 4x temporal, 4x spatial: the smallest config with the production temporal compression
TINY_TC4 = dict(
    base_channels=8,
    channel_mults=(1, 1, 2),
    num_res_blocks=1,
    temporal_downsample=(True, True),
    norm_groups=4,
)
# 2x2 pixel patches folded into channels: sc = 2 * 4 = 8
TINY_PATCH = {**TINY_TC4, "patch_size": 2}
# parameter-free pooling / repetition shortcuts around every resampling and the latent
TINY_SHORTCUT = {**TINY_PATCH, "shortcuts": True}
# the tiny preset's choices: no normalisation layers at all
TINY_NORM_FREE = {**TINY_SHORTCUT, "norm": "none"}


def make_vae(config: dict, seed: int = 0, randomize: bool = False) -> VideoVAE:
    """Build a VAE in eval mode; ``randomize`` perturbs every weight so zero-init branches are live."""
    torch.manual_seed(seed)
    vae = VideoVAE(**config).eval()
    if randomize:
        with torch.no_grad():
            for p in vae.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return vae


def video(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen) * 2 - 1


def perturb_frame(x: torch.Tensor, frame: int) -> torch.Tensor:
    out = x.clone()
    out[:, :, frame] += 0.5
    return out


# --- CausalConv3d ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kernel, stride, dilation",
    [(3, 1, 1), ((3, 1, 1), 1, 1), ((5, 3, 3), 1, (2, 1, 1)), (3, (2, 2, 2), 1), ((4, 3, 3), 1, 1)],
)
def test_causal_conv3d_shape_and_causality(kernel, stride, dilation) -> None:
    torch.manual_seed(0)
    conv = CausalConv3d(4, 6, kernel, stride=stride, dilation=dilation)
    stride_t, stride_s = (stride, stride) if isinstance(stride, int) else (stride[0], stride[1])
    x = video((2, 4, 9, 8, 8))
    y = conv(x)
    assert y.shape == (2, 6, 1 + 8 // stride_t, 8 // stride_s, 8 // stride_s)
    for j in range(1, 9):
        y2 = conv(perturb_frame(x, j))
        first_affected = math.ceil(j / stride_t)  # output i reads inputs <= stride_t * i
        assert torch.equal(y2[:, :, :first_affected], y[:, :, :first_affected])
        if first_affected < y.shape[2]:
            assert not torch.allclose(y2[:, :, first_affected], y[:, :, first_affected])


def test_causal_conv3d_replicates_first_frame() -> None:
    torch.manual_seed(0)
    conv = CausalConv3d(2, 3, 3)
    image = video((1, 2, 1, 6, 6))
    static_clip = image.expand(-1, -1, 3, -1, -1)
    # an image is seen as a static clip, so its output equals every frame of the static clip's output
    out_image, out_clip = conv(image), conv(static_clip)
    for t in range(3):
        torch.testing.assert_close(out_clip[:, :, t : t + 1], out_image)


def test_causal_conv3d_rejects_even_spatial_kernel() -> None:
    with pytest.raises(ValueError, match="spatial kernel sizes must be odd"):
        CausalConv3d(2, 2, (3, 2, 2))
    with pytest.raises(ValueError, match=r"\(t, h, w\) triple"):
        CausalConv3d(2, 2, (3, 3))


# --- normalisation ----------------------------------------------------------------------------


def test_channel_rms_norm_is_per_position() -> None:
    norm = ChannelRMSNorm(6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 6))
        norm.bias.copy_(torch.linspace(-1.0, 1.0, 6))
    x = torch.randn(2, 6, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 5 + 3
    out = norm(x)
    # each (b, t, h, w) position is x / rms over channels, then the affine map
    rms = x.pow(2).mean(dim=1, keepdim=True).sqrt()
    expected = x / rms * norm.weight.view(1, -1, 1, 1, 1) + norm.bias.view(1, -1, 1, 1, 1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # no statistics across space or time: a crop normalises exactly like inside the whole tensor
    assert torch.equal(norm(x[:, :, 1:, 2:6, 3:7]), out[:, :, 1:, 2:6, 3:7])
    # a flat frame keeps its level (GroupNorm per frame would map every flat frame to its bias)
    flat = torch.full((1, 6, 1, 4, 4), 0.7)
    flat[:, :3] = -0.2
    assert not torch.allclose(norm(flat), norm(-flat))
    assert norm(x.bfloat16()).dtype == torch.bfloat16


# --- shapes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, frames, size",
    [(TINY, 1, 32), (TINY, 3, 16), (TINY, 9, 32), (TINY_TC4, 1, 16), (TINY_TC4, 5, 16), (TINY_TC4, 9, 8),
     (TINY_PATCH, 1, 16), (TINY_PATCH, 5, 32)],
)
def test_shapes(config: dict, frames: int, size: int) -> None:
    vae = make_vae(config)
    sc, tc = vae.spatial_compression, vae.temporal_compression
    x = video((2, 3, frames, size, size))
    x_hat, posterior = vae(x)
    expected_latent = (2, vae.latent_channels, 1 + (frames - 1) // tc, size // sc, size // sc)
    assert posterior.mean.shape == expected_latent
    assert vae.latent_shape(x.shape) == expected_latent
    assert vae.latent_shape(x.shape[1:]) == expected_latent[1:]
    assert x_hat.shape == x.shape
    assert vae.decode(posterior.mode()).shape == x.shape


def test_patch_size_folds_pixels_into_channels() -> None:
    vae = make_vae(TINY_PATCH)
    assert vae.spatial_compression == 2 * make_vae(TINY_TC4).spatial_compression
    assert vae.encoder.conv_in.in_channels == 3 * 4 and vae.decoder.conv_out.out_channels == 3 * 4
    # each output pixel of a patch comes from its own channel of the last conv
    x_hat = vae.decode(torch.zeros(1, vae.latent_channels, 2, 2, 2))
    with torch.no_grad():
        vae.decoder.conv_out.bias[3 * 4 - 1] += 1.0  # channel (c=2, ph=1, pw=1)
    shifted = vae.decode(torch.zeros(1, vae.latent_channels, 2, 2, 2)) - x_hat
    assert torch.allclose(shifted[:, 2, :, 1::2, 1::2], torch.ones(()))
    shifted[:, 2, :, 1::2, 1::2] = 0
    assert shifted.abs().max() == 0


def test_default_config() -> None:
    vae = VideoVAE()
    assert (vae.spatial_compression, vae.temporal_compression) == (8, 4)
    assert vae.latent_shape((1, 3, 17, 256, 256)) == (1, 4, 5, 32, 32)
    assert vae.last_decoder_layer is vae.decoder.conv_out.weight
    assert vae.last_decoder_layer.shape[:2] == (3, 64)


@pytest.mark.parametrize("config", [TINY_TC4, TINY_SHORTCUT], ids=["plain", "shortcuts"])
def test_image_encodes_like_first_frame_of_clip(config: dict) -> None:
    vae = make_vae(config, randomize=True)
    clip = video((1, 3, 9, 16, 16))
    with torch.no_grad():
        z_clip = vae.encode(clip).mode()
        z_image = vae.encode(clip[:, :, :1]).mode()
        torch.testing.assert_close(z_image, z_clip[:, :, :1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vae.decode(z_image), vae.decode(z_clip)[:, :, :1], rtol=1e-5, atol=1e-5)


# --- causality (weights perturbed so zero-init residual branches contribute) -------------------


TINY_TC4_GROUP = {**TINY_TC4, "norm": "group"}
CAUSAL_CONFIGS = [TINY, TINY_TC4, TINY_TC4_GROUP, TINY_PATCH, TINY_SHORTCUT, TINY_NORM_FREE]


@pytest.mark.parametrize("config", CAUSAL_CONFIGS)
def test_encoder_causality(config: dict) -> None:
    vae = make_vae(config, randomize=True)
    tc = vae.temporal_compression
    x = video((1, 3, 1 + 2 * tc, 16, 16))
    with torch.no_grad():
        z = vae.encode(x).mode()
        for j in range(1, x.shape[2]):
            z2 = vae.encode(perturb_frame(x, j)).mode()
            first_affected = math.ceil(j / tc)  # latent i depends on input frames <= tc * i
            assert torch.equal(z2[:, :, :first_affected], z[:, :, :first_affected]), j
            assert not torch.allclose(z2[:, :, first_affected], z[:, :, first_affected]), j


@pytest.mark.parametrize("config", CAUSAL_CONFIGS)
def test_decoder_causality(config: dict) -> None:
    vae = make_vae(config, randomize=True)
    tc = vae.temporal_compression
    z = torch.randn(1, vae.latent_channels, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        x_hat = vae.decode(z)
        for i in range(1, z.shape[2]):
            x_hat2 = vae.decode(perturb_frame(z, i))
            first_affected = 1 + tc * (i - 1)  # frames 1 + tc*(i-1) .. tc*i come from latent i
            assert torch.equal(x_hat2[:, :, :first_affected], x_hat[:, :, :first_affected]), i
            assert not torch.allclose(x_hat2[:, :, first_affected], x_hat[:, :, first_affected]), i


@pytest.mark.parametrize("config", [TINY_TC4, TINY_SHORTCUT], ids=["plain", "shortcuts"])
def test_full_model_causality(config: dict) -> None:
    vae = make_vae(config, randomize=True)
    x = video((1, 3, 9, 16, 16))
    with torch.no_grad():
        x_hat, _ = vae(x, sample_posterior=False)
        for j in range(1, 9):
            x_hat2, _ = vae(perturb_frame(x, j), sample_posterior=False)
            # frames of latents before the one that covers input frame j are untouched
            unchanged = 1 + 4 * (math.ceil(j / 4) - 1)
            assert torch.equal(x_hat2[:, :, :unchanged], x_hat[:, :, :unchanged]), j
            assert not torch.allclose(x_hat2[:, :, unchanged:], x_hat[:, :, unchanged:]), j


# --- checkpoints, determinism, gradient checkpointing -------------------------------------------


def test_state_dict_round_trip(tmp_path) -> None:
    vae = make_vae(TINY, randomize=True)
    path = tmp_path / "vae.pt"
    torch.save(vae.state_dict(), path)
    restored = make_vae(TINY, seed=123)
    restored.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = video((2, 3, 5, 16, 16))
    with torch.no_grad():
        assert torch.equal(restored(x, sample_posterior=False)[0], vae(x, sample_posterior=False)[0])


def test_determinism_with_seeded_generator() -> None:
    vae = make_vae(TINY)
    x = video((2, 3, 5, 16, 16))
    with torch.no_grad():
        a, post_a = vae(x, generator=torch.Generator().manual_seed(7))
        b, post_b = vae(x, generator=torch.Generator().manual_seed(7))
        c, _ = vae(x, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    sample_a = post_a.sample(torch.Generator().manual_seed(3))
    assert torch.equal(sample_a, post_b.sample(torch.Generator().manual_seed(3)))
    assert not torch.allclose(a, c)
    assert torch.equal(make_vae(TINY).state_dict()["decoder.conv_out.weight"], vae.last_decoder_layer)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_equivalence(dropout: float) -> None:
    x = video((2, 3, 5, 16, 16))
    results = []
    for enabled in (False, True):
        vae = make_vae({**TINY, "dropout": dropout}, randomize=True).train()
        vae.gradient_checkpointing = enabled
        torch.manual_seed(5)
        x_hat, posterior = vae(x, generator=torch.Generator().manual_seed(4))
        loss = (x_hat - x).abs().mean() + posterior.kl().mean() * 1e-3
        loss.backward()
        results.append((x_hat.detach(), {n: p.grad.clone() for n, p in vae.named_parameters()}))
    (out_plain, grads_plain), (out_ckpt, grads_ckpt) = results
    torch.testing.assert_close(out_ckpt, out_plain)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, msg=name)
    assert VideoVAE(**TINY, gradient_checkpointing=True).decoder.blocks[0].gradient_checkpointing


def test_residual_blocks_start_as_identity() -> None:
    vae = make_vae(TINY)
    for module in vae.modules():
        if hasattr(module, "conv2"):
            assert module.conv2.weight.abs().sum() == 0


def test_shortcuts_are_causal_pooling_and_repetition() -> None:
    """With their convs zeroed, the resamplers are exactly the parameter-free shortcuts."""
    down, up = Downsample3d(2, temporal=True, shortcut=True), Upsample3d(2, temporal=True, shortcut=True)
    for module in (down.conv, up.conv):
        nn.init.zeros_(module.weight)
        nn.init.zeros_(module.bias)
    x = video((1, 2, 5, 4, 4))
    pooled = down(x)
    assert pooled.shape == (1, 2, 3, 2, 2)
    torch.testing.assert_close(pooled[:, :, 0], F.avg_pool2d(x[:, :, 0], 2))  # frame 0 on its own
    torch.testing.assert_close(pooled[:, :, 2], F.avg_pool2d(x[:, :, 3:5].mean(2), 2))  # frames 3, 4
    upsampled = up(pooled)
    assert upsampled.shape == (1, 2, 5, 4, 4)
    torch.testing.assert_close(upsampled[:, :, 3], upsampled[:, :, 4])  # later frames repeated twice
    repeated = pooled[:, :, 0].repeat_interleave(2, -1).repeat_interleave(2, -2)
    torch.testing.assert_close(upsampled[:, :, 0], repeated)


def test_shortcuts_add_group_means_to_the_latent() -> None:
    vae = make_vae(TINY_SHORTCUT, randomize=True)
    x = video((1, 3, 5, 16, 16))
    with torch.no_grad():
        plain = vae.encoder.shortcuts
        vae.encoder.shortcuts = False
        without = vae.encode(x)
        vae.encoder.shortcuts = plain
        with_shortcut = vae.encode(x)
    torch.testing.assert_close(with_shortcut.logvar, without.logvar)
    assert not torch.allclose(with_shortcut.mean, without.mean)


def test_posterior_starts_nearly_deterministic() -> None:
    vae = make_vae(TINY_TC4)
    bias = vae.encoder.conv_out.bias
    assert torch.all(bias[vae.latent_channels :] == LOGVAR_INIT)
    assert torch.all(bias[: vae.latent_channels] == 0)
    with torch.no_grad():
        logvar = vae.encode(video((2, 3, 5, 16, 16))).logvar
    assert abs(float(logvar.mean()) - LOGVAR_INIT) < 1.0


# --- posterior ---------------------------------------------------------------------------------


def test_diagonal_gaussian() -> None:
    mean = torch.zeros(2, 4, 1, 2, 2)
    standard = DiagonalGaussian(mean, torch.zeros_like(mean))
    torch.testing.assert_close(standard.kl(), torch.zeros(2))
    shifted = DiagonalGaussian(mean + 1.0, torch.zeros_like(mean))
    torch.testing.assert_close(shifted.kl(), torch.full((2,), 0.5 * 16))  # 0.5 * mu^2 per element
    torch.testing.assert_close(shifted.kl("mean"), torch.full((2,), 0.5))
    clamped = DiagonalGaussian(mean, torch.full_like(mean, -100.0))
    assert clamped.logvar.min() == -30.0 and clamped.std.min() > 0
    assert torch.equal(clamped.mode(), mean)
    with pytest.raises(ValueError, match="reduction must be"):
        standard.kl("max")  # type: ignore[arg-type]


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"temporal_downsample": (True, True)}, r"len\(temporal_downsample\) must equal .* - 1 = 1"),
        ({"base_channels": 24, "norm_groups": 16, "norm": "group"},
         r"divisible by norm_groups \(16\).*e\.g\. 8"),
        ({"patch_size": 0}, r"patch_size must be >= 1"),
        ({"norm": "batch"}, r"norm must be 'rms' .*, 'group' .* or 'none', got 'batch'"),
        ({"channel_mults": ()}, "channel_mults must be a non-empty"),
        ({"num_res_blocks": 0}, "num_res_blocks must be >= 1"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"latent_channels": 0}, "must be >= 1"),
        ({"shortcuts": True, "latent_channels": 3},
         r"latent_channels \(3\) must divide 32; pick one of \[1, 2, 4"),
    ],
)
def test_constructor_errors(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        VideoVAE(**{**TINY, **overrides})


def test_input_shape_errors() -> None:
    vae = make_vae(TINY_TC4)
    with pytest.raises(ValueError, match=r"T = 1 \+ 4\*k.*got T=8, use T=5 or T=9"):
        vae.encode(video((1, 3, 8, 16, 16)))
    with pytest.raises(ValueError, match=r"W must be a positive multiple of spatial_compression=4.*W=12"):
        vae.encode(video((1, 3, 5, 16, 10)))
    with pytest.raises(ValueError, match="expected 3 video channels"):
        vae.encode(video((1, 1, 5, 16, 16)))
    with pytest.raises(ValueError, match=r"decode expects latents \(B, 4, Tz, h, w\)"):
        vae.decode(torch.zeros(1, 3, 2, 4, 4))
    with pytest.raises(ValueError, match="T = 1 \\+ 4\\*k"):
        vae.latent_shape((3, 6, 16, 16))


# --- training ----------------------------------------------------------------------------------


def test_adam_steps_reduce_l1() -> None:
    vae = make_vae(TINY).train()
    x = video((2, 3, 5, 16, 16))
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    losses = []
    for step in range(8):
        x_hat, posterior = vae(x, generator=torch.Generator().manual_seed(step))
        l1 = (x_hat - x).abs().mean()
        loss = l1 + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(l1.item())
    assert losses[-1] < 0.8 * losses[0], losses
