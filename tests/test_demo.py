"""The embedded demo data set: determinism, readers, stain behaviour, IHC provenance, glass."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from cucim import CuImage
from PIL import Image
from scipy import ndimage
from skimage import data
from skimage.color import rgb2hed, rgb2hsv
from skimage.transform import downscale_local_mean

from foundation.cli import main as cli_main
from foundation.config import ConfigError, load_config
from foundation.demo import MANIFEST_COLUMNS, DemoSpec, demo_slides, write_demo_dataset
from foundation.demo.dataset import write_listing, write_slide
from foundation.demo.he import HESlide
from foundation.demo.ihc import IHCSlide
from foundation.demo.pyramid import downsample2
from stain.vocabulary import StainVocabulary

# Compression artefacts (ringing, 4:2:0 chroma) fill the 16 x 16 JPEG block of an edge: pixels this far from
# tissue lie in a block of pure glass, whatever the block alignment (16 * sqrt(2) plus chroma upsampling).
JPEG_REACH = 24
SMALL = ["demo.he_size=[768,512]", "demo.ihc_size=[768,512]", "demo.he_slides=1", "demo.ihc_slides=1"]


@pytest.fixture(scope="module")
def cfg():
    return load_config()


@pytest.fixture(scope="module")
def spec(cfg) -> DemoSpec:
    return DemoSpec.from_config(cfg.demo)


@pytest.fixture(scope="module")
def demo(tmp_path_factory, spec) -> tuple[Path, dict[str, HESlide | IHCSlide]]:
    """The default demo set, written once for the module, with what the synthesis drew (masks, offsets).

    Built from the same two steps as ``write_demo_dataset`` (whose own output the determinism and
    command tests check) so that no slide is synthesised twice.
    """
    out = tmp_path_factory.mktemp("demo")
    slides = demo_slides(spec)
    truths = {slide.name: write_slide(out, slide, spec) for slide in slides}
    write_listing(out, spec, slides)
    return out, truths


@pytest.fixture(scope="module")
def demo_dir(demo) -> Path:
    return demo[0]


@pytest.fixture(scope="module")
def truths(demo) -> dict[str, HESlide | IHCSlide]:
    return demo[1]


def _slides(spec: DemoSpec) -> list[str]:
    return [s.filename for s in demo_slides(spec)]


def _read_manifest(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _level0(path: Path) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        return tif.pages[0].asarray()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    small = load_config(overrides=SMALL).demo
    a = write_demo_dataset(tmp_path / "a", small).parent
    b = write_demo_dataset(tmp_path / "b", small).parent
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert names == ["README.txt", "demo_he_01.svs", "demo_ihc_01.svs", "manifest.csv"]
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # The module fixture's two steps write the same bytes as write_demo_dataset.
    small_spec = DemoSpec.from_config(small)
    (tmp_path / "steps").mkdir()
    for slide in demo_slides(small_spec):
        write_slide(tmp_path / "steps", slide, small_spec)
    write_listing(tmp_path / "steps", small_spec, demo_slides(small_spec))
    for name in names:
        assert (tmp_path / "steps" / name).read_bytes() == (a / name).read_bytes(), name
    c = write_demo_dataset(tmp_path / "c", load_config(overrides=[*SMALL, "demo.seed=1"]).demo).parent
    for name in ("demo_he_01.svs", "demo_ihc_01.svs"):
        assert (a / name).read_bytes() != (c / name).read_bytes(), name
    assert (a / "manifest.csv").read_bytes() == (c / "manifest.csv").read_bytes()


def test_slide_content_does_not_depend_on_the_number_of_slides(tmp_path, spec):
    one = write_demo_dataset(tmp_path / "one", load_config(overrides=SMALL).demo).parent
    two = write_demo_dataset(tmp_path / "two", load_config(overrides=[*SMALL, "demo.he_slides=2"]).demo).parent
    assert (one / "demo_he_01.svs").read_bytes() == (two / "demo_he_01.svs").read_bytes()
    assert (one / "demo_he_01.svs").read_bytes() != (two / "demo_he_02.svs").read_bytes()


def test_manifest_and_readme(demo_dir, spec):
    rows = _read_manifest(demo_dir / "manifest.csv")
    assert tuple(rows[0].keys()) == MANIFEST_COLUMNS
    assert [r["path"] for r in rows] == _slides(spec)
    assert len({r["group"] for r in rows}) == len(rows)  # one group per slide
    vocab = StainVocabulary()
    for r in rows:
        assert not Path(r["path"]).is_absolute() and (demo_dir / r["path"]).is_file()
        assert float(r["mpp"]) == spec.mpp
        label = vocab.label(r["stain"], r["marker"])
        if r["path"].startswith("demo_he"):
            assert (r["stain"], r["marker"]) == ("H&E", "") and vocab.stain_kind(label.stain_id) == "he"
        else:
            assert (r["stain"], r["marker"]) == ("IHC", "DAB") and vocab.stain_kind(label.stain_id) == "ihc"
            assert vocab.marker_name(label.marker_id) == "DAB"
    readme = (demo_dir / "README.txt").read_text()
    assert "immunohistochemistry()" in readme and "synthetic H&E" in readme and f"MPP = {spec.mpp:g}" in readme
    total = sum(p.stat().st_size for p in demo_dir.iterdir())
    assert total < 8 * 2**20, f"demo set is {total} bytes"


def test_tifffile_sees_tiled_jpeg_pyramid_with_pixel_size(demo_dir, spec):
    for name in _slides(spec):
        with tifffile.TiffFile(demo_dir / name) as tif:
            pages = list(tif.pages)
            assert len(pages) == spec.levels
            w0 = pages[0].imagewidth
            desc = pages[0].description
            assert desc.startswith("Aperio Image Library")
            assert re.search(rf"\|MPP = {spec.mpp:g}(\||$)", desc) and f"|AppMag = {spec.app_mag:g}" in desc
            for i, page in enumerate(pages):
                assert page.is_tiled and (page.tilewidth, page.tilelength) == (spec.tile, spec.tile)
                assert page.compression == tifffile.COMPRESSION.JPEG
                assert page.photometric == tifffile.PHOTOMETRIC.YCBCR
                assert page.imagewidth == -(-w0 // 2**i)
                # Pixels per centimetre on every level: 1e4 / (µm/px of that level).
                x_num, x_den = page.tags["XResolution"].value
                assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
                assert 1e4 / (x_num / x_den) == pytest.approx(spec.mpp * w0 / page.imagewidth)
                # Standalone JPEG tiles (no shared JPEGTables): SOI marker first.
                assert page.jpegtables is None
                tif.filehandle.seek(page.dataoffsets[0])
                assert tif.filehandle.read(2) == b"\xff\xd8"


def test_raw_tiles_decode_alone_to_the_readers_pixels(demo_dir, spec):
    """A tile's bytes are a complete JPEG (the GPU-decode path): PIL decodes it to tifffile's and cuCIM's pixels."""
    path = demo_dir / _slides(spec)[0]
    cu = CuImage(str(path))
    with tifffile.TiffFile(path) as tif:
        for level, page in enumerate(tif.pages):
            across = -(-page.imagewidth // spec.tile)
            row, col = page.imagelength // spec.tile // 2, across // 2  # a tile in the middle, on tissue
            tif.filehandle.seek(page.dataoffsets[row * across + col])
            raw = tif.filehandle.read(page.databytecounts[row * across + col])
            decoded = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
            y, x = row * spec.tile, col * spec.tile
            assert np.array_equal(decoded, page.asarray()[y : y + spec.tile, x : x + spec.tile]), level
            scale = 2**level
            region = np.asarray(cu.read_region((x * scale, y * scale), (spec.tile, spec.tile), level=level))
            assert np.array_equal(decoded, region), level
            assert decoded.std() > 10  # tissue, not glass


def test_cucim_and_openslide_agree_on_levels_pixel_size_and_pixels(demo_dir, spec):
    for name in _slides(spec):
        path = str(demo_dir / name)
        osl = openslide.OpenSlide(path)
        cu = CuImage(path)
        size = spec.he_size if "_he_" in name else spec.ihc_size
        expected = [(-(-size[0] // 2**i), -(-size[1] // 2**i)) for i in range(spec.levels)]
        assert list(osl.level_dimensions) == expected
        assert [tuple(d) for d in cu.resolutions["level_dimensions"]] == expected
        assert osl.properties["openslide.vendor"] == "aperio"
        assert float(osl.properties[openslide.PROPERTY_NAME_MPP_X]) == spec.mpp
        assert float(osl.properties[openslide.PROPERTY_NAME_MPP_Y]) == spec.mpp
        assert float(cu.metadata["aperio"]["MPP"]) == spec.mpp
        assert cu.spacing()[:2] == [spec.mpp, spec.mpp]  # from X/YResolution
        for level in range(spec.levels):
            w, h = expected[level]
            region = (min(300, w), min(300, h))
            loc = (w // 3 * 2**level, h // 3 * 2**level)  # level-0 coordinates in both libraries
            a = np.asarray(cu.read_region(loc, region, level=level))
            b = np.asarray(osl.read_region(loc, level, region).convert("RGB"))
            assert a.shape == b.shape == (region[1], region[0], 3)
            assert np.abs(a.astype(int) - b).max() <= 2, (name, level)
        osl.close()


def test_he_deconvolution_separates_nuclei_and_stroma(demo_dir, spec, truths):
    slide = demo_slides(spec)[0]
    truth = truths[slide.name]
    pixels = np.asarray(CuImage(str(demo_dir / slide.filename)).read_region((0, 0), spec.he_size, level=0))
    # The file holds the synthesis, through JPEG.
    assert np.abs(pixels.astype(np.int16) - truth.rgb).mean() < 3.0
    sub = (slice(None, None, 2), slice(None, None, 2))  # every 4th pixel keeps the test quick
    hed = rgb2hed(pixels[sub])
    nuclei = ndimage.binary_erosion(truth.nuclei, iterations=1)[sub]
    stroma = (truth.stroma & ~ndimage.binary_dilation(truth.nuclei | truth.holes, iterations=2))[sub]
    tissue = truth.tissue[sub]
    assert nuclei.sum() > 5_000 and stroma.sum() > 50_000
    h_nuc, h_str = hed[nuclei, 0].mean(), hed[stroma, 0].mean()
    e_nuc, e_str = hed[nuclei, 1].mean(), hed[stroma, 1].mean()
    assert h_nuc > 4 * h_str, (h_nuc, h_str)
    assert e_str > 2 * e_nuc, (e_str, e_nuc)
    # Per pixel too: hematoxylin separates nuclei from stroma almost perfectly.
    threshold = (h_nuc + h_str) / 2
    assert (hed[nuclei, 0] > threshold).mean() > 0.9 and (hed[stroma, 0] < threshold).mean() > 0.95
    # No DAB in H&E: the D channel stays at its glass level.
    glass = ~ndimage.binary_dilation(truth.tissue, iterations=JPEG_REACH)[sub]
    assert hed[tissue, 2].mean() < 1.5 * hed[glass, 2].mean()


def _mirrored_plane(image: np.ndarray) -> np.ndarray:
    """Two periods per axis of the plane tiled with ``image`` and its mirror images (numpy's symmetric pad)."""
    h, w = image.shape[:2]
    cell = np.pad(image, ((0, h), (0, w), (0, 0)), mode="symmetric")
    return np.tile(cell, (2, 2, 1))


def _core_window(core: np.ndarray, offset: tuple[int, int], side: int, scale: int) -> tuple[int, int] | None:
    """Top-left (y, x) of a side x side window inside ``core`` whose plane position is a multiple of ``scale``."""
    oy, ox = offset
    for y in range(-oy % scale, core.shape[0] - side, scale * 8):
        for x in range(-ox % scale, core.shape[1] - side, scale * 8):
            if core[y : y + side, x : x + side].all():
                return y, x
    return None


def test_ihc_slides_hold_the_scikit_image_pixels(demo_dir, spec, truths):
    source = data.immunohistochemistry()
    s = spec.ihc_scale
    h, w = source.shape[:2]
    upsampled = np.asarray(Image.fromarray(source).resize((w * s, h * s), Image.Resampling.LANCZOS))
    source_plane, up_plane = _mirrored_plane(source), _mirrored_plane(upsampled)
    offsets = set()
    for slide in [d for d in demo_slides(spec) if d.kind == "ihc"]:
        truth = truths[slide.name]
        offsets.add(truth.offset)
        side = 64 * s
        found = _core_window(truth.core, truth.offset, side, s)
        assert found is not None, slide.name
        y, x = found
        osl = openslide.OpenSlide(str(demo_dir / slide.filename))
        crop = np.asarray(osl.read_region((x, y), 0, (side, side)).convert("RGB"))
        py, px = (y + truth.offset[0]) % (2 * h * s), (x + truth.offset[1]) % (2 * w * s)
        ref = up_plane[py : py + side, px : px + side]
        assert np.abs(crop.astype(int) - ref).mean() < 2.5, slide.name
        # Independent of the resampler: s x s block means give back the original scikit-image pixels.
        blocks = downscale_local_mean(crop.astype(float), (s, s, 1))
        orig = source_plane[py // s : py // s + side // s, px // s : px // s + side // s]
        assert np.abs(blocks - orig).mean() < 3.0, slide.name
        # A clear DAB channel on the tissue, none on the glass.
        level = 1
        hed = rgb2hed(np.asarray(osl.read_region((0, 0), level, osl.level_dimensions[level]).convert("RGB")))
        tissue = truth.tissue[:: 2**level, :: 2**level]
        glass = ~ndimage.binary_dilation(truth.tissue, iterations=JPEG_REACH * 2**level)[:: 2**level, :: 2**level]
        dab_tissue, dab_glass = hed[tissue, 2].mean(), hed[glass, 2].mean()
        assert dab_tissue > 10 * dab_glass, (dab_tissue, dab_glass)
        assert dab_tissue > hed[tissue, 0].mean()  # brown dominates this image
        osl.close()
    assert len(offsets) == spec.ihc_slides  # a different window per slide


def _saturation_and_density(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV saturation and summed RGB optical density (base 10, white = 255)."""
    saturation = rgb2hsv(rgb)[..., 1]
    density = -np.log10(np.maximum(rgb, 1) / 255.0).sum(axis=-1)
    return saturation, density


def test_glass_is_bright_and_grey_and_tissue_is_stained(demo_dir, spec, cfg, truths):
    """Background and tissue as the tissue detector's thresholds (cfg.tissue) expect them."""
    for slide in demo_slides(spec):
        level = spec.levels - 1
        osl = openslide.OpenSlide(str(demo_dir / slide.filename))
        thumb = np.asarray(osl.read_region((0, 0), level, osl.level_dimensions[level]).convert("RGB"))
        osl.close()
        truth = truths[slide.name]
        # Lumens and fat vacuoles are as empty as glass.
        tissue = truth.tissue & ~truth.holes if isinstance(truth, HESlide) else truth.tissue
        small = downscale_local_mean(tissue.astype(float), (2**level, 2**level))[: thumb.shape[0], : thumb.shape[1]]
        # Glass: out of the reach of JPEG artefacts of any tissue edge.
        glass = ndimage.distance_transform_edt(small == 0) > JPEG_REACH
        inside = ndimage.binary_erosion(small == 1, iterations=2)
        saturation, density = _saturation_and_density(thumb)
        assert glass.mean() > 0.3 and inside.mean() > 0.1, slide.name
        assert saturation[glass].max() < cfg.tissue.min_saturation, slide.name
        assert density[glass].max() < cfg.tissue.min_optical_density, slide.name
        assert thumb[glass].min() > 0.9 * 255, slide.name  # bright
        assert abs(np.median(thumb[glass], axis=0) - np.asarray(spec.glass_rgb)).max() <= 1
        # Every slide border is glass.
        border = np.ones_like(glass)
        border[2:-2, 2:-2] = False
        assert not (small[border] > 0).any(), slide.name
        def is_stained(rgb: np.ndarray) -> np.ndarray:
            saturation, density = _saturation_and_density(rgb)
            return (saturation >= cfg.tissue.min_saturation) & (density >= cfg.tissue.min_optical_density)

        fraction = is_stained(thumb)[inside].mean()
        if isinstance(truth, HESlide):
            assert fraction > 0.95, (slide.name, fraction)
        else:
            # The real IHC image has its own lumens and pale areas: as much of the slide's tissue is stained
            # as of the source pixels under it (nearest source pixel of each thumbnail pixel).
            plane = _mirrored_plane(data.immunohistochemistry())
            rows, cols = (
                ((np.arange(n) * 2**level + off) // spec.ihc_scale) % (plane.shape[axis] // 2)
                for axis, (n, off) in enumerate(zip(thumb.shape[:2], truth.offset, strict=True))
            )
            expected = is_stained(plane[rows[:, None], cols[None, :]])[inside].mean()
            assert fraction == pytest.approx(expected, abs=0.05), (slide.name, fraction, expected)


def test_downsample2_matches_box_mean():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 50, 3), dtype=np.uint8)
    half = downsample2(image)
    assert half.shape == (19, 25, 3)
    even = image[:36]
    ref = np.floor(downscale_local_mean(even.astype(float), (2, 2, 1)) + 0.5)
    assert np.array_equal(half[:18], ref.astype(np.uint8))
    # The odd last row is averaged with itself (edge replication).
    ref_last = np.floor((image[36, 0::2].astype(float) + image[36, 1::2]) / 2 + 0.5)
    assert np.array_equal(half[18], ref_last.astype(np.uint8))


@pytest.mark.parametrize(
    "override,key",
    [
        ("demo.tile=100", "demo.tile"),
        ("demo.he_size=[0,512]", "demo.he_size"),
        ("demo.jpeg_quality=0", "demo.jpeg_quality"),
        ("demo.tissue.radius=[0.4,0.45]", "demo.tissue"),
        ("demo.he.nucleus_h_od=[0.9,0.2]", "demo.he.nucleus_h_od"),
        ("demo.he.nucleus_elongation=[0.5,2]", "demo.he.nucleus_elongation"),
        ("demo.glass_rgb=[255,255]", "demo.glass_rgb"),
        ("demo.levels=20", "demo.he_size"),
    ],
)
def test_bad_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        DemoSpec.from_config(load_config(overrides=[override]).demo)


def test_command_writes_the_set_and_rejects_bad_overrides(tmp_path, caplog):
    out = tmp_path / "cli"
    argv = ["demo-data", str(out), *SMALL, "demo.ihc_slides=0", "--seed", "7"]
    assert cli_main(argv) == 0
    rows = _read_manifest(out / "manifest.csv")
    assert [r["path"] for r in rows] == ["demo_he_01.svs"]
    assert "seed 7" in (out / "README.txt").read_text()
    api_cfg = load_config(overrides=[*SMALL, "demo.ihc_slides=0", "demo.seed=7"])
    same = write_demo_dataset(tmp_path / "api", api_cfg.demo)
    assert (same.parent / "demo_he_01.svs").read_bytes() == (out / "demo_he_01.svs").read_bytes()
    assert cli_main(["demo-data", str(tmp_path / "bad"), "demo.tiles=3"]) == 2
    assert "demo.tiles" in caplog.text
    (tmp_path / "file").write_text("x")
    assert cli_main(["demo-data", str(tmp_path / "file"), *SMALL]) == 2
    assert "not a directory" in caplog.text
