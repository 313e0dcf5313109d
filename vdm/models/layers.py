"""Causal 3D building blocks shared by the video autoencoder and its discriminator.

Every block here is causal in time: output frame ``t`` depends only on input frames ``<= t``.
Two choices make that hold exactly rather than approximately:

- ``CausalConv3d`` pads only the past (never the future) and is the single place where temporal
  padding happens, so a ``CausalCache`` of past frames replaces that padding when a long video is
  processed in consecutive temporal chunks.
- Normalisation never mixes frames. ``ChannelRMSNorm`` (the default of the VAE) normalises each
  (t, h, w) position over its channels, so it is also independent of the spatial extent (tiles
  see the same statistics as the whole frame) and keeps a flat region's absolute level;
  ``CausalGroupNorm`` takes GroupNorm statistics per frame. A GroupNorm over (C/G, T, H, W) would
  let future frames shift the normalisation of past ones (and make chunked results differ).

Tensors are ``B C T H W``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from torch import nn
from torch.utils.checkpoint import checkpoint

Size3 = int | tuple[int, int, int]


def _triple(value: Size3, name: str) -> tuple[int, int, int]:
    """Expand an int to (t, h, w); validate a given tuple."""
    if isinstance(value, int):
        return (value, value, value)
    values = tuple(int(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"{name} must be an int or a (t, h, w) triple, got {value!r}")
    return values  # type: ignore[return-value]


class CausalCache:
    """Streaming state that lets a causal stack process one video as consecutive temporal chunks.

    For every ``CausalConv3d`` it holds the input frames that the next chunk's windows still need:
    the last ``dilation_t * (k_t - 1)`` frames for stride 1, and for a temporal stride ``s_t`` every
    frame from the next window start on, so strided convolutions keep their phase across chunk
    boundaries. For every temporal ``Upsample3d`` it records that the clip's first frame (which is
    not repeated) has been seen. A layer replicate-pads only on its first chunk, i.e. only at the
    very start of the video, so chunked outputs equal the full pass.

    Scope: one cache per video. Used as a context manager it is cleared on exit, also when a chunk
    raises, so no state leaks into the next video. The layers themselves keep no streaming state:
    concurrent (threads) or nested chunked calls on the same model are safe as long as each call
    has its own cache. A single cache is not thread-safe and refuses to be entered twice.
    """

    def __init__(self) -> None:
        self._frames: dict[nn.Module, torch.Tensor] = {}
        self._started: set[nn.Module] = set()
        self._entered = False

    def __len__(self) -> int:
        """Number of layer states held (0 for a fresh or cleared cache)."""
        return len(self._frames) + len(self._started)

    def __enter__(self) -> CausalCache:
        if self._entered:
            raise RuntimeError(
                "this CausalCache is already in use by another chunked pass; create one CausalCache "
                "per video stream"
            )
        self._entered = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.clear()
        self._entered = False

    def clear(self) -> None:
        """Drop every layer's state (the next chunk is treated as the start of a new video)."""
        self._frames.clear()
        self._started.clear()

    def pending(self, module: nn.Module) -> torch.Tensor | None:
        """Frames (B, C, P, H, W) carried over for ``module``; None before its first chunk."""
        return self._frames.get(module)

    def store(self, module: nn.Module, frames: torch.Tensor) -> None:
        """Keep ``frames`` (B, C, P, H, W) for ``module``'s next chunk."""
        self._frames[module] = frames

    def first_call(self, module: nn.Module) -> bool:
        """True on ``module``'s first chunk of the video; records that it has started."""
        if module in self._started:
            return False
        self._started.add(module)
        return True


