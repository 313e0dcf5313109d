"""Tests for the latent video DiT: shapes, factorized attention, RoPE, masks, init, checkpoints, presets."""

from __future__ import annotations

import inspect
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from tests.helpers.config import config_option
from vdm.models.dit import VideoDiT, default_rope_axes_dim
from vdm.models.dit_layers import RopeTables, RotaryEmbedding3d, apply_rope, context_attention_mask
from vdm.models.flops import dit_flops

CONF_MODEL = Path(__file__).resolve().parents[1] / "conf" / "model"
TINY = dict(in_channels=4, hidden_size=32, depth=2, num_heads=4, context_dim=24)


def make_dit(seed: int = 0, randomize: bool = False, **overrides) -> VideoDiT:
    """Build a tiny DiT in eval mode; ``randomize`` perturbs every weight so zero-init branches are live."""
    torch.manual_seed(seed)
    model = VideoDiT(**{**TINY, **overrides}).eval()
    if randomize:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return model


def inputs(model: VideoDiT, frames: int = 4, size: int = 8, batch: int = 2, length: int = 6, seed: int = 1):
    """Noised latents, times, text tokens and a padding mask (sample 0 has 4 real tokens, the rest all)."""
    gen = torch.Generator().manual_seed(seed)
    channels = model.in_channels + model.cond_channels
    x = torch.randn(batch, channels, frames, size, size, generator=gen)
    t = torch.rand(batch, generator=gen)
    context = torch.randn(batch, length, model.context_dim, generator=gen)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, 4:] = False
    return x, t, context, mask


# --- shapes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["full", "factorized"])
@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"cond_channels": 5},
        {"out_channels": 8, "patch_size": (2, 2, 2)},
        {"micro_conditions": ["fps", "height"]},
    ],
)
def test_output_shapes(attention: str, extra: dict) -> None:
    model = make_dit(attention=attention, **extra)
    x, t, context, mask = inputs(model)
    kwargs = {}
    if "micro_conditions" in extra:
        kwargs = {"fps": torch.tensor([8.0, 24.0]), "size": torch.tensor([[256.0, 256.0], [128.0, 512.0]])}
    out = model(x, t, context, mask, **kwargs)
    assert out.shape == (2, model.out_channels, 4, 8, 8)
    assert out.dtype == torch.float32


def test_micro_conditions_are_wired() -> None:
    model = make_dit(randomize=True, micro_conditions=["fps", "frames", "height", "width"])
    x, t, context, mask = inputs(model)
    size = torch.tensor([[17.0, 256.0, 256.0], [33.0, 128.0, 512.0]])
    out = model(x, t, context, mask, fps=torch.tensor([8.0, 24.0]), size=size)
    assert not torch.allclose(out, model(x, t, context, mask, fps=torch.tensor([12.0, 24.0]), size=size))
    with pytest.raises(ValueError, match="fps must be given"):
        model(x, t, context, mask, size=size)
    with pytest.raises(ValueError, match="'frames' needs size as \\(B, 3\\)"):
        model(x, t, context, mask, fps=torch.tensor([8.0, 24.0]), size=size[:, 1:])


# --- factorized attention ----------------------------------------------------------------------


def spatial_only_state(factorized: VideoDiT) -> dict[str, torch.Tensor]:
    """The factorized model's weights without its temporal sub-blocks, as a full-attention state dict."""
    rows = 6 * factorized.hidden_size  # adaLN chunks (attn, mlp) come before the temporal ones
    state = {}
    for key, value in factorized.state_dict().items():
        if ".temporal_attn." in key:
            continue
        if ".adaLN_modulation." in key and key.startswith("blocks."):
            value = value[:rows]
        state[key] = value
    return state


def test_factorized_single_frame_equals_spatial_only_model() -> None:
    """With T = 1 the factorized model is exactly the full-attention model with its temporal
    sub-blocks removed (for any weights), and its temporal parameters have no effect."""
    factorized = make_dit(attention="factorized", randomize=True)
    full = make_dit(attention="full")
    full.load_state_dict(spatial_only_state(factorized), strict=True)
    x, t, context, mask = inputs(factorized, frames=1)
    out = factorized(x, t, context, mask)
    torch.testing.assert_close(out, full(x, t, context, mask), rtol=0, atol=1e-6)
    with torch.no_grad():
        for block in factorized.blocks:
            for p in block.temporal_attn.parameters():
                p.add_(1.0)
    assert torch.equal(factorized(x, t, context, mask), out)
    # with several frames the temporal sub-blocks do mix time
    x4, t4, context4, mask4 = inputs(factorized, frames=4)
    assert not torch.allclose(factorized(x4, t4, context4, mask4), full(x4, t4, context4, mask4), atol=1e-3)


