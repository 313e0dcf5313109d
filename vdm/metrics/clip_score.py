"""CLIP text-video similarity: per-video mean over frames of cos(image embedding, prompt embedding).

Preprocessing reproduces the checkpoint's ``CLIPImageProcessor`` (bicubic shorter-side resize, centre crop,
mean/std normalisation) with torch ops on the video tensor, so scoring runs batched on the GPU without a
round trip through PIL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torchmetrics import Metric


def _size_dict(size: Any) -> dict[str, int]:
    """Processor size (dict or transformers ``SizeDict``) -> plain dict of the keys that are set."""
    keys = ("shortest_edge", "height", "width")
    items = size.items() if isinstance(size, dict) else ((k, getattr(size, k, None)) for k in keys)
    return {k: int(v) for k, v in items if k in keys and v is not None}


def _resized_shape(h: int, w: int, size: dict[str, int]) -> tuple[int, int]:
    if "shortest_edge" in size:
        # same rounding as transformers' get_resize_output_image_size(default_to_square=False)
        short, long = (h, w) if h <= w else (w, h)
        new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
        return (new_short, new_long) if h <= w else (new_long, new_short)
    return size["height"], size["width"]


class CLIPScorer(nn.Module):
    """Frozen CLIP from a local directory (``save_pretrained`` layout of model, tokenizer, image processor).

    Args:
        path: directory holding the CLIP checkpoint; nothing is ever downloaded.
        max_length: prompt token limit; defaults to the text model's position count (77 for OpenAI CLIP).
    """

    def __init__(self, path: str | Path, max_length: int | None = None) -> None:
        super().__init__()
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"CLIP checkpoint directory not found: {path}")
        self.model = CLIPModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
        self.size = _size_dict(processor.size)
        crop = _size_dict(processor.crop_size)
        self.crop = (crop["height"], crop["width"]) if "height" in crop else (crop["shortest_edge"],) * 2
        self.max_length = max_length or self.model.config.text_config.max_position_embeddings
        # buffers so .to(device) moves them with the model; non-persistent: they come from the processor
        self.register_buffer("mean", torch.tensor(processor.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(processor.image_std).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def train(self, mode: bool = True) -> CLIPScorer:
        """Stays in eval mode: the scorer is a frozen measurement, never trained."""
        return super().train(False)

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames (N, 3, H, W) in [-1, 1] -> CLIP pixel values (N, 3, crop_h, crop_w), normalised."""
        x = ((frames.float() + 1) / 2).clamp(0, 1)
        h, w = _resized_shape(x.shape[-2], x.shape[-1], self.size)
        if (h, w) != tuple(x.shape[-2:]):
            # antialias matches PIL's bicubic filter when downscaling; clamp as PIL's uint8 output does
            x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        ch, cw = self.crop
        if ch > h or cw > w:
            raise ValueError(f"frames resized to {h}x{w} are smaller than the {ch}x{cw} crop")
        top, left = int((h - ch) / 2.0), int((w - cw) / 2.0)  # transformers' centre-crop rounding
        x = x[..., top:top + ch, left:left + cw]
        return (x - self.mean) / self.std

    @staticmethod
    def _features(out: Any) -> torch.Tensor:
        # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def embed_text(self, prompts: list[str]) -> torch.Tensor:
        """Prompts (B,) -> L2-normalised text embeddings (B, E)."""
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.mean.device)
        out = self.model.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        )
        return F.normalize(self._features(out).float(), dim=-1)

    @torch.no_grad()
    def embed_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames (N, 3, H, W) in [-1, 1] -> L2-normalised image embeddings (N, E)."""
        out = self.model.get_image_features(pixel_values=self.preprocess(frames))
        return F.normalize(self._features(out).float(), dim=-1)

    @torch.no_grad()
    def forward(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Videos (B, 3, T, H, W) in [-1, 1] and B prompts -> (B,) frame-mean cosine, in [-1, 1]."""
        b, c, t = videos.shape[:3]
        if c != 3 or len(prompts) != b:
            raise ValueError(f"expected videos (B, 3, T, H, W) and B prompts, got {tuple(videos.shape)} "
                             f"and {len(prompts)} prompts")
        image = self.embed_frames(rearrange(videos, "b c t h w -> (b t) c h w"))  # (B*T, E)
        image = rearrange(image, "(b t) e -> b t e", b=b, t=t)
        text = self.embed_text(prompts)  # (B, E)
        return torch.einsum("bte,be->bt", image, text).mean(dim=1)


