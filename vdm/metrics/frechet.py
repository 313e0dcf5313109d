"""Frechet distance between Gaussian fits of feature sets (FVD/FID maths), with exact streaming statistics.

The detector (I3D, Inception, ...) is not owned here: callers pass features (B, D), so the statistics and
the distance stay generic and testable. All accumulation is float64 sums, which merge exactly across ranks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torchmetrics import Metric

from vdm.utils.io import atomic_path

#: how a covariance is normalised: by N - 1 (unbiased: numpy's np.cov, pytorch-fid, torchmetrics) or by N
#: (biased: StyleGAN-V's and cd-fvd's FVD, which take StyleGAN2-ADA's feature statistics)
Covariance = Literal["unbiased", "biased"]
COVARIANCES: tuple[str, ...] = ("unbiased", "biased")


class GaussianStatistics(NamedTuple):
    """Mean (D,) and covariance (D, D) of ``count`` feature vectors, float64."""

    mu: torch.Tensor
    sigma: torch.Tensor
    count: int


def _psd_sqrt(sigma: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a PSD matrix (D, D) via eigh; round-off negative eigenvalues clamp to 0."""
    evals, evecs = torch.linalg.eigh(sigma)
    return (evecs * evals.clamp(min=0).sqrt()) @ evecs.T


def frechet_distance(
    mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2): mu (D,), sigma (D, D) -> float >= 0.

    FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2). For PSD S1, S2 the product S1 S2 is similar to
    the symmetric PSD M = sqrt(S1) S2 sqrt(S1), so tr sqrt(S1 S2) = tr sqrt(M) = sum sqrt(eigvalsh(M)).
    Working with symmetric eigendecompositions in float64 avoids scipy's complex ``sqrtm`` of a
    non-symmetric product, whose spurious imaginary parts and instability on near-singular covariances
    (D > n) are the usual source of FID/FVD noise.
    """
    mu1, mu2 = mu1.double().flatten(), mu2.double().flatten()
    sigma1, sigma2 = sigma1.double(), sigma2.double()
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.numel(),) * 2:
        raise ValueError(
            f"shape mismatch: mu1 {tuple(mu1.shape)}, mu2 {tuple(mu2.shape)}, "
            f"sigma1 {tuple(sigma1.shape)}, sigma2 {tuple(sigma2.shape)}"
        )
    root1 = _psd_sqrt(sigma1)
    m = root1 @ sigma2 @ root1
    m = (m + m.T) / 2  # remove round-off asymmetry so eigvalsh sees the symmetric matrix it assumes
    tr_covmean = torch.linalg.eigvalsh(m).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    fd = diff.dot(diff) + sigma1.trace() + sigma2.trace() - 2 * tr_covmean
    return max(float(fd), 0.0)  # cancellation can leave ~-1e-12 for identical inputs


def check_covariance(covariance: str) -> None:
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {list(COVARIANCES)}, got {covariance!r}")


def _gaussian(
    count: torch.Tensor, total: torch.Tensor, outer: torch.Tensor, covariance: Covariance = "unbiased"
) -> GaussianStatistics:
    n = int(count.item())
    divisor = n - 1 if covariance == "unbiased" else n
    if divisor < 1:
        raise ValueError(f"need at least {2 if covariance == 'unbiased' else 1} feature vectors for a "
                         f"{covariance} covariance, got count={n}")
    mu = total / n
    # sum_i (x_i - mu)(x_i - mu)^T = sum_i x_i x_i^T - n mu mu^T, divided by n - 1 (unbiased) or n (biased)
    sigma = (outer - n * torch.outer(mu, mu)) / divisor
    return GaussianStatistics(mu, (sigma + sigma.T) / 2, n)


def _check_features(features: torch.Tensor, dim: int) -> torch.Tensor:
    if features.ndim != 2 or features.shape[1] != dim:
        raise ValueError(f"features must be (B, {dim}), got {tuple(features.shape)}")
    return features.detach().double()


def save_statistics(stats: GaussianStatistics, path: str | Path, protocol: dict[str, Any]) -> None:
    """Write ``stats`` with their JSON ``protocol`` to ``path`` atomically (temp file, then rename)."""
    payload = {
        "mu": stats.mu.cpu(),
        "sigma": stats.sigma.cpu(),
        "count": torch.tensor(stats.count, dtype=torch.int64),
        "protocol": json.dumps(protocol, sort_keys=True),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


class FeatureStatistics(Metric):
    """Streaming mean and covariance (``covariance``: unbiased or biased) of features (B, D), float64 sums
    merged exactly across ranks."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, num_features: int, covariance: Covariance = "unbiased", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_covariance(covariance)
        self.num_features, self.covariance = num_features, covariance
        d = num_features
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum", torch.zeros(d, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("outer", torch.zeros(d, d, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, features: torch.Tensor) -> None:
        """Accumulate features (B, D)."""
        f = _check_features(features, self.num_features)
        self.count += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def compute(self) -> GaussianStatistics:
        """(mu (D,), sigma (D, D), count) of everything seen on all ranks; needs count >= 2 (unbiased)."""
        return _gaussian(self.count, self.sum, self.outer, self.covariance)

    def save(self, path: str | Path, protocol: dict[str, Any]) -> None:
        """Write mu, sigma, count and the feature protocol (detector, frames, resolution...) to ``path``.

        This is the cached reference statistics of real data; ``protocol`` must be JSON-serialisable.
        ``compute()`` merges ranks, so under distribution call it on every rank and let one rank write
        the result with :func:`save_statistics`.
        """
        save_statistics(self.compute(), path, protocol)

    @staticmethod
    def load(path: str | Path, expected_protocol: dict[str, Any] | None = None) -> GaussianStatistics:
        """Read statistics written by ``save``; refuses a file whose protocol differs from the expected one.

        Raises:
            ValueError: naming every key whose value differs (or exists on one side only).
        """
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
        stored = json.loads(payload["protocol"])
        if expected_protocol is not None:
            # round-trip through JSON so tuples/lists and int/float keys compare the way they were stored
            expected = json.loads(json.dumps(expected_protocol, sort_keys=True))
            differing = sorted(k for k in stored.keys() | expected.keys() if stored.get(k) != expected.get(k))
            if differing:
                details = ", ".join(f"{k}: stored {stored.get(k)!r} != expected {expected.get(k)!r}"
                                    for k in differing)
                raise ValueError(f"reference statistics {path} use another protocol: {details}")
        return GaussianStatistics(payload["mu"].double(), payload["sigma"].double(), int(payload["count"]))


