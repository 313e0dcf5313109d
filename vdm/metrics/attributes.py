"""Attribute evaluator: does a video show what its synthetic-corpus caption says?

    python -m vdm.metrics.attributes PATH [--split val] [--limit N] [--json OUT]

Weight-free: background, object count, colour, shape, motion and speed class are read off the
pixels by plain image analysis (``attribute_detect``) and compared with the expected attributes
(``Scene.attributes()`` or ``parse_caption(caption)``). Ambiguous cases (touching or merged objects,
objects partly outside the frame, no foreground, off-palette colours, poor template fits) are listed
in each verdict's ``notes``; an attribute they leave undetermined is None and does not match, never
a guess.

PATH is a synthetic corpus folder (``manifest.json`` plus ``<split>-*.tar`` WebDataset shards; the
expected attributes are each sample's json "extra", else its parsed caption) or a folder of mp4
files with a ``<name>.txt`` caption or a ``<name>.json`` ({"attributes": ...} or {"caption": ...})
beside each.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import logging
import math
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vdm.metrics.attribute_detect import ObjectMeasurement, measure
from vdm.synthetic.scenes import COLORS, DIRECTIONS, SPEEDS, parse_caption

log = logging.getLogger(__name__)

ATTRIBUTE_EVALUATOR_VERSION = 1  # bump whenever a change can move scores (reports record it)
ATTRIBUTES: tuple[str, ...] = ("background", "count", "color", "shape", "motion", "speed")
_OBJECT_ATTRS: tuple[str, ...] = ("color", "shape", "motion", "speed")
MIN_IOU = 0.7  # below this mean soft IoU the best shape template is not trusted
MIN_IOU_TOUCHING = 0.85  # the same when every view of the object touches another object (occlusion)
MAX_COLOR_DISTANCE = 100.0  # RGB distance beyond which a colour is off the palette
MOVE_THRESHOLD = 0.08  # displacement / frame side below which an object stands still
SIZE_RATIO = 2.0  # last / first area beyond which an object grows (or below 1 / SIZE_RATIO shrinks)
SPEED_THRESHOLD = math.sqrt(SPEEDS["slowly"] * SPEEDS["quickly"])  # ~0.3 of the side: slowly | quickly
_PALETTE = np.array(list(COLORS.values()), np.float32)


# attribute names from measurements


def nearest_color(rgb: np.ndarray) -> tuple[str | None, str]:
    """Nearest palette colour of an RGB triple, or (None, reason) when it is far or ambiguous."""
    d = np.linalg.norm(_PALETTE - rgb, axis=1)
    first, second = np.argsort(d)[:2]
    names, shown = list(COLORS), np.round(rgb).astype(int).tolist()
    if d[first] > MAX_COLOR_DISTANCE:
        return None, f"colour {shown} is far from every palette colour"
    if d[first] > 0.7 * d[second]:
        return None, f"colour {shown} is between {names[first]} and {names[second]}"
    return names[first], ""


def classify_shape(obj: ObjectMeasurement) -> tuple[str | None, str]:
    """Best-fitting shape template, or (None, reason) when no view or no template is good enough."""
    if not obj.shape_scores:
        return None, "no frame shows its whole silhouette"
    best = max(obj.shape_scores, key=obj.shape_scores.__getitem__)
    needed = MIN_IOU_TOUCHING if obj.touching_views else MIN_IOU
    if obj.shape_scores[best] < needed:
        score = obj.shape_scores[best]
        return None, f"no shape template fits well enough (best {best}, IoU {score:.2f} < {needed})"
    return best, ""


def classify_motion(obj: ObjectMeasurement) -> tuple[str | None, str | None, str]:
    """(motion, speed class or None, note) from the fitted displacement and area ratio.

    A size change by SIZE_RATIO wins over movement (growing objects stay in place); the direction
    is the dominant axis in image coordinates (y down: "up" is decreasing y).
    """
    if obj.displacement is None or obj.area_ratio is None:
        return None, None, "seen in too few frames to judge its motion"
    (dx, dy), ratio = obj.displacement, obj.area_ratio
    moved = max(abs(dx), abs(dy))
    if ratio >= SIZE_RATIO or ratio <= 1.0 / SIZE_RATIO:
        both = moved >= MOVE_THRESHOLD
        note = f"both moves ({dx:+.2f}, {dy:+.2f}) and changes size (x{ratio:.2f})" if both else ""
        return ("growing" if ratio > 1 else "shrinking"), None, note
    if moved < MOVE_THRESHOLD:
        return "still", None, ""
    note = f"moves diagonally ({dx:+.2f}, {dy:+.2f})" if min(abs(dx), abs(dy)) > 0.5 * moved else ""
    motion = ("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up")
    return motion, ("quickly" if moved > SPEED_THRESHOLD else "slowly"), note


def _evidence(obj: ObjectMeasurement) -> dict[str, Any]:
    """JSON-safe summary of an object's measurements, kept in the detected attributes."""
    rows = [[round(float(v), 2) for v in row] for row in obj.track]
    return {"rgb": [round(float(v), 1) for v in obj.rgb],
            "iou": round(max(obj.shape_scores.values()), 4) if obj.shape_scores else None,
            "shape_scores": {k: round(v, 4) for k, v in obj.shape_scores.items()},
            "displacement": obj.displacement and [round(v, 4) for v in obj.displacement],
            "area_ratio": None if obj.area_ratio is None else round(obj.area_ratio, 4),
            "area": [rows[0][3], rows[-1][3]], "track": rows}


