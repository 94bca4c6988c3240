"""The CPU DALI pipeline on the real slides: batch contract, determinism, exact resume, both read paths, bad reads."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from foundation.cli import main
from foundation.config import load_config, to_dict
from foundation.data.crops import draw_crops, plan_region
from foundation.data.loader import build_loader
from foundation.data.sampler import sample_rng
from foundation.data.source import crop_types
from foundation.slides.index import TileIndex
from stain.augment import sample_stain_params
from stain.dali_ops import photometric_dali_args, stain_dali_args
from stain.photometric import PhotometricParams, sample_photometric_params

BATCH = 4
PATCH = 16
# fewer local crops where the test is about order and bits, not about the crop recipe (keeps the file fast)
LIGHT = ("data.crops.local_count=2",)


def write_index(rows: list[tuple[str, str, str, str]], out: Path, *mpp: str) -> TileIndex:
    manifest = out.parent / f"{out.name}.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "stain", "marker", "group", "mpp"])
        writer.writerows([(path, stain, marker, "p", mpp_) for path, stain, marker, mpp_ in rows])
    assert main(["index", str(manifest), "--out", str(out), "--workers", "1", "--mpp", *mpp]) == 0
    return TileIndex.load(out)


@pytest.fixture(scope="module")
def index(wsi: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> TileIndex:
    """JPEG SVS, JPEG 2000 SVS, OME-TIFF (SubIFD pyramid) and the IHC TIFF, at 0.5 and 1 µm/px."""
    rows = [(str(wsi["svs_jpeg"]), "H&E", "", ""), (str(wsi["svs_j2k"]), "H&E", "", "0.5"),
            (str(wsi["ome_tiff"]), "H&E", "", ""), (str(wsi["ihc_tiff"]), "IHC", "Ki67", "0.25")]
    return write_index(rows, tmp_path_factory.mktemp("pipeline") / "index", "0.5", "1.0")


def loader(index: TileIndex, *overrides: str, rank: int = 0, world_size: int = 1, batch: int = BATCH):
    cfg = load_config(overrides=[f"data.pipeline.batch_size={batch}", "data.pipeline.sample_ids=true", *overrides])
    return build_loader(cfg, index, rank=rank, world_size=world_size, patch_size=PATCH)


def take(ld, n: int) -> list[dict[str, torch.Tensor]]:
    return [next(ld) for _ in range(n)]


def assert_same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), f"{key} differs"


def test_batch_contract_on_the_real_slides(index: TileIndex):
    ld = loader(index)
    batches = take(ld, 3)
    cfg = load_config()
    g, n_local = cfg.data.crops.global_count, cfg.data.crops.local_count
    gs, ls = cfg.data.crops.global_size, cfg.data.crops.local_size
    for step, batch in enumerate(batches):
        assert batch["global_crops"].shape == (g, BATCH, 3, gs, gs) and batch["global_crops"].dtype == torch.float32
        assert batch["local_crops"].shape == (n_local, BATCH, 3, ls, ls)
        assert batch["masks"].shape == (g, BATCH, (gs // PATCH) ** 2) and batch["masks"].dtype == torch.bool
        assert batch["stain_ids"].dtype == torch.long and batch["marker_ids"].dtype == torch.long
        assert torch.equal(batch["sample_ids"], torch.arange(step * BATCH, (step + 1) * BATCH))
        # labels follow the entries of the global order (no read failed here)
        entries = ld.sampler.order.entries(batch["sample_ids"].numpy())
        slides = [index.slides[int(s)] for s in index.tiles["slide"][entries]]
        assert batch["stain_ids"].tolist() == [s.stain_id for s in slides]
        assert batch["marker_ids"].tolist() == [s.marker_id for s in slides]
        for crops in (batch["global_crops"], batch["local_crops"]):
            assert torch.isfinite(crops).all()
            # normalised tissue: neither constant nor saturated
            assert crops.std() > 0.2 and crops.abs().max() < 10
    assert ld.failed_reads == 0
    # the iBOT masks follow data.masking: about half of the global crops carry a mask
    masked = torch.cat([b["masks"].flatten(0, 1).any(-1) for b in batches])
    assert 0 < masked.sum() < masked.numel()
    ld.close()


def test_same_seed_same_crops_other_seed_other_crops(index: TileIndex):
    a = take(loader(index, "meta.seed=3", *LIGHT), 2)
    b = take(loader(index, "meta.seed=3", *LIGHT), 2)
    assert_same(a, b)
    c = take(loader(index, "meta.seed=4", *LIGHT), 1)
    assert not torch.equal(a[0]["global_crops"], c[0]["global_crops"])


def test_resume_gives_the_identical_next_batches(index: TileIndex):
    first = loader(index, *LIGHT)
    take(first, 3)
    state = first.state_dict()
    expected = take(first, 2)
    resumed = loader(index, *LIGHT)
    resumed.load_state_dict(state)
    assert_same(take(resumed, 2), expected)
    # resuming a loader that already ran ahead also lands on the saved position
    first.load_state_dict(state)
    assert_same(take(first, 2), expected)


def test_resharded_resume_keeps_every_sample(index: TileIndex):
    """Two ranks run 2 steps; one rank resumes from their state: every sample keeps its position and crops."""
    ranks = [loader(index, *LIGHT, rank=r, world_size=2) for r in range(2)]
    for _ in range(2):
        for ld in ranks:
            next(ld)
    state = ranks[0].state_dict()
    assert state == ranks[1].state_dict()
    next_two = [next(ld) for ld in ranks]  # what the 2-rank run would see next
    single = loader(index, *LIGHT, batch=2 * BATCH)
    single.load_state_dict(state)
    merged = next(single)
    expected_ids = torch.cat([b["sample_ids"] for b in next_two])
    assert torch.equal(merged["sample_ids"], expected_ids)
    assert torch.equal(merged["sample_ids"], torch.arange(4 * BATCH, 6 * BATCH))
    # crops and labels depend on the sample alone, not on the world size (masks depend on the batch: not compared)
    for key in ("global_crops", "local_crops"):
        assert torch.equal(merged[key], torch.cat([b[key] for b in next_two], dim=1))
    for key in ("stain_ids", "marker_ids"):
        assert torch.equal(merged[key], torch.cat([b[key] for b in next_two]))


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_parallel_reader_workers_give_identical_batches(index: TileIndex, start: str):
    """Two reader processes build whole rank batches by batch number: same batches as the main process.

    ``spawn`` is what the GPU path uses (DALI cannot fork once CUDA is up): the source travels pickled, the index
    columns as memory-map file names."""
    parallel = loader(index, "data.pipeline.reader_workers=2", f"data.pipeline.reader_start={start}", *LIGHT)
    assert_same(take(parallel, 3), take(loader(index, *LIGHT), 3))
    parallel.close()


def test_raw_tile_and_region_paths_give_identical_batches(index: TileIndex):
    """The DALI-decoded raw JPEG tiles, assembled, equal the readers' regions bit for bit (CPU decode)."""
    region = loader(index, "data.pipeline.raw_tiles=never", *LIGHT)
    raw = loader(index, "data.pipeline.raw_tiles=always", *LIGHT)
    assert region.layout.plan.graph == "region"
    plan = raw.layout.plan
    # JPEG SVS, OME-TIFF and the IHC TIFF are JPEG-tiled; the JPEG 2000 SVS is read as regions (mixed batches)
    by_name = {Path(s.path).name: bool(r) for s, r in zip(index.slides, plan.raw, strict=True)}
    assert by_name == {"CMU-1-Small-Region.svs": True, "TCGA-CR-7395-01A-01-TS1.svs": False,
                       "CMU-1-Small-Region_pyramid.ome.tif": True, "DeepLIIF_ROI_1_Ki67_IHC_pyramid.tif": True}
    assert plan.graph == "mixed" and plan.slots >= 2
    assert_same(take(region, 4), take(raw, 4))


