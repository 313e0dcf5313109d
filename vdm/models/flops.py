"""Analytic matmul FLOPs of the latent video DiT (``VideoDiT``) and the causal video VAE (``VideoVAE``).

Conventions (the usual MFU ones, e.g. Kaplan et al. 2020, PaLM appendix B):

- Only matrix products are counted, 2 FLOPs per multiply-add: linear layers, convolutions as
  matmuls (``2 * output elements * in_channels / groups * kernel volume``) and the two attention
  products (scores ``q k^T`` and values ``p v``). Biases, elementwise work, norms, softmax,
  activations, modulation, RoPE, pooling and repetition shortcuts are not counted.
- Self-attention over S tokens of width d costs ``4 * d * S**2`` (scores + values). Factorized
  attention is spatial attention over the H'W' tokens of each of the T' frames
  (``4 * d * T' * (H'W')**2``) then temporal attention over the T' tokens of each location
  (``4 * d * H'W' * T'**2``); the temporal sub-block is skipped when T' = 1, as in ``DiTBlock``.
- Text: the caption projection, the cross-attention k/v projections and the cross-attention
  products are counted over the L REAL text tokens (``context_len``), not the padded length the
  kernels actually see; an empty caption (L = 0) still pays the q and output projections, which
  the model computes and then zeroes.
- adaLN modulation, the timestep and micro-condition embedders act on one conditioning vector
  per sample: counted once per sample, never per token.
- Training = 3 x forward (forward, backward to activations, backward to weights). Recomputation
  under gradient checkpointing is not counted (model FLOPs, not hardware FLOPs). With
  ``input_grads=False`` the gradients with respect to the model inputs are left out, i.e. the
  backward-to-activations of the first layer on each input that needs no gradient (noised latents,
  text tokens and the sinusoidal timestep features of the DiT; the pixels, or the latents when only
  decoding, of the VAE): autograd skips them, so this is the count a profiler measures.
- ``batch`` multiplies the per-sample count: every sample of a batch has the same shape.

Agreement with ``torch.utils.flop_counter.FlopCounterMode`` (tests/test_flops.py): equal, forward
and training with ``input_grads=False``, when the text mask has no padding. The 3 x convention is
0.01-1.3% above the counter on the DiT and VAE presets, 4-4.5% for encoding alone with the tiny VAE
(whose first conv is 12-13% of its encoder). On CPU the counter only sees attention when
SDPA runs its math backend: the fused ``_scaled_dot_product_flash_attention_for_cpu`` kernel has
no flop formula and counts 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from vdm.models.dit import VideoDiT
from vdm.models.dit_layers import CrossAttention, DiTBlock, SelfAttention
from vdm.models.layers import CausalConv3d, Downsample3d, ResBlock3d, Upsample3d
from vdm.models.vae import VideoVAE

TRAINING_MULTIPLIER = 3
Shape3 = tuple[int, int, int]


def _linear(layer: nn.Linear, rows: int) -> int:
    """FLOPs of ``layer`` applied to ``rows`` vectors (bias not counted)."""
    return 2 * rows * layer.in_features * layer.out_features


def _attention_products(width: int, queries: int, keys: int) -> int:
    """Scores and values of multi-head attention, summed over heads: 2 * (2 * queries * keys * width)."""
    return 4 * width * queries * keys


def _conv_output(conv: nn.Conv3d, thw: Shape3) -> Shape3:
    """Output (T, H, W) of a 3D conv; ``CausalConv3d`` pads time at the front only."""
    if isinstance(conv.padding, str):
        raise ValueError(f"string padding {conv.padding!r} is not supported by the FLOP walk")
    padding = [2 * p for p in conv.padding]
    if isinstance(conv, CausalConv3d):
        padding[0] += conv.time_padding
    geometry = zip(thw, padding, conv.kernel_size, conv.stride, conv.dilation)
    sizes = [(size + pad - dil * (k - 1) - 1) // stride + 1 for size, pad, k, stride, dil in geometry]
    return tuple(sizes)  # type: ignore[return-value]


def _conv(conv: nn.Conv3d, thw: Shape3) -> tuple[int, Shape3]:
    """(FLOPs, output (T, H, W)) of a 3D conv on an input of size ``thw``."""
    out = _conv_output(conv, thw)
    per_output = conv.in_channels // conv.groups * math.prod(conv.kernel_size)
    return 2 * conv.out_channels * math.prod(out) * per_output, out


def _check_batch(batch: int) -> None:
    """Raise ValueError for a negative batch size."""
    if batch < 0:
        raise ValueError(f"batch must be >= 0, got {batch}")


# --- DiT ---------------------------------------------------------------------------------------


def _self_attention(attn: SelfAttention, width: int, tokens: int, groups: int, group_len: int) -> int:
    """Projections over all ``tokens`` and attention products within ``groups`` of ``group_len``."""
    projections = _linear(attn.qkv, tokens) + _linear(attn.proj, tokens)
    return projections + groups * _attention_products(width, group_len, group_len)


def _cross_attention(attn: CrossAttention, width: int, tokens: int, context_len: int) -> int:
    """q and output projections over the video tokens, k/v over the text tokens, and the products."""
    projections = _linear(attn.q, tokens) + _linear(attn.proj, tokens) + _linear(attn.kv, context_len)
    return projections + _attention_products(width, tokens, context_len)


def _block_flops(block: DiTBlock, width: int, grid: Shape3, context_len: int) -> dict[str, int]:
    """Forward FLOPs of one ``DiTBlock`` for one sample, by part."""
    gt, gh, gw = grid
    tokens = gt * gh * gw
    modulation = block.adaLN_modulation[-1]
    parts = {"adaln": _linear(modulation, 1)}  # once per sample: c is (B, D)
    if block.temporal_attn is None:
        parts["self_attention"] = _self_attention(block.attn, width, tokens, 1, tokens)
    else:
        parts["self_attention"] = _self_attention(block.attn, width, tokens, gt, gh * gw)
        if gt > 1:  # DiTBlock skips the temporal sub-block for a single frame
            parts["self_attention"] += _self_attention(block.temporal_attn, width, tokens, gh * gw, gt)
    parts["cross_attention"] = _cross_attention(block.cross_attn, width, tokens, context_len)
    parts["mlp"] = _linear(block.mlp.fc1, tokens) + _linear(block.mlp.fc2, tokens)
    return parts


def dit_flops_breakdown(model: VideoDiT, latent_thw: Sequence[int], context_len: int) -> dict[str, int]:
    """Forward FLOPs of ``model`` for ONE sample, by component (summed over the blocks).

    Args:
        model: the DiT (only its sizes are read; any device, including meta).
        latent_thw: (T, H, W) of the latent video, divisible by the patch size.
        context_len: number of real (unpadded) text tokens L >= 0.

    Returns:
        ``patch_embed``, ``conditioning`` (timestep and micro-condition embedders),
        ``text_embed`` (caption projection), ``adaln`` (blocks and final layer),
        ``self_attention``, ``cross_attention``, ``mlp`` and ``final_linear``.
    """
    if context_len < 0:
        raise ValueError(f"context_len (real text tokens) must be >= 0, got {context_len}")
    grid = model.token_grid(latent_thw)
    tokens, width = math.prod(grid), model.hidden_size
    embedders = [model.t_embedder, *model.micro_embedders.values(), *_pooled(model)]
    text_linears = [m for m in model.context_embedder if isinstance(m, nn.Linear)]
    parts = {
        "patch_embed": _conv(model.x_embedder, tuple(g * p for g, p in zip(grid, model.patch_size)))[0],
        "conditioning": sum(_linear(e.mlp[0], 1) + _linear(e.mlp[2], 1) for e in embedders),
        "text_embed": sum(_linear(m, context_len) for m in text_linears),
        "adaln": _linear(model.final_layer.adaLN_modulation[-1], 1),
        "self_attention": 0,
        "cross_attention": 0,
        "mlp": 0,
        "final_linear": _linear(model.final_layer.linear, tokens),
    }
    for block in model.blocks:
        for name, flops in _block_flops(block, width, grid, context_len).items():
            parts[name] += flops
    return parts


def _pooled(model: VideoDiT) -> list[nn.Module]:
    """The pooled-text embedder, when the model has one (it acts on one pooled vector per sample)."""
    embedder = getattr(model, "pooled_embedder", None)
    return [embedder] if embedder is not None else []


def _dit_input_layers(model: VideoDiT, patch_embed: int, context_len: int) -> int:
    """Forward FLOPs of the first layer on each DiT input (latents, text tokens, sinusoidal features):
    the backward to their inputs is what autograd skips when those need no gradient."""
    embedders = [model.t_embedder, *model.micro_embedders.values(), *_pooled(model)]
    first_text = _linear(model.context_embedder[0], context_len)
    return patch_embed + first_text + sum(_linear(e.mlp[0], 1) for e in embedders)


def _total(forward: int, input_layers: int, batch: int, training: bool, input_grads: bool) -> int:
    """Scale a per-sample forward count to ``batch`` samples and, if ``training``, a training step."""
    _check_batch(batch)
    if not training:
        return forward * batch
    skipped = 0 if input_grads else input_layers
    return (TRAINING_MULTIPLIER * forward - skipped) * batch


def dit_flops(
    model: VideoDiT,
    latent_thw: Sequence[int],
    context_len: int,
    *,
    batch: int = 1,
    training: bool = False,
    input_grads: bool = True,
) -> int:
    """Matmul FLOPs of a DiT forward (or a training step when ``training``) over ``batch`` samples.

    Each sample is a latent of size (T, H, W) with ``context_len`` real text tokens. ``input_grads``
    (training only): False leaves out the gradients w.r.t. the inputs (see the module docstring).
    """
    parts = dit_flops_breakdown(model, latent_thw, context_len)
    input_layers = _dit_input_layers(model, parts["patch_embed"], context_len)
    return _total(sum(parts.values()), input_layers, batch, training, input_grads)


# --- VAE ---------------------------------------------------------------------------------------


def _block(block: nn.Module, thw: Shape3) -> tuple[int, Shape3]:
    """(FLOPs, output (T, H, W)) of one encoder/decoder block."""
    if isinstance(block, ResBlock3d):
        first, mid = _conv(block.conv1, thw)
        second, out = _conv(block.conv2, mid)
        shortcut = _conv(block.shortcut, thw)[0] if isinstance(block.shortcut, nn.Conv3d) else 0
        return first + second + shortcut, out
    if isinstance(block, Downsample3d):
        return _conv(block.conv, thw)
    if isinstance(block, Upsample3d):
        frames = 1 + 2 * (thw[0] - 1) if block.temporal else thw[0]
        return _conv(block.conv, (frames, 2 * thw[1], 2 * thw[2]))
    raise TypeError(
        f"no FLOP rule for VAE block {type(block).__name__}; add one to vdm/models/flops.py (_block)"
    )


def _stack(stack: nn.Module, thw: Shape3) -> tuple[int, Shape3]:
    """(FLOPs, output (T, H, W)) of ``Encoder3d`` / ``Decoder3d``: conv_in, blocks, conv_out.

    ``thw`` is the size after the encoder's space-to-depth folding (pixels / patch_size), or the
    latent size for the decoder; the output is before the decoder's depth-to-space unfolding.
    """
    flops, thw = _conv(stack.conv_in, thw)
    for block in stack.blocks:
        block_flops, thw = _block(block, thw)
        flops += block_flops
    out_flops, thw = _conv(stack.conv_out, thw)
    return flops + out_flops, thw


def vae_flops(
    model: VideoVAE,
    num_frames: int,
    height: int,
    width: int,
    *,
    batch: int = 1,
    training: bool = False,
    encode: bool = True,
    decode: bool = True,
    input_grads: bool = True,
) -> int:
    """Matmul FLOPs of encoding and/or decoding ``batch`` videos of (num_frames, height, width) pixels.

    The VAE is convolution-only, so this is the sum over its convolutions, walked block by block
    with the output size of each one. Counts the full (untiled) pass; temporal chunking computes
    the same convolution windows, spatial tiling adds the overlaps. ``decode`` alone decodes the
    latent of such a video. ``training`` and ``input_grads`` as in ``dit_flops``.
    """
    _, *latent_thw = model.latent_shape((model.in_channels, num_frames, height, width))  # validates sizes
    p = model.patch_size
    pixels_thw = (num_frames, height // p, width // p)  # after space-to-depth folding
    forward, input_layer = 0, 0
    if encode:
        flops, out = _stack(model.encoder, pixels_thw)
        if list(out) != latent_thw:
            raise RuntimeError(f"FLOP walk reached encoder output {out}, expected the latent {latent_thw}")
        forward += flops
        input_layer = _conv(model.encoder.conv_in, pixels_thw)[0]
    if decode:
        flops, out = _stack(model.decoder, tuple(latent_thw))
        if out != pixels_thw:
            raise RuntimeError(f"FLOP walk reached decoder output {out}, expected {pixels_thw}")
        forward += flops
        if not encode:  # when encoding too, the latents carry the encoder's gradient
            input_layer = _conv(model.decoder.conv_in, tuple(latent_thw))[0]
    return _total(forward, input_layer, batch, training, input_grads)
