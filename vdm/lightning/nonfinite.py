"""What a training step does with a NaN/Inf loss or gradient: stop the run, or skip the update.

The check runs before the optimizer update, on the loss and on the gradient norm, after the backward has
been queued: one host sync per step, which leaves the device idle only while the optimizer step launches.
Under DDP the gradients have been all-reduced by then, so every rank reaches the same decision without
another collective. With
``stop`` the step raises ``NonFiniteError`` naming the step and the batch's sample keys, so no optimizer
update and no checkpoint of the poisoned state happen; with ``skip`` the gradients are dropped (the optimizer
leaves every parameter and its state unchanged) and training goes on, with a warning naming the samples.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Literal

import torch

log = logging.getLogger(__name__)

NonFinitePolicy = Literal["stop", "skip"]
POLICIES = ("stop", "skip")


class NonFiniteError(FloatingPointError):
    """A training step produced a NaN/Inf loss or gradient (policy ``stop``)."""


def check_policy(policy: str) -> NonFinitePolicy:
    if policy not in POLICIES:
        raise ValueError(f"module.nonfinite must be one of {', '.join(POLICIES)}, got {policy!r}")
    return policy  # type: ignore[return-value]


def is_finite(value: torch.Tensor) -> bool:
    """One host sync: whether every element of ``value`` is finite."""
    return bool(torch.isfinite(value).all())


def handle_nonfinite(policy: NonFinitePolicy, what: str, step: int, keys: Sequence[str] | None) -> None:
    """Raise (``stop``) or warn (``skip``) about a non-finite ``what`` at ``step`` for samples ``keys``."""
    shown = ", ".join(map(str, list(keys or [])[:16])) or "(no sample keys)"
    message = f"non-finite {what} at step {step}; batch samples: {shown}"
    if policy == "stop":
        raise NonFiniteError(f"{message}. Stopped before the optimizer update (module.nonfinite=stop)")
    log.warning("%s: update skipped (module.nonfinite=skip)", message)


def drop_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Clear gradients so that the optimizer step leaves the parameters and their state unchanged."""
    for p in params:
        p.grad = None
