"""Precomputed latent corpora: shards of VAE latents (and optionally text embeddings) for stage 2.

``data_prep/precompute_latents.py`` writes them in the vdm-shards layout; every sample holds

    <key>.latent.npy   (C, T, H, W) float32  raw VAE posterior mean (stage 2 normalises it)
    <key>.text.npy     (L, D) float32        text-encoder hidden states      (optional)
    <key>.mask.npy     (L,) bool             text padding mask, True = token  (optional)
    <key>.txt          caption
    <key>.json         {"vae_hash", "text_encoder", "source_key", ...}

and the manifest carries ``"latents": {"vae_hash", "text_encoder", "latent_shape": [C, T, H, W], ...}``.
Stage 2 refuses a corpus whose VAE hash differs from its VAE export's, naming both, before training
starts (``LatentDataModule.setup``) and again per sample while reading.
"""

from __future__ import annotations

import copy
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from vdm.data.buckets import Bucket
from vdm.data.datamodule import VideoDataModule
from vdm.data.pipeline import Mode, VideoDataset
from vdm.data.samples import SampleError, new_batch
from vdm.data.shards import load_manifest

logger = logging.getLogger(__name__)


class LatentCorpusError(ValueError):
    """A latent corpus made by another VAE (or text encoder), or without latent metadata."""


def export_hash(vae_export: str | Path) -> str:
    """The content hash recorded in a VAE export directory (``export.json``)."""
    path = Path(vae_export) / "export.json"
    if not path.is_file():
        raise FileNotFoundError(f"VAE export {vae_export} has no export.json (is it a stage-1 export?)")
    return str(json.loads(path.read_text())["vae_hash"])


def latent_info(manifest: dict[str, Any] | None, where: str) -> dict[str, Any]:
    """The manifest's ``latents`` block; LatentCorpusError when the corpus holds videos, not latents."""
    info = (manifest or {}).get("latents")
    if not isinstance(info, dict) or "vae_hash" not in info or "latent_shape" not in info:
        raise LatentCorpusError(
            f"{where}: not a latent corpus (its manifest has no 'latents' block with vae_hash and "
            "latent_shape); "
            "write one with data_prep/precompute_latents.py"
        )
    return info


def check_vae_hash(corpus_hash: str, expected: str, where: str) -> None:
    if corpus_hash != expected:
        raise LatentCorpusError(
            f"{where} was encoded by VAE {corpus_hash[:12]}, but stage 2 uses VAE {expected[:12]}; "
            "re-run data_prep/precompute_latents.py with this VAE export (or point model.vae_export at "
            "the export that made these latents)"
        )


