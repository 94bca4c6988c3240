"""Image / mask pairs of the Ki67 segmentation demonstrator (DeepLIIF masks) and their crops.

Mask colours (DeepLIIF ground truth): red = Ki67-positive nucleus, blue = Ki67-negative nucleus, green = nucleus
boundary, black = background. A pixel has a colour when that channel is ``>= threshold`` and the other two are
below it (the masks carry a few anti-aliased reds such as (210, 0, 0)); no channel that high is background;
two or more is an error. Boundary pixels are ignored (``IGNORE``: no loss, not scored) or merged into the
background, as ``eval.segmentation.boundary`` says.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("background", "ki67_positive", "ki67_negative")
IGNORE = 255
BOUNDARY_MODES = ("ignore", "background")
IMAGE_ENDINGS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


@dataclass(frozen=True)
class SegImage:
    """One image (``[H, W, 3]`` uint8) and its class map (``[H, W]`` uint8: class ids or ``IGNORE``)."""

    name: str
    image: np.ndarray
    target: np.ndarray


def decode_mask(rgb: np.ndarray, threshold: int, boundary: str, source: str = "mask") -> np.ndarray:
    """Class map ``[H, W]`` uint8 of a DeepLIIF colour mask (see the module docstring)."""
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"{source}: mask must be RGB [H, W, 3], got {list(rgb.shape)}")
    if boundary not in BOUNDARY_MODES:
        raise ValueError(f"eval.segmentation.boundary = {boundary!r} is not one of {list(BOUNDARY_MODES)}")
    high = rgb >= threshold
    several = high.sum(axis=-1) > 1
    if several.any():
        y, x = np.argwhere(several)[0]
        raise ValueError(f"{source}: {int(several.sum())} pixels have several colour channels >= {threshold}, "
                         f"e.g. ({x}, {y}) = {rgb[y, x].tolist()}: not a red/green/blue/black mask")
    target = np.zeros(rgb.shape[:2], dtype=np.uint8)
    target[high[..., 0]] = CLASSES.index("ki67_positive")
    target[high[..., 2]] = CLASSES.index("ki67_negative")
    target[high[..., 1]] = IGNORE if boundary == "ignore" else CLASSES.index("background")
    return target


def _read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err}") from err


def load_pairs(images_dir: str | Path, masks_dir: str | Path, threshold: int, boundary: str) -> list[SegImage]:
    """Images and masks matched by file stem, sorted by name; unmatched files are an error naming them."""
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    found = {}
    for what, folder in (("images", images_dir), ("masks", masks_dir)):
        if not folder.is_dir():
            raise FileNotFoundError(f"{what} folder {folder} does not exist")
        found[what] = {p.stem: p for p in folder.iterdir() if p.suffix.lower() in IMAGE_ENDINGS}
    if found["images"].keys() != found["masks"].keys():
        only_i = sorted(found["images"].keys() - found["masks"].keys())
        only_m = sorted(found["masks"].keys() - found["images"].keys())
        raise ValueError(f"images and masks do not pair up by name: without mask {only_i}, without image {only_m}")
    if not found["images"]:
        raise ValueError(f"no images in {images_dir} (endings {list(IMAGE_ENDINGS)})")
    out = []
    for stem in sorted(found["images"]):
        image, mask_path = _read_rgb(found["images"][stem]), found["masks"][stem]
        target = decode_mask(_read_rgb(mask_path), threshold, boundary, str(mask_path))
        if target.shape != image.shape[:2]:
            raise ValueError(f"{mask_path}: mask {target.shape} and image {image.shape[:2]} differ in size")
        out.append(SegImage(stem, image, target))
    return out


def crop_grid(array: np.ndarray, size: int) -> np.ndarray:
    """Non-overlapping ``size x size`` crops in row-major order, ``[n, size, size, ...]`` (the remainder is dropped)."""
    h, w = array.shape[0] // size, array.shape[1] // size
    if h == 0 or w == 0:
        raise ValueError(f"crop size {size} exceeds the image size {array.shape[:2]}")
    trimmed = array[:h * size, :w * size]
    crops = trimmed.reshape(h, size, w, size, *array.shape[2:]).swapaxes(1, 2)
    return crops.reshape(h * w, size, size, *array.shape[2:])
