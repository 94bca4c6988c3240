"""Colour deconvolution against scikit-image on real H&E and IHC tiles."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.color import hdx_from_rgb, hed2rgb, rgb2hed, separate_stains

from stain.deconvolution import (
    OD_SCALE,
    basis,
    od_lookup_table,
    od_to_rgb,
    rgb_to_od,
    rgb_to_stains,
    stain_jitter_transform,
    stains_to_rgb,
)


def test_od_lookup_table_is_the_log_of_every_level() -> None:
    levels = np.arange(256)
    expected = -np.log(np.maximum(levels / 255.0, 1e-6))
    np.testing.assert_array_equal(od_lookup_table(), expected)
    np.testing.assert_array_equal(rgb_to_od(levels), expected)
    assert od_lookup_table()[255] == 0.0


def test_od_round_trip_is_exact_for_every_level() -> None:
    levels = np.arange(1, 256, dtype=np.float64)
    np.testing.assert_allclose(od_to_rgb(rgb_to_od(levels)), levels, rtol=0, atol=1e-10)
    # level 0 sits at the floor: 255 * 1e-6
    assert od_to_rgb(rgb_to_od(np.array([0.0])))[0] == pytest.approx(255e-6)


@pytest.mark.parametrize("name, tiles", [("hed", "he_tiles"), ("hdab", "ihc_tiles")])
def test_concentrations_are_skimage_before_its_clip(name: str, tiles: str, request: pytest.FixtureRequest) -> None:
    rgb = request.getfixturevalue(tiles)
    ours = rgb_to_stains(rgb, name)
    reference = rgb2hed(rgb) if name == "hed" else separate_stains(rgb, hdx_from_rgb)
    # scikit-image clips negative concentrations to 0; ours keeps them so the map stays linear
    np.testing.assert_allclose(np.maximum(ours, 0.0), reference, rtol=0, atol=1e-12)
    assert (ours < 0).any(), "real tiles have negative concentrations: the clip matters"


def test_stains_to_rgb_is_skimage_combine(he_tiles: np.ndarray) -> None:
    stains = rgb2hed(he_tiles)  # non-negative, as hed2rgb expects
    np.testing.assert_allclose(stains_to_rgb(stains, "hed"), 255.0 * hed2rgb(stains), rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", ["hed", "hdab"])
def test_stain_round_trip_is_the_identity(name: str, he_tiles: np.ndarray) -> None:
    floored = np.maximum(he_tiles, 255.0 * 1e-6)  # level 0 sits at the floor of the log
    np.testing.assert_allclose(stains_to_rgb(rgb_to_stains(he_tiles, name), name), floored, rtol=0, atol=1e-9)


def test_jitter_transform_composes_scale_and_shift() -> None:
    rng = np.random.default_rng(0)
    alpha = rng.uniform(0.8, 1.2, (5, 3))
    beta = rng.uniform(-0.2, 0.2, (5, 3))
    for name in ("hed", "hdab"):
        m, t = stain_jitter_transform(name, alpha, beta)
        b = basis(name)
        od = rng.uniform(0.0, 3.0, (5, 100, 3))
        stains = (od / OD_SCALE) @ b.stain_from_rgb
        expected = (OD_SCALE * (stains * alpha[:, None] + beta[:, None])) @ b.rgb_from_stain
        np.testing.assert_allclose(np.einsum("npc,ncd->npd", od, m) + t[:, None], expected, rtol=0, atol=1e-12)
    m, t = stain_jitter_transform("hed", np.ones((2, 3)), np.zeros((2, 3)))
    np.testing.assert_allclose(m, np.tile(np.eye(3), (2, 1, 1)), rtol=0, atol=1e-14)
    np.testing.assert_array_equal(t, 0.0)


def test_bad_basis_and_shapes_are_named() -> None:
    with pytest.raises(KeyError, match="'hex'"):
        basis("hex")
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        stain_jitter_transform("hed", np.ones(3), np.zeros(3))
