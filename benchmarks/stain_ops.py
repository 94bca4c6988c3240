"""CPU cost per 224 px crop of the DALI stain op and photometric chain, against a pass-through pipeline.

    .venv/bin/python benchmarks/stain_ops.py [--batch 64] [--iters 20] [--repeats 3] [--threads 2]

Wall and CPU (user + system, all threads) milliseconds per crop; on a shared machine the CPU figure is the
stable one. Crops are the real 224 px tiles in ../shared/data/tiles/stain_he_vs_ihc (decoded once, fed by
external_source), so the numbers exclude decoding and cropping. Each variant is timed ``--repeats`` times,
interleaved; medians are printed with scikit-image's per-crop rgb2hed -> jitter -> hed2rgb (what a user's
DataLoader would run) for scale.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from nvidia.dali import fn, pipeline_def
from PIL import Image
from skimage.color import hed2rgb, rgb2hed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from foundation.config import load_config, to_dict
from stain.augment import sample_stain_params
from stain.dali_ops import (
    PHOTOMETRIC_INPUTS,
    photometric_augment,
    photometric_dali_args,
    stain_augment,
    stain_dali_args,
)
from stain.photometric import sample_photometric_params

TILES = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiles" / "stain_he_vs_ihc"


def constant(batch: list[np.ndarray]):
    """An external-source callback that yields the same batch every iteration."""
    return lambda: batch


def build(variant: str, crops: list[np.ndarray], inputs: dict[str, list[np.ndarray]], threads: int):
    """A CPU pipeline: ``copy`` (pass-through), ``stain``, or ``stain+photometric``."""

    @pipeline_def(batch_size=len(crops), num_threads=threads, device_id=None, exec_dynamic=False,
                  prefetch_queue_depth=1)
    def pipe():
        x = fn.external_source(source=constant(crops), layout="HWC", batch=True)
        nodes = {k: fn.external_source(source=constant(v), batch=True) for k, v in inputs.items()}
        if variant == "copy":
            return fn.copy(x)
        out = stain_augment(x, nodes["m"], nodes["t"])
        if variant == "stain":
            return out
        return photometric_augment(out, {k: nodes[k] for k in PHOTOMETRIC_INPUTS}, 128.0)

    p = pipe()
    p.build()
    return p


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (robust to other jobs on a shared machine)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def ms_per_crop(p, iters: int, batch: int) -> tuple[float, float]:
    """``(wall, cpu)`` milliseconds per crop."""
    p.run()  # warm-up
    wall, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(iters):
        p.run()
    scale = 1e3 / (iters * batch)
    return (time.perf_counter() - wall) * scale, (cpu_seconds() - cpu) * scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    paths = sorted(TILES.glob("*/*.png"))[: args.batch]
    crops = [np.ascontiguousarray(np.asarray(Image.open(p).convert("RGB"))) for p in paths]
    kinds = ["ihc" if p.parent.name == "IHC" else "he" for p in paths]
    cfg = to_dict(load_config().data.augmentation)
    rng = np.random.default_rng(0)
    m, t = sample_stain_params(kinds, rng, cfg["stain"])
    md, td = stain_dali_args(m, t)
    inputs = {"m": md, "t": td,
              **photometric_dali_args(sample_photometric_params("global1", len(crops), rng, cfg["generic"]))}

    variants = ("copy", "stain", "stain+photometric")
    pipes = {v: build(v, crops, inputs, args.threads) for v in variants}
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            times[v].append(ms_per_crop(pipes[v], args.iters, len(crops)))
    result = {}
    for kind, col in (("wall", 0), ("cpu", 1)):
        ms = {v: statistics.median(t[col] for t in ts) for v, ts in times.items()}
        result[kind] = {**{v: round(x, 3) for v, x in ms.items()},
                        "stain_op": round(ms["stain"] - ms["copy"], 3),
                        "photometric_chain": round(ms["stain+photometric"] - ms["stain"], 3)}

    alpha, beta = np.full(3, 1.05), np.full(3, 0.01)
    wall, cpu = time.perf_counter(), cpu_seconds()
    for crop in crops:
        hed2rgb(rgb2hed(crop) * alpha + beta)
    result["wall"]["skimage_hed_jitter"] = round((time.perf_counter() - wall) / len(crops) * 1e3, 3)
    result["cpu"]["skimage_hed_jitter"] = round((cpu_seconds() - cpu) / len(crops) * 1e3, 3)
    print(json.dumps({"ms_per_224px_crop": result, "batch": len(crops), "threads": args.threads}, indent=1))


if __name__ == "__main__":
    main()
