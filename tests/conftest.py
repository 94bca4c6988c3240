"""Shared fixtures: the real slides and tiles in ../shared/data (never copied into the repo)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from foundation.shared_data import DATA_ENV, shared_data_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = shared_data_dir()
    if not (path / "wsi").is_dir():
        pytest.fail(f"real test data not found at {path}: set {DATA_ENV} to the shared data folder")
    return path


@pytest.fixture(scope="session")
def wsi(data_dir: Path) -> dict[str, Path]:
    """The five real slides by short name."""
    w = data_dir / "wsi"
    return {
        "svs_jpeg": w / "aperio_svs" / "CMU-1-Small-Region.svs",
        "svs_j2k": w / "aperio_svs" / "TCGA-CR-7395-01A-01-TS1.svs",
        "dicom": w / "dicom" / "camelyon_multiframe_lowres.dcm",
        "ome_tiff": w / "derived" / "CMU-1-Small-Region_pyramid.ome.tif",
        "ihc_tiff": w / "derived" / "DeepLIIF_ROI_1_Ki67_IHC_pyramid.tif",
    }


def one_tile_per_source(folder: Path) -> np.ndarray:
    """``[K,224,224,3]`` uint8: the first tile (sorted) of every source image in ``folder``."""
    firsts: dict[str, Path] = {}
    for path in sorted(folder.glob("*.png")):
        firsts.setdefault(re.sub(r"_x\d+_y\d+\.png$", "", path.name), path)
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in firsts.values()])


@pytest.fixture(scope="session")
def he_tiles(data_dir: Path) -> np.ndarray:
    """One real H&E tile per source image (stain_he_vs_ihc/HE)."""
    return one_tile_per_source(data_dir / "tiles" / "stain_he_vs_ihc" / "HE")


@pytest.fixture(scope="session")
def ihc_tiles(data_dir: Path) -> np.ndarray:
    """One real IHC tile per source image (stain_he_vs_ihc/IHC)."""
    return one_tile_per_source(data_dir / "tiles" / "stain_he_vs_ihc" / "IHC")


SHM_BUFFERS = "deepspeed_allreduce_buffer_*"


@pytest.fixture(scope="session", autouse=True)
def remove_orphaned_deepspeed_shm_buffers():
    """DeepSpeed's CPU comm leaves a ~66 MB buffer per rank in /dev/shm when a rank is killed (the kill -9 resume
    tests do it on purpose); RAM-backed, they would pile up run after run. Remove the ones this session created."""
    shm = Path("/dev/shm")
    before = set(shm.glob(SHM_BUFFERS)) if shm.is_dir() else set()
    yield
    if shm.is_dir():
        for path in set(shm.glob(SHM_BUFFERS)) - before:
            path.unlink(missing_ok=True)
