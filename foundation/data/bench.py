"""``foundation bench data``: crops/s of our DALI data chain against the loader a user would write, same crops.

Both sides serve the same samples (the same global order over the same tile index) and make the same views:
``data.crops`` global and local crops with flips and quarter turns, a per-crop HED jitter (``hed_light``:
Tellez et al.) and normalisation, plus iBOT masks in the collate. The generic DINOv2 photometric ops are off on
both sides unless ``--photometric``. The baseline is a ``torch.utils.data.DataLoader`` with ``--workers`` worker
processes: OpenSlide ``read_region``, PIL, torchvision ``RandomResizedCrop``/flips/rotations, scikit-image
``rgb2hed``/``hed2rgb`` per crop. Ours runs the DALI pipeline with ``--workers`` threads. Rounds alternate between
the two (a shared machine only ever slows a run down, so each side reports its best round).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from foundation.config import to_dict
from foundation.shared_data import DATA_ENV, shared_data_dir

log = logging.getLogger(__name__)

#: the real slides the bench indexes (path under the data folder, stain, marker, mpp override), by --slides choice.
#: "jpeg": the JPEG-tiled SVS/TIFFs (what scanners mostly write); "all" adds the JPEG 2000 SVS, whose decode
#: (OpenJPEG on both sides) dominates every sample it is in.
BENCH_SLIDES = {
    "jpeg": (
        ("wsi/aperio_svs/CMU-1-Small-Region.svs", "H&E", "", ""),
        ("wsi/derived/CMU-1-Small-Region_pyramid.ome.tif", "H&E", "", ""),
        ("wsi/derived/DeepLIIF_ROI_1_Ki67_IHC_pyramid.tif", "IHC", "Ki67", "0.25"),
    ),
}
BENCH_SLIDES["all"] = (*BENCH_SLIDES["jpeg"], ("wsi/aperio_svs/TCGA-CR-7395-01A-01-TS1.svs", "H&E", "", "0.5"))
PHOTOMETRIC_OFF = (
    "data.augmentation.generic.color_jitter_p=0", "data.augmentation.generic.grayscale_p=0",
    "data.augmentation.generic.blur_p={global1: 0, global2: 0, local: 0}",
    "data.augmentation.generic.solarize_p={global1: 0, global2: 0, local: 0}",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", type=Path, help="an existing tile index (default: index the real test slides)")
    parser.add_argument("--data", type=Path, help=f"shared data folder (default ${DATA_ENV}, else ../shared/data)")
    parser.add_argument("--slides", choices=sorted(BENCH_SLIDES), default="jpeg", help="which real slides to index")
    parser.add_argument("--batch-size", type=int, help="samples per batch (data.pipeline.batch_size)")
    parser.add_argument("--workers", type=int, help="DALI threads and DataLoader workers (data.pipeline.threads)")
    parser.add_argument("--batches", type=int, default=12, help="timed batches per round and side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches before each timed round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (ours, baseline, ours, ...)")
    parser.add_argument("--photometric", action="store_true", help="add the DINOv2 colour/blur/solarize ops to both")
    parser.add_argument("--device", choices=("cpu", "gpu"), help="our pipeline's device (data.pipeline.device)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_data.json"), help="JSON result file")
    parser.add_argument("--config", dest="preset", help="preset name in configs/experiments or a YAML path")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def _data_dir(arg: Path | None) -> Path:
    return arg if arg is not None else shared_data_dir()


def _index_real_slides(data_dir: Path, out: Path, cfg: Any, which: str) -> Path:
    from foundation.cli import main as cli_main

    slides = BENCH_SLIDES[which]
    manifest = out / "manifest.csv"
    missing = [p for p, *_ in slides if not (data_dir / p).is_file()]
    if missing:
        raise FileNotFoundError(f"bench slides not found under {data_dir}: {missing} (pass --data or --index)")
    lines = ["path,stain,marker,group,mpp"] + [f"{data_dir / p},{s},{m},bench,{mpp}" for p, s, m, mpp in slides]
    manifest.write_text("\n".join(lines) + "\n")
    mpps = [str(m) for m in cfg.index.mpp]
    index_dir = out / "index"
    if cli_main(["index", str(manifest), "--out", str(index_dir), "--workers", "1", "--mpp", *mpps]) != 0:
        raise RuntimeError(f"indexing the bench slides failed (see {index_dir}/errors.csv)")
    return index_dir


# ------------------------------------------------------------------------------------------------ the baseline


class _BaselineDataset:
    """What a user writes: OpenSlide + PIL + torchvision transforms + scikit-image HED jitter, per sample."""

    def __init__(self, index: Any, order: Any, cfg: Any, photometric: bool) -> None:
        self.paths = [s.path for s in index.slides]
        self.tiles = {k: np.asarray(index.tiles[k]) for k in ("slide", "level", "x", "y", "size")}
        self.order = order
        # plain values: OmegaConf lookups per crop would slow the baseline down artificially
        self.crops = to_dict(cfg.data.crops)
        self.sigma = float(cfg.data.augmentation.stain.policies.hed_light.sigma)
        self.generic = to_dict(cfg.data.augmentation.generic)
        self.mean = np.asarray(self.crops["mean"], np.float32)
        self.std = np.asarray(self.crops["std"], np.float32)
        self.photometric = photometric
        self._slides: dict[int, Any] = {}
        self._transforms: list[Any] | None = None

    def _build_transforms(self) -> list[Any]:
        from torchvision.transforms import v2

        c = self.crops
        g = self.generic

        def view(size: int, scale: list[float], recipe: str) -> Any:
            steps = [v2.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(c["ratio"]), antialias=True),
                     v2.RandomHorizontalFlip(c["hflip_p"]), v2.RandomVerticalFlip(c["vflip_p"])]
            if c["rot90"]:
                steps.append(v2.RandomChoice([v2.RandomRotation((a, a)) for a in (0, 90, 180, 270)]))
            if self.photometric:
                jitter = v2.ColorJitter(g["brightness"], g["contrast"], g["saturation"], g["hue"])
                blur = v2.GaussianBlur(g["blur_window"], tuple(g["blur_sigma"]))
                steps += [v2.RandomApply([jitter], p=g["color_jitter_p"]), v2.RandomGrayscale(g["grayscale_p"]),
                          v2.RandomApply([blur], p=g["blur_p"][recipe]),
                          v2.RandomSolarize(g["solarize_threshold"], p=g["solarize_p"][recipe])]
            return v2.Compose(steps)

        views = [view(c["global_size"], c["global_scale"], "global1" if i == 0 else "global2")
                 for i in range(c["global_count"])]
        return views + [view(c["local_size"], c["local_scale"], "local")] * c["local_count"]

    def _hed_normalise(self, image: Any) -> Any:
        import torch
        from skimage.color import hed2rgb, rgb2hed

        rng = np.random.default_rng()
        hed = rgb2hed(np.asarray(image))
        hed = hed * rng.uniform(1 - self.sigma, 1 + self.sigma, 3) + rng.uniform(-self.sigma, self.sigma, 3)
        rgb = np.clip(hed2rgb(hed), 0, 1).astype(np.float32)
        return torch.from_numpy(((rgb - self.mean) / self.std).transpose(2, 0, 1).copy())

    def __len__(self) -> int:
        return np.iinfo(np.int64).max

    def __getitem__(self, position: int) -> tuple[list[Any], int]:
        import openslide

        if self._transforms is None:
            self._transforms = self._build_transforms()
        entry = int(self.order.entries([position])[0])
        slide = int(self.tiles["slide"][entry])
        if slide not in self._slides:
            self._slides[slide] = openslide.OpenSlide(self.paths[slide])
        size = int(self.tiles["size"][entry])
        region = self._slides[slide].read_region((int(self.tiles["x"][entry]), int(self.tiles["y"][entry])),
                                                 int(self.tiles["level"][entry]), (size, size)).convert("RGB")
        return [self._hed_normalise(t(region)) for t in self._transforms], slide


def _baseline_batches(index: Any, order: Any, cfg: Any, batch_size: int, workers: int, photometric: bool,
                      grid: tuple[int, int]) -> Iterator[Any]:
    import torch

    from foundation.data.masking import ibot_masks

    g = int(cfg.data.crops.global_count)
    masking = cfg.data.masking

    def collate(items: list[tuple[list[Any], int]]) -> dict[str, Any]:
        views = list(zip(*[crops for crops, _ in items], strict=True))
        return {"global_crops": torch.stack([torch.stack(v) for v in views[:g]]),
                "local_crops": torch.stack([torch.stack(v) for v in views[g:]]) if len(views) > g else None,
                "masks": ibot_masks(g, len(items), grid, np.random.default_rng(), masking)}

    dataset = _BaselineDataset(index, order, cfg, photometric)
    sampler = range(np.iinfo(np.int64).max)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                         collate_fn=collate)
    return iter(loader)


# ------------------------------------------------------------------------------------------------- timing


def per_sample_counts(crops: Any) -> dict[str, float]:
    """Crops per sample: all, global, and global-crop equivalents (local crops weighted by their pixel share)."""
    g, n_local = int(crops.global_count), int(crops.local_count)
    return {"crops": g + n_local, "global_crops": g,
            "global_crop_equivalents": round(g + n_local * (int(crops.local_size) / int(crops.global_size)) ** 2, 4)}


def _time(batches: Iterator[Any], warmup: int, timed: int, batch_size: int,
          per_sample: Mapping[str, float]) -> dict[str, float]:
    for _ in range(warmup):
        next(batches)
    start = time.perf_counter()
    for _ in range(timed):
        next(batches)
    seconds = time.perf_counter() - start
    samples = timed * batch_size
    return {"seconds": round(seconds, 3), "samples": samples, "samples_per_s": round(samples / seconds, 2),
            **{f"{kind}_per_s": round(samples * count / seconds, 1) for kind, count in per_sample.items()}}


def _best(rounds: list[dict[str, float]]) -> dict[str, Any]:
    best = max(rounds, key=lambda r: r["samples_per_s"])
    return {**best, "rounds": rounds}


def run_bench(cfg: Any, index: Any, batches: int, warmup: int, rounds: int, photometric: bool,
              device: str) -> dict[str, Any]:
    """Time both loaders; returns the result dictionary (also what ``--out`` receives)."""
    import torch

    from foundation.data.loader import build_loader

    pcfg = cfg.data.pipeline
    batch_size, workers = int(pcfg.batch_size), int(pcfg.threads)
    per_sample = per_sample_counts(cfg.data.crops)
    grid = (cfg.data.crops.global_size // _patch(cfg),) * 2
    results: dict[str, list[dict[str, float]]] = {"ours": [], "baseline": []}
    failed_reads = 0
    # Each round builds both loaders afresh and shuts them down after timing: a loader left alive keeps
    # prefetching (DataLoader workers fill prefetch_factor batches each) and would slow the other side down.
    for r in range(rounds):
        ours = build_loader(cfg, index, device=device, device_id=0 if device == "gpu" else None,
                            patch_size=_patch(cfg))
        try:
            results["ours"].append(_time(ours, warmup, batches, batch_size, per_sample))
            failed_reads += ours.failed_reads
            readers = ours.pipeline_args["reader_workers"]  # what the loader resolved (auto: a count)
        finally:
            ours.close()
        log.info("round %d ours: %s", r, results["ours"][-1])
        baseline = _baseline_batches(index, ours.sampler.order, cfg, batch_size, workers, photometric, grid)
        try:
            results["baseline"].append(_time(baseline, warmup, batches, batch_size, per_sample))
        finally:
            del baseline  # shuts the worker processes down
        log.info("round %d baseline: %s", r, results["baseline"][-1])
    out: dict[str, Any] = {
        "ours": {**_best(results["ours"]), "device": device, "pipeline": "DALI", "threads": workers,
                 "reader_workers": readers, "failed_reads": failed_reads},
        "baseline": {**_best(results["baseline"]), "pipeline": "torch DataLoader + OpenSlide + torchvision + "
                     "scikit-image HED", "workers": workers},
    }
    out["ratio"] = round(out["ours"]["samples_per_s"] / out["baseline"]["samples_per_s"], 3)
    out["setup"] = {
        "batch_size": batch_size, "crops_per_sample": per_sample["crops"], "per_sample": per_sample,
        "batches": batches, "rounds": rounds,
        "photometric": photometric, "index_entries": len(index), "slides": [Path(s.path).name for s in index.slides],
        "crops": {k: cfg.data.crops[k] for k in ("global_count", "global_size", "local_count", "local_size")},
        "host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    return out


def _patch(cfg: Any) -> int:
    from foundation.data.loader import patch_size_of

    patch = patch_size_of(str(cfg.model.get("arch", "")))
    if patch is None:
        raise ValueError(f"model.arch={cfg.model.get('arch')!r} names no patch size (patchNN): masks need one")
    return patch


def _config(args: argparse.Namespace) -> Any:
    from foundation.config import load_config

    overrides = list(args.overrides)
    if not args.photometric:
        overrides = [*PHOTOMETRIC_OFF, *overrides]
    if args.batch_size:
        overrides.append(f"data.pipeline.batch_size={args.batch_size}")
    if args.workers:
        overrides.append(f"data.pipeline.threads={args.workers}")
    return load_config(args.preset, overrides)


def report(result: Mapping[str, Any]) -> str:
    ours, base = result["ours"], result["baseline"]
    return (f"ours     {ours['samples_per_s']:8.1f} samples/s {ours['crops_per_s']:9.1f} crops/s "
            f"(DALI {ours['device']}, {ours['threads']} threads, {ours['reader_workers']} reader processes, "
            f"failed reads {ours['failed_reads']})\n"
            f"         {ours['global_crops_per_s']:8.1f} global crops/s, "
            f"{ours['global_crop_equivalents_per_s']:.1f} global-crop equivalents/s (local crops by pixel share)\n"
            f"baseline {base['samples_per_s']:8.1f} samples/s {base['crops_per_s']:9.1f} crops/s "
            f"(DataLoader, {base['workers']} workers)\n"
            f"ratio    {result['ratio']:.2f}x")


def run(args: argparse.Namespace) -> int:
    from foundation.slides.index import TileIndex

    cfg = _config(args)
    device = args.device or str(cfg.data.pipeline.device)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        index_dir = args.index or _index_real_slides(_data_dir(args.data), Path(tmp), cfg, args.slides)
        index = TileIndex.load(index_dir)
        result = run_bench(cfg, index, args.batches, args.warmup, args.rounds, args.photometric, device)
    print(report(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    log.info("wrote %s", args.out)
    return 0
