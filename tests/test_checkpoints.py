"""Checkpoint loading/export (vdm.utils.checkpoints) and DeepSpeed on CPU (vdm.lightning.strategies).

DeepSpeed runs in a subprocess (this file run as a script, ``ds-worker`` mode): ``DS_ACCELERATOR=cpu`` must be
set before deepspeed is first imported, DeepSpeed's accelerator choice and process group are process-wide,
and multi-process Lightning re-launches the script it was started from.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from vdm.utils.checkpoints import (
    CheckpointError,
    LoadedCheckpoint,
    UnsafeCheckpointError,
    checkpoint_hash,
    load_checkpoint,
    main,
    save_export,
)

REPO = Path(__file__).resolve().parents[1]


class TinyModule(L.LightningModule):
    """Two trained Linears, a frozen copy (like EMA weights) and int/float buffers."""

    def __init__(self, hidden: int = 8, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.a = nn.Linear(4, hidden)
        self.b = nn.Linear(hidden, 1)
        self.frozen = nn.Linear(4, hidden).requires_grad_(False)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("scale", torch.full((3,), 0.5))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.steps += 1
        return nn.functional.mse_loss(self.b(torch.relu(self.a(x))), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["vdm_config"] = {"model": {"hidden": self.hparams.hidden}, "seed": 0}
        checkpoint["vae_hash"] = "0123abcd"


def tiny_loader() -> torch.utils.data.DataLoader:
    """One batch per epoch (per rank): every step sees the same data, so a resumed run can match an
    uninterrupted one exactly (Lightning restarts the data iterator on resume)."""
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g))
    return torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)


def tiny_trainer(max_steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


def assert_state_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert torch.equal(actual[key], value), key


class Payload:
    """Pickles as a call to os.system: what a weights_only=False load would execute."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


# -- Lightning .ckpt and safetensors ------------------------------------------------------------------------


@pytest.fixture
def lightning_ckpt(tmp_path: Path) -> tuple[Path, TinyModule]:
    L.seed_everything(0)
    module = TinyModule()
    trainer = tiny_trainer(max_steps=3)
    trainer.fit(module, tiny_loader())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    return path, module


def test_lightning_ckpt_round_trip(lightning_ckpt: tuple[Path, TinyModule], tmp_path: Path) -> None:
    from safetensors import safe_open

    path, module = lightning_ckpt
    loaded = load_checkpoint(path)
    assert loaded.format == "lightning"
    assert loaded.sha256 == checkpoint_hash(path)
    assert_state_equal(loaded.state_dict, module.state_dict())
    assert int(loaded.state_dict["steps"]) == 3
    assert loaded.meta["vdm_config"] == {"model": {"hidden": 8}, "seed": 0}
    assert loaded.meta["vae_hash"] == "0123abcd"
    raw = torch.load(path, weights_only=True)
    assert loaded.meta["global_step"] == raw["global_step"] == 3
    assert loaded.meta["epoch"] == raw["epoch"]
    assert loaded.meta["hyper_parameters"] == {"hidden": 8, "lr": 1e-2}

    export = save_export(loaded, tmp_path / "out" / "model.safetensors")
    assert sorted(p.name for p in export.parent.iterdir()) == ["model.safetensors"]  # no temp file left
    again = load_checkpoint(export)
    assert again.format == "safetensors"
    assert again.sha256 == checkpoint_hash(export)
    assert_state_equal(again.state_dict, loaded.state_dict)
    assert again.meta == loaded.meta
    with safe_open(str(export), framework="pt") as handle:  # provenance of the export
        assert handle.metadata()["vdm_source_sha256"] == loaded.sha256
        assert handle.metadata()["vdm_source_format"] == "lightning"


def test_cli_exports(lightning_ckpt: tuple[Path, TinyModule], tmp_path: Path,
                     caplog: pytest.LogCaptureFixture) -> None:
    path, module = lightning_ckpt
    dst = tmp_path / "cli.safetensors"
    with caplog.at_level(logging.INFO, logger="vdm.utils.checkpoints"):
        main([str(path), str(dst)])
    assert_state_equal(load_checkpoint(dst).state_dict, module.state_dict())
    num_params = sum(t.numel() for t in module.state_dict().values())
    assert f"{len(module.state_dict())} tensors, {num_params} parameters" in caplog.text
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing.ckpt"), str(dst)])
    assert exit_info.value.code == 1


