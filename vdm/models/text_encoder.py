"""Frozen text encoders for caption conditioning: a T5 encoder or a CLIP text tower from a local folder.

``TextEncoder(path, kind, max_length)`` loads a Hugging Face ``transformers`` model and its tokenizer
from ``path`` with ``local_files_only=True``; nothing is ever downloaded. The folder must hold what
``save_pretrained`` writes: ``config.json``, the weights (``*.safetensors`` or ``pytorch_model*.bin``)
and the tokenizer (``tokenizer.json``, ``spiece.model`` or ``vocab.json`` + ``merges.txt``, with
``tokenizer_config.json``). To get a real encoder, run ``save_pretrained(path)`` for both model and
tokenizer on a machine with network access and copy the folder over.

- ``kind="t5"``: ``T5EncoderModel`` (PixArt, Open-Sora), or ``MT5EncoderModel`` / ``UMT5EncoderModel``
  (Wan) when ``config.json`` says so; the output is the last hidden state.
- ``kind="clip"``: ``CLIPTextModel``; the last hidden state (after the final LayerNorm) or, with
  ``layer="penultimate"``, the second-to-last layer's output without the final LayerNorm (as SDXL).

Conventions of ``encode``: captions are padded on the right / truncated to ``max_length`` tokens
(the tokenizer's special tokens included, so a truncated caption still ends in EOS); the returned
mask is True on real tokens and embeddings are zero on padded positions (as Wan), float32 whatever
the weights' dtype. The encoder is frozen: no gradients, always in eval mode, and its weights are
not part of ``state_dict()`` -- they are reloaded from ``path`` and pinned by ``identifier``, so a
diffusion checkpoint does not carry gigabytes of T5 weights.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from vdm.utils.hashing import sha256_files

log = logging.getLogger(__name__)

TextEncoderKind = Literal["t5", "clip"]
TextEncoderLayer = Literal["last", "penultimate"]
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
}
CONFIG_FILE = "config.json"
WEIGHT_GLOBS: tuple[str, ...] = (
    "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json",
)
# every file that can change how captions are tokenised; any one of TOKENIZER_MODEL_FILES suffices
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "spiece.model", "vocab.json", "merges.txt", "vocab.txt",
)
TOKENIZER_MODEL_FILES: tuple[str, ...] = ("tokenizer.json", "spiece.model", "vocab.json")
MODEL_TYPES: dict[str, tuple[str, ...]] = {"t5": ("t5", "mt5", "umt5"), "clip": ("clip_text_model", "clip")}
_NO_DOWNLOAD_HINT = (
    "nothing is downloaded: place the encoder there locally (model.save_pretrained(dir) and "
    "tokenizer.save_pretrained(dir) on a machine with network access, then copy the folder), "
    "or build an untrained stand-in with `python -m data_prep.standin_text_encoder --out DIR`"
)


def encoder_files(path: str | Path) -> list[Path]:
    """The files that define an encoder in ``path`` (config, weights, tokenizer), sorted by name.

    Raises:
        FileNotFoundError: ``path`` is not a folder, or lacks config.json, weights or tokenizer files;
            the message names the folder, what is missing and how to provide it.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"text encoder folder {root} does not exist: expected a folder with {CONFIG_FILE}, weights "
            f"(*.safetensors or pytorch_model*.bin) and tokenizer files; {_NO_DOWNLOAD_HINT}"
        )
    weights = sorted({p for pattern in WEIGHT_GLOBS for p in root.glob(pattern) if p.is_file()})
    tokenizer = [root / name for name in TOKENIZER_FILES if (root / name).is_file()]
    missing = []
    if not (root / CONFIG_FILE).is_file():
        missing.append(CONFIG_FILE)
    if not weights:
        missing.append("weights (*.safetensors or pytorch_model*.bin)")
    if not any((root / name).is_file() for name in TOKENIZER_MODEL_FILES):
        names = ", ".join(TOKENIZER_MODEL_FILES)
        missing.append(f"tokenizer files (one of {names}, with tokenizer_config.json)")
    if missing:
        raise FileNotFoundError(f"text encoder folder {root} lacks {'; '.join(missing)}; {_NO_DOWNLOAD_HINT}")
    return sorted([root / CONFIG_FILE, *weights, *tokenizer], key=lambda p: p.name)


