"""Checkpoint files that are either complete or absent: written to a temporary file, then renamed.

A process killed in the middle of ``torch.save`` leaves a truncated file; under the final name that file
would shadow the previous good checkpoint (and Lightning's ``ModelCheckpoint`` would already have deleted
the older ones). Here the bytes go to ``<name>.tmp<pid>`` in the same directory, are flushed to disk, and only
then replace ``<name>`` in one atomic rename, so every checkpoint name always refers to a complete file.
DeepSpeed's directory checkpoints have their own completion marker (the ``latest`` file, written last),
which ``vdm.utils.resume`` checks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic local writes (temp file, fsync, ``os.replace``)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options!r}")
        fs = get_filesystem(path)
        if getattr(fs, "protocol", "file") not in ("file", ("file", "local")):
            super().save_checkpoint(checkpoint, path)  # remote stores have their own atomic puts
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