def test_export_casts_contiguous_and_unaliased(tmp_path: Path) -> None:
    tied = torch.randn(4, 3)
    state = {
        "emb.weight": tied,
        "head.weight": tied,  # tied weights: same storage
        "half": torch.randn(5).to(torch.bfloat16),
        "view": torch.randn(3, 4).t(),  # not contiguous
        "count": torch.tensor(7, dtype=torch.long),
        "mask": torch.tensor([True, False]),
    }
    source = LoadedCheckpoint(state_dict=state, meta={"epoch": 1}, sha256="0" * 64, format="lightning")
    loaded = load_checkpoint(save_export(source, tmp_path / "x.safetensors"))
    expected = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    assert_state_equal(loaded.state_dict, expected)
    assert loaded.meta == {"epoch": 1}
    with pytest.raises(ValueError, match="must end with .safetensors"):
        save_export(source, tmp_path / "x.pt")


def test_refuses_foreign_and_broken_inputs(lightning_ckpt: tuple[Path, TinyModule], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match=r"empty_dir.*not a DeepSpeed checkpoint.*'latest'"):
        load_checkpoint(tmp_path / "empty_dir")
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match=r"plain\.safetensors.*not a vdm export"):
        load_checkpoint(plain)
    path, _ = lightning_ckpt
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.ckpt.*truncated or corrupt"):
        load_checkpoint(truncated)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match=r"broken\.safetensors"):
        load_checkpoint(broken)
    not_lightning = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, not_lightning)
    with pytest.raises(CheckpointError, match=r"weights\.pt.*'state_dict'"):
        load_checkpoint(not_lightning)


