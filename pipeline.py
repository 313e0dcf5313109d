"""Train a text-to-video model end to end: ``python pipeline.py [run_name=NAME] [overrides...]`` (see README).

Runs stage 1 (the VAE), stage 2 (the latent DiT on that VAE's export) and the evaluation of the held-out
prompts, each as its own ``train.py`` / ``evaluate.py`` run in ``logs/pipeline/runs/<run_name>/{vae,
diffusion,evaluate}``, then prints where the report is and the headline scores. Rerunning the same command
continues where it stopped: a finished stage (its ``metrics.json`` written) is not run again, a stage cut
short resumes from its newest complete checkpoint (exactly, as ``train.py`` does), and the evaluation keeps
the videos it already wrote.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

log = logging.getLogger("vdm.pipeline")

REPO = Path(__file__).resolve().parent
STAGES = ("vae", "diffusion", "evaluate")
HEADLINE = (("background", "background"), ("color", "colour"), ("shape", "shape"), ("motion", "motion"),
            ("speed", "speed"), ("count", "count"), ("all", "all correct"))


def _die_with_parent() -> None:
    """Child processes get SIGKILL when the pipeline dies (Linux), so a killed pipeline leaves no stage
    running on its own; rerunning the command then resumes that stage."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def stage_command(cfg: DictConfig, stage: str, run_dir: Path) -> list[str]:
    """The command line of one stage: its script, the recipe's overrides, then the links between stages."""
    spec = cfg[stage]
    links = [f"hydra.run.dir={run_dir / stage}"]
    if stage == "diffusion":
        links.append(f"model.vae_export={run_dir / 'vae'}")
    if stage == "evaluate":
        links.append(f"ckpt_path={run_dir / 'diffusion' / 'checkpoints' / 'last.ckpt'}")
    script = "evaluate.py" if stage == "evaluate" else "train.py"
    return [sys.executable, str(REPO / script), *spec.overrides, *spec.extra, *links]


def run_stage(cfg: DictConfig, stage: str, run_dir: Path) -> float:
    """Run one stage unless its ``metrics.json`` exists; returns the seconds it took (0 when skipped)."""
    done = run_dir / stage / "metrics.json"
    if done.is_file():
        log.info("%s: finished earlier (%s)", stage, done)
        return 0.0
    command = stage_command(cfg, stage, run_dir)
    resumed = (run_dir / stage).is_dir()
    log.info("%s: %s%s", stage, "resuming " if resumed else "", " ".join(command[1:]))
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, preexec_fn=_die_with_parent, check=False)
    if result.returncode != 0:
        raise SystemExit(
            f"pipeline stage {stage} failed (exit {result.returncode}); see {run_dir / stage}. "
            "Rerunning the same command resumes it."
        )
    if not done.is_file():
        raise SystemExit(f"pipeline stage {stage} ended without writing {done}")
    seconds = time.perf_counter() - start
    log.info("%s: done in %.1f min", stage, seconds / 60)
    return seconds


def headline(metrics: dict[str, Any]) -> str:
    """Attribute accuracies as a text table: rows attributes, columns all / seen / held-out prompts."""
    columns = [(p, name) for p, name in (("attr", "all"), ("attr_seen", "seen"), ("attr_heldout", "held-out"))
               if any(f"{p}/{k}" in metrics for k, _ in HEADLINE)]
    if not columns:
        return "  (no attribute scores: the prompts carry no scene attributes)"
    lines = ["  " + "".join(f"{h:>13}" for h in ["", *(name for _, name in columns)])]
    for key, label in HEADLINE:
        cells = [metrics.get(f"{p}/{key}") for p, _ in columns]
        if all(c is None for c in cells):
            continue
        row = "".join(f"{'-':>13}" if c is None else f"{c:>13.1%}" for c in cells)
        lines.append(f"  {label:>13}{row}")
    return "\n".join(lines)


def summary(run_dir: Path, seconds: dict[str, float]) -> str:
    """What a user reads at the end: the report's path, the scores and the time each stage took."""
    result = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    metrics, protocol = result["metrics"], result.get("protocol", {})
    videos = protocol.get("num_videos", "?")
    ran = ", ".join(f"{s} {t / 60:.1f} min" for s, t in seconds.items() if t > 0)
    ran = ran or "nothing (all stages done)"
    other = {k: v for k, v in metrics.items() if not k.startswith("attr")}
    lines = [
        f"report: {run_dir / 'evaluate' / 'report.html'}",
        f"attribute accuracy over {videos} videos (checkpoint step {protocol.get('global_step', '?')}):",
        headline(metrics),
    ]
    lines += [f"  {k}: {v:.4f}" for k, v in sorted(other.items()) if isinstance(v, float)]
    lines.append(f"this run: {ran}")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="conf", config_name="pipeline")
def main(cfg: DictConfig) -> None:
    run_dir = Path(cfg.paths.output_dir)
    seconds = {stage: run_stage(cfg, stage, run_dir) for stage in STAGES}
    print(summary(run_dir, seconds), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "offline")
    main()
