"""Slide readers on the five real slides: backend choice, pixel sizes, reads that agree across backends."""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tifffile

from foundation.slides import pixel_size
from foundation.slides.readers import SlideError, open_slide

# Pixel sizes the real files do not carry; the manifest gives them.
J2K_MPP = 0.5
IHC_MPP = 0.25
OVERRIDES = {"svs_j2k": J2K_MPP, "ihc_tiff": IHC_MPP}

EXPECTED = {  # name: (auto backend, level dimensions)
    "svs_jpeg": ("cucim", [(2220, 2967)]),
    "svs_j2k": ("cucim", [(4443, 3567), (2221, 1783)]),
    "dicom": ("openslide", [(1152, 700)]),
    "ome_tiff": ("tifffile", [(2220, 2967), (1110, 1483), (555, 741), (277, 370)]),
    "ihc_tiff": ("cucim", [(1381, 949), (690, 474), (345, 237)]),
}


def _backends_that_open(path: Path, mpp: float | None) -> dict[str, object]:
    readers = {}
    for name in ("cucim", "openslide", "tifffile"):
        with contextlib.suppress(SlideError):
            readers[name] = open_slide(path, name, mpp)
    return readers


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_auto_choice_opens_every_real_slide(wsi: dict[str, Path], name: str) -> None:
    backend, dims = EXPECTED[name]
    with open_slide(wsi[name], mpp=OVERRIDES.get(name)) as slide:
        assert slide.backend == backend
        assert slide.level_dimensions == dims
        assert slide.level_downsamples[0] == 1.0
        w, h = dims[-1]
        level = slide.read_level(slide.level_count - 1)
        assert level.shape == (h, w, 3) and level.dtype == np.uint8
        assert level.std() > 10  # real tissue, not a blank fill


def test_aperio_mpp_is_found_where_cucim_spacing_says_one(wsi: dict[str, Path]) -> None:
    with open_slide(wsi["svs_jpeg"]) as slide:
        assert slide.mpp == pytest.approx(0.499, abs=1e-12)
        assert slide.mpp_source == "Aperio MPP"
        assert float(slide.properties["aperio.MPP"]) == 0.499
    from cucim import CuImage

    assert CuImage(str(wsi["svs_jpeg"])).spacing()[0] == 1.0  # the trap the Aperio parser avoids


def test_ome_pixel_size_and_subifd_levels(wsi: dict[str, Path]) -> None:
    with open_slide(wsi["ome_tiff"]) as slide:
        assert slide.mpp == pytest.approx(0.499, abs=1e-9)
        assert slide.mpp_source == "OME PhysicalSizeX"
        assert slide.level_mpp(3) == pytest.approx(0.499 * 2220 / 277 / 2 + 0.499 * 2967 / 370 / 2, rel=1e-12)
    # OpenSlide and cuCIM see only level 0 of the SubIFD pyramid; forcing them still works at level 0.
    assert open_slide(wsi["ome_tiff"], "openslide").level_count == 1
    assert open_slide(wsi["ome_tiff"], "cucim").level_count == 1


def test_dicom_pixel_spacing_matches_pydicom(wsi: dict[str, Path]) -> None:
    ds = pydicom.dcmread(wsi["dicom"], stop_before_pixels=True)
    spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    with open_slide(wsi["dicom"]) as slide:
        assert slide.mpp == pytest.approx(float(spacing[1]) * 1000, rel=1e-9)
        assert slide.mpp == pytest.approx(28.97, abs=0.005)
    assert pixel_size.from_dicom(wsi["dicom"]) == pytest.approx(float(spacing[1]) * 1000, rel=1e-12)


@pytest.mark.parametrize("name", ["svs_j2k", "ihc_tiff"])
def test_no_pixel_size_is_an_error_unless_overridden(wsi: dict[str, Path], name: str) -> None:
    with pytest.raises(SlideError, match="no pixel size") as err:
        open_slide(wsi[name])
    assert str(wsi[name]) in str(err.value)
    with open_slide(wsi[name], mpp=0.42) as slide:
        assert slide.mpp == 0.42 and slide.mpp_source == "override"