def test_malicious_ckpt_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": Payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.ckpt.*system"):
        load_checkpoint(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()


def _fake_deepspeed_dir(root: Path, model_extra: dict, optim_extra: dict) -> Path:
    """A minimal one-rank ZeRO-2 checkpoint directory (what zero_to_fp32 reads), with extra entries."""
    tag = root / "checkpoint"
    tag.mkdir(parents=True)
    (root / "latest").write_text("checkpoint")
    model_states = {"module": {}, "buffer_names": [], "param_shapes": [{"w": torch.Size([2])}],
                    "shared_params": {}, "ds_version": "0.19.8", "global_step": 1, **model_extra}
    torch.save(model_states, tag / "mp_rank_00_model_states.pt")
    optim = {"optimizer_state_dict": {"zero_stage": 2, "partition_count": 1,
                                      "single_partition_of_fp32_groups": [torch.ones(2)]}, **optim_extra}
    torch.save(optim, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return root


@pytest.mark.parametrize("poisoned", ["model_states", "optim_states"])
def test_malicious_deepspeed_dir_is_refused(tmp_path: Path, poisoned: str) -> None:
    marker = tmp_path / "pwned"
    payload = {"evil": Payload(marker)}
    ckpt = _fake_deepspeed_dir(tmp_path / "ds.ckpt", payload if poisoned == "model_states" else {},
                               payload if poisoned == "optim_states" else {})
    load_before = torch.load
    with pytest.raises(UnsafeCheckpointError, match=rf"{poisoned}\.pt.*system"):
        load_checkpoint(ckpt)
    assert not marker.exists()
    assert torch.load is load_before  # the weights-only patch is undone after a failure


def test_fake_deepspeed_dir_consolidates(tmp_path: Path) -> None:
    loaded = load_checkpoint(_fake_deepspeed_dir(tmp_path / "ds.ckpt", {"vae_hash": "ab"}, {}))
    assert loaded.format == "deepspeed"
    assert_state_equal(loaded.state_dict, {"w": torch.ones(2)})
    assert loaded.meta["vae_hash"] == "ab" and loaded.meta["global_step"] == 1


def _deepspeed_object(name: str) -> object:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    makers = {
        "LossScaler": lambda: LossScaler(4.0),
        "DynamicLossScaler": lambda: DynamicLossScaler(8.0, 1000, 1.0, 2, False),
        "ZeroStageEnum": lambda: ZeroStageEnum(2),
        "fragment_address": lambda: fragment_address(numel=2, start=0),
        "Namespace": lambda: argparse.Namespace(x=1),  # harmless, but not in the allow-list
    }
    return makers[name]()


@pytest.mark.parametrize("name", ["LossScaler", "DynamicLossScaler", "ZeroStageEnum", "fragment_address",
                                  "Namespace"])
def test_deepspeed_allow_list(tmp_path: Path, name: str) -> None:
    """The DeepSpeed classes found in real optimizer-state files load; any other class is refused."""
    ckpt = _fake_deepspeed_dir(tmp_path / "ds.ckpt", {}, {"extra": _deepspeed_object(name)})
    if name == "Namespace":
        with pytest.raises(UnsafeCheckpointError, match=r"optim_states\.pt.*argparse\.Namespace"):
            load_checkpoint(ckpt)
    else:
        assert_state_equal(load_checkpoint(ckpt).state_dict, {"w": torch.ones(2)})


def test_strategy_requires_ds_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    from vdm.lightning.strategies import CPUDeepSpeedStrategy

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    with pytest.raises(RuntimeError, match="DS_ACCELERATOR=cpu"):
        CPUDeepSpeedStrategy(stage=2)


# -- DeepSpeed through Lightning on CPU (subprocess) --------------------------------------------------------


def _run_worker(out: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run this file's ``ds-worker`` mode in its own session (killed as a group on timeout)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "ds-worker", "--out", str(out), *args]
    proc = subprocess.Popen(cmd, env=env, cwd=out, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, _ = proc.communicate()
        pytest.fail(f"DeepSpeed worker timed out after {timeout} s:\n{stdout[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, "")


def _check_worker(result: subprocess.CompletedProcess, out: Path, devices: int) -> dict:
    """Worker results; a SIGABRT at interpreter exit (gloo teardown, see STACK.md) is tolerated only after
    every rank reported completion."""
    done = all((out / f"done_rank{r}").exists() for r in range(devices))
    aborted_at_exit = result.returncode in (-signal.SIGABRT, 128 + signal.SIGABRT) and done
    assert result.returncode == 0 or aborted_at_exit, result.stdout[-6000:]
    assert done, result.stdout[-6000:]
    return json.loads((out / "info.json").read_text())


@pytest.mark.distributed  # one DeepSpeed process: 6-8 s (+~35 s once per venv: CPU comm op build)
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_cpu_checkpoint_consolidates_and_resumes(tmp_path: Path, stage: int) -> None:
    result = _run_worker(tmp_path, "--stage", str(stage), "--precision", "32-true", "--resume")
    info = _check_worker(result, tmp_path, devices=1)
    ckpt = tmp_path / "last.ckpt"
    assert (ckpt / "latest").is_file()
    loaded = load_checkpoint(ckpt)
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    assert loaded.format == "deepspeed"
    assert_state_equal(loaded.state_dict, expected)
    assert int(loaded.state_dict["steps"]) == 4
    assert loaded.meta["global_step"] == 4
    assert loaded.meta["vdm_config"] == {"model": {"hidden": 8}, "seed": 0}
    assert loaded.meta["deepspeed"]["zero_stage"] == stage and loaded.meta["deepspeed"]["world_size"] == 1
    assert "'16-mixed' is not supported by CPUDeepSpeedStrategy" in info["fp16_error"]

    # resume: restored weights at the start, then the same weights as an uninterrupted 6-step run
    resumed = torch.load(tmp_path / "resume.pt", weights_only=True)
    assert info["resume_start_step"] == 4 and info["resume_end_step"] == 6
    assert_state_equal(resumed["start"], expected)
    assert_state_equal(resumed["end"], resumed["straight"])
    assert not torch.equal(resumed["end"]["a.weight"], expected["a.weight"])  # it trained after resuming

    export = load_checkpoint(save_export(loaded, tmp_path / "ds.safetensors"))
    assert_state_equal(export.state_dict, expected)
    assert export.meta == loaded.meta

    # a real model-states file with a payload added is refused, and the payload does not run
    poisoned = tmp_path / "poisoned.ckpt"
    subprocess.run(["cp", "-r", str(ckpt), str(poisoned)], check=True)
    states_file = next((poisoned / "checkpoint").glob("*model_states.pt"))
    states = torch.load(states_file, weights_only=True)
    states["callbacks"] = {"evil": Payload(tmp_path / "pwned")}
    torch.save(states, states_file)
    with pytest.raises(UnsafeCheckpointError, match="model_states.pt"):
        load_checkpoint(poisoned)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.distributed
@pytest.mark.slow  # two processes on two cores: 11-14 s measured, more under load
def test_deepspeed_cpu_two_processes_zero3_bf16(tmp_path: Path) -> None:
    result = _run_worker(tmp_path, "--stage", "3", "--precision", "bf16-mixed", "--devices", "2")
    _check_worker(result, tmp_path, devices=2)
    loaded = load_checkpoint(tmp_path / "last.ckpt")
    assert sorted(p.name for p in (tmp_path / "last.ckpt" / "checkpoint").glob("*_states.pt")) == [
        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt",
    ]
    assert loaded.meta["deepspeed"]["world_size"] == 2 and loaded.meta["global_step"] == 4
    # the module holds bf16 copies of the fp32 master weights that the consolidation returns
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in loaded.state_dict.values() if v.is_floating_point())
    as_module = {k: v.to(expected[k].dtype) for k, v in loaded.state_dict.items()}
    assert_state_equal(as_module, expected)
    assert int(loaded.state_dict["steps"]) == 4  # rank 0 buffer: one increment per step (not synchronised)


# -- worker (runs in a subprocess) --------------------------------------------------------------------------


def _gathered_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's full state dict (ZeRO-3 parameters gathered from their partitions); a collective."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


class _RecordStart(L.Callback):
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.step = trainer.global_step
        self.state = _gathered_state(pl_module)


def _ds_worker(argv: list[str]) -> None:
    from vdm.lightning.strategies import CPUDeepSpeedStrategy

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stage", type=int, required=True)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    info: dict = {}

    def fit(max_steps: int, ckpt_path: Path | None = None, callbacks: list | None = None,
            precision: str = args.precision) -> tuple[L.Trainer, TinyModule]:
        L.seed_everything(0)
        module = TinyModule()
        trainer = tiny_trainer(max_steps, devices=args.devices, precision=precision, callbacks=callbacks,
                               strategy=CPUDeepSpeedStrategy(stage=args.stage))
        trainer.fit(module, tiny_loader(), ckpt_path=ckpt_path)
        return trainer, module

    if args.resume:
        try:
            fit(1, precision="16-mixed")
        except ValueError as err:
            info["fp16_error"] = str(err)
    trainer, module = fit(4)
    trainer.save_checkpoint(args.out / "last.ckpt")
    expected = _gathered_state(module)
    if args.resume:
        record = _RecordStart()
        trainer, module = fit(6, ckpt_path=args.out / "last.ckpt", callbacks=[record])
        end = _gathered_state(module)
        info.update(resume_start_step=record.step, resume_end_step=trainer.global_step)
        _, straight_module = fit(6)
        resume = {"start": record.state, "end": end, "straight": _gathered_state(straight_module)}
        if trainer.is_global_zero:
            torch.save(resume, args.out / "resume.pt")
    if trainer.is_global_zero:
        torch.save(expected, args.out / "expected.pt")
        (args.out / "info.json").write_text(json.dumps(info))
    trainer.strategy.barrier()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    (args.out / f"done_rank{trainer.global_rank}").touch()


if __name__ == "__main__" and sys.argv[1:2] == ["ds-worker"]:
    _ds_worker(sys.argv[2:])