def _npy(raw: dict[str, Any], name: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(raw[name]), allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise SampleError(f"unreadable {name}: {exc}") from exc


@dataclass
class LatentClip:
    """A decoded latent sample: ``latent`` (C, T, H, W) float32, optional ``text`` (L, D), ``mask`` (L,)."""

    bucket: Bucket
    latent: torch.Tensor
    text: torch.Tensor | None
    mask: torch.Tensor | None
    caption: str
    key: str
    meta: dict[str, Any] = field(default_factory=dict)

    def padded_copy(self) -> LatentClip:
        meta = copy.deepcopy(self.meta)
        meta["pad"] = True
        return LatentClip(self.bucket, self.latent, self.text, self.mask, self.caption, self.key, meta)


def decode_latent_sample(raw: dict[str, Any], expected_hash: str | None = None) -> LatentClip:
    """A raw latent-shard sample -> LatentClip; SampleError when members are missing or unreadable."""
    key = str(raw.get("__key__"))
    if "latent.npy" not in raw:
        raise SampleError(f"sample {key} has no latent.npy member")
    meta = json.loads(raw["json"]) if "json" in raw else {}
    if expected_hash is not None and "vae_hash" in meta:
        check_vae_hash(str(meta["vae_hash"]), expected_hash, f"sample {key} of {raw.get('__url__')}")
    latent = torch.from_numpy(_npy(raw, "latent.npy").astype(np.float32, copy=False))
    if latent.ndim != 4:
        raise SampleError(f"sample {key}: latent.npy must be (C, T, H, W), got shape {tuple(latent.shape)}")
    text = mask = None
    if "text.npy" in raw:
        text = torch.from_numpy(_npy(raw, "text.npy").astype(np.float32, copy=False))
        mask = torch.from_numpy(_npy(raw, "mask.npy").astype(bool, copy=False))
    caption = raw["txt"].decode("utf-8") if "txt" in raw else ""
    _, t, h, w = latent.shape
    return LatentClip(Bucket(h, w, t), latent, text, mask, caption, key, {"key": key, **meta})


def collate_latents(items: Sequence[LatentClip]) -> dict[str, Any]:
    """Latent clips of one shape -> {"latent": (B, C, T, H, W), ["text": (B, L, D), "text_mask": (B, L)],
    "caption", "key", "meta"}."""
    if not items:
        raise ValueError("cannot collate an empty list of latent clips")
    shape = tuple(items[0].latent.shape)
    latent = new_batch((len(items), *shape), torch.float32)
    for i, item in enumerate(items):
        if tuple(item.latent.shape) != shape:
            raise ValueError(f"latent {item.key} has shape {tuple(item.latent.shape)}, batch needs {shape}")
        latent[i].copy_(item.latent)
    batch: dict[str, Any] = {
        "latent": latent,
        "caption": [c.caption for c in items],
        "key": [c.key for c in items],
        "meta": [c.meta for c in items],
    }
    if all(item.text is not None for item in items):
        batch["text"] = torch.stack([item.text for item in items])  # type: ignore[misc]
        batch["text_mask"] = torch.stack([item.mask for item in items])  # type: ignore[misc]
    return batch


class LatentDataset(VideoDataset):
    """The streaming pipeline of ``VideoDataset`` (modes, slots, padding) over latent shards."""

    def __init__(
        self,
        shards: str | Sequence[str],
        *,
        latent_shape: Sequence[int],
        expected_hash: str | None = None,
        **kwargs: Any,
    ) -> None:
        _, t, h, w = (int(v) for v in latent_shape)
        super().__init__(shards, None, buckets=[Bucket(h, w, t)], **kwargs)  # type: ignore[arg-type]
        self.expected_hash = expected_hash

    def _decode(self, sample: dict[str, Any], rng: np.random.Generator) -> LatentClip:
        return decode_latent_sample(sample, self.expected_hash)

    def collate(self, items: Sequence[Any]) -> dict[str, Any]:
        return collate_latents(items)


class LatentDataModule(VideoDataModule):
    """Train/val loaders of latent batches (see ``collate_latents``) from a precomputed latent corpus.

    ``vae_export`` (the stage-1 export stage 2 uses) is checked against the corpus manifest at
    ``setup``; a mismatch fails before training with both hashes named.
    """

    def __init__(
        self,
        root: str | None = None,
        train_shards: str | list[str] | None = None,
        val_shards: str | list[str] | None = None,
        manifest: str | None = None,
        vae_export: str | None = None,
        batch_size: int = 4,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        batches_per_epoch: int | None = None,
        val_batches: int | None = None,
        shuffle_buffer: int = 256,
        seed: int = 0,
        resampled: bool = True,
        max_skip_rate: float = 0.05,
        skip_check_after: int = 100,
        persistent_workers: bool = False,
        pin_memory: bool | Literal["auto"] = "auto",
        prefetch_factor: int | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        resume: Literal["exact", "epoch"] = "exact",
    ) -> None:
        # the pixel clip shape the latents stand for (checked against the corpus when given)
        clip_shape = {"num_frames": num_frames, "height": height, "width": width}
        # VideoDataModule validates its clip arguments (saved from this frame): valid stand-ins
        num_frames, height, width = num_frames or 1, height or 8, width or 8
        super().__init__(
            train_shards=train_shards,
            val_shards=val_shards,
            manifest=manifest,
            root=root,
            batch_size=batch_size,
            val_batch_size=val_batch_size,
            num_workers=num_workers,
            batches_per_epoch=batches_per_epoch,
            val_batches=val_batches,
            shuffle_buffer=shuffle_buffer,
            seed=seed,
            resampled=resampled,
            max_skip_rate=max_skip_rate,
            skip_check_after=skip_check_after,
            persistent_workers=persistent_workers,
            pin_memory=pin_memory,
            prefetch_factor=prefetch_factor,
            num_frames=num_frames,
            height=height,
            width=width,
            resume=resume,
        )
        if self.manifest is None:
            raise ValueError("LatentDataModule: needs a manifest (or root) to know the VAE and latent shape")
        self.vae_export = vae_export
        self.clip_shape = clip_shape
        self.latents: dict[str, Any] | None = None

    def read_latent_info(self) -> dict[str, Any]:
        """The corpus' latent metadata, checked against ``vae_export`` (LatentCorpusError on mismatch)."""
        if self.latents is None:
            info = latent_info(load_manifest(self.manifest), f"latent corpus {self.manifest}")
            options = (load_manifest(self.manifest) or {}).get("options", {})
            for name, value in self.clip_shape.items():
                if value is not None and name in options and options[name] != value:
                    raise LatentCorpusError(
                        f"data.{name}={value}, but latent corpus {self.manifest} was encoded from clips with "
                        f"{name}={options[name]}"
                    )
            if self.vae_export is not None:
                check_vae_hash(
                    str(info["vae_hash"]), export_hash(self.vae_export), f"latent corpus {self.manifest}"
                )
            self.latents = info
        return self.latents

    def setup(self, stage: str | None = None) -> None:
        info = self.read_latent_info()
        _, t, h, w = info["latent_shape"]
        self.buckets = [Bucket(int(h), int(w), int(t))]
        super().setup(stage)

    def _dataset(
        self,
        urls: list[str],
        clip: Any,
        batch_size: int,
        mode: Mode,
        batches: int | None,
        rank: int,
        world: int,
        counts: list[int] | None,
    ) -> VideoDataset:
        info = self.read_latent_info()
        stream = self._stream_args(batch_size, mode, batches, rank, world, counts)
        return LatentDataset(
            urls, latent_shape=info["latent_shape"], expected_hash=str(info["vae_hash"]), **stream
        )
