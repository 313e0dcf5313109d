"""Tests for the frozen text encoder and the random stand-in builder: shapes, masks, freezing,
identifiers, errors, caption dropout, reuse of built folders, and no network access."""

from __future__ import annotations

import json
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from data_prep.standin_text_encoder import (
    MARKER,
    build_random_text_encoder,
    ensure_random_text_encoder,
    main,
    synthetic_vocabulary,
)
from vdm.models.text_encoder import TextEncoder
from vdm.utils.io import stale_temporaries

KINDS = ("t5", "clip")
TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "max_length": 32}
CAPTIONS = [
    "a red circle moving left quickly on a gray background",
    "An orange star growing on a black background",
    "a blue square standing still and a white diamond shrinking on a gradient background",
]
MAX_LENGTH = 24


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny random encoder folder per kind over the synthetic vocabulary."""
    root = tmp_path_factory.mktemp("text_encoders")
    return {kind: build_random_text_encoder(root / kind, kind, **TINY) for kind in KINDS}


@pytest.fixture(scope="module")
def encoders(built: dict[str, Path]) -> dict[str, TextEncoder]:
    return {kind: TextEncoder(str(path), kind, MAX_LENGTH) for kind, path in built.items()}


def token_counts(encoder: TextEncoder, captions: list[str]) -> list[int]:
    return [len(encoder.tokenizer(c)["input_ids"]) for c in captions]


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_mask_and_padding(encoders: dict[str, TextEncoder], kind: str) -> None:
    encoder = encoders[kind]
    emb, mask = encoder.encode(CAPTIONS)
    assert emb.shape == (3, MAX_LENGTH, 32) and emb.dtype == torch.float32 and encoder.hidden_size == 32
    assert mask.shape == (3, MAX_LENGTH) and mask.dtype == torch.bool
    specials = 1 if kind == "t5" else 2  # eos (+ bos)
    counts = [len(c.split()) + specials for c in CAPTIONS]
    assert token_counts(encoder, CAPTIONS) == counts
    assert mask.sum(dim=1).tolist() == counts
    for row, n in enumerate(counts):
        assert mask[row, :n].all() and not mask[row, n:].any()  # valid tokens first
        assert torch.all(emb[row, n:] == 0) and torch.all(emb[row, :n].abs().sum(-1) > 0)
    ids = encoder.tokenizer(CAPTIONS[0])["input_ids"]
    assert encoder.tokenizer.unk_token_id not in ids  # the synthetic vocabulary covers the caption


@pytest.mark.parametrize("kind", KINDS)
def test_truncation_keeps_eos(built: dict[str, Path], kind: str) -> None:
    encoder = TextEncoder(str(built[kind]), kind, max_length=8)
    long_caption = " ".join(["red circle"] * 20)
    emb, mask = encoder.encode([long_caption, "red"])
    assert emb.shape == (2, 8, 32) and mask[0].all()
    ids = encoder.tokenizer([long_caption], max_length=8, truncation=True)["input_ids"][0]
    assert len(ids) == 8 and ids[-1] == encoder.tokenizer.eos_token_id


def test_frozen_and_eval_under_training_parent(encoders: dict[str, TextEncoder]) -> None:
    encoder = encoders["t5"]
    parent = nn.ModuleDict({"text": encoder, "head": nn.Linear(32, 1)})
    parent.train()
    assert parent["head"].training and not encoder.training
    assert not any(m.training for m in encoder.modules())
    assert not any(p.requires_grad for p in encoder.parameters())
    emb, _ = encoder.encode(CAPTIONS[:1])
    assert not emb.requires_grad
    parent["head"](emb).sum().backward()  # plain no-grad tensors, not inference tensors: usable in training
    assert parent["head"].weight.grad is not None
    assert all(p.grad is None for p in encoder.parameters())
    parent.eval()


def test_weights_stay_out_of_state_dict(encoders: dict[str, TextEncoder]) -> None:
    encoder = encoders["clip"]
    parent = nn.ModuleDict({"text": encoder, "head": nn.Linear(32, 1)})
    state = parent.state_dict()
    assert sorted(state) == ["head.bias", "head.weight"]
    before = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    parent.load_state_dict(state, strict=True)
    # a checkpoint that does carry encoder weights does not overwrite the ones from disk
    foreign = {**state, **{f"text.model.{k}": torch.zeros_like(v) for k, v in before.items()}}
    parent.load_state_dict(foreign, strict=True)
    assert all(torch.equal(before[k], v) for k, v in encoder.model.state_dict().items())


@pytest.mark.parametrize("kind", KINDS)
def test_determinism_and_distinct_captions(built: dict[str, Path], encoders: dict[str, TextEncoder],
                                           kind: str) -> None:
    emb, mask = encoders[kind].encode(CAPTIONS)
    again = TextEncoder(str(built[kind]), kind, MAX_LENGTH)
    emb2, mask2 = again.encode(CAPTIONS)
    assert torch.equal(emb, emb2) and torch.equal(mask, mask2)
    single, _ = encoders[kind].encode(CAPTIONS[1:2])  # independent of the rest of the batch
    torch.testing.assert_close(single[0], emb[1], rtol=1e-5, atol=1e-5)
    other, _ = encoders[kind].encode(["a green circle moving left quickly on a gray background"])
    assert not torch.allclose(other[0], emb[0], atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_null_embedding(encoders: dict[str, TextEncoder], kind: str) -> None:
    encoder = encoders[kind]
    emb, mask = encoder.null_embedding()
    ref_emb, ref_mask = encoder.encode([""])
    assert emb.shape == (1, MAX_LENGTH, 32) and torch.equal(emb, ref_emb) and torch.equal(mask, ref_mask)
    assert mask.sum() == (1 if kind == "t5" else 2) and mask[0, 0]
    emb.zero_()  # callers get copies
    assert torch.equal(encoder.null_embedding()[0], ref_emb)


def test_clip_penultimate_layer(built: dict[str, Path], encoders: dict[str, TextEncoder]) -> None:
    last = encoders["clip"]
    penultimate = TextEncoder(str(built["clip"]), "clip", MAX_LENGTH, layer="penultimate")
    assert not torch.allclose(penultimate.encode(CAPTIONS)[0], last.encode(CAPTIONS)[0])
    assert penultimate.identifier.startswith("clip-penultimate:")
    assert penultimate.identifier[len("clip-penultimate"):] == last.identifier[len("clip"):]
    with pytest.raises(ValueError, match="penultimate"):
        TextEncoder(str(built["t5"]), "t5", MAX_LENGTH, layer="penultimate")


def test_bfloat16_weights_return_float32(built: dict[str, Path]) -> None:
    encoder = TextEncoder(str(built["t5"]), "t5", MAX_LENGTH, dtype="bfloat16")
    assert next(encoder.model.parameters()).dtype == torch.bfloat16
    emb, _ = encoder.encode(CAPTIONS[:1])
    assert emb.dtype == torch.float32 and torch.isfinite(emb).all()


def test_identifier_stable_across_copies_and_sensitive_to_changes(
    tmp_path: Path, built: dict[str, Path], encoders: dict[str, TextEncoder]
) -> None:
    ident = encoders["t5"].identifier
    assert re.fullmatch(r"t5:[0-9a-f]{16}:24", ident)
    assert encoders["clip"].identifier.startswith("clip:") and encoders["clip"].identifier[4:] != ident[2:]
    copy = shutil.copytree(built["t5"], tmp_path / "elsewhere" / "copy")
    assert TextEncoder(str(copy), "t5", MAX_LENGTH).identifier == ident
    assert TextEncoder(str(copy), "t5", MAX_LENGTH + 1).identifier == ident[:-2] + "25"
    # same options rebuild byte-identical files; another seed gives other weights
    assert TextEncoder(str(build_random_text_encoder(tmp_path / "same", "t5", **TINY)), "t5",
                       MAX_LENGTH).identifier == ident
    reseeded = build_random_text_encoder(tmp_path / "seed1", "t5", seed=1, **TINY)
    assert TextEncoder(str(reseeded), "t5", MAX_LENGTH).identifier != ident
    # one changed weight, and one changed tokenizer (extra word), change it too
    weights = load_file(str(copy / "model.safetensors"))
    name = min(weights)
    weights[name] = weights[name] + 1e-3
    save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})
    assert TextEncoder(str(copy), "t5", MAX_LENGTH).identifier != ident
    more_words = build_random_text_encoder(tmp_path / "vocab", "t5", vocab=[*synthetic_vocabulary(), "zebra"],
                                           **TINY)
    assert TextEncoder(str(more_words), "t5", MAX_LENGTH).identifier != ident


def test_missing_folder_and_files_raise_clear_errors(tmp_path: Path, built: dict[str, Path]) -> None:
    missing = tmp_path / "no_such_encoder"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))) as info:
        TextEncoder(str(missing), "t5", MAX_LENGTH)
    assert "config.json" in str(info.value) and "nothing is downloaded" in str(info.value)
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(built["t5"] / "config.json", partial)
    with pytest.raises(FileNotFoundError, match="weights") as info:
        TextEncoder(str(partial), "t5", MAX_LENGTH)
    assert "tokenizer" in str(info.value) and str(partial) in str(info.value)
    with pytest.raises(ValueError, match="model_type"):
        TextEncoder(str(built["t5"]), "clip", MAX_LENGTH)
    with pytest.raises(ValueError, match="positions"):
        TextEncoder(str(built["clip"]), "clip", TINY["max_length"] + 1)


def test_ensure_reuses_existing_folder(tmp_path: Path) -> None:
    root = ensure_random_text_encoder(tmp_path / "enc", "clip", **TINY)
    ident = TextEncoder(str(root), "clip", MAX_LENGTH).identifier
    stamps = {p.name: p.stat().st_mtime_ns for p in root.iterdir()}
    assert ensure_random_text_encoder(tmp_path / "enc", "clip", **TINY) == root
    assert {p.name: p.stat().st_mtime_ns for p in root.iterdir()} == stamps
    assert TextEncoder(str(root), "clip", MAX_LENGTH).identifier == ident
    assert not stale_temporaries(tmp_path / "enc")  # no half-built folder left beside it
    # other options rebuild in place; a complete encoder built elsewhere is used as is
    ensure_random_text_encoder(tmp_path / "enc", "clip", seed=3, **TINY)
    assert TextEncoder(str(root), "clip", MAX_LENGTH).identifier != ident
    foreign = shutil.copytree(root, tmp_path / "foreign")
    (foreign / MARKER).unlink()
    stamps = {p.name: p.stat().st_mtime_ns for p in foreign.iterdir()}
    ensure_random_text_encoder(foreign, "t5", **TINY)
    assert {p.name: p.stat().st_mtime_ns for p in foreign.iterdir()} == stamps
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "notes.txt").write_text("not an encoder")
    with pytest.raises(FileExistsError):
        ensure_random_text_encoder(tmp_path / "occupied", "t5", **TINY)


def test_synthetic_vocabulary_covers_the_corpus() -> None:
    from vdm.synthetic.scenes import heldout_prompts, sample_scene

    vocab = set(synthetic_vocabulary())
    rng = np.random.default_rng(0)
    texts = [sample_scene(rng, 32, 32, 9, two_object_fraction=0.5).caption() for _ in range(200)]
    texts += [p["prompt"] for p in heldout_prompts(0)]
    assert {w for t in texts for w in t.split()} <= vocab
    assert {"and", "an", "standing", "still", "gradient", "quickly"} <= vocab


def test_offline_build_load_and_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"caption": c}) + "\n" for c in CAPTIONS), encoding="utf-8")
    assert main(["--out", str(tmp_path / "cli"), "--kind", "t5", "--vocab-from-captions", str(captions),
                 "--hidden-size", "16", "--num-heads", "2", "--max-length", "16"]) == 0
    assert re.search(r"t5:[0-9a-f]{16}:16", capsys.readouterr().out)
    encoder = TextEncoder(str(tmp_path / "cli"), "t5", 16)
    emb, mask = encoder.encode(CAPTIONS[:2])
    assert emb.shape == (2, 16, 16) and mask.sum(1).tolist() == token_counts(encoder, CAPTIONS[:2])
    # a word from outside the caption files maps to <unk>
    assert encoder.tokenizer("zebra")["input_ids"][0] == encoder.tokenizer.unk_token_id
