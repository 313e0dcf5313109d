"""Synthetic corpus: determinism, captions that match the pixels, held-out prompts, reuse/regenerate."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import webdataset as wds

from data_prep.synthetic import (
    SyntheticConfig,
    ensure_synthetic_corpus,
    generate_synthetic_corpus,
    scene_for,
)
from vdm.synthetic.scenes import (
    COLORS,
    HELDOUT_COLOR_MOTION,
    HELDOUT_SHAPE_COLOR,
    render_background,
    render_scene,
)

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(seed=0, num_train=24, num_val=4, num_frames=9, height=48, width=48, fps=8, keyframe_interval=4,
             max_samples_per_shard=10, workers=1)


def _hashes(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.glob("*.tar"))}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_synthetic_corpus(tmp_path_factory.mktemp("syn") / "corpus", **SMALL)


def _samples(root: Path) -> list[dict[str, Any]]:
    urls = sorted(str(p) for p in root.glob("*.tar"))
    return list(wds.WebDataset(urls, shardshuffle=False))


def _decode(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_corpus_layout(corpus: Path) -> None:
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert manifest["totals"]["samples"] == 28 and manifest["splits"]["val"]["samples"] == 4
    assert len(manifest["splits"]["train"]["shards"]) == 3 and manifest["skipped"] == []
    samples = _samples(corpus)
    assert len(samples) == 28 and all(set(s) >= {"mp4", "txt", "json"} for s in samples)
    meta = json.loads(samples[0]["json"])
    assert (meta["frames"], meta["width"], meta["height"], meta["fps"]) == (9, 48, 48, 8.0)
    assert meta["codec"] == "h264"
    frames = _decode(samples[0]["mp4"])
    with av.open(io.BytesIO(samples[0]["mp4"])) as container:
        keyframes = [i for i, f in enumerate(container.decode(video=0)) if f.key_frame]
    assert frames.shape == (9, 48, 48, 3) and keyframes == [0, 4, 8]


def test_determinism(corpus: Path, tmp_path: Path) -> None:
    config = SyntheticConfig(**{k: v for k, v in SMALL.items() if k != "workers"})
    generate_synthetic_corpus(tmp_path / "same", config, workers=1)
    assert _hashes(tmp_path / "same") == _hashes(corpus)
    prompts = (tmp_path / "same" / "prompts_heldout.jsonl").read_bytes()
    assert prompts == (corpus / "prompts_heldout.jsonl").read_bytes()
    other = SyntheticConfig(**{**config.__dict__, "seed": 1})
    generate_synthetic_corpus(tmp_path / "other", other, workers=1)
    assert set(_hashes(tmp_path / "other").values()).isdisjoint(_hashes(corpus).values())


def _nearest_color(rgb: np.ndarray) -> str:
    return min(COLORS, key=lambda name: float(np.sum((np.array(COLORS[name]) - rgb) ** 2)))


def test_captions_match_pixels(corpus: Path) -> None:
    checked = {"moving": 0, "size": 0}
    for sample in _samples(corpus):
        meta, caption = json.loads(sample["json"]), sample["txt"].decode()
        extra = meta["extra"]
        words = caption.split()
        assert caption.endswith(f"on a {extra['background']} background")
        for obj in extra["objects"]:
            assert f"{obj['color']} {obj['shape']}" in caption
        if extra["num_objects"] != 1:
            continue
        obj = extra["objects"][0]
        frames = _decode(sample["mp4"]).astype(np.float32)
        bg = render_background(extra["background"], 48, 48)
        masks = np.abs(frames - bg).sum(-1) > 120  # (T, H, W) pixels clearly not background
        assert masks[0].sum() > 10 and masks[-1].sum() > 10
        assert _nearest_color(np.median(frames[masks], axis=0)) == words[1] == obj["color"]
        ys, xs = np.nonzero(masks[0])
        ye, xe = np.nonzero(masks[-1])
        dx, dy = xe.mean() - xs.mean(), ye.mean() - ys.mean()
        motion = obj["motion"]
        if motion in ("left", "right", "up", "down"):
            assert f"moving {motion}" in caption
            along, across = (dx, dy) if motion in ("left", "right") else (dy, dx)
            sign = -1 if motion in ("left", "up") else 1
            assert sign * along > 3 and abs(across) < 1.5, (caption, dx, dy)
            checked["moving"] += 1
        else:
            assert abs(dx) < 1 and abs(dy) < 1
            growth = masks[-1].sum() / masks[0].sum()
            assert {"growing": growth > 1.5, "shrinking": growth < 0.67, "still": 0.8 < growth < 1.25}[motion]
            checked["size"] += 1
    assert checked["moving"] >= 5


def test_shapes_stay_in_frame() -> None:
    config = SyntheticConfig()
    for index in range(60):
        scene = scene_for(config, "train", index)
        frames = render_scene(scene, config.num_frames, config.height, config.width)
        bg = np.rint(render_background(scene.background, config.height, config.width)).astype(np.uint8)
        for edge in (np.s_[:, 0, :], np.s_[:, -1, :], np.s_[:, :, 0], np.s_[:, :, -1]):
            assert np.array_equal(frames[edge], np.broadcast_to(bg[edge[1:]], frames[edge].shape))


def _pairs(obj: dict[str, Any]) -> list[bool]:
    return [(obj["shape"], obj["color"]) in HELDOUT_SHAPE_COLOR,
            (obj["color"], obj["motion"]) in HELDOUT_COLOR_MOTION]


def test_heldout_prompts(corpus: Path) -> None:
    prompts = [json.loads(line) for line in (corpus / "prompts_heldout.jsonl").read_text().splitlines()]
    assert (corpus / "prompts_heldout.txt").read_text().splitlines() == [p["prompt"] for p in prompts]
    assert len(prompts) == 4 * (len(HELDOUT_SHAPE_COLOR) + len(HELDOUT_COLOR_MOTION))
    assert len({p["prompt"] for p in prompts}) == len(prompts)
    assert [p["seed"] for p in prompts] == list(range(len(prompts)))
    # the training split of the default corpus: scenes only (no rendering needed)
    default = SyntheticConfig()
    train = [scene_for(default, "train", i) for i in range(default.num_train)]
    train_captions = {s.caption() for s in train}
    vocabulary = {w for c in train_captions for w in c.split()}
    for scene in train + [scene_for(default, "val", i) for i in range(default.num_val)]:
        for obj in scene.attributes()["objects"]:
            assert not any(_pairs(obj)), scene.caption()
    small_captions = {s["txt"].decode() for s in _samples(corpus)}
    for prompt in prompts:
        text, obj = prompt["prompt"], prompt["attributes"]["objects"][0]
        assert text not in train_captions and text not in small_captions
        assert set(text.split()) <= vocabulary, text
        assert sum(_pairs(obj)) == 1 and f"{obj['color']} {obj['shape']}" in text
        heldout_pairs = [list(p) for p in HELDOUT_SHAPE_COLOR + HELDOUT_COLOR_MOTION]
        assert prompt["attributes"]["heldout"]["pair"] in heldout_pairs


def test_reuse_and_regenerate(tmp_path: Path) -> None:
    opts = {**SMALL, "num_train": 4, "num_val": 1, "num_frames": 5, "height": 16, "width": 16}
    root = ensure_synthetic_corpus(tmp_path / "c", **opts)
    stamp = (root / "manifest.json").stat().st_mtime_ns
    assert ensure_synthetic_corpus(tmp_path / "c", **opts) == root
    assert (root / "manifest.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    ensure_synthetic_corpus(tmp_path / "c", **{**opts, "num_val": 2})
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["options"]["num_val"] == 2 and manifest["splits"]["val"]["samples"] == 2
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["c"]
    (root / "val-000000.tar").unlink()  # an incomplete corpus is rebuilt
    ensure_synthetic_corpus(tmp_path / "c", **{**opts, "num_val": 2})
    assert (root / "val-000000.tar").is_file()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        ensure_synthetic_corpus(tmp_path / "mine", **opts)
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep"


def test_cli(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "data_prep.synthetic", str(tmp_path / "cli"), "--num-train", "3",
           "--num-val", "1", "--frames", "5", "--height", "16", "--width", "16", "--no-progress"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert manifest["totals"]["samples"] == 4 and manifest["options"]["num_frames"] == 5
