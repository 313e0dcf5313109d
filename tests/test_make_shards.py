"""make_shards: round trip through stock webdataset, manifest accounting, filters, sources, determinism."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import av
import pytest
import webdataset as wds

from data_prep import make_shards as ms
from data_prep.shard_writer import ShardSink
from tests.helpers.media import write_corrupt_files, write_image, write_video

REPO = Path(__file__).resolve().parents[1]

# relative path -> (frames, height, width) for the videos of the tree corpus
VIDEOS = {
    "a.mp4": (12, 64, 64), "b.webm": (10, 30, 40), "c.mkv": (9, 32, 50), "d.mov": (8, 40, 40),
    "e.avi": (12, 48, 64), "nested/f.mp4": (12, 32, 48), "nested/deep/short.mp4": (3, 32, 32),
}
IMAGES = {"img.png": (32, 48), "photo.jpeg": (40, 40)}
CAPTIONS = {"a.mp4": "a square on a gradient", "d.mov": "mjpeg clip", "nested/f.mp4": "the 48x32 quirk size",
            "img.png": "a still image", "nested/deep/short.mp4": "too short"}
BAD = {"bad/truncated.mp4", "bad/zeros.mp4", "bad/empty.webm", "bad/notavideo.mkv", "bad/broken.png"}


def _key(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()[:16]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    for i, (name, (frames, h, w)) in enumerate(VIDEOS.items()):
        write_video(root / name, num_frames=frames, height=h, width=w, fps=8, seed=i)
    for i, (name, (h, w)) in enumerate(IMAGES.items()):
        write_image(root / name, height=h, width=w, seed=i)
    for name, caption in CAPTIONS.items():
        (root / name).with_suffix(".txt").write_text(caption + "\n")
    (root / "b.json").write_text(json.dumps({"caption": "json caption", "score": 0.5, "tags": ["x"]}))
    (root / "c.json").write_text(json.dumps({"text": "text field caption"}))
    write_corrupt_files(root / "bad")
    (root / "notes.md").write_text("readme\n")
    (root / "clip.gif").write_bytes(b"GIF89a")
    (root / ".hidden.mp4").write_bytes(b"ignored")
    return root


def _read_shards(out: Path, manifest: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Samples per shard name, read with stock webdataset."""
    shards = {}
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            ds = wds.WebDataset(str(out / shard["name"]), shardshuffle=False)
            shards[shard["name"]] = list(ds)
    return shards


def _shard_hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


