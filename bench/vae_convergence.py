"""Validation PSNR of a video VAE against training steps on the synthetic corpus, next to baselines.

Loads (once, cached as uint8) training and validation clips from a synthetic corpus, then trains a
VideoVAE built from a model preset in ``conf/model`` (with ``key=value`` overrides) with AdamW on
``l1 * |x - x_hat| + l2 * mse + kl * KL``, evaluating the posterior mode every ``--eval-every`` steps.
No data loader, discriminator or logger is in the loop, so what is measured is how fast the model and
objective learn per step and per second. Two references are printed with the results:

- ``mean_frame``: each clip predicted by its own mean frame (what ``val/psnr_mean_frame`` logs);
- ``avgpool{k}``: every frame average-pooled by k and upsampled bilinearly, a linear code with
  3 * (H/k) * (W/k) numbers per frame.

    python bench/vae_convergence.py --corpus data/synthetic --steps 1000 patch_size=2 channel_mults=[1,2,4]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from omegaconf import OmegaConf

from vdm.data.datamodule import VideoDataModule
from vdm.metrics.reconstruction import frame_psnr
from vdm.models.vae import VideoVAE
from vdm.utils.frames import uint8_to_float

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import load_preset  # noqa: E402


def load_clips(corpus: Path, num_train: int, num_val: int, frames: int, size: int) -> dict[str, torch.Tensor]:
    """{"train": (N, 3, T, H, W) uint8, "val": ...} from the corpus shards, cached next to them."""
    cache = corpus / f".bench_clips_{num_train}_{num_val}_{frames}_{size}.pt"
    if cache.exists():
        return torch.load(cache, weights_only=True)
    dm = VideoDataModule(root=str(corpus), num_frames=frames, height=size, width=size, batch_size=8,
                         val_batch_size=8, num_workers=0, seed=0, video_dtype="uint8")
    dm.setup("fit")
    train: list[torch.Tensor] = []
    for batch in dm.train_dataloader():
        train.append(batch["video"])
        if sum(len(b) for b in train) >= num_train:
            break
    val = [batch["video"] for batch in dm.val_dataloader()]
    clips = {"train": torch.cat(train)[:num_train], "val": torch.cat(val)[:num_val]}
    torch.save(clips, cache)
    return clips


def baselines(val: torch.Tensor) -> dict[str, float]:
    """PSNR of the mean-frame prediction and of k x k average pooling + bilinear upsampling."""
    out = {"mean_frame": frame_psnr(val.mean(dim=2, keepdim=True).expand_as(val), val).mean().item()}
    frames = rearrange(val, "b c t h w -> (b t) c h w")
    for k in (4, 8):
        pooled = F.interpolate(F.avg_pool2d(frames, k), scale_factor=k, mode="bilinear")
        pooled = rearrange(pooled, "(b t) c h w -> b c t h w", b=val.shape[0])
        out[f"avgpool{k}"] = frame_psnr(pooled, val).mean().item()
    return out


@torch.no_grad()
def evaluate(model: VideoVAE, val: torch.Tensor, batch_size: int) -> float:
    model.eval()
    psnr = [frame_psnr(model(x, sample_posterior=False)[0], x) for x in val.split(batch_size)]
    model.train()
    return torch.cat(psnr).mean().item()


def build_model(preset: str, overrides: list[str]) -> VideoVAE:
    cfg = OmegaConf.merge(load_preset(preset), OmegaConf.from_dotlist(overrides))
    kwargs: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    return VideoVAE(**kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="model key=value overrides")
    parser.add_argument("--corpus", type=Path, default=ROOT / "data" / "synthetic")
    parser.add_argument("--preset", default="vae_tiny")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--l1", type=float, default=1.0)
    parser.add_argument("--l2", type=float, default=0.0)
    parser.add_argument("--kl", type=float, default=1e-6)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--num-val", type=int, default=32)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (fast on CPUs with AMX)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    clips = load_clips(args.corpus, 512, args.num_val, args.frames, args.size)
    train, val = clips["train"], uint8_to_float(clips["val"])
    torch.manual_seed(args.seed)
    model = build_model(args.preset, args.overrides)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(args.warmup, 1)))
    generator = torch.Generator().manual_seed(args.seed)
    refs = baselines(val)
    print(" ".join(f"{k} {v:.2f} dB" for k, v in refs.items()), flush=True)
    curve, start, eval_seconds = [], time.perf_counter(), 0.0
    for step in range(1, args.steps + 1):
        x = uint8_to_float(train[torch.randint(0, len(train), (args.batch_size,), generator=generator)])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            x_hat, posterior = model(x)
        x_hat = x_hat.float()
        loss = (args.l1 * (x_hat - x).abs().mean() + args.l2 * F.mse_loss(x_hat, x)
                + args.kl * posterior.kl(reduction="mean").mean())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        warmup.step()
        if step % args.eval_every == 0 or step == args.steps:
            elapsed = time.perf_counter() - start - eval_seconds  # training time only
            eval_start = time.perf_counter()
            psnr = round(evaluate(model, val, 8), 2)
            eval_seconds += time.perf_counter() - eval_start
            curve.append({"step": step, "seconds": round(elapsed, 1), "psnr": psnr})
            print(f"step {step:5d}  {elapsed:7.1f} s  val psnr {psnr:.2f} dB", flush=True)
    if args.json:
        settings = vars(args) | {"corpus": str(args.corpus)}
        print(json.dumps({"baselines": refs, "curve": curve, "args": settings}))


if __name__ == "__main__":
    main()