def detect_attributes(frames: np.ndarray) -> tuple[dict[str, Any], list[str]]:
    """Detected attributes of (T, H, W, 3) uint8 frames, and notes on anything ambiguous.

    Returns ({"background", "num_objects", "objects": [{"color", "shape", "motion", "speed",
    plus evidence: "rgb", "iou", "shape_scores", "displacement", "area_ratio", "area", "track"}]},
    notes); an attribute that cannot be determined is None and the reason is in the notes.
    """
    frames = np.asarray(frames)
    result = measure(frames)
    notes, objects = list(result.notes), []
    for i, obj in enumerate(result.objects):
        color, why_color = nearest_color(obj.rgb)
        shape, why_shape = classify_shape(obj)
        motion, speed, why_motion = classify_motion(obj)
        of = f"of {len(frames)} frames"
        reasons = [why_color, why_shape, why_motion,
                   f"partly outside the frame in {obj.cut.sum()} {of}" if obj.cut.any() else "",
                   f"touches another object in {obj.touching.sum()} {of}" if obj.touching.any() else ""]
        notes += [f"object {i + 1} ({color or 'unknown colour'}): {r}" for r in reasons if r]
        objects.append({"color": color, "shape": shape, "motion": motion, "speed": speed, **_evidence(obj)})
    return {"background": result.background, "num_objects": len(objects), "objects": objects}, notes


# verdicts


