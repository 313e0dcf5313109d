"""Tests for chunked (causal-cache) and tiled encoding/decoding of the causal video VAE."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vdm.models.vae_chunked as vae_chunked
from vdm.models.layers import CausalCache, CausalConv3d
from vdm.models.vae import VideoVAE
from vdm.models.vae_chunked import tile_spans, tiled_apply

# 2x temporal, 2x spatial
TINY = dict(
    base_channels=16, channel_mults=(1, 2), num_res_blocks=1, temporal_downsample=(True,), latent_channels=4
)
# 4x temporal (two temporal levels), 4x spatial
TINY_TC4 = dict(
    base_channels=16,
    channel_mults=(1, 2, 2),
    num_res_blocks=1,
    temporal_downsample=(True, True),
    norm_groups=8,
    latent_channels=4,
)
TINY_PATCH = {**TINY_TC4, "patch_size": 2}
TINY_SHORTCUT = {**TINY_PATCH, "shortcuts": True}
TINY_NORM_FREE = {**TINY_SHORTCUT, "norm": "none"}
# float32 round-off of the chunked pass against the full one: the posterior log-variance (|x| ~ 8) differs
# by ~1e-5 with AVX2 kernels (AVX-512 ones stay below that)
CHUNK_ATOL = 2e-5


@pytest.fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    """Run on one intra-op thread: chunked passes make many calls on tiny tensors, where OpenMP
    workers spinning on a shared core cost ~10x more than they gain."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_vae(config: dict, randomize: bool = True, **overrides: object) -> VideoVAE:
    """Seeded VAE in eval mode; ``randomize`` perturbs every weight so zero-init branches are live."""
    torch.manual_seed(0)
    vae = VideoVAE(**config, **overrides).eval()
    if randomize:
        with torch.no_grad():
            for p in vae.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return vae


def video(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen) * 2 - 1


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- layer-level streaming ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kernel, stride, dilation, splits",
    [
        (3, 1, 1, [1, 1, 3, 4]),
        ((4, 3, 3), 1, 1, [1, 2, 5, 1]),
        ((3, 3, 3), 1, (2, 1, 1), [1, 3, 1, 4]),
        (3, (2, 2, 2), 1, [1, 2, 4, 2]),
        ((1, 3, 3), 1, 1, [1, 4, 4]),
    ],
)
def test_streaming_conv_matches_full(kernel, stride, dilation, splits: list[int]) -> None:
    torch.manual_seed(0)
    conv = CausalConv3d(4, 6, kernel, stride=stride, dilation=dilation)
    x = video((2, 4, sum(splits), 8, 8))
    with torch.no_grad(), CausalCache() as cache:
        pieces, start = [], 0
        for size in splits:
            pieces.append(conv(x[:, :, start : start + size], cache))
            start += size
        assert len(cache) == 1
    assert len(cache) == 0
    assert max_err(torch.cat(pieces, dim=2), conv(x)) < CHUNK_ATOL


def test_streaming_conv_rejects_chunk_without_complete_window() -> None:
    conv = CausalConv3d(2, 2, 3, stride=(2, 1, 1))
    with CausalCache() as cache:
        conv(video((1, 2, 1, 4, 4)), cache)
        with pytest.raises(ValueError, match="completes no window"):
            conv(video((1, 2, 1, 4, 4)), cache)


def test_cache_refuses_reentry() -> None:
    cache = CausalCache()
    with cache:
        with pytest.raises(RuntimeError, match="already in use"):
            with cache:
                pass
    with cache:  # usable again once exited
        pass


