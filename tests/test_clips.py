"""Clip index maths (stride, target fps, starts, short policies) and the resize/crop transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vdm.data.clips import (
    ClipError,
    ClipSpec,
    ClipTooShortError,
    clip_indices,
    crop_window,
    frames_needed,
    resize_crop,
)


def test_stride_indices_centre() -> None:
    indices, fps = clip_indices(20, 4, frame_stride=3, source_fps=24.0, start="center")
    assert indices == [5, 8, 11, 14]  # span 10, free starts 0..10, centre 5
    assert fps == pytest.approx(8.0)


@pytest.mark.parametrize(
    "source_fps,target_fps,expected",
    [
        (30.0, 10.0, [0, 3, 6, 9, 12, 15]),
        (24.0, 16.0, [0, 1, 3, 4, 6, 7]),  # step 1.5
        (25.0, 25.0, [0, 1, 2, 3, 4, 5]),
        (8.0, 16.0, [0, 0, 1, 1, 2, 2]),  # upsampling repeats frames
        (29.97, 9.99, [0, 3, 6, 9, 12, 15]),  # float ratio exactly 3
    ],
)
def test_target_fps_indices(source_fps: float, target_fps: float, expected: list[int]) -> None:
    indices, fps = clip_indices(
        100, 6, target_fps=target_fps, source_fps=source_fps, start="center", short_policy="skip"
    )
    offset = indices[0]
    assert [i - offset for i in indices] == expected
    assert fps == pytest.approx(target_fps)
    assert frames_needed(6, source_fps / target_fps) == expected[-1] + 1


def test_target_fps_needs_source_fps() -> None:
    with pytest.raises(ClipError, match="source fps"):
        clip_indices(100, 4, target_fps=8.0, source_fps=0.0)


def test_random_start_is_seeded_and_covers_range() -> None:
    def draw(seed: int) -> list[int]:
        return clip_indices(30, 4, frame_stride=2, start="random", rng=np.random.default_rng(seed))[0]

    assert draw(7) == draw(7)
    starts = {draw(seed)[0] for seed in range(200)}
    assert starts == set(range(0, 30 - 7 + 1))  # span 7 -> starts 0..23, all reachable, none outside
    with pytest.raises(ValueError, match="rng"):
        clip_indices(30, 4, start="random")


def test_exact_fit_and_centre() -> None:
    assert clip_indices(7, 4, frame_stride=2, start="random", rng=np.random.default_rng(0))[0] == [0, 2, 4, 6]
    assert clip_indices(9, 4, frame_stride=2, start="center")[0] == [1, 3, 5, 7]


def test_short_policies() -> None:
    with pytest.raises(ClipTooShortError, match="5 frames, clip needs 8"):
        clip_indices(5, 8, short_policy="skip", start="center")
    assert clip_indices(5, 8, short_policy="pad", start="center")[0] == [0, 1, 2, 3, 4, 4, 4, 4]
    assert clip_indices(5, 8, short_policy="loop", start="center")[0] == [0, 1, 2, 3, 4, 0, 1, 2]
    assert clip_indices(5, 4, frame_stride=2, short_policy="pad", start="center")[0] == [0, 2, 4, 4]
    assert clip_indices(5, 4, frame_stride=2, short_policy="loop", start="center")[0] == [0, 2, 4, 1]


def test_clip_spec_validation() -> None:
    with pytest.raises(ValueError, match="short_policy"):
        ClipSpec(8, short_policy="drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_frames"):
        ClipSpec(0)
    with pytest.raises(ValueError, match="target_fps"):
        ClipSpec(8, target_fps=-1.0)


def test_resize_crop_shape_and_range() -> None:
    frames = np.random.default_rng(0).integers(0, 256, (5, 32, 48, 3), dtype=np.uint8)
    frames[0, 0, 20] = 0
    frames[0, 1, 20] = 255
    out = resize_crop(frames, 16, 16)
    assert out.shape == (3, 5, 16, 16) and out.dtype == torch.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    same = resize_crop(frames, 32, 32)  # crop only: exact pixel values
    assert same[:, 0, 0, 12].tolist() == [-1.0, -1.0, -1.0] and same[:, 0, 1, 12].tolist() == [1.0, 1.0, 1.0]
    np.testing.assert_allclose(same.permute(1, 2, 3, 0).numpy(), frames[:, :, 8:40] / 127.5 - 1, atol=1e-6)
    assert resize_crop(frames, 64, 80).shape == (3, 5, 64, 80)  # upscaling


def test_channel_order_and_orientation_preserved() -> None:
    frames = np.zeros((2, 32, 64, 3), np.uint8)
    frames[:, :, :32, 0] = 255  # left half red
    frames[:, :, 32:, 2] = 255  # right half blue
    out = resize_crop(frames, 8, 16)  # same aspect: downscale only
    left, right = out[:, :, :, :6], out[:, :, :, 10:]
    assert torch.all(left[0] > 0.99) and torch.all(left[1:] < -0.99)
    assert torch.all(right[2] > 0.99) and torch.all(right[:2] < -0.99)


def test_crop_windows() -> None:
    assert crop_window(32, 48, 16, 16) == (0, 8, 32, 32)
    assert crop_window(48, 32, 16, 32) == (16, 0, 16, 32)
    windows = {crop_window(32, 48, 16, 16, crop="random", rng=np.random.default_rng(s)) for s in range(100)}
    assert {w[1] for w in windows} == set(range(0, 17)) and all(w[0] == 0 for w in windows)
    a = resize_crop(
        np.arange(32 * 48 * 3, dtype=np.uint8).reshape(1, 32, 48, 3),
        16,
        16,
        crop="random",
        rng=np.random.default_rng(3),
    )
    b = resize_crop(
        np.arange(32 * 48 * 3, dtype=np.uint8).reshape(1, 32, 48, 3),
        16,
        16,
        crop="random",
        rng=np.random.default_rng(3),
    )
    assert torch.equal(a, b)


def test_crop_without_resize_keeps_the_source_resolution() -> None:
    from vdm.data.clips import crop_window, resize_crop_uint8

    assert crop_window(64, 48, 32, 32, resize=False) == (16, 8, 32, 32)
    assert crop_window(64, 48, 32, 32) == (8, 0, 48, 48)  # resized: the window covers the shorter side
    rng = np.random.default_rng(0)
    for _ in range(20):
        top, left, h, w = crop_window(64, 48, 32, 32, crop="random", rng=rng, resize=False)
        assert (h, w) == (32, 32) and 0 <= top <= 32 and 0 <= left <= 16
    assert crop_window(16, 16, 32, 32, resize=False) == (0, 0, 16, 16)  # smaller source: scaled up
    frames = np.random.default_rng(1).integers(0, 256, (3, 64, 48, 3), dtype=np.uint8)
    out = resize_crop_uint8(frames, 32, 32, resize=False)
    assert torch.equal(out, torch.from_numpy(frames[:, 16:48, 8:40]).permute(0, 3, 1, 2))
