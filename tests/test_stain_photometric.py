"""Generic photometric ops (DINOv2 recipe) against torchvision / scikit-image definitions on real tiles."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from skimage.color import hsv2rgb, rgb2hsv

from foundation.config import load_config, to_dict
from stain.photometric import (
    PHOTOMETRIC_DRAWS_PER_CROP,
    PhotometricParams,
    PhotometricPolicy,
    adjust_brightness,
    adjust_contrast,
    apply_color_affine,
    apply_color_matrix,
    apply_photometric,
    gaussian_blur,
    grayscale_matrix,
    hue_matrix,
    sample_photometric_params,
    saturation_matrix,
    solarize,
)


@pytest.fixture(scope="module")
def tiles(data_dir: Path) -> torch.Tensor:
    """Four real tiles (2 H&E, 2 IHC), their top-left 128 px (keeps the test quick), float64 levels."""
    root = data_dir / "tiles" / "stain_he_vs_ihc"
    paths = sorted((root / "HE").glob("*.png"))[:2] + sorted((root / "IHC").glob("*.png"))[:2]
    images = np.stack([np.asarray(Image.open(p).convert("RGB"))[:128, :128] for p in paths])
    return torch.from_numpy(images.astype(np.float64))


@pytest.fixture(scope="module")
def generic_cfg() -> dict[str, Any]:
    return to_dict(load_config().data.augmentation.generic)


def tv(x: torch.Tensor) -> torch.Tensor:
    """Our ``[N,H,W,3]`` levels -> torchvision's ``[N,3,H,W]`` in [0, 1]."""
    return x.permute(0, 3, 1, 2) / 255.0


def ours(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2) / 255.0


def luma(x: np.ndarray) -> np.ndarray:
    """PIL's ``convert("L")`` weights, what DINOv2's PIL-based ColorJitter blends with."""
    return 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]


# torchvision's tensor path uses 0.2989 for red instead of 0.299: at most 1e-4 apart in [0, 1] units
TV_LUMA_TOL = 1e-4


def test_brightness_contrast_saturation_match_their_definitions(tiles: torch.Tensor) -> None:
    factors = np.array([0.6, 0.9, 1.2, 1.4])
    x = tiles.numpy()
    f = factors[:, None, None, None]
    grey = luma(x)[..., None]
    mean = grey.mean(axis=(1, 2), keepdims=True)
    cases = (
        (adjust_brightness(tiles, factors), np.clip(f * x, 0, 255), TF.adjust_brightness),
        (adjust_contrast(tiles, factors), np.clip(f * x + (1 - f) * mean, 0, 255), TF.adjust_contrast),
        (apply_color_matrix(tiles, saturation_matrix(factors)), np.clip(f * x + (1 - f) * grey, 0, 255),
         TF.adjust_saturation),
    )
    for got, expected, torchvision_op in cases:
        np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-10)
        for i, factor in enumerate(factors):
            torch.testing.assert_close(ours(got[i:i + 1]), torchvision_op(tv(tiles[i:i + 1]), float(factor)),
                                       rtol=0, atol=TV_LUMA_TOL)
    assert np.abs(cases[1][1] - x).mean() > 1.0  # contrast did something


def test_grayscale_has_equal_channels_at_the_luma(tiles: torch.Tensor) -> None:
    out = apply_color_matrix(tiles, grayscale_matrix(len(tiles)))
    for c in range(3):
        np.testing.assert_allclose(out[..., c].numpy(), luma(tiles.numpy()), rtol=0, atol=1e-10)
    torch.testing.assert_close(ours(out), TF.rgb_to_grayscale(tv(tiles), num_output_channels=3), rtol=0,
                               atol=TV_LUMA_TOL)
    np.testing.assert_allclose(saturation_matrix(np.zeros(2)), grayscale_matrix(2), rtol=0, atol=1e-15)


def test_hue_rotation_is_hsv_at_thirds_and_keeps_grey(tiles: torch.Tensor) -> None:
    for turns in (1 / 3, 2 / 3):
        out = apply_color_matrix(tiles, hue_matrix(np.full(len(tiles), turns))).numpy()
        hsv = rgb2hsv(tiles.numpy() / 255.0)
        hsv[..., 0] = (hsv[..., 0] + turns) % 1.0
        np.testing.assert_allclose(out, 255.0 * hsv2rgb(hsv), rtol=0, atol=1e-9)
    h = np.array([0.0, 0.05, -0.1, 0.1])
    m = hue_matrix(h)
    np.testing.assert_allclose(m[0], np.eye(3), atol=1e-15)
    np.testing.assert_allclose(m @ np.transpose(m, (0, 2, 1)), np.tile(np.eye(3), (4, 1, 1)), atol=1e-14)
    np.testing.assert_allclose(m @ hue_matrix(-h), np.tile(np.eye(3), (4, 1, 1)), atol=1e-14)
    np.testing.assert_allclose(np.ones(3) @ m, np.tile(np.ones(3), (4, 1)), atol=1e-14)  # grey stays grey