#: how ``clip_score`` aggregates videos: clamp each video's score at 0, then average (per_video), or
#: average, then clamp (mean: torchmetrics' CLIPScore)
ClipAggregation = Literal["per_video", "mean"]
CLIP_AGGREGATIONS: tuple[str, ...] = ("per_video", "mean")


class CLIPScore(Metric):
    """Accumulates per-video CLIP cosines (from ``CLIPScorer``); sums merge exactly across ranks.

    ``compute()`` returns
      - ``clipsim``: mean over videos of cos_video (the CLIPSIM of video generation papers; cos_video is
        the frame-averaged cosine), and
      - ``clip_score``, aggregated as ``aggregation`` says:
          * ``per_video`` (default): mean over videos of 100 * max(cos_video, 0), each video clamped at 0
            (Hessel et al.'s CLIPScore is defined per image-caption pair, then averaged);
          * ``mean``: max(100 * mean over videos of cos_video, 0), torchmetrics' ``CLIPScore``, which sums
            the unclamped scores and clamps only the final mean.
        The two agree while no video's cosine is negative, as is usual for real prompts.
    With ``num_prompts``, ``update`` also takes each video's prompt index and ``compute`` adds
    ``clipsim/prompt_{i}`` (mean cosine per prompt; NaN for a prompt never seen).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, num_prompts: int | None = None, aggregation: ClipAggregation = "per_video",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if aggregation not in CLIP_AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {list(CLIP_AGGREGATIONS)}, got {aggregation!r}")
        self.num_prompts, self.aggregation = num_prompts, aggregation
        f64 = torch.float64
        self.add_state("cos_sum", torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        self.add_state("score_sum", torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        if num_prompts is not None:
            self.add_state("prompt_cos_sum", torch.zeros(num_prompts, dtype=f64), dist_reduce_fx="sum")
            self.add_state("prompt_count", torch.zeros(num_prompts, dtype=f64), dist_reduce_fx="sum")

    def update(self, cosines: torch.Tensor, prompt_index: torch.Tensor | None = None) -> None:
        """Add per-video cosines (B,) in [-1, 1]; ``prompt_index`` (B,) int when tracking per prompt."""
        cos = cosines.detach().double().flatten()
        self.cos_sum += cos.sum()
        self.score_sum += (100 * cos.clamp(min=0)).sum()
        self.count += cos.numel()
        if self.num_prompts is not None:
            if prompt_index is None:
                raise ValueError("CLIPScore(num_prompts=...) needs prompt_index in update()")
            idx = prompt_index.to(cos.device).long().flatten()
            self.prompt_cos_sum.index_add_(0, idx, cos)
            self.prompt_count.index_add_(0, idx, torch.ones_like(cos))

    def compute(self) -> dict[str, torch.Tensor]:
        """{"clipsim": mean cos, "clip_score": as ``aggregation`` says} (+ per-prompt clipsim if tracked)."""
        if self.count == 0:
            raise ValueError("CLIPScore.compute() before any update (count=0)")
        clipsim = self.cos_sum / self.count
        if self.aggregation == "per_video":
            score = self.score_sum / self.count
        else:
            score = (100 * clipsim).clamp(min=0)
        out = {"clipsim": clipsim, "clip_score": score}
        if self.num_prompts is not None:
            per_prompt = self.prompt_cos_sum / self.prompt_count  # 0/0 -> NaN for prompts never seen
            out.update({f"clipsim/prompt_{i}": v for i, v in enumerate(per_prompt)})
        return out
