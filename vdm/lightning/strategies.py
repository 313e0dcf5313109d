"""Strategy helpers: DeepSpeed through Lightning on CPU (gloo) for tests, and FSDP policies from YAML.

On CUDA use Lightning's ``DeepSpeedStrategy`` directly; this subclass only lifts the checks that make it
CUDA-only so that DeepSpeed's real ZeRO-1/2/3 code paths (partitioning, checkpoint shards, fp32
consolidation) can be exercised on a machine without a GPU.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.strategies.ddp import DDPStrategy

log = logging.getLogger(__name__)

_UNSUPPORTED_CPU_PRECISION = ("16-mixed", "16-true")


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` that runs on ``CPUAccelerator`` with the gloo backend.

    Requires ``DS_ACCELERATOR=cpu`` in the environment before ``deepspeed`` is first imported (DeepSpeed picks
    its accelerator once, on first use; this class checks and never sets it). Use with ``Trainer(
    accelerator="cpu", strategy=CPUDeepSpeedStrategy(stage=...), precision="32-true" | "bf16-mixed")``.

    Overrides, and why (Lightning 2.6, DeepSpeed 0.19):

    - ``setup_environment``: ``DeepSpeedStrategy.setup_environment`` raises unless the accelerator is a
      ``CUDAAccelerator``. Here a ``CPUAccelerator`` is required instead, and the rest of the parent chain
      (``DDPStrategy.setup_environment``: device setup, then ``setup_distributed``) runs unchanged.
    - Before that, the CPU ``parallel_devices`` get explicit indices (``cpu:0 .. cpu:N-1``, one per local
      rank). Lightning's CPU devices have ``index=None``, which breaks two CUDA assumptions of the parent:
      ``setup_distributed`` validates that device indices equal ``range(num_devices)``, and
      ``deepspeed.initialize`` receives ``device_rank=root_device.index`` and compares it with 0
      (``TypeError`` on ``None``). ``cpu:<i>`` is the same device as ``cpu`` for every tensor operation.
    - fp16 (``16-mixed``/``16-true``) is refused at setup with a clear error. DeepSpeed's CPU accelerator
      enables fp16 only where oneDNN has fp16 kernels (``is_fp16_supported()``: CPUs with AVX512-FP16), so
      an fp16 CPU run would work on some machines and fail on others; fp32 and bf16 work everywhere.

    Everything else (gloo process group via ``deepspeed.init_distributed``, config, checkpoint save/load) is
    the parent's code. On a non-CPU accelerator the strategy refuses to run rather than guess.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if os.environ.get("DS_ACCELERATOR") != "cpu":
            raise RuntimeError(
                "CPUDeepSpeedStrategy needs DS_ACCELERATOR=cpu in the environment before deepspeed is "
                f"imported (found DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR')!r}); on CUDA use "
                "lightning.pytorch.strategies.DeepSpeedStrategy"
            )
        super().__init__(*args, **kwargs)  # imports deepspeed
        from deepspeed.accelerator import get_accelerator

        name = get_accelerator().device_name()
        if name != "cpu":
            raise RuntimeError(
                f"deepspeed already chose the {name!r} accelerator (it was first used before "
                "DS_ACCELERATOR=cpu was set): set DS_ACCELERATOR=cpu before the process imports deepspeed"
            )

    def setup_environment(self) -> None:
        """Check the CPU set-up, index the CPU devices, then run ``DDPStrategy.setup_environment``."""
        if not isinstance(self.accelerator, CPUAccelerator):
            raise RuntimeError(
                f"CPUDeepSpeedStrategy runs on CPUAccelerator only, got {type(self.accelerator).__name__}; "
                "on CUDA use lightning.pytorch.strategies.DeepSpeedStrategy"
            )
        precision = self.precision_plugin.precision
        if precision in _UNSUPPORTED_CPU_PRECISION:
            raise ValueError(
                f"precision={precision!r} is not supported by CPUDeepSpeedStrategy (DeepSpeed's fp16 on CPU "
                "depends on the CPU's oneDNN fp16 support): use '32-true', 'bf16-mixed' or 'bf16-true'"
            )
        assert self.parallel_devices is not None
        self.parallel_devices = [torch.device("cpu", i) for i in range(len(self.parallel_devices))]
        log.debug("DeepSpeed on CPU: %d local process(es), backend gloo", len(self.parallel_devices))
        # skip DeepSpeedStrategy's CUDA-only check, keep the rest of the chain
        DDPStrategy.setup_environment(self)


def _import_class(path: str) -> type[torch.nn.Module]:
    module_name, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), name, None)
    if not isinstance(cls, type) or not issubclass(cls, torch.nn.Module):
        raise ValueError(f"fsdp: {path!r} is not an nn.Module class")
    return cls


def fsdp_strategy(
    wrap_modules: Sequence[str] = (),
    checkpoint_modules: Sequence[str] = (),
    **kwargs: Any,
) -> FSDPStrategy:
    """Lightning's ``FSDPStrategy`` with its wrap and activation-checkpointing policies given as class paths.

    YAML cannot hold classes; ``wrap_modules`` (e.g. ``vdm.models.dit_layers.DiTBlock``) become the set of
    module types each wrapped in its own FSDP unit, ``checkpoint_modules`` those whose activations are
    recomputed in backward. Other keyword arguments go to ``FSDPStrategy`` unchanged.
    """
    wrap = {_import_class(p) for p in wrap_modules}
    ckpt = {_import_class(p) for p in checkpoint_modules}
    return FSDPStrategy(auto_wrap_policy=wrap or None, activation_checkpointing_policy=ckpt or None, **kwargs)


def is_deepspeed(strategy: Any) -> bool:
    """Whether ``strategy`` is Lightning's DeepSpeedStrategy (or a subclass such as CPUDeepSpeedStrategy)."""
    return isinstance(strategy, DeepSpeedStrategy)


