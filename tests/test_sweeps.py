"""Sweeps: a local Hydra multirun of train.py, and the results table gathered from its runs."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.config import TINY_RUN, TINY_SYNTHETIC
from vdm.utils.sweeps import collect, main, rank, write_tables

REPO = Path(__file__).resolve().parents[1]


def _fake_run(root: Path, job: int, overrides: list[str], metrics: dict[str, float] | None) -> None:
    run = root / str(job)
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"optimized_metric": "val/loss"}))
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps({"metrics": metrics}))


def test_results_are_ranked_with_failed_and_nan_runs_last(tmp_path: Path) -> None:
    _fake_run(tmp_path, 0, ["optimizer.lr=1e-4", "model=dit_tiny"], {"val/loss": 0.9, "val/psnr": 20.0})
    _fake_run(tmp_path, 1, ["optimizer.lr=3e-4", "model=dit_tiny"], {"val/loss": 0.7})
    _fake_run(tmp_path, 2, ["optimizer.lr=1e-3", "model=dit_tiny"], {"val/loss": math.nan})
    _fake_run(tmp_path, 3, ["optimizer.lr=3e-3", "model=dit_tiny"], None)  # died before writing metrics
    _fake_run(tmp_path, 10, ["optimizer.lr=1e-5", "model=dit_s"], {"val/loss": 0.8})
    runs = collect(tmp_path)
    assert [r.run_dir.name for r in runs] == ["0", "1", "2", "3", "10"]
    ranked = rank(runs, "val/loss")
    assert [r.run_dir.name for r in ranked[:3]] == ["1", "10", "0"]
    assert [r.run_dir.name for r in rank(runs, "val/loss", "max")[:3]] == ["0", "10", "1"]
    csv_path, md_path = write_tables(ranked, "val/loss", tmp_path)
    rows = list(csv.DictReader(csv_path.open()))
    assert [row["run"] for row in rows] == ["1", "10", "0", "2", "3"]
    assert rows[0]["val/loss"] == "0.7" and rows[0]["overrides"] == "optimizer.lr=3e-4 model=dit_tiny"
    assert rows[2]["val/psnr"] == "20" and rows[-1]["status"] == "failed"
    table = md_path.read_text().splitlines()
    assert table[0] == "| rank | run | status | val/loss | val/psnr | overrides |" and len(table) == 7
    with pytest.raises(KeyError, match="no run logged 'val/fvd'; logged metrics: val/loss, val/psnr"):
        rank(runs, "val/fvd")


STAGE1_CALLBACKS = ("vae_export", "reconstruction_videos", "reconstruction_fvd")


def _sweep(
    tmp_path: Path, synthetic_root: Path, sweep_dir: Path, *sweep: str, stage_callbacks=STAGE1_CALLBACKS
) -> None:
    """Run ``train.py`` with ``sweep`` overrides on the tiny config (no callbacks) into ``sweep_dir``."""
    corpus = [f"synthetic.root={synthetic_root}"] + [f"synthetic.{k}={v}" for k, v in TINY_SYNTHETIC.items()]
    tiny = [*TINY_RUN, "trainer.max_steps=2", "callbacks=none"]
    command = [sys.executable, "train.py", *sweep, f"paths.root_dir={tmp_path}", *corpus, *tiny]
    command += [f"callbacks.{name}=null" for name in stage_callbacks] + [f"hydra.sweep.dir={sweep_dir}"]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


def test_local_multirun_sweep_then_results_table(tmp_path: Path, synthetic_root: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    _sweep(tmp_path, synthetic_root, sweep_dir, "-m", "optimizer.lr=1e-4,3e-4")
    main([str(sweep_dir)])
    rows = list(csv.DictReader((sweep_dir / "results.csv").open()))
    assert sorted(row["overrides"].split()[0] for row in rows) == [
        "optimizer.lr=0.0001",
        "optimizer.lr=0.0003",
    ]
    losses = [float(row["val/loss"]) for row in rows]
    assert losses == sorted(losses) and all(row["status"] == "ok" for row in rows)


def test_optuna_search_optimizes_the_metric_train_returns(tmp_path: Path, synthetic_root: Path) -> None:
    sweep_dir = tmp_path / "optuna"
    search = ["hparams_search=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.n_startup_trials=2"]
    _sweep(tmp_path, synthetic_root, sweep_dir, *search)
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    losses = [r.metrics["val/loss"] for r in collect(sweep_dir)]
    assert len(losses) == 3 and best["best_value"] == pytest.approx(min(losses), rel=1e-6)
    # data.batch_size is searched too, but fixed here by the command line (TINY_RUN), which optuna respects
    assert set(best["best_params"]) == {"optimizer.lr", "optimizer.weight_decay"}


def test_stage_two_sweep_over_learning_rates_and_model_sizes(
    tmp_path: Path, synthetic_root: Path, vae_export_dir: Path
) -> None:
    sweep_dir = tmp_path / "stage2"
    stage2 = ["stage=diffusion", f"model.vae_export={vae_export_dir}"]
    sweep = ["-m", "optimizer.lr=1e-4,3e-4", "model=dit_tiny,dit_s", *stage2]
    _sweep(tmp_path, synthetic_root, sweep_dir, *sweep,
           stage_callbacks=("diffusion_samples", "generation_metrics"))
    main([str(sweep_dir)])
    rows = list(csv.DictReader((sweep_dir / "results.csv").open()))
    assert len(rows) == 4 and all(row["status"] == "ok" for row in rows)
    assert {tuple(sorted(row["overrides"].split()[:2])) for row in rows} == {
        (f"model={m}", f"optimizer.lr={lr}") for m in ("dit_s", "dit_tiny") for lr in ("0.0001", "0.0003")
    }
