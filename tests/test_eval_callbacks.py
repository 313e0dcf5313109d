"""Training-time metric hooks: CLIP score / FVD of samples shared across ranks, reconstruction FVD."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers.modules import make_diffusion_module
from vdm.data.datamodule import VideoDataModule
from vdm.eval.prompts import PromptSpec, video_seed
from vdm.eval.text_to_video import fvd_protocol, real_videos, reference_statistics
from vdm.lightning.eval_callbacks import GenerationMetrics, ReconstructionFVD
from vdm.metrics.clip_score import CLIPScore, CLIPScorer
from vdm.metrics.frechet import FeatureStatistics, FrechetVideoDistance, frechet_distance, save_statistics
from vdm.metrics.i3d import fvd_preprocess, load_i3d

PROMPTS = ["a red ball moving left", "a blue cat on the grass", "a dog moving right"]
SHAPE = dict(num_frames=9, height=32, width=32)


def _trainer(rank: int = 0, world: int = 1, datamodule=None, barrier=lambda name=None: None):
    return SimpleNamespace(
        global_rank=rank,
        world_size=world,
        is_global_zero=rank == 0,
        datamodule=datamodule,
        global_step=3,
        fast_dev_run=False,
        callback_metrics={},
        loggers=[],
        strategy=SimpleNamespace(barrier=barrier),
    )


def _module(vae_export_dir: Path, text_encoder_dir: Path):
    torch.manual_seed(0)
    module = make_diffusion_module(vae_export_dir, text_encoder_dir)
    with torch.no_grad():  # a non-zero output layer, so the prompts matter
        for p in module.ema.module.final_layer.parameters():
            p.normal_(0, 0.1)
    return module


def _callback(
    clip_dir: Path | None, i3d: Path | None, reference: Path | None, videos_per_prompt: int = 2
) -> GenerationMetrics:
    return GenerationMetrics(
        prompts=PROMPTS,
        videos_per_prompt=videos_per_prompt,
        batch_size=3,
        num_steps=2,
        guidance_scale=2.0,
        seed=5,
        clip_path=str(clip_dir) if clip_dir else None,
        i3d_path=str(i3d) if i3d else None,
        reference_stats=str(reference) if reference else None,
        **SHAPE,
    )


def test_videos_are_dealt_round_robin_with_evaluate_seeds() -> None:
    callback = GenerationMetrics(prompts=PROMPTS, videos_per_prompt=2, seed=5, clip_path="unused")
    shares = [callback.items(rank, 2) for rank in range(2)]
    assert sorted(shares[0] + shares[1]) == callback.items(0, 1) and not set(shares[0]) & set(shares[1])
    assert [len(s) for s in shares] == [3, 3]
    for i, s, seed in callback.items(0, 1):
        assert seed == video_seed(PromptSpec(PROMPTS[i]), i, s, 5)
    assert not GenerationMetrics(prompts=PROMPTS).enabled
    with pytest.raises(ValueError, match="needs reference_stats"):
        GenerationMetrics(prompts=PROMPTS, i3d_path="x")


def test_generation_metrics_equal_direct_computation(
    vae_export_dir, text_encoder_dir, clip_dir, i3d_path, synthetic_root, tmp_path
):
    module = _module(vae_export_dir, text_encoder_dir)
    dm = VideoDataModule(root=str(synthetic_root), batch_size=2, num_workers=0, val_batches=2, **SHAPE)
    reference = tmp_path / "cache" / "real.pt"
    callback = _callback(clip_dir, i3d_path, reference)
    metrics = callback.run(_trainer(datamodule=dm), module)
    assert module.training  # restored after sampling

    # the reference statistics were computed from the validation split and cached with the protocol
    detector = load_i3d(i3d_path)
    protocol = fvd_protocol(str(i3d_path), 16, dm.val_shards)
    assert reference_statistics(detector, real_videos(dm), 16, tmp_path / "direct.pt", protocol) == 4
    cached, direct = (
        FeatureStatistics.load(reference, protocol),
        FeatureStatistics.load(tmp_path / "direct.pt"),
    )
    assert cached.count == 4
    torch.testing.assert_close(cached.mu, direct.mu, rtol=1e-9, atol=1e-9)

    # the same numbers from the module's samples, scored directly
    items = callback.items(0, 1)
    videos = module.eval().sample(
        [PROMPTS[i] for i, _, _ in items],
        **SHAPE,
        num_steps=2,
        guidance_scale=2.0,
        seed=[s for _, _, s in items],
    )
    videos = ((videos.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1
    clip = CLIPScore()
    clip.update(CLIPScorer(clip_dir)(videos, [PROMPTS[i] for i, _, _ in items]))
    fvd = FrechetVideoDistance(400, reference=direct)
    fvd.update(detector(fvd_preprocess(videos, num_frames=16)).double(), real=False)
    # CLIP runs in float32 on batches of 3 here and 6 there: the matmul kernels differ by CPU (AVX2 vs
    # AVX-512) and batch shape, which moves the score by ~1e-6 relative
    assert metrics["val/clip_score"] == pytest.approx(float(clip.compute()["clip_score"]), rel=1e-5)
    # I3D runs in float32 on batches of 3 here and 6 there: round-off, amplified by a rank-deficient fit
    assert metrics["val/fvd"] == pytest.approx(float(fvd.compute()), rel=1e-4)
    assert set(metrics) == {"val/clip_score", "val/clipsim", "val/fvd"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_metrics(rank: int, world: int, port: int, paths: dict[str, str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        module = _module(Path(paths["vae"]), Path(paths["text"]))
        callback = _callback(Path(paths["clip"]), Path(paths["i3d"]), Path(paths["reference"]), 1)
        calls = []
        sample = module.sample
        module.sample = lambda prompts, *a, **k: calls.append(len(prompts)) or sample(prompts, *a, **k)
        metrics = callback.run(_trainer(rank, world, barrier=lambda name=None: dist.barrier()), module)
        torch.save({"metrics": metrics, "videos": sum(calls)}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_share_generation_and_equal_one_rank(
    vae_export_dir, text_encoder_dir, clip_dir, i3d_path, tmp_path
):
    reference = tmp_path / "reference.pt"
    features = torch.randn(12, 400, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    stats = FeatureStatistics(400)
    stats.update(features)
    save_statistics(stats.compute(), reference, fvd_protocol(str(i3d_path), 16, None))
    paths = {
        "vae": str(vae_export_dir),
        "text": str(text_encoder_dir),
        "clip": str(clip_dir),
        "i3d": str(i3d_path),
        "reference": str(reference),
    }
    mp.spawn(_rank_metrics, args=(2, _free_port(), paths, str(tmp_path)), nprocs=2, join=True)
    single = _callback(clip_dir, i3d_path, reference, 1).run(
        _trainer(), _module(vae_export_dir, text_encoder_dir)
    )
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # 3 videos: rank 0 scores two, rank 1 one plus an unscored stand-in, so both make the same calls
    assert [r["videos"] for r in results] == [2, 2]
    for result in results:
        assert result["metrics"].keys() == single.keys()
        for key, value in single.items():
            assert result["metrics"][key] == pytest.approx(value, rel=1e-4), key


def test_reconstruction_fvd_caches_the_real_side(i3d_path, monkeypatch):
    callback = ReconstructionFVD(str(i3d_path))
    logged = {}
    trainer = _trainer()
    module = SimpleNamespace(device=torch.device("cpu"), log=lambda k, v: logged.__setitem__(k, float(v)))
    trainer.sanity_checking = False
    x = torch.rand(4, 3, 9, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noisy = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)

    def epoch(x_hat: torch.Tensor) -> float:
        callback.on_validation_epoch_start(trainer, module)
        for i in range(0, 4, 2):
            callback.on_validation_batch_end(
                trainer, module, {"x": x[i : i + 2], "x_hat": x_hat[i : i + 2]}, None, i
            )
        callback.on_validation_epoch_end(trainer, module)
        return logged.pop("val/rfvd")

    assert epoch(x) == pytest.approx(0.0, abs=1e-5)
    calls = []
    detector = callback._i3d
    monkeypatch.setattr(callback, "_i3d", lambda v: calls.append(v.shape[0]) or detector(v))
    worse = epoch(noisy)
    assert calls == [2, 2]  # the real side was kept from the first validation: only reconstructions run
    real, fake = FeatureStatistics(400), FeatureStatistics(400)
    real.update(detector(fvd_preprocess(x)).double())
    fake.update(detector(fvd_preprocess(noisy)).double())
    r, f = real.compute(), fake.compute()
    assert worse == pytest.approx(frechet_distance(r.mu, r.sigma, f.mu, f.sigma), rel=1e-5) and worse > 0
    assert ReconstructionFVD(None)._active is False