def test_continuous_magnification_runs(index: TileIndex):
    ld = loader(index, "data.crops.magnification=continuous", "data.crops.mpp_range=[0.3,1.6]",
                "data.pipeline.raw_tiles=always", *LIGHT)
    batch = next(ld)
    assert batch["global_crops"].shape[1] == BATCH and torch.isfinite(batch["global_crops"]).all()
    assert ld.failed_reads == 0


@pytest.fixture(scope="module")
def damaged(wsi: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Index built on intact copies; then one copy loses a tile (zeroed) and another is truncated."""
    root = tmp_path_factory.mktemp("damaged")
    tile_hit = root / "tile-hit.svs"
    truncated = root / "truncated.svs"
    for copy in (tile_hit, truncated):
        shutil.copyfile(wsi["svs_jpeg"], copy)
    rows = [(str(tile_hit), "H&E", "", ""), (str(truncated), "H&E", "", ""), (str(wsi["ihc_tiff"]), "IHC", "Ki67",
                                                                             "0.25")]
    idx = write_index(rows, root / "index", "0.5")
    page = tifffile.TiffFile(tile_hit).pages[0]
    across = -(-page.shape[1] // page.tilewidth)
    col, row = 2, 3
    i = row * across + col
    data = bytearray(tile_hit.read_bytes())
    data[page.dataoffsets[i]:page.dataoffsets[i] + page.databytecounts[i]] = bytes(page.databytecounts[i])
    tile_hit.write_bytes(bytes(data))
    full = truncated.read_bytes()
    truncated.write_bytes(full[: len(full) // 2])  # the Aperio IFDs sit at the end: the file no longer opens
    return {"index": idx, "tile": (col * page.tilewidth, row * page.tilelength, page.tilewidth, page.tilelength)}


@pytest.mark.parametrize("raw_tiles", ["never", "always"])
def test_damaged_tiles_and_slides_are_replaced_and_counted(damaged: dict[str, object], raw_tiles: str):
    index: TileIndex = damaged["index"]  # type: ignore[assignment]
    tx, ty, tw, th = damaged["tile"]  # type: ignore[misc]
    # OpenSlide raises on the zeroed tile (cuCIM would silently decode it as grey)
    ld = loader(index, "slides.reader=openslide", f"data.pipeline.raw_tiles={raw_tiles}", *LIGHT)
    steps = 8
    batches = take(ld, steps)
    tiles, slides = index.tiles, index.slides
    first_try = ld.sampler.order.entries(np.arange(steps * BATCH))
    names = [Path(slides[int(s)].path).name for s in tiles["slide"][first_try]]
    size = tiles["size"][first_try]
    hits_tile = ((np.array(names) == "tile-hit.svs") & (tiles["x"][first_try] < tx + tw)
                 & (tiles["x"][first_try] + size > tx) & (tiles["y"][first_try] < ty + th)
                 & (tiles["y"][first_try] + size > ty))
    doomed = int(np.sum(np.array(names) == "truncated.svs") + hits_tile.sum())
    assert doomed > 0, "the test draws must touch the damage"
    assert ld.failed_reads >= doomed  # replacements may fail again: counted too
    assert all(b["global_crops"].shape[1] == BATCH for b in batches)
    assert all(torch.isfinite(b["global_crops"]).all() for b in batches)


def per_sample_parameters(source, positions: np.ndarray, retries: np.ndarray) -> dict[str, np.ndarray]:
    """The source's per-crop outputs the plain way: the public per-sample draws, one sample at a time, stacked."""
    order, crops, layout = source.order, source.crops, source.layout
    types = crop_types(crops.global_count, crops.local_count)
    groups = list(dict.fromkeys(types))
    rows: dict[str, list] = {}
    for position, attempt in zip(positions.tolist(), retries.tolist(), strict=True):
        entry = order.replacement(position, attempt) if attempt else int(order.entries([position])[0])
        rng = sample_rng(order.seed, position, attempt)
        row = {c: source.tiles[c][entry] for c in ("slide", "level", "x", "y", "size", "mpp")}
        slide = int(row["slide"])
        region = plan_region(row, source.slides[slide], crops, rng)
        geometry = draw_crops(rng, region.side, region.side, crops)
        m, t = stain_dali_args(*sample_stain_params([source.kinds[slide]] * layout.num_crops, rng,
                                                    source.stain_cfg))
        per_crop = {"roi_start": list(geometry.roi_start), "roi_end": list(geometry.roi_end),
                    "angle": list(geometry.angle), "stain_m": m, "stain_t": t}
        if layout.photometric:
            drawn = [sample_photometric_params(g, types.count(g), rng, source.generic_cfg) for g in groups]
            for c, crop_type in enumerate(types):
                params = drawn[groups.index(crop_type)]
                k = types[:c].count(crop_type)
                fields = [f for f in PhotometricParams.__dataclass_fields__ if f != "solarize_threshold"]
                one = PhotometricParams(**{f: getattr(params, f)[k:k + 1] for f in fields},
                                        solarize_threshold=params.solarize_threshold)
                for name, values in photometric_dali_args(one).items():
                    per_crop.setdefault(name, []).append(values[0])
        for name, values in per_crop.items():
            for c, value in enumerate(values):
                rows.setdefault(f"{name}{c}", []).append(value)
        rows.setdefault("stain_id", []).append(source.slides[slide].stain_id)
    return {name: np.stack(values) for name, values in rows.items()}


@pytest.mark.parametrize("overrides", [(), ("data.crops.magnification=continuous",),
                                       ("data.augmentation.generic.color_jitter_p=0",
                                        "data.augmentation.generic.grayscale_p=0",
                                        "data.augmentation.generic.blur_p={global1: 0, global2: 0, local: 0}",
                                        "data.augmentation.generic.solarize_p={global1: 0, global2: 0, local: 0}")])
def test_source_equals_the_per_sample_draws(index: TileIndex, damaged: dict[str, object], overrides: tuple):
    """The source draws every sample from its own Generator but computes the parameters once per batch: bit for
    bit the public per-sample functions, stacked (on the damaged index too, where samples are replaced)."""
    not_drawn = ("region", "is_raw", "jpeg", "anchor", "shape", "marker_id", "retries", "masks", "sample_id")
    for idx in (index, damaged["index"]):
        ld = loader(idx, "data.pipeline.raw_tiles=always", "slides.reader=openslide", *overrides, batch=24)
        source = ld.make_source(0)
        replaced = 0
        try:
            for step in range(2):
                out = dict(zip(source.layout.names, source(step), strict=True))
                want = per_sample_parameters(source, out["sample_id"], out["retries"])
                assert set(want) == {n for n in out if not n.startswith(not_drawn)}
                for name, value in want.items():
                    assert out[name].dtype == value.dtype and np.array_equal(out[name], value), name
                replaced += int(out["retries"].sum())
        finally:
            source.close()
        assert replaced > 0 or idx is index


def test_batched_dali_args_equal_the_per_sample_ones():
    """The source converts a whole [C, B] batch at once; each crop's batch equals the per-sample conversion."""
    rng = np.random.default_rng(0)
    m, t = rng.random((5, 4, 3, 3)).astype(np.float32), rng.random((5, 4, 3)).astype(np.float32)
    m_cols, t_cols = stain_dali_args(m.transpose(1, 0, 2, 3), t.transpose(1, 0, 2))
    for c in range(4):
        per_sample = [stain_dali_args(m[b:b + 1, c], t[b:b + 1, c]) for b in range(5)]
        m_c, t_c = np.concatenate([x for x, _ in per_sample]), np.concatenate([y for _, y in per_sample])
        assert np.array_equal(m_cols[c], m_c) and np.array_equal(t_cols[c], t_c)
        assert m_cols[c].flags.c_contiguous and t_cols[c].dtype == np.float32
    params = sample_photometric_params("global2", 7, rng, to_dict(load_config().data.augmentation.generic))
    batch = photometric_dali_args(params)
    assert np.array_equal(batch["color_matrix"], np.stack([c.T for c in params.color_matrix]).astype(np.float32))
    for name in ("mean_weight", "blur_sigma", "solarize"):
        assert batch[name].dtype == np.float32 and np.array_equal(batch[name], getattr(params, name)), name
    assert batch["blur_window"].dtype == np.int32 and np.array_equal(batch["blur_window"], params.blur_window)


def test_bad_pipeline_settings_are_named(index: TileIndex):
    with pytest.raises(ValueError, match="data.pipeline.batch_size=0"):
        loader(index, batch=0)
    with pytest.raises(ValueError, match="data.pipeline.raw_tiles='sometimes'"):
        loader(index, "data.pipeline.raw_tiles=sometimes")
    with pytest.raises(ValueError, match="data.pipeline.device='tpu'"):
        loader(index, "data.pipeline.device=tpu")


@pytest.mark.parametrize(("value", "device", "cpus", "ranks", "expected"), [
    ("auto", "cpu", 2, 1, 0),  # the CPU path: DALI's threads use the cores
    ("auto", "gpu", 16, 1, 8),  # one GPU on a 16-core machine (the H100 of benchmarks/RESULTS.md)
    ("auto", "gpu", 96, 8, 6),  # eight ranks share the node's cores
    ("auto", "gpu", 64, 1, 8),  # at most AUTO_MAX_READERS
    ("auto", "gpu", 2, 4, 1),  # always at least one reader on the GPU path
    (3, "gpu", 16, 1, 3), (0, "gpu", 16, 1, 0),  # a count is taken as it is
])
def test_reader_workers_auto(value, device, cpus, ranks, expected):
    from foundation.data.loader import reader_workers

    assert reader_workers(value, device, cpus=cpus, ranks_per_node=ranks) == expected


@pytest.mark.parametrize("value", [-1, "many", True])
def test_reader_workers_rejects_bad_values(value):
    from foundation.data.loader import reader_workers

    with pytest.raises(ValueError, match="data.pipeline.reader_workers"):
        reader_workers(value, "gpu", cpus=16, ranks_per_node=1)
