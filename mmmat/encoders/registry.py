"""A registry of encoders keyed by name, and one factory.

Every encoder is an ``nn.Module`` with an ``out_dim`` attribute and ``forward(batch) -> (B, out_dim)``
taking a :class:`~mmmat.data.batch.MultimodalBatch` (it reads its own modality). Rows of materials that
lack the modality are computed on zeros and masked out by the caller with ``batch.present[modality]``.

Each registered encoder also has a typed config class, made by :func:`encoder_config` from the encoder's
constructor signature and named in YAML by ``class_path``::

    encoders:
      xrd:
        class_path: mmmat.encoders.spectrum.XRDCNNEncoderConfig
        init_args: {out_dim: 32, num_bins: 256}

so an unknown key is an error and a dotted override (``--model.init_args.encoders.xrd.init_args.out_dim 64``)
changes that one field. A new encoder is one class with ``@register_encoder("kind/name")`` and one line
``MyEncoderConfig = encoder_config("kind/name")`` in the same module. Models store the plain form
``{"name": ..., **kwargs}`` (:func:`encoder_spec`), which every factory here also accepts.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from torch import nn

_ENCODERS: dict[str, Callable[..., nn.Module]] = {}
_CONFIGS: dict[str, type[EncoderConfig]] = {}


def register_encoder(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register an encoder class or factory under ``name`` (e.g. ``"crystal/painn"``)."""

    def deco(cls: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _ENCODERS:
            raise KeyError(f"encoder {name!r} is registered twice")
        _ENCODERS[name] = cls
        return cls

    return deco


def list_encoders() -> list[str]:
    """Names of every registered encoder."""
    _import_builtin()
    return sorted(_ENCODERS)


def create_encoder(name: str, **cfg: Any) -> nn.Module:
    """Build the encoder registered under ``name`` with keyword config ``cfg``."""
    _import_builtin()
    if name not in _ENCODERS:
        raise KeyError(f"unknown encoder {name!r}; registered: {sorted(_ENCODERS)}")
    return _ENCODERS[name](**cfg)


class EncoderConfig:
    """Typed config of one registered encoder: the constructor's keyword arguments, checked by name and type.

    Subclasses come from :func:`encoder_config`; their ``__init__`` has the encoder constructor's signature, so
    jsonargparse (LightningCLI) rejects unknown keys and wrong types and fills in the defaults.
    """

    #: The registered encoder name this config builds.
    name: ClassVar[str] = ""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = dict(kwargs)

    def spec(self) -> dict[str, Any]:
        """The plain form ``{"name": ..., **kwargs}``, leaving out arguments equal to their defaults."""
        defaults = {k: p.default for k, p in inspect.signature(type(self).__init__).parameters.items()}
        kept = {k: v for k, v in self.kwargs.items() if k not in defaults or not _same(v, defaults[k])}
        return {"name": self.name, **kept}

    def build(self) -> nn.Module:
        """Construct the encoder."""
        return create_encoder(**self.spec())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.kwargs.items())})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EncoderConfig) and self.spec() == other.spec()

    __hash__ = None  # type: ignore[assignment]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return bool(a == b) if type(a) is type(b) or {type(a), type(b)} <= {int, float} else False


