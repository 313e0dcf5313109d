"""Procedural scenes for the synthetic corpus: attributes, captions, held-out pairs, rendering.

A scene is one or two coloured shapes on a named background; each shape moves left/right/up/down
(slowly or quickly), stands still, grows or shrinks. Captions say exactly that, e.g.
"a red circle moving left quickly on a gray background". Some (shape, color) and (color, motion)
pairs never occur in training scenes; prompts made of them test compositional generalisation.
Rendering is anti-aliased via signed distance fields (coverage = clip(0.5 - sdf, 0, 1)).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 190, 50), "blue": (40, 80, 235), "yellow": (240, 220, 30),
    "magenta": (215, 40, 215), "cyan": (30, 210, 220), "white": (250, 250, 250), "orange": (250, 140, 20),
}
BACKGROUNDS: tuple[str, ...] = ("black", "white", "gray", "gradient")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
MOTIONS: tuple[str, ...] = (*DIRECTIONS, "still", "growing", "shrinking")
_MOTION_WEIGHTS = np.array([0.18, 0.18, 0.18, 0.18, 0.10, 0.09, 0.09])
SPEEDS: dict[str, float] = {"slowly": 0.2, "quickly": 0.45}  # displacement over the clip / frame side
HELDOUT_SHAPE_COLOR: tuple[tuple[str, str], ...] = (
    ("circle", "green"), ("square", "magenta"), ("triangle", "orange"), ("diamond", "cyan"), ("star", "red"),
)
HELDOUT_COLOR_MOTION: tuple[tuple[str, str], ...] = (
    ("blue", "left"), ("yellow", "up"), ("white", "right"), ("green", "down"),
)
# axis-aligned half extent of each shape in units of its size parameter r (for keeping it in frame)
_EXTENT = {"circle": 1.0, "square": 0.85, "triangle": 1.25, "diamond": 1.2, "star": 1.35}
_MARGIN = 1.0  # pixels between a shape's extent and the frame border


@dataclass(frozen=True)
class SceneObject:
    """One shape; positions are pixel centres (x, y) at the first and last frame, radii in pixels."""

    shape: str
    color: str
    motion: str
    speed: str | None
    start: tuple[float, float]
    end: tuple[float, float]
    radius: tuple[float, float]

    def phrase(self) -> str:
        return object_phrase(self.shape, self.color, self.motion, self.speed)

    def attributes(self) -> dict[str, Any]:
        return {"shape": self.shape, "color": self.color, "motion": self.motion, "speed": self.speed,
                "start": [round(v, 3) for v in self.start], "end": [round(v, 3) for v in self.end],
                "radius": [round(v, 3) for v in self.radius]}


@dataclass(frozen=True)
class Scene:
    """A background name and one or two objects."""

    background: str
    objects: tuple[SceneObject, ...]

    def caption(self) -> str:
        return f"{' and '.join(o.phrase() for o in self.objects)} on a {self.background} background"

    def attributes(self) -> dict[str, Any]:
        return {"background": self.background, "num_objects": len(self.objects),
                "objects": [o.attributes() for o in self.objects]}


def object_phrase(shape: str, color: str, motion: str, speed: str | None) -> str:
    """"a red circle moving left quickly", "an orange star growing"."""
    article = "an" if color[0] in "aeiou" else "a"
    return f"{article} {color} {shape} {motion_phrase(motion, speed)}"


def motion_phrase(motion: str, speed: str | None) -> str:
    """"moving left quickly", "standing still", "growing", "shrinking"."""
    if motion in DIRECTIONS:
        return f"moving {motion} {speed}"
    return "standing still" if motion == "still" else motion


def _caption_pattern() -> re.Pattern[str]:
    """The caption grammar: one or two object phrases (groups 1-6, 7-12), then the background (13)."""

    def alt(words: Iterable[str]) -> str:
        return "|".join(re.escape(w) for w in words)

    obj = (rf"(an?) ({alt(COLORS)}) ({alt(SHAPES)}) "
           rf"(moving ({alt(DIRECTIONS)}) ({alt(SPEEDS)})|standing still|growing|shrinking)")
    return re.compile(rf"{obj}(?: and {obj})? on a ({alt(BACKGROUNDS)}) background")


_CAPTION_RE = _caption_pattern()


def parse_caption(caption: str) -> dict[str, Any]:
    """Invert ``Scene.caption()``: {"background", "num_objects", "objects": [{shape, color, motion, speed}]}.

    Surrounding whitespace is ignored; anything else outside the corpus grammar (unknown words, a
    wrong article, a third object) raises ValueError naming the caption.
    """
    m = _CAPTION_RE.fullmatch(caption.strip())
    if m is None:
        raise ValueError(f"caption {caption!r} does not follow the synthetic corpus grammar")
    groups = m.groups()
    objects = []
    for article, color, shape, phrase, direction, speed in (groups[0:6], groups[6:12]):
        if color is None:
            continue
        if article != ("an" if color[0] in "aeiou" else "a"):
            raise ValueError(f"caption {caption!r}: wrong article {article!r} before {color!r}")
        motion = direction or ("still" if phrase == "standing still" else phrase)
        objects.append({"shape": shape, "color": color, "motion": motion, "speed": speed})
    return {"background": groups[12], "num_objects": len(objects), "objects": objects}


def is_heldout(shape: str, color: str, motion: str) -> bool:
    """True when the object uses a held-out (shape, color) or (color, motion) pair."""
    return (shape, color) in HELDOUT_SHAPE_COLOR or (color, motion) in HELDOUT_COLOR_MOTION


def allowed(shape: str, color: str, motion: str, background: str) -> bool:
    """Training-visible object: not held out and not the same colour as the background."""
    return not is_heldout(shape, color, motion) and color != background


def place_object(rng: np.random.Generator, shape: str, color: str, motion: str, speed: str | None,
                 height: int, width: int, size: float) -> SceneObject:
    """Trajectory that keeps the whole shape inside the frame; ``size`` is r as a fraction of min(H, W)."""
    side = min(height, width)
    r0 = r1 = size * side
    if motion == "growing":
        r0, r1 = 0.55 * r0, 1.45 * r0
    elif motion == "shrinking":
        r0, r1 = 1.45 * r0, 0.55 * r0
    ext = _EXTENT[shape] * max(r0, r1) + _MARGIN
    lo, hi = np.array([ext, ext]), np.array([width - ext, height - ext])
    start = rng.uniform(lo, hi)
    end = start.copy()
    if motion in DIRECTIONS:
        assert speed is not None
        step = np.array(DIRECTIONS[motion], dtype=np.float64)
        axis = 0 if step[0] else 1
        travel = min(SPEEDS[speed] * (width, height)[axis], hi[axis] - lo[axis])
        # choose the start so the whole path fits: start in [lo, hi - travel] (mirrored for negative moves)
        pos = rng.uniform(lo[axis], hi[axis] - travel)
        start[axis] = pos if step[axis] > 0 else hi[axis] - (pos - lo[axis])
        end[axis] = start[axis] + step[axis] * travel
    return SceneObject(shape, color, motion, speed if motion in DIRECTIONS else None,
                       (float(start[0]), float(start[1])), (float(end[0]), float(end[1])), (r0, r1))


def _sample_object(rng: np.random.Generator, background: str,
                   exclude_colors: set[str]) -> tuple[str, str, str, str]:
    while True:
        shape = SHAPES[rng.integers(len(SHAPES))]
        color = list(COLORS)[rng.integers(len(COLORS))]
        motion = MOTIONS[rng.choice(len(MOTIONS), p=_MOTION_WEIGHTS)]
        speed = list(SPEEDS)[rng.integers(len(SPEEDS))]
        if allowed(shape, color, motion, background) and color not in exclude_colors:
            return shape, color, motion, speed


def sample_scene(rng: np.random.Generator, height: int, width: int, num_frames: int,
                 two_object_fraction: float = 0.2) -> Scene:
    """A random training-visible scene (never a held-out pair; two objects have different colours)."""
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    two = rng.random() < two_object_fraction
    size = rng.uniform(0.09, 0.12) if two else rng.uniform(0.12, 0.17)
    first = place_object(rng, *_sample_object(rng, background, set()), height, width, size)
    if not two:
        return Scene(background, (first,))
    attrs = _sample_object(rng, background, {first.color})
    for _ in range(50):
        second = place_object(rng, *attrs, height, width, rng.uniform(0.09, 0.12))
        if _min_gap(first, second, num_frames) > 0:
            return Scene(background, (first, second))
    return Scene(background, (first,))


def _min_gap(a: SceneObject, b: SceneObject, num_frames: int) -> float:
    """Smallest distance between the two shapes' bounding circles over the clip (pixels)."""
    gaps = []
    for u in np.linspace(0.0, 1.0, max(num_frames, 2)):
        (ax, ay), ar = _at(a, u)
        (bx, by), br = _at(b, u)
        gaps.append(math.hypot(ax - bx, ay - by) - ar * _EXTENT[a.shape] - br * _EXTENT[b.shape])
    return min(gaps)


