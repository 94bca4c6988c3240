"""Ki67 segmentation demonstrator on the real DeepLIIF images: mask decoding, crops, class weights, end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from eval_support import TINY
from PIL import Image
from sklearn.utils.class_weight import compute_class_weight

from foundation.cli import main
from foundation.eval.seg_data import CLASSES, IGNORE, crop_grid, decode_mask, load_pairs
from foundation.eval.segmentation import class_weights, folds

FAST = ["eval.segmentation.crop_size=64", "eval.segmentation.epochs=4", "eval.segmentation.batch_size=32"]


@pytest.fixture(scope="module")
def seg_dir(data_dir):
    return data_dir / "tiles" / "deepliif_ki67_nuclei_seg"


def test_masks_decode_to_the_three_classes_and_the_boundary(seg_dir):
    rgb = np.asarray(Image.open(seg_dir / "masks" / "22_2.png").convert("RGB"))
    target = decode_mask(rgb, 128, "ignore")
    # this mask holds exactly black, blue, green and red: each colour is one class
    for colour, value in (((0, 0, 0), 0), ((255, 0, 0), 1), ((0, 0, 255), 2), ((0, 255, 0), IGNORE)):
        assert (target[(rgb == colour).all(-1)] == value).all()
    assert np.bincount(target.ravel(), minlength=256)[[0, 1, 2, IGNORE]].tolist() == [142532, 7418, 68253, 43941]
    merged = decode_mask(rgb, 128, "background")
    assert (merged[target == IGNORE] == 0).all() and IGNORE not in merged
    anti_aliased = np.asarray(Image.open(seg_dir / "masks" / "34_3.png").convert("RGB"))
    dim_red = (anti_aliased[..., 0] > 128) & (anti_aliased[..., 0] < 255)
    assert dim_red.any() and (decode_mask(anti_aliased, 128, "ignore")[dim_red] == 1).all()


def test_ambiguous_colours_and_unpaired_files_are_named(seg_dir, tmp_path):
    yellow = np.zeros((4, 4, 3), np.uint8)
    yellow[1, 2] = (255, 255, 0)
    with pytest.raises(ValueError, match=r"m\.png: 1 pixels have several colour channels .* \(2, 1\)"):
        decode_mask(yellow, 128, "ignore", "m.png")
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / "a.png").symlink_to(seg_dir / "images" / "6_2.png")
    with pytest.raises(ValueError, match=r"without mask \['a'\]"):
        load_pairs(tmp_path / "images", tmp_path / "masks", 128, "ignore")


def test_crops_tile_the_image_in_row_major_order():
    image = np.arange(6 * 9 * 3).reshape(6, 9, 3)
    crops = crop_grid(image, 3)
    assert crops.shape == (6, 3, 3, 3)
    np.testing.assert_array_equal(crops[4], image[3:6, 3:6])
    np.testing.assert_array_equal(crop_grid(image[:, :8], 3)[:2], crop_grid(image, 3)[:2])  # remainder dropped


def test_balanced_class_weights_match_scikit_learn():
    rng = np.random.default_rng(0)
    target = rng.choice([0, 1, 2, IGNORE], p=[0.6, 0.05, 0.25, 0.1], size=(8, 16, 16)).astype(np.uint8)
    got = class_weights(torch.from_numpy(target), 3, "balanced").numpy()
    scored = target[target != IGNORE]
    np.testing.assert_allclose(got, compute_class_weight("balanced", classes=np.arange(3), y=scored), rtol=1e-6)
    assert class_weights(torch.from_numpy(target), 3, "none") is None


def test_folds_leave_one_image_out_or_split_in_half():
    assert folds(["a", "b", "c"], "leave_one_out") == [([1, 2], [0]), ([0, 2], [1]), ([0, 1], [2])]
    assert folds(["a", "b", "c", "d"], "half") == [([0, 1], [2, 3])]


def test_eval_seg_end_to_end_reports_dice_per_class(seg_dir, tmp_path, capsys):
    out = tmp_path / "seg.json"
    rc = main(["eval-seg", "random:", "--images", str(seg_dir / "images"), "--masks", str(seg_dir / "masks"),
               "--out", str(out), *TINY, *FAST])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["task"]["names"] == ["22_2", "34_3", "6_2", "799_2"]
    assert list(report["results"]) == ["random:", "color histogram"]
    for name, result in report["results"].items():
        assert [f["test"] for f in result["folds"]] == [["22_2"], ["34_3"], ["6_2"], ["799_2"]]
        for fold in result["folds"]:
            dice = [fold[f"dice_{c}"] for c in CLASSES]
            assert all(0.0 <= d <= 1.0 for d in dice)
            assert fold["mean_fg_dice"] == pytest.approx(np.mean(dice[1:]))
        # predicting background everywhere would score 0 on both nucleus classes
        assert result["summary"]["mean_fg_dice"]["mean"] > 0.2, name
        assert result["summary"]["dice_background"]["mean"] > 0.5, name
    table = out.with_suffix(".md").read_text()
    assert table.splitlines()[0] == ("| encoder | split | dice_background | dice_ki67_positive | dice_ki67_negative "
                                     "| mean_fg_dice |")
    assert table in capsys.readouterr().out
