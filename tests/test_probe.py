"""probe_media: every test codec, images, the decord 48x32 quirk, and every kind of broken file."""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
import pytest

from tests.helpers.media import (
    CODECS,
    encode_video,
    moving_square_frames,
    write_corrupt_files,
    write_image,
    write_video,
)
from vdm.data.formats import MEDIA_KEYS, media_key
from vdm.data.probe import MediaError, MediaInfo, probe_media, sniff_family

EXPECTED_CODEC = {"mp4": "h264", "webm": "vp8", "mkv": "mpeg4", "mov": "mjpeg", "avi": "mpeg4"}


@pytest.mark.parametrize("container", sorted(CODECS))
def test_probe_each_codec_from_path_and_bytes(tmp_path: Path, container: str) -> None:
    path = write_video(tmp_path / f"clip.{container}", num_frames=20, height=40, width=64, fps=10)
    for source in (path, path.read_bytes()):
        info = probe_media(source, None if isinstance(source, Path) else container)
        assert info == MediaInfo("video", 20, 10.0, 2.0, 64, 40, EXPECTED_CODEC[container], info.backend)
        assert info.backend == "decord"


def test_probe_sniffs_kind_from_bytes_without_ext() -> None:
    data = encode_video(moving_square_frames(9, 32, 32), "webm", fps=8)
    info = probe_media(data)
    assert (info.kind, info.frames, info.codec) == ("video", 9, "vp8")


def test_mislabelled_video_container_still_probes() -> None:
    data = encode_video(moving_square_frames(9, 32, 32), "webm", fps=8)
    assert probe_media(data, "mp4").codec == "vp8"


def test_decord_48x32_quirk_falls_back_to_pyav(tmp_path: Path) -> None:
    import decord

    data = encode_video(moving_square_frames(12, 32, 48), "mp4", fps=8)
    # the quirk itself: decord's frames are not (32, 48, 3) for this size
    reader = decord.VideoReader(io.BytesIO(data))
    assert reader[0].shape != (32, 48, 3)
    info = probe_media(data, "mp4")
    assert (info.width, info.height, info.frames, info.backend) == (48, 32, 12, "pyav")


def test_frame_count_without_container_count_is_counted() -> None:
    # matroska stores no frame count: it must come from a demux count, not duration * fps guesses
    data = encode_video(moving_square_frames(23, 32, 32), "mkv", fps=8)
    with av.open(io.BytesIO(data)) as container:
        assert container.streams.video[0].frames == 0
    assert probe_media(data, "mkv").frames == 23


IMAGE_CASES = [("a.jpg", "jpeg"), ("b.jpeg", "jpeg"), ("c.png", "png"), ("d.webp", "webp")]


@pytest.mark.parametrize("name,codec", IMAGE_CASES)
def test_probe_images(tmp_path: Path, name: str, codec: str) -> None:
    path = write_image(tmp_path / name, height=30, width=50)
    assert probe_media(path) == MediaInfo("image", 1, 0.0, 0.0, 50, 30, codec, "pillow")
    assert probe_media(path.read_bytes()).codec == codec


CORRUPT_REASONS = {
    "truncated": "truncated or corrupt mp4/mov file",
    "zeros": "wrong magic",
    "empty": "empty file",
    "text": "wrong magic",
    "bad_image": "corrupt image",
}


@pytest.mark.parametrize("label", sorted(CORRUPT_REASONS))
def test_corrupt_files_raise_media_error_with_reason(tmp_path: Path, label: str,
                                                      capfd: pytest.CaptureFixture) -> None:
    path = write_corrupt_files(tmp_path)[label]
    with pytest.raises(MediaError, match=CORRUPT_REASONS[label]):
        probe_media(path)
    with pytest.raises(MediaError, match=CORRUPT_REASONS[label]):
        probe_media(path.read_bytes(), path.suffix)
    assert len(capfd.readouterr().err) < 1000  # no byte-buffer dump on stderr


def _audio_only_mp4() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        for _ in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 16000
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def _zero_frame_avi() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="avi") as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        out.start_encoding()
    return buf.getvalue()


def test_more_broken_inputs(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="no video stream"):
        probe_media(_audio_only_mp4(), "mp4")
    with pytest.raises(MediaError, match="zero frames"):
        probe_media(_zero_frame_avi(), "avi")
    with pytest.raises(MediaError, match="missing file"):
        probe_media(tmp_path / "nope.mp4")
    with pytest.raises(MediaError, match="unsupported extension .gif"):
        probe_media(b"GIF89a" + b"\x00" * 32, "gif")
    png = write_image(tmp_path / "x.png").read_bytes()
    with pytest.raises(MediaError, match="wrong magic"):
        probe_media(png, "mp4")
    with pytest.raises(MediaError, match="truncated or corrupt image"):
        probe_media(write_image(tmp_path / "y.jpg", 64, 64).read_bytes()[:300], "jpg")
    with pytest.raises(MediaError, match="wrong magic"):
        probe_media(b"\x01\x02\x03 definitely not media")


def test_truncated_webm_never_crashes() -> None:
    data = encode_video(moving_square_frames(20, 32, 32), "webm")
    for frac in (0.2, 0.5, 0.9):
        try:
            info = probe_media(data[: int(len(data) * frac)], "webm")
        except MediaError as err:
            assert str(err)
        else:
            assert 1 <= info.frames <= 20


def test_sniff_family_and_media_key() -> None:
    assert sniff_family(encode_video(moving_square_frames(2, 16, 16), "avi")) == "avi"
    assert sniff_family(b"\x89PNG\r\n\x1a\n....") == "png"
    assert sniff_family(b"hello world, hi") is None
    assert media_key({"__key__": "k", "txt": b"", "webm": b"x"}) == "webm"
    assert set(MEDIA_KEYS) >= {"mp4", "jpg", "png", "webp"}
    with pytest.raises(KeyError, match="'k1'"):
        media_key({"__key__": "k1", "txt": b"", "json": b"{}"})
