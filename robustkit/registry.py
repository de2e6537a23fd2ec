"""Name -> factory tables (in the style of timm's model registry).

Every pluggable component (preprocessor, attack, backdoor trigger, repair defense,
data filter, model, data set, pipeline step) is registered under a short name and can
be built from Python or from a YAML spec::

    @PREPROCESSORS.register("gaussian_noise")
    class GaussianNoise(Preprocessor): ...

    PREPROCESSORS.build("gaussian_noise", sigma=0.1)
    PREPROCESSORS.build({"name": "gaussian_noise", "sigma": 0.1})

Unknown names and unknown or mistyped keyword arguments raise :class:`ConfigError`
that names the bad key and lists what is accepted.
"""

from __future__ import annotations

import difflib
import inspect
import types
import typing
from fractions import Fraction
from typing import Any, Callable, Iterator, Mapping

from .errors import ConfigError, UnknownNameError

Spec = typing.Union[str, Mapping[str, Any]]


def parse_number(value: Any, path: str = "value") -> float:
    """Accept ``0.03``, ``8`` or a fraction written as a string (``"8/255"``)."""
    if isinstance(value, bool):
        raise ConfigError(f"expected a number, got {value!r}", path)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(Fraction(value.replace(" ", "")))
        except (ValueError, ZeroDivisionError):
            pass
    raise ConfigError(f"expected a number (e.g. 0.03 or '8/255'), got {value!r}", path)


def _accepts(annotation: Any) -> tuple[type, ...] | None:
    """Simple runtime types an annotation allows; None when we do not check it."""
    if isinstance(annotation, str):
        return None  # unresolved forward reference: let the factory check it
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        out: list[type] = []
        for arg in typing.get_args(annotation):
            sub = _accepts(arg)
            if sub is None:
                return None
            out.extend(sub)
        return tuple(out)
    if annotation is type(None):
        return (type(None),)
    if annotation in (int, float, str, bool):
        return (annotation,)
    return None


def _coerce(value: Any, annotation: Any, path: str) -> Any:
    """Check (and gently convert) a config value against a simple type annotation."""
    allowed = _accepts(annotation)
    if allowed is None or isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed):
        return value
    if value is None and type(None) in allowed:
        return None
    if float in allowed and not isinstance(value, bool):
        try:
            return parse_number(value, path)
        except ConfigError:
            pass
    if int in allowed and isinstance(value, float) and value.is_integer():
        return int(value)
    names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(f"expected {names}, got {value!r}", path)


class Registry:
    """A table of named factories of one kind (e.g. ``"preprocessor"``)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._table: dict[str, Callable[..., Any]] = {}

    def register(self, name: str | None = None, *, override: bool = False) -> Callable:
        """Decorator registering a class or function under ``name`` (default: its lower-case name)."""

        def deco(factory: Callable[..., Any]) -> Callable[..., Any]:
            key = name or factory.__name__.lower()
            if key in self._table and not override and self._table[key] is not factory:
                raise ValueError(f"{self.kind} {key!r} is already registered by {self._table[key]!r}")
            self._table[key] = factory
            try:
                factory.registry_name = key  # type: ignore[attr-defined]
            except (AttributeError, TypeError):
                pass
            return factory

        return deco

    def names(self) -> list[str]:
        return sorted(self._table)

    def __contains__(self, name: object) -> bool:
        return name in self._table

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._table)

    def get(self, name: str, path: str | None = None) -> Callable[..., Any]:
        """The factory registered under ``name``; the error lists the known names."""
        if not isinstance(name, str):
            raise ConfigError(f"{self.kind} name must be a string, got {name!r}", path)
        try:
            return self._table[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._table, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{hint} Known {self.kind}s: {', '.join(self.names()) or '(none)'}",
                path,
            ) from None

    def parameters(self, name: str) -> dict[str, inspect.Parameter]:
        """The keyword parameters the factory accepts (for docs and validation)."""
        sig = inspect.signature(self.get(name))
        return {k: p for k, p in sig.parameters.items() if k != "self"}

    def check_kwargs(self, name: str, kwargs: Mapping[str, Any], path: str | None = None) -> dict[str, Any]:
        """Validate keyword names and simple types against the factory's signature.

        Returns the keyword arguments with numbers such as ``"8/255"`` converted.
        """
        factory = self.get(name, path)
        try:
            sig = inspect.signature(factory)
            hints = typing.get_type_hints(factory.__init__ if inspect.isclass(factory) else factory)
        except (TypeError, ValueError, NameError):
            return dict(kwargs)
        params = {k: p for k, p in sig.parameters.items() if k != "self"}
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        out: dict[str, Any] = {}
        prefix = f"{path}." if path else ""
        for key, value in kwargs.items():
            if key not in params or params[key].kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                if var_kw:
                    out[key] = value
                    continue
                accepted = [k for k, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
                close = difflib.get_close_matches(str(key), accepted, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigError(
                    f"unknown parameter for {self.kind} {name!r}.{hint} Accepted: {', '.join(accepted) or '(none)'}",
                    f"{prefix}{key}",
                )
            ann = hints.get(key, params[key].annotation)
            out[key] = _coerce(value, ann, f"{prefix}{key}") if ann is not inspect.Parameter.empty else value
        missing = [
            k
            for k, p in params.items()
            if p.default is inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and k not in out
        ]
        if missing:
            raise ConfigError(f"{self.kind} {name!r} needs parameter(s): {', '.join(missing)}", path)
        return out

    def split_spec(self, spec: Spec, path: str | None = None) -> tuple[str, dict[str, Any]]:
        """``"name"`` or ``{"name": ..., **params}`` -> ``(name, params)``."""
        if isinstance(spec, str):
            return spec, {}
        if isinstance(spec, Mapping):
            if "name" not in spec:
                raise ConfigError(f"a {self.kind} spec needs a 'name' key, got keys {sorted(spec)}", path)
            params = {k: v for k, v in spec.items() if k != "name"}
            return spec["name"], params
        raise ConfigError(f"a {self.kind} spec must be a name or a mapping with 'name', got {spec!r}", path)

    def build(self, spec: Spec, path: str | None = None, **extra: Any) -> Any:
        """Build a component from a name or a ``{"name": ..., **params}`` mapping.

        ``extra`` keyword arguments are merged under the spec's own parameters.
        """
        name, params = self.split_spec(spec, path)
        kwargs = self.check_kwargs(name, {**extra, **params}, path)
        try:
            return self._table[name](**kwargs)
        except ConfigError:
            raise
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"cannot build {self.kind} {name!r}: {exc}", path) from exc


PREPROCESSORS = Registry("preprocessor")
ATTACKS = Registry("attack")
BACKDOORS = Registry("backdoor attack")
REPAIRS = Registry("repair defense")
FILTERS = Registry("data filter")
MODELS = Registry("model")
DATASETS = Registry("dataset")
STEPS = Registry("pipeline step")
DETECTORS = Registry("detector")  # input detectors (STRIP) and model scanners (Neural Cleanse)

REGISTRIES: dict[str, Registry] = {
    "preprocessors": PREPROCESSORS,
    "attacks": ATTACKS,
    "backdoors": BACKDOORS,
    "repairs": REPAIRS,
    "filters": FILTERS,
    "models": MODELS,
    "datasets": DATASETS,
    "steps": STEPS,
    "detectors": DETECTORS,
}
