"""Building blocks of the latent video diffusion transformer (``VideoDiT`` in ``dit.py``).

Token sequences are (B, N, D) with the N = T * H * W patch tokens in row-major ``(t h w)`` order.

Precision: the residual stream stays in the parameter dtype (fp32 under autocast); timestep
embeddings, adaLN modulation, LayerNorm/RMSNorm and the rotary embedding run in float32 with
autocast off, because bf16 shifts/scales/gates and norm statistics visibly degrade diffusion
training (DiT, SD3). Only the large matmuls and the attention kernel follow autocast.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

# sinusoidal features fed to every scalar embedder (DiT's frequency_embedding_size)
FREQUENCY_DIM = 256
# token grid (T', H', W'): latent frames, rows and columns divided by the patch size
Grid = tuple[int, int, int]


def sinusoidal_embedding(
    values: torch.Tensor, dim: int = FREQUENCY_DIM, max_period: float = 10000.0
) -> torch.Tensor:
    """(B,) real values -> (B, dim) float32 ``[cos | sin]`` features at periods up to ``max_period``."""
    half = dim // 2
    exponents = torch.arange(half, dtype=torch.float32, device=values.device) / half
    freqs = torch.exp(-math.log(max_period) * exponents)  # half
    args = values.float()[:, None] * freqs[None]  # B half
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Fp32Linear(nn.Linear):
    """``nn.Linear`` evaluated in float32 with autocast off, also when its weights are bf16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features) float32."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias)


class Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32; returns float32 (callers cast back after modulation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D) float32."""
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


class HeadRMSNorm(nn.Module):
    """RMSNorm over the head dimension with a learnable per-channel scale (QK-norm), in float32.

    Normalising q and k bounds the attention logits, which otherwise grow until softmax saturates
    in large diffusion transformers (ViT-22B, SD3). Shapes: (..., head_dim) -> same, float32.
    """

    def __init__(self, head_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., head_dim) -> (..., head_dim) float32."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)


def _plain_norm(hidden_size: int) -> Fp32LayerNorm:
    """LayerNorm without affine parameters: adaLN supplies the per-sample shift and scale."""
    return Fp32LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, N, D) * (1 + scale) + shift, with shift/scale (B, D) broadcast over tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


def gated_residual(x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """x (B, N, D) + gate (B, D) * branch (B, N, D), in x's dtype; a zero gate adds exactly 0."""
    return x + (gate[:, None] * branch.float()).to(x.dtype)


class TimestepEmbedder(nn.Module):
    """Scalar per sample -> (B, D): sinusoidal features of ``value * scale``, then Linear-SiLU-Linear.

    ``scale=1000`` for diffusion time t in [0, 1] (DiT's integer-timestep frequencies); ``scale=1``
    for micro-conditions such as fps or sizes. Computed in float32.
    """

    def __init__(self, hidden_size: int, scale: float = 1000.0, frequency_dim: int = FREQUENCY_DIM) -> None:
        super().__init__()
        self.scale = scale
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(
            Fp32Linear(frequency_dim, hidden_size), nn.SiLU(), Fp32Linear(hidden_size, hidden_size)
        )

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """(B,) -> (B, D) float32."""
        return self.mlp(sinusoidal_embedding(values.float() * self.scale, self.frequency_dim))