@pytest.mark.parametrize("attention", ["full", "factorized"])
def test_attention_mixes_frames(attention: str) -> None:
    model = make_dit(attention=attention, randomize=True)
    x, t, context, mask = inputs(model, frames=3)
    out = model(x, t, context, mask)
    x2 = x.clone()
    x2[:, :, 2] += 1.0
    changed = (model(x2, t, context, mask) - out).abs().amax(dim=(0, 1, 3, 4))
    assert changed[0] > 0 and changed[1] > 0  # earlier frames see frame 2: attention is not causal


# --- rotary position embedding ----------------------------------------------------------------


def test_rope_scores_depend_only_on_relative_position() -> None:
    grid, head_dim = (5, 6, 7), 24
    rope = RotaryEmbedding3d(default_rope_axes_dim(head_dim))
    cos, sin = rope.tables(grid, torch.device("cpu"))
    assert cos.shape == (5 * 6 * 7, head_dim // 2)
    gen = torch.Generator().manual_seed(0)
    n = cos.shape[0]
    q = apply_rope(torch.randn(head_dim, generator=gen).expand(1, 1, n, head_dim), cos, sin)[0, 0]
    k = apply_rope(torch.randn(head_dim, generator=gen).expand(1, 1, n, head_dim), cos, sin)[0, 0]
    scores = q @ k.T  # N N: score of a query at position i with a key at position j

    def index(p: tuple[int, int, int]) -> int:
        return (p[0] * grid[1] + p[1]) * grid[2] + p[2]

    cases = [  # (query position, key position, offset added to both), all inside the grid
        ((0, 0, 0), (1, 2, 3), (3, 2, 1)),
        ((4, 5, 6), (2, 0, 1), (-2, 0, -1)),
        ((1, 3, 0), (1, 3, 0), (2, 1, 4)),
        ((0, 1, 2), (4, 1, 0), (0, 4, 3)),
        ((2, 2, 2), (0, 5, 6), (1, 0, -1)),
    ]
    for p1, p2, offset in cases:
        s1, s2 = [tuple(a + o for a, o in zip(p, offset)) for p in (p1, p2)]
        shifted, original = scores[index(s1), index(s2)], scores[index(p1), index(p2)]
        torch.testing.assert_close(shifted, original, rtol=0, atol=1e-5)
    # and it does depend on the relative position along every axis
    for axis_step in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]:
        assert not torch.isclose(scores[0, index(axis_step)], scores[0, 0], atol=1e-4)


def test_rope_axis_split_and_factorized_tables() -> None:
    assert default_rope_axes_dim(64) == (24, 20, 20)
    assert default_rope_axes_dim(72) == (24, 24, 24)
    assert default_rope_axes_dim(8) == (4, 2, 2)
    model = make_dit(attention="factorized", rope_axes_dim=(4, 2, 2))
    rope = model._rope_tables((3, 2, 2), torch.device("cpu"))
    assert isinstance(rope, RopeTables) and rope.full is None
    (cos_s, sin_s), (cos_t, sin_t) = rope.spatial, rope.temporal
    # spatial attention rotates only the (h, w) channel pairs, temporal only the t pairs
    assert torch.equal(cos_s[:, :2], torch.ones(4, 2)) and torch.equal(sin_s[:, :2], torch.zeros(4, 2))
    assert torch.equal(cos_t[:, 2:], torch.ones(3, 2)) and torch.equal(sin_t[:, 2:], torch.zeros(3, 2))
    assert not torch.equal(sin_s[:, 2:], torch.zeros(4, 2))
    assert not torch.equal(sin_t[:, :2], torch.zeros(3, 2))


# --- text cross-attention ----------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["full", "factorized"])
def test_padded_context_tokens_are_ignored(attention: str) -> None:
    model = make_dit(attention=attention, randomize=True)
    x, t, context, mask = inputs(model)
    out = model(x, t, context, mask)
    noisy = context.clone()
    noisy[0, 4:] = 100 * torch.randn(2, model.context_dim)
    torch.testing.assert_close(model(x, t, noisy, mask), out, rtol=0, atol=1e-6)
    # real tokens matter
    noisy[0, 0] += 1.0
    assert not torch.allclose(model(x, t, noisy, mask)[0], out[0])


