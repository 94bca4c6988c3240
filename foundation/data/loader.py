"""The training loader: batch-contract dicts of torch tensors on the training device, prefetched, resumable.

Usage (the trainer)::

    loader = build_loader(cfg, index, rank, world_size, device_id=local_rank, patch_size=16,
                          keys=objective.required_batch_keys)
    loader.load_state_dict(checkpoint["data"])     # optional, before the first batch
    for step, batch in zip(range(steps), loader):  # infinite
        ...
    checkpoint["data"] = loader.state_dict()        # the global position consumed by all ranks

DALI prepares ``data.pipeline.prefetch`` batches ahead; the state counts only the batches handed to the trainer,
so a resume rebuilds the pipeline at exactly the next sample. On the GPU the crops are copied from DALI's device
buffers straight into the batch tensors on the trainer's current CUDA stream (no host round trip).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from nvidia.dali.plugin.pytorch import feed_ndarray
from nvidia.dali.plugin.pytorch.torch_utils import to_torch_type

from foundation.config import AUTO, to_dict
from foundation.data.crops import CropConfig
from foundation.data.pipeline import DEVICES, build_pipeline, output_names
from foundation.data.reading import SlideHandles, SlideInfo, plan_paths
from foundation.data.sampler import Shard, ShardedSampler, build_order
from foundation.data.source import BatchSource, SourceLayout, photometric_enabled
from stain.vocabulary import StainVocabulary

log = logging.getLogger(__name__)

CONTRACT_KEYS = ("global_crops", "local_crops", "masks", "stain_ids", "marker_ids")
AUTO_MAX_READERS = 8  # reader processes per rank that `reader_workers: auto` starts at most on the GPU path


def reader_workers(value: int | str, device: str, cpus: int | None = None, ranks_per_node: int | None = None) -> int:
    """``data.pipeline.reader_workers``: a count, or ``auto``: none on the CPU path (DALI's own threads use the
    cores), on the GPU path half of this rank's share of the node's cores, 1 to :data:`AUTO_MAX_READERS`.

    In-process reading on a GPU competes with the training step for the interpreter (one H100, MAE+iBOT
    ``vit_test``: 0 readers 535 img/s with 51 % of the time waiting for data, 4 readers 729 img/s with 8 %).
    """
    if value != AUTO:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"data.pipeline.reader_workers={value!r} must be auto or a count >= 0")
        return value
    if device != "gpu":
        return 0
    cpus = cpus or len(os.sched_getaffinity(0))
    ranks = ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(AUTO_MAX_READERS, cpus // max(ranks, 1) // 2))


class DaliLoader:
    """Infinite iterator over one rank's batches; ``state_dict``/``load_state_dict`` resume at the next sample."""

    def __init__(self, make_source: Callable[[int], BatchSource], layout: SourceLayout, crops: CropConfig,
                 sampler: ShardedSampler, pipeline_args: dict[str, Any], device: str, device_id: int | None) -> None:
        self.make_source = make_source
        self.layout = layout
        self.crops = crops
        self.sampler = sampler
        self.pipeline_args = pipeline_args
        self.device = device
        self.device_id = device_id
        self.torch_device = torch.device("cuda", device_id) if device == "gpu" else torch.device("cpu")
        self.failed_reads = 0
        self._pipe = None
        self._source: BatchSource | None = None
        self._names = output_names(layout)

    @property
    def batch_size(self) -> int:
        return self.sampler.shard.batch_size

    def _start(self) -> None:
        self._source = self.make_source(self.sampler.position)
        self._pipe = build_pipeline(self._source, self.crops, device=self.device, device_id=self.device_id,
                                    **self.pipeline_args)
        self._pipe.schedule_run()  # the first call fills the prefetch queue

    def _stop(self) -> None:
        if self._pipe is not None:
            del self._pipe
            self._pipe = None
        if self._source is not None:
            self._source.close()
            self._source = None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def _to_torch(self, tensor_list: Any, out: torch.Tensor | None = None) -> torch.Tensor:
        tensor = tensor_list.as_tensor()
        if out is None:
            out = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device=self.torch_device)
        stream = torch.cuda.current_stream(self.torch_device) if self.device == "gpu" else None
        feed_ndarray(tensor, out, cuda_stream=stream)
        return out

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._pipe is None:
            self._start()
        outputs = dict(zip(self._names, self._pipe.share_outputs(), strict=True))
        b, g, n_local = self.batch_size, self.layout.num_global, self.layout.num_local
        gs, ls = self.crops.global_size, self.crops.local_size
        batch: dict[str, torch.Tensor] = {
            "global_crops": torch.empty((g, b, 3, gs, gs), dtype=torch.float32, device=self.torch_device),
            "local_crops": torch.empty((n_local, b, 3, ls, ls), dtype=torch.float32, device=self.torch_device),
        }
        for c in range(g + n_local):
            target = batch["global_crops"][c] if c < g else batch["local_crops"][c - g]
            self._to_torch(outputs[f"crop{c}"], target)
        batch["stain_ids"] = self._to_torch(outputs["stain_id"])
        batch["marker_ids"] = self._to_torch(outputs["marker_id"])
        retries = self._to_torch(outputs["retries"])
        if self.layout.masks:
            batch["masks"] = self._to_torch(outputs["masks"]).transpose(0, 1).contiguous()  # [G, B, N]
        if self.layout.sample_ids:
            batch["sample_ids"] = self._to_torch(outputs["sample_id"])
        self._pipe.release_outputs()
        self._pipe.schedule_run()
        self.sampler.advance()
        self.failed_reads += int(retries.sum())
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The sampler state (global position after the batches handed out so far) and the failure count."""
        return {"sampler": self.sampler.state_dict(), "failed_reads": self.failed_reads}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next batch is the one that followed when ``state`` was saved (any world size)."""
        self.sampler.load_state_dict(state["sampler"])
        self.failed_reads = int(state.get("failed_reads", 0))
        self._stop()

    def close(self) -> None:
        self._stop()