def test_override_beats_the_file(wsi: dict[str, Path]) -> None:
    with open_slide(wsi["svs_jpeg"], mpp=0.25) as slide:
        assert slide.mpp == 0.25


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_backends_agree_on_the_same_file(wsi: dict[str, Path], name: str) -> None:
    readers = _backends_that_open(wsi[name], OVERRIDES.get(name))
    assert EXPECTED[name][0] in readers
    w0, h0 = EXPECTED[name][1][0]
    locations = [(0, 0), (w0 // 3, h0 // 2), (w0 - 150, h0 - 100)]  # the last one crosses the slide's corner
    compared = 0
    for (a, ra), (b, rb) in itertools.combinations(readers.items(), 2):
        for level in range(min(ra.level_count, rb.level_count)):
            for loc in locations:
                x = ra.read_region(loc, level, (200, 160)).astype(np.int16)
                y = rb.read_region(loc, level, (200, 160)).astype(np.int16)
                diff = np.abs(x - y)
                if level == 0 or "openslide" not in (a, b):
                    # Same integer pixel grid and the same JPEG/JPEG 2000 decoders: identical.
                    assert diff.max() == 0, (name, a, b, level, loc)
                else:
                    # OpenSlide resamples a level at the fractional position x / downsample (< 0.5 px off).
                    assert diff.mean() < 6, (name, a, b, level, loc, diff.mean())
                compared += 1
    if name != "dicom":  # the DICOM file opens with OpenSlide only
        assert compared > 0


@pytest.mark.parametrize("backend", ["cucim", "openslide", "tifffile"])
def test_outside_the_slide_reads_white(wsi: dict[str, Path], backend: str) -> None:
    with open_slide(wsi["ihc_tiff"], backend, mpp=IHC_MPP) as slide:
        w, h = slide.level_dimensions[0]
        region = slide.read_region((w - 30, h - 20), 0, (100, 80))
        inside = slide.read_region((w - 30, h - 20), 0, (30, 20))
        assert np.array_equal(region[:20, :30], inside)
        assert (region[20:] == 255).all() and (region[:, 30:] == 255).all()
        negative = slide.read_region((-10, -5), 0, (40, 30))
        assert (negative[:5] == 255).all() and (negative[:, :10] == 255).all()
        assert np.array_equal(negative[5:, 10:], slide.read_region((0, 0), 0, (30, 25)))
        assert (slide.read_region((w + 5, 0), 0, (10, 10)) == 255).all()


def test_level_coordinates_are_floor_of_level0_over_downsample(wsi: dict[str, Path]) -> None:
    with open_slide(wsi["ihc_tiff"], "tifffile", mpp=IHC_MPP) as slide:
        level1 = tifffile.TiffFile(wsi["ihc_tiff"]).pages[1].asarray()
        ds = slide.level_downsamples[1]
        for x0, y0 in [(0, 0), (400, 400), (801, 333)]:
            lx, ly = int(np.floor(x0 / ds)), int(np.floor(y0 / ds))
            region = slide.read_region((x0, y0), 1, (50, 40))
            assert np.array_equal(region, level1[ly:ly + 40, lx:lx + 50])


def _truncated(src: Path, dst: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def test_broken_files_raise_slide_errors_naming_the_file(wsi: dict[str, Path], tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "random.svs").write_bytes(rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    (tmp_path / "empty.svs").write_bytes(b"")
    cases = {
        tmp_path / "random.svs": "no reader can open it",
        tmp_path / "empty.svs": "empty file",
        tmp_path / "missing.svs": "file not found",
        _truncated(wsi["svs_jpeg"], tmp_path / "truncated.svs", 0.5): "no reader can open it",
        tmp_path: "not a regular file",
    }
    for path, reason in cases.items():
        with pytest.raises(SlideError, match=reason) as err:
            open_slide(path)
        assert err.value.path == str(path)
        assert str(path) in str(err.value)


def test_wrongly_named_file_is_read_by_its_content(wsi: dict[str, Path], tmp_path: Path) -> None:
    disguised = tmp_path / "really_dicom.svs"
    disguised.write_bytes(wsi["dicom"].read_bytes())
    with open_slide(disguised) as slide:
        assert slide.backend == "openslide"
        assert slide.mpp == pytest.approx(28.969, abs=1e-6)


def test_unknown_reader_name() -> None:
    with pytest.raises(ValueError, match="unknown slide reader 'pillow'"):
        open_slide("x.svs", "pillow")


def test_pixel_size_parsers_against_hand_computed_values(tmp_path: Path) -> None:
    assert pixel_size.from_aperio("Aperio Image Library v11\n46000x32914|AppMag = 20|MPP = 0.4990|x = 1") == 0.499
    assert pixel_size.from_aperio("generic tiff |MPP = 0.5") is None
    ome = ('<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Image><Pixels PhysicalSizeX="250" '
           'PhysicalSizeXUnit="nm" PhysicalSizeY="250"/></Image></OME>')
    assert pixel_size.from_ome(ome) == pytest.approx(0.25, rel=1e-12)
    assert pixel_size.from_ome(ome.replace(' PhysicalSizeXUnit="nm"', "").replace("250", "0.5", 1)) == 0.5
    philips = '<Attribute Name="DICOM_PIXEL_SPACING" Group="0x0028" PMSVR="IDoubleArray">"0.000227" "0.000226"'
    assert pixel_size.from_philips(philips) == pytest.approx(0.226, rel=1e-12)
    assert pixel_size.from_openslide({"openslide.mpp-x": "0.2527"}) == 0.2527
    assert pixel_size.from_openslide({"openslide.mpp-x": "n/a"}) is None

    image = np.zeros((32, 32, 3), np.uint8)
    for name, resolution, unit, expected in [
        ("cm.tif", (20040.08, 20040.08), "CENTIMETER", 1e4 / 20040.08),
        ("inch.tif", (50800.0, 50800.0), "INCH", 25400 / 50800),
        ("none.tif", (1.0, 1.0), "NONE", None),
    ]:
        tifffile.imwrite(tmp_path / name, image, resolution=resolution, resolutionunit=unit)
        with tifffile.TiffFile(tmp_path / name) as tif:
            got = pixel_size.from_tiff_resolution(tif.pages.first)
        assert got == (pytest.approx(expected, rel=1e-6) if expected else None), name
