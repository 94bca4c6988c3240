"""Raw JPEG tiles: standalone streams, RGB-photometric handling, regions equal to the slide readers' reads."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from slide_support import damage_tiles

from foundation.slides.raw_tiles import ADOBE_RGB_MARKER, RawTileSource
from foundation.slides.readers import SlideError, open_slide

SOI, EOI = b"\xff\xd8", b"\xff\xd9"


def _decode(stream: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(stream)) as image:
        return np.asarray(image.convert("RGB"))


def test_jpeg_svs_is_rgb_photometric_with_240px_tiles(wsi: dict[str, Path]) -> None:
    with RawTileSource.open(wsi["svs_jpeg"]) as src:
        assert src.level_dimensions == [(2220, 2967)]
        assert src.tile_shape(0) == (240, 240)
        assert src.grid_shape(0) == (10, 13)
        assert src.photometric(0) == "rgb"


@pytest.mark.parametrize("region", [(0, 0, 240, 240), (100, 200, 500, 400), (2000, 2800, 220, 167)])
def test_region_from_raw_tiles_equals_cucim_and_openslide(wsi: dict[str, Path], region: tuple) -> None:
    x, y, w, h = region
    with RawTileSource.open(wsi["svs_jpeg"]) as src:
        raw = src.read_region(0, x, y, w, h).astype(np.int16)
    for backend in ("cucim", "openslide"):
        with open_slide(wsi["svs_jpeg"], backend) as slide:
            ref = slide.read_region((x, y), 0, (w, h)).astype(np.int16)
        assert np.abs(raw - ref).max() <= 1, backend  # same libjpeg family: at most rounding differences


def test_rgb_tiles_need_the_adobe_marker(wsi: dict[str, Path]) -> None:
    with RawTileSource.open(wsi["svs_jpeg"]) as src, open_slide(wsi["svs_jpeg"], "cucim") as slide:
        col, row = 4, 6
        stream = src.jpeg(0, col, row)
        assert stream.startswith(SOI + ADOBE_RGB_MARKER) and stream.endswith(EOI)
        assert stream.count(SOI) == 1  # tables spliced: a single image, not tables + tile
        tx, ty = src.tile_origin(0, col, row)
        ref = slide.read_region((tx, ty), 0, (240, 240)).astype(np.int16)
        with_marker = _decode(stream).astype(np.int16)
        without = _decode(stream.replace(ADOBE_RGB_MARKER, b"", 1)).astype(np.int16)
    assert np.abs(with_marker - ref).mean() < 0.05
    # Decoded as YCbCr the colours are far off (the "colour trap" of STACK.md).
    assert np.abs(without - ref).mean() > 20


@pytest.mark.parametrize("name", ["ome_tiff", "ihc_tiff"])
def test_ycbcr_pyramids_match_the_tifffile_reader_at_every_level(wsi: dict[str, Path], name: str) -> None:
    with RawTileSource.open(wsi[name]) as src, open_slide(wsi[name], "tifffile", mpp=0.25) as slide:
        assert src.level_dimensions == slide.level_dimensions
        for level in range(src.level_count):
            assert src.photometric(level) == "ycbcr"
            stream = src.jpeg(level, 0, 0)
            assert ADOBE_RGB_MARKER not in stream
            w, h = src.level_dimensions[level]
            x, y = w // 3, h // 4
            raw = src.read_region(level, x, y, 300, 200)
            assert np.array_equal(raw, slide.read_rect(level, x, y, 300, 200))


def test_tiles_for_region_match_a_brute_force_cover(wsi: dict[str, Path]) -> None:
    with RawTileSource.open(wsi["ome_tiff"]) as src:
        level = 1
        tw, th = src.tile_shape(level)
        w, h = src.level_dimensions[level]
        for x, y, rw, rh in [(0, 0, 1, 1), (250, 500, 20, 20), (1000, 1400, 400, 400), (-50, -50, 60, 60)]:
            xs, ys = np.meshgrid(np.arange(max(x, 0), min(x + rw, w)), np.arange(max(y, 0), min(y + rh, h)))
            expected = sorted({(int(c), int(r)) for c, r in zip((xs // tw).ravel(), (ys // th).ravel(), strict=True)},
                              key=lambda cr: (cr[1], cr[0]))
            assert src.tiles_for_region(level, x, y, rw, rh) == expected
            for col, row in expected:
                ox, oy = src.tile_origin(level, col, row)
                assert (ox, oy) == (col * tw, row * th)
        assert src.tiles_for_region(level, w + 10, 0, 5, 5) == []


def test_outside_the_level_reads_white(wsi: dict[str, Path]) -> None:
    with RawTileSource.open(wsi["ihc_tiff"]) as src:
        w, h = src.level_dimensions[2]
        region = src.read_region(2, w - 10, h - 10, 30, 30)
        assert (region[10:] == 255).all() and (region[:, 10:] == 255).all()
        assert region[:10, :10].std() > 0


@pytest.mark.parametrize("name", ["svs_j2k", "dicom"])
def test_no_raw_jpeg_source_for_jpeg2000_or_dicom(wsi: dict[str, Path], name: str) -> None:
    assert RawTileSource.open(wsi[name]) is None


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="file not found"):
        RawTileSource.open(tmp_path / "nope.svs")


def test_dali_cpu_decoder_reads_the_spliced_tiles(wsi: dict[str, Path]) -> None:
    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, types

    with RawTileSource.open(wsi["svs_jpeg"]) as src:
        tiles = [(c, r) for r in range(5, 7) for c in range(3, 6)]
        streams = [np.frombuffer(src.jpeg(0, c, r), dtype=np.uint8) for c, r in tiles]
        refs = [src.decode_tile(0, c, r) for c, r in tiles]

    @dali.pipeline_def(batch_size=len(streams), num_threads=1, device_id=None)
    def decode():
        data = fn.external_source(source=lambda: streams, batch=True, dtype=types.UINT8)
        return fn.decoders.image(data, device="cpu", output_type=types.RGB)

    pipe = decode()
    pipe.build()
    (out,) = pipe.run()
    for i, ref in enumerate(refs):
        assert np.abs(np.asarray(out[i]).astype(np.int16) - ref).max() <= 1


@pytest.mark.parametrize("name", ["svs_jpeg", "svs_j2k", "ome_tiff", "ihc_tiff"])
def test_real_slides_have_no_damaged_tiles(wsi: dict[str, Path], name: str) -> None:
    from foundation.slides.tiff_tiles import TiledTiff, check_tile_streams

    check_tile_streams(wsi[name])  # raises on any damaged tile
    tiff = TiledTiff(wsi[name])
    try:
        assert [tiff.damaged_tiles(level) for level in range(len(tiff.levels))] == [[]] * len(tiff.levels)
    finally:
        tiff.close()


@pytest.mark.parametrize("name", ["svs_jpeg", "svs_j2k"])
def test_zeroed_and_cut_off_tiles_are_found(wsi: dict[str, Path], tmp_path: Path, name: str) -> None:
    from foundation.slides.tiff_tiles import TiledTiff, check_tile_streams

    damaged = damage_tiles(wsi[name], tmp_path / f"damaged{wsi[name].suffix}",
                      {(3, 4): "head", (1, 6): "tail", (5, 0): "head"})
    tiff = TiledTiff(damaged)
    try:
        assert tiff.damaged_tiles(0) == [(5, 0), (3, 4), (1, 6)]  # row-major
    finally:
        tiff.close()
    with pytest.raises(SlideError, match=r"level 0: 3 of \d+ tiles are damaged .* first at tile \(col, row\) \(5, 0\)"):
        check_tile_streams(damaged)
