"""Typed, validated view of the ``demo:`` config section (``configs/default.yaml``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from omegaconf import DictConfig

from foundation.config import ConfigError, to_dict

JPEG_BLOCK = 16  # tiles must hold whole 4:2:0 JPEG blocks (8 px x subsampling 2)

Range = tuple[float, float]


def _range(section: str, key: str, value: Any, positive: bool = True) -> Range:
    """A [min, max] pair with 0 < min <= max (0 <= min if not ``positive``)."""
    numbers = isinstance(value, (list, tuple)) and len(value) == 2
    numbers = numbers and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not numbers:
        raise ConfigError(f"{section}.{key} must be a [min, max] pair of numbers, got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if lo > hi or lo < 0 or (positive and lo == 0):
        raise ConfigError(f"{section}.{key} must satisfy 0 {'<' if positive else '<='} min <= max, got {value!r}")
    return lo, hi


def _positive(section: str, key: str, value: Any, allow_zero: bool = False) -> float:
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0
    if bad or (value == 0 and not allow_zero):
        kind = "non-negative" if allow_zero else "positive"
        raise ConfigError(f"{section}.{key} must be a {kind} number, got {value!r}")
    return float(value)


def _size(section: str, key: str, value: Any) -> tuple[int, int]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ConfigError(f"{section}.{key} must be [width, height] in positive pixels, got {value!r}")
    return int(value[0]), int(value[1])


def _keys(section: str, raw: Any, cls: type) -> None:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{section} must be a mapping, got {raw!r}")
    names = {f.name for f in fields(cls)}
    missing = sorted(names - set(raw))
    unknown = sorted(set(raw) - names)
    if missing or unknown:
        raise ConfigError(f"{section}: missing keys {missing}, unknown keys {unknown}")


@dataclass(frozen=True)
class TissueSpec:
    """Tissue pieces with irregular outlines on the glass."""

    pieces: tuple[int, int]
    margin: float
    radius: Range
    roughness: float
    roughness_um: float
    edge_um: float

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], section: str = "demo.tissue") -> TissueSpec:
        _keys(section, raw, cls)
        pieces = _range(section, "pieces", raw["pieces"])
        if not all(float(p).is_integer() for p in pieces):
            raise ConfigError(f"{section}.pieces must be whole numbers, got {raw['pieces']!r}")
        margin = _positive(section, "margin", raw["margin"], allow_zero=True)
        if margin >= 0.5:
            raise ConfigError(f"{section}.margin must be < 0.5 of the slide side, got {margin!r}")
        radius = _range(section, "radius", raw["radius"])
        roughness = _positive(section, "roughness", raw["roughness"], allow_zero=True)
        if radius[1] * (1 + roughness) + margin > 0.5:
            raise ConfigError(
                f"{section}: radius max * (1 + roughness) + margin must be <= 0.5 so a piece fits on the slide, "
                f"got radius {raw['radius']!r}, roughness {roughness!r}, margin {margin!r}"
            )
        return cls(
            pieces=(int(pieces[0]), int(pieces[1])),
            margin=margin,
            radius=radius,
            roughness=roughness,
            roughness_um=_positive(section, "roughness_um", raw["roughness_um"]),
            edge_um=_positive(section, "edge_um", raw["edge_um"]),
        )


# HESpec fields that are [min, max] pairs, and scalar fields that may be 0 (the others must be > 0).
HE_RANGES = frozenset({
    "nuclei_per_mm2", "nucleus_radius_um", "nucleus_elongation", "nucleus_h_od", "stroma_e_od",
    "lumen_radius_um", "lumen_elongation", "fat_radius_um",
})
HE_MAY_BE_ZERO = frozenset({
    "nucleus_wobble", "nucleus_e_od", "chromatin", "cytoplasm_e_od", "background_h_od", "fibre_warp_um",
    "fibre_jitter", "grain_share", "lumens_per_mm2", "hole_wobble", "fat_per_mm2", "adipocyte_jitter", "od_noise",
})


@dataclass(frozen=True)
class HESpec:
    """The H&E stain model: optical densities (base 10) of hematoxylin and eosin per structure."""

    cellularity_um: float
    nuclei_per_mm2: Range
    nucleus_radius_um: Range
    nucleus_elongation: Range
    nucleus_wobble: float
    nucleus_edge_um: float
    nucleus_h_od: Range
    nucleus_e_od: float
    chromatin: float
    chromatin_um: float
    stroma_e_od: Range
    cytoplasm_e_od: float
    background_h_od: float
    fibre_period_um: float
    fibre_warp_um: float
    fibre_warp_scale_um: float
    fibre_jitter: float
    fibre_jitter_scale: float
    fibre_sharpness: float
    grain_um: float
    grain_share: float
    lumens_per_mm2: float
    lining_um: float
    lumen_radius_um: Range
    lumen_elongation: Range
    hole_wobble: float
    fat_per_mm2: float
    fat_radius_um: Range
    adipocyte_um: float
    adipocyte_jitter: float
    membrane_um: float
    od_noise: float

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], section: str = "demo.he") -> HESpec:
        _keys(section, raw, cls)
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = raw[f.name]
            if f.name in HE_RANGES:
                values[f.name] = _range(section, f.name, value, positive=f.name != "nuclei_per_mm2")
            else:
                values[f.name] = _positive(section, f.name, value, allow_zero=f.name in HE_MAY_BE_ZERO)
        for key in ("nucleus_elongation", "lumen_elongation"):
            if values[key][0] < 1:
                raise ConfigError(f"{section}.{key} must be >= 1 (long/short axis ratio), got {raw[key]!r}")
        if values["grain_share"] > 1:
            raise ConfigError(f"{section}.grain_share must lie in [0, 1], got {raw['grain_share']!r}")
        return cls(**values)


@dataclass(frozen=True)
class DemoSpec:
    """Everything :func:`foundation.demo.write_demo_dataset` needs, validated."""

    seed: int
    he_slides: int
    ihc_slides: int
    he_size: tuple[int, int]
    ihc_size: tuple[int, int]
    ihc_scale: int
    mpp: float
    app_mag: float
    tile: int
    jpeg_quality: int
    levels: int
    glass_rgb: tuple[int, int, int]
    glass_noise: float
    tissue: TissueSpec
    he: HESpec

    @property
    def um_to_px(self) -> float:
        """Pixels per micrometre at level 0."""
        return 1.0 / self.mpp

    @classmethod
    def from_config(cls, cfg_demo: Any, section: str = "demo") -> DemoSpec:
        """Validate ``cfg.demo`` (a DictConfig or a plain mapping); errors name the key and the value."""
        raw = to_dict(cfg_demo) if isinstance(cfg_demo, DictConfig) else cfg_demo
        _keys(section, raw, cls)

        def count(key: str) -> int:
            value = raw[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{section}.{key} must be a non-negative integer, got {value!r}")
            return value

        he_slides, ihc_slides = count("he_slides"), count("ihc_slides")
        if he_slides + ihc_slides == 0:
            raise ConfigError(f"{section}: he_slides + ihc_slides must be > 0")
        tile = count("tile")
        if tile == 0 or tile % JPEG_BLOCK:
            raise ConfigError(f"{section}.tile must be a positive multiple of {JPEG_BLOCK}, got {tile!r}")
        quality = count("jpeg_quality")
        if not 1 <= quality <= 100:
            raise ConfigError(f"{section}.jpeg_quality must lie in 1..100, got {quality!r}")
        levels, scale = count("levels"), count("ihc_scale")
        if levels < 1 or scale < 1:
            raise ConfigError(f"{section}.levels and {section}.ihc_scale must be >= 1, got {levels!r}, {scale!r}")
        glass = raw["glass_rgb"]
        if (
            not isinstance(glass, (list, tuple))
            or len(glass) != 3
            or not all(isinstance(v, int) and 0 < v <= 255 for v in glass)
        ):
            raise ConfigError(f"{section}.glass_rgb must be three grey levels in 1..255, got {glass!r}")
        sizes = {key: _size(section, key, raw[key]) for key in ("he_size", "ihc_size")}
        for key, (w, h) in sizes.items():
            if min(w, h) >> (levels - 1) < 1:
                raise ConfigError(f"{section}.{key} {[w, h]} is too small for {levels} pyramid levels")
        seed = raw["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"{section}.seed must be a non-negative integer, got {seed!r}")
        return cls(
            seed=seed,
            he_slides=he_slides,
            ihc_slides=ihc_slides,
            he_size=sizes["he_size"],
            ihc_size=sizes["ihc_size"],
            ihc_scale=scale,
            mpp=_positive(section, "mpp", raw["mpp"]),
            app_mag=_positive(section, "app_mag", raw["app_mag"]),
            tile=tile,
            jpeg_quality=quality,
            levels=levels,
            glass_rgb=(int(glass[0]), int(glass[1]), int(glass[2])),
            glass_noise=_positive(section, "glass_noise", raw["glass_noise"], allow_zero=True),
            tissue=TissueSpec.from_mapping(raw["tissue"], f"{section}.tissue"),
            he=HESpec.from_mapping(raw["he"], f"{section}.he"),
        )
