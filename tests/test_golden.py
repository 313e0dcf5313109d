"""Golden losses: the first 50 training losses of the tiny configuration of each stage, on CPU in fp32.

Any change to the models, objectives, data pipeline, seeding or optimizer that moves a loss by more than
1e-5 fails here. The runs use one intra-op thread, so the numbers do not depend on the core count; they do
depend on the CPU's vector kernels (AVX2 and AVX-512 round differently, and 50 steps amplify the last bits),
so each kernel family has its own file, ``<stage>_losses.<capability>.json``. After an intended change,
regenerate the files (on a machine of each kind) and review the diff:

    VDM_WRITE_GOLDEN=1 python -m pytest tests/test_golden.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import pytest

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
STEPS = 50
# fixed, corpus-independent settings: no validation, no checkpoints, one loader worker
GOLDEN_RUN = [
    f"trainer.max_steps={STEPS}",
    "trainer.check_val_every_n_epoch=1000",
    "validate=false",
    "data.num_workers=0",
]


class LossRecorder(L.Callback):
    """Collects the loss every training step returns (rank 0), as plain floats."""

    losses: list[float] = []

    def __init__(self) -> None:
        LossRecorder.losses = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           *args) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        LossRecorder.losses.append(float(loss))


def _overrides(stage: str, vae_export: Path | None) -> list[str]:
    recorder = ["+callbacks.golden._target_=tests.test_golden.LossRecorder"]
    if stage == "vae":
        return [*GOLDEN_RUN, *recorder, "callbacks.vae_export=null", "callbacks.reconstruction_videos=null",
                "callbacks.reconstruction_fvd=null", "module.disc_start_step=20"]
    return [*GOLDEN_RUN, *recorder, "stage=diffusion", f"model.vae_export={vae_export}",
            "callbacks.diffusion_samples=null", "callbacks.generation_metrics=null"]


def record(make_cfg: Any, stage: str, vae_export: Path | None) -> list[float]:
    import torch

    from train import train

    # one thread: a kernel's summation order (and so the last bits, which 50 steps amplify) must not
    # depend on how many cores the machine has
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(make_cfg(*_overrides(stage, vae_export)))
    finally:
        torch.set_num_threads(threads)
    assert len(LossRecorder.losses) == STEPS
    return list(LossRecorder.losses)


@pytest.mark.parametrize("stage", ["vae", "diffusion"])
def test_first_fifty_losses_match_the_golden_file(stage, tiny_train_cfg, vae_export_dir):
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    path = GOLDEN_DIR / f"{stage}_losses.{capability}.json"
    losses = record(tiny_train_cfg, stage, vae_export_dir)
    if os.environ.get("VDM_WRITE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"steps": STEPS, "overrides": _overrides(stage, None), "losses": losses},
                                   indent=1) + "\n")
        pytest.skip(f"wrote {path}")
    if not path.is_file():
        recorded = sorted(p.name for p in GOLDEN_DIR.glob(f"{stage}_losses.*.json"))
        pytest.fail(f"no golden losses for {capability} kernels (recorded: {recorded}); write them with "
                    "VDM_WRITE_GOLDEN=1 and review them against the others")
    golden = json.loads(path.read_text())
    assert len(golden["losses"]) == STEPS
    worst = max(abs(a - b) for a, b in zip(losses, golden["losses"]))
    assert losses == pytest.approx(golden["losses"], abs=1e-5, rel=0), f"largest difference {worst:.3g}"
