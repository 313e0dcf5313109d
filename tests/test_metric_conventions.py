"""The metric conventions that published numbers differ by are options, recorded in every protocol:
I3D's batch-norm epsilon, the FVD covariance normalisation and the CLIP score aggregation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vdm.config.rules import ConfigError, check_project_rules
from vdm.eval.text_to_video import fvd_protocol
from vdm.metrics.clip_score import CLIPScore
from vdm.metrics.frechet import FeatureStatistics, FrechetVideoDistance, frechet_distance, save_statistics
from vdm.metrics.i3d import InceptionI3d, fvd_preprocess, load_i3d


@pytest.fixture(scope="module")
def i3d_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random I3D weights whose batch norms have small running variances, as trained ones do, so that the
    epsilon added to them matters (the scales follow, so activations keep their size through the net)."""
    torch.manual_seed(0)
    model = InceptionI3d()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_var.uniform_(1e-3, 1e-2)
                module.weight.copy_(module.running_var.sqrt())
    path = tmp_path_factory.mktemp("i3d") / "i3d_pretrained_400.pt"
    torch.save(model.state_dict(), path)
    return path


def test_i3d_batch_norm_epsilon_is_an_option(i3d_weights: Path) -> None:
    video = fvd_preprocess(torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    logits = {}
    for eps in (1e-3, 1e-5):
        model = load_i3d(i3d_weights, bn_eps=eps)
        norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d)]
        assert norms and all(m.eps == eps for m in norms)
        with torch.no_grad():
            logits[eps] = model(video)
    relative = (logits[1e-3] - logits[1e-5]).norm() / logits[1e-5].norm()
    assert relative > 1e-3  # the two settings give different features: they must not be mixed
    # and the protocol says which one made a score, so cached statistics of the other are refused
    a = fvd_protocol(str(i3d_weights), 16, "val", bn_eps=1e-3)
    b = fvd_protocol(str(i3d_weights), 16, "val", bn_eps=1e-5)
    assert (a["i3d_bn_eps"], b["i3d_bn_eps"]) == (1e-3, 1e-5)


def test_reference_statistics_of_another_convention_are_refused(tmp_path: Path, i3d_weights: Path) -> None:
    stats = FeatureStatistics(4)
    stats.update(torch.randn(10, 4, dtype=torch.float64))
    path = tmp_path / "ref.pt"
    made = fvd_protocol(str(i3d_weights), 16, "val", bn_eps=1e-3, covariance="unbiased")
    save_statistics(stats.compute(), path, made)
    FeatureStatistics.load(path, expected_protocol=made)
    for change in ({"bn_eps": 1e-5}, {"covariance": "biased"}):
        options = {"bn_eps": 1e-3, "covariance": "unbiased", **change}
        other = fvd_protocol(str(i3d_weights), 16, "val", **options)
        with pytest.raises(ValueError, match="i3d_bn_eps|covariance"):
            FeatureStatistics.load(path, expected_protocol=other)


def test_fvd_covariance_unbiased_or_biased() -> None:
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    fake = torch.randn(30, 6, generator=gen, dtype=torch.float64) * 1.3 + 0.2
    values = {}
    for covariance, bias in (("unbiased", False), ("biased", True)):
        stats = FeatureStatistics(6, covariance=covariance)
        stats.update(real)
        sigma = torch.from_numpy(np.cov(real.numpy(), rowvar=False, bias=bias))
        torch.testing.assert_close(stats.compute().sigma, sigma)
        fvd = FrechetVideoDistance(6, covariance=covariance)
        fvd.update(real, real=True)
        fvd.update(fake, real=False)
        expected = frechet_distance(
            real.mean(0), sigma, fake.mean(0), torch.from_numpy(np.cov(fake.numpy(), rowvar=False, bias=bias))
        )
        values[covariance] = float(fvd.compute())
        assert values[covariance] == pytest.approx(expected, rel=1e-9)
    assert values["biased"] != pytest.approx(values["unbiased"], rel=1e-3)
    one = FeatureStatistics(6, covariance="biased")
    one.update(real[:1])
    assert one.compute().sigma.abs().max() == 0  # N = 1 is defined when dividing by N
    with pytest.raises(ValueError, match="covariance must be one of"):
        FeatureStatistics(6, covariance="population")  # type: ignore[arg-type]


def test_clip_score_aggregation() -> None:
    cosines = torch.tensor([-0.5, 0.3, 0.1])
    scores = {}
    for aggregation in ("per_video", "mean"):
        metric = CLIPScore(aggregation=aggregation)
        metric.update(cosines)
        values = metric.compute()
        assert float(values["clipsim"]) == pytest.approx(-0.1 / 3)
        scores[aggregation] = float(values["clip_score"])
    assert scores["per_video"] == pytest.approx((0 + 30 + 10) / 3)  # each video clamped at 0, then averaged
    # torchmetrics' CLIPScore.compute(): max(sum of 100 * cos / n, 0), the clamp of the mean
    assert scores["mean"] == max(float(100 * cosines.double().sum() / 3), 0.0) == 0.0
    positive = torch.tensor([0.2, 0.3])
    same = []
    for aggregation in ("per_video", "mean"):
        metric = CLIPScore(aggregation=aggregation)
        metric.update(positive)
        same.append(float(metric.compute()["clip_score"]))
    assert same[0] == pytest.approx(same[1]) == pytest.approx(25.0)
    with pytest.raises(ValueError, match="aggregation must be one of"):
        CLIPScore(aggregation="median")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("i3d_bn_eps", 0.0, "metrics.i3d_bn_eps: expected an epsilon > 0"),
        ("fvd_covariance", "population", "metrics.fvd_covariance: expected one of"),
        ("clip_aggregation", "median", "metrics.clip_aggregation: expected one of"),
    ],
)
def test_bad_convention_fails_before_training(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_project_rules({"metrics": {key: value}})
