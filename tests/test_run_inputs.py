"""What a run settles before its config is checked: ``trainer.precision=auto``, the synthetic corpus's prompt
files, and a stage-2 ``model.vae_export`` named as ``latest``, a run name, a run directory or an export."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from vdm.config.rules import ConfigError
from vdm.utils.runtime import cpu_has_native_bf16, resolve_precision
from vdm.utils.vae_export import ExportError, resolve_vae_export


def _copy_export(export: Path, run_dir: Path) -> Path:
    target = run_dir / "vae_export"
    shutil.copytree(export, target)
    return target


def test_vae_export_by_path_run_dir_run_name_and_latest(tmp_path: Path, vae_export_dir: Path) -> None:
    logs = tmp_path / "logs"
    older = _copy_export(vae_export_dir, logs / "train" / "runs" / "first")
    newer = _copy_export(vae_export_dir, logs / "pipeline" / "runs" / "second")
    stamp = time.time()
    os.utime(older / "export.json", (stamp - 100, stamp - 100))
    os.utime(newer / "export.json", (stamp, stamp))
    assert resolve_vae_export(older, logs)[0] == older.resolve()
    assert resolve_vae_export(older.parent, logs)[0] == older.resolve()
    assert resolve_vae_export("first", logs)[0] == older.resolve()
    path, how = resolve_vae_export("latest", logs)
    assert path == newer.resolve() and "newest" in how
    # an incomplete export (a file missing) is never picked, and a wrong name says what it accepts
    (newer / "latent_stats.json").unlink()
    assert resolve_vae_export("latest", logs)[0] == older.resolve()
    with pytest.raises(ExportError, match="not an export directory, a run directory with vae_export/"):
        resolve_vae_export("no_such_run", logs)
    with pytest.raises(ExportError, match="no VAE export under"):
        resolve_vae_export("latest", tmp_path / "empty")


def test_stage2_run_takes_the_newest_export_and_says_so(
    tiny_train_cfg, tmp_path: Path, vae_export_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from vdm.lightning.run import resolve_run_inputs

    export = _copy_export(vae_export_dir, tmp_path / "logs" / "train" / "runs" / "stage1")
    cfg = tiny_train_cfg("stage=diffusion", "model.vae_export=latest")
    with caplog.at_level("INFO"):
        resolve_run_inputs(cfg)
    assert cfg.model.vae_export == str(export.resolve())
    assert cfg.module.vae_export == str(export.resolve())  # the module follows by interpolation
    assert any("VAE export" in r.getMessage() and "newest" in r.getMessage() for r in caplog.records)
    # the synthetic corpus's prompt files fill the unset prompt keys
    assert cfg.heldout_prompts_file.endswith("prompts_heldout.txt")
    assert cfg.eval_prompts_file.endswith("prompts_eval.jsonl")


def test_latest_without_any_export_fails_before_training(tiny_train_cfg) -> None:
    from vdm.lightning.run import resolve_run_inputs

    cfg = tiny_train_cfg("stage=diffusion", "model.vae_export=latest")
    with pytest.raises(ConfigError, match="no VAE export under"):
        resolve_run_inputs(cfg)


def test_auto_precision() -> None:
    assert resolve_precision("32-true", "cpu") == "32-true"
    expected = "bf16-mixed" if cpu_has_native_bf16() else "32-true"
    assert resolve_precision("auto", "cpu") == expected