def test_blur_matches_torchvision(tiles: torch.Tensor) -> None:
    window = np.array([9, 9, 1, 9])
    sigma = np.array([0.1, 1.0, 1.5, 2.0])
    out = gaussian_blur(tiles, window, sigma)
    for i in range(len(tiles)):
        expected = tv(tiles[i:i + 1])
        if window[i] > 1:
            expected = TF.gaussian_blur(expected, [int(window[i])] * 2, [float(sigma[i])] * 2)
        torch.testing.assert_close(ours(out[i:i + 1]), expected, rtol=0, atol=1e-12)
    assert (out[3] - tiles[3]).abs().mean() > 1.0


def test_solarize_inverts_at_and_above_the_threshold(tiles: torch.Tensor) -> None:
    flags = np.array([1.0, 0.0, 1.0, 1.0])
    out = solarize(tiles, flags, 128.0)
    torch.testing.assert_close(ours(out[[0, 2, 3]]), TF.solarize(tv(tiles[[0, 2, 3]]), 128 / 255), rtol=0,
                               atol=1e-15)
    torch.testing.assert_close(out[1], tiles[1], rtol=0, atol=0)
    levels = torch.arange(256, dtype=torch.float64).reshape(1, 16, 16, 1).expand(1, 16, 16, 3)
    solarized = solarize(levels, np.ones(1), 128.0)[0, ..., 0].flatten()
    expected = torch.where(torch.arange(256) >= 128, 255 - torch.arange(256), torch.arange(256)).double()
    torch.testing.assert_close(solarized, expected, rtol=0, atol=0)


def make_params(n: int, **values: Any) -> PhotometricParams:
    """Parameters of ``n`` crops, identity except for ``values``."""
    fields = {"brightness": np.ones(n, np.float32), "contrast": np.ones(n, np.float32),
              "saturation": np.ones(n, np.float32), "hue": np.zeros(n, np.float32),
              "grayscale": np.zeros(n, bool), "blur_window": np.ones(n, np.int32),
              "blur_sigma": np.ones(n, np.float32), "solarize": np.zeros(n, np.float32)}
    fields.update(values)
    return PhotometricParams(**fields, solarize_threshold=128.0)


def test_chain_with_identity_parameters_is_the_identity(tiles: torch.Tensor) -> None:
    torch.testing.assert_close(apply_photometric(tiles, make_params(len(tiles))), tiles, rtol=0, atol=1e-9)


def test_fused_colour_map_is_the_unclipped_sequence(tiles: torch.Tensor, generic_cfg: dict) -> None:
    cfg = copy.deepcopy(generic_cfg)
    cfg["color_jitter_p"], cfg["grayscale_p"] = 1.0, 0.5
    p = sample_photometric_params("local", len(tiles), np.random.default_rng(3), cfg)
    x = tiles.numpy()
    b, c = p.brightness[:, None, None, None].astype(np.float64), p.contrast[:, None, None, None].astype(np.float64)
    x = b * x
    x = c * x + (1 - c) * luma(x).mean(axis=(1, 2))[:, None, None, None]
    x = np.einsum("nhwc,ncd->nhwd", x, saturation_matrix(p.saturation) @ hue_matrix(p.hue))
    x = np.where(p.grayscale[:, None, None, None], luma(x)[..., None], x)
    np.testing.assert_allclose(apply_color_affine(tiles, p).numpy(), np.clip(x, 0, 255), rtol=0, atol=1e-3)


def test_fused_colour_map_matches_torchvision_where_nothing_clips(tiles: torch.Tensor) -> None:
    # b, c, s <= 1 keep every intermediate inside [0, 255]; a third of a turn of hue is a channel permutation
    n = len(tiles)
    p = make_params(n, brightness=np.full(n, 0.9, np.float32), contrast=np.full(n, 0.8, np.float32),
                    saturation=np.full(n, 0.7, np.float32), hue=np.full(n, 1 / 3, np.float32))
    expected = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(tv(tiles), 0.9), 0.8), 0.7)
    expected = expected[:, [2, 0, 1]]  # red -> green -> blue -> red
    torch.testing.assert_close(ours(apply_photometric(tiles, p)), expected, rtol=0, atol=TV_LUMA_TOL)


def test_chain_composes_colour_blur_solarize(tiles: torch.Tensor, generic_cfg: dict) -> None:
    params = sample_photometric_params("global2", len(tiles), np.random.default_rng(3), generic_cfg)
    x = apply_color_affine(tiles, params)
    x = solarize(gaussian_blur(x, params.blur_window, params.blur_sigma), params.solarize, 128.0)
    torch.testing.assert_close(apply_photometric(tiles, params), x, rtol=0, atol=0)


@pytest.mark.parametrize("crop, blur_p, solarize_p", [("global1", 1.0, 0.0), ("global2", 0.1, 0.2),
                                                      ("local", 0.5, 0.0)])
