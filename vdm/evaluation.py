"""Text-to-video evaluation: prompt lists, resumable generation to mp4, metrics.json and an offline report.

No Hydra and no Trainer: ``evaluate.py`` composes these. Generation is resumable because every video has
a deterministic seed and a fixed file name; a file that exists is kept and scored as it is.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av  # noqa: F401  (PyAV must be imported before any decord import)
import numpy as np
import torch
from tqdm.auto import tqdm

from vdm.data.encode import EncodeOptions, encode_frames

log = logging.getLogger(__name__)

#: prime stride between the seeds of one prompt's samples, so they never collide with base_seed + idx
SAMPLE_SEED_STRIDE = 1_000_003
#: the callbacks' encoder settings: same files as the training-time samples
ENCODE_OPTIONS = EncodeOptions(keyframe_interval=8, crf=18)
PROMPT_FIELDS = ("prompt", "caption", "text")


@dataclass(frozen=True)
class PromptSpec:
    """One evaluation prompt; ``seed`` overrides ``base_seed + prompt_idx`` when given."""

    prompt: str
    seed: int | None = None


@dataclass(frozen=True)
class GeneratedVideo:
    """One generated (or kept) video file and the seed that made it."""

    path: Path
    prompt: str
    prompt_idx: int
    sample_idx: int
    seed: int


# prompts


def _jsonl_prompt(path: Path, lineno: int, line: str) -> PromptSpec:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{lineno}: invalid JSON ({err.msg})") from err
    if not isinstance(row, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
    field = next((f for f in PROMPT_FIELDS if f in row), None)
    if field is None or not isinstance(row[field], str) or not row[field].strip():
        raise ValueError(f"{path}:{lineno}: no non-empty prompt field (one of {', '.join(PROMPT_FIELDS)})")
    seed = row.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"{path}:{lineno}: seed must be an integer, got {seed!r}")
    return PromptSpec(row[field].strip(), seed)


def read_prompts(path: str | Path) -> list[PromptSpec]:
    """Prompts from ``.txt`` (one per line) or ``.jsonl`` (``prompt``, ``caption`` or ``text``; ``seed``).

    Blank lines are skipped in both formats. Errors name the file and the 1-based line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} not found")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise ValueError(f"prompts file {path}: expected .txt or .jsonl, got {suffix or 'no suffix'}")
    specs = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        specs.append(_jsonl_prompt(path, lineno, line) if suffix == ".jsonl" else PromptSpec(line.strip()))
    if not specs:
        raise ValueError(f"prompts file {path} holds no prompts")
    return specs


# generation


def video_seed(spec: PromptSpec, prompt_idx: int, sample_idx: int, base_seed: int) -> int:
    """``(spec.seed if given else base_seed + prompt_idx) + sample_idx * 1_000_003``."""
    start = spec.seed if spec.seed is not None else base_seed + prompt_idx
    return start + sample_idx * SAMPLE_SEED_STRIDE


