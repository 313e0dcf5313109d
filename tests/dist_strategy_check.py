"""Train the tiny stage-2 DiffusionModule under one strategy; write what it did (for test_strategies.py).

Usage: python tests/dist_strategy_check.py --strategy {single,ddp,zero2,zero3} --vae-export DIR \
    --text-encoder DIR --out DIR [--steps K] [--batch-size B] [--save-at M] [--resume-from CKPT]

``single`` runs one process; ``ddp``, ``zero2`` and ``zero3`` run two (Lightning's subprocess launcher re-runs
this script for rank 1; the DeepSpeed ones need ``DS_ACCELERATOR=cpu`` in the environment). The data is a
fixed in-memory set of latent samples read in order on every rank (``InOrderData``: Lightning's own
DistributedSampler would shuffle), so with a per-rank batch of global batch / world size every step sees the
same set of samples whatever the number of processes. A resume is exact only from an epoch-end checkpoint: a
plain DataLoader restarts its epoch.

Written under ``--out`` (rank 0): ``result.json`` (per step: global mean loss, sorted sample keys, pre-clip
global gradient norm; start step, EMA update count), ``weights.pt`` (``{"dit": ...,
"ema": ...}`` fp32 state dicts, ZeRO-3 parameters gathered), ``final.ckpt`` (``trainer.save_checkpoint`` at
the end: a file, or a DeepSpeed directory), with ``--save-at M`` ``checkpoints/step{M:04d}.ckpt`` (written
by a ``ModelCheckpoint`` during the run, as train.py's callbacks do); every rank touches ``done_rank{r}``.
"""

from __future__ import annotations

import argparse
import json
import os
import types
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from vdm.diffusion.objectives import RectifiedFlow
from vdm.lightning.diffusion_module import DiffusionModule
from vdm.models.dit import VideoDiT
from vdm.models.text_encoder import TextEncoder

STRATEGIES = ("single", "ddp", "zero2", "zero3")
LATENT_SHAPE = (16, 2, 4, 4)  # (C, T', H', W') of the tiny VAE export: 5 frames at 32 x 32
CAPTIONS = (
    "a red circle moving left quickly on a black background",
    "a blue square moving right slowly",
    "a green triangle bouncing",
    "a white star moving up on a gray background",
    "",
)
# faults injected on purpose, to check that the tests comparing runs can fail
FAULTS = ("none", "global-rng", "no-ema-restore")


