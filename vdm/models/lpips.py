"""LPIPS perceptual distance (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features").

The VGG16 trunk is torchvision's ``vgg16().features`` rebuilt in plain torch with identical
parameter names and shapes, so ImageNet weights saved by torchvision load with ``strict=True``.
The five 1x1 heads use the parameter names of the reference ``lpips`` package (``lin0.model.1.weight``
... ``lin4.model.1.weight``), so its ``vgg.pth`` (v0.1) loads strictly too.

Weights are read from local files only (``LPIPS.from_files``); nothing is ever downloaded. To get
them on a machine with network access once::

    # torchvision:  torch.save(torchvision.models.vgg16(weights="IMAGENET1K_V1").state_dict(), "vgg16.pth")
    # lpips:        lpips/weights/v0.1/vgg.pth from the lpips package (pip install lpips)

``LPIPS.save_files`` writes the same two layouts (``.pth``/``.pt`` or ``.safetensors``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from einops import rearrange
from safetensors.torch import load_file, save_file
from torch import nn

# torchvision "D" configuration: conv widths, "M" = 2x2 max-pool.
VGG16_CONFIG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)
# Indices in ``features`` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (the LPIPS taps).
LPIPS_TAPS: tuple[int, ...] = (3, 8, 15, 22, 29)
LPIPS_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)
# Classifier keys of a full torchvision vgg16 state dict; ignored by name when loading features.
TORCHVISION_CLASSIFIER_KEYS: frozenset[str] = frozenset(
    f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")
)
# ImageNet mean/std expressed for inputs in [-1, 1] (reference ``lpips.ScalingLayer``).
IMAGENET_SHIFT: tuple[float, float, float] = (-0.030, -0.088, -0.188)
IMAGENET_SCALE: tuple[float, float, float] = (0.458, 0.448, 0.450)
MIN_IMAGE_SIZE = 16  # four 2x poolings before relu5_3
TORCH_SUFFIXES = (".pth", ".pt")
SAFETENSORS_SUFFIX = ".safetensors"

VGG_FILE_HINT = "torchvision's vgg16 state dict (vgg16-397923af.pth) or its features as safetensors"
LIN_FILE_HINT = (
    "the lpips package's linear heads (lpips/weights/v0.1/vgg.pth) or the same keys as safetensors"
)


def load_state_dict_file(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """Read a flat ``{name: tensor}`` state dict from ``.pth``/``.pt`` (weights only) or ``.safetensors``.

    ``what`` describes the expected content and is quoted in every error message.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights not found at {path}: expected {what}")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        state = load_file(str(path), device="cpu")
    elif suffix in TORCH_SUFFIXES:
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(
            f"unsupported weights file {path}: use one of {', '.join((*TORCH_SUFFIXES, SAFETENSORS_SUFFIX))}"
        )
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{path} is not a flat state dict of tensors: expected {what}")
    return dict(state)


def save_state_dict_file(state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write a state dict as ``.safetensors`` or ``.pth``/``.pt`` (chosen by suffix); creates parent dirs."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    suffix = path.suffix.lower()
    if suffix not in (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX):
        raise ValueError(
            f"unsupported weights file {path}: use one of {', '.join((*TORCH_SUFFIXES, SAFETENSORS_SUFFIX))}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == SAFETENSORS_SUFFIX:
        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """``module.load_state_dict(state, strict=True)`` with an error naming every bad key.

    Raises:
        ValueError: listing missing keys, unexpected keys and shape mismatches, with ``source``.
    """
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k}: expected {expected[k]}, got {tuple(state[k].shape)}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != expected[k]
    )
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{source} does not match {type(module).__name__}: missing keys {missing}, "
            f"unexpected keys {unexpected}, shape mismatches {mismatched}"
        )
    module.load_state_dict(state, strict=True)