def video_path(out_dir: str | Path, prompt_idx: int, sample_idx: int) -> Path:
    """``out_dir/videos/p{prompt_idx:04d}_s{sample_idx:02d}.mp4``."""
    return Path(out_dir) / "videos" / f"p{prompt_idx:04d}_s{sample_idx:02d}.mp4"


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(C, T, H, W) in [-1, 1] -> (T, H, W, C) uint8."""
    frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


def _write_atomic(path: Path, data: bytes) -> None:
    # a crash mid-write must not leave a truncated mp4 that a resumed run would keep
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@torch.no_grad()
def generate_videos(
    module: Any,
    prompts: Sequence[PromptSpec | str],
    out_dir: str | Path,
    *,
    videos_per_prompt: int,
    batch_size: int,
    num_frames: int,
    height: int,
    width: int,
    num_steps: int,
    guidance_scale: float,
    base_seed: int,
    use_ema: bool = True,
    fps: float = 8,
) -> list[GeneratedVideo]:
    """Generate ``videos_per_prompt`` mp4s per prompt with ``module.sample``; existing files are kept.

    Returns one record per video in (prompt, sample) order, kept files included. The missing videos are
    sampled ``batch_size`` at a time with one seed per video (see :func:`video_seed`), so a video's content
    does not depend on ``batch_size`` or on which files a resumed run still needs.
    """
    if videos_per_prompt < 1 or batch_size < 1:
        raise ValueError(
            f"videos_per_prompt and batch_size must be >= 1, got {videos_per_prompt} and {batch_size}"
        )
    specs = [p if isinstance(p, PromptSpec) else PromptSpec(p) for p in prompts]
    (Path(out_dir) / "videos").mkdir(parents=True, exist_ok=True)
    records = [
        GeneratedVideo(video_path(out_dir, i, s), spec.prompt, i, s, video_seed(spec, i, s, base_seed))
        for i, spec in enumerate(specs)
        for s in range(videos_per_prompt)
    ]
    todo = [r for r in records if not r.path.is_file()]
    if len(todo) < len(records):
        log.info("keeping %d existing videos in %s", len(records) - len(todo), out_dir)
    was_training = getattr(module, "training", False)
    if todo and hasattr(module, "eval"):
        module.eval()
    try:
        with tqdm(total=len(todo), desc="generating videos", unit="video", disable=not todo) as bar:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                videos = module.sample(
                    [r.prompt for r in batch],
                    num_frames,
                    height,
                    width,
                    num_steps=num_steps,
                    guidance_scale=guidance_scale,
                    seed=[r.seed for r in batch],
                    use_ema=use_ema,
                )
                for record, video in zip(batch, videos):
                    _write_atomic(record.path, encode_frames(to_uint8_frames(video), fps, ENCODE_OPTIONS))
                bar.update(len(batch))
    finally:
        if was_training:
            module.train()
    return records


def read_video(path: str | Path) -> torch.Tensor:
    """Decode every frame of an mp4 with PyAV: (3, T, H, W) float in [-1, 1]."""
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{path}: no video frames")
    video = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2)  # (3, T, H, W) uint8
    return video.float() / 127.5 - 1


# outputs


def write_metrics(out_dir: str | Path, metrics: dict[str, Any], manifest: dict[str, Any]) -> Path:
    """``out_dir/metrics.json`` = ``{"metrics": metrics, "protocol": manifest}`` (sorted keys, indent 2)."""
    path = Path(out_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"metrics": metrics, "protocol": manifest}, sort_keys=True, indent=2) + "\n")
    return path


_CSS = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
td, th { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; }
.prompt { margin: 1.5em 0 0.5em; }
.videos { display: flex; flex-wrap: wrap; gap: 8px; }
.videos figure { margin: 0; }
video { max-width: 256px; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _format_value(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _metric_rows(metrics: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{_esc(k)}</td><td>{_esc(_format_value(v))}</td></tr>" for k, v in sorted(metrics.items())
    )
    return f"<table><tr><th>metric</th><th>value</th></tr>{rows}</table>"


def _video_tag(path: Path, seed: int) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><video controls loop muted autoplay playsinline src="data:video/mp4;base64,{data}"></video>'
        f"<figcaption>seed {_esc(seed)}</figcaption></figure>"
    )


def _prompt_sections(records: Sequence[GeneratedVideo], per_prompt: dict[str, float] | None) -> str:
    by_prompt: dict[int, list[GeneratedVideo]] = {}
    for record in records:
        by_prompt.setdefault(record.prompt_idx, []).append(record)
    sections = []
    for idx in sorted(by_prompt):
        group = sorted(by_prompt[idx], key=lambda r: r.sample_idx)
        prompt = group[0].prompt
        score = (per_prompt or {}).get(prompt)
        score_text = f" <span class=\"clip\">CLIP {score:.4f}</span>" if score is not None else ""
        videos = "".join(_video_tag(r.path, r.seed) for r in group)
        header = f'<div class="prompt"><b>#{idx}</b> {_esc(prompt)}{score_text}</div>'
        sections.append(f'{header}<div class="videos">{videos}</div>')
    return "\n".join(sections)


def write_report(
    out_dir: str | Path,
    records: Sequence[GeneratedVideo],
    metrics: dict[str, Any],
    per_prompt: dict[str, float] | None,
    manifest: dict[str, Any],
) -> Path:
    """A self-contained ``out_dir/report.html``: metrics, the protocol manifest, and the videos per prompt.

    Videos are embedded as base64 ``data:video/mp4`` sources, so the file works offline and alone.
    ``per_prompt`` maps prompt text to its CLIP score. Every prompt and manifest value is HTML-escaped.
    """
    manifest_json = json.dumps(manifest, sort_keys=True, indent=2, default=str)
    body = "\n".join(
        [
            "<h1>Video generation evaluation</h1>",
            "<h2>Metrics</h2>",
            _metric_rows(metrics),
            "<h2>Protocol</h2>",
            f"<pre>{_esc(manifest_json)}</pre>",
            f"<h2>Samples ({len(records)} videos)</h2>",
            _prompt_sections(records, per_prompt),
        ]
    )
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>vdm evaluation</title><style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )
    path = Path(out_dir) / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