def set_deepspeed_gradient_clipping(strategy: Any, max_norm: float | None) -> None:
    """Under DeepSpeed, which clips inside its optimizer step, use the module's clipping norm.

    Lightning would take it from ``Trainer(gradient_clip_val)``, which it refuses with manual optimization
    (stage 1); writing DeepSpeed's ``gradient_clipping`` before the engine is built serves both stages.
    """
    if is_deepspeed(strategy):
        strategy.config["gradient_clipping"] = float(max_norm or 0.0)


def param_dtype(module: torch.nn.Module) -> torch.dtype:
    """dtype of a module's floating-point parameters: what its inputs are cast to (bf16 under DeepSpeed)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def compile_blocks(model: torch.nn.Module, **options: Any) -> int:
    """``torch.compile`` each block of ``model`` in place (``model.blocks``, else the whole model).

    In place (``nn.Module.compile``), so parameter names and checkpoints are unchanged; per block, so the
    graphs are small, identical blocks share one compiled graph, and activation checkpointing wraps them.
    ``options`` go to ``torch.compile`` (default ``fullgraph=True``: a graph break fails loudly instead of
    silently splitting a block; tests/test_compile.py checks there is none). Returns the number of
    compiled modules.
    """
    options = {"fullgraph": True, **options}
    blocks = list(getattr(model, "blocks", [])) or [model]
    for block in blocks:
        block.compile(**options)
    log.info("torch.compile: %d module(s) of %s", len(blocks), type(model).__name__)
    return len(blocks)


def deepspeed_cpu_adam(params: Any, *, fused: bool | None = None, **kwargs: Any) -> torch.optim.Optimizer:
    """DeepSpeed's vectorised CPU Adam, which ZeRO-Offload needs for its optimizer step on the CPU.

    ``fused`` (the stages' torch AdamW setting, inherited through the config) does not apply: ignored.
    """
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(params, **kwargs)


def clip_by_norm(
    module: Any, optimizer: Any, params: list[torch.nn.Parameter], norm: torch.Tensor | None, max_norm: float
) -> None:
    """Scale the gradients of ``params`` to at most ``max_norm``, given their total ``norm`` (no host sync).

    Lightning's ``clip_gradients`` refuses fused optimizers under any mixed precision, and computes the
    norm a second time; without a gradient scaler (bf16, fp32) the gradients are the true ones, so they are
    scaled here directly with the norm already computed. With a scaler (fp16) Lightning unscales first.
    Under DeepSpeed the engine clips (``set_deepspeed_gradient_clipping``): nothing to do.
    """
    if is_deepspeed(module.trainer.strategy):
        return
    if getattr(module.trainer.precision_plugin, "scaler", None) is not None or norm is None:
        module.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")
        return
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