def _at(obj: SceneObject, u: float) -> tuple[tuple[float, float], float]:
    x = obj.start[0] + u * (obj.end[0] - obj.start[0])
    y = obj.start[1] + u * (obj.end[1] - obj.start[1])
    return (x, y), obj.radius[0] + u * (obj.radius[1] - obj.radius[0])


def render_background(name: str, height: int, width: int) -> np.ndarray:
    """(H, W, 3) float32 background in [0, 255]."""
    if name == "gradient":
        ys = np.arange(height)[:, None] / max(height - 1, 1)
        u = (ys + np.arange(width)[None, :] / max(width - 1, 1)) / 2
        dark, light = np.array([25.0, 25.0, 60.0]), np.array([150.0, 150.0, 185.0])
        return (dark + u[..., None] * (light - dark)).astype(np.float32)
    level = {"black": 0.0, "white": 255.0, "gray": 128.0}[name]
    return np.full((height, width, 3), level, np.float32)


def _polygon(shape: str, r: float) -> np.ndarray:
    """(N, 2) vertices around the origin, y pointing down."""
    if shape == "square":
        s = 0.85 * r
        return np.array([[-s, -s], [s, -s], [s, s], [-s, s]])
    if shape == "diamond":
        s = 1.2 * r
        return np.array([[0, -s], [s, 0], [0, s], [-s, 0]])
    if shape == "triangle":
        ang = np.deg2rad([-90.0, 30.0, 150.0])
        return 1.25 * r * np.stack([np.cos(ang), np.sin(ang)], 1)
    if shape == "star":
        ang = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        rad = np.where(np.arange(10) % 2 == 0, 1.35 * r, 0.55 * r)
        return np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)
    raise ValueError(f"unknown polygon shape {shape!r}")


