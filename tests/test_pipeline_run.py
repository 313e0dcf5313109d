"""``python pipeline.py``: a tiny text-to-video pipeline (stage 1, stage 2 on its export, evaluation) end
to end, then the same command killed with SIGKILL in each stage and rerun: the final scores, videos and
weights equal those of the uninterrupted run, and finished stages are not run again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# 24 + 8 videos of 9 frames at 32x32 (the VAE preset's 8x / 2x compression: latents 5 x 4 x 4)
CORPUS = ["synthetic.num_train=24", "synthetic.num_val=8", "synthetic.height=32", "synthetic.width=32",
          "synthetic.keyframe_interval=4"]
COMMON = ["logger=none", "trainer.precision=32-true", "callbacks.progress_bar.refresh_rate=0",
          "callbacks.model_checkpoint.every_n_train_steps=1", "data.num_workers=0", "data.val_batches=2"]
VAE = [*CORPUS, *COMMON, "trainer.max_steps=6", "data.batch_size=2", "data.batches_per_epoch=4",
       "callbacks.vae_export.num_clips=8", "module.warmup_steps=2"]
DIT = [*CORPUS, *COMMON, "trainer.max_steps=6", "data.batch_size=4", "data.val_batch_size=4",
       "data.batches_per_epoch=4", "model.dit.hidden_size=32", "model.dit.depth=1", "model.dit.num_heads=2",
       "module.warmup_steps=2", "callbacks.attribute_metrics.every_n_steps=3",
       "callbacks.attribute_metrics.num_prompts=4", "callbacks.attribute_metrics.num_steps=2"]
EVAL = ["generation.num_steps=2", "generation.batch_size=8", "generation.max_prompts=12",
        "generation.videos_per_prompt=2"]


def command(run: str) -> list[str]:
    quoted = lambda items: "[" + ",".join(json.dumps(i) for i in items) + "]"  # noqa: E731
    return [sys.executable, str(ROOT / "pipeline.py"), f"run_name={run}", f"vae.extra={quoted(VAE)}",
            f"diffusion.extra={quoted(DIT)}", f"evaluate.extra={quoted(EVAL)}"]


def run_pipeline(root: Path, run: str, kill_when: Path | None = None) -> subprocess.CompletedProcess | None:
    """Run the pipeline with ``VDM_ROOT=root``; with ``kill_when``, SIGKILL the pipeline process (alone:
    its stage dies with it) as soon as that file exists, and return None."""
    env = {**os.environ, "VDM_ROOT": str(root), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    if kill_when is None:
        return subprocess.run(command(run), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    log = open(root / f"{run}.log", "a")
    proc = subprocess.Popen(command(run), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while not kill_when.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"the pipeline ended before {kill_when} appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(1.0)  # the stage's process gets SIGKILL from the kernel when its parent dies
    return None


def final(root: Path, run: str) -> tuple[dict, dict, dict[str, bytes]]:
    out = root / "logs" / "pipeline" / "runs" / run
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())["metrics"]
    ckpt = torch.load(out / "diffusion" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    videos = {p.name: p.read_bytes() for p in sorted((out / "evaluate" / "videos").glob("*.mp4"))}
    return metrics, ckpt["state_dict"], videos


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple]:
    root = tmp_path_factory.mktemp("pipeline")
    result = run_pipeline(root, "ref")
    assert result is not None and result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "report: " in result.stdout and "attribute accuracy over 24 videos" in result.stdout
    return root, final(root, "ref")


def test_pipeline_runs_both_stages_and_scores_heldout_prompts(reference: tuple[Path, tuple]) -> None:
    root, (metrics, _, videos) = reference
    out = root / "logs" / "pipeline" / "runs" / "ref"
    assert len(videos) == 24  # 12 held-out prompts x 2 videos
    assert {"attr/all", "attr_heldout/all", "attr/background", "attr/shape"} <= set(metrics)
    assert (out / "evaluate" / "report.html").is_file()
    # stage 2 used stage 1's export (linked by the pipeline) and built its latents from the same corpus
    stored = json.loads((out / "diffusion" / "checkpoints").parent.joinpath("metrics.json").read_text())
    assert "metrics" in stored
    config = (out / "diffusion" / "config_resolved.yaml").read_text()
    assert str(out / "vae" / "vae_export") in config
    # the attribute hook logged during stage 2 (every 3 steps, 4 prompts)
    assert (out / "diffusion" / "latents" / "manifest.json").is_file()
    # evaluate.py needs nothing but the checkpoint: stage, model, VAE export, text encoder and prompts come
    # from the config stored in it
    env = {**os.environ, "VDM_ROOT": str(root), "WANDB_MODE": "disabled"}
    alone = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"),
         f"ckpt_path={out / 'diffusion' / 'checkpoints' / 'last.ckpt'}", "generation.max_prompts=4",
         "generation.num_steps=2", f"hydra.run.dir={root / 'alone'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert alone.returncode == 0, alone.stderr[-3000:]
    scored = json.loads((root / "alone" / "metrics.json").read_text())
    assert scored["metrics"]["attr/num_videos"] == 4
    assert scored["protocol"]["attributes"]["version"] >= 1
    # a second run of the same command redoes nothing and prints the same scores
    again = run_pipeline(root, "ref")
    assert again is not None and again.returncode == 0
    assert "nothing (all stages done)" in again.stdout
    assert final(root, "ref")[0] == metrics


@pytest.mark.parametrize("stage,marker", [
    ("vae", "vae/checkpoints/step0000003.ckpt"),
    ("diffusion", "diffusion/checkpoints/step0000003.ckpt"),
    ("evaluate", "evaluate/videos/p0004_s00.mp4"),
])
def test_sigkill_in_each_stage_then_rerun_gives_the_same_result(
    reference: tuple[Path, tuple], tmp_path: Path, stage: str, marker: str
) -> None:
    _, (want_metrics, want_weights, want_videos) = reference
    run_pipeline(tmp_path, "cut", kill_when=tmp_path / "logs" / "pipeline" / "runs" / "cut" / marker)
    result = run_pipeline(tmp_path, "cut")
    assert result is not None and result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics, weights, videos = final(tmp_path, "cut")
    assert metrics == want_metrics
    assert videos == want_videos
    assert weights.keys() == want_weights.keys()
    for key, value in want_weights.items():
        assert torch.equal(weights[key], value), key
