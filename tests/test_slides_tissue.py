"""Tissue detection: labelled tiles (tissue / background / pen), H&E and IHC tiles, real slide thumbnails."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu

from foundation.config import load_config, to_dict
from foundation.slides.readers import open_slide
from foundation.slides.thumbnail import read_thumbnail
from foundation.slides.tissue import TissueParams, hue, pixel_classes, tissue_mask

# The detector runs on thumbnails; the tiles are shrunk by this factor (block mean) to look like one.
SHRINK = 4


@pytest.fixture(scope="module")
def params() -> TissueParams:
    return TissueParams.from_config(to_dict(load_config().tissue))


def _shrunk(path: Path) -> np.ndarray:
    image = np.asarray(Image.open(path).convert("RGB"))
    h, w = image.shape[0] // SHRINK * SHRINK, image.shape[1] // SHRINK * SHRINK
    blocks = image[:h, :w].reshape(h // SHRINK, SHRINK, w // SHRINK, SHRINK, 3).astype(np.float64)
    return blocks.mean(axis=(1, 3)).round().astype(np.uint8)


def _fractions(folder: Path, params: TissueParams) -> dict[str, float]:
    files = sorted(folder.glob("*.png"))
    assert files, f"no tiles in {folder}"
    return {f.name: float(tissue_mask(_shrunk(f), params).mean()) for f in files}


def test_histolab_tissue_background_and_pen_tiles(data_dir: Path, params: TissueParams) -> None:
    root = data_dir / "tiles" / "histolab_tissue_qc"
    tissue = _fractions(root / "tissue", params)
    background = _fractions(root / "background", params)
    pen = _fractions(root / "pen_marking", params)
    assert max(background.values()) <= 0.05, background
    assert min(tissue.values()) > max(background.values())
    assert np.median(list(tissue.values())) >= 0.75, tissue
    # The densely cellular tiles are (nearly) all tissue; the sparse ones (fat, a scrap of tissue) are partly glass.
    dense = ("high-nuclei-score-level0.png", "medium-nuclei-score-level1-2.png", "very-low-nuclei-score-level0.png")
    for name in dense:
        assert tissue[name] >= 0.95, (name, tissue[name])
    # Green ink is not tissue: a stroke on glass scores like glass, tissue under a stroke loses the inked part.
    assert pen["no-tissue-green-pen.png"] <= 0.1
    inked = _shrunk(root / "pen_marking" / "medium-nuclei-score-green-pen-level1.png")
    stained = pixel_classes(inked, params)["stained"].mean()
    assert stained >= 0.9 and pen["medium-nuclei-score-green-pen-level1.png"] <= stained - 0.25


@pytest.mark.parametrize(("stain", "median", "low"), [("HE", 0.85, 0.5), ("IHC", 0.7, 0.3)])
def test_he_and_ihc_tiles_are_tissue(data_dir: Path, params: TissueParams, stain: str, median: float,
                                     low: float) -> None:
    scores = _fractions(data_dir / "tiles" / "stain_he_vs_ihc" / stain, params)
    values = np.array(list(scores.values()))
    assert np.median(values) >= median, np.percentile(values, [0, 25, 50])
    # The lowest IHC tiles are mostly the empty insides of fat cells (real glass), hence a lower floor.
    assert values.min() >= low, min(scores.items(), key=lambda kv: kv[1])


def test_pixel_classes_on_reference_colours(params: TissueParams) -> None:
    colours = {
        "glass": ((242, 241, 243), False, False),
        "grey glass": ((224, 223, 225), False, False),
        "eosin": ((232, 150, 200), True, False),
        "hematoxylin H&E": ((110, 60, 150), True, False),
        "DAB brown": ((150, 100, 60), True, False),
        "pale DAB": ((215, 190, 160), True, False),
        "hematoxylin IHC": ((120, 140, 190), True, False),
        "near black": ((12, 10, 14), False, False),
        "green ink": ((60, 180, 130), True, True),
        "blue ink": ((30, 60, 200), True, True),
    }
    image = np.array([[rgb for rgb, _, _ in colours.values()]], dtype=np.uint8)
    classes = pixel_classes(image, params)
    for i, (name, (_, stained, pen)) in enumerate(colours.items()):
        assert classes["stained"][0, i] == stained, name
        assert classes["pen"][0, i] == pen, name


def test_hue_matches_scikit_image(params: TissueParams) -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    rgb[0, :8] = [[v, v, v] for v in range(0, 256, 32)]  # greys: hue 0 in both
    expected = rgb2hsv(rgb)[..., 0]
    got = hue(rgb)
    # hue is circular: 0.99999 and 0.0 are the same colour
    assert np.abs((got - expected + 0.5) % 1.0 - 0.5).max() < 1e-5


def test_border_tissue_survives_closing(params: TissueParams) -> None:
    image = np.full((60, 80, 3), 242, np.uint8)
    image[:, :30] = (200, 120, 180)  # tissue touching the left, top and bottom borders
    mask = tissue_mask(image, params)
    assert mask[:, :30].all() and not mask[:, 32:].any()


def test_small_specks_are_dropped(params: TissueParams) -> None:
    image = np.full((200, 200, 3), 242, np.uint8)
    image[50:150, 50:150] = (200, 120, 180)
    image[10:12, 180:182] = (200, 120, 180)  # 4 px < 0.0005 * 40000 = 20 px
    mask = tissue_mask(image, params)
    assert mask[50:150, 50:150].all() and not mask[:20, 170:].any()


def test_config_errors_name_the_key() -> None:
    cfg = to_dict(load_config().tissue)
    cfg["pen"] = [{"hue": [0.7, 0.2], "min_saturation": 0.3}]
    with pytest.raises(ValueError, match=r"tissue.pen\[0\].hue"):
        TissueParams.from_config(cfg)
    cfg = to_dict(load_config().tissue)
    cfg["min_saturation"] = 1.5
    with pytest.raises(ValueError, match="tissue.min_saturation"):
        TissueParams.from_config(cfg)


@pytest.mark.parametrize(("name", "mpp"), [("svs_jpeg", None), ("svs_j2k", 0.5), ("dicom", None),
                                           ("ome_tiff", None), ("ihc_tiff", 0.25)])
def test_real_slide_masks(wsi: dict[str, Path], params: TissueParams, name: str, mpp: float | None) -> None:
    with open_slide(wsi[name], mpp=mpp) as slide:
        thumb = read_thumbnail(slide, params.thumbnail_mpp, params.max_thumbnail_side, params.max_read_pixels)
    mask = tissue_mask(thumb.image, params)
    stained = pixel_classes(thumb.image, params)["stained"]
    # The closing fills gaps up to its radius: a pixel farther than that from every stained pixel stays glass.
    far = ndi.distance_transform_edt(~stained) > params.closing_radius
    assert not (mask & far).any()
    # Nearly every stained pixel is tissue (the rest: specks too small to keep).
    assert mask[stained].mean() >= 0.9, mask[stained].mean()
    # An independent classic detector, Otsu's threshold on HSV saturation, finds the strongly stained part:
    # all of it must be in the mask (ours also keeps pale tissue that Otsu leaves out).
    saturation = rgb2hsv(thumb.image)[..., 1]
    otsu = saturation > threshold_otsu(saturation)
    assert mask[otsu].mean() >= 0.99, mask[otsu].mean()
    fraction = mask.mean()
    if name == "ihc_tiff":
        assert fraction >= 0.9  # a region of interest cut from inside tissue
    else:
        assert 0.2 <= fraction <= 0.8  # tissue with glass around it
