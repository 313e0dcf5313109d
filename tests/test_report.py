"""The offline HTML evaluation report: headline scores, video tiles with verdicts, filters, escaping."""

from __future__ import annotations

import base64
import re
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vdm.data.encode import encode_frames
from vdm.eval.generation import ENCODE_OPTIONS, GeneratedVideo
from vdm.eval.report import write_report

EVIL = "<script>alert(1)</script>"
COLORS = {"red": (220, 30, 30), "blue": (40, 80, 235), "green": (30, 190, 50)}
ATTR_METRICS = {
    "attr/background": 1.0, "attr/color": 0.875, "attr/shape": 0.5, "attr/all": 0.25,
    "attr_seen/color": 0.75, "attr_seen/all": 0.125,
    "attr_heldout/color": 0.625, "attr_heldout/all": 0.0,
}


def square_video(color: str, num_frames: int = 8, size: int = 64) -> bytes:
    """A 16 px square of ``color`` moving right on a gray background, as mp4 bytes."""
    frames = np.full((num_frames, size, size, 3), 128, np.uint8)
    for t in range(num_frames):
        frames[t, 24:40, 4 + 4 * t : 20 + 4 * t] = COLORS[color]
    return encode_frames(frames, 8, ENCODE_OPTIONS)


def make_records(tmp_path: Path, prompts: list[str]) -> list[GeneratedVideo]:
    records = []
    for i, prompt in enumerate(prompts):
        path = tmp_path / f"p{i:04d}_s00.mp4"
        path.write_bytes(square_video(list(COLORS)[i % len(COLORS)]))
        records.append(GeneratedVideo(path, prompt, i, 0, seed=100 + i))
    return records


def verdict(detected_shape: str = "circle", notes: tuple[str, ...] = ()) -> dict[str, Any]:
    obj = {"shape": "circle", "color": "red", "motion": "right", "speed": "quickly"}
    expected = {"background": "gray", "num_objects": 1, "objects": [obj]}
    seen = {**obj, "shape": detected_shape, "area": 0.06}  # the evaluator may add keys of its own
    detected = {"background": "gray", "num_objects": 1, "objects": [seen]}
    matches = {"background": True, "count": True, "color": True, "shape": detected_shape == "circle",
               "motion": True, "speed": None}
    return {"expected": expected, "detected": detected, "matches": matches,
            "all_correct": detected_shape == "circle", "notes": list(notes)}


def test_report_escapes_prompts_labels_and_manifest(tmp_path: Path) -> None:
    records = make_records(tmp_path, [EVIL, "a red circle"])
    wrong = verdict(detected_shape="<img src=x onerror=alert(2)>", notes=("<b>ambiguous</b>",))
    manifest = {"checkpoint": "<b>ckpt</b>", "num_steps": 1}
    page = write_report(tmp_path / "out", records, {"fvd": 12.5}, manifest, verdicts=[wrong, None],
                        groups=["<i>g</i>", "seen"], title="<u>t</u>").read_text(encoding="utf-8")
    assert EVIL not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<img" not in page and "&lt;img src=x onerror=alert(2)&gt;" in page
    assert "<b>ckpt</b>" not in page and "&lt;b&gt;ckpt&lt;/b&gt;" in page
    assert "<b>ambiguous</b>" not in page and "&lt;b&gt;ambiguous&lt;/b&gt;" in page
    assert "<i>g</i>" not in page and "<u>t</u>" not in page
    assert page.count("<script") == 1  # the filters; nothing from the data
    assert "http://" not in page and "https://" not in page


def test_every_video_embedded_once_in_an_autoplaying_tile(tmp_path: Path) -> None:
    records = make_records(tmp_path, ["a", "b", "c"])
    page = write_report(tmp_path / "out", records, {}, {}).read_text(encoding="utf-8")
    for record in records:
        assert page.count(base64.b64encode(record.path.read_bytes()).decode("ascii")) == 1
    tags = re.findall(r"<video[^>]*>", page)
    assert len(tags) == len(records) == page.count('src="data:video/mp4;base64,')
    for tag in tags:
        attrs = re.sub(r'src="[^"]*"', "", tag).split()
        assert "controls" not in attrs and {"autoplay", "muted", "loop", "playsinline"} <= set(attrs)
    assert "image-rendering: pixelated" in page
    # without JavaScript every tile shows and the (then useless) filter links stay hidden
    assert not re.search(r"<figure[^>]*hidden", page) and '<span id="filters" hidden>' in page


def test_mismatches_are_marked_and_correct_verdicts_are_not(tmp_path: Path) -> None:
    records = make_records(tmp_path, ["a red circle"])
    bad = write_report(tmp_path / "bad", records, {}, {}, verdicts=[verdict("square")]).read_text()
    assert 'class="tile wrong"' in bad and bad.count('<tr class="miss"') == 1
    assert re.search(r'<tr class="miss"[^>]*><td class="mark">\u2717</td><td>shape</td><td>circle</td>'
                     r'<td class="got">square</td>', bad)
    good = write_report(tmp_path / "good", records, {}, {}, verdicts=[verdict("circle")]).read_text()
    assert 'class="tile right"' in good and '<tr class="miss"' not in good
    assert good.count('<tr class="hit"') == 5 and good.count('<tr class="na"') == 1  # speed: not applicable