class VGG16Features(nn.Module):
    """torchvision ``vgg16().features`` with the same parameter names, returning the LPIPS taps.

    State dict keys are ``features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.{weight,bias}``, exactly as
    in torchvision. The final max-pool (index 30) is kept for layout fidelity but never run.

    Shapes: (N, 3, H, W) ImageNet-normalised -> 5 maps (N, C_k, H / 2^k, W / 2^k) with
    C_k = 64, 128, 256, 512, 512 and k = 0..4.
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for item in VGG16_CONFIG:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                # not in-place: the tapped activations must stay intact for the distance
                layers += [nn.Conv2d(in_channels, int(item), kernel_size=3, padding=1), nn.ReLU()]
                in_channels = int(item)
        self.features = nn.Sequential(*layers)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """torchvision's VGG init: Kaiming-normal (fan_out, ReLU) convs, zero bias."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def load_torchvision_state_dict(
        self, state: Mapping[str, torch.Tensor], source: str = "state dict"
    ) -> None:
        """Load torchvision weights strictly.

        Accepts a full ``vgg16()`` state dict (``features.N.*`` plus the classifier keys listed in
        ``TORCHVISION_CLASSIFIER_KEYS``, which are dropped) or a bare ``features`` one (``N.*``).
        """
        keys = [k for k in state if k not in TORCHVISION_CLASSIFIER_KEYS]
        if keys and all(k.split(".", 1)[0].isdigit() for k in keys):
            features = {f"features.{k}": state[k] for k in keys}
        else:
            features = {k: state[k] for k in keys}
        load_strict(self, features, source)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(N, 3, H, W) -> [relu1_2, relu2_2, relu3_3, relu4_3, relu5_3] feature maps."""
        taps: list[torch.Tensor] = []
        h = x
        for index, layer in enumerate(self.features):
            h = layer(h)  # N C_k H_k W_k
            if index in LPIPS_TAPS:
                taps.append(h)
                if len(taps) == len(LPIPS_TAPS):
                    break
        return taps


class NetLinLayer(nn.Module):
    """1x1 conv C -> 1 without bias, laid out as the reference ``lpips.NetLinLayer``.

    ``model.0`` is the reference's dropout slot; LPIPS is only ever used frozen in eval mode, where
    that dropout is the identity, so it is an ``nn.Identity`` and the conv keeps the key ``model.1``.
    Shapes: (N, C, H, W) -> (N, 1, H, W).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, 1, H, W)."""
        return self.model(x)


class LPIPSHeads(nn.Module):
    """The five linear heads ``lin0..lin4``; state dict keys match the lpips package's ``vgg.pth``."""

    def __init__(self, channels: tuple[int, ...] = LPIPS_CHANNELS) -> None:
        super().__init__()
        for k, c in enumerate(channels):
            self.add_module(f"lin{k}", NetLinLayer(c))
        self.num_heads = len(channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """All-ones weights: untrained LPIPS is the reference's ``lpips=False`` baseline (channel sum)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.ones_(module.weight)

    def head(self, k: int) -> NetLinLayer:
        """The k-th head ``lin{k}``."""
        return getattr(self, f"lin{k}")


def normalize_channels(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit-normalise along channels in float32: (N, C, H, W) -> (N, C, H, W).

    ``vector_norm`` has a zero subgradient at 0, so all-zero ReLU columns give finite gradients
    (``sqrt(sum(x**2))`` would give NaN there).
    """
    features = features.float()
    return features / (torch.linalg.vector_norm(features, dim=1, keepdim=True) + eps)


class LPIPS(nn.Module):
    """Learned perceptual distance on VGG16 features; frozen and always in eval mode.

    A fresh instance has random VGG weights and all-ones heads (useful only for tests); use
    ``LPIPS.from_files`` for the pretrained metric. Gradients flow to the inputs, never to the
    weights (``requires_grad`` is False and ``train()`` keeps eval mode).

    Shapes: ``forward`` (N, 3, H, W) x2 in [-1, 1] -> (N,) >= 0 distances, H, W >= 16;
    ``video_distance`` (B, 3, T, H, W) x2 -> (B, T') per-frame distances.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(IMAGENET_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(IMAGENET_SCALE).view(1, 3, 1, 1), persistent=False)
        self.net = VGG16Features()
        self.lins = LPIPSHeads()
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        """Always eval: LPIPS is a fixed metric, so ``mode`` is ignored (a parent's ``train()`` is safe)."""
        return super().train(False)

    @classmethod
    def from_files(cls, vgg_path: str | Path, lin_path: str | Path) -> LPIPS:
        """Pretrained LPIPS from local files (``.pth``/``.pt`` loaded weights-only, or ``.safetensors``).

        Args:
            vgg_path: torchvision vgg16 state dict (full model or ``features`` only).
            lin_path: lpips ``vgg.pth`` heads (``lin0.model.1.weight`` ... ``lin4.model.1.weight``).

        Raises:
            FileNotFoundError: naming the missing file and what it must contain.
            ValueError: naming missing/unexpected/mis-shaped keys.
        """
        expected = ((vgg_path, "VGG16", VGG_FILE_HINT), (lin_path, "LPIPS linear-head", LIN_FILE_HINT))
        for path, name, hint in expected:
            if not Path(path).is_file():
                raise FileNotFoundError(
                    f"{name} weights not found at {path}: expected {hint}. Nothing is downloaded; "
                    f"copy the file there or point the config at it"
                )
        model = cls()
        model.net.load_torchvision_state_dict(load_state_dict_file(vgg_path, VGG_FILE_HINT), str(vgg_path))
        load_strict(model.lins, load_state_dict_file(lin_path, LIN_FILE_HINT), str(lin_path))
        return model

    def save_files(self, vgg_path: str | Path, lin_path: str | Path) -> None:
        """Write the trunk (torchvision ``features.N.*`` keys) and heads (lpips ``linK.model.1.weight``).

        The suffix of each path picks the format (``.pth``/``.pt`` or ``.safetensors``); the files
        round-trip through ``from_files``.
        """
        save_state_dict_file(self.net.state_dict(), vgg_path)
        save_state_dict_file(self.lins.state_dict(), lin_path)

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """LPIPS(x0, x1) for images (N, 3, H, W) in [-1, 1] -> (N,) float32 distances."""
        if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[1] != 3:
            raise ValueError(
                f"LPIPS expects two (N, 3, H, W) images of equal shape, got {tuple(x0.shape)} and "
                f"{tuple(x1.shape)}; fold videos with video_distance()"
            )
        if min(x0.shape[-2:]) < MIN_IMAGE_SIZE:
            raise ValueError(
                f"LPIPS needs H, W >= {MIN_IMAGE_SIZE} (relu5_3 is at 1/16 resolution), "
                f"got {tuple(x0.shape[-2:])}"
            )
        n = x0.shape[0]
        x = torch.cat([x0, x1], dim=0)  # 2N 3 H W, one trunk pass for both
        x = (x - self.shift.to(x.dtype)) / self.scale.to(x.dtype)
        total = torch.zeros(n, device=x.device, dtype=torch.float32)
        for k, features in enumerate(self.net(x)):
            f0, f1 = normalize_channels(features).split(n, dim=0)  # N C_k H_k W_k each, float32
            head = self.lins.head(k)
            diff = (f0 - f1).square()  # N C_k H_k W_k
            total = total + head(diff.to(head.model[1].weight.dtype)).float().mean(dim=(1, 2, 3))  # N
        return total

    def video_distance(
        self,
        x0: torch.Tensor,
        x1: torch.Tensor,
        max_frames: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Per-frame LPIPS of videos (B, 3, T, H, W) in [-1, 1] -> (B, T') float32, time folded into batch.

        With ``max_frames`` < T, a random subset of T' = max_frames frames (sorted, shared across the
        batch, drawn with ``generator``) is scored to bound the cost; otherwise T' = T.
        """
        if x0.shape != x1.shape or x0.ndim != 5:
            raise ValueError(
                f"video_distance expects two (B, 3, T, H, W) videos of equal shape, got "
                f"{tuple(x0.shape)} and {tuple(x1.shape)}"
            )
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be >= 1 or None (all frames), got {max_frames}")
        frames = x0.shape[2]
        if max_frames is not None and max_frames < frames:
            device = generator.device if generator is not None else x0.device
            index = torch.randperm(frames, generator=generator, device=device)[:max_frames]
            index = index.sort().values.to(x0.device)
            x0, x1 = x0.index_select(2, index), x1.index_select(2, index)  # B 3 T' H W
        kept = x0.shape[2]
        d = self(rearrange(x0, "b c t h w -> (b t) c h w"), rearrange(x1, "b c t h w -> (b t) c h w"))
        return rearrange(d, "(b t) -> b t", t=kept)
