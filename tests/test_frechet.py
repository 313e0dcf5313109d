"""Frechet distance against closed forms and scipy, exact streaming/merged statistics, a 2-rank gloo FVD."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vdm.metrics.frechet import FeatureStatistics, FrechetVideoDistance, frechet_distance


def _random_stats(d: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = x @ torch.randn(d, d, generator=g, dtype=torch.float64)
    return x.mean(0), torch.cov(x.T)


def _scipy_fd(mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor, s2: torch.Tensor) -> float:
    covmean = scipy.linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    diff = (mu1 - mu2).numpy()
    return float(diff @ diff + np.trace(s1.numpy()) + np.trace(s2.numpy()) - 2 * np.trace(covmean))


@pytest.mark.parametrize(
    ("m1", "s1", "m2", "s2"), [(0.0, 1.0, 0.0, 1.0), (1.0, 2.0, -0.5, 0.5), (3.0, 0.1, 3.0, 4.0)]
)
def test_one_dimensional_gaussians(m1: float, s1: float, m2: float, s2: float) -> None:
    def t(v: list) -> torch.Tensor:
        return torch.tensor(v, dtype=torch.float64)

    fd = frechet_distance(t([m1]), t([[s1**2]]), t([m2]), t([[s2**2]]))
    assert fd == pytest.approx((m1 - m2) ** 2 + (s1 - s2) ** 2, abs=1e-12)


def test_diagonal_covariances() -> None:
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(2, 6, generator=g, dtype=torch.float64)
    v1, v2 = torch.rand(2, 6, generator=g, dtype=torch.float64) + 0.1
    expected = float(((m1 - m2) ** 2 + (v1.sqrt() - v2.sqrt()) ** 2).sum())
    assert frechet_distance(m1, torch.diag(v1), m2, torch.diag(v2)) == pytest.approx(expected, rel=1e-10)


def test_identical_statistics_give_zero() -> None:
    mu, sigma = _random_stats(16, 40, seed=1)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    # rank-deficient (n < D) covariances are the common FVD case: still ~0, no complex noise
    mu, sigma = _random_stats(32, 8, seed=2)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_rotation_invariance_and_scaling() -> None:
    mu1, s1 = _random_stats(8, 50, seed=3)
    mu2, s2 = _random_stats(8, 50, seed=4)
    fd = frechet_distance(mu1, s1, mu2, s2)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    rotated = frechet_distance(q @ mu1, q @ s1 @ q.T, q @ mu2, q @ s2 @ q.T)
    assert rotated == pytest.approx(fd, rel=1e-9)
    a = 3.5
    assert frechet_distance(a * mu1, a**2 * s1, a * mu2, a**2 * s2) == pytest.approx(a**2 * fd, rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_scipy_sqrtm(seed: int) -> None:
    mu1, s1 = _random_stats(12, 100, seed=10 + seed)
    mu2, s2 = _random_stats(12, 100, seed=20 + seed)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_scipy_fd(mu1, s1, mu2, s2), rel=1e-6)


def _features(n: int = 60, d: int = 5, seed: int = 0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.arange(1, d + 1) + shift


def test_streaming_equals_one_batch_and_numpy() -> None:
    x = _features()
    streamed, whole = FeatureStatistics(5), FeatureStatistics(5)
    for chunk in x.split(7):
        streamed.update(chunk)
    whole.update(x)
    a, b = streamed.compute(), whole.compute()
    assert a.count == b.count == 60
    torch.testing.assert_close(a.mu, b.mu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.sigma, b.sigma, rtol=1e-10, atol=1e-12)
    x64 = x.double().numpy()
    np.testing.assert_allclose(a.mu.numpy(), x64.mean(0), rtol=1e-12)
    np.testing.assert_allclose(a.sigma.numpy(), np.cov(x64, rowvar=False), rtol=1e-10, atol=1e-12)


def test_merged_ranks_equal_single_instance() -> None:
    x = _features(n=41)
    ranks = [FeatureStatistics(5), FeatureStatistics(5)]
    ranks[0].update(x[:20])
    ranks[1].update(x[20:])
    ranks[0].merge_state(ranks[1])
    summed = {k: getattr(ranks[0], k) for k in ("count", "sum", "outer")}
    single = FeatureStatistics(5)
    single.update(x)
    for key, value in summed.items():
        torch.testing.assert_close(value, getattr(single, key), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ranks[0].compute().sigma, single.compute().sigma, rtol=1e-12, atol=1e-12)


def test_save_load_round_trip_and_protocol(tmp_path: Path) -> None:
    stats = FeatureStatistics(5)
    stats.update(_features())
    protocol = {"detector": "i3d", "frames": 16, "resolution": [224, 224]}
    path = tmp_path / "real_stats.pt"
    stats.save(path, protocol)
    loaded = FeatureStatistics.load(path, expected_protocol=protocol)
    ref = stats.compute()
    assert loaded.count == ref.count
    torch.testing.assert_close(loaded.mu, ref.mu, rtol=0, atol=0)
    torch.testing.assert_close(loaded.sigma, ref.sigma, rtol=0, atol=0)
    FeatureStatistics.load(path)  # no expectation: no check
    with pytest.raises(ValueError, match="frames") as err:
        FeatureStatistics.load(path, expected_protocol={**protocol, "frames": 32})
    assert "detector" not in str(err.value)
    with pytest.raises(ValueError, match="fps"):
        FeatureStatistics.load(path, expected_protocol={**protocol, "fps": 8})


def test_too_few_samples() -> None:
    stats = FeatureStatistics(5)
    stats.update(_features(n=1))
    with pytest.raises(ValueError, match="count=1"):
        stats.compute()
    with pytest.raises(ValueError, match="features must be"):
        stats.update(torch.zeros(2, 4))


def test_fvd_metric_matches_function_and_reference() -> None:
    real, fake = _features(seed=1), _features(seed=2, shift=0.5)
    fvd = FrechetVideoDistance(5)
    for r, f in zip(real.split(16), fake.split(16)):
        fvd.update(r, real=True)
        fvd.update(f, real=False)
    expected = frechet_distance(real.double().mean(0), torch.cov(real.double().T),
                                fake.double().mean(0), torch.cov(fake.double().T))
    assert float(fvd.compute()) == pytest.approx(expected, rel=1e-10)
    ref_stats = FeatureStatistics(5)
    ref_stats.update(real)
    with_ref = FrechetVideoDistance(5, reference=ref_stats.compute())
    with_ref.update(fake, real=False)
    assert float(with_ref.compute()) == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError, match="reference"):
        with_ref.update(real, real=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_fvd(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        real, fake = _features(seed=1), _features(seed=2, shift=0.5)
        fvd = FrechetVideoDistance(5)
        fvd.update(real[rank::world], real=True)  # uneven split on purpose: 60 rows, strided
        fvd.update(fake[rank * 25:(rank + 1) * 25 + rank * 10], real=False)
        value = fvd.compute()  # torchmetrics all-gathers and sums the states
        torch.save(value, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_rank_fvd_equals_single_process(tmp_path: Path) -> None:
    mp.spawn(_rank_fvd, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = FrechetVideoDistance(5)
    single.update(_features(seed=1), real=True)
    single.update(_features(seed=2, shift=0.5), real=False)
    expected = float(single.compute())
    for rank in range(2):
        value = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert float(value) == pytest.approx(expected, rel=1e-9)
