"""Validate a composed config before any heavy work.

Every node with a ``_target_`` is checked against the signature of the callable it names: unknown keys
(typos such as ``trainer.max_stepz``) and values whose type cannot match the annotation fail here, with the
full key in the message, instead of minutes later inside a constructor or a worker process. Range and
cross-field rules that signatures cannot express live in ``check_project_rules``.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

_HYDRA_KEYS = frozenset({"_target_", "_partial_", "_args_", "_recursive_", "_convert_"})


class ConfigError(ValueError):
    """A config value is missing, unknown or of the wrong type or range; the message names the key."""


def validate_config(cfg: DictConfig, skip: Sequence[str] = ("hydra",)) -> None:
    """Raise ``ConfigError`` naming the first bad key of ``cfg``; returns None when the config is sound."""
    missing = sorted(k for k in _missing_keys(cfg, "") if k.split(".")[0] not in skip)
    if missing:
        raise ConfigError(f"missing mandatory value(s): {', '.join(missing)} (set them on the command line)")
    try:
        resolved = OmegaConf.to_container(
            OmegaConf.masked_copy(cfg, [k for k in cfg if k not in skip]), resolve=True
        )
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"{key}: cannot resolve value: {err.msg if hasattr(err, 'msg') else err}") from err
    for key, node in _target_nodes(resolved, ""):
        _check_target_node(key, node)
    check_project_rules(resolved)


def _missing_keys(node: DictConfig | ListConfig, prefix: str) -> Iterator[str]:
    """Keys set to ``???``, found without resolving interpolations (which would raise first)."""
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for k in keys:
        full = f"{prefix}.{k}" if prefix and isinstance(k, str) else f"{prefix}[{k}]" if prefix else str(k)
        if OmegaConf.is_missing(node, k):
            yield full
            continue
        if OmegaConf.is_interpolation(node, k):
            continue
        child = node._get_node(k)
        if isinstance(child, (DictConfig, ListConfig)) and not child._is_none():
            yield from _missing_keys(child, full)


def _target_nodes(node: Any, prefix: str) -> Iterator[tuple[str, dict]]:
    if isinstance(node, Mapping):
        if "_target_" in node:
            yield prefix, node  # type: ignore[misc]
        for k, v in node.items():
            if k not in _HYDRA_KEYS:
                yield from _target_nodes(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _target_nodes(v, f"{prefix}[{i}]")


def _import_target(key: str, path: str) -> Callable:
    module_name, _, attr = path.rpartition(".")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as err:
        # a nested attribute path such as pkg.mod.Class.method
        try:
            outer = _import_target(key, module_name)
            return getattr(outer, attr)
        except (ConfigError, AttributeError):
            raise ConfigError(f"{key}._target_: cannot import '{path}': {err}") from err
    return obj


def _check_target_node(key: str, node: Mapping) -> None:
    target = _import_target(key, str(node["_target_"]))
    fn = target.__init__ if inspect.isclass(target) else target
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return  # builtins without a signature: nothing to check
    params = sig.parameters
    accepts_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references in third-party code: skip type checks only
        hints = {}
    for name, value in node.items():
        if name in _HYDRA_KEYS:
            continue
        if name not in params:
            if accepts_kwargs:
                continue
            close = difflib.get_close_matches(name, list(params), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{key}.{name}: not an argument of {node['_target_']}{hint}")
        if isinstance(value, Mapping) and "_target_" in value:
            continue  # instantiated into an object; its own node is checked separately
        if name in hints and not _matches(value, hints[name]):
            raise ConfigError(
                f"{key}.{name}: expected {_type_name(hints[name])}, got {value!r} ({type(value).__name__})"
            )
    if not node.get("_partial_", False):
        for name, p in params.items():
            if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                if name not in node and name != "self" and not _injected(key, name):
                    raise ConfigError(f"{key}.{name}: required by {node['_target_']} but not set")


# arguments that train.py passes at instantiation time rather than from YAML
_INJECTED = {"module": {"model", "optimizer", "dit", "text_encoder"}}


def _injected(key: str, name: str) -> bool:
    return name in _INJECTED.get(key, set())


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _matches(value: Any, tp: Any) -> bool:
    """Whether a plain config value can be passed for annotation ``tp``; unknown annotations accept."""
    if tp is Any or tp is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (list, tuple, Sequence, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args))
        inner = args[0] if args else Any
        return all(_matches(v, inner) for v in value)
    if origin in (dict, Mapping) or tp is dict:
        return isinstance(value, Mapping)
    return True


def _get(cfg: Mapping, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _require(cfg: Mapping, key: str, ok: Callable[[Any], bool], what: str) -> None:
    value = _get(cfg, key)
    if value is not None and not ok(value):
        raise ConfigError(f"{key}: expected {what}, got {value!r}")


def check_project_rules(cfg: Mapping) -> None:
    """Ranges and cross-field rules of vdm's own keys (resolved plain-dict config)."""
    positive = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0  # noqa: E731
    _require(cfg, "seed", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
    for key in ("data.batch_size", "data.val_batch_size", "data.num_frames", "data.height", "data.width"):
        _require(cfg, key, positive, "an integer > 0")
    _require(cfg, "data.num_workers", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
    _require(cfg, "data.max_skip_rate", lambda v: 0.0 <= v <= 1.0, "a rate in [0, 1]")
    _require(cfg, "optimizer.lr", lambda v: isinstance(v, (int, float)) and v > 0, "a learning rate > 0")
    _require(cfg, "trainer.max_steps", lambda v: v == -1 or (isinstance(v, int) and v > 0), "-1 or > 0")
    if _get(cfg, "module._target_") == "vdm.lightning.vae_module.VAEModule":
        _check_vae_shapes(cfg)
    if _get(cfg, "module._target_") == "vdm.lightning.diffusion_module.DiffusionModule":
        _check_diffusion(cfg)
    _check_metric_weights(cfg)
    _check_strategy(cfg)


def _check_strategy(cfg: Mapping) -> None:
    """Combinations a strategy cannot serve fail here, not at the first step."""
    strategy = _get(cfg, "trainer.strategy")
    target = str(strategy.get("_target_", "")) if isinstance(strategy, Mapping) else str(strategy or "")
    stage1 = _get(cfg, "module._target_") == "vdm.lightning.vae_module.VAEModule"
    if "deepspeed" in target.lower() and stage1 and _get(cfg, "trainer.strategy.stage") == 3:
        raise ConfigError(
            "trainer.strategy.stage: 3 is not supported for stage 1 (the VAE export at the end of fit runs "
            "the model on one rank, which ZeRO-3's sharded parameters do not allow); the VAE fits in one "
            "GPU: use strategy=deepspeed_stage_2, ddp or fsdp"
        )
    if "deepspeed" in target.lower() and _get(cfg, "module.discriminator") is not None:
        raise ConfigError(
            "module.discriminator: DeepSpeed drives a single optimizer, but stage 1 with its GAN has two; "
            "use strategy=ddp or strategy=fsdp, or train without the GAN (module.discriminator=null "
            "module.disc_optimizer=null)"
        )
def _check_metric_weights(cfg: Mapping) -> None:
    """Metric weights exist locally, and FVD's I3D gets enough frames (its logits pool needs >= 9)."""
    for key in ("metrics.clip_path", "metrics.i3d_path"):
        path = _get(cfg, key)
        if path is not None and not Path(str(path)).exists():
            raise ConfigError(f"{key}: {path} does not exist (weights load from local paths only)")
    frames = _get(cfg, "data.num_frames")
    if _get(cfg, "metrics.i3d_path") is not None and isinstance(frames, int) and frames < 9:
        raise ConfigError(f"data.num_frames: {frames}, but FVD (metrics.i3d_path) needs clips of >= 9 frames")


def _check_vae_shapes(cfg: Mapping, vae_key: str = "model") -> None:
    """Clip shape must fit the VAE's compression: T = 1 + tc * k, H and W multiples of sc."""
    mults = _get(cfg, f"{vae_key}.channel_mults")
    tdown = _get(cfg, f"{vae_key}.temporal_downsample")
    if mults is None or tdown is None:
        return
    patch = _get(cfg, f"{vae_key}.patch_size")
    sc = (patch if isinstance(patch, int) else 1) * 2 ** (len(mults) - 1)
    tc = 2 ** sum(bool(x) for x in tdown)
    frames, h, w = (_get(cfg, f"data.{k}") for k in ("num_frames", "height", "width"))
    if isinstance(frames, int) and (frames - 1) % tc:
        ok = [1 + tc * k for k in range(1, 5)]
        raise ConfigError(
            f"data.num_frames: {frames} does not fit the VAE's {tc}x temporal compression "
            f"(needs 1 + {tc}k frames, e.g. {ok})"
        )
    for key, size in (("data.height", h), ("data.width", w)):
        if isinstance(size, int) and size % sc:
            raise ConfigError(f"{key}: {size} is not a multiple of the VAE's {sc}x spatial compression")


def _check_diffusion(cfg: Mapping) -> None:
    """Stage 2: the VAE export exists and fits the DiT (channels), the clip shape and the text encoder."""
    export = _get(cfg, "model.vae_export")
    config_file = Path(str(export)) / "config.json"
    if not config_file.is_file():
        raise ConfigError(
            f"model.vae_export: {export} is not a VAE export (no config.json); "
            "train stage 1 first (python train.py stage=vae writes <output_dir>/vae_export)"
        )
    vae = json.loads(config_file.read_text())
    _check_vae_shapes({**cfg, "vae": vae}, "vae")
    channels = int(vae.get("latent_channels", 0))
    in_channels, cond = _get(cfg, "model.dit.in_channels"), _get(cfg, "model.dit.cond_channels") or 0
    if in_channels is not None and in_channels != channels:
        raise ConfigError(f"model.dit.in_channels: {in_channels}, but the VAE export has {channels} channels")
    if cond not in (0, channels + 1):
        raise ConfigError(f"model.dit.cond_channels: {cond}, expected 0 or {channels + 1} (latent + mask)")
    if (_get(cfg, "module.i2v_probability") or 0) > 0 and cond == 0:
        raise ConfigError(f"module.i2v_probability: > 0 needs model.dit.cond_channels={channels + 1}")
    text_dim = _text_encoder_width(cfg)
    context_dim = _get(cfg, "model.dit.context_dim")
    if text_dim is not None and context_dim is not None and context_dim != text_dim:
        raise ConfigError(f"model.dit.context_dim: {context_dim}, but the text encoder's width is {text_dim}")


def _text_encoder_width(cfg: Mapping) -> int | None:
    """Hidden size of the configured text encoder (its config.json, or the stand-in still to be built)."""
    path = _get(cfg, "model.text_encoder.path")
    config_file = Path(str(path)) / "config.json"
    if path is not None and config_file.is_file():
        config = json.loads(config_file.read_text())
        config = config.get("text_config", config)
        return config.get("d_model", config.get("hidden_size"))
    if _get(cfg, "synthetic_text_encoder") is not None:
        return _get(cfg, "synthetic_text_encoder.hidden_size")
    raise ConfigError(
        f"model.text_encoder.path: {path} holds no text encoder (config.json); put a local T5/CLIP "
        "directory there (nothing is downloaded)"
    )