@pytest.fixture(scope="module")
def built(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("out")
    return out, ms.make_shards(tree, out, val_fraction=0.5, max_samples_per_shard=4)


def test_round_trip_with_stock_webdataset(tree: Path, built: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = built
    samples = [s for shard in _read_shards(out, manifest).values() for s in shard]
    by_source = {json.loads(s["json"])["source"]: s for s in samples}
    assert set(by_source) == set(VIDEOS) | set(IMAGES)
    for name, sample in by_source.items():
        meta = json.loads(sample["json"])
        media_ext = {"photo.jpeg": "jpg"}.get(name, Path(name).suffix[1:])
        assert sample["__key__"] == meta["key"] == _key(name)
        assert sample[media_ext] == (tree / name).read_bytes()
        sidecar_json = {"b.webm": "json caption", "c.mkv": "text field caption"}
        expected_caption = sidecar_json.get(name, CAPTIONS.get(name, ""))
        assert sample["txt"].decode() == expected_caption
        assert meta["reencoded"] is False and meta["split"] in ("train", "val")
        if name in VIDEOS:
            frames, h, w = VIDEOS[name]
            assert (meta["kind"], meta["frames"], meta["height"], meta["width"]) == ("video", frames, h, w)
            assert meta["duration"] == pytest.approx(frames / 8) and meta["fps"] == 8.0
        else:
            assert (meta["kind"], meta["frames"], meta["duration"]) == ("image", 1, 0.0)
    assert json.loads(by_source["b.webm"]["json"])["extra"] == {"score": 0.5, "tags": ["x"]}
    listed = subprocess.run(["tar", "-tf", str(out / manifest["splits"]["train"]["shards"][0]["name"])],
                            check=True, capture_output=True, text=True).stdout.split()
    member_exts = {"json", "txt", "mp4", "webm", "mkv", "mov", "avi", "jpg", "png"}
    assert listed and all(n.split(".", 1)[1] in member_exts for n in listed)


def test_every_input_accounted_for(built: tuple[Path, dict[str, Any]]) -> None:
    _, manifest = built
    skipped = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == BAD | {"notes.md", "clip.gif"}
    assert skipped["notes.md"] == "unsupported extension .md"
    assert skipped["clip.gif"] == "unsupported extension .gif"
    assert skipped["bad/empty.webm"] == "empty file"
    assert skipped["bad/zeros.mp4"].startswith("wrong magic")
    assert skipped["bad/truncated.mp4"].startswith("truncated or corrupt")
    assert skipped["bad/broken.png"].startswith("corrupt image")
    assert manifest["totals"]["samples"] + len(skipped) == len(VIDEOS) + len(IMAGES) + len(BAD) + 2


def test_manifest_counts_match_tars(built: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = built
    shards = _read_shards(out, manifest)
    rows = [json.loads(line) for line in (out / manifest["index"]).read_text().splitlines()]
    assert len(rows) == manifest["totals"]["samples"] == sum(len(v) for v in shards.values())
    for split, info in manifest["splits"].items():
        metas = []
        for shard in info["shards"]:
            shard_metas = [json.loads(s["json"]) for s in shards[shard["name"]]]
            assert shard["samples"] == len(shard_metas) <= 4
            assert shard["frames"] == sum(m["frames"] for m in shard_metas)
            assert shard["hours"] == pytest.approx(sum(m["duration"] for m in shard_metas) / 3600)
            assert shard["bytes"] == (out / shard["name"]).stat().st_size
            assert all(m["split"] == split for m in shard_metas)
            assert [r["key"] for r in rows if r["shard"] == shard["name"]] == [m["key"] for m in shard_metas]
            metas += shard_metas
        assert info["samples"] == len(metas) and info["frames"] == sum(m["frames"] for m in metas)
        assert info["hours"] == pytest.approx(sum(m["duration"] for m in metas) / 3600)
        names = [s["name"] for s in info["shards"]]
        assert names == [f"{split}-{i:06d}.tar" for i in range(len(names))]
    assert manifest["splits"]["val"]["samples"] > 0 and manifest["splits"]["train"]["samples"] > 0
    totals = manifest["totals"]
    assert totals["hours"] == pytest.approx(sum(r["duration"] for r in rows) / 3600)
    assert totals["bytes"] == sum(p.stat().st_size for p in out.glob("*.tar"))
    assert totals["uncaptioned"] == sum(1 for s in shards.values() for x in s if not x["txt"])
    assert manifest["format"] == "vdm-shards" and manifest["version"] == 1
    assert manifest["options"]["val_fraction"] == 0.5


def test_filters(tree: Path, tmp_path: Path) -> None:
    manifest = ms.make_shards(tree, tmp_path / "o1", min_frames=8, min_side=32, max_duration=1.4,
                              require_caption=True)
    skipped = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert skipped["nested/deep/short.mp4"] == "too short: 3 frames < 8"
    assert skipped["b.webm"] == "too small: 40x30, min side 30 < 32"
    assert skipped["a.mp4"] == "too long: 1.50 s > 1.40 s"
    assert skipped["e.avi"] == "no caption"  # uncaptioned: the caption check comes first
    index = (tmp_path / "o1" / "samples.jsonl").read_text().splitlines()
    written = {json.loads(line)["key"] for line in index}
    # images are exempt from frame/duration filters; mjpeg 8 frames passes min_frames=8
    assert written == {_key("img.png"), _key("d.mov"), _key("c.mkv")}
    manifest = ms.make_shards(tree, tmp_path / "o2", min_duration=1.2, min_side=40)
    skipped = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert skipped["d.mov"] == "too short: 1.00 s < 1.20 s"
    assert skipped["img.png"].startswith("too small: 48x32")
    assert "photo.jpeg" not in skipped and "a.mp4" not in skipped


def test_csv_and_jsonl_manifests(tree: Path, tmp_path: Path) -> None:
    rows = [
        {"path": "a.mp4", "caption": "csv caption a", "split": "val", "source_id": "7"},
        {"path": str(tree / "b.webm"), "caption": "absolute path", "split": "train", "source_id": ""},
        {"path": "missing.mp4", "caption": "x", "split": "", "source_id": ""},
        {"path": "a.mp4", "caption": "listed twice", "split": "", "source_id": ""},
        {"path": "notes.md", "caption": "", "split": "", "source_id": ""},
        {"path": "d.mov", "caption": "", "split": "test", "source_id": ""},
        {"path": "bad/zeros.mp4", "caption": "broken", "split": "train", "source_id": ""},
    ]
    (tmp_path / "links").symlink_to(tree)
    csv_path = tmp_path / "list.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "path": r["path"] if Path(r["path"]).is_absolute() else f"links/{r['path']}"}
                         for r in rows)
    jsonl_path = tree.parent / "list.jsonl"
    jsonl_path.write_text("".join(json.dumps({**r, "path": f"{tree.name}/{r['path']}"}) + "\n"
                                  for r in rows if not Path(r["path"]).is_absolute()) + "not json\n")
    for manifest_path, prefix in ((csv_path, "links/"), (jsonl_path, f"{tree.name}/")):
        out = tmp_path / f"out_{manifest_path.suffix[1:]}"
        manifest = ms.make_shards(manifest_path, out, val_fraction=0.0)
        skipped = {s["path"]: s["reason"] for s in manifest["skipped"]}
        assert skipped[f"{prefix}missing.mp4"] == "missing file"
        assert skipped[f"{prefix}a.mp4"].startswith("duplicate key")
        assert skipped[f"{prefix}notes.md"] == "unsupported extension .md"
        assert skipped[f"{prefix}d.mov"] == "invalid split 'test' (expected train or val)"
        assert skipped[f"{prefix}bad/zeros.mp4"].startswith("wrong magic")
        urls = sorted(map(str, out.glob("*.tar")))
        samples = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False)}
        meta_a = json.loads(samples[_key(f"{prefix}a.mp4")]["json"])
        assert meta_a["split"] == "val" and meta_a["extra"] == {"source_id": "7"}
        assert samples[_key(f"{prefix}a.mp4")]["txt"] == b"csv caption a"
        assert manifest["splits"]["val"]["samples"] == 1
    assert any(s["reason"].startswith("invalid manifest line") for s in manifest["skipped"])
    assert len(manifest["skipped"]) == 6


