"""Validate a composed config before any heavy work.

Every node with a ``_target_`` is checked against the signature of the callable it names: unknown keys
(typos such as ``trainer.max_stepz``) and values whose type cannot match the annotation fail here, with the
full key in the message, instead of minutes later inside a constructor or a worker process. Range and
cross-field rules that signatures cannot express live in ``vdm.config.rules``.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vdm.config.rules import ConfigError, check_project_rules

_HYDRA_KEYS = frozenset({"_target_", "_partial_", "_args_", "_recursive_", "_convert_"})


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
    trainer = resolved.get("trainer") if isinstance(resolved, dict) else None
    if isinstance(trainer, dict) and trainer.get("precision") == "auto":  # what the run will resolve it to
        from vdm.utils.runtime import resolve_precision

        trainer["precision"] = resolve_precision("auto", trainer.get("accelerator"))
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
_INJECTED = {"module": {"vae", "optimizer", "dit", "text_encoder"}}


def _injected(key: str, name: str) -> bool:
    return name in _INJECTED.get(key, set())


def _type_name(tp: Any) -> str:
    """An annotation as allowed values: ``one of 'skip', 'pad'``, ``int or None``, ``list[int]``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if tp is type(None):
        return "None"
    if origin is not None:
        return str(tp).replace("typing.", "")
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