@dataclass
class VideoVerdict:
    """Expected vs detected attributes of one video.

    ``matches``: background, count, color, shape, motion (bool; per-object attributes must hold for
    every expected object) and speed (bool, or None when no expected object moves in a direction).
    ``assignment``: for each expected object, the index of its detected object (None: unmatched).
    """

    expected: dict[str, Any]
    detected: dict[str, Any]
    matches: dict[str, bool | None]
    all_correct: bool
    notes: list[str] = field(default_factory=list)
    assignment: list[int | None] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of every field."""
        return {"expected": self.expected, "detected": self.detected, "matches": dict(self.matches),
                "all_correct": self.all_correct, "notes": list(self.notes),
                "assignment": list(self.assignment)}


def _expected_objects(expected: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: obj.get(k) for k in _OBJECT_ATTRS} for obj in expected.get("objects", [])]


def _agreement(exp: dict[str, Any], det: dict[str, Any] | None) -> tuple[int, int]:
    """(colour agrees, number of other attributes that agree); colour decides first."""
    if det is None:
        return 0, 0
    others = sum(exp[k] == det[k] for k in ("shape", "motion", "speed"))
    return int(exp["color"] == det["color"]), others


def assign_objects(expected: Sequence[dict[str, Any]],
                   detected: Sequence[dict[str, Any]]) -> list[int | None]:
    """Injective map expected -> detected index (None: unmatched) maximising agreement, colour first."""
    slots: list[int | None] = [*range(len(detected)), *([None] * len(expected))]
    best: tuple[Any, ...] = ()
    best_key = (-1, -1, -1)
    for choice in itertools.permutations(slots, len(expected)):
        scores = [_agreement(e, None if j is None else detected[j]) for e, j in zip(expected, choice)]
        key = (sum(s[0] for s in scores), sum(s[1] for s in scores), sum(j is not None for j in choice))
        if key > best_key:
            best, best_key = choice, key
    return list(best)


def judge(expected: dict[str, Any], detected: dict[str, Any], notes: Sequence[str] = ()) -> VideoVerdict:
    """Compare detected attributes (as from ``detect_attributes``) with the expected ones."""
    exp_objs, det_objs = _expected_objects(expected), detected["objects"]
    notes = list(notes)
    n_expected = int(expected.get("num_objects", len(exp_objs)))
    assignment = assign_objects(exp_objs, det_objs)
    pairs = [(e, None if j is None else det_objs[j]) for e, j in zip(exp_objs, assignment)]
    background = detected["background"]
    matches: dict[str, bool | None] = {
        "background": background is not None and background == expected.get("background"),
        "count": len(det_objs) == n_expected,
    }
    for attr in ("color", "shape", "motion"):
        matches[attr] = bool(pairs) and all(d is not None and d[attr] == e[attr] for e, d in pairs)
    directional = [(e, d) for e, d in pairs if e["motion"] in DIRECTIONS]
    matches["speed"] = (all(d is not None and d["speed"] == e["speed"] for e, d in directional)
                        if directional else None)
    if not matches["count"]:
        notes.append(f"detected {len(det_objs)} objects, expected {n_expected}")
    all_correct = all(matches[k] for k in ATTRIBUTES if k != "speed") and matches["speed"] is not False
    return VideoVerdict(expected, detected, matches, bool(all_correct), notes, assignment)


def evaluate_video(frames: np.ndarray, expected: dict[str, Any]) -> VideoVerdict:
    """Verdict for (T, H, W, 3) uint8 frames (T >= 2, H, W >= 16) against expected attributes.

    ``expected``: {"background", "num_objects", "objects": [{"shape", "color", "motion", "speed"}]}
    as written by ``Scene.attributes()`` or returned by ``parse_caption`` (extra keys are ignored).
    """
    return judge(expected, *detect_attributes(frames))


def summarize(verdicts: Sequence[VideoVerdict]) -> dict[str, float]:
    """``attr/<name>`` match rates, ``attr/all`` (all-correct rate) and ``attr/num_videos``.

    ``attr/speed`` is over the videos with a directionally moving expected object; a rate with no
    video to count is NaN.
    """
    summary: dict[str, float] = {}
    for attr in ATTRIBUTES:
        values = [v.matches[attr] for v in verdicts if v.matches.get(attr) is not None]
        summary[f"attr/{attr}"] = float(np.mean(values)) if values else math.nan
    summary["attr/all"] = float(np.mean([v.all_correct for v in verdicts])) if verdicts else math.nan
    summary["attr/num_videos"] = float(len(verdicts))
    return summary


def confusion(verdicts: Iterable[VideoVerdict]) -> dict[str, dict[str, dict[str, int]]]:
    """Per attribute: counts[expected label][detected label] ("none": not detected / unmatched).

    Object attributes count each expected object against its assigned detected object; speed counts
    only expected objects that move in a direction.
    """
    table: dict[str, dict[str, dict[str, int]]] = {attr: {} for attr in ATTRIBUTES}

    def add(attr: str, exp: Any, det: Any) -> None:
        row = table[attr].setdefault(str(exp), {})
        label = "none" if det is None else str(det)
        row[label] = row.get(label, 0) + 1

    for v in verdicts:
        add("background", v.expected.get("background"), v.detected["background"])
        n_expected = v.expected.get("num_objects", len(v.expected.get("objects", [])))
        add("count", n_expected, v.detected["num_objects"])
        for exp, j in zip(_expected_objects(v.expected), v.assignment):
            det = None if j is None else v.detected["objects"][j]
            for attr in _OBJECT_ATTRS:
                if attr != "speed" or exp["motion"] in DIRECTIONS:
                    add(attr, exp[attr], None if det is None else det[attr])
    return table


def format_confusion(table: dict[str, dict[str, dict[str, int]]]) -> str:
    """Plain-text tables, one per attribute: rows expected, columns detected."""
    blocks = []
    for attr, rows in table.items():
        if not rows:
            continue
        cols = sorted({c for row in rows.values() for c in row}, key=lambda c: (c == "none", c))
        names = sorted(rows)
        width = max(len(s) for s in [*cols, *names, "expected"]) + 2
        lines = [f"{attr} (rows: expected, columns: detected)",
                 "expected".ljust(width) + "".join(c.rjust(width) for c in cols)]
        for name in names:
            lines.append(name.ljust(width) + "".join(str(rows[name].get(c, 0)).rjust(width) for c in cols))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


# reading videos


def decode_mp4(data: bytes | str | Path) -> np.ndarray:
    """Every frame of an mp4 (bytes or path) as (T, H, W, 3) uint8 RGB, decoded with PyAV."""
    import av

    source = io.BytesIO(data) if isinstance(data, bytes) else str(data)
    with av.open(source) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError("no video frames")
    return np.stack(frames)


def _expected_from(meta: dict[str, Any] | None, caption: str | None) -> dict[str, Any]:
    for key in ("extra", "attributes"):
        if meta and isinstance(meta.get(key), dict) and meta[key].get("objects") is not None:
            return meta[key]
    text = caption if caption is not None else (meta or {}).get("caption")
    if text is None:
        raise ValueError("no attributes and no caption")
    return parse_caption(text)


def iter_corpus(root: Path, split: str) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """(name, mp4 bytes, expected attributes) of every sample in ``root``'s ``<split>-*.tar`` shards."""
    shards = sorted(root.glob(f"{split}-*.tar"))
    if not shards:
        raise FileNotFoundError(f"{root}: no {split}-*.tar shards")
    for shard in shards:
        with tarfile.open(shard) as tar:
            samples: dict[str, dict[str, bytes]] = {}
            for member in tar:
                if member.isfile():
                    key, _, ext = member.name.partition(".")
                    data = tar.extractfile(member)
                    if data is not None:
                        samples.setdefault(key, {})[ext] = data.read()
        for key, parts in samples.items():
            if "mp4" not in parts:
                continue
            meta = json.loads(parts["json"]) if "json" in parts else None
            caption = parts["txt"].decode("utf-8") if "txt" in parts else None
            yield f"{shard.name}/{key}", parts["mp4"], _expected_from(meta, caption)


