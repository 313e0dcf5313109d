"""Stage 2 module: latents (on the fly == precomputed), text, EMA, image-to-video, checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_prep.precompute_latents import precompute
from tests.helpers.modules import make_diffusion_module
from vdm.data.datamodule import VideoDataModule
from vdm.data.latents import LatentCorpusError, LatentDataModule
from vdm.diffusion.objectives import DDPM, RectifiedFlow
from vdm.lightning.diffusion_module import DiffusionModule, image_condition
from vdm.models.dit import VideoDiT
from vdm.models.text_encoder import TextEncoder
from vdm.utils.vae_export import export_vae, load_vae_export


def val_batches(module_root: Path, **kwargs) -> list[dict]:
    dm = VideoDataModule(
        root=str(module_root),
        num_frames=5,
        height=32,
        width=32,
        batch_size=4,
        val_batch_size=4,
        num_workers=0,
        seed=0,
        **kwargs,
    )
    dm.setup("validate")
    return list(dm.val_dataloader())


@pytest.mark.parametrize("objective", [RectifiedFlow(), DDPM(num_train_steps=100)], ids=["flow", "ddpm"])
def test_precomputed_latents_give_the_same_loss_as_on_the_fly(
    objective, synthetic_root, vae_export_dir, text_encoder_dir, tmp_path
):
    module = make_diffusion_module(vae_export_dir, text_encoder_dir, objective).eval()
    out = tmp_path / "latents"
    manifest = precompute(
        str(synthetic_root),
        str(vae_export_dir),
        str(out),
        num_frames=5,
        height=32,
        width=32,
        batch_size=4,
        text_encoder=module.text_encoder,
    )
    assert manifest["latents"]["vae_hash"] == module.vae_hash
    assert manifest["latents"]["latent_shape"] == [16, 2, 4, 4]
    latent_dm = LatentDataModule(
        root=str(out), vae_export=str(vae_export_dir), val_batch_size=4, num_workers=0
    )
    latent_dm.setup("validate")
    precomputed = {k: (b, i) for b in latent_dm.val_dataloader() for i, k in enumerate(b["key"])}
    videos = val_batches(synthetic_root)
    assert sum(len(b["key"]) for b in videos) == len(precomputed) > 0
    for batch in videos:
        rows = [precomputed[k] for k in batch["key"]]
        latent_batch = {
            "latent": torch.stack([b["latent"][i] for b, i in rows]),
            "text": torch.stack([b["text"][i] for b, i in rows]),
            "text_mask": torch.stack([b["text_mask"][i] for b, i in rows]),
        }
        z_video, z_latent = module.normalized_latents(batch), module.normalized_latents(latent_batch)
        torch.testing.assert_close(z_latent, z_video, atol=1e-5, rtol=1e-5)
        rnd = module.draw(z_video, torch.Generator().manual_seed(3))
        rnd["drop"][0] = True  # one empty caption: the null embedding on both paths
        losses = []
        for source, z in ((batch, z_video), (latent_batch, z_latent)):
            context, mask = module.text_context(source, rnd["drop"])
            with torch.no_grad():
                losses.append(module.diffusion_loss(z, context, mask, rnd["noise"], rnd["t"]))
        torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)


def test_latent_corpus_of_another_vae_is_refused_naming_both_hashes(synthetic_root, vae_export_dir, tmp_path):
    out = tmp_path / "latents"
    precompute(str(synthetic_root), str(vae_export_dir), str(out), num_frames=5, height=32, width=32)
    export = load_vae_export(vae_export_dir)
    with torch.no_grad():
        next(export.model.parameters()).add_(0.01)
    other = tmp_path / "other_export"
    other_hash = export_vae(export.model, export.config, export.stats, other)
    dm = LatentDataModule(root=str(out), vae_export=str(other), num_workers=0)
    with pytest.raises(LatentCorpusError) as err:
        dm.setup("fit")
    assert export.vae_hash[:12] in str(err.value) and other_hash[:12] in str(err.value)
    wrong_shape = LatentDataModule(root=str(out), vae_export=str(vae_export_dir), num_frames=9, num_workers=0)
    with pytest.raises(LatentCorpusError, match="data.num_frames=9, but latent corpus .* num_frames=5"):
        wrong_shape.setup("fit")


def test_training_reduces_the_loss_and_ema_follows(vae_export_dir, text_encoder_dir):
    module = make_diffusion_module(vae_export_dir, text_encoder_dir)
    generator = torch.Generator().manual_seed(0)
    batch = {
        "latent": torch.randn(4, 16, 2, 4, 4, generator=generator) * 0.5,
        "caption": ["a red circle moving left quickly on a black background"] * 4,
    }
    z = module.normalized_latents(batch)
    fixed = module.draw(z, torch.Generator().manual_seed(1))
    context, mask = module.text_context(batch, torch.zeros(4, dtype=torch.bool))

    def loss(model=None) -> float:
        with torch.no_grad():
            return float(module.diffusion_loss(z, context, mask, fixed["noise"], fixed["t"], model=model))

    before = loss()
    optimizer = torch.optim.AdamW(module.dit.parameters(), lr=3e-3)
    for step in range(1, 81):
        rnd = module.draw(z, generator)
        value = module.diffusion_loss(z, context, mask, rnd["noise"], rnd["t"])
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        module.ema.update(module.dit, step)
    assert loss() < 0.7 * before
    assert loss(module.ema.module) < 0.9 * before
    assert module.ema.num_updates == 80


def test_image_condition_channels():
    z = torch.randn(3, 4, 3, 2, 2)
    cond = image_condition(z, torch.tensor([True, False, True]))
    assert cond.shape == (3, 5, 3, 2, 2)
    torch.testing.assert_close(cond[0, :4, 0], z[0, :, 0])
    assert cond[1].abs().sum() == 0 and cond[:, :, 1:].abs().sum() == 0
    assert cond[0, 4, 0].eq(1).all() and cond[2, 4, 0].eq(1).all()


def test_image_to_video_sampling_is_seeded_and_uses_the_image(vae_export_dir, text_encoder_dir):
    module = make_diffusion_module(
        vae_export_dir, text_encoder_dir, cond_channels=17, i2v_probability=0.5
    ).eval()
    with torch.no_grad():  # a non-zero output layer, so the conditioning can show
        for p in module.ema.module.final_layer.parameters():
            p.normal_(0, 0.1)
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    args = (["a blue star growing on a white background"], 5, 32, 32)
    first = module.sample(*args, num_steps=2, guidance_scale=2.0, seed=5, image=image)
    again = module.sample(*args, num_steps=2, guidance_scale=2.0, seed=5, image=image)
    other = module.sample(*args, num_steps=2, guidance_scale=2.0, seed=5, image=-image)
    assert first.shape == (1, 3, 5, 32, 32) and first.abs().max() <= 1
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("objective", ["flow", "ddpm_eta1"])
def test_per_video_seeds_make_samples_independent_of_their_batch(vae_export_dir, text_encoder_dir, objective):
    kwargs = {} if objective == "flow" else {"objective": DDPM(eta=1.0)}
    module = make_diffusion_module(vae_export_dir, text_encoder_dir, **kwargs).eval()
    with torch.no_grad():  # a non-zero output layer, so the noise and the prompts show in the samples
        for p in module.ema.module.final_layer.parameters():
            p.normal_(0, 0.1)
    prompts = ["a red ball moving right", "a blue cube on a black background", "a red ball moving right"]
    opts = dict(num_steps=3, guidance_scale=2.0)
    batched = module.sample(prompts, 5, 32, 32, seed=[3, 4, 5], **opts)
    alone = torch.cat([module.sample([p], 5, 32, 32, seed=[s], **opts) for p, s in zip(prompts, [3, 4, 5])])
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=0)
    assert not torch.allclose(batched[0], batched[2], atol=1e-3)  # same prompt, another seed
    single = module.sample(prompts[:1], 5, 32, 32, seed=3, **opts)
    torch.testing.assert_close(single, batched[:1], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        module.sample(prompts, 5, 32, 32, seed=[1, 2], **opts)


def test_mismatched_dit_or_checkpoint_fails_with_the_fix(vae_export_dir, text_encoder_dir):
    text = TextEncoder(str(text_encoder_dir), "t5", max_length=16)
    optimizer = lambda params: torch.optim.AdamW(params)  # noqa: E731
    dit = VideoDiT(in_channels=8, hidden_size=32, depth=1, num_heads=2, context_dim=64)
    with pytest.raises(ValueError, match=r"model\.dit\.in_channels: 8, .*set in_channels=16"):
        DiffusionModule(dit, str(vae_export_dir), text, optimizer, RectifiedFlow())
    dit = VideoDiT(in_channels=16, hidden_size=32, depth=1, num_heads=2, context_dim=32)
    with pytest.raises(ValueError, match=r"model\.dit\.context_dim: 32, .*set context_dim=64"):
        DiffusionModule(dit, str(vae_export_dir), text, optimizer, RectifiedFlow())
    module = make_diffusion_module(vae_export_dir, text_encoder_dir)
    with pytest.raises(ValueError, match="trained on VAE"):
        module.on_load_checkpoint({"vae_hash": "0" * 64, "state_dict": {}})


def test_training_draws_follow_the_sample_not_its_batch(vae_export_dir, text_encoder_dir):
    module = make_diffusion_module(vae_export_dir, text_encoder_dir, caption_dropout=0.5)
    z = torch.zeros(3, 16, 2, 4, 4)
    both = module.draw(z, module.sample_generators({"key": ["a", "b", "c"]}, "train/3"))
    alone = module.draw(z[:1], module.sample_generators({"key": ["b"]}, "train/3"))
    for name in ("noise", "t", "drop"):
        assert torch.equal(both[name][1:2], alone[name]), name
    later = module.draw(z[:1], module.sample_generators({"key": ["b"]}, "train/4"))
    assert not torch.equal(later["noise"], alone["noise"])  # a new step draws anew
    assert module.sample_generators({"video": z}, "train/3") is None


def test_compile_blocks_in_place_keeps_parameter_names(vae_export_dir, text_encoder_dir):
    from vdm.lightning.strategies import compile_blocks

    module = make_diffusion_module(vae_export_dir, text_encoder_dir)
    before = list(module.state_dict())
    assert compile_blocks(module.dit) == len(module.dit.blocks)
    assert all(block._compiled_call_impl is not None for block in module.dit.blocks)
    assert list(module.state_dict()) == before
