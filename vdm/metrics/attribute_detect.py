"""Image measurements behind the attribute evaluator (numpy only, no learned weights).

The renderer (``vdm.synthetic.scenes``) is the model: a named background, shape coverage
``clip(0.5 - sdf, 0, 1)`` and pixels ``background * (1 - alpha) + colour * alpha``. ``measure``
inverts it: background class and planar fit, foreground components per frame (split where two
palette colours touch), tracks over the clip, and per track the interior colour, per-frame
coverage, soft-IoU fits of the renderer's shape templates and linear fits of position and
log-area. ``vdm.metrics.attributes`` turns these numbers into attribute names and verdicts.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from vdm.synthetic.scenes import BACKGROUNDS, COLORS, SHAPES, render_background, shape_sdf

BG_TOLERANCE = 40.0  # median RGB distance (0-255) within which a background class fits
FG_THRESHOLD = 40.0  # RGB distance from the background model that marks a foreground pixel
_PALETTE = np.array(list(COLORS.values()), np.float32)  # (8, 3)
# BT.601 RGB -> YCbCr rows. H.264 (4:2:0) keeps chroma at half resolution: coverage is estimated
# with chroma down-weighted, and templates are passed through the same chroma path (chroma_path)
_YCBCR = np.array([[0.299, 0.587, 0.114], [-0.1687, -0.3313, 0.5], [0.5, -0.4187, -0.0813]], np.float32)
_YCBCR_WEIGHTS = np.array([1.0, 0.3, 0.3], np.float32)
_METRIC = _YCBCR.T @ np.diag(_YCBCR_WEIGHTS) @ _YCBCR


@dataclass
class ObjectMeasurement:
    """One tracked object: its colour, track, shape-template fits and motion fits.

    ``rgb``: median over frames of the colour of its pixels farthest from the background (not the
    anti-aliased edges). ``track``: [t, x, y, area] rows (pixels, coverage centroid, y down) for the
    frames it was seen in; ``cut`` / ``touching`` flag those where it is partly outside the frame /
    shares a component with another object. ``shape_scores``: mean soft IoU per shape over the
    largest views that are neither ({} without an uncut view; from touching views, flagged, when
    there is nothing else). ``displacement`` (dx / W, dy / H over the clip) and ``area_ratio``
    (last / first area): linear fits over the uncut frames, None when seen in fewer than two frames.
    """

    rgb: np.ndarray
    track: np.ndarray
    cut: np.ndarray
    touching: np.ndarray
    shape_scores: dict[str, float]
    touching_views: bool
    displacement: tuple[float, float] | None
    area_ratio: float | None


@dataclass
class Measurement:
    """Background class (None when none fits), tracked objects and notes on anything ambiguous."""

    background: str | None
    objects: list[ObjectMeasurement]
    notes: list[str] = field(default_factory=list)


@dataclass
class _View:
    """One frame's coverage of an object, ready for template fitting."""

    area: float
    alpha: np.ndarray  # (h, w) estimated coverage in the window
    dx: np.ndarray  # (h, w) pixel-centre offsets from the coverage centroid
    dy: np.ndarray
    x0: int  # window origin in the frame
    y0: int
    luma_share: float  # share of the coverage estimate carried by (full-resolution) luma


@dataclass
class _Component:
    t: int
    label: int
    pixels: np.ndarray  # flat indices into one (H, W) frame
    centre: np.ndarray  # (x, y) pixel-centre coordinates, unweighted
    rgb: np.ndarray  # median colour of its pixels >= 0.8 of its largest distance from the background
    touching: bool  # split from a component shared with another object