def test_rerun_byte_identical_and_parallel_equals_serial(tree: Path, tmp_path: Path,
                                                         built: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = built
    first = _shard_hashes(out)
    assert len(first) >= 3
    opts = {"val_fraction": 0.5, "max_samples_per_shard": 4}
    again = ms.make_shards(tree, tmp_path / "serial", **opts)
    parallel = ms.make_shards(tree, tmp_path / "parallel", workers=2, **opts)
    assert _shard_hashes(tmp_path / "serial") == first == _shard_hashes(tmp_path / "parallel")
    assert again["splits"] == manifest["splits"] == parallel["splits"]
    assert again["skipped"] == manifest["skipped"] == parallel["skipped"]
    assert (tmp_path / "parallel" / "samples.jsonl").read_bytes() == (out / "samples.jsonl").read_bytes()


def test_shard_bounds_and_stale_shards(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    manifest = ms.make_shards(tree, out, val_fraction=0.0, max_shard_bytes=12_000)
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) >= 4
    # tar pads to 10240-byte records, so a shard over the bound must be a single oversized sample
    assert all(s["bytes"] <= 12_000 or s["samples"] == 1 for s in shards)
    assert any(s["samples"] > 1 for s in shards)
    assert sum(s["samples"] for s in shards) == len(VIDEOS) + len(IMAGES)
    manifest = ms.make_shards(tree, out, val_fraction=0.0, max_samples_per_shard=100)
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar"]
    assert not list(out.glob(".*"))
    assert manifest["splits"]["train"]["shards"][0]["samples"] == len(VIDEOS) + len(IMAGES)


def test_reencode(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = ms.reencode_video

    def flaky(source: bytes, max_side: int | None, options: Any) -> bytes:
        if len(source) == (tree / "e.avi").stat().st_size:
            raise RuntimeError("encoder exploded")
        return real(source, max_side, options)

    monkeypatch.setattr(ms, "reencode_video", flaky)
    manifest = ms.make_shards(tree, tmp_path / "o", reencode=True, max_side=32, keyframe_interval=4,
                              val_fraction=0)
    skipped = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert skipped["e.avi"] == "re-encode failed: RuntimeError: encoder exploded"
    samples = list(wds.WebDataset(str(tmp_path / "o" / "train-000000.tar"), shardshuffle=False))
    videos = [s for s in samples if json.loads(s["json"])["kind"] == "video"]
    assert len(videos) == len(VIDEOS) - 1 and all("mp4" in s for s in videos)
    for sample in videos:
        meta = json.loads(sample["json"])
        assert meta["reencoded"] and meta["codec"] == "h264"
        with av.open(io.BytesIO(sample["mp4"])) as container:
            frames = list(container.decode(video=0))
        src_frames, src_h, src_w = VIDEOS[meta["source"]]
        assert len(frames) == meta["frames"] == src_frames
        w, h = frames[0].width, frames[0].height
        assert (w, h) == (meta["width"], meta["height"]) and max(w, h) <= 32 and w % 2 == 0 == h % 2
        assert abs(w / h - src_w / src_h) < 0.15
        keys = [i for i, f in enumerate(frames) if f.key_frame] + [len(frames)]
        assert keys[0] == 0 and max(b - a for a, b in zip(keys, keys[1:])) <= 4
    images = [s for s in samples if json.loads(s["json"])["kind"] == "image"]
    assert {("png" in s) or ("jpg" in s) for s in images} == {True} and len(images) == 2


def test_interrupted_run_leaves_no_manifest(tree: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "o"
    ms.make_shards(tree, out, max_samples_per_shard=2)
    assert (out / "manifest.json").exists()
    calls = Counter()

    def failing_add(self: ShardSink, sample: Any) -> bool:
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self, sample)

    original = ShardSink.add
    monkeypatch.setattr(ShardSink, "add", failing_add)
    with pytest.raises(KeyboardInterrupt):
        ms.make_shards(tree, out, max_samples_per_shard=2)
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("*.partial")) and not list(out.glob(".*.partial"))
    for path in out.glob("*.tar"):
        with tarfile.open(path) as tar:
            assert tar.getnames()


def test_cli_module_and_script(tree: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_video(src / "x.mp4", num_frames=9, height=32, width=32)
    (src / "x.txt").write_text("cli caption")
    write_video(src / "y.webm", num_frames=4, height=32, width=32)
    res = subprocess.run([sys.executable, "-m", "data_prep.make_shards", str(src), str(tmp_path / "o"),
                          "--min-frames", "5", "--workers", "1", "--no-progress", "--max-shard-bytes", "1M"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "wrote 1 samples" in res.stdout and "too short x1" in res.stdout
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["options"]["max_shard_bytes"] == 1 << 20 and manifest["totals"]["samples"] == 1
    res = subprocess.run([sys.executable, "data_prep/make_shards.py", str(src), str(tmp_path / "o2"),
                          "--min-frames", "50", "--workers", "2"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 1 and "wrote 0 samples" in res.stdout