def test_fully_masked_context_is_finite_and_means_no_text() -> None:
    model = make_dit(randomize=True).train()
    x, t, context, mask = inputs(model)
    mask[1] = False  # an empty caption
    out = model(x, t, context, mask)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        # the empty-caption sample ignores its tokens; the other sample is unaffected by the batch
        other_text = model(x, t, torch.randn_like(context), mask)
        torch.testing.assert_close(other_text[1], out[1], rtol=0, atol=1e-6)
        torch.testing.assert_close(model(x[:1], t[:1], context[:1], mask[:1])[0], out[0], rtol=0, atol=1e-5)
    attn_mask, has_context = context_attention_mask(mask)
    assert attn_mask.shape == (2, 1, 1, 6) and attn_mask[1].all() and has_context.tolist() == [True, False]


# --- init ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["full", "factorized"])
def test_adaln_zero_init(attention: str) -> None:
    model = make_dit(attention=attention, cond_channels=2, micro_conditions=["fps"])
    x, t, context, mask = inputs(model)
    out = model(x, t, context, mask, fps=torch.tensor([8.0, 30.0]))
    assert torch.equal(out, torch.zeros_like(out))
    fps_embedding = model.micro_embedders["fps"](torch.tensor([8.0, 30.0]))
    assert torch.equal(fps_embedding, torch.zeros(2, model.hidden_size))  # c is the timestep embedding alone
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randn(2, 4 * 4 * 4, model.hidden_size, generator=gen)
    c = torch.randn(2, model.hidden_size, generator=gen)
    ctx = model.context_embedder(context)
    attn_mask, has_context = context_attention_mask(mask)
    rope = model._rope_tables((4, 4, 4), torch.device("cpu"))
    for block in model.blocks:
        assert torch.equal(block(tokens, c, ctx, attn_mask, has_context, (4, 4, 4), rope), tokens)
    # the final layer still gets a gradient, so training can start
    model(x, t, context, mask, fps=torch.tensor([8.0, 30.0])).sum().backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


# --- checkpointing, persistence, determinism ---------------------------------------------------


@pytest.mark.parametrize("attention", ["full", "factorized"])
def test_gradient_checkpointing_matches(attention: str) -> None:
    results = []
    for enabled in (False, True):
        model = make_dit(attention=attention, randomize=True, gradient_checkpointing=enabled).train()
        assert model.gradient_checkpointing is enabled
        x, t, context, mask = inputs(model)
        out = model(x, t, context, mask)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6, msg=name)


def test_state_dict_round_trip(tmp_path: Path) -> None:
    model = make_dit(attention="factorized", randomize=True, cond_channels=3, micro_conditions=["fps"])
    path = tmp_path / "dit.pt"
    torch.save(model.state_dict(), path)
    loaded = make_dit(seed=7, attention="factorized", cond_channels=3, micro_conditions=["fps"])
    loaded.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x, t, context, mask = inputs(model)
    fps = torch.tensor([8.0, 24.0])
    assert torch.equal(loaded(x, t, context, mask, fps=fps), model(x, t, context, mask, fps=fps))


