"""Attribute evaluator: accuracy on real corpus videos, negative controls, ambiguity, captions, CLI."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from data_prep.synthetic import ensure_synthetic_corpus
from vdm.data.encode import EncodeOptions, encode_frames
from vdm.metrics.attributes import (
    ATTRIBUTES,
    confusion,
    decode_mp4,
    detect_attributes,
    evaluate_video,
    format_confusion,
    iter_corpus,
    judge,
    main,
    summarize,
)
from vdm.synthetic.scenes import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    Scene,
    SceneObject,
    heldout_prompts,
    parse_caption,
    render_scene,
    sample_scene,
)

REPO = Path(__file__).resolve().parents[1]
Detected = tuple[dict[str, Any], tuple[dict[str, Any], list[str]]]  # expected, (detected, notes)


def _detect_corpus(root: Path) -> list[Detected]:
    return [(exp, detect_attributes(decode_mp4(mp4))) for _, mp4, exp in iter_corpus(root, "val")]


@pytest.fixture(scope="module")
def corpus64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("attr") / "c64"
    return ensure_synthetic_corpus(root, num_train=1, num_val=160, workers=1)  # 64 x 64, 17 frames


@pytest.fixture(scope="module")
def detected64(corpus64: Path) -> list[Detected]:
    return _detect_corpus(corpus64)


def _encoded(scene: Scene, frames: int = 17, size: int = 64) -> np.ndarray:
    """Render, encode as the corpus does (H.264 crf 18) and decode back: (T, H, W, 3) uint8."""
    mp4 = encode_frames(render_scene(scene, frames, size, size), 8, EncodeOptions(8, 18, "faster"))
    return decode_mp4(mp4)


def _still(shape: str, color: str, x: float, y: float, r: float) -> SceneObject:
    return SceneObject(shape, color, "still", None, (x, y), (x, y), (r, r))


# accuracy


def test_accuracy_on_corpus_videos(detected64: list[Detected]) -> None:
    verdicts = [judge(exp, *det) for exp, det in detected64]
    summary = summarize(verdicts)
    assert summary["attr/num_videos"] == 160
    assert sum(v.expected["num_objects"] == 2 for v in verdicts) >= 15  # both scene kinds are covered
    for attr in ATTRIBUTES:
        assert summary[f"attr/{attr}"] >= 0.98, (attr, summary)
    assert summary["attr/all"] >= 0.97, summary
    table = confusion(verdicts)
    assert sum(table["count"]["2"].values()) == sum(v.expected["num_objects"] == 2 for v in verdicts)
    assert "shape (rows: expected, columns: detected)" in format_confusion(table)


def test_accuracy_small_short_corpus(tmp_path: Path) -> None:
    root = ensure_synthetic_corpus(tmp_path / "c48", num_train=1, num_val=40, num_frames=9, height=48,
                                   width=48, workers=1)
    summary = summarize([judge(exp, *det) for exp, det in _detect_corpus(root)])
    for attr in ATTRIBUTES:
        assert summary[f"attr/{attr}"] >= 0.95, (attr, summary)


# negative controls: a wrong prompt must score low on the attribute it changes


def _next(values: list[str], value: str, skip: set[str] = frozenset()) -> str:
    i = values.index(value)
    return next(v for v in values[i + 1:] + values[:i] if v not in skip)


def _with_objects(change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def apply(expected: dict[str, Any]) -> dict[str, Any]:
        wrong = copy.deepcopy(expected)
        for obj in wrong["objects"]:
            change(obj)
        return wrong
    return apply


def _other_color(obj: dict[str, Any]) -> None:
    obj["color"] = _next(list(COLORS), obj["color"])


def _reverse_motion(obj: dict[str, Any]) -> None:
    flip = {"left": "right", "right": "left", "up": "down", "down": "up", "growing": "shrinking",
            "shrinking": "growing", "still": "growing"}
    obj["motion"] = flip[obj["motion"]]


def _other_shape(obj: dict[str, Any]) -> None:
    obj["shape"] = _next(list(SHAPES), obj["shape"])


def _other_speed(obj: dict[str, Any]) -> None:
    obj["speed"] = {"slowly": "quickly", "quickly": "slowly", None: None}[obj["speed"]]


def _other_background(expected: dict[str, Any]) -> dict[str, Any]:
    return {**expected, "background": _next(list(BACKGROUNDS), expected["background"])}


@pytest.mark.parametrize(("attr", "wrong"), [
    ("color", _with_objects(_other_color)),
    ("motion", _with_objects(_reverse_motion)),
    ("shape", _with_objects(_other_shape)),
    ("speed", _with_objects(_other_speed)),
    ("background", _other_background),
])
def test_wrong_prompt_scores_low(detected64: list[Detected], attr: str,
                                 wrong: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    verdicts = [judge(wrong(exp), *det) for exp, det in detected64]
    applicable = [v for v in verdicts if v.matches[attr] is not None]  # speed: directional objects only
    assert len(applicable) >= 80
    assert summarize(verdicts)[f"attr/{attr}"] <= 0.05
    assert np.mean([v.all_correct for v in applicable]) <= 0.05


# ambiguity is reported, not guessed


def test_blank_video_is_a_count_mismatch() -> None:
    expected = {"background": "gray", "num_objects": 1,
                "objects": [{"shape": "circle", "color": "red", "motion": "still", "speed": None}]}
    verdict = evaluate_video(_encoded(Scene("gray", ())), expected)
    assert verdict.matches["background"] and not verdict.matches["count"] and not verdict.all_correct
    assert not verdict.matches["color"] and verdict.detected["num_objects"] == 0
    assert any("no foreground" in n for n in verdict.notes)


def test_missing_object_is_a_count_mismatch() -> None:
    red, blue = _still("circle", "red", 18.0, 20.0, 7.0), _still("square", "blue", 44.0, 44.0, 7.0)
    both = Scene("black", (red, blue))
    assert evaluate_video(_encoded(both), both.attributes()).all_correct
    verdict = evaluate_video(_encoded(Scene("black", (red,))), both.attributes())
    assert not verdict.matches["count"] and not verdict.all_correct
    assert verdict.matches["color"] is False  # the blue square has no detected counterpart
    assert any("detected 1 objects, expected 2" in n for n in verdict.notes)


def test_overlapping_objects_are_reported() -> None:
    circle, square = _still("circle", "red", 28.0, 32.0, 9.0), _still("square", "blue", 36.0, 32.0, 8.0)
    scene = Scene("black", (circle, square))  # the square covers a third of the circle
    verdict = evaluate_video(_encoded(scene), scene.attributes())
    assert not verdict.all_correct and not verdict.matches["shape"]
    assert any("touches another object" in n for n in verdict.notes)
    assert any("no shape template fits" in n for n in verdict.notes)


def test_object_leaving_the_frame_is_noted() -> None:
    star = SceneObject("star", "yellow", "right", "quickly", (40.0, 32.0), (70.0, 32.0), (8.0, 8.0))
    verdict = evaluate_video(_encoded(Scene("gray", (star,))), Scene("gray", (star,)).attributes())
    assert any("partly outside the frame" in n for n in verdict.notes)
    assert verdict.matches["motion"] and verdict.matches["color"]


def test_verdict_is_json_safe_and_uses_raw_frames() -> None:
    scene = Scene("gradient", (SceneObject("triangle", "cyan", "growing", None, (30.0, 34.0), (30.0, 34.0),
                                           (5.0, 13.0)),))
    verdict = evaluate_video(render_scene(scene, 9, 64, 64), scene.attributes())  # not encoded
    assert verdict.all_correct, verdict.notes
    assert verdict.matches["speed"] is None
    assert json.loads(json.dumps(verdict.to_dict()))["detected"]["objects"][0]["shape"] == "triangle"
    with pytest.raises(ValueError, match="frames"):
        evaluate_video(np.zeros((1, 64, 64, 3), np.uint8), scene.attributes())


# captions


def test_parse_caption_inverts_scene_captions() -> None:
    rng = np.random.default_rng(0)
    for _ in range(400):
        scene = sample_scene(rng, 64, 64, 17, two_object_fraction=0.5)
        attrs = scene.attributes()
        for obj in attrs["objects"]:
            for key in ("start", "end", "radius"):
                del obj[key]
        assert parse_caption(scene.caption()) == attrs
    for prompt in heldout_prompts(0):
        attrs = {k: v for k, v in prompt["attributes"].items() if k != "heldout"}
        assert parse_caption(prompt["prompt"]) == attrs


@pytest.mark.parametrize("text", [
    "a red circle moving left on a gray background",
    "a red circle standing still",
    "an red circle standing still on a black background",
    "a purple circle growing on a black background",
    "a red circle growing and a blue star shrinking and a green square growing on a white background",
    "A red circle growing on a black background",
    "",
])
def test_parse_caption_rejects_other_text(text: str) -> None:
    with pytest.raises(ValueError, match="caption") as err:
        parse_caption(text)
    assert repr(text) in str(err.value)


# command line


def test_cli_on_corpus(corpus64: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "verdicts.json"
    assert main([str(corpus64), "--limit", "12", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "attr/color" in printed and "attr/all" in printed
    assert "motion (rows: expected, columns: detected)" in printed
    payload = json.loads(out.read_text())
    assert payload["summary"]["attr/num_videos"] == 12 and len(payload["videos"]) == 12
    assert set(payload["videos"][0]) >= {"name", "expected", "detected", "matches", "all_correct", "notes"}


def test_cli_on_mp4_folder(tmp_path: Path) -> None:
    scenes = [Scene("white", (_still("diamond", "green", 30.0, 30.0, 8.0),)),
              Scene("black", (SceneObject("circle", "orange", "down", "quickly", (20.0, 12.0), (20.0, 41.0),
                                          (7.0, 7.0)),)),
              Scene("gray", (_still("star", "magenta", 32.0, 30.0, 9.0),))]
    for i, scene in enumerate(scenes):
        mp4 = encode_frames(render_scene(scene, 17, 64, 64), 8, EncodeOptions(8, 18, "faster"))
        (tmp_path / f"v{i}.mp4").write_bytes(mp4)
    (tmp_path / "v0.txt").write_text(scenes[0].caption())
    (tmp_path / "v1.json").write_text(json.dumps({"attributes": scenes[1].attributes()}))
    (tmp_path / "v2.json").write_text(json.dumps({"caption": scenes[2].caption()}))
    (tmp_path / "orphan.mp4").write_bytes(mp4)  # no sidecar: skipped
    out = tmp_path / "report" / "verdicts.json"
    proc = subprocess.run([sys.executable, "-m", "vdm.metrics.attributes", str(tmp_path), "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "3 videos" in proc.stdout and "color (rows: expected, columns: detected)" in proc.stdout
    payload = json.loads(out.read_text())
    assert [v["name"] for v in payload["videos"]] == ["v0.mp4", "v1.mp4", "v2.mp4"]
    assert payload["summary"]["attr/all"] == 1.0, [v["notes"] for v in payload["videos"]]