class FrechetVideoDistance(Metric):
    """FVD/FID from caller-supplied detector features: real and fake Gaussian fits, then ``frechet_distance``.

    With ``reference`` (e.g. from ``FeatureStatistics.load``) the real side is fixed and only fake features
    are accumulated; otherwise both sides stream through ``update(features, real=...)``. ``covariance``
    normalises the fits by N - 1 (unbiased) or N (biased); a reference must have been made the same way
    (its protocol records it).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(
        self,
        num_features: int,
        reference: GaussianStatistics | None = None,
        covariance: Covariance = "unbiased",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_covariance(covariance)
        self.num_features, self.covariance = num_features, covariance
        d = num_features
        if reference is not None and reference.mu.shape != (d,):
            raise ValueError(f"reference mu has shape {tuple(reference.mu.shape)}, expected ({d},)")
        self.reference = reference
        for side in ("real", "fake"):
            self.add_state(f"{side}_count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_sum", torch.zeros(d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_outer", torch.zeros(d, d, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, features: torch.Tensor, real: bool) -> None:
        """Accumulate detector features (B, D) of real or generated videos."""
        if real and self.reference is not None:
            raise ValueError("real statistics are fixed by `reference`; update only with real=False")
        f = _check_features(features, self.num_features)
        side = "real" if real else "fake"
        setattr(self, f"{side}_count", getattr(self, f"{side}_count") + f.shape[0])
        setattr(self, f"{side}_sum", getattr(self, f"{side}_sum") + f.sum(0))
        setattr(self, f"{side}_outer", getattr(self, f"{side}_outer") + f.T @ f)

    def compute(self) -> torch.Tensor:
        """Frechet distance (scalar float64 tensor) between the real (or reference) and fake fits."""
        if self.reference is not None:
            mu_r, sigma_r = self.reference.mu, self.reference.sigma
        else:
            mu_r, sigma_r, _ = _gaussian(self.real_count, self.real_sum, self.real_outer, self.covariance)
        mu_f, sigma_f, _ = _gaussian(self.fake_count, self.fake_sum, self.fake_outer, self.covariance)
        fd = frechet_distance(mu_r.to(mu_f.device), sigma_r.to(mu_f.device), mu_f, sigma_f)
        return torch.tensor(fd, dtype=torch.float64)
