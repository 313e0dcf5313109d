"""Find the checkpoint a restarted run resumes from (``ckpt_path=auto``).

A run directory holds Lightning checkpoints in ``checkpoints/`` (files, or DeepSpeed directories) and, after
a SLURM preemption signal, Lightning's ``hpc_ckpt_<n>.ckpt`` beside them. The newest *complete* one wins:
a file whose zip archive (torch's format) is readable to its central directory, or a DeepSpeed directory
whose ``latest`` tag names a folder of readable model-state files. A checkpoint cut short by a crash is
skipped with a warning, so the run falls back to the previous one.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)


def _zip_complete(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def checkpoint_complete(path: str | Path) -> bool:
    """Whether ``path`` (a checkpoint file or DeepSpeed directory) was written to the end."""
    path = Path(path)
    if path.is_file():
        return _zip_complete(path)
    latest = path / "latest"
    if not latest.is_file():
        return False
    tag_dir = path / latest.read_text().strip()
    states = sorted(tag_dir.glob("*model_states.pt")) if tag_dir.is_dir() else []
    return bool(states) and all(_zip_complete(p) for p in states)


def candidates(run_dir: str | Path) -> list[Path]:
    """Checkpoints of a run directory, newest first (by modification time)."""
    run_dir = Path(run_dir)
    found = [*run_dir.glob("hpc_ckpt_*.ckpt"), *(run_dir / "checkpoints").glob("*.ckpt")]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def find_resume_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``run_dir``, or None when it holds none."""
    for path in candidates(run_dir):
        if checkpoint_complete(path):
            return path
        log.warning("skipping incomplete checkpoint %s (interrupted while saving?)", path)
    return None
