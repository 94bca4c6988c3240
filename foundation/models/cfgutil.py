"""Reading model/objective config nodes with errors that name the full key."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from foundation.config import ConfigError

_MISSING = object()


def get(cfg: Mapping[str, Any], dotted: str, section: str) -> Any:
    """``cfg[a][b]...`` for ``dotted = "a.b"``; a missing key raises ``ConfigError`` naming ``section.a.b``."""
    full = f"{section}.{dotted}" if section else dotted
    node: Any = cfg
    for part in dotted.split("."):
        value = node.get(part, _MISSING) if isinstance(node, Mapping) or hasattr(node, "get") else _MISSING
        if value is _MISSING:
            raise ConfigError(f"config key {full} is missing")
        node = value
    return node


def choice(value: Any, allowed: Iterable[str], key: str) -> str:
    """``value`` if it is one of ``allowed``, else ``ConfigError`` naming ``key`` and the choices."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"{key} = {value!r} is not one of {list(allowed)}")
    return str(value)


def positive(value: Any, key: str, allow_zero: bool = False) -> float:
    """``value`` as a float if it is > 0 (or >= 0), else ``ConfigError`` naming ``key``."""
    number = float(value)
    if number < 0 or (number == 0 and not allow_zero):
        raise ConfigError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return number