def test_verdict_notes_count_mismatch_and_per_prompt_clip(tmp_path: Path) -> None:
    records = make_records(tmp_path, ["a red circle"])
    v = verdict(notes=("hue between red and orange",))
    v["detected"]["num_objects"] = 2
    v["detected"]["objects"].append({"shape": "square", "color": "blue", "motion": "still", "speed": None})
    v["matches"]["count"], v["all_correct"] = False, False
    page = write_report(tmp_path / "out", records, {}, {}, verdicts=[v], groups=["heldout"],
                        per_prompt_clip={"a red circle": 27.25}).read_text()
    assert re.search(r'<tr class="miss"[^>]*>.*?<td>count</td><td>1</td><td class="got">2</td>', page)
    assert "<td>red</td><td class=\"got\">red, blue</td>" in page
    assert "<li>hue between red and orange</li>" in page
    assert "CLIP 27.2" in page and 'class="badge heldout">held-out<' in page and "seed 100" in page


def test_headline_table_holds_all_seen_and_heldout_percentages(tmp_path: Path) -> None:
    records = make_records(tmp_path, ["a"])
    metrics = {**ATTR_METRICS, "clip_score": 24.5, "fvd": 312.437}
    page = write_report(tmp_path / "out", records, metrics, {}).read_text()
    headline = page[page.index("Attribute accuracy") : page.index("</section>")]
    for label in ("all videos", "seen combinations", "held-out combinations", "all correct", "colour"):
        assert label in headline
    cell = r"</td><td[^>]*>"
    assert re.search(rf"<td>colour{cell}87\.5%{cell}75\.0%{cell}62\.5%</td>", headline)
    assert re.search(rf"<td>all correct{cell}25\.0%{cell}12\.5%{cell}0\.0%</td>", headline)
    assert "<td>background</td>" in headline and "<td>count</td>" not in headline  # missing keys not shown
    assert "<td>CLIP score</td><td>24.5000</td>" in page and "<td>FVD</td><td>312.44</td>" in page
    only_all = write_report(tmp_path / "all", records, {"attr/color": 0.5}, {}).read_text()
    assert "50.0%" in only_all and "all videos" in only_all
    assert "held-out combinations" not in only_all and "seen combinations" not in only_all


def test_protocol_folded_in_details_with_summary_line(tmp_path: Path) -> None:
    records = make_records(tmp_path, ["a", "b"])
    manifest = {"checkpoint": "/ckpt/last.ckpt", "global_step": 1200, "sampler": "euler", "num_steps": 50,
                "guidance_scale": 5.0, "num_videos": 2, "config": {"depth": 2}}
    page = write_report(tmp_path / "out", records, {}, manifest).read_text()
    details = re.search(r"<details>.*</details>", page, re.DOTALL).group(0)
    assert "&quot;global_step&quot;: 1200" in details
    assert '\n  &quot;config&quot;: {\n    &quot;depth' in details  # pretty-printed
    summary = page[page.index('<p class="summary">') : page.index("</p>", page.index('<p class="summary">'))]
    for text in ("/ckpt/last.ckpt", "<b>1200</b>", "<b>euler</b>", "<b>50</b>", "<b>5.0</b>", "<b>2</b>"):
        assert text in summary
    assert page.index("<main") < page.index("<details>")


def test_report_without_verdicts_groups_or_attribute_metrics(tmp_path: Path) -> None:
    records = make_records(tmp_path, ["a calm lake", "a red ball"])
    page = write_report(tmp_path / "out", records, {"clip_score": 25.0, "fvd": 1.5}, {}).read_text()
    assert "Attribute accuracy" not in page and "<td>CLIP score</td>" in page
    assert page.count("not scored") == 2 and page.count('data-verdict="none"') == 2
    assert 'data-filter="all"' in page
    assert not any(f'data-filter="{f}"' in page for f in ("mismatches", "heldout", "seen"))
    assert "videos <b>2</b>" in page
    empty = write_report(tmp_path / "empty", [], {}, {}).read_text()
    assert "<main" in empty and "<video" not in empty


def test_misaligned_verdicts_or_groups_raise(tmp_path: Path) -> None:
    records = make_records(tmp_path, ["a", "b"])
    with pytest.raises(ValueError, match="align with records"):
        write_report(tmp_path, records, {}, {}, verdicts=[None])
    with pytest.raises(ValueError, match="align with records"):
        write_report(tmp_path, records, {}, {}, groups=["seen", "seen", "heldout"])


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


@pytest.mark.browser
@pytest.mark.skipif(_chromium() is None, reason="needs headless Chromium (Debian package: chromium)")
def test_report_renders_and_filters_in_headless_chromium(tmp_path: Path) -> None:
    records = make_records(tmp_path, [EVIL, "a blue square", "a green square"])
    path = write_report(tmp_path / "out", records, ATTR_METRICS, {"num_steps": 1},
                        verdicts=[verdict("square"), verdict(), None], groups=["heldout", "seen", "heldout"])
    flags = [_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files"]

    def dom(fragment: str) -> str:
        run = subprocess.run([*flags, "--dump-dom", path.as_uri() + fragment], capture_output=True, text=True,
                             timeout=120, check=False)
        return run.stdout

    page = dom("")
    assert page.count("<video") == 3 and "<script>alert" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'id="shown">showing 3 of 3<' in page  # the script ran: it rewrites the server-side count
    assert '<span id="filters">' in page  # and un-hid the filter links
    assert 'id="shown">showing 1 of 3<' in dom("#mismatches")
    assert 'id="shown">showing 2 of 3<' in dom("#heldout")
    shot = tmp_path / "report.png"
    subprocess.run([*flags, "--hide-scrollbars", f"--screenshot={shot}", "--window-size=1280,1600",
                    path.as_uri()], timeout=120, capture_output=True, check=False)
    assert shot.exists() and shot.stat().st_size > 1000 and _png_size(shot) == (1280, 1600)