def fingerprint(files: list[Path]) -> str:
    """sha256 (hex) over the files' names (not their folder) and contents, in the given order."""
    return sha256_files((file.name, file) for file in files)


class TextEncoder(nn.Module):
    """Frozen pretrained text encoder: captions -> ((B, max_length, hidden) float32, (B, max_length) bool).

    Args:
        path: local folder holding config.json, weights and tokenizer (see the module docstring).
        kind: "t5" (T5 / mT5 / UMT5 encoder) or "clip" (CLIP text tower).
        max_length: tokens per caption, special tokens included; captions are padded/truncated to it.
        dtype: weights dtype, "float32", "bfloat16" or "float16" (T5 overflows in float16: prefer bf16).
        layer: "last" hidden state, or "penultimate" (CLIP only; before the final LayerNorm).
    """

    def __init__(
        self,
        path: str,
        kind: TextEncoderKind,
        max_length: int,
        dtype: str = "float32",
        layer: TextEncoderLayer = "last",
    ) -> None:
        super().__init__()
        if kind not in MODEL_TYPES:
            raise ValueError(f"text encoder kind must be one of {sorted(MODEL_TYPES)}, got {kind!r}")
        if dtype not in DTYPES:
            raise ValueError(f"text encoder dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if layer not in ("last", "penultimate") or (layer == "penultimate" and kind != "clip"):
            raise ValueError(
                f"layer must be 'last', or 'penultimate' for kind='clip'; got {layer!r} for {kind!r}"
            )
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1 token, got {max_length}")
        files = encoder_files(path)
        self.path, self.kind, self.max_length = str(path), kind, max_length
        self.dtype_name, self.layer = dtype, layer
        # the identifier hashes the files lazily (a T5-XXL is ~20 GB); the stats catch later edits
        self._files = files
        self._stats = [(f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        self._identifier: str | None = None
        self._null: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self._load_prefix = ""
        self.tokenizer = _load_tokenizer(Path(path).expanduser())
        self.model = _load_model(Path(path).expanduser(), kind, DTYPES[dtype])
        self.model.requires_grad_(False)
        super().train(False)
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if kind == "clip" and max_length > positions:
            raise ValueError(
                f"max_length={max_length} exceeds the CLIP text model's {positions} positions ({path}); "
                f"lower max_length"
            )
        if kind == "t5" and dtype == "float16":
            log.warning("T5 activations overflow in float16 (NaN embeddings); prefer bfloat16 or float32")
        # weights come from `path`, never from a checkpoint: keep them out of state_dict both ways
        self.register_state_dict_post_hook(_drop_own_keys)
        self.register_load_state_dict_post_hook(_forget_missing_keys)
        log.info("loaded %s text encoder from %s (%s, hidden %d, max_length %d)", kind, path, dtype,
                 self.hidden_size, max_length)

    @property
    def hidden_size(self) -> int:
        """Width of the returned embeddings."""
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def identifier(self) -> str:
        """``"{kind}:{sha256[:16]}:{max_length}"`` (kind ``clip-penultimate`` for that layer).

        The hash covers config.json, the weight files and the tokenizer files (names and bytes, not
        the folder), so copies of the folder share it and any change to weights, tokenizer, kind,
        layer or max_length changes it. The weights' dtype is not part of it.
        """
        if self._identifier is None:
            now = [(f.stat().st_size, f.stat().st_mtime_ns) for f in self._files]
            if now != self._stats:
                raise RuntimeError(
                    f"text encoder files in {self.path} changed after loading; reload the encoder"
                )
            kind = "clip-penultimate" if self.layer == "penultimate" else self.kind
            self._identifier = f"{kind}:{fingerprint(self._files)[:16]}:{self.max_length}"
        return self._identifier

    def train(self, mode: bool = True) -> TextEncoder:
        """Always eval: a frozen encoder must not switch dropout on when its parent trains."""
        return super().train(False)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> embeddings (B, max_length, hidden) float32 and mask (B, max_length) bool.

        Runs under ``torch.no_grad`` rather than ``inference_mode``: inference tensors cannot be
        saved for backward, and the embeddings feed a trained network. Every mask row has at least one
        True (the tokenizers add EOS; a tokenizer that yields nothing gets position 0 marked valid)
        so masked cross-attention never normalises over an empty set.
        """
        if isinstance(captions, str):
            raise TypeError("encode() takes a list of captions, not a single string")
        captions = list(captions)
        device = self.device
        if not captions:
            return (torch.zeros(0, self.max_length, self.hidden_size, device=device),
                    torch.zeros(0, self.max_length, dtype=torch.bool, device=device))
        tokens = self.tokenizer(captions, padding="max_length", max_length=self.max_length, truncation=True,
                                return_tensors="pt")
        mask = tokens["attention_mask"].bool()  # B L, on the host: no device sync to fix empty rows
        mask[:, 0] |= ~mask.any(dim=1)
        # a few hundred bytes: an asynchronous copy from pageable memory is staged at once
        ids = tokens["input_ids"].to(device, non_blocking=True)  # B L
        mask = mask.to(device, non_blocking=True)
        out = self.model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=self.layer != "last")
        h = out.hidden_states[-2] if self.layer == "penultimate" else out.last_hidden_state  # B L D
        return h.float() * mask[..., None], mask

    def null_embedding(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``encode([""])``: (1, max_length, hidden) float32, (1, max_length) bool; cached per device/dtype.

        The empty caption is the unconditional input for classifier-free guidance; its mask holds at
        least the EOS token (and BOS for CLIP). Returns copies, so callers may modify them.
        """
        param = next(self.model.parameters())
        key = (param.device, param.dtype)
        if key not in self._null:
            self._null[key] = self.encode([""])
        emb, mask = self._null[key]
        return emb.clone(), mask.clone()

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, path={self.path!r}, max_length={self.max_length}, "
                f"dtype={self.dtype_name!r}, layer={self.layer!r}")

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # checkpoints that do hold the weights (older or foreign ones) are ignored too
        for key in [k for k in state_dict if k.startswith(prefix)]:
            del state_dict[key]
        self._load_prefix = prefix
        super()._load_from_state_dict(state_dict, prefix, *args)


def _drop_own_keys(module: TextEncoder, state_dict: OrderedDict[str, Any], prefix: str, *_: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _forget_missing_keys(module: TextEncoder, incompatible: Any) -> None:
    prefix = module._load_prefix
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not k.startswith(prefix)]


def _load_tokenizer(root: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(root), local_files_only=True)
    tokenizer.padding_side = "right"  # valid tokens first: the mask is a prefix of each row
    return tokenizer


def _load_model(root: Path, kind: str, dtype: torch.dtype) -> nn.Module:
    import json

    import transformers
    from packaging.version import Version

    model_type = json.loads((root / CONFIG_FILE).read_text(encoding="utf-8")).get("model_type")
    if model_type not in MODEL_TYPES[kind]:
        raise ValueError(
            f"{root / CONFIG_FILE} has model_type {model_type!r}, but kind={kind!r} expects one of "
            f"{', '.join(MODEL_TYPES[kind])}"
        )
    name = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}.get(
        model_type, "CLIPTextModel"
    )
    # explicit dtype: transformers 5 would otherwise keep the checkpoint's dtype ("auto"); the keyword
    # was torch_dtype before 4.56
    dtype_key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    model_class = getattr(transformers, name)
    model = model_class.from_pretrained(str(root), local_files_only=True, **{dtype_key: dtype})
    return model.eval()
