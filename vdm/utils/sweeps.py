"""Gather a Hydra multirun directory into one results table: ``python -m vdm.utils.sweeps MULTIRUN_DIR``.

Every run of ``train.py`` writes ``metrics.json`` (its final metrics) next to Hydra's
``.hydra/overrides.yaml``; this reads them all and writes ``results.csv`` and ``results.md`` into the
multirun directory, sorted by the metric (best first), one row per run with its overrides. Runs that
died before writing their metrics are listed last with status ``failed``, so nothing silently drops out.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """One run of a sweep: its directory, command-line overrides and final metrics (empty if it failed)."""

    run_dir: Path
    overrides: list[str]
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return "ok" if self.metrics else "failed"


def _job_number(path: Path) -> tuple[int, str]:
    return (int(path.name), "") if path.name.isdigit() else (1 << 30, path.name)


def collect(multirun_dir: str | Path) -> list[RunResult]:
    """Every run directory under ``multirun_dir`` (those holding ``.hydra/overrides.yaml``), in job order."""
    root = Path(multirun_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"multirun directory {root} not found")
    runs = []
    for overrides_file in root.glob("*/.hydra/overrides.yaml"):
        run_dir = overrides_file.parent.parent
        overrides = yaml.safe_load(overrides_file.read_text()) or []
        metrics_file = run_dir / "metrics.json"
        metrics = json.loads(metrics_file.read_text()).get("metrics", {}) if metrics_file.is_file() else {}
        runs.append(RunResult(run_dir, [str(o) for o in overrides], metrics))
    if not runs:
        raise ValueError(f"{root} holds no Hydra runs (no */.hydra/overrides.yaml)")
    return sorted(runs, key=lambda r: _job_number(r.run_dir))


def rank(runs: list[RunResult], metric: str, mode: str = "min") -> list[RunResult]:
    """Runs sorted by ``metric`` (``mode`` min or max); runs without a finite value go last."""
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    if not any(metric in r.metrics for r in runs):
        known = sorted({k for r in runs for k in r.metrics})
        raise KeyError(f"no run logged {metric!r}; logged metrics: {', '.join(known) or 'none'}")

    def key(run: RunResult) -> tuple[int, float]:
        value = run.metrics.get(metric, math.nan)
        if not math.isfinite(value):
            return (1, 0.0)
        return (0, value if mode == "min" else -value)

    return sorted(runs, key=key)


def _columns(runs: list[RunResult], metric: str) -> list[str]:
    others = sorted({k for r in runs for k in r.metrics} - {metric})
    return ["rank", "run", "status", metric, *others, "overrides"]


def _row(i: int, run: RunResult, columns: list[str], root: Path) -> dict[str, Any]:
    row: dict[str, Any] = {
        "rank": i,
        "run": run.run_dir.relative_to(root).as_posix(),
        "status": run.status,
        "overrides": " ".join(run.overrides),
    }
    for col in columns[3:-1]:
        value = run.metrics.get(col)
        row[col] = "" if value is None else f"{value:.6g}"
    return row


def write_tables(runs: list[RunResult], metric: str, root: str | Path) -> tuple[Path, Path]:
    """``results.csv`` and ``results.md`` in ``root`` for already ranked ``runs``."""
    root = Path(root)
    columns = _columns(runs, metric)
    rows = [_row(i, run, columns, root) for i, run in enumerate(runs, start=1)]
    csv_path, md_path = root / "results.csv", root / "results.md"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("multirun_dir", help="a Hydra multirun directory (logs/train/multiruns/<time>)")
    parser.add_argument(
        "--metric", default=None, help="metric to sort by (default: the sweep's optimized_metric)"
    )
    parser.add_argument("--mode", choices=("min", "max"), default="min", help="min: lower is better")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    runs = collect(args.multirun_dir)
    metric = args.metric or _optimized_metric(runs)
    csv_path, md_path = write_tables(rank(runs, metric, args.mode), metric, args.multirun_dir)
    log.info(
        "%d runs (%d failed) ranked by %s: %s, %s",
        len(runs),
        sum(r.status == "failed" for r in runs),
        metric,
        csv_path,
        md_path,
    )
    log.info("%s", md_path.read_text())


def _optimized_metric(runs: list[RunResult]) -> str:
    """The ``optimized_metric`` the runs were configured with (``.hydra/config.yaml``)."""
    for run in runs:
        config_file = run.run_dir / ".hydra" / "config.yaml"
        if config_file.is_file():
            metric = (yaml.safe_load(config_file.read_text()) or {}).get("optimized_metric")
            if metric:
                return str(metric)
    raise ValueError("no optimized_metric in the runs' .hydra/config.yaml: pass --metric")


if __name__ == "__main__":
    main()
