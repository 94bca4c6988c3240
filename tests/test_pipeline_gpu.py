"""The GPU pipeline (nvJPEG raw tiles, GPU ops) against the CPU pipeline on the real slides. Needs a CUDA device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_pipeline import write_index

from foundation.config import load_config
from foundation.data.loader import build_loader
from foundation.slides.index import TileIndex

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

BATCH = 8
STEPS = 3
# nvJPEG's IDCT/upsampling and the GPU resampling kernels differ from libjpeg-turbo/the CPU kernels by a few
# levels at most; in normalised units (std ~0.22 * 255) 0.05 is about 3 levels on average.
MEAN_ABS_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def index(wsi: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> TileIndex:
    rows = [(str(wsi["svs_jpeg"]), "H&E", "", ""), (str(wsi["ome_tiff"]), "H&E", "", ""),
            (str(wsi["ihc_tiff"]), "IHC", "Ki67", "0.25")]
    return write_index(rows, tmp_path_factory.mktemp("gpu") / "index", "0.5")


def batches(index: TileIndex, device: str) -> list[dict[str, torch.Tensor]]:
    cfg = load_config(overrides=[f"data.pipeline.batch_size={BATCH}", "data.pipeline.sample_ids=true",
                                 "data.pipeline.raw_tiles=auto"])
    ld = build_loader(cfg, index, device=device, device_id=0 if device == "gpu" else None, patch_size=16)
    out = [next(ld) for _ in range(STEPS)]
    if device == "gpu":
        # RGB-photometric Aperio tiles decode wrong with nvJPEG: that slide must be on the region path
        names = {Path(s.path).name: bool(r) for s, r in zip(index.slides, ld.layout.plan.raw, strict=True)}
        assert names == {"CMU-1-Small-Region.svs": False, "CMU-1-Small-Region_pyramid.ome.tif": True,
                         "DeepLIIF_ROI_1_Ki67_IHC_pyramid.tif": True}
    ld.close()
    return out


def test_gpu_batches_match_the_cpu_pipeline(index: TileIndex):
    gpu, cpu = batches(index, "gpu"), batches(index, "cpu")
    for g, c in zip(gpu, cpu, strict=True):
        assert g["global_crops"].is_cuda and g["masks"].is_cuda and g["stain_ids"].is_cuda
        for key in ("sample_ids", "stain_ids", "marker_ids", "masks"):
            assert torch.equal(g[key].cpu(), c[key]), key
        for key in ("global_crops", "local_crops"):
            diff = (g[key].cpu() - c[key]).abs()
            per_sample = diff.mean(dim=(0, 2, 3, 4))
            assert per_sample.max() < MEAN_ABS_TOLERANCE, (key, per_sample)