class PooledTextEmbedder(nn.Module):
    """Masked mean of the text tokens -> (B, D), Linear-SiLU-Linear in float32: a pooled text vector added to
    the adaLN conditioning (as SD3 adds CLIP's), so prompt-wide attributes modulate every block directly.
    An empty caption (no real token) pools to zeros."""

    def __init__(self, context_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            Fp32Linear(context_dim, hidden_size), nn.SiLU(), Fp32Linear(hidden_size, hidden_size)
        )

    def forward(self, context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, L, C) tokens and (B, L) bool mask (None: all real) -> (B, D) float32."""
        if context_mask is None:
            weights = context.new_ones(context.shape[:2], dtype=torch.float32)
        else:
            weights = context_mask.float()
        count = weights.sum(dim=1, keepdim=True).clamp_min(1.0)
        pooled = (context.float() * weights[..., None]).sum(dim=1) / count
        return self.mlp(pooled)


class RotaryEmbedding3d(nn.Module):
    """3D rotary position embedding: head_dim = d_t + d_h + d_w, one RoPE per patch-grid axis.

    The channel pairs (2i, 2i+1) of the first d_t channels rotate by ``t * theta ** (-2i / d_t)``,
    the next d_h by the row index h, the last d_w by the column index w (the real form of the
    complex formulation, RoFormer / Lumina / Wan). q . k after rotation then depends on positions
    only through (t_q - t_k, h_q - h_k, w_q - w_k). Tables are built in float32 and cached per grid
    (in eager mode; under torch.compile they are part of the graph).
    """

    def __init__(self, axes_dim: tuple[int, int, int], theta: float = 10000.0) -> None:
        super().__init__()
        self.axes_dim = axes_dim
        self.theta = theta
        self._cache: dict[tuple[Grid, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, grid: Grid, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin tables (N, head_dim / 2) float32 for a (t, h, w) grid of N tokens in (t h w) order."""
        key = (tuple(grid), torch.device(device))
        if torch.compiler.is_compiling():
            # traced into the graph instead (cheap): a dict lookup would guard on the cache's contents
            # and recompile the whole-model graph on the next call, once the key has been added
            return self._build(key[0], key[1])
        if key not in self._cache:
            if len(self._cache) >= 32:  # many bucket shapes: bound the memory instead of growing forever
                self._cache.clear()
            self._cache[key] = self._build(key[0], key[1])
        return self._cache[key]

    def _build(self, grid: Grid, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        gt, gh, gw = grid
        patterns = ("t f -> t h w f", "h f -> t h w f", "w f -> t h w f")
        angles = []
        for size, dim, pattern in zip(grid, self.axes_dim, patterns):
            exponents = torch.arange(0, dim, 2, dtype=torch.float64, device=device) / max(dim, 1)
            inv_freq = self.theta**-exponents  # dim/2
            positions = torch.arange(size, dtype=torch.float64, device=device)
            axis = torch.outer(positions, inv_freq)  # size dim/2
            angles.append(repeat(axis, pattern, t=gt, h=gh, w=gw))
        table = rearrange(torch.cat(angles, dim=-1), "t h w f -> (t h w) f")  # N head_dim/2
        # angles in float64 so large positions keep their precision before the fp32 cos/sin
        return torch.cos(table).float(), torch.sin(table).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of x (B, heads, N, head_dim) by tables (N, head_dim / 2); float32 out."""
    pairs = rearrange(x.float(), "... (f two) -> ... f two", two=2)
    real, imag = pairs.unbind(dim=-1)  # B heads N f
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return rearrange(rotated, "... f two -> ... (f two)")


class RopeTables(NamedTuple):
    """Per-forward rotary tables: ``full`` for joint attention over the (t, h, w) grid; ``spatial``
    for the (1, h, w) grid and ``temporal`` for the (t, 1, 1) grid of factorized attention."""

    full: tuple[torch.Tensor, torch.Tensor] | None = None
    spatial: tuple[torch.Tensor, torch.Tensor] | None = None
    temporal: tuple[torch.Tensor, torch.Tensor] | None = None


class SelfAttention(nn.Module):
    """Multi-head self-attention with QK RMSNorm and RoPE through ``scaled_dot_product_attention``.

    Shapes: x (B, N, D), cos/sin (N, head_dim / 2) -> (B, N, D).
    """

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.q_norm: nn.Module = HeadRMSNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm: nn.Module = HeadRMSNorm(head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, N, D)."""
        pattern = "b n (three heads d) -> three b heads n d"
        qkv = rearrange(self.qkv(x), pattern, three=3, heads=self.num_heads)
        q, k, v = qkv.unbind(dim=0)  # B heads N d each
        q = apply_rope(self.q_norm(q), cos, sin).to(v.dtype)
        k = apply_rope(self.k_norm(k), cos, sin).to(v.dtype)
        out = F.scaled_dot_product_attention(q, k, v)  # B heads N d
        return self.proj(rearrange(out, "b heads n d -> b n (heads d)"))


class CrossAttention(nn.Module):
    """Video tokens attend to (already embedded) text tokens, honouring the padding mask.

    Shapes: x (B, N, D), context (B, L, D), attn_mask (B, 1, 1, L) bool (True = attend) or None,
    has_context (B,) bool or None -> (B, N, D). Rows with no valid token (``has_context`` False)
    return exactly 0: their mask must already be made attendable (see ``context_attention_mask``)
    so that softmax never sees an all -inf row (0 / 0 = NaN).
    """

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = hidden_size // num_heads
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.q_norm: nn.Module = HeadRMSNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm: nn.Module = HeadRMSNorm(head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        attn_mask: torch.Tensor | None,
        has_context: torch.Tensor | None,
    ) -> torch.Tensor:
        """(B, N, D), (B, L, D) -> (B, N, D)."""
        q = rearrange(self.q(x), "b n (heads d) -> b heads n d", heads=self.num_heads)
        kv = rearrange(self.kv(context), "b l (two heads d) -> two b heads l d", two=2, heads=self.num_heads)
        k, v = kv.unbind(dim=0)  # B heads L d each
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # B heads N d
        out = self.proj(rearrange(out, "b heads n d -> b n (heads d)"))
        if has_context is None:
            return out
        return torch.where(has_context[:, None, None], out, torch.zeros_like(out))


def context_attention_mask(
    context_mask: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(B, L) bool padding mask (True = real token) -> SDPA mask (B, 1, 1, L) and has_context (B,).

    An all-False row (e.g. an empty caption) is made fully attendable so the kernel stays finite;
    ``CrossAttention`` then zeroes that sample's output, so an empty caption means no text input.
    """
    if context_mask is None:
        return None, None
    mask = context_mask.bool()
    has_context = mask.any(dim=1)  # B
    safe = mask | ~has_context[:, None]
    return rearrange(safe, "b l -> b 1 1 l"), has_context


class Mlp(nn.Module):
    """Linear -> GELU(tanh) -> Linear (DiT's pointwise feed-forward). (B, N, D) -> (B, N, D)."""

    def __init__(self, hidden_size: int, mlp_ratio: float) -> None:
        super().__init__()
        inner = int(hidden_size * mlp_ratio)
        self.fc1 = nn.Linear(hidden_size, inner)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(inner, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, N, D)."""
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero self-attention(s) and MLP, and un-modulated cross-attention.

    ``full``: x += g1 * attn(mod(norm1(x))) over all T * H * W tokens.
    ``factorized``: x += g1 * attn(mod(norm1(x))) over the H * W tokens of each frame (RoPE on the
    h, w channels only), then x += g_t * temporal_attn(mod_t(norm_t(x))) over the T tokens of each
    spatial location (RoPE on the t channels only). With T = 1 the temporal sub-block is skipped:
    attention over one token is only a per-token linear map, so skipping makes an image an exact
    spatial-only pass (its parameters then get no gradient; DDP needs find_unused_parameters).
    Then x += cross_attn(norm_c(x), context) (PixArt-alpha: text is not modulated by t; its output
    projection starts at zero) and x += g2 * mlp(mod(norm2(x))).

    The modulation chunks are ordered (shift, scale, gate) x (attn, mlp[, temporal]), so dropping
    the temporal chunks and ``temporal_attn`` leaves exactly the parameters of a ``full`` block.
    Shapes: x (B, N, D) with N = T * H * W in (t h w) order, c (B, D) -> (B, N, D).
    """

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float, factorized: bool, qk_norm: bool
    ) -> None:
        super().__init__()
        self.num_chunks = 9 if factorized else 6
        self.norm1 = _plain_norm(hidden_size)
        self.attn = SelfAttention(hidden_size, num_heads, qk_norm)
        self.norm_temporal = _plain_norm(hidden_size) if factorized else None
        self.temporal_attn = SelfAttention(hidden_size, num_heads, qk_norm) if factorized else None
        self.norm_cross = Fp32LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6)
        self.cross_attn = CrossAttention(hidden_size, num_heads, qk_norm)
        self.norm2 = _plain_norm(hidden_size)
        self.mlp = Mlp(hidden_size, mlp_ratio)
        modulation = Fp32Linear(hidden_size, self.num_chunks * hidden_size)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), modulation)

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        context: torch.Tensor,
        attn_mask: torch.Tensor | None,
        has_context: torch.Tensor | None,
        grid: Grid,
        rope: RopeTables,
    ) -> torch.Tensor:
        """(B, N, D) -> (B, N, D); context (B, L, D), masks as in ``CrossAttention``."""
        chunks = self.adaLN_modulation(c).chunk(self.num_chunks, dim=-1)  # each B D, float32
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = chunks[:6]
        h = modulate(self.norm1(x), shift_msa, scale_msa).to(x.dtype)  # B N D
        x = gated_residual(x, gate_msa, self._spatial_attention(h, grid, rope))
        if self.temporal_attn is not None and grid[0] > 1:
            shift_tmp, scale_tmp, gate_tmp = chunks[6:]
            h = modulate(self.norm_temporal(x), shift_tmp, scale_tmp).to(x.dtype)  # B N D
            x = gated_residual(x, gate_tmp, self._temporal_attention(h, grid, rope))
        x = x + self.cross_attn(self.norm_cross(x).to(x.dtype), context, attn_mask, has_context).to(x.dtype)
        h = modulate(self.norm2(x), shift_mlp, scale_mlp).to(x.dtype)  # B N D
        return gated_residual(x, gate_mlp, self.mlp(h))

    def _spatial_attention(self, h: torch.Tensor, grid: Grid, rope: RopeTables) -> torch.Tensor:
        """Joint attention over all tokens (full) or per frame (factorized). (B, N, D) -> (B, N, D)."""
        if self.temporal_attn is None:
            return self.attn(h, *rope.full)
        frames = rearrange(h, "b (t s) d -> (b t) s d", t=grid[0])  # B*T H*W D
        return rearrange(self.attn(frames, *rope.spatial), "(b t) s d -> b (t s) d", t=grid[0])

    def _temporal_attention(self, h: torch.Tensor, grid: Grid, rope: RopeTables) -> torch.Tensor:
        """Attention over the T tokens of every spatial location. (B, N, D) -> (B, N, D)."""
        tracks = rearrange(h, "b (t s) d -> (b s) t d", t=grid[0])  # B*H*W T D
        out = self.temporal_attn(tracks, *rope.temporal)
        # b from the tensor rather than s = H' * W' from grid: under torch.compile the grid's h, w ints
        # then need no guards (nor specialisation under dynamic shapes) of their own
        return rearrange(out, "(b s) t d -> b (t s) d", b=h.shape[0])


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map to the patch values (DiT). (B, N, D) -> (B, N, P)."""

    def __init__(self, hidden_size: int, out_features: int) -> None:
        super().__init__()
        self.norm_final = _plain_norm(hidden_size)
        self.linear = nn.Linear(hidden_size, out_features)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Fp32Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, N, D), c (B, D) -> (B, N, out_features)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)  # B D each
        return self.linear(modulate(self.norm_final(x), shift, scale).to(x.dtype))
