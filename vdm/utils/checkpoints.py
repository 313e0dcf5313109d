"""Load any vdm training checkpoint weights-only, and export it as one fp32 safetensors file.

Three formats are read:

- ``lightning``: a Lightning ``.ckpt`` file (``trainer.save_checkpoint`` without DeepSpeed).
- ``deepspeed``: the directory Lightning's ``DeepSpeedStrategy`` writes for ``x.ckpt`` (a ``latest`` file
  and a tag folder of ``*_model_states.pt`` / ``*_optim_states.pt`` shards). ZeRO-1/2/3 shards are merged
  into one fp32 state dict by DeepSpeed's own ``zero_to_fp32``; the number of ranks is read from the files.
- ``safetensors``: an export written by :func:`save_export` (metadata ``"format": "vdm"``).

Every pickle is read with ``torch.load(weights_only=True)``: a checkpoint carrying any global outside torch's
weights-only set (plus the few DeepSpeed classes in :func:`_deepspeed_safe_globals`) is refused, so loading a
foreign checkpoint cannot run code.

CLI: ``python -m vdm.utils.checkpoints SRC DST.safetensors``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vdm.utils.hashing import sha256_file, sha256_files
from vdm.utils.io import atomic_path

log = logging.getLogger(__name__)

# non-tensor entries of a Lightning checkpoint (or DeepSpeed client state) kept as metadata
META_KEYS = (
    "vdm_config", "vae_hash", "global_step", "epoch", "pytorch-lightning_version", "hyper_parameters",
)
# Lightning wraps the LightningModule in _LightningModuleWrapperBase (attribute ``_forward_module``)
_WRAPPER_PREFIX = "_forward_module."
_FORMAT_MARKER = "vdm"
_META_FIELD = "vdm_meta"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read: corrupt, truncated, or not of the expected kind."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose pickle holds a global outside the weights-only allow-list (it could run code)."""


@dataclass
class LoadedCheckpoint:
    """Weights and metadata of one checkpoint.

    Attributes:
        state_dict: LightningModule state-dict keys (``dit.blocks.0...``, ``ema.module...``) -> CPU tensors.
        meta: JSON-compatible entries of :data:`META_KEYS` found in the checkpoint (``deepspeed`` checkpoints
            add ``"deepspeed": {"version", "world_size", "zero_stage", "tag"}``).
        sha256: ``checkpoint_hash`` of the source (file, or directory's files in order).
        format: ``"lightning"``, ``"deepspeed"`` or ``"safetensors"``.
    """

    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]
    sha256: str
    format: str


def checkpoint_hash(path: str | Path) -> str:
    """sha256 of a file, or of a directory's files in relative-path order (paths hashed with the bytes)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if path.is_file():
        return sha256_file(path)
    # the relative paths enter the hash so that renaming or moving a file changes it
    return sha256_files(sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file()))


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Load a Lightning ``.ckpt``, a DeepSpeed checkpoint directory or a vdm safetensors export (safely)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if path.is_dir():
        fmt, (state_dict, meta) = "deepspeed", _load_deepspeed(path)
    elif path.suffix == ".safetensors":
        fmt, (state_dict, meta) = "safetensors", _load_safetensors(path)
    else:
        fmt, (state_dict, meta) = "lightning", _load_lightning(path)
    return LoadedCheckpoint(state_dict=state_dict, meta=meta, sha256=checkpoint_hash(path), format=fmt)


def save_export(checkpoint: LoadedCheckpoint, path: str | Path) -> Path:
    """Write ``checkpoint`` as an fp32 safetensors file at ``path`` (atomically: temp file + ``os.replace``).

    Floating tensors are cast to float32; integer/bool tensors keep their dtype. Tensors are made contiguous
    and those sharing storage are cloned (safetensors stores no aliasing).
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"export path {path} must end with .safetensors")
    tensors = _export_tensors(checkpoint.state_dict)
    metadata = {
        "format": _FORMAT_MARKER,
        _META_FIELD: json.dumps(checkpoint.meta, sort_keys=True),
        "vdm_source_sha256": checkpoint.sha256,
        "vdm_source_format": checkpoint.format,
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def _export_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp32, contiguous, unaliased copies (where needed) of the state dict's tensors."""
    out: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32)
        tensor = tensor.contiguous()
        if tensor.numel() > 0:
            ptr = tensor.untyped_storage().data_ptr()
            if ptr in seen_storages:
                tensor = tensor.clone()
                ptr = tensor.untyped_storage().data_ptr()
            seen_storages.add(ptr)
        out[name] = tensor
    return out


