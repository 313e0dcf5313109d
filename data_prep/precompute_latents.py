"""Encode a vdm-shards video corpus with a stage-1 VAE export into latent shards for stage 2.

    python -m data_prep.precompute_latents CORPUS VAE_EXPORT OUT --num-frames 9 --height 64 --width 64 \\
        [--text-encoder DIR --text-encoder-kind t5 --max-length 32]

Every clip (the centre clip of each video, centre-cropped: the same clip validation uses) is encoded
to the VAE posterior mean, stored raw (stage 2 applies the export's latent statistics), optionally
with the text encoder's hidden states and padding mask. Output: ``OUT/{train,val}-NNNNNN.tar``,
``samples.jsonl`` and a ``manifest.json`` whose ``latents`` block records the VAE hash, the text
encoder identifier and the latent shape; every sample's json repeats both tags. Stage 2 refuses a
latent corpus made by another VAE (naming both hashes). Corrupt videos are skipped and counted, as in
training. Layout: ``vdm.data.latents``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import fcntl
import glob
import io
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from data_prep.shard_writer import SPLITS, EncodedSample, ShardSink
from vdm.data.buckets import Bucket
from vdm.data.clips import ClipSpec
from vdm.data.pipeline import VideoDataset
from vdm.data.probe import MediaInfo
from vdm.data.shards import expand_shards, load_manifest, shard_sample_counts
from vdm.models.text_encoder import TextEncoder
from vdm.utils.io import atomic_dir
from vdm.utils.vae_export import load_vae_export

log = logging.getLogger(__name__)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _info(meta: dict[str, Any], frames: int, height: int, width: int) -> MediaInfo:
    fps = float(meta.get("fps") or 0.0)
    return MediaInfo(
        kind="video",
        frames=frames,
        fps=fps,
        duration=frames / fps if fps else 0.0,
        width=width,
        height=height,
        codec="latent",
        backend="vae",
    )


def video_batches(
    corpus: str, split: str, clip: ClipSpec, bucket: Bucket, batch_size: int, backend: str
) -> Iterator[dict[str, Any]]:
    """Every decodable sample of ``split`` once, in shard order (skips are logged and counted)."""
    urls = expand_shards(sorted(glob.glob(os.path.join(corpus, f"{split}-*.tar"))))
    manifest_path = os.path.join(corpus, "manifest.json")
    manifest = load_manifest(manifest_path) if os.path.isfile(manifest_path) else None
    dataset = VideoDataset(
        urls,
        clip,
        buckets=[bucket],
        batch_size=batch_size,
        mode="exact",
        shard_counts=shard_sample_counts(urls, manifest),
        backend=backend,  # type: ignore[arg-type]
        max_skip_rate=1.0,
        rank=0,
        world_size=1,
    )
    yield from dataset


@torch.no_grad()
def encode_batch(
    batch: dict[str, Any], vae: torch.nn.Module, text_encoder: TextEncoder | None, device: torch.device
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(latents (B, C, T, H, W) float32, text (B, L, D) float32 or None, mask (B, L) bool or None)."""
    z = vae.encode(batch["video"].to(device)).mode().float().cpu().numpy()
    if text_encoder is None:
        return z, None, None
    text, mask = text_encoder.encode(list(batch["caption"]))
    return z, text.float().cpu().numpy(), mask.cpu().numpy()


def precompute(
    corpus: str,
    vae_export: str,
    out: str,
    *,
    num_frames: int,
    height: int,
    width: int,
    frame_stride: int = 1,
    batch_size: int = 8,
    text_encoder: TextEncoder | None = None,
    device: str = "cpu",
    backend: str = "decord",
    max_samples_per_shard: int = 1000,
) -> dict[str, Any]:
    """Write the latent corpus; returns its manifest."""
    export = load_vae_export(vae_export)
    vae = export.model.to(device)
    latent_shape = list(vae.latent_shape((3, num_frames, height, width)))
    clip = ClipSpec(num_frames, frame_stride=frame_stride, start="center", crop="center")
    bucket = Bucket(height, width, num_frames)
    text_id = text_encoder.identifier if text_encoder is not None else None
    tags = {"vae_hash": export.vae_hash, "text_encoder": text_id}
    with ShardSink(out, max_samples_per_shard=max_samples_per_shard) as sink:
        for split in SPLITS:
            written = 0
            for batch in video_batches(corpus, split, clip, bucket, batch_size, backend):
                z, text, mask = encode_batch(batch, vae, text_encoder, torch.device(device))
                for i, key in enumerate(batch["key"]):
                    extra = (
                        {}
                        if text is None
                        else {"text.npy": _npy_bytes(text[i]), "mask.npy": _npy_bytes(mask[i])}
                    )
                    meta = batch["meta"][i]
                    sink.add(
                        EncodedSample(
                            key,
                            str(meta.get("source", key)),
                            split,
                            "latent.npy",
                            _npy_bytes(z[i]),
                            batch["caption"][i],
                            _info(meta, num_frames, height, width),
                            extra={**tags, "source_key": key},
                            extra_members=extra,
                        )
                    )
                written += len(batch["key"])
            log.info("%s: %d clips encoded", split, written)
        options = {
            "corpus": os.path.abspath(corpus),
            "num_frames": num_frames,
            "height": height,
            "width": width,
            "frame_stride": frame_stride,
        }
        latents = {
            **tags,
            "latent_shape": latent_shape,
            "latent_stats": export.stats.__dict__,
            "normalized": False,
        }
        return sink.finish(source="precompute_latents", options=options, extra_fields={"latents": latents})