class CausalConv3d(nn.Conv3d):
    """3D convolution that is causal in time and 'same'-padded in space.

    The temporal receptive field ``dilation_t * (kernel_t - 1)`` is padded at the front by
    replicating the first frame. Replicate rather than zeros: a 1-frame input (an image) is then
    seen by every kernel as a static clip, so the first frame of a video and an image encode the
    same way, and no artificial black frame is injected at the clip start (which zero padding
    would, biasing the first latent frame). Spatial padding is symmetric zeros, so spatial kernels
    must be odd.

    Shapes: (B, C_in, T, H, W) -> (B, C_out, 1 + (T - 1) // stride_t, H', W') where H', W' follow
    the usual strided convolution with padding ``dilation * (kernel - 1) // 2``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Size3 = 3,
        stride: Size3 = 1,
        dilation: Size3 = 1,
        bias: bool = True,
    ) -> None:
        kernel = _triple(kernel_size, "kernel_size")
        strides = _triple(stride, "stride")
        dilations = _triple(dilation, "dilation")
        if min(kernel) < 1 or min(strides) < 1 or min(dilations) < 1:
            raise ValueError(
                f"kernel_size, stride and dilation must be >= 1, got {kernel}, {strides}, {dilations}"
            )
        if kernel[1] % 2 == 0 or kernel[2] % 2 == 0:
            raise ValueError(
                f"CausalConv3d pads space symmetrically, so spatial kernel sizes must be odd; "
                f"got kernel_size={kernel} (use e.g. (k_t, 3, 3))"
            )
        spatial_padding = (dilations[1] * (kernel[1] - 1) // 2, dilations[2] * (kernel[2] - 1) // 2)
        super().__init__(
            in_channels,
            out_channels,
            kernel,
            stride=strides,
            padding=(0, *spatial_padding),
            dilation=dilations,
            bias=bias,
        )
        self.time_padding = dilations[0] * (kernel[0] - 1)

    def pad_time(self, x: torch.Tensor) -> torch.Tensor:
        """Prepend ``time_padding`` copies of the first frame: (B, C, T, H, W) -> (B, C, P + T, H, W)."""
        if self.time_padding == 0:
            return x
        first = x[:, :, :1].expand(-1, -1, self.time_padding, -1, -1)
        return torch.cat([first, x], dim=2)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """(B, C_in, T, H, W) -> (B, C_out, 1 + (T - 1) // stride_t, H', W').

        With a ``cache``, ``x`` is the next chunk of a video: the carried-over frames replace the
        replicate padding after the first chunk, and a chunk of ``T`` frames (``T`` a multiple of
        ``stride_t``) yields ``T // stride_t`` frames (``1 + (T - 1) // stride_t`` for the first).
        """
        if cache is None:
            return super().forward(self.pad_time(x))
        return self._forward_chunk(x, cache)

    def _forward_chunk(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        """Convolve every complete window of (carried frames + chunk); carry the unconsumed rest."""
        span, stride_t = self.time_padding + 1, self.stride[0]
        if stride_t > span:
            raise ValueError(
                f"chunked processing needs temporal stride ({stride_t}) <= temporal kernel span ({span}); "
                f"run this layer without a CausalCache"
            )
        pending = cache.pending(self)
        stream = self.pad_time(x) if pending is None else torch.cat([pending, x], dim=2)  # B C P+T H W
        if stream.shape[2] < span:
            raise ValueError(
                f"a chunk of {x.shape[2]} frame(s) completes no window of this conv (kernel span {span}, "
                f"temporal stride {stride_t}); use chunks whose length is a multiple of the temporal "
                f"compression"
            )
        windows = (stream.shape[2] - span) // stride_t + 1
        # clone so the cache holds only the carried frames, not a view that pins the whole chunk
        cache.store(self, stream[:, :, windows * stride_t :].clone())
        return super().forward(stream)


class CausalGroupNorm(nn.GroupNorm):
    """GroupNorm with statistics per frame, computed in float32.

    Per-frame statistics keep the block causal (and make results independent of how a long clip
    is later split into chunks); fp32 avoids variance underflow/overflow under bf16/fp16 autocast.
    Shapes: (B, C, T, H, W) -> (B, C, T, H, W), same dtype as the input.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, C, T, H, W)."""
        frames = rearrange(x, "b c t h w -> (b t) c h w").float()
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        out = F.group_norm(frames, self.num_groups, weight, bias, self.eps)
        return rearrange(out.to(x.dtype), "(b t) c h w -> b c t h w", t=x.shape[2])


class ChannelRMSNorm(nn.Module):
    """RMS normalisation over channels at every (t, h, w) position, with a gain and a bias, in fp32.

    ``x / rms_c(x) * weight + bias``. Unlike (per-frame) GroupNorm it removes no spatial mean, so a
    uniform frame keeps its colour through the decoder's last normalisation, and a spatial tile is
    normalised exactly as inside the whole frame. Shapes: (B, C, T, H, W) -> same, input dtype.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, C, T, H, W)."""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(dim=1, keepdim=True) + self.eps)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return (h * self.weight.float().view(shape) + self.bias.float().view(shape)).to(x.dtype)


NormKind = Literal["rms", "group", "none"]


def make_norm(kind: NormKind, channels: int, groups: int) -> nn.Module:
    """The normalisation layer of a block: ``ChannelRMSNorm``, per-frame ``CausalGroupNorm``, or none."""
    if kind == "rms":
        return ChannelRMSNorm(channels)
    if kind == "group":
        return CausalGroupNorm(groups, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'rms', 'group' or 'none', got {kind!r}")


def checkpointed(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, enabled: bool) -> torch.Tensor:
    """Apply ``fn(x)``, recomputing its activations in backward when ``enabled`` and autograd records.

    Non-reentrant checkpointing restores the RNG state (dropout) on recomputation, so outputs and
    gradients match the plain call.
    """
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, x, use_reentrant=False)
    return fn(x)


class ResBlock3d(nn.Module):
    """Pre-activation residual block: (norm, SiLU, CausalConv3d) x 2 plus a shortcut.

    The shortcut is a 1x1x1 conv when the channel count changes, identity otherwise.
    Shapes: (B, C_in, T, H, W) -> (B, C_out, T, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        dropout: float = 0.0,
        norm_groups: int = 16,
        norm: NormKind = "rms",
    ) -> None:
        super().__init__()
        self.gradient_checkpointing = False
        self.norm1 = make_norm(norm, in_channels, norm_groups)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.norm2 = make_norm(norm, out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        self.shortcut: nn.Module = (
            nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """(B, C_in, T, H, W) -> (B, C_out, T, H, W); ``cache`` streams temporal chunks.

        Under a cache the block is not checkpointed: recomputation in backward would replay the
        cache updates.
        """
        if cache is not None:
            return self._forward(x, cache)
        return checkpointed(self._forward, x, self.gradient_checkpointing)

    def _forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)), cache)  # B C_out T H W
        h = self.conv2(self.dropout(F.silu(self.norm2(h))), cache)  # B C_out T H W
        return self.shortcut(x) + h


