"""The DALI adapter against the torch references, on real H&E and IHC tiles, CPU pipelines (device_id=None)."""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def
from PIL import Image

from foundation.config import load_config, to_dict
from stain.augment import apply_stain_matrix, sample_stain_params
from stain.dali_ops import (
    PHOTOMETRIC_INPUTS,
    photometric_augment,
    photometric_dali_args,
    stain_augment,
    stain_dali_args,
)
from stain.photometric import apply_photometric, sample_photometric_params

# Tolerances in levels of 255. DALI computes in float32 (table-lookup log, matrix, exp; reductions and the separable
# blur summed in another order than torch): measured max 1.3e-4 (stain, vs float64) and 9.2e-5 (photometric).
STAIN_TOL = 1e-3
PHOTOMETRIC_TOL = 1e-3


@pytest.fixture(scope="module")
def tiles(data_dir: Path) -> tuple[np.ndarray, list[str]]:
    """One tile per source image of both classes, uint8 ``[K,224,224,3]``, and their stain kinds."""
    images, kinds = [], []
    for folder, kind in (("HE", "he"), ("IHC", "ihc")):
        firsts: dict[str, Path] = {}
        for path in sorted((data_dir / "tiles" / "stain_he_vs_ihc" / folder).glob("*.png")):
            firsts.setdefault(re.sub(r"_x\d+_y\d+\.png$", "", path.name), path)
        images += [np.asarray(Image.open(p).convert("RGB")) for p in firsts.values()]
        kinds += [kind] * len(firsts)
    return np.stack(images), kinds


@pytest.fixture(scope="module")
def aug_cfg() -> dict[str, Any]:
    return to_dict(load_config().data.augmentation)


def constant(batch: list[np.ndarray]) -> Callable[[], list[np.ndarray]]:
    """An external-source callback that yields the same batch every iteration."""
    return lambda: batch


def run_dali(images: np.ndarray, inputs: dict[str, list[np.ndarray]],
             graph: Callable[[Any, dict[str, Any]], Any], device: str = "cpu") -> np.ndarray:
    """Run ``graph(images_node, input_nodes)`` once on a fresh pipeline; returns the outputs stacked on the host."""
    batch = [np.ascontiguousarray(img) for img in images]

    @pipeline_def(batch_size=len(batch), num_threads=2, device_id=0 if device == "gpu" else None, seed=0)
    def pipe():
        x = fn.external_source(source=constant(batch), layout="HWC", batch=True)
        nodes = {k: fn.external_source(source=constant(v), batch=True) for k, v in inputs.items()}
        return graph(x, nodes)

    p = pipe()
    p.build()
    (out,) = p.run()
    if device == "gpu":
        out = out.as_cpu()
    return np.stack([np.asarray(out.at(i)) for i in range(len(batch))])


def dali_stain(images: np.ndarray, m: np.ndarray, t: np.ndarray, device: str = "cpu") -> np.ndarray:
    md, td = stain_dali_args(m, t)
    return run_dali(images, {"m": md, "t": td}, lambda x, n: stain_augment(x, n["m"], n["t"], device), device)


@pytest.mark.parametrize("he_policy", ["hed_light", "tellez_strong"])
def test_stain_augment_matches_torch(tiles: tuple, aug_cfg: dict, he_policy: str) -> None:
    images, kinds = tiles
    cfg = copy.deepcopy(aug_cfg["stain"])
    cfg["kinds"]["he"] = he_policy
    m, t = sample_stain_params(kinds, np.random.default_rng(0), cfg)
    out = dali_stain(images, m, t)
    assert out.dtype == np.float32 and out.shape == images.shape
    reference = apply_stain_matrix(torch.from_numpy(images), m, t).numpy()
    assert np.abs(out - reference).max() < STAIN_TOL
    reference64 = apply_stain_matrix(torch.from_numpy(images.astype(np.float64)), m, t).numpy()
    assert np.abs(out - reference64).max() < STAIN_TOL
    assert np.abs(out - images).mean() > 1.0  # the jitter did act