def _current(out: Path, options: dict[str, Any], tags: dict[str, Any]) -> bool:
    """Whether ``out`` holds a complete latent corpus made with these options, VAE and text encoder."""
    manifest = load_manifest(out / "manifest.json") if (out / "manifest.json").is_file() else None
    if manifest is None:
        return False
    info = manifest.get("latents") or {}
    return manifest.get("options") == options and all(info.get(k) == v for k, v in tags.items())


def ensure_latent_corpus(
    out: str | Path,
    corpus: str | Path,
    vae_export: str | Path,
    *,
    num_frames: int,
    height: int,
    width: int,
    text_encoder: TextEncoder | None = None,
    batch_size: int = 8,
    backend: str = "decord",
) -> Path:
    """Return ``out`` holding the latents of ``corpus`` under ``vae_export`` (and ``text_encoder``), encoding
    them first when ``out`` is missing, incomplete or made with other settings.

    Built in a temporary sibling and renamed into place, so an interrupted build is redone, never kept.
    Refuses to replace a non-empty folder that is not a latent corpus.
    """
    out, corpus = Path(out).resolve(), Path(corpus).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    # one builder at a time (every rank of a run calls this); the others then find the corpus current
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure_locked(out, corpus, vae_export, num_frames, height, width, text_encoder, batch_size,
                              backend)


def _ensure_locked(out: Path, corpus: Path, vae_export: str | Path, num_frames: int, height: int, width: int,
                   text_encoder: TextEncoder | None, batch_size: int, backend: str) -> Path:
    options = {"corpus": str(corpus), "num_frames": num_frames, "height": height, "width": width,
               "frame_stride": 1}
    tags = {"vae_hash": load_vae_export(vae_export).vae_hash,
            "text_encoder": text_encoder.identifier if text_encoder is not None else None}
    if _current(out, options, tags):
        log.info("reusing latent corpus %s", out)
        return out
    if out.exists() and any(out.iterdir()):
        manifest = load_manifest(out / "manifest.json") if (out / "manifest.json").is_file() else None
        if "latents" not in (manifest or {}):
            raise FileExistsError(f"{out} exists and is not a latent corpus; refusing to replace it")
    log.info("encoding the latents of %s into %s", corpus, out)
    with atomic_dir(out) as tmp:
        precompute(str(corpus), str(vae_export), str(tmp), num_frames=num_frames, height=height, width=width,
                   batch_size=batch_size, text_encoder=text_encoder, backend=backend)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.precompute_latents",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("corpus", help="vdm-shards corpus directory (train-*.tar, val-*.tar, manifest.json)")
    p.add_argument("vae_export", help="stage-1 VAE export directory")
    p.add_argument("out", help="output directory for the latent shards")
    p.add_argument("--num-frames", type=int, required=True)
    p.add_argument("--height", type=int, required=True)
    p.add_argument("--width", type=int, required=True)
    p.add_argument("--frame-stride", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--text-encoder", default=None, help="local text encoder directory (embeddings are stored)"
    )
    p.add_argument("--text-encoder-kind", default="t5", choices=["t5", "clip"])
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="decord", choices=["decord", "pyav"])
    p.add_argument("--max-samples-per-shard", type=int, default=1000)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    text_encoder = None
    if args.text_encoder:
        text_encoder = TextEncoder(args.text_encoder, args.text_encoder_kind, args.max_length).to(args.device)
    manifest = precompute(
        args.corpus,
        args.vae_export,
        args.out,
        num_frames=args.num_frames,
        height=args.height,
        width=args.width,
        frame_stride=args.frame_stride,
        batch_size=args.batch_size,
        text_encoder=text_encoder,
        device=args.device,
        backend=args.backend,
        max_samples_per_shard=args.max_samples_per_shard,
    )
    log.info("wrote %d latent clips to %s", manifest["totals"]["samples"], args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
