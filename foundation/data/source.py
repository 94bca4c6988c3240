"""The DALI external source: rank batch ``i`` -> global positions -> regions and every per-sample parameter.

One callable feeds the whole pipeline (one ``fn.external_source`` with ``num_outputs``). It is a pure function
of the batch number (plus the start position and the shard), so DALI may call it ahead (prefetch) or from
parallel worker processes, and a resumed or re-sharded run produces the same samples.

Per sample at global position ``g``: entry ``e`` of the global order; Generator ``sample_rng(seed, g, attempt)``
draws the region (magnification), the crop windows/flips/turns, the stain jitter and the photometric jitter, in
that order. A read that fails is retried with a weighted substitute entry (``GlobalOrder.replacement``) and the
next attempt's Generator; the number of failed attempts travels with the sample (``retries``) so the loader can
count them whatever process read it. iBOT masks depend on the batch (DINOv2 spreads mask ratios over it): they
come from a Generator seeded by the batch's first position.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from foundation.data.crops import CropConfig, Region, draw_crops, plan_region
from foundation.data.masking import ibot_masks
from foundation.data.reading import PathPlan, RawPieces, ReadError, SlideHandles, SlideInfo
from foundation.data.sampler import GlobalOrder, Shard, sample_rng
from stain.augment import sample_stain_params
from stain.dali_ops import PHOTOMETRIC_INPUTS, photometric_dali_args, stain_dali_args
from stain.photometric import PhotometricParams, sample_photometric_params

log = logging.getLogger(__name__)

_STREAM_MASK = 0x4D41534B  # "MASK"
_PLACEHOLDER_REGION = np.zeros((1, 1, 3), dtype=np.uint8)  # fed where a sample takes the other path
_PLACEHOLDER_JPEG = np.zeros(1, dtype=np.uint8)            # never decoded (the branch does not run for it)
_INDEX_COLUMNS = ("slide", "level", "x", "y", "size", "mpp")


def photometric_enabled(generic_cfg: Mapping[str, Any]) -> bool:
    """Whether any generic photometric op can fire (all probabilities 0: the ops are left out of the graph)."""
    probs = [float(generic_cfg["color_jitter_p"]), float(generic_cfg["grayscale_p"])]
    probs += [float(v) for v in generic_cfg["blur_p"].values()] + [float(v) for v in generic_cfg["solarize_p"].values()]
    return any(p > 0 for p in probs)


def crop_types(num_global: int, num_local: int) -> list[str]:
    """Photometric crop type per crop: DINOv2's first and second global recipes, then the local one."""
    return ["global1"] + ["global2"] * (num_global - 1) + ["local"] * num_local


@dataclass(frozen=True)
class SourceLayout:
    """What the source emits (and the pipeline consumes), in order."""

    num_global: int
    num_local: int
    plan: PathPlan
    photometric: bool
    masks: bool
    sample_ids: bool
    names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        names: list[str] = []
        if self.plan.graph in ("region", "mixed"):
            names.append("region")
        if self.plan.graph == "mixed":
            names.append("is_raw")
        if self.plan.graph in ("raw", "mixed"):
            pieces = range(self.plan.slots * self.plan.slots)
            names += [f"jpeg{p}" for p in pieces] + [f"anchor{p}" for p in pieces] + [f"shape{p}" for p in pieces]
        for c in range(self.num_global + self.num_local):
            names += [f"roi_start{c}", f"roi_end{c}", f"angle{c}", f"stain_m{c}", f"stain_t{c}"]
            if self.photometric:
                names += [f"{k}{c}" for k in PHOTOMETRIC_INPUTS]
        names += ["stain_id", "marker_id", "retries"]
        if self.masks:
            names.append("masks")
        if self.sample_ids:
            names.append("sample_id")
        object.__setattr__(self, "names", tuple(names))

    @property
    def num_crops(self) -> int:
        return self.num_global + self.num_local


@dataclass
class _Sample:
    position: int
    entry: int
    retries: int
    region: np.ndarray | None
    pieces: RawPieces | None
    crops: Any
    stain_m: np.ndarray
    stain_t: np.ndarray
    photometric: list[PhotometricParams]