class LatentSamples(torch.utils.data.Dataset):
    """``num`` fixed raw latents (seeded; ``mean + std * N(0, 1)`` per channel, like a VAE's posterior means),
    keys ``s000``.., captions cycling through CAPTIONS."""

    def __init__(self, num: int, mean: torch.Tensor, std: torch.Tensor, seed: int = 1234) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.latents = mean + std * torch.randn(num, *LATENT_SHAPE, generator=generator)

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"latent": self.latents[i], "caption": CAPTIONS[i % len(CAPTIONS)], "key": f"s{i:03d}",
                "meta": {"index": i}}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples -> the stage-2 batch: latent (B, C, T', H', W'), caption/key/meta lists."""
    return {"latent": torch.stack([x["latent"] for x in items]), "caption": [x["caption"] for x in items],
            "key": [x["key"] for x in items], "meta": [x["meta"] for x in items]}


class InOrderData(L.LightningDataModule):
    """The samples in order on every rank: a non-shuffling DistributedSampler in multi-process runs.

    Lightning's own DistributedSampler (``use_distributed_sampler=True``) always shuffles training data, even
    from a ``DataLoader(shuffle=False)``; it leaves a loader that already has a DistributedSampler alone.
    Rank ``r`` of ``n`` reads samples ``r, r + n, ...``: per-rank batch ``b`` at step ``k`` gives the global
    batch of samples ``k * n * b .. (k + 1) * n * b - 1``, what one process reads with batch ``n * b``.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, batch_size: int) -> None:
        super().__init__()
        self.dataset, self.batch_size = dataset, batch_size

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        sampler = None
        if self.trainer.world_size > 1:
            sampler = torch.utils.data.DistributedSampler(self.dataset, num_replicas=self.trainer.world_size,
                                                          rank=self.trainer.global_rank, shuffle=False)
        return torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler,
                                           shuffle=False, collate_fn=collate)


def make_module(args: argparse.Namespace) -> DiffusionModule:
    """The tiny DiT (depth 2, width 32) with AdamW, warmup + cosine, EMA and gradient clipping."""
    dit = VideoDiT(in_channels=16, patch_size=(1, 2, 2), hidden_size=32, depth=2, num_heads=2, context_dim=64)
    text = TextEncoder(str(args.text_encoder), "t5", max_length=16)
    optimizer = lambda params: torch.optim.AdamW(params, lr=args.lr)  # noqa: E731
    return DiffusionModule(dit, str(args.vae_export), text, optimizer, RectifiedFlow(), caption_dropout=0.3,
                           ema_decay=0.9, ema_warmup=2, grad_clip=args.grad_clip, warmup_steps=2,
                           min_lr_ratio=0.1)


def make_strategy(name: str) -> tuple[Any, int]:
    """(Trainer strategy, devices) for a strategy name."""
    if name == "single":
        return "auto", 1
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(process_group_backend="gloo"), 2
    from vdm.lightning.strategies import CPUDeepSpeedStrategy

    return CPUDeepSpeedStrategy(stage=2 if name == "zero2" else 3), 2


def inject_fault(module: DiffusionModule, fault: str) -> None:
    """Break the module on purpose (negative controls for the comparisons of test_strategies.py)."""
    if fault == "global-rng":  # every draw from the process's global RNG instead of per-sample generators
        module.sample_generators = types.MethodType(lambda self, batch, salt: None, module)
    elif fault == "no-ema-restore":  # a resumed run keeps the freshly built EMA instead of the saved one
        original = type(module).on_load_checkpoint

        def on_load_checkpoint(self: DiffusionModule, checkpoint: dict[str, Any]) -> None:
            checkpoint.pop("ema_state_dict", None)
            state = checkpoint.get("state_dict", {})
            if not self.ema_detached:
                state.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
            original(self, checkpoint)

        module.on_load_checkpoint = types.MethodType(on_load_checkpoint, module)


def gathered_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fp32 CPU copy of ``module``'s state dict; ZeRO-3 partitions gathered (a collective on every rank)."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def all_gather_objects(value: Any) -> list[Any]:
    """``value`` from every rank (just ``[value]`` in one process)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [value]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


class StepRecorder(L.Callback):
    """Per optimizer step: the global mean training loss (all ranks take part), sample keys, gradient norm."""

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, Any]] = {}
        self.start_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"].detach().float().clone()
        mean = trainer.strategy.reduce(loss, reduce_op="mean")  # all-reduce under DDP/DeepSpeed
        keys = sorted(k for rank_keys in all_gather_objects(list(batch["key"])) for k in rank_keys)
        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        if engine is not None:  # the global norm DeepSpeed computed (before clipping) in this step
            norm = engine.get_global_grad_norm()
        else:  # what the module logged in on_before_optimizer_step (before clipping)
            norm = trainer.callback_metrics.get("train/grad_norm")
        self.steps[trainer.global_step] = {
            "loss": float(mean), "keys": keys, "grad_norm": None if norm is None else float(norm),
        }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", choices=STRATEGIES, required=True)
    parser.add_argument("--vae-export", type=Path, required=True)
    parser.add_argument("--text-encoder", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=8, help="max_steps of the run")
    parser.add_argument("--batch-size", type=int, default=None, help="per rank (default: 4 / processes)")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--save-at", type=int, default=0, help="ModelCheckpoint every this many steps")
    parser.add_argument("--resume-from", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--grad-clip", type=float, default=0.38)
    parser.add_argument("--fault", choices=FAULTS, default="none")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(args.seed, verbose=False)  # torch.initial_seed() seeds the per-sample generators
    module = make_module(args)
    inject_fault(module, args.fault)
    strategy, devices = make_strategy(args.strategy)
    batch_size = args.batch_size or 4 // devices
    samples = LatentSamples(args.num_samples, module.latent_mean[0], module.latent_std[0])
    data = InOrderData(samples, batch_size)
    recorder = StepRecorder()
    callbacks: list[L.Callback] = [recorder]
    if args.save_at:  # as conf/callbacks' ModelCheckpoint: saves in on_train_batch_end, mid-run
        callbacks.append(ModelCheckpoint(dirpath=args.out / "checkpoints", filename="step{step:04d}",
                                         auto_insert_metric_name=False, every_n_train_steps=args.save_at,
                                         save_top_k=-1, save_on_train_epoch_end=False))
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, precision="32-true", max_steps=args.steps,
        logger=False, enable_checkpointing=bool(args.save_at), enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=True,
        callbacks=callbacks,
        # as conf/: no Trainer value. The module clips with module.grad_clip itself, in
        # configure_gradient_clipping (single, DDP), or via DeepSpeed's gradient_clipping set in setup()
        gradient_clip_val=None,
    )
    trainer.fit(module, datamodule=data, ckpt_path=args.resume_from, weights_only=True)
    trainer.save_checkpoint(args.out / "final.ckpt")  # a collective under DeepSpeed: every rank
    weights = {"dit": gathered_state(module.dit), "ema": gathered_state(module.ema.module)}
    if trainer.is_global_zero:
        torch.save(weights, args.out / "weights.pt")
        result = {"strategy": args.strategy, "world_size": trainer.world_size, "batch_size": batch_size,
                  "start_step": recorder.start_step, "end_step": trainer.global_step,
                  "ema_updates": module.ema.num_updates,
                  "steps": {str(k): v for k, v in sorted(recorder.steps.items())}}
        (args.out / "result.json").write_text(json.dumps(result, indent=1))
    trainer.strategy.barrier()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    (args.out / f"done_rank{trainer.global_rank}").touch()


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    main()
