"""Skip accounting: samples that fail to decode (or are too short under ``skip``) are counted and logged.

Each DataLoader worker keeps a SkipStats; once it has looked at ``min_samples`` samples, a skip rate
above ``max_skip_rate`` raises SkipRateError with the counts and the last reasons. Warnings are rate
limited (the first ``log_first`` skips, then every ``log_every``-th). Workers also add their counts to
a SharedSkipCounters (a small shared-memory tensor) so the training process can read and log totals.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

# rows of the shared counter table; a worker uses row ``slot % MAX_SLOTS`` (rows only ever accumulate)
MAX_SLOTS = 256


class SkipRateError(RuntimeError):
    """Too many samples were skipped; the message gives the count, the rate and the last reasons."""


@dataclass
class SkipStats:
    """Per-worker counters of good and skipped samples with a skip-rate guard."""

    max_skip_rate: float = 0.05
    min_samples: int = 100
    where: str = ""
    log_first: int = 10
    log_every: int = 100
    ok: int = 0
    skipped: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    last: deque[str] = field(default_factory=lambda: deque(maxlen=5))

    @property
    def seen(self) -> int:
        return self.ok + self.skipped

    @property
    def rate(self) -> float:
        return self.skipped / self.seen if self.seen else 0.0

    def record_ok(self) -> None:
        self.ok += 1

    def record_skip(self, key: str, url: str, exc: BaseException) -> None:
        """Count a skipped sample, log it (rate limited) and raise SkipRateError past the limit."""
        self.skipped += 1
        kind = type(exc).__name__
        self.reasons[kind] += 1
        reason = f"{key} @ {url}: {kind}: {str(exc)[:300]}"
        self.last.append(reason)
        if self.skipped <= self.log_first or self.skipped % self.log_every == 0:
            logger.warning(
                "skipped sample %s (%d skipped of %d%s)", reason, self.skipped, self.seen, self._where()
            )
        self.check()

    def check(self) -> None:
        """Raise SkipRateError when the rate exceeds max_skip_rate after min_samples samples."""
        if self.seen >= self.min_samples and self.rate > self.max_skip_rate:
            last = "\n  ".join(self.last)
            raise SkipRateError(
                f"skipped {self.skipped} of {self.seen} samples ({self.rate:.1%}) which exceeds "
                f"max_skip_rate={self.max_skip_rate:.1%}{self._where()}; reasons {dict(self.reasons)}; "
                f"last skips:\n  {last}\nCheck the shards (data_prep probe) or raise max_skip_rate."
            )

    def summary(self) -> dict[str, Any]:
        """{"seen", "ok", "skipped", "rate", "reasons", "last"} for logging."""
        return {
            "seen": self.seen,
            "ok": self.ok,
            "skipped": self.skipped,
            "rate": self.rate,
            "reasons": dict(self.reasons),
            "last": list(self.last),
        }

    def _where(self) -> str:
        return f" in {self.where}" if self.where else ""


# skip reasons counted separately in the shared table (anything else counts as "other")
SKIP_REASONS = ("DecodeError", "ClipTooShortError", "ClipError", "SampleError", "LatentCorpusError", "shard")


def skip_reason(exc: BaseException | None) -> str:
    """The counter a skip goes to: its exception class when listed in SKIP_REASONS, else "other"."""
    name = "shard" if exc is None else type(exc).__name__
    return name if name in SKIP_REASONS else "other"


class SharedSkipCounters:
    """(MAX_SLOTS, 2 + reasons) int64 shared-memory table per worker slot: [ok, skipped, skips by reason...],
    readable by the parent.

    Created in the parent before DataLoader workers start; workers inherit (fork) or receive (spawn)
    the same shared storage.
    """

    reasons = (*SKIP_REASONS, "other")

    def __init__(self) -> None:
        self.table = torch.zeros((MAX_SLOTS, 2 + len(self.reasons)), dtype=torch.int64).share_memory_()

    def add(self, slot: int, ok: int = 0, skipped: int = 0, reason: str | None = None) -> None:
        row = self.table[slot % MAX_SLOTS]
        row[0] += ok
        row[1] += skipped
        if skipped:
            row[2 + self.reasons.index(reason if reason in self.reasons else "other")] += skipped

    def summary(self) -> dict[str, Any]:
        """Totals over all workers: {"seen", "ok", "skipped", "rate", "reasons": {reason: skips}}; a broken
        shard counts as one skip (reason "shard")."""
        totals = [int(v) for v in self.table.sum(0)]
        ok, skipped = totals[:2]
        seen = ok + skipped
        reasons = {name: n for name, n in zip(self.reasons, totals[2:]) if n}
        return {"seen": seen, "ok": ok, "skipped": skipped, "rate": skipped / seen if seen else 0.0,
                "reasons": reasons}

    def reset(self) -> None:
        self.table.zero_()
