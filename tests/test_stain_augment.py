"""Stain jitter: parameter sampling and the torch reference against float64 NumPy / scikit-image."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from skimage.color import hdx_from_rgb, hed2rgb, hed_from_rgb, rgb2hed, rgb_from_hdx, rgb_from_hed

from foundation.config import load_config, to_dict
from stain.augment import STAIN_DRAWS_PER_CROP, StainPolicy, apply_stain_matrix, sample_stain_params
from stain.deconvolution import stain_jitter_transform

LOG_FLOOR = np.log(1e-6)  # scikit-image's separate_stains floor and scale



@pytest.fixture(scope="module")
def stain_cfg() -> dict[str, Any]:
    return to_dict(load_config().data.augmentation.stain)


def with_policy(cfg: dict[str, Any], kind: str, **policy: Any) -> dict[str, Any]:
    cfg = copy.deepcopy(cfg)
    cfg["policies"]["test"] = {"basis": "none", "sigma": 0.0, "shift_sigma": 0.0, "perturb_dab": False,
                               "dab_sigma": 0.0, "dab_shift_sigma": 0.0, **policy}
    cfg["kinds"][kind] = "test"
    return cfg


def numpy_stains(rgb: np.ndarray, stain_from_rgb: np.ndarray) -> np.ndarray:
    """scikit-image's separate_stains written out in float64, without its final clip to >= 0."""
    rel = np.maximum(rgb.astype(np.float64) / 255.0, 1e-6)
    return (np.log(rel) / LOG_FLOOR) @ stain_from_rgb


def numpy_rgb(stains: np.ndarray, rgb_from_stain: np.ndarray) -> np.ndarray:
    """scikit-image's combine_stains in float64, as levels in [0, 255]."""
    return 255.0 * np.clip(np.exp((stains * LOG_FLOOR) @ rgb_from_stain), 0.0, 1.0)


def unclipped(out: np.ndarray) -> np.ndarray:
    """Pixels whose every channel lies strictly between the log floor and white: their OD survives a re-measure
    (brighter than white is clipped to 255, darker than 255e-6 to the floor)."""
    return ((out > 255.0 * 1e-6) & (out < 255.0)).all(-1)


