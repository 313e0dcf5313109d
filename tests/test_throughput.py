"""Throughput/MFU monitoring: window arithmetic, work from shapes only, logged keys in a real fit."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch

from tests.helpers.modules import latent_batches, make_diffusion_module
from vdm.lightning.throughput import ThroughputMonitor
from vdm.models.flops import dit_flops
from vdm.utils.perf import compute_dtype, measured_matmul_flops, peak_flops, table_peak_flops


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Worker:
    """Stands in for the module: each batch is worth (2 samples, 10 tokens, 1e12 FLOPs)."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.logged: list[dict[str, float]] = []

    def batch_work(self, batch):
        return 2, 10, 1e12

    def log_dict(self, metrics, **kwargs):
        self.logged.append(metrics)


def test_window_rates_mfu_and_data_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr("vdm.lightning.throughput.time.perf_counter", clock)
    monitor = ThroughputMonitor(every_n_steps=4, peak_tflops=2.0, skip_first=1)
    loader = SimpleNamespace(wait_seconds=0.0)
    trainer = SimpleNamespace(global_step=0, precision="32-true", train_dataloader=loader)
    module = Worker()
    monitor.on_train_start(trainer, module)
    assert monitor.peak == 2e12
    for _ in range(9):  # step 0 is skipped; two windows of 4 steps follow
        clock.now += 0.25  # waiting for the batch
        loader.wait_seconds += 0.25
        monitor.on_train_batch_start(trainer, module, {})
        clock.now += 0.75  # the step itself
        monitor.on_train_batch_end(trainer, module)
        trainer.global_step += 1
    assert len(module.logged) == 2
    for metrics in module.logged:  # 4 steps of 1 s each: 8 samples, 40 tokens, 4e12 FLOPs in 4 s
        assert metrics == pytest.approx({
            "perf/samples_per_s": 2.0, "perf/step_s": 1.0, "perf/data_wait": 0.25, "perf/tokens_per_s": 10.0,
            "perf/tflops": 1.0, "perf/mfu": 0.5,
        })


def test_batch_work_reads_shapes_only(vae_export_dir, text_encoder_dir) -> None:
    module = make_diffusion_module(vae_export_dir, text_encoder_dir)
    # meta tensors have shapes but no values: reading one would fail, so nothing can sync either
    batch = {"video": torch.empty(3, 3, 5, 32, 32, device="meta"), "caption": ["a"] * 3}
    samples, tokens, flops = module.batch_work(batch)
    length = module.text_encoder.max_length
    assert samples == 3
    assert tokens == 3 * module.dit.num_tokens((2, 4, 4))
    assert flops == 3 * dit_flops(module.dit, (2, 4, 4), length, training=True)
    latents = {"latent": torch.empty(2, 16, 2, 4, 4, device="meta"),
               "text": torch.empty(2, 7, 64, device="meta")}
    assert module.batch_work(latents)[2] == 2 * dit_flops(module.dit, (2, 4, 4), 7, training=True)


def test_peaks() -> None:
    assert table_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4e12)
    assert table_peak_flops("NVIDIA H100 PCIe", "bf16") == pytest.approx(756e12)
    assert table_peak_flops("NVIDIA A100-SXM4-80GB", "tf32") == pytest.approx(156e12)
    assert table_peak_flops("Some GPU", "bf16") is None
    assert compute_dtype("bf16-mixed") == "bf16" and compute_dtype("16-mixed") == "fp16"
    assert peak_flops(torch.device("cpu"), "32-true", override_tflops=3.5) == 3.5e12
    measured = measured_matmul_flops("cpu", "fp32", size=256, seconds=0.05)
    assert 1e8 < measured < 1e13  # a plausible CPU: 0.1 GFLOP/s to 10 TFLOP/s


def test_logged_in_a_fit(vae_export_dir, text_encoder_dir, tmp_path) -> None:
    module = make_diffusion_module(vae_export_dir, text_encoder_dir)
    logged: list[dict[str, float]] = []

    class Keep(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            logged.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("perf/")})

    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[ThroughputMonitor(every_n_steps=2, skip_first=1), Keep()])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(latent_batches(-1), batch_size=None))
    final = logged[-1]
    assert set(final) == {"perf/samples_per_s", "perf/step_s", "perf/data_wait", "perf/tokens_per_s",
                          "perf/tflops", "perf/mfu"}
    assert 0 < final["perf/mfu"] < 1 and 0 <= final["perf/data_wait"] < 1
    tokens_per_sample = module.dit.num_tokens((2, 4, 4))
    assert final["perf/tokens_per_s"] == pytest.approx(final["perf/samples_per_s"] * tokens_per_sample)