def measure(frames: np.ndarray, min_area: int | None = None) -> Measurement:
    """Measure background and objects in (T, H, W, 3) uint8 RGB frames (T >= 2, H, W >= 16).

    ``min_area``: components with fewer pixels are specks (default 0.15% of the frame, >= 4). The
    object count is the most common per-frame component count; frames with another count (merged
    or vanished objects) are left out of the tracks and noted.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 2 or min(frames.shape[1:3]) < 16:
        raise ValueError(f"expected (T >= 2, H >= 16, W >= 16, 3) frames, got {frames.shape}")
    video = frames.astype(np.float32)
    t_count, h, w, _ = video.shape
    min_area = min_area or max(4, round(0.0015 * h * w))
    background, bg, notes = detect_background(video)
    dist = np.linalg.norm(video - bg, axis=-1)  # (T, H, W)
    labels, split = split_by_color(label_components(dist > FG_THRESHOLD), video, bg, min_area)
    per_frame = _components(labels, split, video, dist, min_area)
    counts = [len(c) for c in per_frame]
    count = max(set(counts), key=lambda n: (counts.count(n), n))
    if count == 0:
        notes.append("no foreground object found")
        return Measurement(background, [], notes)
    if counts.count(count) < t_count:
        seen = ", ".join(f"{n} in {counts.count(n)}" for n in sorted(set(counts)))
        notes.append(f"object count varies over the clip (frames with n objects: {seen})")
    subsampled = chroma_subsampled(video)
    tracks = _tracks(per_frame, count)
    objects = [_measure_object(track, video, bg, labels, subsampled) for track in tracks]
    return Measurement(background, objects, notes)


def _measure_object(track: list[_Component], video: np.ndarray, bg: np.ndarray, labels: np.ndarray,
                    subsampled: bool) -> ObjectMeasurement:
    """Colour, per-frame coverage, shape fits and motion fits of one track."""
    t_count, h, w, _ = video.shape
    rgb = np.median(np.stack([c.rgb for c in track]), axis=0)
    rows, views = [], []
    for comp in track:
        alpha, x0, y0 = _alpha_window(video[comp.t], bg, labels[comp.t], comp, rgb)
        area = float(alpha.sum())
        yy, xx = np.mgrid[y0:y0 + alpha.shape[0], x0:x0 + alpha.shape[1]] + 0.5
        cx, cy = float((alpha * xx).sum() / area), float((alpha * yy).sum() / area)
        rows.append([float(comp.t), cx, cy, area])
        views.append(_View(area, alpha, xx - cx, yy - cy, x0, y0, _luma_share(rgb - bg[int(cy), int(cx)])))
    track_arr = np.array(rows)
    cut = np.array([_cut_by_border(v.alpha, v.x0, v.y0, w, h) for v in views])
    touching = np.array([c.touching for c in track])
    chosen = np.flatnonzero(~cut & ~touching)
    touching_views = not len(chosen)
    if touching_views:
        chosen = np.flatnonzero(~cut)
    largest = sorted((views[i] for i in chosen), key=lambda v: -v.area)[:3]  # these resolve it best
    scores = {s: float(np.mean([_soft_iou(s, v, subsampled) for v in largest])) for s in SHAPES if largest}
    uncut = track_arr[~cut] if (~cut).sum() >= 2 else track_arr
    displacement, ratio = _linear_motion(uncut, t_count, w, h)
    return ObjectMeasurement(rgb, track_arr, cut, touching, scores, touching_views and bool(largest),
                             displacement, ratio)


def _linear_motion(track: np.ndarray, t_count: int, width: int,
                   height: int) -> tuple[tuple[float, float] | None, float | None]:
    """(dx / width, dy / height) and last / first area over the clip from linear fits of (N, 4) rows."""
    t = track[:, 0]
    if len(t) < 2 or t.max() == t.min():
        return None, None
    span = t_count - 1
    dx = float(np.polyfit(t, track[:, 1], 1)[0]) * span / width
    dy = float(np.polyfit(t, track[:, 2], 1)[0]) * span / height
    ratio = float(np.exp(np.polyfit(t, np.log(np.maximum(track[:, 3], 1e-3)), 1)[0] * span))
    return (dx, dy), ratio


# background


def detect_background(video: np.ndarray) -> tuple[str | None, np.ndarray, list[str]]:
    """Background class (None when none fits), a planar (H, W, 3) background model and notes.

    ``video``: (T, H, W, 3) float32 in [0, 255]. The temporal median removes moving objects; the
    class is the one with the smallest median distance over pixels (robust to objects covering less
    than half the frame); the model is a per-channel plane a + b x + c y fitted to the pixels near
    that class, which also absorbs a slightly off level or ramp in generated videos.
    """
    _, h, w, _ = video.shape
    still = np.median(video, axis=0)
    dists = {name: np.linalg.norm(still - render_background(name, h, w), axis=-1) for name in BACKGROUNDS}
    scores = {name: float(np.median(d)) for name, d in dists.items()}
    best = min(scores, key=scores.__getitem__)
    notes = []
    name: str | None = best
    if scores[best] > BG_TOLERANCE:
        notes.append(f"background fits no known class (closest {best}, median distance {scores[best]:.0f})")
        name = None
    inliers = dists[best] < max(30.0, 1.5 * scores[best])
    model = _fit_plane(still, inliers)
    for _ in range(2):  # refit on the pixels the plane itself explains
        inliers = np.linalg.norm(still - model, axis=-1) < 0.75 * FG_THRESHOLD
        if inliers.sum() < 0.25 * h * w:
            break
        model = _fit_plane(still, inliers)
    return name, model, notes


def _fit_plane(image: np.ndarray, inliers: np.ndarray) -> np.ndarray:
    """Least-squares per-channel plane through ``image[inliers]`` ((H, W, 3) -> (H, W, 3))."""
    h, w, _ = image.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    design = np.stack([np.ones_like(xx), xx, yy], -1)  # (H, W, 3)
    if inliers.sum() < 3:
        inliers = np.ones((h, w), bool)
    coef, *_ = np.linalg.lstsq(design[inliers], image[inliers], rcond=None)  # (3 terms, 3 channels)
    return (design @ coef).astype(np.float32)


# segmentation and tracking


def label_components(mask: np.ndarray, classes: np.ndarray | None = None) -> np.ndarray:
    """4-connected components of each frame of a (T, H, W) bool mask.

    ``classes`` (same shape, optional): neighbours join only when their classes are equal. Returns
    int64 labels of the same shape: -1 off the mask, otherwise the flat index of the component's
    first pixel (so labels of disjoint masks never collide). Min-label propagation with pointer
    jumping: a handful of vectorised passes for frames this small.
    """
    size = mask.size
    if classes is None:
        vert = horiz = np.ones((), bool)
    else:
        vert, horiz = classes[:, 1:] == classes[:, :-1], classes[:, :, 1:] == classes[:, :, :-1]
    labels = np.where(mask, np.arange(size).reshape(mask.shape), size)
    while True:
        new = labels.copy()
        new[:, 1:] = np.where(vert, np.minimum(new[:, 1:], labels[:, :-1]), new[:, 1:])
        new[:, :-1] = np.where(vert, np.minimum(new[:, :-1], labels[:, 1:]), new[:, :-1])
        new[:, :, 1:] = np.where(horiz, np.minimum(new[:, :, 1:], labels[:, :, :-1]), new[:, :, 1:])
        new[:, :, :-1] = np.where(horiz, np.minimum(new[:, :, :-1], labels[:, :, 1:]), new[:, :, :-1])
        new[~mask] = size
        lookup = np.append(new.ravel(), size)
        for _ in range(4):  # pointer jumping: a label's own label is as small or smaller, same component
            lookup[:size] = lookup[lookup[:size]]
        new = lookup[:size].reshape(mask.shape)
        if np.array_equal(new, labels):
            return np.where(mask, labels, -1)
        labels = new


def palette_mixing(pixels: np.ndarray, background: np.ndarray,
                   palette: np.ndarray = _PALETTE) -> tuple[np.ndarray, np.ndarray]:
    """Explain (N, 3) pixels as background * (1 - a) + colour * a with the colour from (K, 3) ``palette``.

    Returns (N,) index of the best colour (smallest residual) and its coverage a in [0, 1].
    """
    span = palette[None] - background[:, None]  # (N, K, 3)
    diff = (pixels - background)[:, None]
    cover = np.clip((diff * span).sum(-1) / np.maximum((span * span).sum(-1), 1.0), 0.0, 1.0)  # (N, K)
    best = np.linalg.norm(diff - cover[..., None] * span, axis=-1).argmin(1)
    return best, cover[np.arange(len(best)), best]


def split_by_color(labels: np.ndarray, video: np.ndarray, bg: np.ndarray,
                   min_area: int) -> tuple[np.ndarray, np.ndarray]:
    """Split components whose interior holds two or more palette colours (touching objects).

    A colour counts when at least ``min_area`` and 20% of the component's interior pixels
    (coverage >= 0.9) take it; the component's pixels are then reassigned to the nearest of those
    colours and relabelled with colour-aware connectivity. Returns (labels, (T, H, W) bool mask of
    the pixels of split components).
    """
    idx = np.flatnonzero(labels >= 0)
    split = np.zeros(labels.shape, bool)
    if not len(idx):
        return labels, split
    pixels = video.reshape(-1, 3)[idx]
    backs = np.broadcast_to(bg, video.shape).reshape(-1, 3)[idx]
    pal, cover = palette_mixing(pixels, backs)
    comp = labels.ravel()[idx]
    core = cover >= 0.9
    keys, counts = np.unique(comp[core] * len(_PALETTE) + pal[core], return_counts=True)
    owners, colours = np.divmod(keys, len(_PALETTE))
    classes = np.full(labels.size, -1, np.int64)
    for owner in np.unique(owners):
        mine = owners == owner
        dominant = colours[mine][counts[mine] >= max(min_area, 0.2 * counts[mine].sum())]
        if len(dominant) < 2:
            continue
        members = comp == owner
        nearest, _ = palette_mixing(pixels[members], backs[members], _PALETTE[dominant])
        classes[idx[members]] = dominant[nearest]
    if not (classes >= 0).any():
        return labels, split
    split = (classes >= 0).reshape(labels.shape)
    relabelled = label_components(split, classes.reshape(labels.shape))
    return np.where(split, relabelled, labels), split


def _components(labels: np.ndarray, split: np.ndarray, video: np.ndarray, dist: np.ndarray,
                min_area: int) -> list[list[_Component]]:
    """Per frame, the components with at least ``min_area`` pixels, largest first."""
    t_count, _, w = labels.shape
    flat = labels.reshape(t_count, -1)
    frames: list[list[_Component]] = []
    for t in range(t_count):
        ids, inverse, counts = np.unique(flat[t], return_inverse=True, return_counts=True)
        comps = []
        for k in np.argsort(-counts):
            if ids[k] < 0 or counts[k] < min_area:
                continue
            pixels = np.flatnonzero(inverse == k)
            centre = np.array([(pixels % w).mean() + 0.5, (pixels // w).mean() + 0.5])
            d = dist[t].flat[pixels]
            rgb = np.median(video[t].reshape(-1, 3)[pixels[d >= 0.8 * d.max()]], axis=0)
            comps.append(_Component(t, int(ids[k]), pixels, centre, rgb, bool(split[t].flat[pixels].any())))
        frames.append(comps)
    return frames


def _tracks(frames: list[list[_Component]], count: int) -> list[list[_Component]]:
    """Link the components of the frames holding exactly ``count`` of them.

    Each frame's components go to the tracks by the permutation of least cost: distance from the
    track's last centre plus half the RGB distance from its last colour (objects of different
    colours stay apart even when they move far between frames of a short clip).
    """
    tracks: list[list[_Component]] = [[] for _ in range(count)]
    for comps in frames:
        if len(comps) != count:
            continue
        order: tuple[int, ...] = tuple(range(count))  # first frame, or many specks: size order
        if tracks[0] and count <= 4:
            last = [track[-1] for track in tracks]
            cost = np.array([[np.linalg.norm(a.centre - c.centre) + 0.5 * np.linalg.norm(a.rgb - c.rgb)
                              for c in comps] for a in last])  # (track, comp)
            order = min(itertools.permutations(range(count)), key=lambda p: cost[range(count), p].sum())
        for i, j in enumerate(order):
            tracks[i].append(comps[j])
    return tracks


# per-object measurements


@functools.cache
def shape_area(shape: str) -> float:
    """Area of a shape of size r = 1 (unit r^2), measured on the renderer's SDF."""
    n = 600
    grid = (np.arange(n) + 0.5) / n * 3.2 - 1.6
    dx, dy = np.meshgrid(grid, grid)
    return float((shape_sdf(shape, dx, dy, 1.0) < 0).mean() * 3.2 ** 2)


