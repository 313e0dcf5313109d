"""Checkpoint files that are either complete or absent: written to a temporary file, then renamed.

A process killed in the middle of ``torch.save`` leaves a truncated file; under the final name that file
would shadow the previous good checkpoint (and Lightning's ``ModelCheckpoint`` would already have deleted
the older ones). Here the bytes go to a hidden temporary sibling (``vdm.utils.io.atomic_path``), are flushed
to disk, and only then replace ``<name>`` in one atomic rename, so every checkpoint name always refers to a
complete file.
The temporary file of a process killed mid-save is removed by the next save of the same name.
DeepSpeed's directory checkpoints have their own completion marker (the ``latest`` file, written last),
which ``vdm.utils.resume`` checks.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from vdm.utils.io import atomic_path, stale_temporaries


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic local writes (temp file, fsync, ``os.replace``)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options!r}")
        fs = get_filesystem(path)
        if getattr(fs, "protocol", "file") not in ("file", ("file", "local")):
            super().save_checkpoint(checkpoint, path)  # remote stores have their own atomic puts
            return
        for stale in stale_temporaries(path):
            stale.unlink(missing_ok=True)  # left by a process killed while saving (one writer per name)
        with atomic_path(path, durable=True) as tmp, open(tmp, "wb") as handle:
            torch.save(checkpoint, handle)
