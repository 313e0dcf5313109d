"""Hostile inputs end to end: data_prep reports every bad file with its reason, every good one is written
once, and VideoDataModule (validation, exact mode) reads every good sample once and counts its skips.

Policy under test:
- kept by data_prep (valid media): 1-frame videos and videos shorter than the clip (the loader's
  ``short_policy`` decides: "skip" counts them as ClipTooShortError, "pad" reads them), odd sizes,
  rotated videos (served upright by both backends; meta width/height are the upright sizes and
  "rotation" the turn), variable frame rate, 10-bit and 4:4:4 (decoded to 8-bit RGB), a video with an
  audio track, long / empty / missing / BOM-prefixed captions (kept as given, empty when missing) and
  equal file names in different folders (distinct keys);
- rejected by data_prep: empty, non-video and truncated files, audio-only files ("no video stream";
  ``.m4a`` is not a media extension) and non-UTF-8 caption sidecars (no guessing at the encoding);
- skipped and counted by the loader: what reaches a shard but cannot become a clip (too short under
  "skip", undecodable bytes, an unreadable caption, no media member).
"""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
import webdataset as wds

from data_prep import make_shards as ms
from data_prep.shard_writer import sample_key
from tests.helpers.media import moving_square_frames
from vdm.data.buckets import Bucket
from vdm.data.clips import ClipSpec, ClipTooShortError, clip_indices_by_time
from vdm.data.datamodule import VideoDataModule
from vdm.data.decode import decode_frames
from vdm.data.samples import decode_clip

