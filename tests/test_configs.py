"""Every config file composes, validates and instantiates; bad values fail early naming their key."""

from __future__ import annotations

import subprocess
import sys

import hydra
import pytest
from omegaconf import OmegaConf

from tests.helpers.config import CONF_DIR, compose_config
from vdm.config.check import ConfigError, validate_config
from vdm.utils.runtime import apply_auto_precision

ROOT = CONF_DIR.parent
# groups whose options need more than the defaults to compose meaningfully
NO_GAN = ["module.discriminator=null", "module.disc_optimizer=null"]  # DeepSpeed drives one optimizer
STAGE2_TINY = ["stage=diffusion"]  # ZeRO-3 serves stage 2 only
NEEDS = {
    ("data", "shards"): ["corpus.root=/corpus"],
    ("data", "latents"): ["latents.root=/latents"],
    ("strategy", "deepspeed_stage_2"): NO_GAN,
    **{("strategy", f"deepspeed_stage_{s}"): [*STAGE2_TINY, "model.vae_export={export}"]
       for s in ("3", "3_offload")},
    ("experiment", "t2v_synthetic_dit"): ["model.vae_export={export}"],
}
STAGE2 = ["stage=diffusion", "model.vae_export={export}"]  # options of stage 2 need a VAE export
# recipe/ holds fragments that experiments include (composed through those experiments)
SKIP_GROUPS = {"hydra", "local", "recipe"}


def group_options() -> list[tuple[str, str]]:
    options = []
    for group in sorted(p for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in SKIP_GROUPS):
        for file in sorted(group.glob("*.yaml")):
            options.append((group.name, file.stem))
    return options


def test_every_group_has_options():
    groups = {g for g, _ in group_options()}
    required = {"stage", "model", "data", "trainer", "strategy", "callbacks", "logger", "paths"}
    required |= {"experiment", "debug", "hparams_search"}
    assert required <= groups


@pytest.mark.parametrize(("group", "option"), group_options())
def test_compose_and_validate_every_option(group, option, tmp_path, vae_export_dir):
    needs = [o.format(export=vae_export_dir) for o in NEEDS.get((group, option), [])]
    if (group, option) == ("stage", "diffusion") or group == "objective" or option.startswith("dit_"):
        needs = [o.format(export=vae_export_dir) for o in STAGE2 if not o.startswith(f"{group}=")]
        if option.startswith("dit_") and option != "dit_tiny":  # sized for T5-XXL; here the 64-wide stand-in
            needs.append("model.dit.context_dim=64")
    cfg = compose_config("train", [f"{group}={option}", *needs], tmp_path)
    assert cfg.hydra.runtime.choices[group] == option
    validate_config(cfg)


@pytest.mark.parametrize("option", [p.stem for p in sorted((CONF_DIR / "model").glob("*.yaml"))])
def test_instantiate_every_model(option, tmp_path, vae_export_dir):
    import torch

    if option in ("dit_l", "dit_xl"):
        pytest.skip("too large to build here; its keys are checked against VideoDiT in test_dit")
    stage2 = [o.format(export=vae_export_dir) for o in STAGE2] if option.startswith("dit_") else []
    cfg = compose_config("train", [f"model={option}", *stage2], tmp_path)
    model = hydra.utils.instantiate(cfg.model.dit if option.startswith("dit_") else cfg.model.vae)
    assert isinstance(model, torch.nn.Module)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("group", ["callbacks", "logger", "strategy"])
def test_instantiate_every_option_of(group, tmp_path):
    for option in [p.stem for p in sorted((CONF_DIR / group).glob("*.yaml"))]:
        cfg = compose_config("train", [f"{group}={option}", "logger.wandb.offline=true"]
                             if group == "logger" and option == "wandb" else [f"{group}={option}"], tmp_path)
        if group == "strategy":
            strategy = cfg.trainer.strategy
            obj = hydra.utils.instantiate(strategy) if not isinstance(strategy, str) else strategy
            assert obj is not None
        else:
            nodes = cfg.get(group) or {}
            for node in nodes.values():
                assert hydra.utils.instantiate(node) is not None