def _polygon_sdf(px: np.ndarray, py: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Exact signed distance to a simple polygon (negative inside), after Inigo Quilez."""
    dist = (px - verts[0, 0]) ** 2 + (py - verts[0, 1]) ** 2
    sign = np.ones_like(px)
    for i in range(len(verts)):
        (vx, vy), (wx0, wy0) = verts[i], verts[i - 1]
        ex, ey = wx0 - vx, wy0 - vy
        wx, wy = px - vx, py - vy
        h = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        dist = np.minimum(dist, (wx - ex * h) ** 2 + (wy - ey * h) ** 2)
        c1, c2, c3 = py >= vy, py < wy0, ex * wy > ey * wx
        sign = np.where((c1 & c2 & c3) | (~c1 & ~c2 & ~c3), -sign, sign)
    return sign * np.sqrt(dist)


def shape_sdf(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (pixels, negative inside) of a shape of size r centred at dx = dy = 0."""
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - r
    return _polygon_sdf(dx, dy, _polygon(shape, r))


def render_scene(scene: Scene, num_frames: int, height: int, width: int) -> np.ndarray:
    """(T, H, W, 3) uint8 frames; objects move linearly from start to end over the clip."""
    bg = render_background(scene.background, height, width)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        u = t / (num_frames - 1) if num_frames > 1 else 0.0
        img = bg.copy()
        for obj in scene.objects:
            (cx, cy), r = _at(obj, u)
            # only the shape's bounding box (+ 2 px for the soft edge) can be covered
            ext = _EXTENT[obj.shape] * r + 2.0
            x0, x1 = max(0, int(cx - ext)), min(width, int(math.ceil(cx + ext)))
            y0, y1 = max(0, int(cy - ext)), min(height, int(math.ceil(cy + ext)))
            if x0 >= x1 or y0 >= y1:
                continue
            yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
            alpha = np.clip(0.5 - shape_sdf(obj.shape, xx - cx, yy - cy, r), 0.0, 1.0)[..., None]
            win = img[y0:y1, x0:x1]
            img[y0:y1, x0:x1] = win * (1.0 - alpha) + np.array(COLORS[obj.color], np.float32) * alpha
        frames[t] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return frames


def heldout_prompts(seed: int, per_pair: int = 4) -> list[dict[str, Any]]:
    """Single-object prompts, each built around exactly one held-out pair (all words seen in training)."""
    rng = np.random.default_rng([seed, 7919])
    prompts: list[dict[str, Any]] = []
    seen: set[str] = set()
    for kind, pairs in (("shape_color", HELDOUT_SHAPE_COLOR), ("color_motion", HELDOUT_COLOR_MOTION)):
        for pair in pairs:
            made = 0
            for _ in range(1000):  # bounded: far more draws than needed for a handful of prompts
                if made == per_pair:
                    break
                obj = _heldout_candidate(rng, kind, pair)
                background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
                if sum(_heldout_flags(obj)) != 1 or obj["color"] == background:
                    continue
                text = f"{object_phrase(**obj)} on a {background} background"
                if text in seen:
                    continue
                seen.add(text)
                made += 1
                attrs = {"background": background, "num_objects": 1, "objects": [obj],
                         "heldout": {"kind": kind, "pair": list(pair)}}
                prompts.append({"prompt": text, "seed": len(prompts), "attributes": attrs})
    return prompts


def _heldout_candidate(rng: np.random.Generator, kind: str, pair: tuple[str, str]) -> dict[str, Any]:
    if kind == "shape_color":
        (shape, color), motion = pair, MOTIONS[rng.integers(len(MOTIONS))]
    else:
        shape, (color, motion) = SHAPES[rng.integers(len(SHAPES))], pair
    speed = list(SPEEDS)[rng.integers(len(SPEEDS))] if motion in DIRECTIONS else None
    return {"shape": shape, "color": color, "motion": motion, "speed": speed}


def _heldout_flags(obj: dict[str, Any]) -> tuple[bool, bool]:
    return ((obj["shape"], obj["color"]) in HELDOUT_SHAPE_COLOR,
            (obj["color"], obj["motion"]) in HELDOUT_COLOR_MOTION)


def seen_prompts(seed: int, count: int, first_seed: int = 0) -> list[dict[str, Any]]:
    """``count`` distinct single-object prompts whose attribute pairs all occur in training scenes.

    Shape, colour, motion, speed and background are drawn uniformly (not with the training motion
    weights), so every attribute value is scored about equally often. Video seeds start at ``first_seed``.
    """
    rng = np.random.default_rng([seed, 104729])
    prompts: list[dict[str, Any]] = []
    texts: set[str] = set()
    for _ in range(1000 * max(count, 1)):  # bounded: the grammar has far more distinct prompts than asked
        if len(prompts) == count:
            break
        shape, color = SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))]
        motion, background = MOTIONS[rng.integers(len(MOTIONS))], BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        speed = list(SPEEDS)[rng.integers(len(SPEEDS))] if motion in DIRECTIONS else None
        text = f"{object_phrase(shape, color, motion, speed)} on a {background} background"
        if not allowed(shape, color, motion, background) or text in texts:
            continue
        texts.add(text)
        obj = {"shape": shape, "color": color, "motion": motion, "speed": speed}
        attrs = {"background": background, "num_objects": 1, "objects": [obj]}
        prompts.append({"prompt": text, "seed": first_seed + len(prompts), "attributes": attrs})
    return prompts


def evaluation_prompts(seed: int, per_pair: int = 4) -> list[dict[str, Any]]:
    """The held-out prompts (group ``heldout``) followed by as many seen-combination prompts (``seen``),
    each with its own video seed: what the attribute evaluation scores, split by group."""
    heldout = [{**p, "group": "heldout"} for p in heldout_prompts(seed, per_pair)]
    seen = [{**p, "group": "seen"} for p in seen_prompts(seed, len(heldout), first_seed=len(heldout))]
    return heldout + seen
