"""torch.compile of the DiT: no graph breaks in its blocks, no needless recompiles, no host-device syncs.

Graph breaks and guards come from dynamo whatever the backend, so the cheap ``aot_eager`` backend (dynamo
and AOT autograd, which also traces the backward, without code generation) is enough on CPU.

Host syncs are caught on CPU by ``HostSyncGuard``: every operator that reads a tensor's values back to
the host (``.item()``, ``bool()``, ``.tolist()``, ``nonzero``, boolean indexing, ``unique`` ...) is recorded
with its place in ``vdm``. On a GPU each of them would stall the host until the device catches up.
Blocking host-to-device copies (``.to(device)`` from pageable memory) cannot be told apart on a CPU.
"""

from __future__ import annotations

import copy
import traceback
from functools import partialmethod
from pathlib import Path

import pytest
import torch
import torch._dynamo
from omegaconf import OmegaConf
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from tests.helpers.config import config_option
from vdm.lightning.strategies import compile_blocks
from vdm.models.dit import VideoDiT

CONF_MODEL = Path(__file__).resolve().parents[1] / "conf" / "model"
VDM_DIR = str(Path(__file__).resolve().parents[1] / "vdm")
CONTEXT_DIM = 32
ALL_MICRO = ("fps", "frames", "height", "width")
# whole-model cases: (attention, gradient checkpointing)
MODEL_CASES, MODEL_IDS = [("full", False), ("factorized", True)], ["full", "factorized-checkpointed"]


def tiny_dit(randomize: bool = True, **overrides) -> VideoDiT:
    """The ``dit_tiny`` preset (text width ``CONTEXT_DIM``); ``randomize`` makes zero-init branches live."""
    config = OmegaConf.to_container(config_option("model", "dit_tiny").dit)
    config = {k: v for k, v in config.items() if k != "_target_"}
    torch.manual_seed(0)
    model = VideoDiT(**{**config, "context_dim": CONTEXT_DIM, **overrides})
    if randomize:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model


def dit_inputs(model: VideoDiT, frames: int = 4, size: int = 8, masked: bool = True) -> tuple[tuple, dict]:
    """(x, t, context, mask) and the micro-condition kwargs the model needs; batch 3, 6 text tokens.

    The mask has a padded caption (sample 0) and an empty one (sample 1, no cross-attention at all).
    """
    gen = torch.Generator().manual_seed(1)
    batch, length = 3, 6
    x = torch.randn(batch, model.in_channels + model.cond_channels, frames, size, size, generator=gen)
    context = torch.randn(batch, length, model.context_dim, generator=gen)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1] = False
    kwargs = {}
    if "fps" in model.micro_conditions:
        kwargs["fps"] = torch.tensor([8.0, 24.0, 12.0])
    if set(model.micro_conditions) - {"fps"}:
        kwargs["size"] = torch.tensor([[17.0, 256.0, 256.0], [33.0, 512.0, 288.0], [9.0, 64.0, 64.0]])
    return (x, torch.rand(batch, generator=gen), context, mask if masked else None), kwargs


def block_args(model: VideoDiT, **inputs) -> tuple:
    """The positional arguments ``VideoDiT.forward`` passes to its first block (captured by a hook)."""
    captured = []
    handle = model.blocks[0].register_forward_pre_hook(lambda _, args: captured.append(args))
    with torch.no_grad():
        args, kwargs = dit_inputs(model, **inputs)
        model(*args, **kwargs)
    handle.remove()
    return captured[0]


def explain_breaks(explained) -> str:
    """Every graph-break reason with the user frames that led to it."""
    return "\n".join(
        f"- {r.reason}\n{''.join(traceback.format_list(r.user_stack))}" for r in explained.break_reasons
    )


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture
def compile_with(monkeypatch):
    """Make ``nn.Module.compile`` (what ``compile_blocks`` calls) use a counting aot_eager backend."""

    def patch(**kwargs) -> CompileCounterWithBackend:
        counter = CompileCounterWithBackend("aot_eager")
        monkeypatch.setattr(
            torch.nn.Module, "compile", partialmethod(torch.nn.Module.compile, backend=counter, **kwargs)
        )
        return counter

    return patch


# graph breaks


# (DiT overrides, input options, gradient checkpointing); the text padding mask is on unless said otherwise.
# Micro-conditions only change the conditioning vector c a block gets: they are covered with the whole model.
BLOCK_CASES = {
    "full": ({}, {}, False),
    "factorized": ({"attention": "factorized"}, {}, False),
    "factorized-one-frame": ({"attention": "factorized"}, {"frames": 1}, False),
    "no-text-mask": ({}, {"masked": False}, False),
    "factorized-checkpointed": ({"attention": "factorized"}, {}, True),
}


