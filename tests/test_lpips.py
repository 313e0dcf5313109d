"""Tests for LPIPS: torchvision/lpips weight layouts, local-file loading, metric properties, video helper."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vdm.models.lpips import (
    LPIPS,
    TORCHVISION_CLASSIFIER_KEYS,
    VGG16Features,
    load_state_dict_file,
    normalize_channels,
)

# torchvision vgg16().features parameters, in order (name, shape).
VGG16_FEATURE_PARAMS: list[tuple[str, tuple[int, ...]]] = []
for _index, (_cin, _cout) in zip(
    (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
    ((3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
     (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)),
):
    VGG16_FEATURE_PARAMS += [
        (f"features.{_index}.weight", (_cout, _cin, 3, 3)),
        (f"features.{_index}.bias", (_cout,)),
    ]

# lpips v0.1 vgg.pth (name, shape).
LPIPS_LIN_PARAMS = [
    ("lin0.model.1.weight", (1, 64, 1, 1)),
    ("lin1.model.1.weight", (1, 128, 1, 1)),
    ("lin2.model.1.weight", (1, 256, 1, 1)),
    ("lin3.model.1.weight", (1, 512, 1, 1)),
    ("lin4.model.1.weight", (1, 512, 1, 1)),
]


def images(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen) * 2 - 1


@pytest.fixture(scope="module")
def lpips_model() -> LPIPS:
    """Random trunk, random positive heads (so loading is distinguishable from the all-ones init)."""
    torch.manual_seed(0)
    model = LPIPS()
    with torch.no_grad():
        for k in range(5):
            model.lins.head(k).model[1].weight.uniform_(0.0, 1.0)
    return model


@pytest.fixture(scope="module")
def saved_files(lpips_model: LPIPS, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("lpips")
    files = {
        "pth": (root / "vgg16.pth", root / "vgg.pth"),
        "safetensors": (root / "vgg16.safetensors", root / "lin.safetensors"),
    }
    for vgg_path, lin_path in files.values():
        lpips_model.save_files(vgg_path, lin_path)
    return files


# --- layouts -----------------------------------------------------------------------------------


def test_vgg16_feature_names_and_shapes_match_torchvision() -> None:
    state = VGG16Features().state_dict()
    assert [(k, tuple(v.shape)) for k, v in state.items()] == VGG16_FEATURE_PARAMS
    assert len(VGG16Features().features) == 31  # torchvision's features has 31 modules


def test_lin_names_and_shapes_match_lpips_package() -> None:
    model = LPIPS()
    assert [(k, tuple(v.shape)) for k, v in model.lins.state_dict().items()] == LPIPS_LIN_PARAMS
    # the scaling constants are not part of any checkpoint
    assert set(model.state_dict()) == {f"net.{k}" for k, _ in VGG16_FEATURE_PARAMS} | {
        f"lins.{k}" for k, _ in LPIPS_LIN_PARAMS
    }


def test_saved_files_have_reference_layouts(saved_files: dict[str, tuple[Path, Path]]) -> None:
    for vgg_path, lin_path in saved_files.values():
        vgg = load_state_dict_file(vgg_path, "vgg")
        lin = load_state_dict_file(lin_path, "lin")
        assert sorted((k, tuple(v.shape)) for k, v in vgg.items()) == sorted(VGG16_FEATURE_PARAMS)
        assert sorted((k, tuple(v.shape)) for k, v in lin.items()) == LPIPS_LIN_PARAMS


# --- loading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_from_files_round_trip(
    fmt: str, lpips_model: LPIPS, saved_files: dict[str, tuple[Path, Path]]
) -> None:
    loaded = LPIPS.from_files(*saved_files[fmt])
    for (k, a), (k2, b) in zip(lpips_model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    x0, x1 = images((2, 3, 32, 32), 1), images((2, 3, 32, 32), 2)
    with torch.no_grad():
        assert torch.equal(lpips_model(x0, x1), loaded(x0, x1))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_vgg_accepts_full_torchvision_and_bare_features(lpips_model: LPIPS) -> None:
    features = lpips_model.net.state_dict()
    # classifier keys are dropped by name; their (huge) real shapes do not matter
    full = {**features, **{k: torch.zeros(1) for k in TORCHVISION_CLASSIFIER_KEYS}}
    bare = {k.removeprefix("features."): v for k, v in features.items()}
    for state in (full, bare):
        vgg = VGG16Features()
        vgg.load_torchvision_state_dict(state)
        assert all(torch.equal(vgg.state_dict()[k], v) for k, v in features.items())


def test_mismatched_keys_are_named(lpips_model: LPIPS) -> None:
    state = dict(lpips_model.net.state_dict())
    state.pop("features.28.bias")
    state["features.99.weight"] = torch.zeros(1)
    state["features.0.weight"] = torch.zeros(64, 3, 5, 5)
    with pytest.raises(ValueError) as err:
        VGG16Features().load_torchvision_state_dict(state, "vgg16.pth")
    message = str(err.value)
    assert "features.28.bias" in message and "features.99.weight" in message
    assert "features.0.weight: expected (64, 3, 3, 3), got (64, 3, 5, 5)" in message
    assert "vgg16.pth" in message


def test_missing_files_name_the_file_and_its_content(
    tmp_path: Path, saved_files: dict[str, tuple[Path, Path]]
) -> None:
    vgg_path, lin_path = saved_files["pth"]
    with pytest.raises(FileNotFoundError, match=r"VGG16 weights not found at .*nope\.pth.*397923af\.pth"):
        LPIPS.from_files(tmp_path / "nope.pth", lin_path)
    with pytest.raises(FileNotFoundError, match=r"linear-head weights not found at .*absent\.pth.*/vgg\.pth"):
        LPIPS.from_files(vgg_path, tmp_path / "absent.pth")
    odd = tmp_path / "weights.npz"
    odd.write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported weights file"):
        LPIPS.from_files(odd, lin_path)


# --- metric properties -------------------------------------------------------------------------


def test_identity_symmetry_positivity(lpips_model: LPIPS) -> None:
    x0, x1 = images((3, 3, 32, 48), 3), images((3, 3, 32, 48), 4)
    with torch.no_grad():
        assert torch.equal(lpips_model(x0, x0), torch.zeros(3))
        d01, d10 = lpips_model(x0, x1), lpips_model(x1, x0)
        near = lpips_model(x0, x0 + 0.01 * x1)
    assert d01.shape == (3,) and d01.dtype == torch.float32
    torch.testing.assert_close(d01, d10)
    assert (d01 > 0).all() and (near < d01).all()


def test_gradient_reaches_input_not_weights(lpips_model: LPIPS) -> None:
    x0 = images((2, 3, 32, 32), 5).requires_grad_(True)
    x1 = images((2, 3, 32, 32), 6)
    lpips_model(x0, x1).sum().backward()
    assert x0.grad is not None and torch.isfinite(x0.grad).all() and x0.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in lpips_model.parameters())


def test_train_mode_is_ignored(lpips_model: LPIPS) -> None:
    parent = torch.nn.ModuleDict({"lpips": lpips_model, "other": torch.nn.Linear(2, 2)})
    parent.train()
    assert not lpips_model.training and not any(m.training for m in lpips_model.modules())
    assert parent["other"].training


def test_input_validation(lpips_model: LPIPS) -> None:
    with pytest.raises(ValueError, match="H, W >= 16"):
        lpips_model(images((1, 3, 8, 8), 0), images((1, 3, 8, 8), 1))
    with pytest.raises(ValueError, match="video_distance"):
        lpips_model(images((1, 3, 2, 16, 16), 0), images((1, 3, 2, 16, 16), 1))


# --- videos ------------------------------------------------------------------------------------


def test_video_distance_folds_time(lpips_model: LPIPS) -> None:
    v0, v1 = images((2, 3, 5, 16, 16), 7), images((2, 3, 5, 16, 16), 8)
    with torch.no_grad():
        per_frame = lpips_model.video_distance(v0, v1)
        assert per_frame.shape == (2, 5)
        torch.testing.assert_close(per_frame[1, 3], lpips_model(v0[1:2, :, 3], v1[1:2, :, 3])[0])
        gen = torch.Generator().manual_seed(0)
        subset = lpips_model.video_distance(v0, v1, max_frames=2, generator=gen)
    assert subset.shape == (2, 2)
    index = torch.randperm(5, generator=torch.Generator().manual_seed(0))[:2].sort().values
    torch.testing.assert_close(subset, per_frame[:, index])
    with pytest.raises(ValueError, match="max_frames"):
        lpips_model.video_distance(v0, v1, max_frames=0)


def test_normalize_channels_has_finite_gradient_at_zero() -> None:
    # all-zero ReLU columns are common in deep taps; sqrt(sum(x**2)) would give NaN there
    features = torch.zeros(1, 4, 2, 2)
    features[0, :, 0, 0] = torch.tensor([3.0, 4.0, 0.0, 0.0])
    features.requires_grad_(True)
    out = normalize_channels(features)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0.6, 0.8, 0.0, 0.0]))
    assert torch.equal(out[0, :, 1, 1], torch.zeros(4))
    out.sum().backward()
    assert torch.isfinite(features.grad).all()