def test_instantiate_cpu_trainer_and_datamodule(tmp_path):
    cfg = compose_config("train", ["logger=csv"], tmp_path)
    apply_auto_precision(cfg)  # trainer.precision=auto: train.py resolves it for this machine first
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, callbacks=[])
    assert trainer.max_steps == cfg.trainer.max_steps
    import lightning as L

    datamodule = hydra.utils.instantiate(cfg.data)
    assert isinstance(datamodule, L.LightningDataModule)


def test_evaluate_config_composes(tmp_path):
    cfg = compose_config("evaluate", ["ckpt_path=/some.ckpt"], tmp_path)
    validate_config(cfg)
    with pytest.raises(ConfigError, match="ckpt_path"):
        validate_config(compose_config("evaluate", [], tmp_path))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+trainer.max_stepz=10"], r"trainer\.max_stepz: not an argument .*did you mean 'max_steps'"),
        (["data.batch_size=0"], r"data\.batch_size: expected an integer > 0"),
        (["data.batch_size=two"], r"data\.batch_size: expected int"),
        (["data.short_policy=stretch"], r"data\.short_policy"),
        (["data=shards"], r"corpus\.root"),
        (["data.num_frames=8"], r"data\.num_frames, .* = 8, .* do not fit the VAE's 4x temporal.*got T=8"),
        (["data.height=60"], r"do not fit the VAE's .*8x spatial compression: H must be .*got H=60"),
        (["model.vae.patch_size=4", "data.height=72"], r"do not fit .*16x spatial compression: H .*got H=72"),
        (["optimizer.lr=-1"], r"optimizer\.lr"),
        (["+model.vae.latent_chanels=8"], r"model\.vae\.latent_chanels: .*did you mean 'latent_channels'"),
        (["seed=-3"], r"seed: expected an integer >= 0"),
        (["optimizer.lr=-1e-4"], r"optimizer\.lr: expected a learning rate > 0, got -0\.0001"),
        (["data.short_policy=stretch"], r"data\.short_policy: expected one of 'skip', 'pad', 'loop'"),
        (["data.resume=sometimes"], r"data\.resume: expected one of 'exact', 'epoch'"),
        (["trainer.precision=bf17"], r"trainer\.precision: expected one of .*'bf16-mixed'.*got 'bf17'"),
        (["trainer.strategy=dpp"],
         r"trainer\.strategy: unknown strategy 'dpp'; .*strategy=auto\|ddp\|deepspeed"),
        (["trainer.accumulate_grad_batches=0"], r"trainer\.accumulate_grad_batches: expected an integer > 0"),
        (["global_batch_size=6", "trainer.devices=4"],
         r"global_batch_size: 6 is not divisible by the 4 ranks .* "
         r"allowed: multiples of 4, e\.g\. \[4, 8, 12\]"),
        (["global_batch_size=8", "trainer.devices=2", "trainer.accumulate_grad_batches=3"],
         r"global_batch_size: 8 .*accumulate_grad_batches=3; allowed: multiples of 6"),
        (["trainer.precision=16-mixed"],
         r"optimizer\.fused: .* set optimizer\.fused=false, or module\.grad_clip=null"),
        (["ckpt_path=/nonexistent/last.ckpt"],
         r"ckpt_path: /nonexistent/last\.ckpt does not exist; allowed: auto, last"),
    ],
)
def test_bad_values_fail_naming_the_key(overrides, message, tmp_path):
    cfg = compose_config("train", overrides, tmp_path)
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)


def test_unknown_strategy_option_lists_the_options(tmp_path):
    from hydra.errors import MissingConfigException

    expected = r"strategy/ddq(.|\n)*Available options(.|\n)*deepspeed_stage_2"
    with pytest.raises(MissingConfigException, match=expected):
        compose_config("train", ["strategy=ddq"], tmp_path)


def test_global_batch_size_sets_the_per_rank_batch(tmp_path):
    from vdm.lightning.run import apply_global_batch

    overrides = ["global_batch_size=12", "trainer.devices=2", "trainer.accumulate_grad_batches=3"]
    cfg = compose_config("train", overrides, tmp_path)
    validate_config(cfg)
    apply_global_batch(cfg)
    assert cfg.data.batch_size == 2


