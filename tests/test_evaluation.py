"""Evaluation library: prompt files, resumable generation, metrics.json (the report: test_report.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from tests.helpers.modules import make_diffusion_module
from vdm.eval.generation import generate_videos, read_video, write_metrics
from vdm.eval.prompts import PromptSpec, read_prompts, video_seed
from vdm.utils.checkpoints import checkpoint_hash

GEN_KWARGS = dict(
    videos_per_prompt=2, batch_size=4, num_frames=5, height=32, width=32, num_steps=1, guidance_scale=2.0,
    base_seed=7,
)


def test_read_prompts_txt_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("a red ball\n\n   \n  a blue cube  \n", encoding="utf-8")
    assert read_prompts(path) == [PromptSpec("a red ball"), PromptSpec("a blue cube")]


def test_read_prompts_jsonl_fields_and_seeds(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "one", "seed": 3}, {"caption": "two"}, {"text": "three", "seed": None}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    assert read_prompts(path) == [PromptSpec("one", 3), PromptSpec("two"), PromptSpec("three")]


@pytest.mark.parametrize(
    "lines, match",
    [
        (['{"prompt": "ok"}', "{not json"], r"p\.jsonl:2: invalid JSON"),
        (['{"prompt": "ok"}', "", '{"seed": 1}'], r"p\.jsonl:3: no non-empty prompt field"),
        (['{"prompt": "ok", "seed": "x"}'], r"p\.jsonl:1: seed must be an integer"),
    ],
)
def test_read_prompts_jsonl_errors_name_file_and_line(tmp_path: Path, lines: list[str], match: str) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=match):
        read_prompts(path)


def test_read_prompts_rejects_missing_empty_and_unknown(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompts(tmp_path / "empty.txt")
    (tmp_path / "p.csv").write_text("a\n")
    with pytest.raises(ValueError, match=r"\.txt or \.jsonl"):
        read_prompts(tmp_path / "p.csv")


def test_video_seed_rule() -> None:
    assert video_seed(PromptSpec("a"), 3, 0, base_seed=10) == 13
    assert video_seed(PromptSpec("a"), 3, 2, base_seed=10) == 13 + 2 * 1_000_003
    assert video_seed(PromptSpec("a", seed=5), 3, 1, base_seed=10) == 5 + 1_000_003


def test_metrics_json_structure(tmp_path: Path) -> None:
    path = write_metrics(tmp_path, {"fvd": 1.5, "clip_score": 0.3}, {"seed": 0, "checkpoint_hash": "ab"})
    text = path.read_text()
    data = json.loads(text)
    expected = {"metrics": {"clip_score": 0.3, "fvd": 1.5}, "protocol": {"checkpoint_hash": "ab", "seed": 0}}
    assert data == expected
    assert text == json.dumps(data, sort_keys=True, indent=2) + "\n"


def test_checkpoint_hash_file_and_directory(tmp_path: Path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.bin").write_bytes(b"aa")
    (tmp_path / "d" / "sub" / "b.bin").write_bytes(b"bb")
    first = checkpoint_hash(tmp_path / "d")
    assert first == checkpoint_hash(tmp_path / "d") and len(first) == 64
    (tmp_path / "d" / "sub" / "b.bin").write_bytes(b"bc")
    assert checkpoint_hash(tmp_path / "d") != first
    (tmp_path / "f.bin").write_bytes(b"xyz")
    assert checkpoint_hash(tmp_path / "f.bin") == hashlib.sha256(b"xyz").hexdigest()


def test_generation_is_resumable_and_deterministic(
    vae_export_dir: Path, text_encoder_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = make_diffusion_module(vae_export_dir, text_encoder_dir)
    prompts = [PromptSpec("a red ball"), PromptSpec("a blue cube", seed=11)]
    records = generate_videos(module, prompts, tmp_path, **GEN_KWARGS)
    names = sorted(p.name for p in (tmp_path / "videos").iterdir())
    assert names == ["p0000_s00.mp4", "p0000_s01.mp4", "p0001_s00.mp4", "p0001_s01.mp4"]
    assert [r.path.name for r in records] == names
    assert [r.seed for r in records] == [7, 7 + 1_000_003, 11, 11 + 1_000_003]
    video = read_video(records[0].path)
    assert video.shape == (3, 5, 32, 32) and video.min() >= -1 and video.max() <= 1

    before = {r.path: (r.path.stat().st_mtime_ns, r.path.read_bytes()) for r in records}

    def fail(*args, **kwargs):
        raise AssertionError("sample must not be called for existing videos")

    with monkeypatch.context() as m:
        m.setattr(module, "sample", fail)
        again = generate_videos(module, prompts, tmp_path, **GEN_KWARGS)
    assert again == records
    assert {r.path: (r.path.stat().st_mtime_ns, r.path.read_bytes()) for r in records} == before

    removed = records[3].path
    removed.unlink()
    calls = []
    original = module.sample
    monkeypatch.setattr(module, "sample", lambda *a, **k: calls.append(k["seed"]) or original(*a, **k))
    generate_videos(module, prompts, tmp_path, **GEN_KWARGS)
    assert calls == [[records[3].seed]]
    assert removed.read_bytes() == before[removed][1]
    kept_copy = tmp_path / "first_run.mp4"
    kept_copy.write_bytes(before[removed][1])
    assert torch.equal(read_video(removed), read_video(kept_copy))
    for r in records[:3]:
        assert r.path.stat().st_mtime_ns == before[r.path][0]
