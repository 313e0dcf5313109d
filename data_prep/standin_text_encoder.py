"""Small randomly initialised text encoders saved in Hugging Face layout, for offline and CPU runs.

    python -m data_prep.standin_text_encoder --out DIR [--kind t5|clip] [--vocab-from-captions FILE ...]

The result is an UNTRAINED stand-in, not a pretrained language model: a word-level tokenizer over a
fixed vocabulary and a tiny T5 encoder or CLIP text tower with seeded random weights. Its embeddings
are fixed random functions of the words (still contextual: every layer mixes the tokens), which is
enough for a diffusion model to learn to follow captions over a closed vocabulary such as the
synthetic corpus's, and nothing more. Words outside the vocabulary map to one <unk> token. It is
written with ``save_pretrained`` and loaded through the same ``vdm.models.text_encoder.TextEncoder``
path as a real T5/CLIP, so the default run exercises the real code without downloading anything.

Without ``--vocab-from-captions`` the vocabulary is every word a synthetic-corpus caption can contain
(``synthetic_vocabulary()``, built from the word lists and phrase templates of
``vdm.synthetic.scenes``). Caption files are plain text (one caption per line) or JSON lines
with a "caption", "prompt" or "text" field. The same options give byte-identical files.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import torch

from vdm.models.text_encoder import encoder_files
from vdm.utils.io import atomic_dir

log = logging.getLogger(__name__)

GENERATOR = "vdm-random-text-encoder"
GENERATOR_VERSION = 1
MARKER = "random_text_encoder.json"  # build options; not one of the files the encoder identifier hashes
PAD, UNK = "<pad>", "<unk>"
# T5 conventions (pad 0, eos 1, unk 2); CLIP's bos/eos names, with a distinct pad
SPECIAL_TOKENS: dict[str, dict[str, str]] = {
    "t5": {"pad_token": PAD, "eos_token": "</s>", "unk_token": UNK},
    "clip": {
        "pad_token": PAD, "eos_token": "<|endoftext|>", "unk_token": UNK, "bos_token": "<|startoftext|>",
    },
}
CAPTION_FIELDS: tuple[str, ...] = ("caption", "prompt", "text")


def caption_words(captions: Iterable[str]) -> list[str]:
    """Sorted distinct words of ``captions``, split as the built tokenizer does (lowercase, \\w+ / punct)."""
    from tokenizers import normalizers, pre_tokenizers

    normalizer, pre = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    return sorted({w for c in captions for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(c))})


def synthetic_vocabulary() -> list[str]:
    """Every word a synthetic-corpus caption or held-out prompt can contain (sorted, lowercase).

    Enumerates captions of every (shape, color, motion, speed, background) through the phrase
    templates of ``vdm.synthetic.scenes`` (two-object captions add "and"), so the vocabulary
    follows that module's word lists without scanning shards.
    """
    from vdm.synthetic import scenes

    placeholder = ((0.0, 0.0), (0.0, 0.0), (1.0, 1.0))  # positions and radii do not reach the caption
    captions = []
    for shape in scenes.SHAPES:
        for color in scenes.COLORS:
            for motion in scenes.MOTIONS:
                for speed in scenes.SPEEDS:
                    obj = scenes.SceneObject(shape, color, motion, speed, *placeholder)
                    captions += [scenes.Scene(bg, (obj, obj)).caption() for bg in scenes.BACKGROUNDS]
    return caption_words(captions)


def read_captions(paths: Iterable[str | Path]) -> list[str]:
    """Captions from text files (one per line) or JSON lines (a "caption", "prompt" or "text" field)."""
    captions: list[str] = []
    for path in map(Path, paths):
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if path.suffix != ".jsonl":
            captions += lines
            continue
        for number, line in enumerate(lines, 1):
            row = json.loads(line)
            field = next((f for f in CAPTION_FIELDS if isinstance(row.get(f), str)), None)
            if field is None:
                raise ValueError(f"{path}:{number} has none of the fields {', '.join(CAPTION_FIELDS)}")
            captions.append(row[field])
    return captions


def build_options(kind: str, vocab: list[str], hidden_size: int, num_layers: int, num_heads: int,
                  max_length: int, seed: int) -> dict[str, Any]:
    """What determines the files (recorded in ``MARKER``; ``ensure_random_text_encoder`` compares it)."""
    vocab_sha = hashlib.sha256("\n".join(vocab).encode("utf-8")).hexdigest()
    return {"generator": GENERATOR, "version": GENERATOR_VERSION, "kind": kind, "hidden_size": hidden_size,
            "num_layers": num_layers, "num_heads": num_heads, "max_length": max_length, "seed": seed,
            "vocab_size": len(vocab), "vocab_sha256": vocab_sha}


def build_random_text_encoder(
    out_dir: str | Path,
    kind: Literal["t5", "clip"] = "t5",
    vocab: Iterable[str] | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_length: int = 64,
    seed: int = 0,
) -> Path:
    """Write an untrained word-level encoder into ``out_dir`` (absent or empty) and return it.

    Args:
        out_dir: target folder: config.json, model.safetensors, tokenizer.json, tokenizer_config.json
            and ``MARKER``.
        kind: "t5" (T5EncoderModel, gated-GELU as T5 v1.1) or "clip" (CLIPTextModel, causal).
        vocab: words or whole captions (split as the tokenizer does); None: ``synthetic_vocabulary()``.
        hidden_size, num_layers, num_heads: model size; hidden_size must divide by num_heads.
        max_length: the tokenizer's model_max_length and, for CLIP, the number of positions.
        seed: weights are drawn from a generator seeded with it (the global RNG is left untouched).
    """
    if kind not in SPECIAL_TOKENS:
        raise ValueError(f"kind must be one of {sorted(SPECIAL_TOKENS)}, got {kind!r}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
    words = caption_words(synthetic_vocabulary() if vocab is None else vocab)
    if not words:
        raise ValueError("the vocabulary is empty: pass words or captions")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(
            f"{out} is not empty; build into a new folder or use ensure_random_text_encoder"
        )
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(kind, words, max_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _model(kind, len(tokenizer), tokenizer, hidden_size, num_layers, num_heads, max_length)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    # name the generic class, which transformers 4.x and 5.x both resolve to the tokenizers-backed one
    # (5.x writes "TokenizersBackend", unknown to 4.x); config.json's model_type must not pick the tokenizer
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    options = build_options(kind, words, hidden_size, num_layers, num_heads, max_length, seed)
    (out / MARKER).write_text(json.dumps(options, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for file in out.iterdir():  # the weights are written through a private temporary file (mode 0600)
        file.chmod(0o644)
    log.info("built random %s text encoder in %s (%d words, hidden %d)", kind, out, len(words), hidden_size)
    return out


def _tokenizer(kind: str, words: list[str], max_length: int) -> Any:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = SPECIAL_TOKENS[kind]
    names = ["pad_token", "eos_token", "unk_token", "bos_token"][: len(special)]
    ids = {special[name]: i for i, name in enumerate(names)}
    vocab = {**ids, **{w: len(ids) + i for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=special["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    eos, bos = special["eos_token"], special.get("bos_token")
    template = f"{bos} $A {eos}" if bos else f"$A {eos}"
    used = [(t, ids[t]) for t in (bos, eos) if t]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=used)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, **special)


def _model(kind: str, vocab_size: int, tokenizer: Any, hidden_size: int, num_layers: int, num_heads: int,
           max_length: int) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if kind == "t5":
        config = T5Config(vocab_size=vocab_size, d_model=hidden_size, d_kv=hidden_size // num_heads,
                          d_ff=4 * hidden_size, num_layers=num_layers, num_heads=num_heads, dropout_rate=0.0,
                          feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
        return T5EncoderModel(config).eval()
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                            projection_dim=hidden_size, num_hidden_layers=num_layers,
                            num_attention_heads=num_heads, max_position_embeddings=max_length,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id)
    return CLIPTextModel(config).eval()


def ensure_random_text_encoder(
    out_dir: str | Path,
    kind: Literal["t5", "clip"] = "t5",
    vocab: Iterable[str] | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_length: int = 64,
    seed: int = 0,
) -> Path:
    """Return ``out_dir`` holding a random encoder built with these options, building it if needed.

    A no-op (files untouched) when the folder already holds a complete encoder: one built here with
    the same options, or any other complete encoder placed there (a real T5, say: used as is).
    Otherwise builds into a temporary sibling and swaps it in by rename under a file lock, so
    concurrent callers build once and readers never see a half-written folder. Refuses to replace
    a non-empty folder that is neither.
    """
    root = Path(out_dir).expanduser().resolve()
    root.parent.mkdir(parents=True, exist_ok=True)
    words = caption_words(synthetic_vocabulary() if vocab is None else vocab)
    options = build_options(kind, words, hidden_size, num_layers, num_heads, max_length, seed)
    with _lock(root.parent / f".{root.name}.lock"):
        state = _state(root, options)
        if state in ("current", "foreign"):
            log.info("reusing text encoder at %s%s", root, " (not built here)" if state == "foreign" else "")
            return root
        if state == "occupied":
            raise FileExistsError(f"{root} exists and holds no text encoder; refusing to replace it")
        with atomic_dir(root) as tmp:
            build_random_text_encoder(tmp, kind, words, hidden_size, num_layers, num_heads, max_length, seed)
    return root


def _state(root: Path, options: dict[str, Any]) -> str:
    """"current", "stale" (built here, other options), "foreign" (another complete encoder),
    "empty" (absent or empty) or "occupied" (something else)."""
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return "empty"
    try:
        encoder_files(root)
    except FileNotFoundError:
        complete = False
    else:
        complete = True
    try:
        marker = json.loads((root / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "foreign" if complete else "occupied"
    if marker.get("generator") != GENERATOR:
        return "foreign" if complete else "occupied"
    return "current" if complete and marker == options else "stale"


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Exclusive advisory file lock, so concurrent callers do not build the same folder twice."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(prog="python -m data_prep.standin_text_encoder",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="encoder folder (reused when its options match)")
    p.add_argument("--kind", choices=sorted(SPECIAL_TOKENS), default="t5")
    p.add_argument("--vocab-from-captions", nargs="+", type=Path, metavar="FILE", default=None,
                   help="caption files (.txt one per line, .jsonl with caption/prompt/text); "
                        "default: the synthetic corpus vocabulary")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--max-length", type=int, default=64, help="tokens (CLIP: number of positions)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: build (or reuse) the encoder, load it back and print its identifier."""
    from vdm.models.text_encoder import TextEncoder

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    vocab = read_captions(args.vocab_from_captions) if args.vocab_from_captions else None
    root = ensure_random_text_encoder(args.out, args.kind, vocab, args.hidden_size, args.num_layers,
                                      args.num_heads, args.max_length, args.seed)
    encoder = TextEncoder(str(root), args.kind, args.max_length)
    print(f"{root}: {encoder.identifier} (untrained stand-in, {len(encoder.tokenizer)} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