def _json_meta(source: dict[str, Any], where: Path) -> dict[str, Any]:
    """The :data:`META_KEYS` entries of ``source``, normalised through JSON (as an export stores them)."""
    meta: dict[str, Any] = {}
    for key in META_KEYS:
        if key not in source:
            continue
        try:
            meta[key] = json.loads(json.dumps(source[key]))
        except (TypeError, ValueError):
            log.warning("%s: metadata entry %r is not JSON-serialisable; left out", where, key)
    return meta


def _safe_torch_load(path: str | Path, original_load: Any = None, **kwargs: Any) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``, errors re-raised naming the file."""
    load = original_load or torch.load
    kwargs.update(weights_only=True)
    kwargs.setdefault("map_location", "cpu")
    try:
        return load(path, **kwargs)
    except pickle.UnpicklingError as err:
        message = str(err)
        if "Weights only load failed" in message:
            # torch's message names the offending global (e.g. "Unsupported global: GLOBAL posix.system")
            lines = [line.strip() for line in message.splitlines() if "unsupported" in line.lower()]
            detail = lines[0] if lines else message.splitlines()[0]
            raise UnsafeCheckpointError(
                f"{path}: refused to load: its pickle holds a global outside the weights-only allow-list "
                f"({detail}). Only load checkpoints from trusted sources, and never with weights_only=False."
            ) from err
        raise CheckpointError(f"{path}: corrupt pickle data ({err})") from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read the checkpoint (truncated or corrupt?): {err}") from err


def _load_lightning(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    ckpt = _safe_torch_load(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (expected a dict with a 'state_dict' key)")
    return {**ckpt["state_dict"], **_client_tensors(ckpt)}, _json_meta(ckpt, path)


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        state_dict = load_file(str(path))
    except (SafetensorError, OSError) as err:
        message = f"{path}: cannot read the safetensors file (truncated or corrupt?): {err}"
        raise CheckpointError(message) from err
    if metadata.get("format") != _FORMAT_MARKER or _META_FIELD not in metadata:
        raise CheckpointError(
            f"{path}: not a vdm export (its safetensors metadata lacks 'format': 'vdm' and '{_META_FIELD}'); "
            "write one with `python -m vdm.utils.checkpoints SRC DST.safetensors`"
        )
    try:
        meta = json.loads(metadata[_META_FIELD])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: metadata '{_META_FIELD}' is not valid JSON: {err}") from err
    return state_dict, meta


# -- DeepSpeed ---------------------------------------------------------------------------------------------


def _deepspeed_safe_globals() -> list[Any]:
    """The non-tensor classes pickled in DeepSpeed 0.19 ZeRO checkpoint files (found by loading real ones).

    ``*_optim_states.pt`` of ZeRO-1/2/3 hold ``LossScaler`` (fp32/bf16: static scale) or ``DynamicLossScaler``
    (fp16), ``ZeroStageEnum`` and, for ZeRO-1/2, ``fragment_address``; ``*_model_states.pt`` need nothing
    beyond torch's defaults. ``ZeroStageEnum`` is an int ``Enum`` (rebuilt from its value); the others are
    plain attribute holders (rebuilt by setting their ``__dict__``, no constructor code runs).
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def _weights_only_torch_load(allowed: list[Any]) -> Iterator[None]:
    """Force ``weights_only=True`` on every ``torch.load`` call made inside, with ``allowed`` globals added.

    DeepSpeed's ``zero_to_fp32`` hard-codes ``torch.load(..., weights_only=False)``, which would unpickle
    anything a checkpoint holds. Rather than re-implement its shard merge, ``torch.load`` is replaced for the
    duration of the merge (process-wide: a concurrent thread's ``torch.load`` is forced weights-only too,
    the safe direction) and always restored.
    """
    original = torch.load

    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        if args:  # torch.load(f, map_location, pickle_module, ...): keep only what is safe positionally
            kwargs.setdefault("map_location", args[0])
        kwargs.pop("pickle_module", None)
        return _safe_torch_load(f, original_load=original, **kwargs)

    torch.load = load  # type: ignore[assignment]
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        torch.load = original


