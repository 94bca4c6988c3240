"""Tiles sampled from an indexed slide set (a ``foundation index`` folder) for ``foundation embed``.

``count`` index rows are drawn without replacement by a seeded generator (all rows when the index has fewer)
and read in index order (slide by slide). A tile is ``read_region((x, y), level, (size, size))`` as in the
index, resized (bicubic) to the encoder's input side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from foundation.slides.index import TileIndex
from foundation.slides.readers import SlideReader, open_slide


def sample_rows(total: int, count: int, seed: int) -> np.ndarray:
    """``min(count, total)`` distinct row numbers in ``0..total-1``, sorted."""
    if total == 0:
        raise ValueError("the tile index holds no tiles")
    if count <= 0:
        raise ValueError(f"eval.embed.slide_tiles must be positive, got {count}")
    if count >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))


class IndexedTiles(torch.utils.data.Dataset):
    """The sampled tiles as ``[3, size, size]`` uint8 tensors; slides are opened once per worker process."""

    def __init__(self, index_dir: str | Path, count: int, seed: int, size: int, reader: str,
                 labels: bool = False) -> None:
        index = TileIndex.load(index_dir)
        self.rows = sample_rows(len(index), count, seed)
        self.columns = {name: np.asarray(index.tiles[name][self.rows]) for name in ("slide", "level", "x", "y",
                                                                                     "size", "mpp")}
        used = np.unique(self.columns["slide"])
        records = {int(s): index.slides[int(s)] for s in used}
        self.slide_paths = {s: r.path for s, r in records.items()}
        self.slide_mpp = {s: r.mpp for s, r in records.items()}
        self.slide_ids = {s: r.slide_id for s, r in records.items()}
        self.groups = {s: r.group for s, r in records.items()}
        self.stain_labels = {s: (r.stain_id, r.marker_id) for s, r in records.items()}
        self.size = size
        self.reader = reader
        self.labels = labels  # also yield each tile's (stain id, marker id) from the index
        self._open: dict[int, SlideReader] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def _slide(self, slide: int) -> SlideReader:
        if slide not in self._open:
            self._open[slide] = open_slide(self.slide_paths[slide], self.reader, mpp=self.slide_mpp[slide])
        return self._open[slide]

    def __getitem__(self, i: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        c = {name: column[i].item() for name, column in self.columns.items()}
        region = self._slide(c["slide"]).read_region((c["x"], c["y"]), c["level"], (c["size"], c["size"]))
        image = Image.fromarray(region)
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.Resampling.BICUBIC)
        tile = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        return (tile, torch.tensor(self.stain_labels[c["slide"]])) if self.labels else tile

    def names(self) -> list[str]:
        """``<slide_id>@x,y,level`` per tile, in order."""
        c = self.columns
        return [f"{self.slide_ids[int(s)]}@{x},{y},{lv}" for s, x, y, lv in zip(c["slide"], c["x"], c["y"],
                                                                                  c["level"], strict=True)]

    def arrays(self) -> dict[str, Any]:
        """Per-tile columns for the output file: index row, slide id, manifest group, level-0 x/y, level, target
        µm/px, stain ids."""
        c = self.columns
        return {
            "index_row": self.rows.astype(np.int64),
            "slide_id": np.array([self.slide_ids[int(s)] for s in c["slide"]]),
            "group": np.array([self.groups[int(s)] for s in c["slide"]]),
            "x": c["x"].astype(np.int64), "y": c["y"].astype(np.int64), "level": c["level"].astype(np.int64),
            "mpp": c["mpp"].astype(np.float32),
            "stain_id": np.array([self.stain_labels[int(s)][0] for s in c["slide"]], dtype=np.int64),
            "marker_id": np.array([self.stain_labels[int(s)][1] for s in c["slide"]], dtype=np.int64),
        }
