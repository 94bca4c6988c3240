"""The DALI external source: rank batch ``i`` -> global positions -> regions and every per-sample parameter.

One callable feeds the whole pipeline (one ``fn.external_source`` with ``num_outputs``). It is a pure function
of the batch number (plus the start position and the shard), so DALI may call it ahead (prefetch) or from
parallel worker processes, and a resumed or re-sharded run produces the same samples.

Per sample at global position ``g``: entry ``e`` of the global order; Generator ``sample_rng(seed, g, attempt)``
draws the region (magnification), the crop windows/flips/turns, the stain jitter and the photometric jitter, in
that order. A read that fails is retried with a weighted substitute entry (``GlobalOrder.replacement``) and the
next attempt's Generator; the number of failed attempts travels with the sample (``retries``) so the loader can
count them whatever process read it. Per sample only the Generator, the read and the raw uniforms are handled in
Python; the parameters are computed from the stored uniforms once per batch (element by element, so bit for bit
what the per-sample functions ``draw_crops``, ``sample_stain_params`` and ``sample_photometric_params`` give; a
test pins this). iBOT masks depend on the batch (DINOv2 spreads mask ratios over it): they
come from a Generator seeded by the batch's first position.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from foundation.data.crops import CropConfig, Region, crop_uniform_count, crops_from_draws, plan_region
from foundation.data.masking import ibot_masks
from foundation.data.reading import PathPlan, RawPieces, ReadError, SlideHandles, SlideInfo
from foundation.data.sampler import GlobalOrder, Shard, sample_rng
from stain.augment import STAIN_DRAWS_PER_CROP, StainPolicy
from stain.dali_ops import PHOTOMETRIC_INPUTS, photometric_dali_args, stain_dali_args
from stain.photometric import PHOTOMETRIC_DRAWS_PER_CROP, PhotometricPolicy

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
class _Draws:
    """What the per-sample loop of one batch collects; row ``b`` is the sample at the batch's ``b``-th position.

    The uniforms are stored as drawn, so the parameters are computed once for the whole batch afterwards.
    """

    entries: np.ndarray                # [B] int64: the entry read (a substitute after failed reads)
    slides: np.ndarray                 # [B] int64
    retries: np.ndarray                # [B] int32: failed attempts before it
    sides: np.ndarray                  # [B] int64: region side in pixels
    regions: list[np.ndarray | None]   # decoded region (region path)
    pieces: list[RawPieces | None]     # compressed pieces (raw-tile path)
    crop_u: np.ndarray                 # [B, crop_uniform_count]: windows, then flips
    turns: np.ndarray                  # [B, C] int64 quarter turns
    jitter_u: np.ndarray               # [B, 7 C (+ 9 C)]: stain, then photometric uniforms

    @classmethod
    def empty(cls, batch: int, crops: CropConfig, photometric: bool) -> _Draws:
        jitter = STAIN_DRAWS_PER_CROP + (PHOTOMETRIC_DRAWS_PER_CROP if photometric else 0)
        return cls(entries=np.zeros(batch, np.int64), slides=np.zeros(batch, np.int64),
                   retries=np.zeros(batch, np.int32), sides=np.zeros(batch, np.int64), regions=[None] * batch,
                   pieces=[None] * batch, crop_u=np.empty((batch, crop_uniform_count(crops))),
                   turns=np.zeros((batch, crops.num_crops), np.int64),
                   jitter_u=np.empty((batch, jitter * crops.num_crops)))


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
        # validated once here instead of on every sample
        self._stain = StainPolicy(self.stain_cfg, kinds)
        self._stain_of_slide = self._stain.ids(kinds)
        self._photometric = PhotometricPolicy(self.generic_cfg, self._types) if layout.photometric else None
        self._stain_ids = np.array([s.stain_id for s in slides], np.int64)
        self._marker_ids = np.array([s.marker_id for s in slides], np.int64)

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

    def _sample(self, draws: _Draws, b: int, position: int, row: dict[str, Any]) -> None:
        """Read the sample at ``position`` (index ``row`` of its entry) and store its draws as row ``b``.

        A failed read is replaced (up to ``max_retries``). Draw order per Generator: region, crop windows and
        flips, quarter turns, stain, photometric.
        """
        entry = int(draws.entries[b])
        last_error: Exception | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                entry = self.order.replacement(position, attempt)
                row = self._entry_row(entry)
            rng = sample_rng(self.order.seed, position, attempt)
            slide = int(row["slide"])
            try:
                region = plan_region(row, self.slides[slide], self.crops, rng)
                draws.regions[b], draws.pieces[b] = self._read(slide, region)
            except ReadError as err:
                last_error = err
                # one warning per slide; every failure is still counted (``retries``) and reported by the loader
                level = logging.DEBUG if slide in self._warned else logging.WARNING
                self._warned.add(slide)
                log.log(level, "sample %d, attempt %d: %s; replacing it", position, attempt, err)
                continue
            draws.entries[b], draws.slides[b], draws.retries[b], draws.sides[b] = entry, slide, attempt, region.side
            rng.random(out=draws.crop_u[b])
            if self.crops.rot90:
                draws.turns[b] = rng.integers(0, 4, size=self.crops.num_crops)
            rng.random(out=draws.jitter_u[b])
            return
        raise RuntimeError(f"sample {position}: {self.max_retries + 1} reads failed in a row (raise "
                           f"data.pipeline.max_read_retries or check the slides); last error: {last_error}")

    # -------------------------------------------------------------------------------------------- one batch

    def batch_positions(self, iteration: int) -> np.ndarray:
        return self.shard.positions(self.start, iteration)

    def draw(self, positions: np.ndarray) -> _Draws:
        """Read every sample of a batch and collect its draws."""
        draws = _Draws.empty(len(positions), self.crops, self.layout.photometric)
        draws.entries[:] = self.order.entries(positions)
        columns = [self.tiles[c][draws.entries].tolist() for c in _INDEX_COLUMNS]
        for b, (position, *values) in enumerate(zip(positions.tolist(), *columns, strict=True)):
            self._sample(draws, b, position, dict(zip(_INDEX_COLUMNS, values, strict=True)))
        return draws

    def __call__(self, batch_info: Any) -> tuple[Any, ...]:
        iteration = batch_info.iteration if hasattr(batch_info, "iteration") else int(batch_info)
        positions = self.batch_positions(iteration)
        draws = self.draw(positions)
        out: dict[str, Any] = {}
        graph = self.layout.plan.graph
        if graph in ("region", "mixed"):
            out["region"] = [r if r is not None else _PLACEHOLDER_REGION for r in draws.regions]
        if graph == "mixed":
            out["is_raw"] = np.array([p is not None for p in draws.pieces])
        if graph in ("raw", "mixed"):
            self._piece_outputs(draws.pieces, out)
        self._crop_outputs(draws, out)
        out["stain_id"] = self._stain_ids[draws.slides]
        out["marker_id"] = self._marker_ids[draws.slides]
        out["retries"] = draws.retries
        if self.layout.masks:
            rng = np.random.default_rng([_STREAM_MASK, self.order.seed, int(positions[0])])
            masks = ibot_masks(self.crops.global_count, len(positions), self.mask_grid, rng, self.masking).numpy()
            out["masks"] = np.ascontiguousarray(masks.transpose(1, 0, 2))  # DALI batches are sample-major
        if self.layout.sample_ids:
            out["sample_id"] = positions.copy()
        return tuple(out[name] for name in self.layout.names)

    def _piece_outputs(self, pieces: list[RawPieces | None], out: dict[str, Any]) -> None:
        slots = self.layout.plan.slots**2
        rects = np.ones((len(pieces), slots, 4), np.int32)  # placeholder rectangle where a sample has no pieces
        for b, piece in enumerate(pieces):
            if piece is not None:
                rects[b] = piece.rects
        for p in range(slots):
            out[f"jpeg{p}"] = [s.jpegs[p] if s else _PLACEHOLDER_JPEG for s in pieces]
            out[f"anchor{p}"] = np.ascontiguousarray(rects[:, p, :2])
            out[f"shape{p}"] = np.ascontiguousarray(rects[:, p, 2:])

    def _crop_outputs(self, draws: _Draws, out: dict[str, Any]) -> None:
        """Per-crop outputs from the batch's draws, each computed once for the batch (crop-major)."""
        batch, n = len(draws.sides), self.layout.num_crops
        crops = crops_from_draws(draws.crop_u, draws.turns, draws.sides, draws.sides, self.crops)
        roi_start = np.ascontiguousarray(crops.roi_start.transpose(1, 0, 2))  # [C, B, 2]
        roi_end = np.ascontiguousarray(crops.roi_end.transpose(1, 0, 2))
        angle = np.ascontiguousarray(crops.angle.T)
        stain_u = draws.jitter_u[:, :STAIN_DRAWS_PER_CROP * n].reshape(batch * n, STAIN_DRAWS_PER_CROP)
        m, t = self._stain.transforms(np.repeat(self._stain_of_slide[draws.slides], n), stain_u)
        # crop-major: [C, B, ...], each [c] one C-contiguous batch
        stain_m, stain_t = stain_dali_args(m.reshape(batch, n, 3, 3).transpose(1, 0, 2, 3),
                                           t.reshape(batch, n, 3).transpose(1, 0, 2))
        for c in range(n):
            out[f"roi_start{c}"], out[f"roi_end{c}"], out[f"angle{c}"] = roi_start[c], roi_end[c], angle[c]
            out[f"stain_m{c}"], out[f"stain_t{c}"] = stain_m[c], stain_t[c]
        if self._photometric is None:
            return
        photometric_u = draws.jitter_u[:, STAIN_DRAWS_PER_CROP * n:].reshape(batch, n, PHOTOMETRIC_DRAWS_PER_CROP)
        for c, crop_type in enumerate(self._types):
            # one crop across the batch at a time: the colour matrices are computed over exactly the arrays they
            # were computed over per crop before (the same shapes give the same bits)
            params = self._photometric.params(crop_type, photometric_u[:, c])
            for name, values in photometric_dali_args(params).items():
                out[f"{name}{c}"] = values

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
