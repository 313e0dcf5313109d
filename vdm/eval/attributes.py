"""Attribute scores of generated videos: what the weight-free evaluator detects against what each prompt asks.

Prompts carry their scene attributes (``prompts_eval.jsonl`` of the synthetic corpus) or, for plain text
prompts, the attributes are parsed from the caption with the corpus grammar; prompts outside the grammar are
not scored. Scores are split by prompt group (``attr_seen/*``, ``attr_heldout/*``) next to the overall
``attr/*`` (see ``vdm.metrics.attributes.summarize``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vdm.eval.prompts import PromptSpec
from vdm.metrics.attributes import ATTRIBUTE_EVALUATOR_VERSION, VideoVerdict, evaluate_video, summarize
from vdm.synthetic.scenes import parse_caption

log = logging.getLogger(__name__)

#: the attributes a verdict's ``matches`` holds, in the order of the logged scores ("all" follows them)
ATTRIBUTES = ("background", "count", "color", "shape", "motion", "speed")


def expected_attributes(spec: PromptSpec) -> dict[str, Any] | None:
    """The scene a prompt asks for: its stored attributes, else its caption parsed with the corpus grammar
    (None when the prompt does not follow it)."""
    if spec.attributes is not None:
        return spec.attributes
    try:
        return parse_caption(spec.prompt)
    except ValueError:
        return None


def score_videos(
    frames: Sequence[np.ndarray], specs: Sequence[PromptSpec]
) -> tuple[dict[str, float], list[dict[str, Any] | None]]:
    """Score videos ((T, H, W, 3) uint8 each) against their prompts (aligned lists).

    Returns ``(metrics, verdicts)``: ``attr/*`` over every scored video plus ``attr_<group>/*`` per prompt
    group, and each video's verdict as a dict (None where its prompt has no attributes).
    """
    verdicts: list[VideoVerdict | None] = []
    for video, spec in zip(frames, specs, strict=True):
        expected = expected_attributes(spec)
        verdicts.append(None if expected is None else evaluate_video(video, expected))
    scored = [v for v in verdicts if v is not None]
    if not scored:
        return {}, [None] * len(verdicts)
    metrics = _finite(summarize(scored))
    for group in sorted({s.group for s in specs if s.group}):
        members = [v for v, s in zip(verdicts, specs) if v is not None and s.group == group]
        if members:
            scores = _finite(summarize(members))
            metrics.update({k.replace("attr/", f"attr_{group}/", 1): x for k, x in scores.items()})
    return metrics, [None if v is None else v.to_dict() for v in verdicts]


def write_verdicts(path: str | Path, videos: Sequence[Any], specs: Sequence[PromptSpec],
                   verdicts: Sequence[dict[str, Any] | None]) -> Path:
    """One JSON line per scored video: its file, prompt, group, seed and verdict (``attributes.jsonl``)."""
    path = Path(path)
    lines = []
    for video, spec, verdict in zip(videos, specs, verdicts, strict=True):
        if verdict is not None:
            row = {"video": Path(video.path).name, "prompt": spec.prompt, "group": spec.group,
                   "seed": video.seed, **verdict}
            lines.append(json.dumps(row, sort_keys=True) + "\n")
    path.write_text("".join(lines), encoding="utf-8")
    return path


def _finite(scores: dict[str, float]) -> dict[str, float]:
    """Drop rates with nothing to count (NaN, e.g. speed when no prompt asks for a direction)."""
    return {k: v for k, v in scores.items() if v == v}


def attribute_protocol() -> dict[str, Any]:
    """What the protocol manifest records about the attribute scores."""
    return {"evaluator": "vdm.metrics.attributes", "version": ATTRIBUTE_EVALUATOR_VERSION}


class AttributeCounts:
    """Correct / scored counts per attribute, overall and per prompt group, as one float64 tensor that ranks
    can sum; ``metrics`` turns the (summed) counts into ``val/attr_<name>`` and
    ``val/attr_<group>_<name>``."""

    def __init__(self, groups: Sequence[str]) -> None:
        self.scopes = ["", *groups]
        self.counts = np.zeros((len(self.scopes), len(ATTRIBUTES) + 1, 2))

    def add(self, verdict: dict[str, Any] | None, group: str | None) -> None:
        """Count one video's verdict (None: not scored) under "all" and under its group."""
        if verdict is None:
            return
        rows = [0] + ([self.scopes.index(group)] if group in self.scopes[1:] else [])
        outcomes = [verdict["matches"].get(name) for name in ATTRIBUTES] + [verdict["all_correct"]]
        for row in rows:
            for col, outcome in enumerate(outcomes):
                if outcome is not None:
                    self.counts[row, col] += (float(bool(outcome)), 1.0)

    def tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(scopes, attributes + 1, 2) float64 counts, to be summed over ranks."""
        return torch.tensor(self.counts, dtype=torch.float64, device=device)

    def metrics(self, totals: torch.Tensor, prefix: str = "val/attr_") -> dict[str, float]:
        """Accuracy per attribute and scope from (summed) counts; attributes never scored are left out."""
        totals = totals.detach().cpu().double()
        out: dict[str, float] = {}
        for row, scope in enumerate(self.scopes):
            for col, name in enumerate((*ATTRIBUTES, "all")):
                correct, total = totals[row, col].tolist()
                if total > 0:
                    out[f"{prefix}{scope + '_' if scope else ''}{name}"] = correct / total
        return out
