"""I3D detector for FVD: key layout, strict loading, features, preprocessing, TorchScript adapter."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from torch import nn

from vdm.metrics.i3d import InceptionI3d, TorchScriptI3d, detector_hash, fvd_preprocess, load_i3d

# pinned so an architecture change cannot go unnoticed: 12,287,264 trunk + 1024 * 400 + 400 logits
NUM_PARAMS = 12_697_264
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(scope="module")
def i3d() -> InceptionI3d:
    torch.manual_seed(0)
    return InceptionI3d()


@pytest.fixture(scope="module")
def weights(i3d: InceptionI3d, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("i3d") / "i3d_pretrained_400.pt"
    torch.save(i3d.state_dict(), path)
    return path


def _video(b: int = 1, t: int = 9, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, size, size, generator=g) * 2 - 1


def test_state_dict_layout(i3d: InceptionI3d) -> None:
    sd = i3d.state_dict()
    assert sum(p.numel() for p in i3d.parameters()) == NUM_PARAMS
    assert [k for k in sd if k.startswith("Conv3d_1a_7x7.")] == ["Conv3d_1a_7x7.conv3d.weight"] + [
        f"Conv3d_1a_7x7.bn.{k}" for k in BN_KEYS
    ]
    branches = ("b0", "b1a", "b1b", "b2a", "b2b", "b3b")  # b3a is a parameter-free max pool
    expected = {f"Mixed_4f.{b}.conv3d.weight" for b in branches}
    expected |= {f"Mixed_4f.{b}.bn.{k}" for b in branches for k in BN_KEYS}
    assert {k for k in sd if k.startswith("Mixed_4f.")} == expected
    assert {k for k in sd if k.startswith("logits.")} == {"logits.conv3d.weight", "logits.conv3d.bias"}
    shapes = {
        "Conv3d_1a_7x7.conv3d.weight": (64, 3, 7, 7, 7),
        "Conv3d_2b_1x1.conv3d.weight": (64, 64, 1, 1, 1),
        "Conv3d_2c_3x3.conv3d.weight": (192, 64, 3, 3, 3),
        "Mixed_3b.b1b.conv3d.weight": (128, 96, 3, 3, 3),
        "Mixed_3c.b3b.conv3d.weight": (64, 256, 1, 1, 1),
        "Mixed_4b.b0.conv3d.weight": (192, 480, 1, 1, 1),
        "Mixed_4f.b2b.bn.running_mean": (128,),
        "Mixed_5b.b0.conv3d.weight": (256, 832, 1, 1, 1),
        "Mixed_5c.b2b.conv3d.weight": (128, 48, 3, 3, 3),
        "logits.conv3d.weight": (400, 1024, 1, 1, 1),
        "logits.conv3d.bias": (400,),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    bn = i3d.Mixed_3b.b0.bn
    assert bn.eps == 1e-3 and bn.momentum == 0.01
    assert InceptionI3d(bn_eps=1e-5).Mixed_3b.b0.bn.eps == 1e-5


def test_frozen_eval(i3d: InceptionI3d) -> None:
    i3d.train()
    assert not any(m.training for m in i3d.modules())
    assert not any(p.requires_grad for p in i3d.parameters())


def test_load_roundtrip_and_hash(i3d: InceptionI3d, weights: Path) -> None:
    loaded = load_i3d(weights)
    assert isinstance(loaded, InceptionI3d) and not loaded.training
    for key, value in i3d.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    x = _video()
    torch.testing.assert_close(loaded(x), i3d(x), rtol=0, atol=0)
    assert load_i3d(str(weights), bn_eps=1e-5).Conv3d_1a_7x7.bn.eps == 1e-5
    assert detector_hash(weights) == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_load_module_prefix_and_old_bn_counters(i3d: InceptionI3d, tmp_path: Path) -> None:
    sd = {f"module.{k}": v for k, v in i3d.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "dp.pt")
    loaded = load_i3d(tmp_path / "dp.pt")
    torch.testing.assert_close(loaded.logits.conv3d.bias, i3d.logits.conv3d.bias, rtol=0, atol=0)


def test_load_fails_loudly(i3d: InceptionI3d, tmp_path: Path) -> None:
    sd = i3d.state_dict()
    missing = {k: v for k, v in sd.items() if k != "Mixed_4c.b1b.conv3d.weight"}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(RuntimeError, match="Mixed_4c.b1b.conv3d.weight"):
        load_i3d(tmp_path / "missing.pt")
    renamed = dict(sd)
    renamed["Logits.conv3d.bias"] = renamed.pop("logits.conv3d.bias")
    torch.save(renamed, tmp_path / "renamed.pt")
    with pytest.raises(RuntimeError, match="Logits.conv3d.bias"):
        load_i3d(tmp_path / "renamed.pt")
    # a prefix on only some keys is not silently stripped
    partial = dict(sd)
    partial["module.logits.conv3d.bias"] = partial.pop("logits.conv3d.bias")
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(RuntimeError, match="module.logits.conv3d.bias"):
        load_i3d(tmp_path / "partial.pt")


def test_missing_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "i3d_pretrained_400.pt"
    with pytest.raises(FileNotFoundError, match="locally") as info:
        load_i3d(path)
    assert str(path) in str(info.value)


def test_output_shapes_at_224(i3d: InceptionI3d) -> None:
    x = _video(b=1, t=9, size=224)
    assert i3d(x).shape == (1, 400)
    assert i3d.features(x, kind="pool").shape == (1, 1024)
    with pytest.raises(ValueError, match="kind"):
        i3d.features(x, kind="bogus")  # type: ignore[arg-type]


def test_too_few_frames_for_logits(i3d: InceptionI3d) -> None:
    with pytest.raises(ValueError, match="8 frames"):
        i3d(_video(t=8))


def test_batch_independence(i3d: InceptionI3d) -> None:
    x = _video(b=2, t=10, size=48, seed=1)
    for kind in ("logits", "pool"):
        batched = i3d.features(x, kind=kind)
        singles = torch.cat([i3d.features(x[i : i + 1], kind=kind) for i in range(2)])
        assert batched.abs().max() > 0.1  # non-trivial features, so the comparison means something
        torch.testing.assert_close(batched, singles, rtol=0, atol=1e-5)


def test_preprocess_quantizes_and_scales() -> None:
    x = torch.linspace(-1.2, 1.2, 3 * 16 * 4 * 4).reshape(1, 3, 16, 4, 4)
    out = fvd_preprocess(x, size=4)  # same size: bilinear resize is the identity
    assert out.dtype == torch.float32 and out.shape == (1, 3, 16, 4, 4)
    expected = ((x + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert out.min() == -1 and out.max() == 1
    levels = (out + 1) * 127.5
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
    u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    torch.testing.assert_close(fvd_preprocess(u8, size=4), expected, rtol=0, atol=1e-6)


def test_preprocess_frames_and_resize() -> None:
    x = (torch.arange(20.0) / 20).view(1, 1, 20, 1, 1)  # frame i is constant i / 20
    out = fvd_preprocess(x.expand(2, 3, 20, 32, 48))
    assert out.shape == (2, 3, 16, 224, 224)
    first = ((x[0, 0, :16, 0, 0] + 1) * 127.5).round() / 127.5 - 1  # constant frames stay constant
    torch.testing.assert_close(out[0, 0, :, 100, 7], first, rtol=0, atol=1e-6)
    assert fvd_preprocess(_video(t=12, size=8), num_frames=16, size=16).shape == (1, 3, 12, 16, 16)
    with pytest.raises(ValueError, match="T=8"):
        fvd_preprocess(_video(t=8, size=8))


class _TinyDetector(nn.Module):
    """Stand-in for StyleGAN-V's detector: records its flags in the output so the adapter can be checked."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 400)

    def forward(
        self, videos: torch.Tensor, rescale: bool = True, resize: bool = True, return_features: bool = False
    ) -> torch.Tensor:
        feats = self.proj(videos.mean(dim=(2, 3, 4)))  # (B, 400)
        flags = torch.tensor([float(rescale), float(resize), float(not return_features)])
        return feats + flags.sum() * 1000.0


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_detector(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tiny = _TinyDetector()
    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.script(tiny).save(str(path))
    detector = load_i3d(path)
    assert isinstance(detector, TorchScriptI3d)
    detector.train()
    assert not detector.training
    x = _video(b=2, t=9, size=8)
    with torch.no_grad():
        expected = tiny(x, rescale=False, resize=False, return_features=True)
    out = detector(x)
    assert out.shape == (2, 400)
    torch.testing.assert_close(out, expected)
    assert out.abs().max() < 100  # any other flag values would add 1000