def _cut_by_border(alpha: np.ndarray, x0: int, y0: int, width: int, height: int) -> bool:
    """True when the object covers (at least half of) a pixel on the frame's edge: it is partly outside."""
    h, w = alpha.shape
    edges = [e for e, at_edge in ((alpha[0], y0 == 0), (alpha[:, 0], x0 == 0), (alpha[-1], y0 + h == height),
                                  (alpha[:, -1], x0 + w == width)) if at_edge]
    return any(float(e.max()) >= 0.5 for e in edges)


def _alpha_window(frame: np.ndarray, bg: np.ndarray, lab: np.ndarray, comp: _Component,
                  rgb: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Coverage of the object in a window around it, from the mixing model pixel = bg + alpha (rgb - bg).

    The window is the component's bounding box grown by 2 pixels; pixels of other components are
    excluded, pixels farther than 2 from the component are zero. Returns (alpha, x0, y0).
    """
    h, w = lab.shape
    ys, xs = np.divmod(comp.pixels, w)
    y0, y1, x0, x1 = max(ys.min() - 2, 0), min(ys.max() + 3, h), max(xs.min() - 2, 0), min(xs.max() + 3, w)
    region = np.zeros((y1 - y0, x1 - x0), bool)
    region[ys - y0, xs - x0] = True
    for _ in range(2):
        grown = region.copy()
        grown[1:] |= region[:-1]
        grown[:-1] |= region[1:]
        grown[:, 1:] |= region[:, :-1]
        grown[:, :-1] |= region[:, 1:]
        region = grown
    sub = lab[y0:y1, x0:x1]
    region &= (sub < 0) | (sub == comp.label)
    span = rgb - bg[y0:y1, x0:x1]
    diff = frame[y0:y1, x0:x1] - bg[y0:y1, x0:x1]
    weighted = span @ _METRIC
    alpha = np.clip((diff * weighted).sum(-1) / np.maximum((span * weighted).sum(-1), 1.0), 0.0, 1.0)
    alpha = np.where(region, alpha, 0.0)
    if alpha.sum() < 0.5:  # nothing along the colour's mixing line (off-model pixels): use the mask
        alpha = (sub == comp.label).astype(np.float64)
    return alpha, int(x0), int(y0)


def _soft_iou(shape: str, view: _View, subsampled: bool) -> float:
    """Soft IoU of the view's coverage with the shape's (centred on its centroid, of the same area).

    With ``subsampled`` the template goes through the same chroma path as the video (see
    ``chroma_path``), in the share of the estimate that chroma carries.
    """
    r = math.sqrt(view.area / shape_area(shape))
    cover = np.clip(0.5 - shape_sdf(shape, view.dx, view.dy, r), 0.0, 1.0)
    if subsampled and view.luma_share < 0.99:
        cover = view.luma_share * cover + (1 - view.luma_share) * chroma_path(cover, view.x0, view.y0)
    return float(np.minimum(view.alpha, cover).sum() / np.maximum(view.alpha, cover).sum())


def _luma_share(span: np.ndarray) -> float:
    """beta in alpha_est = beta * luma coverage + (1 - beta) * chroma coverage, for colour step ``span``."""
    ycc = _YCBCR @ span
    parts = _YCBCR_WEIGHTS * ycc * ycc
    return float(parts[0] / max(parts.sum(), 1e-6))


def chroma_path(cover: np.ndarray, x0: int, y0: int) -> np.ndarray:
    """A plane as H.264 4:2:0 stores and the decoder returns it: 2:1 down in each axis on the frame's
    even grid (horizontal pair mean, vertical [1, 3, 3, 1] / 8 taps, as swscale converts rgb24 to
    yuv420p), then nearest-neighbour up. ``cover`` is a window whose top-left pixel is (x0, y0).
    """
    h, w = cover.shape
    px, py = x0 % 2, y0 % 2
    top = py + 2  # the padded plane starts on an even frame row, with a spare pair above for the taps
    pad = np.pad(cover, ((top, 2 + (top + h) % 2), (px, (px + w) % 2)))
    pairs = (pad[:, 0::2] + pad[:, 1::2]) / 2
    even, odd = pairs[0::2], pairs[1::2]
    down = (odd[:-2] + 3 * even[1:-1] + 3 * odd[1:-1] + even[2:]) / 8  # pair rows 1 .. n-2
    up = np.repeat(np.repeat(down, 2, 0), 2, 1)  # starts at padded row 2
    return up[py:py + h, px:px + w]


def chroma_subsampled(video: np.ndarray) -> bool:
    """True when the chroma of (T, H, W, 3) frames repeats over 2 x 2 pixel blocks (decoded 4:2:0)."""
    _, h, w, _ = video.shape
    chroma = video[:, :h - h % 2, :w - w % 2] @ _YCBCR[1:].T  # (T, H, W, 2)
    inside = [(chroma[:, :, 0::2], chroma[:, :, 1::2]), (chroma[:, 0::2], chroma[:, 1::2])]
    between = [(chroma[:, :, 1:-1:2], chroma[:, :, 2::2]), (chroma[:, 1:-1:2], chroma[:, 2::2])]
    within = sum(float(np.abs(a - b).sum()) for a, b in inside)
    across = sum(float(np.abs(a - b).sum()) for a, b in between)
    return within < 0.25 * across