REPO = Path(__file__).resolve().parents[1]
LONG_CAPTION = ("a very long caption " * 5000)[:99_999] + "!"  # 100k characters
VFR_PTS_MS = [i * 125 + (40 if i % 3 == 1 else 0) + (i // 10) * 250 for i in range(80)]

# relative path -> (frames, upright height, upright width, caption) of every input data_prep must keep
GOOD: dict[str, tuple[int, int, int, str]] = {
    "plain.mp4": (8, 32, 32, "a plain clip"),
    "one_frame.mp4": (1, 32, 32, "a single frame"),
    "short.mp4": (3, 32, 32, "shorter than the clip"),
    "odd_317x239.mp4": (5, 239, 317, "odd size, 4:2:0 mpeg4"),
    "rotated_90.mp4": (6, 64, 32, "stored 64x32 with a 90 degree display matrix"),
    "vfr.mp4": (80, 32, 32, "variable frame rate"),
    "ten_bit.mp4": (6, 48, 64, "yuv420p10le"),
    "yuv444.mp4": (6, 48, 64, "yuv444p"),
    "with_audio.mp4": (6, 32, 32, "video plus an aac track"),
    "long_caption.mp4": (6, 32, 32, LONG_CAPTION),
    "empty_caption.mp4": (6, 32, 32, ""),
    "no_caption.mp4": (6, 32, 32, ""),
    "bom_caption.mp4": (6, 32, 32, "caption after a byte-order mark"),
    "a/clip.mp4": (6, 32, 32, "clip in folder a"),
    "b/clip.mp4": (6, 32, 32, "clip in folder b"),
}
SHORT = {"one_frame.mp4", "short.mp4"}  # kept by data_prep, too short for a 4-frame clip
BAD = {
    "empty.mp4": "empty file",
    "not_video.mp4": "wrong magic: not a valid .mp4 file (unknown signature 3c68746d6c3e6e6f)",
    "truncated_head.mp4": "truncated or corrupt mp4/mov file: Invalid data found when processing input",
    "truncated_tail.mp4": "truncated or corrupt mp4/mov file: 8 of 12 frames present",
    "audio_only.mp4": "no video stream",
    "song.m4a": "unsupported extension .m4a",
    "latin1_caption.mp4": "unreadable caption sidecar latin1_caption.txt: 'utf-8' codec can't decode byte "
    "0xe9 in position 3: invalid continuation byte",
}
# written straight into a shard (as another writer or bit rot could): key -> expected skip kind
LOADER_BAD = {"cut_short": "DecodeError", "garbage": "DecodeError", "bad_text": "SampleError",
              "no_media": "SampleError"}


def _write(path: Path, frames: np.ndarray | None, *, codec: str = "libx264", pix_fmt: str = "yuv420p",
           rotation: int = 0, pts_ms: list[int] | None = None, audio: bool = False,
           faststart: bool = False) -> bytes:
    """Encode (T, H, W, 3) frames (None: audio only) into ``path`` (an mp4 container); returns its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"} if faststart else {}) as out:
        video = out.add_stream(codec, rate=8) if frames is not None else None
        sound = out.add_stream("aac", rate=16000) if audio else None  # every stream before the first mux
        if video is not None:
            video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
            if pts_ms is not None:
                video.codec_context.time_base = Fraction(1, 1000)
            if rotation:
                video.set_display_rotation(rotation)
            for i, array in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(array, format="rgb24")
                if pts_ms is not None:
                    frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
                out.mux(video.encode(frame))
            out.mux(video.encode())
        if sound is not None:
            for k in range(6):
                silence = np.zeros((1, 1024), np.float32)
                chunk = av.AudioFrame.from_ndarray(silence, format="fltp", layout="mono")
                chunk.sample_rate, chunk.pts = 16000, k * 1024
                out.mux(sound.encode(chunk))
            out.mux(sound.encode())
    return path.read_bytes()


def _cut_at_packet(data: bytes, index: int) -> bytes:
    """A faststart mp4 cut where the data of packet ``index`` starts (its header is intact)."""
    with av.open(io.BytesIO(data)) as container:
        positions = sorted(p.pos for p in container.demux(video=0) if p.size)
    return data[: positions[index]]


def _build_sources(root: Path) -> dict[str, Any]:
    """Write the hostile matrix under ``root``; returns source frames and bytes the tests compare with."""
    kept: dict[str, Any] = {}
    for i, (name, (frames, height, width, caption)) in enumerate(GOOD.items()):
        kwargs: dict[str, Any] = {}
        if name == "rotated_90.mp4":
            height, width, kwargs = width, height, {"rotation": 90}
        elif name == "odd_317x239.mp4":
            kwargs = {"codec": "mpeg4"}  # libx264 refuses odd sizes in 4:2:0
        elif name == "vfr.mp4":
            kwargs = {"pts_ms": VFR_PTS_MS}
        elif name in ("ten_bit.mp4", "yuv444.mp4"):
            kwargs = {"pix_fmt": "yuv420p10le" if name == "ten_bit.mp4" else "yuv444p"}
        elif name == "with_audio.mp4":
            kwargs = {"audio": True}
        source = moving_square_frames(frames, height, width, seed=i)
        kept[name] = (source, _write(root / name, source, **kwargs))
        sidecar = (root / name).with_suffix(".txt")
        if name == "bom_caption.mp4":
            sidecar.write_bytes(b"\xef\xbb\xbf" + caption.encode() + b"\n")
        elif name != "no_caption.mp4":
            sidecar.write_text(caption + "\n" if caption else "")
    (root / "empty.mp4").write_bytes(b"")
    (root / "not_video.mp4").write_bytes(b"<html>not a video</html>\n")
    whole = _write(root / "truncated_head.mp4", moving_square_frames(12, 32, 32))
    (root / "truncated_head.mp4").write_bytes(whole[: len(whole) // 3])  # moov (at the end) is lost
    faststart = _write(root / "truncated_tail.mp4", moving_square_frames(12, 32, 32), faststart=True)
    (root / "truncated_tail.mp4").write_bytes(_cut_at_packet(faststart, 8))
    _write(root / "audio_only.mp4", None, audio=True)
    _write(root / "song.m4a", None, audio=True)
    _write(root / "latin1_caption.mp4", moving_square_frames(6, 32, 32))
    (root / "latin1_caption.txt").write_bytes("café au lait".encode("latin-1"))
    kept["cut_short"] = _cut_at_packet(faststart, 2)
    return kept


def _write_loader_bad_shard(out: Path, media: dict[str, Any]) -> None:
    good = media["plain.mp4"][1]
    meta = json.dumps({"source": "elsewhere", "kind": "video", "frames": 12, "width": 32, "height": 32})
    samples = [
        {"__key__": "cut_short", "mp4": media["cut_short"], "txt": b"truncated", "json": meta.encode()},
        {"__key__": "garbage", "mp4": b"GARBAGE that is no transport stream" * 8, "txt": b"", "json": b"{}"},
        {"__key__": "bad_text", "mp4": good, "txt": "café".encode("latin-1"), "json": meta.encode()},
        {"__key__": "no_media", "txt": b"caption without a video", "json": b"{}"},
    ]
    with wds.TarWriter(str(out / "val-000999.tar")) as sink:
        for sample in samples:
            sink.write(sample)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("hostile")
    src, out = root / "src", root / "out"
    media = _build_sources(src)
    res = subprocess.run([sys.executable, "-m", "data_prep.make_shards", str(src), str(out), "--val-fraction",
                          "1", "--max-samples-per-shard", "4", "--workers", "2", "--no-progress"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    shards = sorted(out.glob("val-*.tar"))
    written = [s for url in shards for s in wds.WebDataset(str(url), shardshuffle=False)]
    _write_loader_bad_shard(out, media)
    return {"src": src, "out": out, "media": media, "manifest": manifest, "written": written,
            "stdout": res.stdout}


def test_data_prep_reports_every_bad_input_with_its_reason(corpus: dict[str, Any]) -> None:
    skipped = {s["path"]: s["reason"] for s in corpus["manifest"]["skipped"]}
    assert skipped == BAD
    assert f"wrote {len(GOOD)} samples (0 train, {len(GOOD)} val)" in corpus["stdout"]
    assert f"skipped {len(BAD)} inputs" in corpus["stdout"]


def test_every_good_input_written_once(corpus: dict[str, Any]) -> None:
    manifest, written = corpus["manifest"], corpus["written"]
    metas = {json.loads(s["json"])["source"]: (s, json.loads(s["json"])) for s in written}
    assert Counter(json.loads(s["json"])["source"] for s in written) == Counter(list(GOOD))
    assert len({s["__key__"] for s in written}) == len(GOOD) == manifest["totals"]["samples"]
    assert manifest["totals"]["uncaptioned"] == 2
    for name, (frames, height, width, caption) in GOOD.items():
        sample, meta = metas[name]
        assert sample["__key__"] == meta["key"] == sample_key(name)
        assert sample["mp4"] == corpus["media"][name][1]
        assert sample["txt"].decode("utf-8") == caption, name
        assert (meta["frames"], meta["height"], meta["width"]) == (frames, height, width), name
        assert meta["rotation"] == (90 if name == "rotated_90.mp4" else 0), name
    assert metas["a/clip.mp4"][0]["__key__"] != metas["b/clip.mp4"][0]["__key__"]
    assert metas["vfr.mp4"][1]["fps"] == pytest.approx(80 / (VFR_PTS_MS[-1] / 1000), rel=0.1)
    assert metas["ten_bit.mp4"][1]["codec"] == metas["yuv444.mp4"][1]["codec"] == "h264"


Read = tuple[dict[str, dict[str, Any]], list[str], dict[str, tuple[str, str]], dict[str, float]]


def _read(out: Path, **overrides: Any) -> Read:
    """Read the val split once: ({key: sample}, keys in order, {skipped key: (kind, message)}, counters)."""
    args = {"root": str(out), "num_frames": 4, "frame_stride": 1, "height": 16, "width": 16, "batch_size": 2,
            "val_batch_size": 3, "num_workers": 0, "seed": 0, **overrides}
    dm = VideoDataModule(**args)
    dm.setup("validate")
    log_file = out.parent / f"skips-{len(list(out.parent.glob('skips-*')))}.log"
    handler = logging.FileHandler(log_file)  # forked loader workers inherit it
    skips_logger, level = logging.getLogger("vdm.data.skips"), logging.getLogger("vdm.data.skips").level
    skips_logger.addHandler(handler)
    skips_logger.setLevel(logging.WARNING)
    try:
        batches = list(dm.val_dataloader())
    finally:
        skips_logger.removeHandler(handler)
        skips_logger.setLevel(level)
        handler.close()
    keys, samples = [], {}
    for batch in batches:
        assert batch["video"].dtype == torch.float32 and batch["video"].shape[1:] == (3, 4, 16, 16)
        for i, (key, meta) in enumerate(zip(batch["key"], batch["meta"])):
            assert not meta["pad"]
            keys.append(key)
            samples[key] = {"video": batch["video"][i], "caption": batch["caption"][i], "meta": meta}
    pattern = re.compile(r"skipped sample (\S+) @ \S+: (\w+): (.*) \(\d+ skipped of \d+")
    reasons = {m.group(1): (m.group(2), m.group(3)) for line in log_file.read_text().splitlines()
               if (m := pattern.search(line))}
    return samples, keys, reasons, dm.skip_summary()["val"]


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_reads_every_good_sample_once_and_counts_skips(corpus: dict[str, Any], workers: int) -> None:
    samples, keys, reasons, counters = _read(corpus["out"], num_workers=workers)
    readable = {sample_key(name): name for name in GOOD if name not in SHORT}
    assert Counter(keys) == Counter(list(readable))
    expected_skips = {sample_key(name): "ClipTooShortError" for name in SHORT} | LOADER_BAD
    assert {key: kind for key, (kind, _) in reasons.items()} == expected_skips
    assert reasons[sample_key("one_frame.mp4")][1] == (
        "video has 1 frames, the shortest bucket needs 4; short_policy='skip'")
    assert "carry no known video container signature" in reasons["garbage"][1]
    assert "unreadable caption" in reasons["bad_text"][1] and "no media member" in reasons["no_media"][1]
    assert (counters["ok"], counters["skipped"]) == (len(readable), len(expected_skips))
    assert counters["reasons"] == dict(Counter(expected_skips.values()))
    for key, name in readable.items():
        sample = samples[key]
        assert sample["caption"] == GOOD[name][3] and sample["meta"]["source"] == name
        assert sample["meta"]["orig_size"] == list(GOOD[name][1:3])
        assert -1.0 <= float(sample["video"].min()) and float(sample["video"].max()) <= 1.0


def test_backends_agree_and_rotation_is_upright(corpus: dict[str, Any]) -> None:
    by_decord = _read(corpus["out"], backend="decord")[0]
    by_pyav = _read(corpus["out"], backend="pyav")[0]
    assert by_decord.keys() == by_pyav.keys()
    for key, sample in by_decord.items():
        diff = float((sample["video"] - by_pyav[key]["video"]).abs().max()) * 127.5
        # 10-bit and odd-size 4:2:0 are converted to RGB by two FFmpeg builds: a few levels apart
        assert diff <= (8 if sample["meta"]["source"] in ("ten_bit.mp4", "odd_317x239.mp4") else 0), key
    source, data = corpus["media"]["rotated_90.mp4"]
    upright, sideways = np.rot90(source, 1, axes=(1, 2)), np.rot90(source, 3, axes=(1, 2))
    for backend in ("decord", "pyav"):
        frames = decode_frames(data, "mp4", backend=backend).astype(np.int16)
        assert frames.shape == (6, 64, 32, 3)
        assert np.abs(frames - upright).mean() < 4 < np.abs(frames - sideways).mean()
    for name in ("ten_bit.mp4", "yuv444.mp4", "odd_317x239.mp4"):
        source, data = corpus["media"][name]
        for backend in ("decord", "pyav"):
            frames = decode_frames(data, "mp4", backend=backend)
            assert frames.dtype == np.uint8 and np.abs(frames.astype(np.int16) - source).mean() < 4, name


def test_short_policy_pad_reads_short_videos(corpus: dict[str, Any]) -> None:
    samples, keys, reasons, counters = _read(corpus["out"], short_policy="pad")
    assert Counter(keys) == Counter(sample_key(name) for name in GOOD)
    assert samples[sample_key("one_frame.mp4")]["meta"]["frame_indices"] == [0, 0, 0, 0]
    assert samples[sample_key("short.mp4")]["meta"]["frame_indices"] == [0, 1, 2, 2]
    assert {key: kind for key, (kind, _) in reasons.items()} == LOADER_BAD
    assert counters["skipped"] == len(LOADER_BAD)


def test_variable_frame_rate_by_timestamps(corpus: dict[str, Any]) -> None:
    data = corpus["media"]["vfr.mp4"][1]
    full = decode_frames(data, "mp4", backend="pyav")
    late = [70, 71, 72, 73]  # past the seek threshold: PyAV seeks and must find frames by timestamp
    for backend in ("decord", "pyav"):
        np.testing.assert_array_equal(decode_frames(data, "mp4", late, backend=backend), full[late])
    times = np.array(VFR_PTS_MS) / 1000
    meta = json.dumps({"height": 32, "width": 32, "frames": 80}).encode()
    raw = {"__key__": "vfr", "mp4": data, "txt": b"", "json": meta}
    spec = ClipSpec(4, target_fps=2.0, start="center")
    picked = []
    for backend in ("decord", "pyav"):
        clip = decode_clip(raw, spec, [Bucket(16, 16, 4)], rng=np.random.default_rng(0), backend=backend)
        picked.append(clip.meta["frame_indices"])
        assert clip.meta["fps"] == 2.0
    indices = picked[0]
    assert picked[1] == indices and len(set(indices)) == 4
    for i, index in enumerate(indices):  # the frame on screen at 0.5 s steps from the first one
        target = times[indices[0]] + i * 0.5
        assert times[index] <= target + 1e-6 < times[index + 1]
    short = np.array([0.0, 0.1, 0.5])  # 4 frames at 4 fps need 0.75 s
    with pytest.raises(ClipTooShortError, match="lasts 0.500 s, clip needs 0.750 s"):
        clip_indices_by_time(short, 4, target_fps=4.0, short_policy="skip")
    assert clip_indices_by_time(short, 4, target_fps=4.0, short_policy="pad") == ([0, 1, 2, 2], 4.0)
    assert clip_indices_by_time(short, 4, target_fps=4.0, short_policy="loop") == ([0, 1, 2, 0], 4.0)


def test_reencode_turns_hostile_sources_into_upright_8bit(corpus: dict[str, Any], tmp_path: Path) -> None:
    manifest = ms.make_shards(corpus["src"], tmp_path, reencode=True, preset="ultrafast", keyframe_interval=4,
                              val_fraction=1.0)
    assert {s["path"]: s["reason"] for s in manifest["skipped"]} == BAD
    shards = sorted(str(url) for url in tmp_path.glob("val-*.tar"))
    written = {json.loads(s["json"])["source"]: s for s in wds.WebDataset(shards, shardshuffle=False)}
    assert set(written) == set(GOOD)
    for name, (frames, height, width, _) in GOOD.items():
        meta = json.loads(written[name]["json"])
        assert meta["reencoded"] and meta["rotation"] == 0 and meta["frames"] == frames, name
        assert (meta["height"], meta["width"]) == (height // 2 * 2, width // 2 * 2), name
    source = corpus["media"]["rotated_90.mp4"][0]
    frames = decode_frames(written["rotated_90.mp4"]["mp4"], "mp4", backend="pyav").astype(np.int16)
    assert np.abs(frames - np.rot90(source, 1, axes=(1, 2))).mean() < 4
    with av.open(io.BytesIO(written["ten_bit.mp4"]["mp4"])) as container:
        assert container.streams.video[0].codec_context.pix_fmt == "yuv420p"
