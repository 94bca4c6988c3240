"""The config tree: composition, presets, overrides and validation."""

from __future__ import annotations

import pytest

from foundation.config import ConfigError, load_config, save_config


def test_defaults_compose_groups():
    cfg = load_config()
    assert cfg.defaults.model == "vit_small"
    assert "arch" in cfg.model
    assert cfg.index.tile_size == 224


def test_dotlist_overrides_and_types():
    cfg = load_config(overrides=["index.tile_size=256", "index.mpp=[0.25,0.5]", "tissue.min_saturation=1"])
    assert cfg.index.tile_size == 256
    assert list(cfg.index.mpp) == [0.25, 0.5]
    assert cfg.tissue.min_saturation == 1  # int accepted where a float is expected


def test_exponent_floats_and_constant_schedules():
    cfg = load_config(overrides=["train.schedules.weight_decay=0.05", "train.schedules.lr=1e-3", "train.grad_clip=2E0"])
    assert cfg.train.schedules.weight_decay == 0.05  # a number is a constant schedule (default.yaml)
    assert cfg.train.schedules.lr == pytest.approx(1e-3) and cfg.train.grad_clip == 2.0  # not the strings
    from foundation.train.schedules import Schedules

    assert Schedules(cfg.train, 10, global_batch=64).values(7)["weight_decay"] == 0.05
    with pytest.raises(ConfigError, match="'train.schedules.lr' must be mapping like the default .* or a number"):
        load_config(overrides=["train.schedules.lr=fast"])
    with pytest.raises(ConfigError, match="'index.tile_size' must be int"):
        load_config(overrides=["index.tile_size={a: 1}"])


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="index.tile_sise"):
        load_config(overrides=["index.tile_sise=256"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="index.tile_size"):
        load_config(overrides=["index.tile_size=big"])
    with pytest.raises(ConfigError, match="index.mpp"):
        load_config(overrides=["index.mpp=fast"])


def test_unknown_group_choice():
    with pytest.raises(ConfigError, match="unknown model config 'vit_tiny_nonexistent'"):
        load_config(overrides=["model=vit_tiny_nonexistent"])


def test_preset_file_is_validated(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("index:\n  min_tisue: 0.5\n")
    with pytest.raises(ConfigError, match="index.min_tisue"):
        load_config(str(bad))
    good = tmp_path / "good.yaml"
    good.write_text("index:\n  min_tissue: 0.3\n")
    assert load_config(str(good)).index.min_tissue == 0.3


def test_structure_is_frozen_after_load():
    cfg = load_config()
    with pytest.raises(Exception, match="nonexistent_key"):
        cfg.index.nonexistent_key = 1


def test_resolved_config_round_trip(tmp_path):
    cfg = load_config(overrides=["meta.seed=7"])
    path = save_config(cfg, tmp_path / "config.yaml")
    text = path.read_text()
    assert "seed: 7" in text and "tile_size: 224" in text