def test_stain_augment_at_zero_strength_returns_the_input(tiles: tuple) -> None:
    images, _ = tiles
    n = len(images)
    out = dali_stain(images, np.tile(np.eye(3, dtype=np.float32), (n, 1, 1)), np.zeros((n, 3), np.float32))
    assert np.abs(out - images).max() < STAIN_TOL
    np.testing.assert_array_equal(np.rint(out).astype(np.uint8), images)


def dali_photometric(images: np.ndarray, params: Any, device: str = "cpu") -> np.ndarray:
    return run_dali(images, photometric_dali_args(params),
                    lambda x, n: photometric_augment(x, n, params.solarize_threshold, device), device)


def check_photometric(out: np.ndarray, images: np.ndarray, params: Any) -> None:
    reference = apply_photometric(torch.from_numpy(images.astype(np.float32)), params).numpy()
    # a value within float noise of the solarize threshold may land on either side: exclude only those
    unsolarized = apply_photometric(torch.from_numpy(images.astype(np.float32)),
                                    dataclasses.replace(params, solarize=np.zeros_like(params.solarize))).numpy()
    flagged = params.solarize[:, None, None, None] > 0
    on_edge = (np.abs(unsolarized - params.solarize_threshold) < PHOTOMETRIC_TOL) & flagged
    assert on_edge.mean() < 1e-3
    diff = np.abs(out - reference)
    assert diff[~on_edge].max() < PHOTOMETRIC_TOL


@pytest.mark.parametrize("crop", ["global1", "global2", "local"])
def test_photometric_augment_matches_torch(tiles: tuple, aug_cfg: dict, crop: str) -> None:
    images, _ = tiles
    cfg = copy.deepcopy(aug_cfg["generic"])
    # make every branch occur in one batch
    cfg["color_jitter_p"] = 0.9
    cfg["grayscale_p"] = 0.3
    cfg["blur_p"][crop] = 0.5
    cfg["solarize_p"][crop] = 0.5
    params = sample_photometric_params(crop, len(images), np.random.default_rng(1), cfg)
    assert params.solarize.any() and (params.blur_window > 1).any() and params.grayscale.any()
    out = dali_photometric(images, params)
    assert out.dtype == np.float32
    check_photometric(out, images, params)


def test_chain_on_float_stain_output(tiles: tuple, aug_cfg: dict) -> None:
    """The real order: stain jitter (float levels out) then the generic ops, both in DALI, against torch."""
    images, kinds = tiles
    m, t = sample_stain_params(kinds, np.random.default_rng(2), aug_cfg["stain"])
    params = sample_photometric_params("global1", len(images), np.random.default_rng(3), aug_cfg["generic"])
    md, td = stain_dali_args(m, t)
    inputs = {"m": md, "t": td, **photometric_dali_args(params)}

    def graph(x: Any, n: dict[str, Any]) -> Any:
        stained = stain_augment(x, n["m"], n["t"])
        return photometric_augment(stained, {k: n[k] for k in PHOTOMETRIC_INPUTS}, params.solarize_threshold)

    out = run_dali(images, inputs, graph)
    reference = apply_photometric(apply_stain_matrix(torch.from_numpy(images), m, t), params).numpy()
    assert np.abs(out - reference).max() < PHOTOMETRIC_TOL


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match=r"M must be \[N, 3, 3\]"):
        stain_dali_args(np.zeros((2, 3)), np.zeros((2, 3)))

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        x = fn.external_source(source=lambda: [np.zeros((4, 4, 3), np.uint8)], batch=True)
        return stain_augment(x, x, x, device="tpu")

    with pytest.raises(ValueError, match="device='tpu'"):
        pipe().build()
    with pytest.raises(KeyError, match="solarize"):
        photometric_augment(None, {k: None for k in PHOTOMETRIC_INPUTS if k != "solarize"}, 128.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_builders_match_the_cpu_pipeline(tiles: tuple, aug_cfg: dict) -> None:
    images, kinds = tiles
    m, t = sample_stain_params(kinds, np.random.default_rng(4), aug_cfg["stain"])
    np.testing.assert_allclose(dali_stain(images, m, t, "gpu"), dali_stain(images, m, t, "cpu"), rtol=0, atol=STAIN_TOL)
    params = sample_photometric_params("global2", len(images), np.random.default_rng(5), aug_cfg["generic"])
    check_photometric(dali_photometric(images, params, "gpu"), images, params)
