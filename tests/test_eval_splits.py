"""Grouped splits on the real H&E-vs-IHC tile names: no source on both sides, every tile tested once."""

from __future__ import annotations

import numpy as np
import pytest
from eval_support import HE_IHC_GROUPS

from foundation.eval.splits import check_disjoint_groups, grouped_folds
from foundation.eval.tiles import scan_tiles, source_ids


@pytest.fixture(scope="module")
def he_ihc(data_dir):
    tiles = scan_tiles(data_dir / "tiles" / "stain_he_vs_ihc", [".png"])
    return tiles, source_ids(tiles.relative_names(), HE_IHC_GROUPS)


def test_sources_are_the_crop_names_without_position(he_ihc):
    tiles, groups = he_ihc
    assert tiles.class_names == ("HE", "IHC") and len(tiles) == 187
    names = tiles.relative_names()
    i = names.index("IHC/DeepLIIF_ROI_1_x0_y112.png")
    assert groups[i] == "DeepLIIF_ROI_1"
    assert (groups == "DeepLIIF_ROI_1").sum() == sum(n.startswith("IHC/DeepLIIF_ROI_1_x") for n in names)
    # no source holds tiles of both classes (a source is one stained image)
    for g in set(groups):
        assert len(set(tiles.labels[groups == g])) == 1, g


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_folds_never_leak_a_source_and_test_every_tile_once(he_ihc, seed):
    tiles, groups = he_ihc
    folds = grouped_folds(tiles.labels, groups, 3, seed)
    tested = np.concatenate([test for _, test in folds])
    assert sorted(tested.tolist()) == list(range(len(tiles)))
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])
        assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(tiles)))
        assert set(tiles.labels[test]) == {0, 1}  # stratified: both stains in every test fold


def test_seeds_give_different_assignments(he_ihc):
    tiles, groups = he_ihc
    a = [set(groups[t]) for _, t in grouped_folds(tiles.labels, groups, 3, 0)]
    b = [set(groups[t]) for _, t in grouped_folds(tiles.labels, groups, 3, 1)]
    assert sorted(map(sorted, a)) != sorted(map(sorted, b))


def test_leaks_and_impossible_splits_are_errors(he_ihc):
    tiles, groups = he_ihc
    train, test = grouped_folds(tiles.labels, groups, 3, 0)[0]
    leaky = (np.append(train, test[0]), test)
    with pytest.raises(AssertionError, match="is in train and test"):
        check_disjoint_groups([leaky], groups)
    with pytest.raises(ValueError, match="23 sources"):
        grouped_folds(tiles.labels, groups, 24, 0)


def test_group_regex_errors_name_the_file_and_the_regex():
    with pytest.raises(ValueError, match="has no group"):
        source_ids(["a_x1_y2.png"], r"_x\d+")
    with pytest.raises(ValueError, match=r"does not match the file name 'b\.png'"):
        source_ids(["HE/b.png"], HE_IHC_GROUPS)
    with pytest.raises(ValueError, match="invalid"):
        source_ids(["a.png"], "(")
    assert source_ids(["HE/a.png", "IHC/a.png"], None).tolist() == ["HE/a.png", "IHC/a.png"]
