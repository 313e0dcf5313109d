"""3D PatchGAN discriminator and the adversarial loss terms of the stage-1 video VAE.

The discriminator is the pix2pix / taming-transformers ``NLayerDiscriminator`` lifted to video:
4x4 spatial kernels with stride 2 in the first ``num_layers`` convolutions, then two stride-1
convolutions, LeakyReLU(0.2) and N(0, 0.02) init. Time uses 3-tap kernels with replicate padding
(non-causal, which a discriminator does not need), so an image is scored as a static clip.

The loss helpers are pure functions of logits and losses (taming's VQGAN recipe): hinge or
vanilla discriminator losses, ``-mean(logits)`` generator loss, the adaptive generator weight
||grad rec|| / ||grad gan|| at the decoder's last layer, and a warm-up switch ``disc_factor``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vdm.models.layers import CausalGroupNorm

NormKind = Literal["group", "batch", "none"]
NORM_KINDS: tuple[str, ...] = ("group", "batch", "none")
SPATIAL_KERNEL = 4
SPATIAL_PADDING = 1
LEAKY_SLOPE = 0.2
INIT_STD = 0.02


class PatchConv3d(nn.Conv3d):
    """Conv3d, kernel (k_t, 4, 4): zero padding 1 in space, replicate padding (k_t - 1) / 2 in time.

    Replicate (not zero) temporal padding makes a 1-frame input a static clip, so images need no
    special path and no artificial black frame is seen at clip borders.
    Shapes: (B, C_in, T, H, W) -> (B, C_out, 1 + (T - 1) // s_t, (H - 2) // s + 1, (W - 2) // s + 1).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: tuple[int, int, int],
        temporal_kernel: int,
        bias: bool,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            (temporal_kernel, SPATIAL_KERNEL, SPATIAL_KERNEL),
            stride=stride,
            padding=(0, SPATIAL_PADDING, SPATIAL_PADDING),
            bias=bias,
        )
        self.time_padding = (temporal_kernel - 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, T, H, W) -> (B, C_out, T', H', W')."""
        if self.time_padding > 0:
            x = F.pad(x, (0, 0, 0, 0, self.time_padding, self.time_padding), mode="replicate")
        return super().forward(x)

    def output_size(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Output (T', H', W') for an input of (frames, height, width); may be <= 0 if too small."""
        sizes = (frames + 2 * self.time_padding, height + 2 * SPATIAL_PADDING, width + 2 * SPATIAL_PADDING)
        return tuple(  # type: ignore[return-value]
            (size - k) // s + 1 for size, k, s in zip(sizes, self.kernel_size, self.stride)
        )


class DiscriminatorBlock(nn.Module):
    """PatchConv3d -> optional norm -> LeakyReLU(0.2).

    Shapes: (B, C_in, T, H, W) -> (B, C_out, T', H', W').
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: tuple[int, int, int],
        temporal_kernel: int,
        norm: NormKind,
        norm_groups: int,
    ) -> None:
        super().__init__()
        # a norm's affine shift makes a conv bias redundant
        self.conv = PatchConv3d(in_channels, out_channels, stride, temporal_kernel, bias=norm == "none")
        self.norm: nn.Module
        if norm == "group":
            # per-frame statistics in float32 (shared with the VAE)
            self.norm = CausalGroupNorm(norm_groups, out_channels)
        elif norm == "batch":
            self.norm = nn.BatchNorm3d(out_channels)
        else:
            self.norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, T, H, W) -> (B, C_out, T', H', W')."""
        return F.leaky_relu(self.norm(self.conv(x)), LEAKY_SLOPE)


def _validate_config(
    in_channels: int,
    base_channels: int,
    num_layers: int,
    norm: str,
    norm_groups: int,
    temporal_downsample: tuple[bool, ...],
    temporal_kernel_size: int,
    max_channel_mult: int,
) -> None:
    """Raise ValueError with a fix-it message for any inconsistent PatchDiscriminator3d argument."""
    if in_channels < 1 or base_channels < 1:
        raise ValueError(f"in_channels and base_channels must be >= 1, got {in_channels}, {base_channels}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1 (number of stride-2 convolutions), got {num_layers}")
    if max_channel_mult < 1:
        raise ValueError(f"max_channel_mult must be >= 1, got {max_channel_mult}")
    if norm not in NORM_KINDS:
        raise ValueError(f"norm must be one of {NORM_KINDS}, got {norm!r}")
    if len(temporal_downsample) != num_layers:
        raise ValueError(
            f"temporal_downsample needs one flag per strided layer (num_layers={num_layers}), got "
            f"{len(temporal_downsample)}: {temporal_downsample}"
        )
    if temporal_kernel_size < 1 or temporal_kernel_size % 2 == 0:
        raise ValueError(
            f"temporal_kernel_size must be odd (symmetric replicate padding keeps T' = 1 + (T - 1) // s_t), "
            f"got {temporal_kernel_size}; use 1 or 3"
        )
    if norm == "group":
        normed = [base_channels * min(2**n, max_channel_mult) for n in range(1, num_layers + 1)]
        bad = [c for c in normed if norm_groups < 1 or c % norm_groups != 0]
        if bad:
            suggestion = math.gcd(*normed)
            raise ValueError(
                f"norm_groups={norm_groups} must divide every normalised width {normed} "
                f"(base_channels * min(2**n, {max_channel_mult})); use a divisor of {suggestion}"
            )


class PatchDiscriminator3d(nn.Module):
    """3D PatchGAN: per-patch real/fake logits for videos (B, C, T, H, W) or images (B, C, H, W).

    Layers: ``num_layers`` strided blocks (stride (s_t, 2, 2), s_t = 2 where ``temporal_downsample``
    is set; the first block has no norm), one stride-1 block, and a stride-1 conv to one channel.
    Widths are ``base_channels * min(2**n, max_channel_mult)``.

    Images: a 4D input is treated as a 1-frame video (replicate padding makes it a static clip) and
    the logits come back 4D, (B, 1, H', W'). Every layer maps T = 1 to T' = 1.

    Args:
        in_channels: pixel channels C.
        base_channels: width of the first conv.
        num_layers: number of stride-2 convolutions (receptive field grows with it).
        norm: "group" (per-frame GroupNorm, default), "batch" (BatchNorm3d as in taming; convert to
            SyncBatchNorm under DDP, and keep real and fake in separate forward calls or their
            statistics mix) or "none".
        norm_groups: GroupNorm groups; must divide every normalised width.
        temporal_downsample: per strided layer, whether it also halves time; default
            (False, True, ..., True) mirrors the VAE's late temporal compression.
        temporal_kernel_size: odd temporal kernel size (1 makes the discriminator per-frame 2D).
        max_channel_mult: cap on the width multiplier (8 in pix2pix).

    Shapes: (B, C, T, H, W) in [-1, 1] -> (B, 1, T', H', W') logits, see ``logits_shape``;
    H, W >= 3 * 2**num_layers.
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 64,
        num_layers: int = 3,
        norm: NormKind = "group",
        norm_groups: int = 32,
        temporal_downsample: Sequence[bool] | None = None,
        temporal_kernel_size: int = 3,
        max_channel_mult: int = 8,
    ) -> None:
        super().__init__()
        if temporal_downsample is None:
            temporal_downsample = (False,) + (True,) * (num_layers - 1)
        temporal = tuple(bool(flag) for flag in temporal_downsample)
        _validate_config(
            in_channels,
            base_channels,
            num_layers,
            norm,
            norm_groups,
            temporal,
            temporal_kernel_size,
            max_channel_mult,
        )
        self.in_channels = in_channels
        self.num_layers = num_layers
        self.temporal_downsample = temporal
        blocks: list[DiscriminatorBlock] = []
        channels = in_channels
        for n in range(num_layers + 1):
            width = base_channels * min(2**n, max_channel_mult)
            stride = (2 if temporal[n] else 1, 2, 2) if n < num_layers else (1, 1, 1)
            block_norm: NormKind = "none" if n == 0 else norm  # pix2pix: no norm on the first layer
            blocks.append(
                DiscriminatorBlock(channels, width, stride, temporal_kernel_size, block_norm, norm_groups)
            )
            channels = width
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = PatchConv3d(channels, 1, (1, 1, 1), temporal_kernel_size, bias=True)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """pix2pix / taming init: convs N(0, 0.02) with zero bias; norm scales N(1, 0.02), zero shift."""
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.normal_(module.weight, 0.0, INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.GroupNorm, nn.BatchNorm3d)):
                nn.init.normal_(module.weight, 1.0, INIT_STD)
                nn.init.zeros_(module.bias)

    @property
    def min_spatial_size(self) -> int:
        """Smallest H (and W) giving at least one output patch."""
        return 3 * 2**self.num_layers

    def logits_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Logit grid (T', H', W') for an input of (frames, height, width); entries <= 0 mean too small."""
        size = (frames, height, width)
        for conv in [*(block.conv for block in self.blocks), self.conv_out]:
            size = conv.output_size(*size)
        return size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, 1, T', H', W') logits; (B, C, H, W) -> (B, 1, H', W')."""
        image = x.ndim == 4
        if image:
            x = x.unsqueeze(2)  # B C 1 H W
        self._check_input(x)
        h = x
        for block in self.blocks:
            h = block(h)  # B C_n T_n H_n W_n
        logits = self.conv_out(h)  # B 1 T' H' W'
        return logits.squeeze(2) if image else logits

    def _check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError naming the fix for a wrongly shaped or too small input."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"PatchDiscriminator3d expects (B, {self.in_channels}, T, H, W) videos or "
                f"(B, {self.in_channels}, H, W) images, got shape {tuple(x.shape)}"
            )
        if min(self.logits_shape(*x.shape[2:])) < 1:
            raise ValueError(
                f"input {tuple(x.shape[2:])} (T, H, W) is too small for num_layers={self.num_layers}: "
                f"H and W must be >= {self.min_spatial_size}; use larger crops or fewer layers"
            )


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss 0.5 * (mean relu(1 - real) + mean relu(1 + fake)); scalar float32 >= 0."""
    loss_real = F.relu(1.0 - logits_real.float()).mean()
    loss_fake = F.relu(1.0 + logits_fake.float()).mean()
    return 0.5 * (loss_real + loss_fake)


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """BCE discriminator loss 0.5 * (mean softplus(-real) + mean softplus(fake)); scalar float32."""
    loss_real = F.softplus(-logits_real.float()).mean()
    loss_fake = F.softplus(logits_fake.float()).mean()
    return 0.5 * (loss_real + loss_fake)


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator adversarial loss -mean(logits_fake) (taming's VQGAN, with either D loss); scalar float32."""
    return -logits_fake.float().mean()


def adaptive_generator_weight(
    rec_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: nn.Parameter,
    max_weight: float = 1e4,
    eps: float = 1e-4,
) -> torch.Tensor:
    """VQGAN adaptive weight ||d rec / d W|| / (||d g / d W|| + eps), clamped to [0, max_weight], detached.

    ``W`` is the decoder's last layer (``VideoVAE.last_decoder_layer``); balancing the two gradients
    there keeps the adversarial term on the scale of the reconstruction term (Esser et al. 2021).
    Both gradients use ``retain_graph=True``, so the caller can still ``backward()`` the total loss.

    Returns:
        scalar float32 tensor without grad; multiply it (times a base weight) into ``g_loss``.

    Raises:
        ValueError: if either loss is not attached to the graph or does not depend on ``last_layer``.
    """
    if max_weight < 0 or eps <= 0:
        raise ValueError(f"need max_weight >= 0 and eps > 0, got max_weight={max_weight}, eps={eps}")
    norms: list[torch.Tensor] = []
    for name, loss in (("rec_loss", rec_loss), ("g_loss", g_loss)):
        if not loss.requires_grad:
            raise ValueError(
                f"{name} has no autograd graph: call adaptive_generator_weight in the training step with "
                f"grad enabled (in validation use a fixed weight instead)"
            )
        (grad,) = torch.autograd.grad(loss, last_layer, retain_graph=True, allow_unused=True)
        if grad is None:
            raise ValueError(
                f"{name} does not depend on last_layer {tuple(last_layer.shape)}: pass the weight of the "
                f"decoder's final layer that produced the reconstruction (VideoVAE.last_decoder_layer)"
            )
        norms.append(torch.linalg.vector_norm(grad.float()))
    weight = norms[0] / (norms[1] + eps)
    return weight.clamp(0.0, max_weight).detach()


def disc_factor(step: int, start_step: int) -> float:
    """Adversarial warm-up switch: 0.0 while ``step < start_step``, 1.0 from ``start_step`` on."""
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    return 0.0 if step < start_step else 1.0
