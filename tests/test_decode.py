"""Decoding: test codecs with decord and PyAV, partial reads, the 48x32 decord quirk, images, bad input."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image

from tests.helpers.media import CODECS, encode_video, moving_square_frames, write_corrupt_files
from vdm.data import decode
from vdm.data.decode import DecodeError, DecordVideo, PyAVVideo, decode_frames, open_media


@pytest.fixture(scope="module")
def videos() -> dict[str, tuple[np.ndarray, bytes]]:
    frames = moving_square_frames(12, 32, 64, seed=1)
    return {ext: (frames, encode_video(frames, ext, fps=8)) for ext in CODECS}


@pytest.mark.parametrize("ext", list(CODECS))
def test_codec_decodes_with_both_backends(videos: dict, ext: str) -> None:
    source, data = videos[ext]
    by_decord = decode_frames(data, ext, backend="decord")
    by_pyav = decode_frames(data, ext, backend="pyav")
    for frames in (by_decord, by_pyav):
        assert frames.shape == (12, 32, 64, 3) and frames.dtype == np.uint8
        # lossy codecs, but the picture must be the source one (not noise or another frame)
        assert np.abs(frames.astype(np.int16) - source).mean() < 6.0
    if ext == "mp4":
        np.testing.assert_array_equal(by_decord, by_pyav)  # bit-identical for H.264
    else:
        assert np.abs(by_decord.astype(np.int16) - by_pyav).max() <= 2


@pytest.mark.parametrize("ext", list(CODECS))
@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_media_info(videos: dict, ext: str, backend: str) -> None:
    media = open_media(videos[ext][1], ext, backend=backend)
    assert (media.info.kind, media.info.num_frames, media.info.height, media.info.width) == (
        "video",
        12,
        32,
        64,
    )
    assert media.info.fps == pytest.approx(8.0)


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_partial_read_matches_full_decode(videos: dict, backend: str) -> None:
    data = videos["mp4"][1]
    full = decode_frames(data, "mp4", backend=backend)
    indices = [7, 0, 7, 3, 11]
    np.testing.assert_array_equal(decode_frames(data, "mp4", indices, backend=backend), full[indices])


def test_pyav_seeks_for_late_clips(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode_video(moving_square_frames(160, 16, 16), "mp4", fps=8, gop=12)
    full = decode_frames(data, "mp4", backend="pyav")
    indices = [130, 100, 150]
    media = PyAVVideo(data)
    monkeypatch.setattr(media, "_decode_from_start", lambda wanted: pytest.fail("seek path not taken"))
    np.testing.assert_array_equal(media.read(indices), full[indices])


def test_decord_quirk_48x32_falls_back_to_pyav(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(decode, "_fallback_logged", False)
    data = encode_video(moving_square_frames(12, 32, 48), "mp4")
    with caplog.at_level(logging.WARNING, logger="vdm.data.decode"):
        frames = decode_frames(data, "mp4", [0, 5, 11], backend="decord")
        decode_frames(data, "mp4", [1], backend="decord")
    assert frames.shape == (3, 32, 48, 3)
    np.testing.assert_array_equal(frames, decode_frames(data, "mp4", [0, 5, 11], backend="pyav"))
    assert sum("decoding with PyAV" in r.message for r in caplog.records) == 1  # logged once


def test_decord_output_checked_against_stream_size(videos: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode, "_fallback_logged", True)
    data = videos["mp4"][1]
    media = DecordVideo(data, size_hint=(32, 64))
    media._reader.get_batch = lambda idx: type(
        "A", (), {"asnumpy": lambda self: np.zeros((len(idx), 32, 64, 4), np.uint8)}
    )()
    frames = media.read([0, 1])
    assert media._fallback is not None
    np.testing.assert_array_equal(frames, decode_frames(data, "mp4", [0, 1], backend="pyav"))


@pytest.mark.parametrize("fmt,ext", [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")])
def test_images_are_one_frame_videos(fmt: str, ext: str) -> None:
    source = moving_square_frames(1, 24, 40)[0]
    buf = io.BytesIO()
    Image.fromarray(source).save(buf, format=fmt)
    media = open_media(buf.getvalue(), ext)
    assert (media.info.kind, media.info.num_frames, media.info.height, media.info.width) == (
        "image",
        1,
        24,
        40,
    )
    frames = media.read([0, 0])
    assert frames.shape == (2, 24, 40, 3) and frames.dtype == np.uint8
    if ext == "png":
        np.testing.assert_array_equal(frames[0], source)
    with pytest.raises(DecodeError, match="out of range"):
        media.read([1])


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_corrupt_inputs_raise_decode_error(tmp_path, backend: str) -> None:
    files = write_corrupt_files(tmp_path)
    for label, path in files.items():
        ext = path.suffix.lstrip(".")
        with pytest.raises(DecodeError) as info:
            decode_frames(path.read_bytes(), ext, [0], backend=backend)
        assert str(info.value), label


def test_decode_error_names_the_failure(videos: dict) -> None:
    data = videos["mp4"][1]
    with pytest.raises(DecodeError, match="signature"):
        decode_frames(b"this is not a video at all", "mp4")
    with pytest.raises(DecodeError, match=r"decord .*PyAV|PyAV"):
        decode_frames(data[: len(data) // 3], "mp4")
    with pytest.raises(DecodeError, match="out of range"):
        decode_frames(data, "mp4", [12])
    with pytest.raises(DecodeError, match="unsupported media extension"):
        decode_frames(data, "gif")
    with pytest.raises(ValueError, match="backend"):
        decode_frames(data, "mp4", backend="opencv")  # type: ignore[arg-type]