class BatchSource:
    """``external_source`` callback producing one rank batch per call (``batch_info.iteration``)."""

    def __init__(self, tiles: Mapping[str, np.ndarray], slides: list[SlideInfo], kinds: list[str],
                 order: GlobalOrder, shard: Shard, start: int, layout: SourceLayout, crops: CropConfig,
                 augmentation: Mapping[str, Any], masking: Mapping[str, Any] | None, mask_grid: tuple[int, int],
                 reader: str, max_retries: int, max_open: int) -> None:
        missing = [c for c in _INDEX_COLUMNS if c not in tiles]
        if missing:
            raise ValueError(f"tile index lacks columns {missing} (has {sorted(tiles)})")
        self.tiles = {c: tiles[c] if isinstance(tiles[c], np.memmap) else np.asarray(tiles[c]) for c in _INDEX_COLUMNS}
        self.slides = slides
        self.kinds = kinds
        self.order = order
        self.shard = shard
        self.start = int(start)
        self.layout = layout
        self.crops = crops
        self.stain_cfg = augmentation["stain"]
        self.generic_cfg = augmentation["generic"]
        self.masking = masking
        self.mask_grid = mask_grid
        self.max_retries = int(max_retries)
        self.reader = reader
        self.max_open = int(max_open)
        self.handles = SlideHandles(slides, reader, self.max_open)
        self._types = crop_types(crops.global_count, crops.local_count)
        self._warned: set[int] = set()

    # -------------------------------------------------------------------------------------------- one sample

    def _entry_row(self, entry: int) -> dict[str, Any]:
        return {c: self.tiles[c][entry] for c in _INDEX_COLUMNS}

    def _read(self, slide: int, region: Region) -> tuple[np.ndarray | None, RawPieces | None]:
        if self.layout.plan.raw[slide]:
            pieces = self.handles.raw_pieces(slide, region, self.layout.plan.slots)
            if pieces is not None:
                return None, pieces
            if self.layout.plan.graph == "raw":
                raise ReadError(f"slide {self.slides[slide].slide_id!r}: region {region} does not fit the "
                                f"{self.layout.plan.slots}x{self.layout.plan.slots} raw-tile grid")
        return self.handles.read_region(slide, region), None

    def sample(self, position: int) -> _Sample:
        """Everything about the sample at ``position``; failed reads are replaced (up to ``max_retries``)."""
        entry = int(self.order.entries([position])[0])
        last_error: Exception | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                entry = self.order.replacement(position, attempt)
            rng = sample_rng(self.order.seed, position, attempt)
            row = self._entry_row(entry)
            slide = int(row["slide"])
            try:
                region = plan_region(row, self.slides[slide], self.crops, rng)
                pixels, pieces = self._read(slide, region)
            except ReadError as err:
                last_error = err
                # one warning per slide; every failure is still counted (``retries``) and reported by the loader
                level = logging.DEBUG if slide in self._warned else logging.WARNING
                self._warned.add(slide)
                log.log(level, "sample %d, attempt %d: %s; replacing it", position, attempt, err)
                continue
            crops = draw_crops(rng, region.side, region.side, self.crops)
            kind = self.kinds[slide]
            stain_m, stain_t = sample_stain_params([kind] * self.layout.num_crops, rng, self.stain_cfg)
            photometric = []
            if self.layout.photometric:
                for crop_type in dict.fromkeys(self._types):
                    photometric.append(sample_photometric_params(crop_type, self._types.count(crop_type), rng,
                                                                 self.generic_cfg))
            return _Sample(position, entry, attempt, pixels, pieces, crops, stain_m, stain_t, photometric)
        raise RuntimeError(f"sample {position}: {self.max_retries + 1} reads failed in a row (raise "
                           f"data.pipeline.max_read_retries or check the slides); last error: {last_error}")

    # -------------------------------------------------------------------------------------------- one batch

    def batch_positions(self, iteration: int) -> np.ndarray:
        return self.shard.positions(self.start, iteration)

    def __call__(self, batch_info: Any) -> tuple[Any, ...]:
        iteration = batch_info.iteration if hasattr(batch_info, "iteration") else int(batch_info)
        positions = self.batch_positions(iteration)
        samples = [self.sample(int(p)) for p in positions]
        out: dict[str, Any] = {}
        graph = self.layout.plan.graph
        if graph in ("region", "mixed"):
            out["region"] = [s.region if s.region is not None else _PLACEHOLDER_REGION for s in samples]
        if graph == "mixed":
            out["is_raw"] = np.array([s.pieces is not None for s in samples])
        if graph in ("raw", "mixed"):
            for p in range(self.layout.plan.slots**2):
                out[f"jpeg{p}"] = [s.pieces.jpegs[p] if s.pieces else _PLACEHOLDER_JPEG for s in samples]
                rects = np.stack([s.pieces.rects[p] if s.pieces else np.ones(4, np.int32) for s in samples])
                out[f"anchor{p}"] = np.ascontiguousarray(rects[:, :2])
                out[f"shape{p}"] = np.ascontiguousarray(rects[:, 2:])
        self._crop_outputs(samples, out)
        out["stain_id"] = np.array([self.slides[self.tiles["slide"][s.entry]].stain_id for s in samples], np.int64)
        out["marker_id"] = np.array([self.slides[self.tiles["slide"][s.entry]].marker_id for s in samples], np.int64)
        out["retries"] = np.array([s.retries for s in samples], np.int32)
        if self.layout.masks:
            rng = np.random.default_rng([_STREAM_MASK, self.order.seed, int(positions[0])])
            masks = ibot_masks(self.crops.global_count, len(samples), self.mask_grid, rng, self.masking).numpy()
            out["masks"] = np.ascontiguousarray(masks.transpose(1, 0, 2))  # DALI batches are sample-major
        if self.layout.sample_ids:
            out["sample_id"] = positions.copy()
        return tuple(out[name] for name in self.layout.names)

    def _crop_outputs(self, samples: list[_Sample], out: dict[str, Any]) -> None:
        stain_m = np.stack([s.stain_m for s in samples])  # [B, C, 3, 3]
        stain_t = np.stack([s.stain_t for s in samples])
        for c in range(self.layout.num_crops):
            out[f"roi_start{c}"] = np.stack([s.crops.roi_start[c] for s in samples])
            out[f"roi_end{c}"] = np.stack([s.crops.roi_end[c] for s in samples])
            out[f"angle{c}"] = np.array([s.crops.angle[c] for s in samples], np.float32)
            m, t = stain_dali_args(stain_m[:, c], stain_t[:, c])
            out[f"stain_m{c}"], out[f"stain_t{c}"] = np.stack(m), np.stack(t)
        if not self.layout.photometric:
            return
        groups = list(dict.fromkeys(self._types))
        for c, crop_type in enumerate(self._types):
            g, k = groups.index(crop_type), self._types[:c].count(crop_type)
            per_sample = [s.photometric[g] for s in samples]
            params = PhotometricParams(
                **{f: np.stack([getattr(p, f)[k] for p in per_sample]) for f in PhotometricParams.__dataclass_fields__
                   if f != "solarize_threshold"},
                solarize_threshold=per_sample[0].solarize_threshold,
            )
            for name, values in photometric_dali_args(params).items():
                out[f"{name}{c}"] = np.stack(values)

    def __getstate__(self) -> dict[str, Any]:
        """For spawned reader processes: open slide handles stay behind; memory-mapped index columns travel as
        their file names (re-mapped in the worker) instead of being copied."""
        state = dict(self.__dict__)
        state["handles"] = None
        state["tiles"] = {c: ("mmap", a.filename) if isinstance(a, np.memmap) and a.filename else ("array", a)
                          for c, a in self.tiles.items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state["tiles"] = {c: np.load(v, mmap_mode="r") if kind == "mmap" else v
                          for c, (kind, v) in state["tiles"].items()}
        state["handles"] = SlideHandles(state["slides"], state["reader"], state["max_open"])
        self.__dict__.update(state)

    def close(self) -> None:
        self.handles.close()
