"""Check a composed config against the signatures of the classes it names, before anything is built.

Hydra refuses unknown keys and unknown group options itself (``loss.alpah=0.5``, ``loss=cosin``), but a value
of the wrong type (``model.latent_dim=abc``) or an added key (``+loss.alpah=0.5``) only fails deep inside
instantiation, with a message about ``int()`` rather than about the config. Each node with a ``_target_`` is
checked here against that target's type hints: ``int``, ``float``, ``bool``, ``str``, ``None``, ``Literal``
choices (listed in the message), unions of those and lists of them; anything else is left to the target.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from exprae.errors import ConfigError

_HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")
_UNKNOWN = object()  # a hint this module does not judge


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` naming the first config value whose type its target does not accept."""
    seed = cfg.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"seed={seed!r} is not valid: expects int or null")
    if seed is not None and seed < 0:
        raise ConfigError(f"seed={seed} is not valid: expects a non-negative integer (numpy seeds are >= 0) or null")
    for path, node in _target_nodes(cfg, ""):
        _check_node(path, node)


def _target_nodes(node: Any, path: str) -> Iterator[tuple[str, DictConfig]]:
    if not isinstance(node, DictConfig):
        return
    if "_target_" in node:
        yield path, node
    for key in node:
        if path == "" and key == "hydra":
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            yield from _target_nodes(child, f"{path}.{key}" if path else str(key))


def _signature(target: Any) -> tuple[dict[str, inspect.Parameter], dict[str, Any]] | None:
    """Parameters and resolved type hints of a callable (``__init__`` for a class); None if unreadable."""
    try:
        params = dict(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return None
    func = target.__init__ if inspect.isclass(target) else target
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # hints naming objects only imported under TYPE_CHECKING cannot be resolved
        hints = {}
    return params, hints


def _check_node(path: str, node: DictConfig) -> None:
    target_name = node._get_node("_target_")._value()
    try:
        target = get_object(target_name)
    except Exception as e:
        raise ConfigError(f"{path}._target_={target_name!r} cannot be imported: {e}") from e
    sig = _signature(target)
    if sig is None:
        return
    params, hints = sig
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key in node:
        if key in _HYDRA_KEYS:
            continue
        where = f"{path}.{key}" if path else str(key)
        if key not in params:
            if takes_kwargs:
                continue
            valid = [k for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            raise ConfigError(f"{where} is not a parameter of {target_name}; valid keys: {', '.join(valid)}")
        child = node._get_node(key)
        if isinstance(child, DictConfig) and "_target_" in child:
            continue  # checked as its own node
        try:
            value = OmegaConf.to_object(child) if isinstance(child, (DictConfig, ListConfig)) else node[key]
        except Exception:  # an interpolation that only resolves at run time (e.g. ${hydra:...} in tests)
            continue
        if value is None and params[key].default is inspect.Parameter.empty:
            continue  # a required argument left null in the config is filled in by the code (n_genes)
        hint = hints.get(key, _UNKNOWN)
        if hint is _UNKNOWN or _accepts(hint, value) is not False:
            continue
        raise ConfigError(f"{where}={value!r} is not valid: {target_name} expects {_describe(hint)}")


def _accepts(hint: Any, value: Any) -> bool | None:
    """True/False when ``value`` fits ``hint``; None when the hint is outside what this module judges."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        verdicts = [_accepts(h, value) for h in typing.get_args(hint)]
        if any(v is True for v in verdicts):
            return True
        return None if any(v is None for v in verdicts) else False
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        if len(args) != 1:
            return None
        verdicts = [_accepts(args[0], v) for v in value]
        return False if False in verdicts else (None if None in verdicts else True)
    return None


def _describe(hint: Any) -> str:
    """A reader's name for a type hint: ``one of ['relu', 'gelu']``, ``int or None``, ``a list of int``."""
    origin = typing.get_origin(hint)
    if hint is type(None) or hint is None:
        return "None"
    if origin is Literal:
        return f"one of {list(typing.get_args(hint))}"
    if origin in (typing.Union, types.UnionType):
        # Merge Literal members (Lightning's precision is a union of three Literals) into one list of choices.
        choices = [c for h in typing.get_args(hint) if typing.get_origin(h) is Literal for c in typing.get_args(h)]
        rest = [_describe(h) for h in typing.get_args(hint) if typing.get_origin(h) is not Literal]
        return " or ".join(([f"one of {choices}"] if choices else []) + rest)
    if origin in (list, tuple, Sequence):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return f"a list of {_describe(args[0])}" if len(args) == 1 else "a list"
    return getattr(hint, "__name__", str(hint))


def check_compile(cfg: DictConfig) -> None:
    """``module.compile=graph`` captures one device's step in fp32/bf16: refuse DDP and 16-bit precision up front.

    The module checks again when a trainer is attached; here the same settings are refused before the run
    directory is written, from the config alone.
    """
    if OmegaConf.select(cfg, "module.compile") != "graph":
        return
    trainer = cfg.get("trainer") or {}
    strategy = str(trainer.get("strategy") or "auto")
    devices, nodes = trainer.get("devices", 1), int(trainer.get("num_nodes") or 1)
    n_devices = len(devices) if isinstance(devices, (list, ListConfig)) else devices
    several = any(s in strategy for s in ("ddp", "fsdp", "deepspeed")) or nodes > 1
    several = several or (isinstance(n_devices, int) and (n_devices > 1 or n_devices == -1))
    if several:
        raise ConfigError(
            f"module.compile=graph captures a single-device step, but the trainer asks for several devices "
            f"(trainer.strategy={strategy}, trainer.devices={devices}, trainer.num_nodes={nodes}); "
            "with several devices use module.compile=none or model"
        )
    precision = str(trainer.get("precision", "32-true"))
    if precision.startswith("16"):
        raise ConfigError(
            f"module.compile=graph does not support trainer.precision={precision} (its grad scaler checks for infs "
            "on the host every step); use bf16-mixed or 32-true"
        )


def check_sizes(net: Any, *, n_train: int) -> None:
    """The latent size must fit the data: the PCA baseline (and PCA start) needs latent_dim <= genes, cells-1."""
    limit = min(int(net.n_genes), n_train - 1)
    if int(net.latent_dim) > limit:
        raise ConfigError(
            f"model.latent_dim={net.latent_dim} is larger than this data allows: the PCA baseline needs at most "
            f"min(genes={net.n_genes}, training cells-1={n_train - 1}) = {limit} components"
        )


def check_monitors(monitors: dict[str, str | None], known: set[str]) -> None:
    """Refuse a ``val/...`` monitor that will never be logged, before anything is written (a typo, usually).

    ``known`` is the module's own list of what it logs (:meth:`exprae.training.AutoencoderModule.metric_names`).
    """
    for setting, monitor in monitors.items():
        if monitor and monitor.startswith("val/") and monitor not in known:
            raise ConfigError(
                f"{setting}={monitor!r} is not a metric exprae logs for this run; choose one of {sorted(known)}"
            )
