"""Causal 3D video VAE (stage 1): pixels (B, 3, 1 + tc*k, H, W) <-> latents (B, L, 1 + k, H/sc, W/sc).

The encoder and decoder are convolution-only stacks of causal blocks from ``layers.py``:

- every temporal operation is causal, so latent frame i depends only on input frames <= tc*i and
  decoded frame m only on latent frames <= ceil(m / tc);
- the first frame is compressed on its own, so an image is a 1-frame video and its latent equals
  the first latent frame of any clip that starts with it.

Encoder and decoder are flat lists of blocks, so a per-call ``CausalCache`` is threaded through
them without changing the module tree (and hence the state_dict keys): long videos are encoded and
decoded in temporal chunks with bounded memory and large frames in blended spatial tiles
(``vae_chunked.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from torch import nn

from vdm.models.layers import (
    CausalCache,
    CausalConv3d,
    ChannelRMSNorm,
    Downsample3d,
    NormKind,
    ResBlock3d,
    Upsample3d,
    make_norm,
)
from vdm.models.posterior import DiagonalGaussian
from vdm.models.vae_chunked import run_stream, validate_chunk_frames, validate_tiling

# initial posterior log-variance (sigma ~ 0.05): the decoder first learns from nearly deterministic
# latents instead of unit noise that drowns them; the KL term raises it as far as its weight asks
LOGVAR_INIT = -6.0


class Encoder3d(nn.Module):
    """Causal 3D encoder: (B, C, T, H, W) -> moments (B, 2L, 1 + (T - 1) / tc, H / sc, W / sc).

    With ``patch_size`` p > 1 every p x p pixel patch is first folded into channels (space-to-depth),
    so the network starts at 1/p resolution with C * p * p input channels.
    """

    def __init__(
        self,
        patch_size: int,
        in_channels: int,
        latent_channels: int,
        base_channels: int,
        channel_mults: tuple[int, ...],
        num_res_blocks: int,
        temporal_downsample: tuple[bool, ...],
        dropout: float,
        norm_groups: int,
        norm: NormKind,
        shortcuts: bool,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.latent_channels = latent_channels
        self.shortcuts = shortcuts
        self.conv_in = CausalConv3d(in_channels * patch_size**2, base_channels, 3)
        blocks: list[nn.Module] = []
        channels = base_channels
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                blocks.append(ResBlock3d(channels, base_channels * mult, dropout, norm_groups, norm))
                channels = base_channels * mult
            if level < len(channel_mults) - 1:
                blocks.append(Downsample3d(channels, temporal_downsample[level], shortcuts))
        blocks += [ResBlock3d(channels, channels, dropout, norm_groups, norm) for _ in range(2)]  # mid
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = make_norm(norm, channels, norm_groups)
        self.conv_out = CausalConv3d(channels, 2 * latent_channels, 3)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, 2L, Tz, h, w); with ``cache``, x is the next chunk of a video."""
        p = self.patch_size
        x = rearrange(x, "b c t (h ph) (w pw) -> b (c ph pw) t h w", ph=p, pw=p)  # B C*p*p T H/p W/p
        h = self.conv_in(x, cache)  # B base T H/p W/p
        for block in self.blocks:
            h = block(h, cache)  # B ch T' H' W'
        moments = self.conv_out(F.silu(self.norm_out(h)), cache)  # B 2L Tz h w
        if not self.shortcuts:
            return moments
        # the mean also gets the channel-group average of the features (DC-AE's space-to-channel shortcut)
        mean, logvar = moments.chunk(2, dim=1)  # B L Tz h w each
        mean = mean + reduce(h, "b (l g) t y x -> b l t y x", "mean", l=self.latent_channels)
        return torch.cat([mean, logvar], dim=1)