# --- chunked encode / decode equal the full pass ------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [TINY, TINY_TC4, TINY_PATCH, TINY_SHORTCUT, TINY_NORM_FREE],
    ids=["tc2", "tc4", "patch2", "shortcuts", "norm_free"],
)
def test_chunked_encode_matches_full(config: dict) -> None:
    vae = make_vae(config)
    tc = vae.temporal_compression
    x = video((1, 3, 1 + 5 * tc, 16, 16))
    with torch.no_grad():
        full = vae.encode(x)
        # 3*tc leaves a shorter last chunk (5*tc = 3*tc + 2*tc); 8*tc exceeds the clip
        for chunk in (tc, 3 * tc, 8 * tc):
            chunked = vae.encode(x, chunk_frames=chunk)
            assert chunked.mean.shape == full.mean.shape
            assert max_err(chunked.mean, full.mean) < CHUNK_ATOL, chunk
            assert max_err(chunked.logvar, full.logvar) < CHUNK_ATOL, chunk


@pytest.mark.parametrize(
    "config",
    [TINY, TINY_TC4, TINY_PATCH, TINY_SHORTCUT, TINY_NORM_FREE],
    ids=["tc2", "tc4", "patch2", "shortcuts", "norm_free"],
)
def test_chunked_decode_matches_full(config: dict) -> None:
    vae = make_vae(config)
    tc = vae.temporal_compression
    sc = vae.spatial_compression
    z = torch.randn(1, vae.latent_channels, 6, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = vae.decode(z)
        for chunk in (tc, 3 * tc, 8 * tc):  # latent chunks of 1, 3 (5 = 3 + 2), 8
            chunked = vae.decode(z, chunk_frames=chunk)
            assert chunked.shape == full.shape == (1, 3, 1 + 5 * tc, 4 * sc, 4 * sc)
            assert max_err(chunked, full) < CHUNK_ATOL, chunk


def test_chunked_image_unaffected() -> None:
    vae = make_vae(TINY_TC4)
    image = video((1, 3, 1, 16, 16))
    with torch.no_grad():
        z = vae.encode(image).mean
        assert torch.equal(vae.encode(image, chunk_frames=4).mean, z)
        assert torch.equal(vae.decode(z, chunk_frames=8), vae.decode(z))


def test_constructor_defaults_enable_chunking() -> None:
    plain = make_vae(TINY)
    chunked = make_vae(TINY, encode_chunk_frames=2, decode_chunk_frames=4)
    calls: list[int] = []
    chunked.encoder.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[2]))
    x = video((1, 3, 9, 16, 16))
    with torch.no_grad():
        out_plain, _ = plain(x, sample_posterior=False)
        out_chunked, _ = chunked(x, sample_posterior=False)
        # an explicit argument overrides the default
        assert max_err(chunked.encode(x, chunk_frames=8).mean, plain.encode(x).mean) < CHUNK_ATOL
    assert calls[:5] == [1, 2, 2, 2, 2] and calls[5:] == [1, 8]
    assert max_err(out_chunked, out_plain) < CHUNK_ATOL


# --- cache scoping -----------------------------------------------------------------------------


def test_cache_cleared_after_call_and_after_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    created: list[CausalCache] = []
    sizes_seen: list[int] = []

    class RecordingCache(CausalCache):
        def __init__(self) -> None:
            super().__init__()
            created.append(self)

    monkeypatch.setattr(vae_chunked, "CausalCache", RecordingCache)
    vae = make_vae(TINY)
    x = video((1, 3, 9, 16, 16))
    with torch.no_grad():
        expected = vae.encode(x).mean
    vae.encoder.conv_out.register_forward_hook(lambda m, args, out: sizes_seen.append(len(created[-1])))
    with torch.no_grad():
        vae.encode(x, chunk_frames=2)
        assert max(sizes_seen) > 0 and len(created[-1]) == 0

        def fail_on_third_chunk(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if len(sizes_seen) >= 3:
                raise RuntimeError("simulated failure mid-video")

        sizes_seen.clear()
        handle = vae.encoder.blocks[-1].register_forward_hook(fail_on_third_chunk)
        with pytest.raises(RuntimeError, match="simulated failure"):
            vae.encode(x, chunk_frames=2)
        handle.remove()
        assert len(created[-1]) == 0
        # nothing leaked into the model: the next chunked call still equals the full pass
        assert max_err(vae.encode(x, chunk_frames=2).mean, expected) < CHUNK_ATOL
    assert len(created) == 3 and all(len(cache) == 0 for cache in created)


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [3, 0, -4, 2.0])
def test_bad_chunk_frames_raise(chunk: object) -> None:
    vae = make_vae(TINY_TC4, randomize=False)
    with pytest.raises(ValueError, match=r"chunk_frames must be None .* multiple of temporal_compression=4"):
        vae.encode(video((1, 3, 5, 16, 16)), chunk_frames=chunk)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"chunk_frames must be None .* multiple of temporal_compression=4"):
        vae.decode(torch.zeros(1, 4, 2, 4, 4), chunk_frames=chunk)  # type: ignore[arg-type]


