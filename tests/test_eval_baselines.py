"""The colour-histogram baseline: exact against numpy, and it tells H&E from IHC on real tiles (grouped splits)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from eval_support import HE_IHC_GROUPS

from foundation.eval.baselines import color_histogram, patch_color_histogram
from foundation.eval.classification import ProbeSettings, evaluate_features
from foundation.eval.knn import KnnParams
from foundation.eval.linear import LinearParams
from foundation.eval.tiles import TileDataset, scan_tiles, source_ids


def test_joint_histogram_equals_numpy_histogramdd():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 3, 20, 24), dtype=np.uint8)
    got = color_histogram(torch.from_numpy(images), bins=5).numpy()
    edges = [np.linspace(0, 256, 6)] * 3
    for i, image in enumerate(images):
        want, _ = np.histogramdd(image.reshape(3, -1).T, bins=edges)
        np.testing.assert_allclose(got[i], want.reshape(-1) / (20 * 24), rtol=0, atol=1e-7)


def test_patch_histograms_are_the_histograms_of_the_patches():
    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.integers(0, 256, size=(2, 3, 32, 48), dtype=np.uint8))
    grid = patch_color_histogram(images, 16, bins=4)
    assert grid.shape == (2, 2, 3, 64)
    torch.testing.assert_close(grid[1, 1, 2], color_histogram(images[1:, :, 16:32, 32:48], 4)[0])
    with pytest.raises(ValueError, match="multiple of the patch size"):
        patch_color_histogram(images[..., :40], 16, 4)


def test_color_histogram_separates_he_from_ihc_by_source(data_dir):
    tiles = scan_tiles(data_dir / "tiles" / "stain_he_vs_ihc", [".png"])
    groups = source_ids(tiles.relative_names(), HE_IHC_GROUPS)
    images = torch.stack([TileDataset(tiles.paths, 64)[i] for i in range(len(tiles))])
    x = color_histogram(images, bins=8).numpy()
    settings = ProbeSettings(folds=3, seeds=2, seed=0, knn=KnnParams(20, "weighted", 0.07, False),
                             linear=LinearParams(1.0, (1.0,), 3, 2000))
    results = evaluate_features(x, tiles.labels, groups, ["knn", "linear"], settings)
    for protocol, result in results.items():
        summary = result["summary"]
        assert summary["balanced_accuracy"]["mean"] >= 0.9, protocol
        assert summary["auroc"]["mean"] >= 0.9, protocol