def test_cli_prints_composed_config_with_overrides():
    out = subprocess.run(
        [sys.executable, "train.py", "--cfg", "job", "data.batch_size=3", "model=vae_base"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    cfg = OmegaConf.create(out)
    assert cfg.data.batch_size == 3
    assert cfg.model.vae.latent_channels == 16
    assert cfg.module._target_ == "vdm.lightning.vae_module.VAEModule"


def test_cli_rejects_bad_config_before_training(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", "data.batch_size=0", f"paths.root_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "data.batch_size" in proc.stderr
    assert not (tmp_path / "data").exists(), "no corpus may be generated for an invalid config"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.vae_export=/nonexistent"], r"model\.vae_export: /nonexistent is not a VAE export"),
        (["model.dit.in_channels=8"], r"model\.dit\.in_channels: 8, but the VAE export has 16"),
        (["model.dit.context_dim=32"], r"model\.dit\.context_dim: 32, but the text encoder.s width is 64"),
        (["module.i2v_probability=0.5"],
         r"model\.dit\.cond_channels: 0, but image-to-video \(i2v_probability > 0\) needs cond_channels=17"),
        (["data.height=36"], r"do not fit the VAE's .*8x spatial compression: H must be .*got H=36"),
        (["data.num_frames=8"], r"data\.num_frames, .* = 8, .* do not fit the VAE's 4x temporal"),
        (["model.dit.patch_size=[1,3,3]"],
         r"model\.dit\.patch_size: \[1, 3, 3\] does not divide the latent clip .* h in \[1, 2, 4, 8\]"),
        (["model.dit.patch_size=[2,2,2]", "data.num_frames=9"],
         r"model\.dit\.patch_size: .*\(T, H, W\) = \(3, .*t in \[1, 3\]"),
        (["model.dit.num_heads=3"],
         r"model\.dit\.num_heads: 3: hidden_size \(\d+\) must be divisible by num_heads \(3\); pick .* \["),
        (["module.ema_decay=1.5"], r"module\.ema_decay: expected a value in \[0, 1\)"),
        (["module.caption_dropout=-0.1"], r"module\.caption_dropout: expected a probability in \[0, 1\]"),
    ],
)
def test_bad_stage2_values_fail_naming_the_key(overrides, message, tmp_path, vae_export_dir):
    stage2 = [o.format(export=vae_export_dir) for o in STAGE2]
    cfg = compose_config("train", [*stage2, *overrides], tmp_path)
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)


def test_deepspeed_refuses_stage_one_with_its_gan(tmp_path):
    cfg = compose_config("train", ["strategy=deepspeed_stage_2"], tmp_path)
    with pytest.raises(ConfigError, match="module.discriminator: DeepSpeed drives a single optimizer"):
        validate_config(cfg)
    validate_config(compose_config("train", ["strategy=deepspeed_stage_2", *NO_GAN], tmp_path))
    validate_config(compose_config("train", ["strategy=fsdp"], tmp_path))
    with pytest.raises(ConfigError, match="trainer.strategy.stage: 3 is not supported for stage 1"):
        validate_config(compose_config("train", ["strategy=deepspeed_stage_3", *NO_GAN], tmp_path))


def test_slurm_launcher_requeues_into_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    cfg = compose_config("train", ["hydra/launcher=slurm", "hydra.launcher.nodes=2"], tmp_path)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert launcher["nodes"] == 2 and launcher["tasks_per_node"] == launcher["gpus_per_node"] == 8
    assert launcher["max_num_timeout"] > 0 and launcher["additional_parameters"]["requeue"] is True
    # a requeued job keeps its id, hence its run directory, where ckpt_path=auto finds its checkpoints
    assert cfg.run_name == "4242" and cfg.hydra.run.dir.endswith("/runs/4242") and cfg.ckpt_path == "auto"
    sbatch = (CONF_DIR.parent / "slurm" / "train.sbatch").read_text()
    assert "--signal=SIGUSR1@" in sbatch and "--requeue" in sbatch and "srun" in sbatch