def test_sampled_probabilities_follow_dinov2(crop: str, blur_p: float, solarize_p: float, generic_cfg: dict) -> None:
    n = 6000
    p = sample_photometric_params(crop, n, np.random.default_rng(0), generic_cfg)
    tol = 4 * np.sqrt(0.25 / n)
    jittered = p.brightness != 1.0
    assert abs(jittered.mean() - generic_cfg["color_jitter_p"]) < tol
    assert abs((p.blur_window == generic_cfg["blur_window"]).mean() - blur_p) < tol
    assert set(np.unique(p.blur_window)) <= {1, generic_cfg["blur_window"]}
    assert abs(p.solarize.mean() - solarize_p) < tol
    assert abs(p.grayscale.mean() - generic_cfg["grayscale_p"]) < tol
    for values, key in ((p.brightness - 1, "brightness"), (p.contrast - 1, "contrast"),
                        (p.saturation - 1, "saturation"), (p.hue, "hue")):
        assert 0.95 * generic_cfg[key] < np.abs(values).max() <= generic_cfg[key] + 1e-6
        assert np.all(values[~jittered] == 0)
    lo, hi = generic_cfg["blur_sigma"]
    assert lo <= p.blur_sigma.min() and p.blur_sigma.max() <= hi
    # neither jittered nor grey -> the colour map is the identity
    plain = ~jittered & ~p.grayscale
    np.testing.assert_allclose(p.color_matrix[plain], np.tile(np.eye(3), (plain.sum(), 1, 1)), atol=1e-7)
    np.testing.assert_array_equal(p.mean_weight[plain], 0.0)


def test_colour_map_keeps_grey_axis_and_scales_chroma(generic_cfg: dict) -> None:
    cfg = copy.deepcopy(generic_cfg)
    cfg["grayscale_p"] = 0.0
    p = sample_photometric_params("local", 2000, np.random.default_rng(1), cfg)
    scale = (p.brightness * p.contrast).astype(np.float64)
    # the grey axis maps to itself times b * c; off the grey axis, a chroma direction gains b * c * s (saturation
    # also adds a grey part, removed here; hue only rotates the chroma plane)
    np.testing.assert_allclose(np.ones(3) @ p.color_matrix, scale[:, None] * np.ones(3), rtol=1e-5)
    out = np.array([1.0, -1.0, 0.0]) / np.sqrt(2) @ p.color_matrix
    off_grey = out - out.mean(-1, keepdims=True)
    np.testing.assert_allclose(np.linalg.norm(off_grey, axis=-1), scale * p.saturation, rtol=1e-5)
    np.testing.assert_allclose(p.mean_weight, (1 - p.contrast) * p.brightness, rtol=1e-6)


def test_sampling_is_deterministic_and_draws_nine_per_crop(generic_cfg: dict) -> None:
    rng = np.random.default_rng(9)
    a = sample_photometric_params("global1", 50, rng, generic_cfg)
    b = sample_photometric_params("global1", 50, np.random.default_rng(9), generic_cfg)
    for field in ("brightness", "contrast", "saturation", "hue", "grayscale", "blur_window", "blur_sigma", "solarize"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    twin = np.random.default_rng(9)
    twin.random((50, 9))
    assert rng.random() == twin.random()


def test_bad_configuration_is_named(generic_cfg: dict) -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(KeyError, match="'global3'"):
        sample_photometric_params("global3", 2, rng, generic_cfg)
    for key, value, pattern in (("blur_window", 8, "blur_window=8"), ("hue", 0.7, "hue=0.7"),
                                ("grayscale_p", 1.5, "grayscale_p=1.5"), ("blur_sigma", [0.0, 2.0], "blur_sigma")):
        cfg = copy.deepcopy(generic_cfg)
        cfg[key] = value
        with pytest.raises(ValueError, match=pattern):
            sample_photometric_params("local", 2, rng, cfg)
    with pytest.raises(ValueError, match="2 images but parameters for 3"):
        apply_photometric(torch.zeros(2, 4, 4, 3), make_params(3))


@pytest.mark.parametrize("crop", ["global1", "global2", "local"])
def test_policy_equals_sample_photometric_params(crop: str, generic_cfg: dict) -> None:
    """The source validates the section once (a policy) and converts one crop across the batch at a time: the
    same parameters as sample_photometric_params from the same uniforms, also on a strided slice of them."""
    n = 64
    want = sample_photometric_params(crop, n, np.random.default_rng(5), generic_cfg)
    u = np.random.default_rng(5).random((n, PHOTOMETRIC_DRAWS_PER_CROP))
    strided = np.zeros((n, 3, PHOTOMETRIC_DRAWS_PER_CROP))
    strided[:, 1] = u
    policy = PhotometricPolicy(generic_cfg)
    for got in (policy.params(crop, u), policy.params(crop, strided[:, 1])):
        for field in PhotometricParams.__dataclass_fields__:
            a, b = getattr(got, field), getattr(want, field)
            assert np.array_equal(a, b) and np.asarray(a).dtype == np.asarray(b).dtype, field
        assert np.array_equal(got.color_matrix, want.color_matrix)
    cfg = copy.deepcopy(generic_cfg)
    cfg["blur_p"]["local"] = 2.0
    with pytest.raises(ValueError, match="blur_p.local=2.0"):
        PhotometricPolicy(cfg)
    PhotometricPolicy(cfg, ("global1", "global2"))  # only the crop types asked for are checked
