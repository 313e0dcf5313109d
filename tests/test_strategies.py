"""Stage 2 trains the same under DDP and DeepSpeed ZeRO-2/3 (2 processes) as in one process; resumes exactly.

Each run is ``tests/dist_strategy_check.py`` in a subprocess (its own session, killed as a group on time-out):
multi-process Lightning re-launches the script it was started from, and DeepSpeed needs ``DS_ACCELERATOR=cpu``
before its first import. Runs are cached for the module, so every configuration trains once.

The tiny DiT trains 8 steps, global batch 4 (one process x 4, or two x 2), on 16 fixed latent samples read
in order; a ``ModelCheckpoint`` saves at step 4, the end of the first epoch (a plain DataLoader restarts its
epoch on resume, so only an epoch-end checkpoint can resume exactly). AdamW, warmup + cosine, caption dropout,
EMA, and gradient clipping at 0.38, which clips steps 2, 3, 4, 6 and 8 and not 1, 5, 7.

Measured on the 2-core CPU machine (torch 2.13, DeepSpeed 0.19.8): per-step global losses of ddp/zero2/zero3
within 1.2e-7 (relative) of the single process, grad norms within 1e-7, final DiT and EMA weights within
1.2e-7 (absolute, weights of magnitude <= 1); resumed runs are bitwise equal to uninterrupted ones. Negative
controls: draws from the global RNG instead of per-sample generators move the losses by up to 8e-2 and the
weights by 2e-2; an EMA not restored on resume moves the EMA by 5e-3; DeepSpeed without gradient clipping
moves the DiT weights by 1.6e-4 (so the weight tolerance, 2e-6, tells clipping apart).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from vdm.utils.checkpoints import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve().parent / "dist_strategy_check.py"
STEPS, SAVE_AT, GRAD_CLIP = 8, 4, 0.38
DEVICES = {"single": 1, "ddp": 2, "zero2": 2, "zero3": 2}
LOSS_RTOL = 1e-5  # measured <= 1.2e-7
WEIGHT_ATOL = 2e-6  # measured <= 1.2e-7; no clipping under DeepSpeed: 1.6e-4
TIMEOUT_S = 300  # a first DeepSpeed run on a fresh venv also builds its CPU communication op (~35 s)

pytestmark = pytest.mark.distributed


@dataclass
class Run:
    """What one invocation of the script wrote."""

    out: Path
    result: dict
    weights: dict[str, dict[str, torch.Tensor]]

    def losses(self, steps: list[str]) -> torch.Tensor:
        return torch.tensor([self.result["steps"][s]["loss"] for s in steps], dtype=torch.float64)

    def grad_norms(self, steps: list[str]) -> torch.Tensor:
        return torch.tensor([self.result["steps"][s]["grad_norm"] for s in steps], dtype=torch.float64)

    def keys(self, steps: list[str]) -> list[list[str]]:
        return [self.result["steps"][s]["keys"] for s in steps]


def run_script(out: Path, strategy: str, *args: str, vae: Path, text: Path) -> Run:
    """Run the script (all its processes) to completion; a SIGABRT at interpreter exit (gloo teardown, see
    STACK.md) is tolerated only when every rank has reported that it finished."""
    out.mkdir(parents=True)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), "--strategy", strategy, "--vae-export", str(vae), "--text-encoder",
           str(text), "--out", str(out), "--steps", str(STEPS), "--grad-clip", str(GRAD_CLIP), *args]
    proc = subprocess.Popen(cmd, env=env, cwd=out, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)  # returns once every process holding the pipe has exited
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"{strategy} run timed out after {TIMEOUT_S} s:\n{log[-4000:]}")
    done = all((out / f"done_rank{r}").exists() for r in range(DEVICES[strategy]))
    aborted_at_exit = proc.returncode in (-signal.SIGABRT, 128 + signal.SIGABRT) and done
    assert (proc.returncode == 0 or aborted_at_exit) and done, f"{strategy} run failed:\n{log[-6000:]}"
    return Run(out, json.loads((out / "result.json").read_text()),
               torch.load(out / "weights.pt", weights_only=True))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, vae_export_dir: Path, text_encoder_dir: Path):
    """``runs(strategy, resumed=False, fault="none")``: a run, made once per module."""
    cache: dict[tuple[str, bool, str], Run] = {}

    def get(strategy: str, resumed: bool = False, fault: str = "none") -> Run:
        key = (strategy, resumed, fault)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{strategy}_{'resumed' if resumed else 'straight'}_{fault}")
            args = ["--fault", fault]
            if resumed:  # from the uninterrupted run's step-4 checkpoint (written by its ModelCheckpoint)
                args += ["--resume-from", str(checkpoint(get(strategy), SAVE_AT))]
            else:
                args += ["--save-at", str(SAVE_AT)]
            cache[key] = run_script(out / "run", strategy, *args, vae=vae_export_dir, text=text_encoder_dir)
        return cache[key]

    return get


def checkpoint(run: Run, step: int) -> Path:
    return run.out / "checkpoints" / f"step{step:04d}.ckpt"


def all_steps(first: int = 1) -> list[str]:
    return [str(s) for s in range(first, STEPS + 1)]


def assert_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float | None,
                   what: str) -> None:
    """Equal keys and values: within ``atol`` (absolute), or bitwise with ``atol=None``."""
    assert sorted(actual) == sorted(expected), what
    for name, value in expected.items():
        if atol is None:
            assert torch.equal(actual[name], value), f"{what}: {name} differs"
        else:
            torch.testing.assert_close(actual[name], value, rtol=0.0, atol=atol,
                                       msg=lambda m, name=name: f"{what} {name}: {m}")


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3"])
def test_two_processes_train_like_one(runs, strategy: str) -> None:
    single, multi = runs("single"), runs(strategy)
    assert multi.result["world_size"] == 2 and multi.result["batch_size"] == 2
    assert single.result["world_size"] == 1 and single.result["batch_size"] == 4
    steps = all_steps()
    assert multi.keys(steps) == single.keys(steps)  # the same global batch at every step
    assert single.keys(["1"]) == [["s000", "s001", "s002", "s003"]]
    torch.testing.assert_close(multi.losses(steps), single.losses(steps), rtol=LOSS_RTOL, atol=0.0)
    # the same global gradient (DDP: the module's log; DeepSpeed: its engine's norm), clipped the same way
    norms = single.grad_norms(steps)
    assert (norms > GRAD_CLIP).any() and (norms < GRAD_CLIP).any(), "the run should clip some steps, not all"
    torch.testing.assert_close(multi.grad_norms(steps), norms, rtol=LOSS_RTOL, atol=0.0)
    assert multi.result["ema_updates"] == single.result["ema_updates"] == STEPS
    assert_weights(multi.weights["dit"], single.weights["dit"], WEIGHT_ATOL, f"{strategy} DiT")
    assert_weights(multi.weights["ema"], single.weights["ema"], WEIGHT_ATOL, f"{strategy} EMA")


@pytest.mark.parametrize("strategy", ["single", "ddp", "zero2", "zero3"])
def test_final_checkpoint_holds_the_trained_weights(runs, strategy: str) -> None:
    """``load_checkpoint`` of the run's last ``trainer.save_checkpoint`` (a DeepSpeed directory consolidated
    to fp32, or a Lightning file) gives exactly the weights the run ended with, EMA included."""
    run = runs(strategy)
    loaded = load_checkpoint(run.out / "final.ckpt")
    assert loaded.format == ("lightning" if strategy in ("single", "ddp") else "deepspeed")
    assert loaded.meta["global_step"] == STEPS
    if loaded.format == "deepspeed":
        assert loaded.meta["deepspeed"]["world_size"] == 2
        assert loaded.meta["deepspeed"]["zero_stage"] == int(strategy[-1])
    state = loaded.state_dict
    dit = {k.removeprefix("dit."): v for k, v in state.items() if k.startswith("dit.")}
    ema_prefix = "ema.averaged.module."
    ema = {k.removeprefix(ema_prefix): v for k, v in state.items() if k.startswith(ema_prefix)}
    assert_weights(dit, run.weights["dit"], None, f"{strategy} checkpoint DiT")
    assert_weights(ema, run.weights["ema"], None, f"{strategy} checkpoint EMA")
    assert int(state["ema.averaged.n_averaged"]) == STEPS
    assert checkpoint(run, SAVE_AT).exists()


@pytest.mark.parametrize("strategy", ["single", "ddp", "zero2", "zero3"])
def test_resume_continues_exactly(runs, strategy: str) -> None:
    """From the step-4 checkpoint, in a new process: steps 5-8 and the final DiT and EMA weights are bitwise
    those of the uninterrupted run."""
    straight, resumed = runs(strategy), runs(strategy, resumed=True)
    assert resumed.result["start_step"] == SAVE_AT and resumed.result["end_step"] == STEPS
    steps = all_steps(SAVE_AT + 1)
    assert sorted(resumed.result["steps"]) == sorted(steps)
    assert resumed.keys(steps) == straight.keys(steps)
    assert torch.equal(resumed.losses(steps), straight.losses(steps))
    assert resumed.result["ema_updates"] == STEPS
    assert_weights(resumed.weights["dit"], straight.weights["dit"], None, f"{strategy} resumed DiT")
    assert_weights(resumed.weights["ema"], straight.weights["ema"], None, f"{strategy} resumed EMA")


def test_comparisons_detect_broken_per_sample_draws_and_ema_restore(runs) -> None:
    """Negative controls: the tolerances above tell real faults apart."""
    single, broken = runs("single"), runs("ddp", fault="global-rng")  # rank-dependent noise and times
    steps = all_steps()
    assert broken.keys(steps) == single.keys(steps)
    assert not torch.allclose(broken.losses(steps), single.losses(steps), rtol=100 * LOSS_RTOL, atol=0.0)
    diff = max((broken.weights["dit"][k] - v).abs().max().item() for k, v in single.weights["dit"].items())
    assert diff > 100 * WEIGHT_ATOL
    forgetful = runs("single", resumed=True, fault="no-ema-restore")  # resumes the DiT, not its EMA
    assert_weights(forgetful.weights["dit"], single.weights["dit"], None, "DiT")
    assert forgetful.result["ema_updates"] == STEPS - SAVE_AT
    diff = max((forgetful.weights["ema"][k] - v).abs().max().item() for k, v in single.weights["ema"].items())
    assert diff > 100 * WEIGHT_ATOL
