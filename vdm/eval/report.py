"""The offline evaluation report: one self-contained ``report.html`` with scores, videos and verdicts.

Headline attribute accuracies (all / seen / held-out combinations) and other metrics come first, then
every video in a filterable grid beside what was asked and what the attribute evaluator detected, then
the protocol manifest folded away. Videos are embedded as base64 ``data:video/mp4`` sources and CSS/JS
are inline, so the file works offline and alone; the filters are a progressive enhancement (without
JavaScript every tile is shown). Every prompt, label and manifest value is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vdm.eval.generation import GeneratedVideo

#: (metrics key suffix, row label) of the headline table; "all" (every attribute right) comes last
ATTRIBUTE_ROWS = (
    ("background", "background"),
    ("count", "count"),
    ("color", "colour"),
    ("shape", "shape"),
    ("motion", "motion"),
    ("speed", "speed"),
)
#: (metrics key prefix, column label) of the headline table
ATTRIBUTE_COLUMNS = (("attr", "all videos"), ("attr_seen", "seen combinations"),
                     ("attr_heldout", "held-out combinations"))
METRIC_LABELS = {"clip_score": "CLIP score", "clipsim": "CLIP similarity", "fvd": "FVD"}
GROUP_LABELS = {"heldout": "held-out", "seen": "seen"}
SUMMARY_KEYS = (("checkpoint", "checkpoint"), ("global_step", "step"), ("sampler", "sampler"),
                ("num_steps", "steps"), ("guidance_scale", "guidance"), ("num_videos", "videos"))
#: objects and notes shown per tile before the rest is summarised (noisy videos detect many blobs)
MAX_LISTED = 3
#: tile width in CSS pixels: 64 px videos at an integer 3x, so nearest-neighbour pixels stay square
TILE_VIDEO_PX = 192

_CSS = """
:root { --ok: #1a7f37; --ok-bg: #dafbe1; --bad: #cf222e; --bad-bg: #ffebe9; --muted: #6e7781;
        --line: #d0d7de; --accent: #0969da; }
* { box-sizing: border-box; }
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; color: #1f2328;
       margin: 0 auto; padding: 20px 24px 40px; max-width: 1600px; background: #f6f8fa; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 15px; margin: 0 0 8px; text-transform: uppercase; letter-spacing: .04em; color: #57606a; }
.summary { color: #57606a; margin: 0 0 16px; display: flex; flex-wrap: wrap; gap: 4px 14px; }
.summary b { color: #1f2328; font-weight: 600; }
.summary .ckpt { word-break: break-all; }
.scores { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; margin-bottom: 20px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; }
.card table { border-collapse: collapse; }
.card th, .card td { padding: 4px 10px; text-align: right; white-space: nowrap; }
.card th:first-child, .card td:first-child { text-align: left; }
.card thead th { font-size: 12px; color: #57606a; font-weight: 600; border-bottom: 1px solid var(--line); }
.card tr.total td { border-top: 1px solid var(--line); font-weight: 700; }
.card tr.count td { color: var(--muted); font-size: 12px; }
td.pct { min-width: 110px; font-variant-numeric: tabular-nums;
         background: linear-gradient(90deg, #ddf4ff var(--p), transparent var(--p)); }
.toolbar { display: flex; flex-wrap: wrap; align-items: center; gap: 8px; margin: 0 0 12px; }
.toolbar a { text-decoration: none; color: var(--accent); border: 1px solid var(--line); background: #fff;
             border-radius: 999px; padding: 3px 12px; }
.toolbar a[aria-current="true"] { background: var(--accent); color: #fff; border-color: var(--accent); }
#shown { color: #57606a; margin-left: 6px; }
.legend { color: var(--muted); font-size: 12px; margin-left: auto; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(236px, 1fr)); gap: 12px; }
.tile { margin: 0; background: #fff; border: 1px solid var(--line); border-top: 4px solid var(--line);
        border-radius: 8px; padding: 8px; display: flex; flex-direction: column; gap: 6px; }
.tile[hidden] { display: none; }
.tile.right { border-top-color: var(--ok); }
.tile.wrong { border-top-color: var(--bad); }
.tile video { width: 192px; max-width: 100%; align-self: center; display: block; background: #000;
              image-rendering: pixelated; outline: 1px solid var(--line); }
.prompt { font-weight: 600; overflow-wrap: anywhere; }
.meta { display: flex; flex-wrap: wrap; gap: 4px 8px; align-items: center; color: var(--muted);
        font-size: 12px; }
.badge { border-radius: 4px; padding: 0 6px; font-weight: 600; font-size: 11px; background: #eaeef2;
         color: #57606a; }
.badge.heldout { background: #fbefff; color: #8250df; }
.badge.seen { background: #ddf4ff; color: #0969da; }
.verdict { border-collapse: collapse; width: 100%; font-size: 12px; table-layout: fixed; }
.verdict th { color: var(--muted); font-weight: 600; text-align: left; padding: 1px 3px; }
.verdict th:nth-child(1) { width: 12px; }
.verdict th:nth-child(2) { width: 80px; }
.verdict td { padding: 1px 3px; border-top: 1px solid #eaeef2; overflow-wrap: break-word;
              vertical-align: top; }
.verdict td.mark { text-align: center; font-weight: 700; padding: 1px 0; }
.verdict tr.hit td.mark { color: var(--ok); }
.verdict tr.miss td { background: var(--bad-bg); }
.verdict tr.miss td.mark, .verdict tr.miss td.got { color: var(--bad); font-weight: 700; }
.verdict tr.na td { color: var(--muted); }
.notes { margin: 0; padding-left: 16px; font-size: 12px; color: #9a6700; }
.unscored { font-size: 12px; color: var(--muted); font-style: italic; }
details { margin-top: 24px; background: #fff; border: 1px solid var(--line); border-radius: 8px;
          padding: 8px 14px; }
summary { cursor: pointer; font-weight: 600; }
pre { font-size: 12px; overflow-x: auto; margin: 8px 0 0; }
"""

# Filters read the URL fragment (#all, #mismatches, #heldout, #seen) so a filtered view can be linked.
_JS = """
(function () {
  var tiles = Array.prototype.slice.call(document.querySelectorAll(".tile"));
  var links = Array.prototype.slice.call(document.querySelectorAll("[data-filter]"));
  var keep = {
    all: function () { return true; },
    mismatches: function (t) { return t.dataset.verdict === "wrong"; },
    heldout: function (t) { return t.dataset.group === "heldout"; },
    seen: function (t) { return t.dataset.group === "seen"; }
  };
  function apply() {
    var name = location.hash.slice(1);
    if (!keep[name]) { name = "all"; }
    var shown = 0;
    tiles.forEach(function (t) { t.hidden = !keep[name](t); if (!t.hidden) { shown += 1; } });
    links.forEach(function (a) { a.setAttribute("aria-current", String(a.dataset.filter === name)); });
    document.getElementById("shown").textContent = "showing " + shown + " of " + tiles.length;
  }
  document.getElementById("filters").hidden = false;
  window.addEventListener("hashchange", apply);
  apply();
})();
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _format_metric(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) >= 100 else f"{value:.4f}"
    return str(value)


def _attribute_table(metrics: dict[str, Any]) -> tuple[str, set[str]]:
    """(headline accuracy card or "", the metrics keys it shows)."""
    known = {a for a, _ in ATTRIBUTE_ROWS} | {"all", "num_videos"}
    found = {k.split("/", 1)[1] for k in metrics for p, _ in ATTRIBUTE_COLUMNS if k.startswith(p + "/")}
    rows = [*ATTRIBUTE_ROWS, *((a, a) for a in sorted(found - known)), ("all", "all correct")]
    columns = [(p, label) for p, label in ATTRIBUTE_COLUMNS if any(f"{p}/{a}" in metrics for a, _ in rows)]
    if not columns:
        return "", set()
    used: set[str] = set()
    body = []
    for attr, label in rows:
        cells = []
        for prefix, _ in columns:
            value = metrics.get(f"{prefix}/{attr}")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                used.add(f"{prefix}/{attr}")
                pct = 100.0 * float(value)
                cells.append(f'<td class="pct" style="--p:{min(max(pct, 0.0), 100.0):.1f}%">{pct:.1f}%</td>')
            else:
                cells.append('<td class="pct" style="--p:0%">&ndash;</td>')
        if any(f"{p}/{attr}" in used for p, _ in columns):
            total = ' class="total"' if attr == "all" else ""
            body.append(f"<tr{total}><td>{_esc(label)}</td>{''.join(cells)}</tr>")
    counts = [metrics.get(f"{prefix}/num_videos") for prefix, _ in columns]
    if any(isinstance(c, (int, float)) for c in counts):
        used |= {f"{prefix}/num_videos" for prefix, _ in columns}
        cells = "".join(f'<td class="pct">{int(c) if isinstance(c, (int, float)) else "&ndash;"}</td>'
                        for c in counts)
        body.append(f'<tr class="count"><td>videos scored</td>{cells}</tr>')
    head = "".join(f"<th>{_esc(label)}</th>" for _, label in columns)
    table = f"<table><thead><tr><th>attribute</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    return f'<section class="card"><h2>Attribute accuracy</h2>{table}</section>', used


def _other_metrics_table(metrics: dict[str, Any], shown: set[str]) -> str:
    rest = [(k, v) for k, v in sorted(metrics.items()) if k not in shown]
    if not rest:
        return ""
    rows = "".join(
        f"<tr><td>{_esc(METRIC_LABELS.get(k, k))}</td><td>{_esc(_format_metric(v))}</td></tr>"
        for k, v in rest
    )
    return f'<section class="card"><h2>Metrics</h2><table><tbody>{rows}</tbody></table></section>'


def _summary(manifest: dict[str, Any], num_records: int) -> str:
    values = {key: manifest[key] for key, _ in SUMMARY_KEYS if manifest.get(key) is not None}
    values.setdefault("num_videos", num_records)
    parts = []
    for key, label in SUMMARY_KEYS:
        if key in values:
            extra = ' class="ckpt"' if key == "checkpoint" else ""
            parts.append(f"<span{extra}>{_esc(label)} <b>{_esc(values[key])}</b></span>")
    return f'<p class="summary">{"".join(parts)}</p>'


def _label(value: Any) -> str:
    return "\u2013" if value is None or value == "" else str(value)


def _side(side: dict[str, Any], attr: str) -> str:
    """One side (``expected`` or ``detected``) of a verdict as text for one attribute row."""
    objects = [o for o in side.get("objects") or [] if isinstance(o, dict)]
    if attr == "background":
        return _label(side.get("background"))
    if attr == "count":
        return _label(side.get("num_objects", len(objects)))
    values = [_label(o.get(attr)) for o in objects]
    if len(values) > MAX_LISTED:  # a noisy video can hold a dozen blobs: name a few, count the rest
        values = [*values[:MAX_LISTED], f"+{len(values) - MAX_LISTED} more"]
    return ", ".join(values) or "\u2013"


def _verdict_html(verdict: dict[str, Any] | None) -> str:
    if verdict is None:
        return '<p class="unscored">not scored</p>'
    expected, detected = verdict.get("expected") or {}, verdict.get("detected") or {}
    matches = verdict.get("matches") or {}
    rows = []
    for attr, label in ATTRIBUTE_ROWS:
        match = matches.get(attr)
        cls, mark = {True: ("hit", "\u2713"), False: ("miss", "\u2717")}.get(match, ("na", "\u00b7"))
        title = {"hit": "match", "miss": "mismatch"}.get(cls, "not applicable")
        rows.append(
            f'<tr class="{cls}" title="{label}: {title}"><td class="mark">{mark}</td><td>{label}</td>'
            f'<td>{_esc(_side(expected, attr))}</td><td class="got">{_esc(_side(detected, attr))}</td></tr>'
        )
    head = "<tr><th></th><th></th><th>asked</th><th>detected</th></tr>"
    all_notes = list(verdict.get("notes") or [])
    notes = "".join(f"<li>{_esc(n)}</li>" for n in all_notes[:MAX_LISTED])
    if len(all_notes) > MAX_LISTED:
        more = "".join(f"<li>{_esc(n)}</li>" for n in all_notes[MAX_LISTED:])
        notes += (f'<li><details><summary>{len(all_notes) - MAX_LISTED} more notes</summary>'
                  f'<ul class="notes">{more}</ul></details></li>')
    notes_html = f'<ul class="notes">{notes}</ul>' if notes else ""
    return f'<table class="verdict"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>{notes_html}'


def _tile(record: GeneratedVideo, verdict: dict[str, Any] | None, group: str | None, clip: float | None,
          show_sample: bool) -> str:
    state = "none" if verdict is None else ("right" if verdict.get("all_correct") else "wrong")
    data = base64.b64encode(Path(record.path).read_bytes()).decode("ascii")
    video = (f'<video autoplay muted loop playsinline preload="auto" width="{TILE_VIDEO_PX}" '
             f'src="data:video/mp4;base64,{data}"></video>')
    meta = []
    if group:
        meta.append(f'<span class="badge {_esc(group)}">{_esc(GROUP_LABELS.get(group, group))}</span>')
    meta.append(f"<span>prompt {record.prompt_idx}</span>")
    if show_sample:
        meta.append(f"<span>sample {record.sample_idx}</span>")
    meta.append(f"<span>seed {record.seed}</span>")
    if clip is not None:
        meta.append(f"<span>CLIP {clip:.1f}</span>")
    caption = (f'<div class="prompt">{_esc(record.prompt)}</div><div class="meta">{"".join(meta)}</div>'
               f"{_verdict_html(verdict)}")
    group_attr = _esc(group) if group else ""
    return (f'<figure class="tile {state}" data-verdict="{state}" data-group="{group_attr}">{video}'
            f"<figcaption>{caption}</figcaption></figure>")


def _toolbar(verdicts: Sequence[dict[str, Any] | None], groups: Sequence[str | None]) -> str:
    counts = {
        "all": len(verdicts),
        "mismatches": sum(1 for v in verdicts if v is not None and not v.get("all_correct")),
        "heldout": sum(1 for g in groups if g == "heldout"),
        "seen": sum(1 for g in groups if g == "seen"),
    }
    scored = any(v is not None for v in verdicts)
    labels = {"all": "all", "mismatches": "mismatches", "heldout": "held-out", "seen": "seen"}
    offered = {"all": True, "mismatches": scored, "heldout": counts["heldout"] > 0,
               "seen": counts["seen"] > 0}
    links = "".join(
        f'<a href="#{name}" data-filter="{name}">{labels[name]} ({n})</a>'
        for name, n in counts.items()
        if offered[name]
    )
    legend = ('<span class="legend">top border: green = every attribute right, red = some attribute wrong, '
              "gray = not scored</span>") if scored else ""
    return (f'<div class="toolbar"><span id="filters" hidden>{links}</span>'
            f'<span id="shown">{len(verdicts)} videos</span>{legend}</div>')


def write_report(
    out_dir: str | Path,
    records: Sequence[GeneratedVideo],
    metrics: dict[str, Any],
    manifest: dict[str, Any],
    *,
    per_prompt_clip: dict[str, float] | None = None,
    verdicts: Sequence[dict[str, Any] | None] | None = None,
    groups: Sequence[str | None] | None = None,
    title: str = "vdm evaluation",
) -> Path:
    """Write ``out_dir/report.html`` and return its path.

    ``metrics``: ``attr/<attribute>`` and ``attr_seen/...``, ``attr_heldout/...`` accuracies in [0, 1] go
    to the headline table, anything else (``clip_score``, ``fvd``, ...) to a table beside it.
    ``manifest``: the protocol, shown folded at the end. ``per_prompt_clip``: CLIP score by prompt text.
    ``verdicts[i]`` / ``groups[i]``: the attribute evaluator's verdict (``expected``, ``detected``,
    ``matches``, ``all_correct``, ``notes``) and the prompt group (``"heldout"``, ``"seen"``) of
    ``records[i]``, None where unknown.
    """
    verdicts = list(verdicts) if verdicts is not None else [None] * len(records)
    groups = list(groups) if groups is not None else [None] * len(records)
    if len(verdicts) != len(records) or len(groups) != len(records):
        raise ValueError(
            f"verdicts ({len(verdicts)}) and groups ({len(groups)}) must align with records ({len(records)})"
        )
    attributes, shown = _attribute_table(metrics)
    scores = attributes + _other_metrics_table(metrics, shown)
    clip = per_prompt_clip or {}
    show_sample = any(r.sample_idx > 0 for r in records)
    tiles = "\n".join(
        _tile(r, v, g, clip.get(r.prompt), show_sample) for r, v, g in zip(records, verdicts, groups)
    )
    manifest_json = json.dumps(manifest, sort_keys=True, indent=2, default=str)
    body = "\n".join([
        f"<h1>{_esc(title)}</h1>",
        _summary(manifest, len(records)),
        f'<div class="scores">{scores}</div>' if scores else "",
        _toolbar(verdicts, groups),
        f'<main class="grid">\n{tiles}\n</main>',
        f"<details><summary>Protocol</summary><pre>{_esc(manifest_json)}</pre></details>",
    ])
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n"
        f"<script>{_JS}</script>\n</body></html>\n"
    )
    path = Path(out_dir) / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