class Decoder3d(nn.Module):
    """Causal 3D decoder: (B, L, Tz, h, w) -> (B, C, 1 + tc * (Tz - 1), h * sc, w * sc).

    With ``patch_size`` p > 1 the last conv predicts C * p * p channels, unfolded into p x p pixel
    patches (depth-to-space).
    """

    def __init__(
        self,
        patch_size: int,
        out_channels: int,
        latent_channels: int,
        base_channels: int,
        channel_mults: tuple[int, ...],
        num_res_blocks: int,
        temporal_downsample: tuple[bool, ...],
        dropout: float,
        norm_groups: int,
        norm: NormKind,
        shortcuts: bool,
    ) -> None:
        super().__init__()
        channels = base_channels * channel_mults[-1]
        self.shortcuts = shortcuts
        self.conv_in = CausalConv3d(latent_channels, channels, 3)
        blocks: list[nn.Module] = [
            ResBlock3d(channels, channels, dropout, norm_groups, norm) for _ in range(2)
        ]
        for level in reversed(range(len(channel_mults))):
            # one block more than the encoder per level, as in the LDM/SD autoencoder
            for _ in range(num_res_blocks + 1):
                out_channels_level = base_channels * channel_mults[level]
                blocks.append(ResBlock3d(channels, out_channels_level, dropout, norm_groups, norm))
                channels = out_channels_level
            if level > 0:
                blocks.append(Upsample3d(channels, temporal_downsample[level - 1], shortcuts))
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = make_norm(norm, channels, norm_groups)
        self.patch_size = patch_size
        self.conv_out = CausalConv3d(channels, out_channels * patch_size**2, 3)

    def forward(self, z: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """(B, L, Tz, h, w) -> (B, C, T, H, W), unbounded (no tanh), trained towards [-1, 1].

        With ``cache``, z is the next chunk of a latent video.
        """
        h = self.conv_in(z, cache)  # B ch Tz h w
        if self.shortcuts:  # every latent channel repeated over its group of feature channels
            h = h + repeat(z, "b l t y x -> b (l g) t y x", g=h.shape[1] // z.shape[1])
        for block in self.blocks:
            h = block(h, cache)  # B ch T' H' W'
        out = self.conv_out(F.silu(self.norm_out(h)), cache)  # B C*p*p T H/p W/p
        p = self.patch_size
        return rearrange(out, "b (c ph pw) t h w -> b c t (h ph) (w pw)", ph=p, pw=p)  # B C T H W


def compression(
    patch_size: int, channel_mults: Sequence[int], temporal_downsample: Sequence[bool]
) -> tuple[int, int]:
    """(spatial, temporal) compression of a VideoVAE with these arguments: H and W shrink by
    patch_size * 2 ** (levels - 1); T = 1 + temporal * k frames become 1 + k latent frames."""
    return patch_size * 2 ** (len(channel_mults) - 1), 2 ** sum(bool(x) for x in temporal_downsample)


def check_video_size(frames: int, height: int, width: int, spatial: int, temporal: int) -> None:
    """Raise ValueError naming the nearest valid sizes when a (T, H, W) video cannot be compressed
    ``spatial`` x along H and W and ``temporal`` x along T (causally: T = 1 + temporal * k)."""
    if frames < 1 or (frames - 1) % temporal != 0:
        lower = 1 + temporal * max((frames - 1) // temporal, 0)
        raise ValueError(
            f"number of frames must be T = 1 + {temporal}*k (temporal_compression={temporal}); "
            f"got T={frames}, use T={lower} or T={lower + temporal}"
        )
    for name, size in (("H", height), ("W", width)):
        if size < spatial or size % spatial != 0:
            lower = max(spatial * (size // spatial), spatial)
            raise ValueError(
                f"{name} must be a positive multiple of spatial_compression={spatial}; got {name}={size}, "
                f"use {name}={lower} or {name}={lower + spatial}"
            )


def _validate_config(
    patch_size: int,
    in_channels: int,
    latent_channels: int,
    base_channels: int,
    channel_mults: tuple[int, ...],
    num_res_blocks: int,
    temporal_downsample: tuple[bool, ...],
    dropout: float,
    norm_groups: int,
    norm: str,
    shortcuts: bool,
) -> None:
    """Raise ValueError with a fix-it message for any inconsistent VideoVAE argument."""
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1 (1: no space-to-depth patching), got {patch_size}")
    if in_channels < 1 or latent_channels < 1 or base_channels < 1:
        raise ValueError(
            f"in_channels, latent_channels and base_channels must be >= 1, got "
            f"{in_channels}, {latent_channels}, {base_channels}"
        )
    if len(channel_mults) == 0 or min(channel_mults) < 1:
        raise ValueError(f"channel_mults must be a non-empty sequence of ints >= 1, got {channel_mults}")
    if len(temporal_downsample) != len(channel_mults) - 1:
        raise ValueError(
            f"len(temporal_downsample) must equal len(channel_mults) - 1 = {len(channel_mults) - 1} "
            f"(one flag per downsampling level), got {len(temporal_downsample)}: {temporal_downsample}"
        )
    if num_res_blocks < 1:
        raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if norm not in ("rms", "group", "none"):
        raise ValueError(
            f"norm must be 'rms' (channel RMSNorm), 'group' (per-frame GroupNorm) or 'none', got {norm!r}"
        )
    deepest = base_channels * channel_mults[-1]
    if shortcuts and deepest % latent_channels != 0:
        divisors = [d for d in range(1, deepest + 1) if deepest % d == 0]
        raise ValueError(
            f"shortcuts=true averages the deepest features ({deepest} = base_channels * channel_mults[-1]) "
            f"in latent_channels groups: latent_channels ({latent_channels}) must divide {deepest}; "
            f"pick one of {divisors} or set shortcuts=false"
        )
    if norm == "group" and (norm_groups < 1 or base_channels % norm_groups != 0):
        raise ValueError(
            f"base_channels ({base_channels}) must be divisible by norm_groups ({norm_groups}); "
            f"pick norm_groups from the divisors of base_channels, e.g. "
            f"{math.gcd(base_channels, max(norm_groups, 1))}"
        )


class VideoVAE(nn.Module):
    """Causal 3D video VAE.

    Videos are (B, C, T, H, W) in [-1, 1] with T = 1 + tc * k and H, W divisible by sc, where
    sc = patch_size * 2 ** (len(channel_mults) - 1) and tc = 2 ** sum(temporal_downsample). Latents are
    (B, L, 1 + k, H / sc, W / sc). Defaults give sc = 8, tc = 4, L = 4.

    Args:
        in_channels: pixel channels C.
        latent_channels: latent channels L.
        patch_size: p > 1 folds p x p pixel patches into channels before the first conv and
            unfolds the last conv's output (space-to-depth, as in Wan 2.2's VAE and DC-AE): the
            full-resolution level disappears, which cuts compute and makes sharp edges far quicker
            to learn; sc grows by p.
        base_channels: width of the first (full-resolution) level.
        channel_mults: width multiplier per level; one spatial 2x downsample between levels.
        num_res_blocks: residual blocks per encoder level (the decoder uses one more).
        temporal_downsample: per downsample (len(channel_mults) - 1 flags), whether it also
            halves time (1 + 2k -> 1 + k).
        dropout: dropout inside residual blocks.
        norm: ``"rms"`` (default): RMS normalisation over channels per position, which keeps
            absolute levels of flat regions and makes spatial tiles exact up to the receptive
            field; ``"group"``: GroupNorm with per-frame statistics.
        norm_groups: GroupNorm groups when ``norm="group"``; must divide base_channels.
        shortcuts: parameter-free shortcuts beside every learned resampling (DC-AE, Wan 2.2's VAE):
            causal average pooling around each downsampling conv, nearest/frame repetition around
            each upsampling conv, the channel-group mean of the deepest features added to the
            posterior mean, and the latent repeated over the decoder's first features. The network
            then learns residuals over a low-pass autoencoder, which trains much faster; needs
            latent_channels to divide base_channels * channel_mults[-1].
        gradient_checkpointing: recompute every block's activations in backward (not applied
            inside chunked passes, whose cache updates cannot be replayed).
        encode_chunk_frames: default ``chunk_frames`` of ``encode``; None encodes the whole clip
            at once.
        decode_chunk_frames: default ``chunk_frames`` of ``decode``; None decodes at once.
        tile_size: default spatial tile edge in pixels (multiple of sc) for encode and decode;
            None disables tiling.
        tile_overlap: default overlap of neighbouring tiles as a fraction of tile_size, in [0, 0.5].
    """

    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 4,
        patch_size: int = 1,
        base_channels: int = 64,
        channel_mults: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        temporal_downsample: Sequence[bool] = (False, True, True),
        dropout: float = 0.0,
        norm_groups: int = 16,
        norm: NormKind = "rms",
        shortcuts: bool = False,
        gradient_checkpointing: bool = False,
        encode_chunk_frames: int | None = None,
        decode_chunk_frames: int | None = None,
        tile_size: int | None = None,
        tile_overlap: float = 0.25,
    ) -> None:
        super().__init__()
        mults = tuple(int(m) for m in channel_mults)
        temporal = tuple(bool(flag) for flag in temporal_downsample)
        config = (
            patch_size, in_channels, latent_channels, base_channels, mults, num_res_blocks, temporal, dropout,
            norm_groups, norm, shortcuts,
        )
        _validate_config(*config)
        self.in_channels = in_channels
        self.latent_channels = latent_channels
        self.patch_size = patch_size
        self.channel_mults = mults
        self.temporal_downsample = temporal
        self.encoder = Encoder3d(*config)
        self.decoder = Decoder3d(*config)
        self.initialize_weights()
        self.gradient_checkpointing = gradient_checkpointing
        validate_chunk_frames(encode_chunk_frames, self.temporal_compression, "encode_chunk_frames")
        validate_chunk_frames(decode_chunk_frames, self.temporal_compression, "decode_chunk_frames")
        validate_tiling(tile_size, tile_overlap, self.spatial_compression)
        self.encode_chunk_frames = encode_chunk_frames
        self.decode_chunk_frames = decode_chunk_frames
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap

    def initialize_weights(self) -> None:
        """Xavier-uniform convs with zero bias; zero the second conv of every residual block.

        The encoder's log-variance outputs start at ``LOGVAR_INIT`` (bias), not 0.

        Zeroing ``conv2`` makes each residual block the identity at init (Goyal et al. 2017,
        "Fixup"-style), so the deep stack starts as the short path conv_in -> resamplers ->
        conv_out and gradients reach every level with unit-scale activations.
        """
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.GroupNorm, ChannelRMSNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, ResBlock3d):
                nn.init.zeros_(module.conv2.weight)
                nn.init.zeros_(module.conv2.bias)
        with torch.no_grad():
            self.encoder.conv_out.bias[self.latent_channels :].fill_(LOGVAR_INIT)

    @property
    def spatial_compression(self) -> int:
        """Pixels per latent along H and W: patch_size * 2 ** (number of downsampling levels)."""
        return compression(self.patch_size, self.channel_mults, self.temporal_downsample)[0]

    @property
    def temporal_compression(self) -> int:
        """Frames per latent frame after the first (T = 1 + tc * (Tz - 1))."""
        return compression(self.patch_size, self.channel_mults, self.temporal_downsample)[1]

    @property
    def last_decoder_layer(self) -> nn.Parameter:
        """Weight of the decoder's final conv (for the adaptive GAN loss weight)."""
        return self.decoder.conv_out.weight

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether every encoder/decoder block recomputes its activations in backward."""
        return self._gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        self._gradient_checkpointing = bool(enabled)
        for block in [*self.encoder.blocks, *self.decoder.blocks]:
            block.gradient_checkpointing = self._gradient_checkpointing

    def latent_shape(self, video_shape: Sequence[int]) -> tuple[int, ...]:
        """Latent shape for a (B, C, T, H, W) or (C, T, H, W) video shape (leading B kept)."""
        if len(video_shape) not in (4, 5):
            raise ValueError(f"video_shape must be (B, C, T, H, W) or (C, T, H, W), got {tuple(video_shape)}")
        *batch, channels, frames, height, width = (int(s) for s in video_shape)
        self._check_video_dims(channels, frames, height, width)
        sc, tc = self.spatial_compression, self.temporal_compression
        return (*batch, self.latent_channels, 1 + (frames - 1) // tc, height // sc, width // sc)

    def encode(
        self,
        x: torch.Tensor,
        chunk_frames: int | None = None,
        tile_size: int | None = None,
        tile_overlap: float | None = None,
    ) -> DiagonalGaussian:
        """Posterior over latents for x (B, C, T, H, W) in [-1, 1]; latents (B, L, Tz, H/sc, W/sc).

        ``chunk_frames`` (a multiple of tc) encodes frame 0 alone, then chunks of that many frames
        with a causal cache: same result as the full pass, activation memory of one chunk.
        ``tile_size`` (pixels, multiple of sc) encodes overlapping tiles blended in latent space
        (approximate, see ``vae_chunked``). None takes the constructor defaults.
        """
        if x.ndim != 5:
            raise ValueError(f"encode expects a (B, C, T, H, W) video, got shape {tuple(x.shape)}")
        self._check_video_dims(*x.shape[1:])
        chunk, tile, overlap = self._plan(chunk_frames, tile_size, tile_overlap, self.encode_chunk_frames)
        moments = run_stream(self.encoder, x, chunk, tile, overlap, self.spatial_compression, 1)
        return DiagonalGaussian.from_moments(moments)  # B 2L Tz h w -> q(z|x)

    def decode(
        self,
        z: torch.Tensor,
        chunk_frames: int | None = None,
        tile_size: int | None = None,
        tile_overlap: float | None = None,
    ) -> torch.Tensor:
        """Reconstruct (B, C, 1 + tc * (Tz - 1), h * sc, w * sc) from latents z (B, L, Tz, h, w).

        ``chunk_frames`` counts output video frames (a multiple of tc, i.e. chunk_frames / tc
        latent frames per chunk after the first latent frame) and is exact; ``tile_size`` (output
        pixels, multiple of sc) blends overlapping decoded tiles in pixel space (approximate).
        None takes the constructor defaults.
        """
        if z.ndim != 5 or z.shape[1] != self.latent_channels:
            raise ValueError(
                f"decode expects latents (B, {self.latent_channels}, Tz, h, w), got shape {tuple(z.shape)}"
            )
        chunk, tile, overlap = self._plan(chunk_frames, tile_size, tile_overlap, self.decode_chunk_frames)
        latent_chunk = None if chunk is None else chunk // self.temporal_compression
        return run_stream(self.decoder, z, latent_chunk, tile, overlap, 1, self.spatial_compression)

    def _plan(
        self,
        chunk_frames: int | None,
        tile_size: int | None,
        tile_overlap: float | None,
        default_chunk_frames: int | None,
    ) -> tuple[int | None, int | None, float]:
        """Fill unset chunking/tiling arguments from the defaults and validate them."""
        chunk = default_chunk_frames if chunk_frames is None else chunk_frames
        tile = self.tile_size if tile_size is None else tile_size
        overlap = self.tile_overlap if tile_overlap is None else tile_overlap
        validate_chunk_frames(chunk, self.temporal_compression, "chunk_frames")
        validate_tiling(tile, overlap, self.spatial_compression)
        return chunk, tile, overlap

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Encode and decode x (B, C, T, H, W); returns (x_hat of the same shape, posterior).

        With ``sample_posterior=False`` the posterior mode is decoded (deterministic).
        """
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()  # B L Tz h w
        x_hat = self.decode(z.to(x.dtype))  # B C T H W
        return x_hat, posterior

    def _check_video_dims(self, channels: int, frames: int, height: int, width: int) -> None:
        """Raise ValueError naming the nearest valid sizes when a video cannot be compressed."""
        if channels != self.in_channels:
            raise ValueError(f"expected {self.in_channels} video channels, got {channels}")
        check_video_size(frames, height, width, self.spatial_compression, self.temporal_compression)