def recover_alpha_beta(m: np.ndarray, t: np.ndarray, stain_from_rgb: np.ndarray,
                       rgb_from_stain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Invert M = S diag(alpha) R, T = -ln(1e-6) beta R (R S = I)."""
    diag = rgb_from_stain @ m.astype(np.float64) @ stain_from_rgb
    beta = t.astype(np.float64) @ stain_from_rgb / -LOG_FLOOR
    return diag, beta


def test_zero_strength_is_the_identity(he_tiles: np.ndarray, ihc_tiles: np.ndarray, stain_cfg: dict) -> None:
    cfg = copy.deepcopy(stain_cfg)
    for policy in cfg["policies"].values():
        for key in ("sigma", "shift_sigma", "dab_sigma", "dab_shift_sigma"):
            policy[key] = 0.0
    images = np.concatenate([he_tiles, ihc_tiles])
    kinds = ["he"] * len(he_tiles) + ["ihc"] * len(ihc_tiles)
    m, t = sample_stain_params(kinds, np.random.default_rng(0), cfg)
    np.testing.assert_allclose(m, np.tile(np.eye(3), (len(kinds), 1, 1)), rtol=0, atol=1e-7)
    np.testing.assert_array_equal(t, 0.0)
    out = apply_stain_matrix(torch.from_numpy(images), m, t).numpy()
    # float32 log/exp round trip: within 1e-3 of a level, and rounding gives the input back bitwise
    assert np.abs(out - images).max() < 1e-3
    np.testing.assert_array_equal(np.rint(out).astype(np.uint8), images)


def test_hed_jitter_matches_float64_numpy_and_skimage(he_tiles: np.ndarray) -> None:
    rng = np.random.default_rng(7)
    sigma = 0.2  # Tellez "strong"
    alpha = rng.uniform(1 - sigma, 1 + sigma, (len(he_tiles), 3))
    beta = rng.uniform(-sigma, sigma, (len(he_tiles), 3))
    m, t = stain_jitter_transform("hed", alpha, beta)
    ours = apply_stain_matrix(torch.from_numpy(he_tiles.astype(np.float64)), m, t).numpy()

    reference = np.stack([numpy_rgb(numpy_stains(img, hed_from_rgb) * a + b, rgb_from_hed)
                          for img, a, b in zip(he_tiles, alpha, beta, strict=True)])
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-9)

    # scikit-image itself: identical wherever its clip of negative concentrations does not act
    skimage_ref = np.stack([255.0 * hed2rgb(rgb2hed(img) * a + b) for img, a, b in zip(he_tiles, alpha, beta,
                                                                                       strict=True)])
    unclipped = (np.stack([numpy_stains(img, hed_from_rgb) for img in he_tiles]) >= 0).all(-1)
    assert unclipped.mean() > 0.3
    np.testing.assert_allclose(ours[unclipped], skimage_ref[unclipped], rtol=0, atol=1e-9)

    # the float32 path (what DALI runs) stays within 1e-3 of a level of float64
    ours32 = apply_stain_matrix(torch.from_numpy(he_tiles), m.astype(np.float32), t.astype(np.float32)).numpy()
    assert np.abs(ours32 - reference).max() < 1e-3


def test_hed_jitter_changes_the_image(he_tiles: np.ndarray, stain_cfg: dict) -> None:
    m, t = sample_stain_params(["he"] * len(he_tiles), np.random.default_rng(1), stain_cfg)
    out = apply_stain_matrix(torch.from_numpy(he_tiles), m, t).numpy()
    assert np.abs(out - he_tiles).mean() > 1.0


def test_ihc_policy_keeps_dab_when_told(ihc_tiles: np.ndarray, stain_cfg: dict) -> None:
    cfg = with_policy(stain_cfg, "ihc", basis="hdab", sigma=0.2, shift_sigma=0.02, perturb_dab=False,
                      dab_sigma=0.2, dab_shift_sigma=0.02)
    m, t = sample_stain_params(["ihc"] * len(ihc_tiles), np.random.default_rng(2), cfg)
    out = apply_stain_matrix(torch.from_numpy(ihc_tiles.astype(np.float64)), m, t).numpy()
    before = np.stack([numpy_stains(img, hdx_from_rgb) for img in ihc_tiles])
    after = np.stack([numpy_stains(img, hdx_from_rgb) for img in out])
    inside = unclipped(out)
    assert inside.mean() > 0.9
    # M, T are float32: exact up to their rounding (1e-6 here is a few thousandths of a level)
    np.testing.assert_allclose(after[inside][:, 1], before[inside][:, 1], rtol=0, atol=1e-6)
    # hematoxylin did move
    assert np.abs(after[inside][:, 0] - before[inside][:, 0]).max() > 0.01


def test_ihc_dab_perturbation_is_bounded_by_its_own_sigma(ihc_tiles: np.ndarray, stain_cfg: dict) -> None:
    dab_sigma, dab_shift = 0.05, 0.005
    cfg = with_policy(stain_cfg, "ihc", basis="hdab", sigma=0.2, shift_sigma=0.02, perturb_dab=True,
                      dab_sigma=dab_sigma, dab_shift_sigma=dab_shift)
    m, t = sample_stain_params(["ihc"] * len(ihc_tiles), np.random.default_rng(3), cfg)
    out = apply_stain_matrix(torch.from_numpy(ihc_tiles.astype(np.float64)), m, t).numpy()
    before = np.stack([numpy_stains(img, hdx_from_rgb) for img in ihc_tiles])[..., 1]
    after = np.stack([numpy_stains(img, hdx_from_rgb) for img in out])[..., 1]
    inside = unclipped(out)
    change = np.abs(after - before)[inside]
    assert change.max() > 1e-3
    assert (change <= dab_sigma * np.abs(before[inside]) + dab_shift + 1e-9).all()


def test_sampled_parameters_follow_the_policy(stain_cfg: dict) -> None:
    n = 4000
    kinds = ["he", "ihc", "special", "unknown"] * (n // 4)
    m, t = sample_stain_params(kinds, np.random.default_rng(4), stain_cfg)
    assert m.dtype == np.float32 and t.dtype == np.float32
    assert m.flags.c_contiguous and t.flags.c_contiguous
    kinds_arr = np.array(kinds)
    policies = stain_cfg["policies"]

    he = policies[stain_cfg["kinds"]["he"]]
    diag, beta = recover_alpha_beta(m[kinds_arr == "he"], t[kinds_arr == "he"], hed_from_rgb, rgb_from_hed)
    alpha = np.diagonal(diag, axis1=1, axis2=2)
    assert np.abs(diag - alpha[..., None] * np.eye(3)).max() < 1e-5
    for got, bound in ((np.abs(alpha[:, :2] - 1), he["sigma"]), (np.abs(beta[:, :2]), he["shift_sigma"]),
                       (np.abs(alpha[:, 2] - 1), he["dab_sigma"]), (np.abs(beta[:, 2]), he["dab_shift_sigma"])):
        assert bound * 0.95 < got.max() <= bound + 1e-5

    ihc = policies[stain_cfg["kinds"]["ihc"]]
    diag, beta = recover_alpha_beta(m[kinds_arr == "ihc"], t[kinds_arr == "ihc"], hdx_from_rgb, rgb_from_hdx)
    alpha = np.diagonal(diag, axis1=1, axis2=2)
    assert np.abs(diag - alpha[..., None] * np.eye(3)).max() < 1e-5
    dab = 1  # hematoxylin, DAB, residual
    assert ihc["dab_sigma"] * 0.95 < np.abs(alpha[:, dab] - 1).max() <= ihc["dab_sigma"] + 1e-5
    assert np.abs(beta[:, dab]).max() <= ihc["dab_shift_sigma"] + 1e-6
    assert ihc["sigma"] * 0.95 < np.abs(alpha[:, [0, 2]] - 1).max() <= ihc["sigma"] + 1e-5
    assert ihc["shift_sigma"] * 0.95 < np.abs(beta[:, [0, 2]]).max() <= ihc["shift_sigma"] + 1e-5

    unknown = kinds_arr == "unknown"
    np.testing.assert_array_equal(m[unknown], np.tile(np.eye(3, dtype=np.float32), (unknown.sum(), 1, 1)))
    np.testing.assert_array_equal(t[unknown], 0.0)


def test_probability_share_and_stream_alignment(stain_cfg: dict) -> None:
    cfg = copy.deepcopy(stain_cfg)
    cfg["p"] = 0.3
    n = 5000
    rng = np.random.default_rng(5)
    m, _ = sample_stain_params(["he"] * n, rng, cfg)
    jittered = np.abs(m - np.eye(3)).max(axis=(1, 2)) > 0
    assert abs(jittered.mean() - 0.3) < 0.03
    # exactly 7 uniforms per crop, whatever the policy
    twin = np.random.default_rng(5)
    twin.random((n, 7))
    assert rng.random() == twin.random()


def test_sampling_is_deterministic(stain_cfg: dict) -> None:
    kinds = ["he", "ihc"] * 20
    a = sample_stain_params(kinds, np.random.default_rng(11), stain_cfg)
    b = sample_stain_params(kinds, np.random.default_rng(11), stain_cfg)
    c = sample_stain_params(kinds, np.random.default_rng(12), stain_cfg)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_bad_configuration_is_named(stain_cfg: dict) -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(KeyError, match="'weird'"):
        sample_stain_params(["weird"], rng, stain_cfg)
    cfg = copy.deepcopy(stain_cfg)
    cfg["kinds"]["he"] = "missing_policy"
    with pytest.raises(KeyError, match="missing_policy"):
        sample_stain_params(["he"], rng, cfg)
    with pytest.raises(ValueError, match=r"policies\.test\.basis='lab'"):
        sample_stain_params(["he"], rng, with_policy(stain_cfg, "he", basis="lab"))
    with pytest.raises(ValueError, match=r"policies\.test\.sigma=1\.5"):
        sample_stain_params(["he"], rng, with_policy(stain_cfg, "he", basis="hed", sigma=1.5))
    with pytest.raises(ValueError, match=r"\[2, 3, 3\]"):
        apply_stain_matrix(torch.zeros(2, 4, 4, 3), np.zeros((1, 3, 3)), np.zeros((1, 3)))


def test_policy_on_a_batch_equals_per_sample_draws(stain_cfg: dict) -> None:
    """The source validates the policy once and converts a whole batch's uniforms at once: bit for bit what
    sample_stain_params gives sample by sample (each sample's crops share a kind; kinds mix across samples)."""
    crops = 10
    kinds = ["he", "ihc", "unknown", "he", "ihc", "special"]
    cfg = copy.deepcopy(stain_cfg)
    cfg["p"] = 0.7  # some crops keep the identity
    per_sample = [sample_stain_params([k] * crops, np.random.default_rng(s), cfg) for s, k in enumerate(kinds)]
    policy = StainPolicy(cfg, ["unknown", "he", "ihc", "special"])
    u = np.concatenate([np.random.default_rng(s).random((crops, STAIN_DRAWS_PER_CROP)) for s in range(len(kinds))])
    m, t = policy.transforms(np.repeat(policy.ids(kinds), crops), u)
    assert m.dtype == t.dtype == np.float32 and m.shape == (len(kinds) * crops, 3, 3)
    assert np.array_equal(m, np.concatenate([p[0] for p in per_sample]))
    assert np.array_equal(t, np.concatenate([p[1] for p in per_sample]))
    with pytest.raises(KeyError, match="'weird'"):
        StainPolicy(stain_cfg, ["he", "weird"])
