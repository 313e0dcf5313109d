"""Figures of a text-to-video run: a grid of sampled videos with their prompts and verdicts, and the attribute
accuracy against training steps.

    python -m vdm.eval.figures EVAL_DIR [--history RUN/attribute_scores.jsonl] [--out DIR] [--group heldout]

``EVAL_DIR`` is an ``evaluate.py`` output (``attributes.jsonl`` + ``videos/``); the history is what the
stage-2 attribute hook appends during training. Writes ``samples_<group>.png`` and ``attribute_curve.png``.
Needs matplotlib (``pip install -e ".[figures]"``).
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from vdm.eval.generation import read_frames

GROUP_NAMES = {"heldout": "held-out", "seen": "seen"}
CURVE_KEYS = (("color", "colour"), ("shape", "shape"), ("motion", "motion"), ("background", "background"),
              ("all", "all correct"))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file (blank lines skipped)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def key_frames(frames: np.ndarray) -> np.ndarray:
    """First, middle and last frame side by side, each framed by a 1-pixel gray line (so white
    backgrounds stay visible) with a 2-pixel white gap: (H + 2, 3 (W + 2) + 4, 3) uint8."""
    picks = [np.pad(f, ((1, 1), (1, 1), (0, 0)), constant_values=150) for f in
             (frames[0], frames[len(frames) // 2], frames[-1])]
    gap = np.full((picks[0].shape[0], 2, 3), 255, np.uint8)
    return np.concatenate([picks[0], gap, picks[1], gap, picks[2]], axis=1)


def mismatch_text(row: dict[str, Any]) -> str:
    """'ok' or the attributes that differ, as 'shape: star -> circle'."""
    if row.get("all_correct"):
        return "all attributes right"
    expected, detected = row.get("expected", {}), row.get("detected", {})
    wrong = [name for name, ok in row.get("matches", {}).items() if ok is False]
    parts = []
    for name in wrong:
        if name in ("background",):
            parts.append(f"{name}: {expected.get(name)} -> {detected.get(name)}")
        elif name == "count":
            parts.append(f"objects: {expected.get('num_objects')} -> {detected.get('num_objects')}")
        else:
            key = {"color": "color", "shape": "shape", "motion": "motion", "speed": "speed"}[name]
            asked = ",".join(str(o.get(key)) for o in expected.get("objects", []))
            found = [str(o.get(key)) for o in detected.get("objects", [])]
            seen = ",".join(found[:3]) + (f",+{len(found) - 3}" if len(found) > 3 else "") or "none"
            parts.append(f"{name}: {asked} -> {seen}")
    return "; ".join(parts) or "not all right"


def sample_grid(eval_dir: str | Path, out: str | Path, group: str | None = "heldout", limit: int = 12,
                columns: int = 3) -> Path:
    """A PNG of ``limit`` videos of ``group`` (None: any): first/middle/last frames, prompt and verdict."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eval_dir = Path(eval_dir)
    rows = [r for r in read_jsonl(eval_dir / "attributes.jsonl") if group is None or r.get("group") == group]
    rows = rows[:limit]
    if not rows:
        raise ValueError(f"{eval_dir}/attributes.jsonl holds no scored videos of group {group!r}")
    lines = (len(rows) + columns - 1) // columns
    fig, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 2.55 * lines), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows):
        ax.imshow(key_frames(read_frames(eval_dir / "videos" / row["video"])), interpolation="nearest")
        verdict = mismatch_text(row)
        ax.set_title("\n".join(textwrap.wrap(row["prompt"], 46)), fontsize=8, loc="left")
        ax.text(0.0, -0.06, "\n".join(textwrap.wrap(verdict, 52)), transform=ax.transAxes, fontsize=7,
                va="top", color="#1a7f37" if row.get("all_correct") else "#cf222e")
    which = f" ({GROUP_NAMES.get(group, group)} prompts)" if group else ""
    fig.suptitle("first / middle / last frame of each video" + which, fontsize=9, x=0.01, ha="left")
    return _save(fig, out)


def accuracy_curve(history: str | Path, out: str | Path, group: str | None = "heldout") -> Path:
    """A PNG of attribute accuracy (``val/attr_<group>_<name>``) against training steps, with the training
    minutes on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_step = {row["step"]: row for row in read_jsonl(history)}  # a resumed run re-logs: the last one wins
    steps = sorted(by_step)
    if not steps:
        raise ValueError(f"{history} holds no evaluations")
    prefix = f"val/attr_{group}_" if group else "val/attr_"
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for key, label in CURVE_KEYS:
        values = [by_step[s].get(prefix + key) for s in steps]
        if any(v is not None for v in values):
            ax.plot(steps, [np.nan if v is None else v for v in values], marker="o", ms=3, label=label,
                    lw=2.2 if key == "all" else 1.4)
    ax.set_xlabel("training step")
    ax.set_ylabel("accuracy" + (f" ({GROUP_NAMES.get(group, group)} prompts)" if group else ""), fontsize=9)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    minutes = [by_step[s].get("train_seconds", 0.0) / 60 for s in steps]
    if steps[-1] > 0 and minutes[-1] > 0:
        per_step = minutes[-1] / steps[-1]
        top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda m: m / per_step))
        top.set_xlabel("training minutes (stage 2)")
    return _save(fig, out)


def _save(fig: Any, out: str | Path) -> Path:
    """Lay out, write as PNG (110 dpi) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(prog="python -m vdm.eval.figures", description=__doc__.split("\n\n")[0])
    p.add_argument("eval_dir", type=Path, help="an evaluate.py output directory")
    p.add_argument("--history", type=Path, default=None, help="stage 2's attribute_scores.jsonl")
    p.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: EVAL_DIR)")
    p.add_argument("--group", default="heldout", help="prompt group to show (empty: all)")
    p.add_argument("--limit", type=int, default=12)
    args = p.parse_args(argv)
    out = args.out or args.eval_dir
    group = args.group or None
    print(sample_grid(args.eval_dir, out / f"samples_{group or 'all'}.png", group, args.limit))
    if args.history is not None:
        print(accuracy_curve(args.history, out / "attribute_curve.png", group))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