def iter_folder(root: Path) -> Iterator[tuple[str, Path, dict[str, Any]]]:
    """(name, mp4 path, expected attributes) of the mp4 files under ``root`` that have a sidecar."""
    for path in sorted(root.rglob("*.mp4")):
        meta_path, text_path = path.with_suffix(".json"), path.with_suffix(".txt")
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else None
        caption = text_path.read_text(encoding="utf-8") if text_path.is_file() else None
        if meta is None and caption is None:
            log.warning("%s: no .txt or .json sidecar, skipped", path)
            continue
        yield str(path.relative_to(root)), path, _expected_from(meta, caption)


def evaluate_path(path: str | Path, split: str = "val",
                  limit: int | None = None) -> tuple[list[str], list[VideoVerdict]]:
    """Names and verdicts of the videos of a corpus folder (``split``) or a folder of mp4 files."""
    root = Path(path)
    source: Iterable[tuple[str, Any, dict[str, Any]]]
    source = iter_corpus(root, split) if (root / "manifest.json").is_file() else iter_folder(root)
    names, verdicts = [], []
    for name, media, expected in itertools.islice(source, limit):
        names.append(name)
        verdicts.append(evaluate_video(decode_mp4(media), expected))
    return names, verdicts


def main(argv: list[str] | None = None) -> int:
    """CLI: print per-attribute accuracy, the all-correct rate and confusion tables."""
    p = argparse.ArgumentParser(prog="python -m vdm.metrics.attributes",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("path", type=Path, help="corpus folder (manifest.json) or folder of mp4 files")
    p.add_argument("--split", default="val", help="corpus split to read")
    p.add_argument("--limit", type=int, default=None, help="score at most this many videos")
    p.add_argument("--json", type=Path, default=None, help="write summary and per-video verdicts here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    names, verdicts = evaluate_path(args.path, args.split, args.limit)
    summary, table = summarize(verdicts), confusion(verdicts)
    print(f"{len(verdicts)} videos from {args.path} (attribute evaluator v{ATTRIBUTE_EVALUATOR_VERSION})")
    for key, value in summary.items():
        if key != "attr/num_videos":
            print(f"  {key:<16} {value:.4f}")
    failed = [(n, v) for n, v in zip(names, verdicts) if not v.all_correct]
    for name, v in failed[:10]:
        wrong = ", ".join(k for k, ok in v.matches.items() if ok is False)
        print(f"  failed {name}: {wrong}; {'; '.join(v.notes)}")
    print()
    print(format_confusion(table))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"version": ATTRIBUTE_EVALUATOR_VERSION,
                   "summary": {k: None if math.isnan(v) else v for k, v in summary.items()},
                   "confusion": table,
                   "videos": [{"name": n, **v.to_dict()} for n, v in zip(names, verdicts)]}
        args.json.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