@pytest.mark.parametrize("case", list(BLOCK_CASES))
def test_block_compiles_to_one_graph(case):
    overrides, inputs, checkpointed = BLOCK_CASES[case]
    model = tiny_dit(**overrides)
    args = block_args(model, **inputs)
    block = model.blocks[0]
    # what VideoDiT.forward runs under gradient_checkpointing
    fn = (lambda *a: checkpoint(block, *a, use_reentrant=False)) if checkpointed else block
    explained = torch._dynamo.explain(fn)(*args)
    assert explained.graph_break_count == 0, f"graph breaks in DiTBlock:\n{explain_breaks(explained)}"
    assert explained.graph_count == 1, f"{explained.graph_count} graphs for one block"


@pytest.mark.parametrize(("attention", "checkpointing"), MODEL_CASES, ids=MODEL_IDS)
def test_compiled_blocks_match_eager_without_breaks_or_recompiles(compile_with, attention, checkpointing):
    model = tiny_dit(attention=attention, micro_conditions=ALL_MICRO, gradient_checkpointing=checkpointing)
    eager = copy.deepcopy(model)
    counter = compile_with(dynamic=False)
    assert compile_blocks(model) == len(model.blocks) == 2
    args, kwargs = dit_inputs(model)

    def step(m: VideoDiT) -> tuple[torch.Tensor, list[torch.Tensor]]:
        m.zero_grad(set_to_none=True)
        out = m(*args, **kwargs)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), [p.grad for p in m.parameters()]

    out, grads = step(model)
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    assert counter.frame_count == 1, "identical blocks should share one compiled graph"
    with torch._dynamo.config.patch(error_on_recompile=True):
        step(model)  # same shapes: no recompile
    ref_out, ref_grads = step(eager)
    assert ref_out.abs().max() > 0.1  # the randomized weights make every branch count
    # fp32 tolerance relative to each tensor's scale: sums may be reordered (a gradient element that is
    # small after cancellation can then differ by more than 1e-5 of itself)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5 * ref_out.abs().max().item())
    for (name, _), grad, ref in zip(model.named_parameters(), grads, ref_grads):
        assert (grad is None) == (ref is None), name
        if ref is not None:
            scale = ref.abs().max().item()
            torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-5 * scale,
                                       msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dynamic", [False, None], ids=["static", "automatic-dynamic"])
def test_new_sequence_length_recompiles_at_most_once(compile_with, dynamic):
    """Static shapes: one graph per token count, each compiled once. Automatic dynamic (torch.compile's
    default, what ``compile_blocks`` uses): the second length gives one dynamic graph for all later ones."""
    model = tiny_dit()
    counter = compile_with(dynamic=dynamic)
    compile_blocks(model)

    @torch.no_grad()  # forward graphs only: the guards are the same, compiling is faster
    def run(frames: int) -> int:
        args, kwargs = dit_inputs(model, frames=frames)
        model(*args, **kwargs)
        return counter.frame_count

    assert run(4) == 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert run(4) == 1
    assert run(2) == 2
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert run(4) == 2  # both graphs stay cached
        if dynamic is None:
            assert run(3) == 2  # covered by the dynamic graph


@torch.no_grad()  # dynamo traces the forward only: the backward adds no graph breaks, only compile time
def test_whole_model_compiles_fullgraph_without_recompiling():
    """The whole DiT is one graph; the RoPE table cache must not add a guard that fails on the next call."""
    model = tiny_dit(micro_conditions=ALL_MICRO)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
    args, kwargs = dit_inputs(model)
    out = compiled(*args, **kwargs)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(*args, **kwargs)
    assert counter.frame_count == 1
    torch.testing.assert_close(out, model(*args, **kwargs), rtol=1e-5, atol=1e-6)


# host-device syncs

_aten = torch.ops.aten
# operators whose result (or output shape) needs tensor values on the host
_SYNC_OPS = {
    _aten._local_scalar_dense,  # .item(), bool(), int(), float(), `if tensor:`
    _aten.is_nonzero,
    _aten.nonzero,
    _aten.nonzero_numpy,
    _aten.argwhere,
    _aten.masked_select,
    _aten._unique2,
    _aten.unique_dim,
    _aten.unique_consecutive,
    _aten.equal,
}
_INDEX_OPS = {_aten.index, _aten.index_put, _aten.index_put_, _aten._index_put_impl_}
_HOST_READS = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu,
    torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__,
}


def _site() -> str:
    frames = [f for f in traceback.extract_stack() if f.filename.startswith(VDM_DIR)]
    return " > ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-3:]) or "(outside vdm)"


