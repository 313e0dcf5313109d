"""Evaluation prompts: text or JSON-lines files, with optional seeds, scene attributes and groups.

A ``.jsonl`` row may carry ``attributes`` (what the scene should show, in the synthetic corpus's layout;
scored by ``vdm.metrics.attributes``) and ``group`` (e.g. ``seen`` or ``heldout`` attribute combinations),
so scores can be split by group. Every video has a deterministic seed (``video_seed``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: prime stride between the seeds of one prompt's samples, so they never collide with base_seed + idx
SAMPLE_SEED_STRIDE = 1_000_003
PROMPT_FIELDS = ("prompt", "caption", "text")


@dataclass(frozen=True)
class PromptSpec:
    """One evaluation prompt; ``seed`` overrides ``base_seed + prompt_idx`` when given; ``attributes`` and
    ``group`` (jsonl only) say what it asks for and which split of the scores it belongs to."""

    prompt: str
    seed: int | None = None
    attributes: dict[str, Any] | None = field(default=None, compare=False)
    group: str | None = None


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
    attributes, group = row.get("attributes"), row.get("group")
    if attributes is not None and not isinstance(attributes, dict):
        kind = type(attributes).__name__
        raise ValueError(f"{path}:{lineno}: attributes must be a JSON object, got {kind}")
    if group is not None and not isinstance(group, str):
        raise ValueError(f"{path}:{lineno}: group must be a string, got {group!r}")
    return PromptSpec(row[field].strip(), seed, attributes, group)


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


def video_seed(spec: PromptSpec, prompt_idx: int, sample_idx: int, base_seed: int) -> int:
    """``(spec.seed if given else base_seed + prompt_idx) + sample_idx * 1_000_003``."""
    start = spec.seed if spec.seed is not None else base_seed + prompt_idx
    return start + sample_idx * SAMPLE_SEED_STRIDE


def select_prompts(
    prompts: list[str] | None,
    prompts_file: str | None,
    num_prompts: int | None,
    owner: str = "DiffusionSamples",
) -> list[str]:
    """The first ``num_prompts`` (None: all) of ``prompts``, else of ``prompts_file`` (txt or jsonl)."""
    if prompts:
        return list(prompts)[:num_prompts]
    if not prompts_file:
        raise ValueError(f"{owner}: give `prompts` or `prompts_file`")
    return [spec.prompt for spec in read_prompts(prompts_file)][:num_prompts]