def test_determinism_with_seed() -> None:
    a, b = make_dit(seed=3), make_dit(seed=3)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    a, b = make_dit(seed=3, randomize=True), make_dit(seed=3, randomize=True)
    x, t, context, mask = inputs(a)
    assert torch.equal(a(x, t, context, mask), b(x, t, context, mask))
    assert not torch.equal(make_dit(seed=4).x_embedder.weight, a.x_embedder.weight)


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"hidden_size": 30, "num_heads": 4}, r"hidden_size \(30\) must be divisible by num_heads \(4\)"),
        ({"hidden_size": 36, "num_heads": 4}, r"head_dim .* = 9 must be even"),
        ({"rope_axes_dim": (2, 2, 2)}, r"summing to head_dim = 8"),
        ({"rope_axes_dim": (8, 0, 0)}, r"spatial axis without position"),
        ({"attention": "joint"}, r"attention must be 'full'"),
        ({"patch_size": (2, 2)}, r"patch_size must be three ints"),
        ({"micro_conditions": ["fps", "aspect"]}, r"micro_conditions must be distinct names"),
        ({"cond_channels": -1}, r"cond_channels >= 0"),
    ],
)
def test_constructor_validation(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VideoDiT(**{**TINY, **overrides})


def test_forward_validation() -> None:
    model = make_dit(patch_size=(2, 2, 2), cond_channels=1)
    x, t, context, mask = inputs(model, frames=3, size=8)
    with pytest.raises(ValueError, match=r"= \(3, 8, 8\) must be divisible by patch_size \(2, 2, 2\)"):
        model(x, t, context, mask)
    x, t, context, mask = inputs(model, frames=4, size=8)
    with pytest.raises(ValueError, match=r"in_channels \(4\) \+ cond_channels \(1\)"):
        model(x[:, :4], t, context, mask)
    with pytest.raises(ValueError, match=r"context_dim must equal the text encoder's hidden size"):
        model(x, t, context[..., :8], mask)
    with pytest.raises(ValueError, match=r"context_mask must be \(B, L\)"):
        model(x, t, context, mask[:, :3])
    with pytest.raises(ValueError, match=r"fps must be given exactly when"):
        model(x, t, context, mask, fps=torch.ones(2))


def test_token_count() -> None:
    """The model alone knows how many tokens a latent makes; a size its patches do not tile is refused."""
    model = make_dit()
    assert model.patch_size == (1, 2, 2)
    assert model.token_grid((4, 16, 32)) == (4, 8, 16)
    assert model.num_tokens((4, 16, 32)) == 4 * 8 * 16
    with pytest.raises(ValueError, match="divisible by patch_size"):
        model.num_tokens((4, 15, 32))


# --- FLOPs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention, frames", [("full", 4), ("factorized", 4), ("factorized", 1)])
def test_dit_flops_match_counted_matmuls(attention: str, frames: int) -> None:
    """Linear and conv FLOPs equal torch's counter; the attention products follow the closed form."""
    model = make_dit(attention=attention, cond_channels=1, micro_conditions=["fps"])
    x, t, context, mask = inputs(model, frames=frames, batch=1, length=7)
    with FlopCounterMode(display=False) as counter:
        model(x, t, context, mask, fps=torch.tensor([8.0]))
    n, s, d, length = frames * 16, 16, model.hidden_size, 7  # 8x8 latents in 2x2 patches
    attention_flops = 4 * n * length * d + (4 * n * n * d if attention == "full" else 4 * frames * s * s * d)
    if attention == "factorized" and frames > 1:
        attention_flops += 4 * s * frames * frames * d
    counted = counter.get_total_flops()
    counted_sdpa = sum(v for k, v in counter.get_flop_counts()["Global"].items() if "attention" in str(k))
    expected = counted - counted_sdpa + model.depth * attention_flops
    assert dit_flops(model, (frames, 8, 8), length) == expected


# --- presets -----------------------------------------------------------------------------------


PRESETS = sorted(CONF_MODEL.glob("dit_*.yaml"))


def load_preset(name: str):
    """A model preset composed as Hydra composes it (with the shared base/dit.yaml)."""
    return config_option("model", name)


def test_presets_exist() -> None:
    assert {p.stem for p in PRESETS} >= {"dit_tiny", "dit_s", "dit_b", "dit_l", "dit_xl"}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_keys_match_constructor(path: Path) -> None:
    node = OmegaConf.to_container(load_preset(path.stem), resolve=True)["dit"]
    assert node.pop("_target_") == "vdm.models.dit.VideoDiT"
    parameters = set(inspect.signature(VideoDiT.__init__).parameters) - {"self"}
    assert set(node) == parameters
    assert node["patch_size"] == [1, 2, 2] and node["in_channels"] == 16


def test_tiny_preset_instantiates_and_runs() -> None:
    torch.manual_seed(0)
    model = hydra.utils.instantiate(load_preset("dit_tiny").dit)
    assert isinstance(model, VideoDiT)
    x = torch.randn(1, 16, 4, 8, 8)
    out = model(x, torch.rand(1), torch.randn(1, 5, model.context_dim), torch.ones(1, 5, dtype=torch.bool))
    assert out.shape == x.shape


def test_small_preset_builds_with_dit_s_size() -> None:
    model = hydra.utils.instantiate(load_preset("dit_s").dit)
    assert (model.hidden_size, model.depth, model.num_heads) == (384, 12, 6)
    # DiT-S/2 has 33M parameters; cross-attention (7M) and the 4096-d text projection (1.7M) add ~8.7M
    assert 38e6 < model.num_params() < 45e6