def _is_sync(func, args, kwargs) -> bool:
    packet = func.overloadpacket
    if packet in _SYNC_OPS:
        return True
    if packet in _INDEX_OPS:  # a boolean mask index is a nonzero inside the kernel
        return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    # repeats as a tensor without output_size: the output length is read from the device
    return packet is _aten.repeat_interleave and func is not _aten.repeat_interleave.self_int and (
        kwargs.get("output_size") is None
    )


class _DispatchSyncs(TorchDispatchMode):
    def __init__(self, found: list[str]) -> None:
        super().__init__()
        self.found = found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_sync(func, args, kwargs):
            self.found.append(f"{func} at {_site()}")
        return func(*args, **kwargs)


class _HostReads(TorchFunctionMode):
    """Python-level reads that never reach the dispatcher on a CPU tensor (``.tolist()``, ``.numpy()``)."""

    def __init__(self, found: list[str]) -> None:
        super().__init__()
        self.found = found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _HOST_READS:
            self.found.append(f"Tensor.{func.__name__} at {_site()}")
        return func(*args, **(kwargs or {}))


class HostSyncGuard:
    """Records every host read of tensor values inside the block (forward and backward); ``found`` lists
    them as ``"<op> at <file:line function> > ..."`` (the innermost ``vdm`` frames)."""

    def __init__(self) -> None:
        self.found: list[str] = []
        self._modes = [_HostReads(self.found), _DispatchSyncs(self.found)]

    def __enter__(self) -> HostSyncGuard:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


def test_sync_guard_catches_host_reads():
    x = torch.tensor([0.0, 1.0, 2.0])
    reads = {
        "item": lambda: x.sum().item(),
        "bool": lambda: bool(x.any()),
        "if": lambda: 1 if x[0] > 0 else 0,
        "tolist": lambda: x.tolist(),
        "nonzero": lambda: x.nonzero(),
        "mask index": lambda: x[x > 0],
        "mask assign": lambda: x.clone().__setitem__(x > 0, 0.0),
        "unique": lambda: torch.unique(x),
        "repeat_interleave": lambda: x.repeat_interleave(torch.tensor([1, 2, 1])),
    }
    for name, read in reads.items():
        with HostSyncGuard() as guard:
            read()
        assert guard.found, f"{name} not caught"
    with HostSyncGuard() as guard:
        torch.where(x > 0, x, torch.zeros_like(x)).sum()
        x.repeat_interleave(torch.tensor([1, 2, 1]), output_size=4)
    assert guard.found == []


@pytest.mark.parametrize(("attention", "checkpointing"), MODEL_CASES, ids=MODEL_IDS)
def test_dit_forward_backward_has_no_host_syncs(attention, checkpointing):
    model = tiny_dit(attention=attention, micro_conditions=ALL_MICRO, gradient_checkpointing=checkpointing)
    args, kwargs = dit_inputs(model)
    with HostSyncGuard() as guard:
        model(*args, **kwargs).square().mean().backward()
    assert guard.found == [], "host syncs in the DiT step:\n" + "\n".join(guard.found)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("objective", ["flow", "ddpm", "flow-i2v"])
def test_diffusion_loss_has_no_host_syncs(objective, vae_export_dir, text_encoder_dir):
    """The training step's model part, ``DiffusionModule.diffusion_loss`` forward and backward."""
    from vdm.diffusion.objectives import DDPM, RectifiedFlow
    from vdm.lightning.diffusion_module import DiffusionModule
    from vdm.models.text_encoder import TextEncoder

    i2v = objective.endswith("i2v")
    dit = tiny_dit(in_channels=16, context_dim=64, cond_channels=17 if i2v else 0)
    module = DiffusionModule(
        dit,
        str(vae_export_dir),
        TextEncoder(str(text_encoder_dir), "t5", max_length=16),
        lambda params: torch.optim.AdamW(params, lr=1e-3),
        DDPM(num_train_steps=100) if objective == "ddpm" else RectifiedFlow(),
        i2v_probability=0.5 if i2v else 0.0,
    )
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, 16, 2, 4, 4, generator=gen)
    context = torch.randn(3, 16, 64, generator=gen)
    mask = torch.arange(16) < torch.tensor([[5], [0], [16]])
    noise = torch.randn(z.shape, generator=gen)
    t = module.objective.sample_time(3, module.num_tokens(z.shape[2:]), generator=gen)
    use_image = torch.tensor([True, False, True])
    with HostSyncGuard() as guard:
        latents = module.normalized_latents({"latent": z})
        loss = module.diffusion_loss(latents, context, mask, noise, t, use_image)
        loss.backward()
    assert guard.found == [], "host syncs in diffusion_loss:\n" + "\n".join(guard.found)
    assert torch.isfinite(loss)
