"""What a run on the built-in corpus needs on disk before it starts, made on first use.

``train.py`` and ``evaluate.py`` pass :func:`prepare_corpus` to ``vdm.lightning.run.setup_run``, which
calls it after the config check and before the data, model and trainer are built; the library itself
never imports ``data_prep``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig


def prepare_corpus(cfg: DictConfig, text_encoder: Callable[[], Any] | None = None) -> None:
    """Generate the built-in synthetic corpus (and its stand-in text encoder) on first use, then the latent
    corpus that ``latents.from_corpus`` asks for; each is a no-op when it exists with the same settings.

    Args:
        cfg: the composed run config (``synthetic``, ``synthetic_text_encoder``, ``latents``, ``data``,
            ``model.vae_export``).
        text_encoder: builds the run's frozen text encoder, whose embeddings the latent corpus stores
            (None: latents without text embeddings).
    """
    if cfg.get("synthetic") is not None:
        from data_prep.synthetic import ensure_synthetic_corpus

        ensure_synthetic_corpus(**cfg.synthetic)
    if cfg.get("synthetic_text_encoder") is not None:
        from data_prep.standin_text_encoder import ensure_random_text_encoder, synthetic_vocabulary

        ensure_random_text_encoder(**cfg.synthetic_text_encoder, vocab=synthetic_vocabulary())
    latents = cfg.get("latents")
    if latents is not None and latents.get("from_corpus") is not None:
        from data_prep.precompute_latents import ensure_latent_corpus

        ensure_latent_corpus(latents.root, latents.from_corpus, cfg.model.vae_export,
                             num_frames=cfg.data.num_frames, height=cfg.data.height, width=cfg.data.width,
                             text_encoder=text_encoder() if text_encoder is not None else None)