class Downsample3d(nn.Module):
    """Halve H and W, and optionally compress time as T = 1 + 2k -> 1 + k.

    One causal 3x3x3 conv with stride (s_t, 2, 2). With s_t = 2 and two replicated pad frames,
    output frame 0 sees only input frame 0 (the first frame is encoded on its own, so an image is
    a 1-frame video) and output frame i >= 1 sees input frames 2i-2..2i, i.e. the remaining
    frames are strided by 2 without ever looking ahead.

    With ``shortcut`` the conv learns a residual over parameter-free average pooling (the
    AvgDown shortcut of DC-AE and Wan 2.2's VAE): 2x2 in space and, in time, frame 0 on its own
    and then pairs (2i-1, 2i), the same causal frame grouping as the conv. Pooling hands every
    level a faithful low-pass copy of its input from the first step, which speeds up training.
    Under a ``CausalCache`` later chunks must hold an even number of frames (they do when chunk
    sizes are multiples of the temporal compression).
    Shapes: (B, C, T, H, W) -> (B, C, 1 + (T - 1) // s_t, H / 2, W / 2).
    """

    def __init__(self, channels: int, temporal: bool, shortcut: bool = False) -> None:
        super().__init__()
        self.gradient_checkpointing = False
        self.temporal = temporal
        self.shortcut = shortcut
        self.conv = CausalConv3d(channels, channels, 3, stride=(2 if temporal else 1, 2, 2))

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, C, 1 + (T - 1) // s_t, H / 2, W / 2); T // s_t per later chunk."""
        if cache is not None:
            return self._forward(x, cache)
        return checkpointed(self._forward, x, self.gradient_checkpointing)

    def _forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        if not self.shortcut:
            return self.conv(x, cache)
        first = cache is None or cache.first_call(self)
        return self.conv(x, cache) + self._pool(x, first)

    def _pool(self, x: torch.Tensor, first: bool) -> torch.Tensor:
        """Causal 2x2(x2) average pooling; ``first``: x starts the video (frame 0 is pooled alone)."""
        if self.temporal:
            head, rest = (x[:, :, :1], x[:, :, 1:]) if first else (x[:, :, :0], x)
            if rest.shape[2] % 2:
                raise ValueError(
                    f"Downsample3d shortcut: a chunk after the first frame must have an even number of "
                    f"frames at this level, got {rest.shape[2]}; use chunk sizes that are multiples of "
                    f"the temporal compression"
                )
            rest = reduce(rest, "b c (t st) h w -> b c t h w", "mean", st=2)  # B C (T-1)/2 H W
            x = torch.cat([head, rest], dim=2)  # B C T' H W
        return reduce(x, "b c t (h sh) (w sw) -> b c t h w", "mean", sh=2, sw=2)  # B C T' H/2 W/2


class Upsample3d(nn.Module):
    """Double H and W (nearest), optionally expand time as 1 + k -> 1 + 2k, then a causal conv.

    In time the first frame is kept once and every later frame is repeated twice, mirroring
    ``Downsample3d``: output frames 2i-1 and 2i come from input frame i, so the block stays causal.
    With ``shortcut`` the conv's output is added to the repeated input (the DupUp shortcut of
    DC-AE and Wan 2.2's VAE), so the block starts as nearest-neighbour upsampling.
    Shapes: (B, C, T, H, W) -> (B, C, 1 + s_t * (T - 1), 2H, 2W).
    """

    def __init__(self, channels: int, temporal: bool, shortcut: bool = False) -> None:
        super().__init__()
        self.gradient_checkpointing = False
        self.temporal = temporal
        self.shortcut = shortcut
        self.conv = CausalConv3d(channels, channels, 3)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, C, 1 + s_t * (T - 1), 2H, 2W); s_t * T frames per later chunk.

        Under a ``cache`` only the video's first chunk keeps its first frame unrepeated.
        """
        if cache is not None:
            return self._forward(x, cache)
        return checkpointed(self._forward, x, self.gradient_checkpointing)

    def _forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        if self.temporal:
            if cache is None or cache.first_call(self):
                rest = repeat(x[:, :, 1:], "b c t h w -> b c (t st) h w", st=2)  # B C 2(T-1) H W
                x = torch.cat([x[:, :, :1], rest], dim=2)  # B C 1+2(T-1) H W
            else:
                x = repeat(x, "b c t h w -> b c (t st) h w", st=2)  # B C 2T H W
        x = repeat(x, "b c t h w -> b c t (h sh) (w sw)", sh=2, sw=2)  # B C T' 2H 2W
        out = self.conv(x, cache)
        return out + x if self.shortcut else out
