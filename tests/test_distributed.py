"""Real multi-process runs on CPU (gloo): the data pipeline under 2 ranks x 2 workers, and a DDP fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.shards import video_item, write_corpus

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _uneven_corpus(root: Path) -> Path:
    """Train shards of 7, 2 and 1 clips; val shards of 5 and 2 clips (all 9 frames, 32 px)."""
    def shard(prefix: str, n: int) -> list:
        return [video_item(f"{prefix}-{i}.mp4", frames=9, seed=i) for i in range(n)]

    write_corpus(root, {"train": [shard("a", 7), shard("b", 2), shard("c", 1)],
                        "val": [shard("v", 5), shard("w", 2)]})
    return root


def _run(cmd: list[str], timeout: float, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd[:6])}... exited {proc.returncode}\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def test_two_ranks_two_workers_see_every_val_sample_once_and_equal_batches(tmp_path):
    root = _uneven_corpus(tmp_path / "corpus")
    out = tmp_path / "report.json"
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
          str(ROOT / "tests" / "dist_data_check.py"), str(root), str(out)], timeout=240)
    reports = json.loads(out.read_text())
    assert [r["rank"] for r in reports] == [0, 1]
    assert reports[0]["train_batches"] == reports[1]["train_batches"] > 0
    assert reports[0]["val_batches"] == reports[1]["val_batches"]
    seen = sorted(k for r in reports for k in r["val_keys"])
    expected = sorted(video_item(f"{p}-{i}.mp4").key for p, n in (("v", 5), ("w", 2)) for i in range(n))
    assert seen == expected, "every validation sample exactly once across ranks and workers"
    # a checkpoint holds both ranks' stream positions; each rank resumes its own stream exactly
    assert [r["state_ranks"] for r in reports] == [2, 2]
    for r in reports:
        assert r["resumed_train_keys"] == r["train_keys"]
    assert reports[0]["train_keys"] != reports[1]["train_keys"]


def test_ddp_fit_on_uneven_shards_finishes_on_both_ranks(tmp_path):
    root = _uneven_corpus(tmp_path / "corpus")
    run_dir = tmp_path / "run"
    _run([sys.executable, "train.py", "data=shards", f"corpus.root={root}", "strategy=ddp",
          "trainer.devices=2", f"paths.root_dir={tmp_path}", f"hydra.run.dir={run_dir}", "logger=csv",
          "data.num_frames=5", "data.height=32", "data.width=32", "data.batch_size=2",
          "data.val_batch_size=2",
          "data.num_workers=2", "data.frame_stride=1", "trainer.max_steps=6", "trainer.log_every_n_steps=1",
          "callbacks.model_checkpoint.every_n_train_steps=3", "callbacks.progress_bar.refresh_rate=0",
          "module.warmup_steps=1", "module.disc_start_step=3"], timeout=400)
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 6
    assert (run_dir / "config_resolved.yaml").exists()
    assert (run_dir / "vae_export" / "export.json").exists(), "rank 0 exports while rank 1 waits"
    assert any(k.startswith("discriminator.") for k in last["state_dict"])