def test_bad_constructor_arguments_raise() -> None:
    expected = r"encode_chunk_frames must be .* got 6, use e\.g\. encode_chunk_frames=4"
    with pytest.raises(ValueError, match=expected):
        VideoVAE(**TINY_TC4, encode_chunk_frames=6)
    with pytest.raises(ValueError, match="decode_chunk_frames must be"):
        VideoVAE(**TINY_TC4, decode_chunk_frames=2)
    with pytest.raises(ValueError, match=r"tile_size must be .* spatial_compression=4 .* got 10"):
        VideoVAE(**TINY_TC4, tile_size=10)
    with pytest.raises(ValueError, match=r"tile_overlap is a fraction of tile_size in \[0, 0.5\]"):
        VideoVAE(**TINY_TC4, tile_overlap=0.7)


# --- spatial tiling ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, tile, overlap", [(40, 8, 2), (40, 6, 3), (40, 5, 0), (13, 20, 4), (17, 16, 4)]
)
def test_tile_spans_cover_with_overlap(size: int, tile: int, overlap: int) -> None:
    spans = tile_spans(size, tile, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == size
    assert all(stop - start == min(tile, size) for start, stop in spans)
    assert all(prev[1] - nxt[0] >= overlap for prev, nxt in zip(spans, spans[1:]))


@pytest.mark.parametrize("tile, overlap", [(8, 2), (6, 3), (5, 0), (20, 4)])
def test_tile_blend_is_exact_for_position_independent_maps(tile: int, overlap: int) -> None:
    x = video((1, 2, 3, 40, 56))

    def upsample(t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(4, dim=-2).repeat_interleave(4, dim=-1)

    def pool(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool3d(t, (1, 4, 4))

    assert max_err(tiled_apply(lambda t: t, x, tile, overlap, 1, 1), x) < 1e-6
    assert max_err(tiled_apply(upsample, x, tile, overlap, 1, 4), upsample(x)) < 1e-6
    assert max_err(tiled_apply(pool, x, tile, overlap, 4, 1), pool(x)) < 1e-6


def test_tiled_equals_full_when_tile_covers_frame() -> None:
    vae = make_vae(TINY_TC4)
    x = video((1, 3, 5, 16, 24))
    with torch.no_grad():
        z = vae.encode(x).mean
        assert torch.equal(vae.encode(x, tile_size=24).mean, z)
        assert torch.equal(vae.decode(z, tile_size=32), vae.decode(z))


def tiling_errors(vae: VideoVAE, x: torch.Tensor, tile: int) -> dict[str, float]:
    """Max and mean |tiled - full| of encode (latent means) and decode, relative to the output scale."""
    with torch.no_grad():
        full = vae.encode(x).mean
        decoded = vae.decode(full)
        enc = vae.encode(x, tile_size=tile, tile_overlap=0.25).mean
        dec = vae.decode(full, tile_size=tile, tile_overlap=0.25)
    return {
        "enc_max": max_err(enc, full),
        "dec_max": max_err(dec, decoded),
        "enc_mean": ((enc - full).abs().mean() / full.abs().mean()).item(),
        "dec_mean": ((dec - decoded).abs().mean() / decoded.abs().mean()).item(),
    }


def smooth_video(shape: tuple[int, ...]) -> torch.Tensor:
    """A vertical sinusoidal gradient: content that differs between tiles (sky over ground)."""
    b, c, t, h, w = shape
    return torch.sin(torch.linspace(0, 3, h)).view(1, 1, 1, h, 1).expand(b, c, t, h, w).contiguous()


@pytest.mark.parametrize("content", ["noise", "smooth"])
def test_tiled_close_to_full(content: str) -> None:
    # With RMSNorm over channels nothing depends on the tile's extent except zero padding at
    # tile borders inside the receptive field. Measured (weights perturbed so the residual branches
    # are live) at 48 px tiles on 64 x 48 frames: mean relative error 2.0% (noise) and 1.2% (smooth)
    # for encode, 1.7% / 1.5% for decode, max |err| 0.31 / 0.20; 32 px tiles: 6-9%.
    vae = make_vae(TINY)
    shape = (1, 3, 3, 64, 48)
    x = video(shape) if content == "noise" else smooth_video(shape)
    small, large = tiling_errors(vae, x, 32), tiling_errors(vae, x, 48)
    assert large["enc_max"] < 0.4 and large["dec_max"] < 0.4
    assert large["enc_mean"] < 0.03 and large["dec_mean"] < 0.03
    assert large["enc_mean"] < small["enc_mean"] and large["dec_mean"] < small["dec_mean"]


def test_tiling_with_group_norm_is_worse_on_smooth_content() -> None:
    # per-frame GroupNorm statistics over a tile differ from the whole frame's: 17-40x the error
    shape = (1, 3, 3, 64, 48)
    rms = tiling_errors(make_vae(TINY), smooth_video(shape), 48)
    group = tiling_errors(make_vae({**TINY, "norm": "group"}), smooth_video(shape), 48)
    assert group["enc_mean"] > 5 * rms["enc_mean"] and group["dec_mean"] > 5 * rms["dec_mean"]


def test_tiled_and_chunked_compose() -> None:
    vae = make_vae(TINY)
    x = video((1, 3, 5, 24, 24))  # 2 x 2 tiles of 16 px
    with torch.no_grad():
        tiled = vae.encode(x, tile_size=16)
        both = vae.encode(x, chunk_frames=2, tile_size=16)
        assert max_err(both.mean, tiled.mean) < CHUNK_ATOL
        z = tiled.mean
        assert max_err(vae.decode(z, chunk_frames=4, tile_size=16), vae.decode(z, tile_size=16)) < CHUNK_ATOL


# --- bounded memory ----------------------------------------------------------------------------


def largest_activation(module: nn.Module, fn, *args) -> int:
    """Largest output numel of any submodule call while running ``fn(*args)``."""
    largest = [0]

    def record(mod: nn.Module, inputs: tuple, out: object) -> None:
        if isinstance(out, torch.Tensor):
            largest[0] = max(largest[0], out.numel())

    handles = [m.register_forward_hook(record) for m in module.modules() if m is not module]
    try:
        with torch.no_grad():
            fn(*args)
    finally:
        for handle in handles:
            handle.remove()
    return largest[0]


def test_peak_activation_does_not_grow_with_frames() -> None:
    vae = make_vae(TINY_TC4, randomize=False)
    short, long = video((1, 3, 9, 16, 16)), video((1, 3, 33, 16, 16))
    chunked = [largest_activation(vae, vae.encode, x, 8) for x in (short, long)]
    full = [largest_activation(vae, vae.encode, x) for x in (short, long)]
    assert chunked[0] == chunked[1]
    assert full[1] > 3 * full[0] and full[1] > 3 * chunked[1]
    z_short, z_long = torch.zeros(1, 4, 3, 4, 4), torch.zeros(1, 4, 9, 4, 4)
    chunked = [largest_activation(vae, vae.decode, z, 8) for z in (z_short, z_long)]
    full = [largest_activation(vae, vae.decode, z) for z in (z_short, z_long)]
    assert chunked[0] == chunked[1]
    assert full[1] > 3 * full[0] and full[1] > 3 * chunked[1]
