"""Tile folders: finding the tiles, their class labels and sources, and decoding them to encoder-sized uint8.

A folder is either **class-per-folder** (every tile lies under a first-level subfolder, whose name is the
class; deeper subfolders are searched too) or **flat** (every tile directly in it: unlabelled). A folder
mixing tiles at its top level with class folders is rejected: it is ambiguous which tiles are labelled.
``labelled=False`` reads any layout as unlabelled tiles.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


@dataclass(frozen=True)
class TileSet:
    """The tiles of one folder: sorted paths, class ids (``None`` when unlabelled) and class names."""

    root: Path
    paths: tuple[Path, ...]
    labels: np.ndarray | None
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def relative_names(self) -> list[str]:
        return [p.relative_to(self.root).as_posix() for p in self.paths]


def scan_tiles(root: str | Path, extensions: Sequence[str], labelled: bool | None = None) -> TileSet:
    """Tiles under ``root`` (recursive, sorted); ``labelled=True`` requires class folders, ``False`` ignores them."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"tile folder {root} does not exist or is not a folder")
    endings = tuple(e.lower() for e in extensions)
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(endings))
    if not paths:
        raise ValueError(f"no tiles in {root} (looked for files ending in {list(endings)}, recursively)")
    top_level = [p for p in paths if p.parent == root]
    if labelled is False:
        return TileSet(root, tuple(paths), None, ())
    if top_level and labelled:
        raise ValueError(f"{root}: class-per-folder tiles expected, but {top_level[0].name} lies at the top level")
    if top_level and len(top_level) != len(paths):
        nested = next(p for p in paths if p.parent != root)
        raise ValueError(f"{root} mixes tiles at its top level ({top_level[0].name}) with tiles in subfolders "
                         f"({nested.relative_to(root)}): put every tile in a class folder, or none")
    if top_level:
        return TileSet(root, tuple(paths), None, ())
    classes = [p.relative_to(root).parts[0] for p in paths]
    class_names = tuple(sorted(set(classes)))
    lookup = {name: i for i, name in enumerate(class_names)}
    labels = np.array([lookup[c] for c in classes], dtype=np.int64)
    return TileSet(root, tuple(paths), labels, class_names)


def source_ids(names: Sequence[str], pattern: str | None) -> np.ndarray:
    """Source id of each tile: the first group of ``pattern`` (``re.search`` on the file name, without folders);
    with ``pattern`` ``None``, the name as given (each tile its own source). A file name the pattern does not
    match raises ``ValueError`` naming both."""
    if pattern is None:
        return np.array(list(names), dtype=object)
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"group-by regex {pattern!r} is invalid: {err}") from err
    if regex.groups < 1:
        raise ValueError(f"group-by regex {pattern!r} has no group: its first group must capture the source id")
    out = []
    for name in names:
        match = regex.search(Path(name).name)
        if match is None or match.group(1) is None:
            raise ValueError(f"group-by regex {pattern!r} does not match the file name {Path(name).name!r} "
                             f"(of {name})")
        out.append(match.group(1))
    return np.array(out, dtype=object)


def fit_square(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bicubic, antialiased) and crop the centre square."""
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_tile(path: str | Path, size: int) -> np.ndarray:
    """``[size, size, 3]`` uint8 RGB of an image file, fitted by :func:`fit_square`."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"cannot read tile {path}: {err}") from err
    return np.array(fit_square(rgb, size), dtype=np.uint8)


class TileDataset(torch.utils.data.Dataset):
    """Tiles as ``[3, size, size]`` uint8 tensors (normalisation happens on the device, per encoder)."""

    def __init__(self, paths: Sequence[Path], size: int) -> None:
        self.paths = list(paths)
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(load_tile(self.paths[i], self.size)).permute(2, 0, 1).contiguous()
