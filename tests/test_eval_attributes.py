"""Attribute scores in evaluation: prompts with scene attributes and groups, scores split by group, the
training hook's rank-summable counts, the verdict file and the README figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vdm.data.encode import encode_frames
from vdm.eval.attributes import AttributeCounts, expected_attributes, score_videos, write_verdicts
from vdm.eval.generation import ENCODE_OPTIONS, GeneratedVideo, read_frames
from vdm.eval.prompts import PromptSpec, read_prompts
from vdm.synthetic.scenes import Scene, evaluation_prompts, place_object, render_scene

FRAMES, SIZE = 9, 64


def render(attributes: dict, seed: int) -> np.ndarray:
    """The scene a prompt asks for, rendered by the corpus's own renderer: (T, H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    (obj,) = attributes["objects"]
    placed = place_object(rng, obj["shape"], obj["color"], obj["motion"], obj["speed"], SIZE, SIZE, 0.15)
    return render_scene(Scene(attributes["background"], (placed,)), FRAMES, SIZE, SIZE)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> list[PromptSpec]:
    path = tmp_path_factory.mktemp("prompts") / "prompts_eval.jsonl"
    rows = evaluation_prompts(seed=0, per_pair=1)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return read_prompts(path)


def test_evaluation_prompts_hold_both_groups_with_distinct_seeds(prompts: list[PromptSpec]) -> None:
    groups = [p.group for p in prompts]
    assert groups.count("heldout") == groups.count("seen") == 9
    assert len({p.seed for p in prompts}) == len(prompts)
    assert all(p.attributes and p.attributes["num_objects"] == 1 for p in prompts)
    # a plain-text prompt in the corpus grammar is scored from its parsed caption
    parsed = expected_attributes(PromptSpec("a red circle moving left quickly on a gray background"))
    assert parsed is not None and parsed["objects"][0]["motion"] == "left"
    assert expected_attributes(PromptSpec("a cat playing piano")) is None


def test_rendered_prompts_score_right_and_wrong_prompts_score_low(prompts: list[PromptSpec]) -> None:
    videos = [render(p.attributes, i) for i, p in enumerate(prompts)]
    metrics, verdicts = score_videos(videos, prompts)
    assert metrics["attr/all"] >= 0.9 and metrics["attr/num_videos"] == len(prompts)
    assert {"attr_heldout/all", "attr_seen/all", "attr_heldout/color", "attr_seen/motion"} <= set(metrics)
    assert all(v is not None for v in verdicts)
    # negative control: the same videos against prompts of another colour
    palette = ["red", "green", "blue", "yellow", "magenta", "cyan", "white", "orange"]
    swapped = []
    for p in prompts:
        attrs = json.loads(json.dumps(p.attributes))
        color = attrs["objects"][0]["color"]
        attrs["objects"][0]["color"] = palette[(palette.index(color) + 3) % len(palette)]
        swapped.append(PromptSpec(p.prompt, p.seed, attrs, p.group))
    wrong, _ = score_videos(videos, swapped)
    assert wrong["attr/color"] <= 0.05 and wrong["attr/all"] <= 0.05


def test_hook_counts_equal_the_evaluation_scores(prompts: list[PromptSpec]) -> None:
    videos = [render(p.attributes, i) for i, p in enumerate(prompts)]
    videos[0] = np.zeros_like(videos[0])  # a blank video: count (and everything after it) wrong
    metrics, verdicts = score_videos(videos, prompts)
    counts = AttributeCounts(["heldout", "seen"])
    for verdict, spec in zip(verdicts, prompts):
        counts.add(verdict, spec.group)
    # two ranks' halves summed give the same as one rank's whole
    half_a, half_b = AttributeCounts(["heldout", "seen"]), AttributeCounts(["heldout", "seen"])
    for i, (verdict, spec) in enumerate(zip(verdicts, prompts)):
        (half_a if i % 2 else half_b).add(verdict, spec.group)
    logged = counts.metrics(half_a.tensor() + half_b.tensor())
    assert logged == counts.metrics(counts.tensor())
    for key, value in logged.items():
        name = key.removeprefix("val/attr_")
        grouped = name.split("_")[0] in ("heldout", "seen")
        group, _, attribute = name.rpartition("_") if grouped else ("", "", name)
        assert metrics[f"attr{'_' + group if group else ''}/{attribute}"] == pytest.approx(value), key


def test_verdicts_file_and_figures(prompts: list[PromptSpec], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from vdm.eval.figures import accuracy_curve, sample_grid

    (tmp_path / "videos").mkdir()
    records, frames = [], []
    for i, spec in enumerate(prompts[:6]):
        video = render(spec.attributes, i)
        path = tmp_path / "videos" / f"p{i:04d}_s00.mp4"
        path.write_bytes(encode_frames(video, 8, ENCODE_OPTIONS))
        records.append(GeneratedVideo(path, spec.prompt, i, 0, spec.seed or 0))
        frames.append(read_frames(path))
    _, verdicts = score_videos(frames, prompts[:6])
    rows = [json.loads(line) for line in write_verdicts(tmp_path / "attributes.jsonl", records, prompts[:6],
                                                        verdicts).read_text().splitlines()]
    assert [r["video"] for r in rows] == [f"p{i:04d}_s00.mp4" for i in range(6)]
    assert {"prompt", "group", "seed", "matches", "all_correct", "detected", "expected"} <= set(rows[0])
    grid = sample_grid(tmp_path, tmp_path / "grid.png", group="heldout", limit=4)
    history = tmp_path / "history.jsonl"
    rows = [{"step": s, "train_seconds": 10.0 * s, "val/attr_heldout_all": s / 40,
             "val/attr_heldout_color": s / 20} for s in (5, 10, 20)]
    history.write_text("".join(json.dumps(row) + "\n" for row in rows))
    curve = accuracy_curve(history, tmp_path / "curve.png")
    for png in (grid, curve):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_vae_ceiling_scores_videos_and_their_reconstructions(synthetic_root: Path, vae_export_dir: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    from vdm.eval.vae_ceiling import main, vae_ceiling

    result = vae_ceiling(synthetic_root, vae_export_dir, limit=4)
    assert result["videos"]["attr/num_videos"] == result["reconstructions"]["attr/num_videos"] == 4
    assert result["videos"]["attr/all"] >= 0.75  # the corpus's own videos read right
    # an untrained VAE reconstructs no recognisable scene
    assert result["reconstructions"]["attr/all"] < result["videos"]["attr/all"]
    db = result["psnr"]
    assert set(db) == {"reconstruction", "mean_frame", "reconstruction_moving", "mean_frame_moving"}
    # the untrained VAE is far worse than the mean frame, which the corpus's slow scenes keep near 30 dB
    assert db["reconstruction"] < db["mean_frame"] and db["mean_frame"] > 20
    assert main([str(synthetic_root), str(vae_export_dir), "--limit", "2"]) == 0
    assert "reconstructed" in (out := capsys.readouterr().out) and "mean frame" in out
