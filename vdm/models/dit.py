"""Latent spatiotemporal diffusion transformer (stage 2): a DiT over 3D patches of VAE latents.

Latents z (B, C, T, H, W) are cut into (pt, ph, pw) patches, embedded as T' * H' * W' tokens
(T' = T / pt, ...) and processed by ``depth`` blocks of adaLN-Zero self-attention (joint over all
tokens, or factorized into spatial then temporal attention), cross-attention to text tokens and an
MLP (``dit_layers.py``); a final adaLN layer maps each token back to its patch (DiT, Peebles & Xie
2023; text cross-attention as PixArt-alpha; 3D RoPE and QK-norm as in recent video DiTs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from vdm.models.dit_layers import (
    DiTBlock,
    FinalLayer,
    PooledTextEmbedder,
    RopeTables,
    RotaryEmbedding3d,
    TimestepEmbedder,
    context_attention_mask,
)

AttentionMode = Literal["full", "factorized"]
MICRO_CONDITIONS = ("fps", "frames", "height", "width")


def default_rope_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """Split head_dim into even (d_t, d_h, d_w) with d_h = d_w = 2 * (head_dim // 6) (as Wan)."""
    spatial = 2 * (head_dim // 6)
    return (head_dim - 2 * spatial, spatial, spatial)


def check_heads(hidden_size: int, num_heads: int) -> None:
    """Heads split the width into equal, even head widths (rotary embeddings rotate channel pairs)."""
    if hidden_size % num_heads != 0:
        valid = [d for d in range(1, hidden_size + 1) if hidden_size % d == 0 and hidden_size // d % 2 == 0]
        raise ValueError(
            f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}); "
            f"pick num_heads from {valid}"
        )
    if (hidden_size // num_heads) % 2 != 0:
        raise ValueError(
            f"head_dim = hidden_size / num_heads = {hidden_size // num_heads} must be even for rotary "
            f"embeddings; change hidden_size ({hidden_size}) or num_heads ({num_heads})"
        )


def token_grid(latent_thw: Sequence[int], patch_size: Sequence[int]) -> tuple[int, int, int]:
    """Token grid (T', H', W') of a latent (T, H, W) cut into (pt, ph, pw) patches; a size the patches do
    not tile is refused."""
    sizes, patch = tuple(int(s) for s in latent_thw), tuple(int(p) for p in patch_size)
    if len(sizes) != 3 or min(sizes) < 1:
        raise ValueError(f"latent_thw must be three positive ints (T, H, W), got {latent_thw}")
    if any(s % p for s, p in zip(sizes, patch)):
        raise ValueError(
            f"latent (T, H, W) = {sizes} must be divisible by patch_size {patch}; "
            f"crop or pad the latents (or the video) to multiples of it"
        )
    return tuple(s // p for s, p in zip(sizes, patch))  # type: ignore[return-value]


def check_fits(
    in_channels: int, cond_channels: int, context_dim: int, *, latent_channels: int, text_dim: int,
    image_conditioning: bool = False,
) -> None:
    """A DiT with these widths fits a VAE of ``latent_channels`` and a text encoder of width ``text_dim``
    (and, with ``image_conditioning``, takes the first-frame condition: latent + mask channels). Each
    message starts with the DiT argument at fault."""
    channels = latent_channels
    if in_channels != channels:
        raise ValueError(
            f"in_channels: {in_channels}, but the VAE export has {channels} latent channels; "
            f"set in_channels={channels}"
        )
    if cond_channels not in (0, channels + 1):
        raise ValueError(f"cond_channels: {cond_channels}, expected 0 or {channels + 1} (latent + mask)")
    if image_conditioning and cond_channels == 0:
        raise ValueError(
            f"cond_channels: 0, but image-to-video (i2v_probability > 0) needs cond_channels={channels + 1}"
        )
    if context_dim != text_dim:
        raise ValueError(
            f"context_dim: {context_dim}, but the text encoder's width is {text_dim}; "
            f"set context_dim={text_dim}"
        )


def _validate_config(
    in_channels: int,
    out_channels: int,
    cond_channels: int,
    patch_size: tuple[int, ...],
    hidden_size: int,
    depth: int,
    num_heads: int,
    mlp_ratio: float,
    context_dim: int,
    attention: str,
    micro_conditions: tuple[str, ...],
) -> None:
    """Raise ValueError with a fix-it message for any inconsistent VideoDiT argument (RoPE aside)."""
    if in_channels < 1 or out_channels < 1 or cond_channels < 0:
        raise ValueError(
            f"in_channels and out_channels must be >= 1 and cond_channels >= 0, got "
            f"{in_channels}, {out_channels}, {cond_channels}"
        )
    if len(patch_size) != 3 or min(patch_size) < 1:
        raise ValueError(f"patch_size must be three ints >= 1 (pt, ph, pw), got {patch_size}")
    if depth < 1 or num_heads < 1 or context_dim < 1 or mlp_ratio <= 0:
        raise ValueError(
            f"depth, num_heads and context_dim must be >= 1 and mlp_ratio > 0, got depth={depth}, "
            f"num_heads={num_heads}, context_dim={context_dim}, mlp_ratio={mlp_ratio}"
        )
    check_heads(hidden_size, num_heads)
    if attention not in ("full", "factorized"):
        raise ValueError(
            f"attention must be 'full' (joint over T*H*W tokens) or 'factorized' (spatial then temporal), "
            f"got {attention!r}"
        )
    unknown = [name for name in micro_conditions if name not in MICRO_CONDITIONS]
    if unknown or len(set(micro_conditions)) != len(micro_conditions):
        raise ValueError(
            f"micro_conditions must be distinct names from {MICRO_CONDITIONS}, got {list(micro_conditions)}"
        )


def _validate_rope(axes_dim: tuple[int, ...], head_dim: int) -> None:
    """Check a (d_t, d_h, d_w) rotary split of head_dim."""
    if len(axes_dim) != 3 or any(d < 0 or d % 2 for d in axes_dim) or sum(axes_dim) != head_dim:
        raise ValueError(
            f"rope_axes_dim must be three even ints >= 0 (d_t, d_h, d_w) summing to head_dim = {head_dim}, "
            f"got {axes_dim}; e.g. {default_rope_axes_dim(head_dim)}"
        )
    if axes_dim[1] == 0 or axes_dim[2] == 0:
        raise ValueError(
            f"rope_axes_dim {axes_dim} leaves a spatial axis without position information (head_dim "
            f"{head_dim} is too small for the default split); give d_h, d_w > 0 explicitly or use a "
            f"larger head_dim"
        )


class VideoDiT(nn.Module):
    """Diffusion transformer over latent videos with text cross-attention.

    Args:
        in_channels: latent channels C of the noised video (the VAE's latent_channels).
        out_channels: channels predicted (noise / velocity / x0); default ``in_channels``.
        cond_channels: extra conditioning channels for image-to-video. The caller concatenates them
            to the noised latents along C before calling the model, e.g. the first frame's clean
            latent (zeros elsewhere) plus a one-channel mask of the given frames, so ``x`` has
            ``in_channels + cond_channels`` channels; the output still has ``out_channels``.
        patch_size: (pt, ph, pw) latent patch per token.
        hidden_size, depth, num_heads, mlp_ratio: transformer width, blocks, heads, MLP expansion.
        context_dim: channels of the text encoder's tokens (its hidden size).
        attention: ``"full"`` joint attention over all T'H'W' tokens, or ``"factorized"`` spatial
            attention per frame then temporal attention per location (see ``DiTBlock``).
        qk_norm: RMSNorm (learnable scale) on q and k per head, before RoPE.
        rope_axes_dim: (d_t, d_h, d_w) head channels rotated by the t, h, w patch index; even,
            summing to head_dim. Default ``default_rope_axes_dim(head_dim)``.
        rope_theta: RoPE base period.
        micro_conditions: subset of ``("fps", "frames", "height", "width")``; each is embedded like
            the timestep (without the x1000) and added to the conditioning vector. Their output
            layers start at zero, so at init the conditioning vector is the timestep embedding alone.
        pooled_text: also add an embedding of the mean of the real text tokens to the conditioning
            vector (SD3's pooled text vector; output layer zero at init), besides cross-attention.
        gradient_checkpointing: recompute each block's activations in backward.
    """

    def __init__(
        self,
        in_channels: int = 16,
        out_channels: int | None = None,
        cond_channels: int = 0,
        patch_size: Sequence[int] = (1, 2, 2),
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        context_dim: int = 4096,
        attention: AttentionMode = "full",
        qk_norm: bool = True,
        rope_axes_dim: Sequence[int] | None = None,
        rope_theta: float = 10000.0,
        micro_conditions: Sequence[str] = (),
        pooled_text: bool = False,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        patch = tuple(int(p) for p in patch_size)
        micro = tuple(str(name) for name in micro_conditions)
        _validate_config(
            in_channels, out_channels, cond_channels, patch, hidden_size, depth, num_heads, mlp_ratio,
            context_dim, attention, micro,
        )
        head_dim = hidden_size // num_heads
        axes_dim = default_rope_axes_dim(head_dim)
        if rope_axes_dim is not None:
            axes_dim = tuple(int(d) for d in rope_axes_dim)  # type: ignore[assignment]
        _validate_rope(axes_dim, head_dim)
        self.in_channels, self.out_channels, self.cond_channels = in_channels, out_channels, cond_channels
        self.patch_size: tuple[int, int, int] = patch  # type: ignore[assignment]
        self.hidden_size, self.num_heads, self.depth = hidden_size, num_heads, depth
        self.context_dim, self.attention, self.micro_conditions = context_dim, attention, micro
        self.gradient_checkpointing = gradient_checkpointing

        self.x_embedder = nn.Conv3d(in_channels + cond_channels, hidden_size, patch, stride=patch)
        self.t_embedder = TimestepEmbedder(hidden_size, scale=1000.0)
        self.micro_embedders = nn.ModuleDict({name: TimestepEmbedder(hidden_size, 1.0) for name in micro})
        self.pooled_embedder = PooledTextEmbedder(context_dim, hidden_size) if pooled_text else None
        # PixArt-alpha's caption projection: text tokens to the transformer width
        self.context_embedder = nn.Sequential(
            nn.Linear(context_dim, hidden_size),
            nn.GELU(approximate="tanh"),
            nn.Linear(hidden_size, hidden_size),
        )
        self.rope = RotaryEmbedding3d(axes_dim, rope_theta)  # type: ignore[arg-type]
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, factorized=attention == "factorized", qk_norm=qk_norm)
            for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, out_channels * patch[0] * patch[1] * patch[2])
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT init: xavier-uniform linears (zero bias), patch embedding xavier on its flattened
        kernel, N(0, 0.02) embedding MLPs, and zeros for every adaLN modulation, the final layer,
        each cross-attention output projection (PixArt) and each micro-condition and pooled-text output
        layer.

        The zeros make every block the identity and the model output exactly 0 at init (adaLN-Zero).
        Zeroing the temporal attention projection as well would be a trap: with its gate also 0,
        neither would ever receive a gradient.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        weight = self.x_embedder.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for embedder in [self.t_embedder, *self.micro_embedders.values()]:
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        for embedder in self.micro_embedders.values():
            nn.init.zeros_(embedder.mlp[2].weight)
        if self.pooled_embedder is not None:
            nn.init.normal_(self.pooled_embedder.mlp[0].weight, std=0.02)
            nn.init.zeros_(self.pooled_embedder.mlp[2].weight)
        nn.init.normal_(self.context_embedder[0].weight, std=0.02)
        nn.init.normal_(self.context_embedder[2].weight, std=0.02)
        zeroed = [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for block in self.blocks:
            zeroed += [block.adaLN_modulation[-1], block.cross_attn.proj]
        for linear in zeroed:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def num_params(self, trainable_only: bool = False) -> int:
        """Number of parameters (only those with ``requires_grad`` when ``trainable_only``)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        fps: torch.Tensor | None = None,
        size: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the diffusion target for noised latents.

        Args:
            x: (B, in_channels + cond_channels, T, H, W) noised latents, conditioning channels last;
                T, H, W divisible by patch_size.
            t: (B,) diffusion time in [0, 1].
            context: (B, L, context_dim) text-encoder tokens.
            context_mask: (B, L) bool, True for real tokens; None: all real. A row with no real
                token (empty caption) gets no cross-attention contribution (exactly 0).
            fps: (B,) frames per second; required iff "fps" is in micro_conditions.
            size: (B, 2) (height, width) or (B, 3) (frames, height, width) of the source video;
                required iff any of those is in micro_conditions.

        Returns:
            (B, out_channels, T, H, W) in the parameter dtype.
        """
        grid = self._check_inputs(x, t, context, context_mask)
        tokens = self.x_embedder(x).to(self.x_embedder.weight.dtype)  # B D T' H' W'
        # contiguous residual stream: each norm and linear would otherwise copy the permuted view, and
        # under torch.compile a view (with a ._base) as the first block's input guards differently from
        # the later blocks' inputs, an extra recompile once shapes turn dynamic
        tokens = rearrange(tokens, "b d t h w -> b (t h w) d").contiguous()  # B N D
        c = self.t_embedder(t) + self._micro_embedding(fps, size, x.shape[0])  # B D float32
        if self.pooled_embedder is not None:
            c = c + self.pooled_embedder(context, context_mask)
        ctx = self.context_embedder(context)  # B L D
        attn_mask, has_context = context_attention_mask(context_mask)  # B 1 1 L, B
        rope = self._rope_tables(grid, x.device)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(
                    block, tokens, c, ctx, attn_mask, has_context, grid, rope, use_reentrant=False
                )
            else:
                tokens = block(tokens, c, ctx, attn_mask, has_context, grid, rope)  # B N D
        out = self.final_layer(tokens, c).to(tokens.dtype)  # B N pt*ph*pw*C_out
        pt, ph, pw = self.patch_size
        pattern = "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)"
        return rearrange(out, pattern, t=grid[0], h=grid[1], pt=pt, ph=ph, pw=pw)  # B C_out T H W

    def _check_inputs(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None
    ) -> tuple[int, int, int]:
        """Validate forward inputs; return the token grid (T', H', W')."""
        channels = self.in_channels + self.cond_channels
        if x.ndim != 5 or x.shape[1] != channels:
            raise ValueError(
                f"x must be (B, {channels}, T, H, W) = in_channels ({self.in_channels}) + cond_channels "
                f"({self.cond_channels}) concatenated along C, got shape {tuple(x.shape)}"
            )
        grid = self.token_grid(x.shape[2:])
        batch = x.shape[0]
        if t.shape != (batch,):
            raise ValueError(f"t must have shape (B,) = ({batch},), got {tuple(t.shape)}")
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != self.context_dim:
            raise ValueError(
                f"context must be (B, L, context_dim) = ({batch}, L, {self.context_dim}), got "
                f"{tuple(context.shape)}; context_dim must equal the text encoder's hidden size"
            )
        if context_mask is not None and tuple(context_mask.shape) != tuple(context.shape[:2]):
            raise ValueError(
                f"context_mask must be (B, L) = {tuple(context.shape[:2])}, got {tuple(context_mask.shape)}"
            )
        return grid

    def token_grid(self, latent_thw: Sequence[int]) -> tuple[int, int, int]:
        """Token grid (T', H', W') of a latent (T, H, W): each size divided by the patch size."""
        return token_grid(latent_thw, self.patch_size)

    def num_tokens(self, latent_thw: Sequence[int]) -> int:
        """Number of video tokens S = T' * H' * W' the DiT sees for one latent of size (T, H, W)."""
        return math.prod(self.token_grid(latent_thw))

    def _micro_embedding(
        self, fps: torch.Tensor | None, size: torch.Tensor | None, batch: int
    ) -> torch.Tensor | float:
        """Sum of the enabled micro-condition embeddings (B, D) float32; 0.0 when none are enabled."""
        needs_size = [name for name in self.micro_conditions if name != "fps"]
        if (fps is not None) != ("fps" in self.micro_conditions):
            raise ValueError(
                f"fps must be given exactly when 'fps' is in micro_conditions {list(self.micro_conditions)}"
            )
        if (size is not None) != bool(needs_size):
            raise ValueError(
                f"size must be given exactly when micro_conditions {list(self.micro_conditions)} contains "
                f"one of 'frames', 'height', 'width'"
            )
        values: dict[str, torch.Tensor] = {}
        if fps is not None:
            values["fps"] = fps.reshape(batch)
        if size is not None:
            if size.ndim != 2 or size.shape[0] != batch or size.shape[1] not in (2, 3):
                raise ValueError(
                    f"size must be (B, 2) (height, width) or (B, 3) (frames, height, width), B = {batch}; "
                    f"got {tuple(size.shape)}"
                )
            if "frames" in needs_size and size.shape[1] != 3:
                raise ValueError("micro-condition 'frames' needs size as (B, 3) (frames, height, width)")
            names = ("frames", "height", "width")[3 - size.shape[1] :]
            values.update(zip(names, size.unbind(dim=1)))
        embedding: torch.Tensor | float = 0.0
        for name, embedder in self.micro_embedders.items():
            embedding = embedding + embedder(values[name])
        return embedding

    def _rope_tables(self, grid: tuple[int, int, int], device: torch.device) -> RopeTables:
        """Rotary tables: the (T', H', W') grid for full attention; (1, H', W') and (T', 1, 1) grids
        for factorized attention, so spatial attention rotates only the h, w channels and temporal
        attention only the t channels (the other channels see position 0, i.e. no rotation)."""
        if self.attention == "full":
            return RopeTables(full=self.rope.tables(grid, device))
        spatial = self.rope.tables((1, grid[1], grid[2]), device)
        return RopeTables(spatial=spatial, temporal=self.rope.tables((grid[0], 1, 1), device))
