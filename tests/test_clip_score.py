"""CLIPScorer on a tiny random CLIP in tmp_path (shapes, range, determinism, processor parity); CLIPScore."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vdm.metrics.clip_score import CLIPScore, CLIPScorer


@pytest.fixture(scope="module")
def scorer(clip_dir: Path) -> CLIPScorer:
    return CLIPScorer(clip_dir)


def _videos(b: int = 2, t: int = 3, h: int = 40, w: int = 56, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, h, w, generator=g) * 2 - 1


def test_shape_range_and_determinism(scorer: CLIPScorer) -> None:
    videos, prompts = _videos(), ["a red ball moving left", "the cat on the grass"]
    cos = scorer(videos, prompts)
    assert cos.shape == (2,)
    assert torch.all(cos.abs() <= 1 + 1e-6)
    torch.testing.assert_close(scorer(videos, prompts), cos, rtol=0, atol=0)
    assert not scorer.training and not any(p.requires_grad for p in scorer.parameters())
    scorer.train()
    assert not scorer.model.training, "the scorer is frozen in eval mode"


def test_cosine_is_frame_mean(scorer: CLIPScorer) -> None:
    videos, prompts = _videos(b=1, t=4), ["a blue dog"]
    per_frame = [float(scorer(videos[:, :, i:i + 1], prompts)) for i in range(4)]
    assert float(scorer(videos, prompts)) == pytest.approx(float(np.mean(per_frame)), abs=1e-6)


@pytest.mark.parametrize(("h", "w"), [(40, 56), (64, 48), (32, 32)])
def test_preprocess_matches_processor(scorer: CLIPScorer, clip_dir: Path, h: int, w: int) -> None:
    from transformers import CLIPImageProcessor

    # a smooth image: resampling filters differ most on pixel noise, which real frames do not have
    g = torch.Generator().manual_seed(1)
    low = torch.rand(1, 3, 6, 6, generator=g)
    smooth = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0]
    u8 = (smooth * 255).round().to(torch.uint8)  # (3, H, W), the exact image both paths see
    expected = CLIPImageProcessor.from_pretrained(clip_dir)(
        images=Image.fromarray(u8.permute(1, 2, 0).numpy()), return_tensors="pt"
    )["pixel_values"]
    ours = scorer.preprocess((u8.float() / 255 * 2 - 1)[None])
    assert ours.shape == expected.shape == (1, 3, 32, 32)
    # one uint8 level is 1 / (255 * std) ~ 0.015 after normalisation
    torch.testing.assert_close(ours, expected.float(), rtol=0, atol=0.05)
    assert (ours - expected).abs().mean() < 0.01, (ours - expected).abs().max()


def test_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no_clip_here"
    with pytest.raises(FileNotFoundError, match="no_clip_here"):
        CLIPScorer(missing)


def test_metric_semantics() -> None:
    metric = CLIPScore()
    metric.update(torch.tensor([0.5, -0.2]))
    metric.update(torch.tensor([0.1]))
    out = metric.compute()
    assert float(out["clipsim"]) == pytest.approx((0.5 - 0.2 + 0.1) / 3)
    # per-video clamp then mean (20.0), not 100 * max(mean cosine, 0) (13.33)
    assert float(out["clip_score"]) == pytest.approx(100 * (0.5 + 0.0 + 0.1) / 3)


def test_metric_per_prompt_and_merge() -> None:
    a, b = CLIPScore(num_prompts=3), CLIPScore(num_prompts=3)
    a.update(torch.tensor([0.2, 0.4]), torch.tensor([0, 1]))
    b.update(torch.tensor([0.6, -0.4]), torch.tensor([0, 1]))
    a.merge_state(b)
    out = a.compute()
    assert float(out["clipsim/prompt_0"]) == pytest.approx(0.4)
    assert float(out["clipsim/prompt_1"]) == pytest.approx(0.0)
    assert torch.isnan(out["clipsim/prompt_2"])
    assert float(out["clipsim"]) == pytest.approx(0.2)
    assert float(out["clip_score"]) == pytest.approx(100 * 1.2 / 4)
    with pytest.raises(ValueError, match="prompt_index"):
        a.update(torch.tensor([0.1]))


def test_metric_with_scorer(scorer: CLIPScorer) -> None:
    metric = CLIPScore()
    cos = scorer(_videos(), ["a red ball", "a cat"])
    metric.update(cos)
    out = metric.compute()
    assert float(out["clipsim"]) == pytest.approx(float(cos.double().mean()))
    assert float(out["clip_score"]) == pytest.approx(float((100 * cos.double().clamp(min=0)).mean()))
