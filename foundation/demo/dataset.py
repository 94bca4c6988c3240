"""Write the demo data set: slides, ``manifest.csv`` and ``README.txt``."""

from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from foundation.demo.he import HESlide, synthesize_he
from foundation.demo.ihc import IHCSlide, synthesize_ihc
from foundation.demo.pyramid import write_pyramid_tiff
from foundation.demo.spec import DemoSpec
from foundation.fileio import atomic_write_text

log = logging.getLogger(__name__)

MANIFEST = "manifest.csv"
README = "README.txt"
MANIFEST_COLUMNS = ("path", "stain", "marker", "group", "mpp")
SLIDE_SUFFIX = ".svs"


@dataclass(frozen=True)
class DemoSlide:
    """One slide of the demo set: its file name, manifest labels and random stream."""

    name: str
    kind: str  # "he" | "ihc"
    index: int
    stain: str
    marker: str

    @property
    def filename(self) -> str:
        return self.name + SLIDE_SUFFIX

    def rng(self, seed: int) -> np.random.Generator:
        """Independent of how many other slides there are: (seed, kind, index) seeds it."""
        return np.random.default_rng([seed, ("he", "ihc").index(self.kind), self.index])


def demo_slides(spec: DemoSpec) -> list[DemoSlide]:
    """The slides ``spec`` asks for, H&E first."""
    he = [DemoSlide(f"demo_he_{i + 1:02d}", "he", i, "H&E", "") for i in range(spec.he_slides)]
    ihc = [DemoSlide(f"demo_ihc_{i + 1:02d}", "ihc", i, "IHC", "DAB") for i in range(spec.ihc_slides)]
    return he + ihc


def synthesize_slide(slide: DemoSlide, spec: DemoSpec) -> HESlide | IHCSlide:
    """The level-0 image of ``slide`` and what was drawn where (deterministic in ``spec.seed``)."""
    rng = slide.rng(spec.seed)
    if slide.kind == "he":
        return synthesize_he(spec.he_size, spec, rng)
    return synthesize_ihc(spec.ihc_size, spec, rng)


def write_slide(out_dir: Path, slide: DemoSlide, spec: DemoSpec) -> HESlide | IHCSlide:
    """Synthesise ``slide`` and write it as a pyramidal TIFF into ``out_dir``; returns the synthesis."""
    truth = synthesize_slide(slide, spec)
    sizes = write_pyramid_tiff(
        out_dir / slide.filename,
        truth.rgb,
        mpp=spec.mpp,
        app_mag=spec.app_mag,
        tile=spec.tile,
        quality=spec.jpeg_quality,
        levels=spec.levels,
        extra={"Filename": slide.name, "Title": f"foundation demo-data, seed {spec.seed}"},
    )
    log.info("wrote %s (%s, levels %s)", out_dir / slide.filename, slide.stain, sizes)
    return truth


def manifest_text(slides: list[DemoSlide], mpp: float) -> str:
    """CSV text of the manifest: relative paths, one group per slide."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for s in slides:
        writer.writerow([s.filename, s.stain, s.marker, s.name, f"{mpp:g}"])
    return buf.getvalue()


def readme_text(spec: DemoSpec, slides: list[DemoSlide]) -> str:
    """What the files are, how they were made and where their content comes from."""
    names = ", ".join(s.filename for s in slides)
    return f"""\
Demo whole-slide images of the foundation trainer, written by `foundation demo-data` (seed {spec.seed}).
The same seed and config produce byte-identical files. Regenerate rather than edit.

Files: {names}; {MANIFEST} (columns {",".join(MANIFEST_COLUMNS)}; paths relative to this folder).

Format: Aperio-style pyramidal TIFF (OpenSlide vendor "aperio", cuCIM), {spec.levels} levels each half the previous,
{spec.tile}x{spec.tile} tiles, JPEG quality {spec.jpeg_quality} (YCbCr 4:2:0). Pixel size {spec.mpp:g} um/px at
level 0, stored both as Aperio "MPP = {spec.mpp:g}" (AppMag {spec.app_mag:g}) in the ImageDescription and as
X/YResolution in pixels per centimetre on every level. The pixel size is nominal: the content is not a real scan.

demo_he_*: synthetic H&E, not real tissue. Rendered from a stain model: nuclei (hematoxylin), stroma fibres and
cytoplasm (eosin), lumens and fat, tissue pieces on glass; Beer-Lambert with the Ruifrok & Johnston H&E vectors
(scikit-image rgb_from_hed), so colour deconvolution separates hematoxylin and eosin as on real slides.

demo_ihc_*: real IHC pixels: scikit-image's skimage.data.immunohistochemistry() image (colonic glands, FHL2
protein revealed with DAB, hematoxylin counterstain; Center for Microscopy And Molecular Imaging (CMMI), "No known
copyright restrictions"), upsampled {spec.ihc_scale}x (Lanczos), mirrored into a plane, a different window per
slide cut into tissue pieces on glass. Manifest stain "IHC", marker "DAB" (generic DAB stain).
"""


def write_demo_dataset(out_dir: str | os.PathLike, cfg_demo: Any) -> Path:
    """Write the demo slides, ``manifest.csv`` and ``README.txt`` into ``out_dir``; returns the manifest path.

    ``cfg_demo`` is the ``demo`` config node (or a :class:`DemoSpec`). Existing demo files are
    overwritten; other files in ``out_dir`` are left alone.
    """
    spec = cfg_demo if isinstance(cfg_demo, DemoSpec) else DemoSpec.from_config(cfg_demo)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"demo data folder {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    slides = demo_slides(spec)
    for slide in slides:
        write_slide(out, slide, spec)
    return write_listing(out, spec, slides)


def write_listing(out_dir: Path, spec: DemoSpec, slides: list[DemoSlide]) -> Path:
    """Write ``manifest.csv`` and ``README.txt`` for ``slides``; returns the manifest path."""
    manifest = out_dir / MANIFEST
    atomic_write_text(manifest, manifest_text(slides, spec.mpp))
    atomic_write_text(out_dir / README, readme_text(spec, slides))
    return manifest
