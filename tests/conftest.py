"""Shared fixtures: a tiny synthetic corpus and the tiny models built from it (builders: tests/helpers)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import DictConfig

from tests.helpers.config import (
    TINY_CALLBACKS,
    TINY_RUN,
    TINY_SYNTHETIC,
    compose_config,
    config_option,
)

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are skipped where CUDA is not available."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic corpus shared by the whole session."""
    from data_prep.synthetic import ensure_synthetic_corpus

    root = tmp_path_factory.mktemp("data") / "synthetic"
    ensure_synthetic_corpus(root, seed=0, **TINY_SYNTHETIC)
    return root


@pytest.fixture
def tiny_train_cfg(tmp_path: Path, synthetic_root: Path):
    """Factory: the train config with the tiny synthetic corpus and tiny run sizes, plus extra overrides."""

    def make(*extra: str, config_name: str = "train") -> DictConfig:
        corpus = [f"synthetic.root={synthetic_root}"]
        corpus += [f"synthetic.{k}={v}" for k, v in TINY_SYNTHETIC.items()]
        if any(e.startswith("data=") and e != "data=synthetic" for e in extra):
            corpus = []  # another corpus: no synthetic node to override
        callbacks = TINY_CALLBACKS if config_name == "train" else []
        overrides = [f"paths.root_dir={tmp_path}", *corpus, *TINY_RUN, *callbacks, *extra]
        return compose_config(config_name, overrides, tmp_path / "run")

    return make


@pytest.fixture(scope="session")
def vae_export_dir(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path) -> Path:
    """A stage-1 export of the tiny VAE preset (random weights, statistics over a few synthetic clips)."""
    import torch
    from omegaconf import OmegaConf

    from vdm.data.datamodule import VideoDataModule
    from vdm.models.vae import VideoVAE
    from vdm.utils.vae_export import compute_latent_stats, export_vae

    config = OmegaConf.to_container(config_option("model", "vae_tiny").vae)
    torch.manual_seed(0)
    vae = VideoVAE(**{k: v for k, v in config.items() if k != "_target_"}).eval()
    dm = VideoDataModule(root=str(synthetic_root), num_frames=5, height=32, width=32, batch_size=4,
                         num_workers=0, seed=0)
    dm.setup("fit")
    videos = (batch["video"] for batch in dm.train_dataloader())
    stats = compute_latent_stats(lambda x: vae.encode(x).mode(), videos, num_clips=8)
    out = tmp_path_factory.mktemp("vae") / "vae_export"
    export_vae(vae, config, stats, out)
    return out


@pytest.fixture(scope="session")
def text_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The untrained stand-in T5 of the synthetic corpus (as stage=diffusion builds it), width 64."""
    from data_prep.standin_text_encoder import ensure_random_text_encoder, synthetic_vocabulary

    out = tmp_path_factory.mktemp("text") / "t5"
    ensure_random_text_encoder(out, kind="t5", vocab=synthetic_vocabulary(), hidden_size=64, max_length=16)
    return out


# the tiny CLIP's vocabulary (other words map to the unknown token)
CLIP_WORDS = ["a", "red", "blue", "ball", "cat", "dog", "moving", "left", "right", "on", "the", "grass"]


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIP (32-wide, 32 px images) with a word-level tokenizer, saved as transformers files."""
    import json

    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from data_prep.standin_text_encoder import _tokenizer

    out = tmp_path_factory.mktemp("tiny_clip")
    tokenizer = _tokenizer("clip", CLIP_WORDS, max_length=16)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=16, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    # config.json's model_type would otherwise make AutoTokenizer pick the BPE CLIPTokenizer
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def i3d_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded random-init Kinetics-400 I3D in the public state-dict layout (as i3d_pretrained_400.pt)."""
    import torch

    from vdm.metrics.i3d import InceptionI3d

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("i3d") / "i3d_pretrained_400.pt"
    torch.save(InceptionI3d().state_dict(), path)
    return path