def _deepspeed_tag(path: Path) -> str:
    """The tag folder of a DeepSpeed checkpoint directory (``latest``'s content, else ``checkpoint``)."""
    latest = path / "latest"
    tag = latest.read_text().strip() if latest.is_file() else "checkpoint"
    if not (path / tag).is_dir():
        raise ValueError(
            f"{path} is a directory but not a DeepSpeed checkpoint: expected a 'latest' file naming a tag "
            f"folder (Lightning writes 'checkpoint/') with *_model_states.pt and *_optim_states.pt files; "
            f"found no folder {tag!r}"
        )
    return tag


def _load_deepspeed(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint, get_model_state_files

    tag = _deepspeed_tag(path)
    try:
        model_files = get_model_state_files(str(path / tag))  # natural order: rank 0 first
    except FileNotFoundError as err:
        raise ValueError(f"{path / tag}: not a DeepSpeed checkpoint folder ({err})") from err
    # the client state (Lightning's checkpoint dict minus state_dict/optimizer_states) is in every rank's file
    states = _safe_torch_load(model_files[0], mmap=True)
    if not isinstance(states, dict) or "param_shapes" not in states:
        raise CheckpointError(f"{model_files[0]}: not a DeepSpeed model-states file (no 'param_shapes')")
    captured = io.StringIO()  # zero_to_fp32 reports with print(): sent to the debug log
    try:
        with _weights_only_torch_load(_deepspeed_safe_globals()), contextlib.redirect_stdout(captured):
            merged = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag)
    except (KeyError, IndexError, TypeError) as err:
        raise CheckpointError(f"{path}: inconsistent DeepSpeed checkpoint shards ({err!r})") from err
    finally:
        for line in captured.getvalue().splitlines():
            log.debug("zero_to_fp32: %s", line)
    # zero_to_fp32 returns frozen parameters (e.g. EMA weights) in the training dtype (bf16): fp32 for all
    merged = {**{_strip_prefix(k): v for k, v in merged.items()}, **_client_tensors(states)}
    state_dict = {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in merged.items()}
    meta = _json_meta(states, path)
    stage = ((states.get("ds_config") or {}).get("zero_optimization") or {}).get("stage")
    meta["deepspeed"] = {
        "version": states.get("ds_version"),
        "world_size": states.get("dp_world_size"),
        "zero_stage": stage,
        "tag": tag,
    }
    return state_dict, meta


def _client_tensors(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Weights a module keeps in the checkpoint beside ``state_dict`` (``ema_state_dict``: the fp32 EMA that
    vdm holds outside a DeepSpeed engine), under their module state-dict keys."""
    extra = checkpoint.get("ema_state_dict") or {}
    return {str(k): v for k, v in extra.items() if isinstance(v, torch.Tensor)}


def _strip_prefix(key: str) -> str:
    return key[len(_WRAPPER_PREFIX):] if key.startswith(_WRAPPER_PREFIX) else key


# -- CLI ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """``python -m vdm.utils.checkpoints SRC DST.safetensors``: export any checkpoint as fp32 safetensors."""
    parser = argparse.ArgumentParser(
        prog="python -m vdm.utils.checkpoints",
        description="Load a Lightning .ckpt, a DeepSpeed checkpoint directory or a vdm export (weights-only) "
        "and write its weights and metadata as one fp32 safetensors file.",
    )
    parser.add_argument("src", type=Path, help="checkpoint file or DeepSpeed checkpoint directory")
    parser.add_argument("dst", type=Path, help="output path ending in .safetensors")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        checkpoint = load_checkpoint(args.src)
        out = save_export(checkpoint, args.dst)
    except (FileNotFoundError, ValueError, CheckpointError) as err:
        parser.exit(1, f"error: {err}\n")
    num_params = sum(t.numel() for t in checkpoint.state_dict.values())
    log.info(
        "%s (%s, sha256 %s) -> %s: %d tensors, %d parameters",
        args.src, checkpoint.format, checkpoint.sha256[:12], out, len(checkpoint.state_dict), num_params,
    )


if __name__ == "__main__":
    main()