def patch_size_of(arch: str) -> int | None:
    """The patch size in a timm architecture name (``vit_small_patch16_224`` -> 16), or ``None``."""
    match = re.search(r"patch(\d+)", arch)
    return int(match.group(1)) if match else None


def build_loader(cfg: Any, index: Any, rank: int = 0, world_size: int = 1, device: str | None = None,
                 device_id: int | None = None, patch_size: int | None = None,
                 keys: Sequence[str] = CONTRACT_KEYS) -> DaliLoader:
    """The loader of one rank over a :class:`~foundation.slides.index.TileIndex`.

    ``device`` defaults to ``data.pipeline.device``; ``device_id`` is this rank's CUDA device on the GPU path.
    ``keys`` are the batch keys the objective reads: masks are built only when ``"masks"`` is among them, over
    the patch grid of ``patch_size`` (default: parsed from ``model.arch``).
    """
    data = cfg.data
    pcfg = data.pipeline
    for key, least in (("batch_size", 1), ("threads", 1), ("prefetch", 1), ("max_read_retries", 0),
                       ("max_open_slides", 1)):
        if int(pcfg[key]) < least:
            raise ValueError(f"data.pipeline.{key}={pcfg[key]} must be >= {least}")
    device = device or str(pcfg.device)
    if device not in DEVICES:
        raise ValueError(f"data.pipeline.device={device!r}; choose one of {DEVICES}")
    if device == "gpu" and device_id is None:
        device_id = torch.cuda.current_device()
    readers = reader_workers(pcfg.reader_workers, device)
    crops = CropConfig.from_config(data.crops)
    vocab = StainVocabulary.from_config(cfg.get("stain"))
    slides = [SlideInfo.from_record(r) for r in index.slides]
    kinds = [vocab.stain_kind(s.stain_id) for s in slides]
    order = build_order(index, cfg)
    sampler = ShardedSampler(order, Shard(rank, world_size, int(pcfg.batch_size)))

    planner = SlideHandles(slides, str(cfg.slides.reader))
    try:
        plan = plan_paths(planner, index.tiles["size"], index.tiles["slide"], device, str(pcfg.raw_tiles),
                          crops.magnification)
    finally:
        planner.close()
    log.info("data path: %d of %d slides on the raw-tile path, graph %s", int(plan.raw.sum()), len(slides),
             plan.graph)

    masks = "masks" in keys
    grid = (0, 0)
    if masks:
        patch = patch_size or patch_size_of(str(cfg.model.get("arch", "")))
        if not patch or crops.global_size % patch:
            raise ValueError(f"masks need a patch size dividing data.crops.global_size={crops.global_size}; "
                             f"got {patch} (pass patch_size or use a model.arch naming patchNN)")
        grid = (crops.global_size // patch, crops.global_size // patch)
    # plain containers: OmegaConf lookups in the per-sample parameter draws cost more than the draws themselves
    augmentation = to_dict(data.augmentation)
    masking = to_dict(data.masking)
    layout = SourceLayout(num_global=crops.global_count, num_local=crops.local_count, plan=plan,
                          photometric=photometric_enabled(augmentation["generic"]), masks=masks,
                          sample_ids=bool(pcfg.sample_ids) or "sample_ids" in keys)
    shard = sampler.shard

    def make_source(start: int) -> BatchSource:
        return BatchSource(index.tiles, slides, kinds, order, shard, start, layout, crops, augmentation,
                           masking, grid, str(cfg.slides.reader), int(pcfg.max_read_retries),
                           int(pcfg.max_open_slides))

    pipeline_args = {
        "solarize_threshold": float(augmentation["generic"]["solarize_threshold"]),
        "batch_size": shard.batch_size, "threads": int(pcfg.threads), "prefetch": int(pcfg.prefetch),
        "exec_dynamic": bool(pcfg.exec_dynamic), "reader_workers": readers,
        "reader_start": str(pcfg.reader_start),
    }
    return DaliLoader(make_source, layout, crops, sampler, pipeline_args, device, device_id)