def encoder_config(name: str, qualname: str | None = None, unset: Sequence[str] = ()) -> type[EncoderConfig]:
    """The typed config class of the encoder registered under ``name``.

    Call it in the encoder's module and bind the result to ``qualname`` (default: the encoder class's name +
    ``Config``) so that ``class_path: <module>.<qualname>`` finds it, e.g.
    ``XRDCNNEncoderConfig = encoder_config("xrd/cnn")``. Arguments named in ``unset`` default to None in the
    config and are then left to whoever builds the encoder (a text encoder's ``modality`` is its slot's name).
    """
    if name not in _ENCODERS:
        raise KeyError(f"encoder {name!r} is not registered; register it before making its config")
    target = _ENCODERS[name]
    cls_name = qualname or f"{getattr(target, '__name__', 'Encoder')}Config"
    module = getattr(target, "__module__", __name__)
    taken = [n for n, c in _CONFIGS.items() if n != name and (c.__module__, c.__qualname__) == (module, cls_name)]
    if taken:
        raise KeyError(f"{module}.{cls_name} is already the config of {taken[0]!r}: give encoder_config({name!r}, "
                       f"qualname=...) another name")
    init = target.__init__ if isinstance(target, type) else target
    sig = inspect.signature(init)
    hints = typing.get_type_hints(init)
    params = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    missing = sorted(set(unset) - {p.name for p in params})
    if missing:
        raise KeyError(f"encoder {name!r} has no arguments {missing}")
    params = [p.replace(default=None, annotation=Any if p.annotation is p.empty else p.annotation | None)
              if p.name in unset else p for p in params]
    if not isinstance(target, type):
        params.insert(0, inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD))

    def __init__(self: EncoderConfig, **kwargs: Any) -> None:
        EncoderConfig.__init__(self, **kwargs)

    __init__.__signature__ = sig.replace(parameters=params, return_annotation=None)  # type: ignore[attr-defined]
    __init__.__doc__ = getattr(init, "__doc__", None)
    cls = type(cls_name, (EncoderConfig,), {
        "__init__": __init__, "name": name, "__module__": module, "__qualname__": cls_name,
        "__doc__": f"Typed config of ``{name}``.\n\n{inspect.getdoc(target) or ''}",
    })
    _CONFIGS[name] = cls
    return cls


def encoder_spec(cfg: EncoderConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The plain form ``{"name": ..., **kwargs}`` of an encoder config.

    ``cfg`` is an :class:`EncoderConfig`, a plain ``{"name": ..., **kwargs}`` dict (the form saved in model
    folders), or a ``{"class_path": ..., "init_args": {...}}`` dict as written in YAML; the last is checked
    against the config class's signature (an unknown key is an error naming it).
    """
    if isinstance(cfg, EncoderConfig):
        return cfg.spec()
    if not isinstance(cfg, Mapping):
        raise TypeError(f"an encoder config is an EncoderConfig or a dict, got {type(cfg).__name__}: {cfg!r}")
    if "class_path" in cfg:
        extra = sorted(set(cfg) - {"class_path", "init_args"})
        if extra:
            raise ValueError(f"encoder config {cfg['class_path']!r}: unknown keys {extra} beside class_path")
        cls = _config_class(str(cfg["class_path"]))
        args = dict(cfg.get("init_args") or {})
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(set(args) - accepted)
        if unknown:
            raise ValueError(f"encoder config {cfg['class_path']}: unknown keys {unknown}; accepted: "
                             f"{sorted(accepted)}")
        return cls(**args).spec()
    if "name" not in cfg:
        raise ValueError(f"an encoder config needs 'class_path' (typed) or 'name' (a registered encoder), got {cfg!r}")
    return dict(cfg)


def _config_class(class_path: str) -> type[EncoderConfig]:
    """Import the :class:`EncoderConfig` subclass named by a dotted ``class_path``."""
    _import_builtin()
    for cls in _CONFIGS.values():
        if class_path in (cls.__qualname__, f"{cls.__module__}.{cls.__qualname__}"):
            return cls
    module, _, attr = class_path.rpartition(".")
    try:
        import importlib

        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"encoder class_path {class_path!r} names no config class ({exc}); known: "
                         f"{sorted(f'{c.__module__}.{c.__qualname__}' for c in _CONFIGS.values())}") from None
    if not (isinstance(cls, type) and issubclass(cls, EncoderConfig)):
        raise ValueError(f"encoder class_path {class_path!r} is not an EncoderConfig")
    return cls


def list_encoder_configs() -> dict[str, type[EncoderConfig]]:
    """Registered encoder name -> its typed config class."""
    _import_builtin()
    return dict(sorted(_CONFIGS.items()))


def _import_builtin() -> None:
    import importlib

    for mod in ("crystal", "spectrum", "image", "text"):
        try:
            importlib.import_module(f"mmmat.encoders.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"mmmat.encoders.{mod}":
                raise
