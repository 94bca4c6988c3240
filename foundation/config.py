"""One config tree: ``configs/default.yaml`` + group files + a preset + ``key=value`` overrides.

Composition order (later wins):

1. ``configs/default.yaml``. Its ``defaults:`` mapping names one file per group
   (``model: vit_small`` -> ``configs/model/vit_small.yaml`` is placed under ``cfg.model``).
2. A preset (``--config NAME`` -> ``configs/experiments/NAME.yaml``, or a path). A preset may
   re-select groups in its own ``defaults:`` and override any key.
3. Command-line dotlist overrides: ``model.depth=6``, ``train.lr=1e-3``. ``model=vit_base``
   (a group name where the tree holds a mapping) switches the group file.

Every override is validated against the composed defaults before any work starts: an unknown
key or a value of the wrong type raises :class:`ConfigError` naming the key. A default of
``null`` accepts any value; ints are accepted where floats are expected.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

CONFIG_DIR_ENV = "FOUNDATION_CONFIG_DIR"
GROUPS = ("model", "objective", "data", "deepspeed")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the source."""


def config_dir() -> Path:
    """Directory holding ``default.yaml`` and the groups (``$FOUNDATION_CONFIG_DIR`` overrides)."""
    env = os.environ.get(CONFIG_DIR_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[1] / "configs"


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _group_file(root: Path, group: str, name: str) -> Path:
    path = root / group / f"{name}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in (root / group).glob("*.yaml"))
        raise ConfigError(f"unknown {group} config {name!r}; choose one of {choices}")
    return path


def _preset_file(root: Path, preset: str) -> Path:
    as_path = Path(preset)
    if as_path.suffix in (".yaml", ".yml") and as_path.is_file():
        return as_path
    path = root / "experiments" / f"{preset}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in (root / "experiments").glob("*.yaml"))
        raise ConfigError(f"unknown preset {preset!r} (not a file, not in configs/experiments: {choices})")
    return path


def _type_name(value: Any) -> str:
    if isinstance(value, (Mapping, DictConfig)):
        return "mapping"
    if isinstance(value, (list, tuple, ListConfig)):
        return "list"
    return type(value).__name__


AUTO = "auto"  # a key whose default is "auto" also takes a bool or a count (its validation checks the domain)


# Keys below these prefixes take a number where their default is a mapping: a schedule is {start, peak, end,
# warmup_iters} or a constant (foundation/train/schedules.py).
NUMBER_FOR_MAPPING = ("train.schedules.",)


def _compatible(default: Any, value: Any, dotted: str = "") -> bool:
    if default is None or value is None:
        return True
    if (isinstance(default, (Mapping, DictConfig)) and dotted.startswith(NUMBER_FOR_MAPPING)
            and isinstance(value, (int, float)) and not isinstance(value, bool)):
        return True
    if default == AUTO and isinstance(value, (bool, int)):
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, int):
        return isinstance(value, int)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (list, tuple, ListConfig)):
        return isinstance(value, (list, tuple, ListConfig))
    if isinstance(default, (Mapping, DictConfig)):
        return isinstance(value, (Mapping, DictConfig))
    return True


def validate(base: Any, override: Any, source: str, prefix: str = "") -> None:
    """Raise :class:`ConfigError` for a key of ``override`` absent from ``base`` or of another type."""
    if not isinstance(override, Mapping):
        return
    for key, value in override.items():
        dotted = f"{prefix}{key}"
        if key == "defaults" and not prefix:
            continue
        if not isinstance(base, Mapping) or key not in base:
            near = sorted(base.keys()) if isinstance(base, Mapping) else []
            raise ConfigError(f"{source}: unknown config key {dotted!r} (keys here: {near})")
        default = base[key]
        if not _compatible(default, value, dotted):
            alternative = " or a number" if dotted.startswith(NUMBER_FOR_MAPPING) else ""
            raise ConfigError(
                f"{source}: {dotted!r} must be {_type_name(default)} like the default {default!r}{alternative}, "
                f"got {_type_name(value)} {value!r}"
            )
        if isinstance(default, Mapping) and isinstance(value, Mapping) and default:
            validate(default, value, source, f"{dotted}.")


_EXPONENT_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _parse_dotlist(items: Sequence[str]) -> list[tuple[str, Any]]:
    parsed = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: cannot parse value: {err}") from err
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        parsed.append((key, value))
    return parsed


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def _compose_groups(root: Path, selection: Mapping[str, str]) -> dict[str, Any]:
    base = _read_yaml(root / "default.yaml")
    merged_selection = dict(base.pop("defaults", {}) or {})
    for group, name in selection.items():
        if group not in merged_selection:
            raise ConfigError(f"unknown config group {group!r}; groups: {sorted(merged_selection)}")
        merged_selection[group] = name
    for group, name in merged_selection.items():
        if group in base:
            raise ConfigError(f"default.yaml: {group!r} is a group and must not also be a key")
        base[group] = _read_yaml(_group_file(root, group, str(name)))
    base["defaults"] = merged_selection
    return base


def load_config(preset: str | None = None, overrides: Iterable[str] = ()) -> DictConfig:
    """Compose and validate the config tree; the returned tree is read-only in structure."""
    root = config_dir()
    overrides = list(overrides)
    preset_data = _read_yaml(_preset_file(root, preset)) if preset else {}
    selection: dict[str, str] = dict(preset_data.get("defaults", {}) or {})
    dot: list[tuple[str, Any]] = []
    for key, value in _parse_dotlist(overrides):
        if "." not in key and isinstance(value, str) and key in GROUPS:
            selection[key] = value
        else:
            dot.append((key, value))

    base = _compose_groups(root, selection)
    cfg = OmegaConf.create(base)
    if preset_data:
        validate(base, preset_data, f"preset {preset}")
        cfg = OmegaConf.merge(cfg, {k: v for k, v in preset_data.items() if k != "defaults"})
    for key, value in dot:
        validate(base, _nest(key, value), f"override {key}={value!r}")
        cfg = OmegaConf.merge(cfg, _nest(key, value))
    OmegaConf.resolve(cfg)
    OmegaConf.set_struct(cfg, True)
    cfg.meta.preset = preset
    cfg.meta.overrides = overrides
    return cfg


def save_config(cfg: DictConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config (what the run actually used) as YAML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return path


def to_dict(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """A plain, resolved ``dict`` copy of a config node."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)
