"""How much of the attribute scores a VAE leaves room for: the evaluator on a corpus's videos and on their
reconstructions through a stage-1 export.

    python -m vdm.eval.vae_ceiling CORPUS VAE_EXPORT [--split val] [--limit 64]

A stage-2 model generates in the VAE's latent space, so an attribute the VAE's reconstructions lose (e.g. a
shape blurred into a blob) cannot be scored right on generated videos either: the reconstruction accuracy is
the ceiling. Videos are decoded with PyAV, encoded to the posterior mean and decoded, whole (every frame,
full resolution), then quantized to 8 bits as a written video would be.

It also gives the reconstructions' PSNR on these whole videos, overall and on the videos that move, next to
the baseline of predicting every frame by its video's mean frame (``vdm.lightning.vae_module`` logs the same
pair on its validation clips).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from vdm.metrics.attributes import decode_mp4, evaluate_video, iter_corpus, summarize
from vdm.metrics.reconstruction import frame_psnr, mean_frame_baseline
from vdm.utils.frames import from_uint8_frames, to_uint8_frames
from vdm.utils.vae_export import load_vae_export


@torch.no_grad()
def reconstruct(vae: torch.nn.Module, frames: Any) -> Any:
    """(T, H, W, 3) uint8 -> the VAE's reconstruction from the posterior mean, (T, H, W, 3) uint8."""
    x_hat = vae(from_uint8_frames(frames)[None], sample_posterior=False)[0]  # 1 3 T H W
    return to_uint8_frames(x_hat[0])


def vae_ceiling(corpus: str | Path, export: str | Path, split: str = "val", limit: int | None = 64
                ) -> dict[str, dict[str, float]]:
    """``{"videos": summary, "reconstructions": summary, "psnr": ...}``: the attribute evaluator's summaries
    (``attr/*`` keys) on the first ``limit`` videos of ``split`` and on their reconstructions through
    ``export``, and the mean frame PSNR (dB) of the reconstructions and of the mean-frame baseline, over all
    videos (``reconstruction``, ``mean_frame``) and over those that move (``*_moving``, as
    ``mean_frame_baseline`` decides; NaN when none does)."""
    vae = load_vae_export(export).model.eval()
    raw, rebuilt = [], []
    names = ("reconstruction", "mean_frame", "reconstruction_moving", "mean_frame_moving")
    psnr: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for index, (_, data, expected) in enumerate(iter_corpus(Path(corpus), split)):
        if limit is not None and index >= limit:
            break
        frames = decode_mp4(data)
        rebuilt_frames = reconstruct(vae, frames)
        raw.append(evaluate_video(frames, expected))
        rebuilt.append(evaluate_video(rebuilt_frames, expected))
        x = from_uint8_frames(frames)[None]
        mean_frame, moving = mean_frame_baseline(x)
        for name, prediction in (("reconstruction", from_uint8_frames(rebuilt_frames)[None]),
                                 ("mean_frame", mean_frame)):
            value = frame_psnr(prediction, x)
            psnr[name].append(value)
            if moving.item():
                psnr[f"{name}_moving"].append(value)
    if not raw:
        raise ValueError(f"{corpus}: no {split} videos")
    means = {k: torch.cat(v).mean().item() if v else float("nan") for k, v in psnr.items()}
    return {"videos": summarize(raw), "reconstructions": summarize(rebuilt), "psnr": means}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: prints both summaries side by side (and writes them with ``--json``)."""
    p = argparse.ArgumentParser(prog="python -m vdm.eval.vae_ceiling", description=__doc__.split("\n\n")[0])
    p.add_argument("corpus", type=Path)
    p.add_argument("vae_export", type=Path)
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=64)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    result = vae_ceiling(args.corpus, args.vae_export, args.split, args.limit)
    print(f"{'attribute':<16}{'videos':>10}{'reconstructed':>15}")
    for key, value in result["videos"].items():
        print(f"{key.removeprefix('attr/'):<16}{value:>10.3f}{result['reconstructions'][key]:>15.3f}")
    db = result["psnr"]
    print(f"\nPSNR (dB){'all':>17}{'moving':>10}")
    print(f"{'reconstructed':<16}{db['reconstruction']:>10.2f}{db['reconstruction_moving']:>10.2f}")
    print(f"{'mean frame':<16}{db['mean_frame']:>10.2f}{db['mean_frame_moving']:>10.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
