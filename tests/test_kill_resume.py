"""SIGKILL at a random step, the same command again: the run ends bit-identical to an uninterrupted one.

Both stages, CPU fp32, shuffled webdataset shards read by 2 loader workers, a checkpoint every step
(retention: the 3 newest plus last). Compared: every step's training loss and every tensor of the final
checkpoint (weights, optimizer and scheduler states, EMA).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from tests.helpers.config import TINY_SYNTHETIC
from vdm.utils.resume import checkpoint_complete

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10
pytestmark = pytest.mark.slow


class LossLog(L.Callback):
    """Appends ``step loss`` (the exact float) to ``path`` after every training step, flushed at once."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           *args) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step} {float(loss).hex()}\n")
            f.flush()
            os.fsync(f.fileno())


def command(root: Path, synthetic: Path, run: str, extra: list[str]) -> list[str]:
    return [
        sys.executable, str(ROOT / "train.py"),
        f"paths.root_dir={root}", f"synthetic.root={synthetic}",
        *[f"synthetic.{k}={v}" for k, v in TINY_SYNTHETIC.items()],
        f"run_name={run}", "logger=none", "validate=false",
        "data.num_frames=5", "data.height=32", "data.width=32", "data.batch_size=2",
        "data.num_workers=2", "data.batches_per_epoch=4", "data.shuffle_buffer=8", "data.resampled=false",
        f"trainer.max_steps={STEPS}", "trainer.precision=32-true", "trainer.check_val_every_n_epoch=1000",
        "callbacks.model_checkpoint.every_n_train_steps=1", "callbacks.progress_bar.refresh_rate=0",
        "+callbacks.loss_log._target_=tests.test_kill_resume.LossLog",
        f"+callbacks.loss_log.path={root / (run + '.losses')}",
        *extra,
    ]


def losses(path: Path) -> dict[int, str]:
    """Loss per step; a step logged again after the resume keeps its last value."""
    out: dict[int, str] = {}
    for line in path.read_text().splitlines():
        step, value = line.split()
        out[int(step)] = value
    return out


def final_state(root: Path, run: str) -> dict[str, Any]:
    path = root / "logs" / "train" / "runs" / run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == STEPS
    return {k: ckpt[k] for k in ("state_dict", "optimizer_states", "lr_schedulers") if k in ckpt} | {
        "ema": ckpt.get("ema_state_dict")
    }


def assert_equal(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def run(cmd: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def kill_at(cmd: list[str], checkpoints: Path, step: int) -> None:
    """Start ``cmd`` and SIGKILL it as soon as the checkpoint of ``step`` exists."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = checkpoints / f"step{step:07d}.ckpt"
    deadline = time.monotonic() + 600
    while not target.exists():
        assert proc.poll() is None, f"run ended before step {step}: {proc.stderr.read().decode()[-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting for the checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()


@pytest.mark.parametrize(
    ("stage", "kill_step"),
    [("vae", None), ("diffusion", None), ("vae", 4)],  # None: a random step; 4: the last of epoch 0
)
def test_sigkill_then_same_command_equals_uninterrupted(
    stage: str, kill_step: int | None, tmp_path: Path, synthetic_root: Path, vae_export_dir: Path
) -> None:
    extra = ["callbacks.vae_export=null", "callbacks.reconstruction_videos=null", "module.disc_start_step=3"]
    if stage == "diffusion":
        extra = ["stage=diffusion", f"model.vae_export={vae_export_dir}", "callbacks.diffusion_samples=null"]
    kill_step = kill_step or random.Random().randint(2, STEPS - 2)
    run(command(tmp_path, synthetic_root, "reference", extra))

    crashed = command(tmp_path, synthetic_root, "crashed", extra)
    checkpoints = tmp_path / "logs" / "train" / "runs" / "crashed" / "checkpoints"
    kill_at(crashed, checkpoints, kill_step)
    kept = sorted(p.name for p in checkpoints.glob("*.ckpt"))
    # retention: the 3 newest steps plus last, and a 4th step when the kill lands between Lightning writing
    # the new checkpoint and removing the oldest (it removes only after the new one is complete)
    assert "last.ckpt" in kept and 2 <= len(kept) <= 5, kept
    assert all(checkpoint_complete(checkpoints / name) for name in kept), "a kill left a partial checkpoint"
    resume = ["ckpt_path=last"] if stage == "diffusion" else []  # auto (the default) for stage 1
    logged = len((tmp_path / "crashed.losses").read_text().splitlines())
    run(crashed + resume)
    rerun = (tmp_path / "crashed.losses").read_text().splitlines()[logged:]
    first = int(rerun[0].split()[0])
    # auto: the newest complete checkpoint; last: last.ckpt, which the kill may have caught one step behind
    oldest = kill_step + 1 if not resume else kill_step
    assert oldest <= first <= logged + 1, f"killed after step {kill_step}, the rerun started at step {first}"

    reference, resumed = losses(tmp_path / "reference.losses"), losses(tmp_path / "crashed.losses")
    assert sorted(resumed) == list(range(1, STEPS + 1)), f"killed after step {kill_step}"
    assert resumed == reference, f"losses differ after a kill at step {kill_step}"
    assert_equal(final_state(tmp_path, "crashed"), final_state(tmp_path, "reference"), f"kill at {kill_step}")
