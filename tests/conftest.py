"""Shared fixtures: Hydra composition of the real config tree and a tiny synthetic corpus."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

# Small enough to generate in seconds; shape-compatible with the tiny VAE (1 + 4k frames, 8x spatial).
TINY_SYNTHETIC = {
    "num_train": 24,
    "num_val": 8,
    "num_frames": 9,
    "height": 32,
    "width": 32,
    "fps": 8,
    "keyframe_interval": 4,
}
TINY_RUN = [
    "data.num_frames=5",
    "data.height=32",
    "data.width=32",
    "data.batch_size=2",
    "data.val_batch_size=2",
    "data.num_workers=0",
    "data.batches_per_epoch=4",
    "data.val_batches=2",
    "logger=none",
    "trainer.max_steps=8",
    # fp32: exact numbers on any CPU (the CPU trainer's bf16 default depends on native bf16 support)
    "trainer.precision=32-true",
    "trainer.check_val_every_n_epoch=1",
    "trainer.log_every_n_steps=1",
    "module.warmup_steps=2",
]
# tests share run directories between runs: no automatic resume unless a test asks for it
TINY_CALLBACKS = [
    "callbacks.model_checkpoint.every_n_train_steps=4",
    "callbacks.progress_bar.refresh_rate=0",
    "ckpt_path=null",
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are skipped where CUDA is not available."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def compose_config(config_name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` as ``@hydra.main`` would, with the run dir at ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.runtime.cwd = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    GlobalHydra.instance().clear()
    return cfg


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

    config = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "vae_tiny.yaml"))
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
    from data_prep.text_encoder import ensure_random_text_encoder, synthetic_vocabulary

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

    from data_prep.text_encoder import _tokenizer

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
