"""Level-0 pixel size (µm/px) from every place scanner vendors put it.

Sources, first match wins: Aperio ``MPP`` in the ImageDescription, OME ``PhysicalSizeX``, Philips
``DICOM_PIXEL_SPACING``, OpenSlide's ``openslide.mpp-x``, DICOM ``PixelSpacing``, TIFF
``XResolution`` + ``ResolutionUnit``. cuCIM's ``spacing()`` is not used: it reports 1 for Aperio SVS.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path

import tifffile

# Micrometres per unit, for OME ``PhysicalSizeXUnit`` and TIFF ``ResolutionUnit``.
_UM_PER_UNIT = {"m": 1e6, "cm": 1e4, "mm": 1e3, "µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "Å": 1e-4, "pm": 1e-6}
_UM_PER_INCH = 25400.0
_UM_PER_MM = 1000.0
_TIFF_UNIT_INCH = 2
_TIFF_UNIT_CM = 3
_DICOM_MAGIC_OFFSET = 128

_APERIO_MPP = re.compile(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)")
_PHILIPS_SPACING = re.compile(r'DICOM_PIXEL_SPACING"[^>]*>\s*"?([0-9.eE+-]+)"?\s+"?([0-9.eE+-]+)"?')


def _positive(value: float | None) -> float | None:
    return value if value is not None and value > 0 and value == value else None  # value == value: not NaN


def from_aperio(description: str) -> float | None:
    """``MPP = 0.499`` in an Aperio ImageDescription (``|``-separated key = value pairs)."""
    if not description.startswith("Aperio"):
        return None
    match = _APERIO_MPP.search(description)
    return _positive(float(match.group(1))) if match else None


def from_ome(xml: str) -> float | None:
    """``PhysicalSizeX`` of the first OME ``Pixels`` element, converted from ``PhysicalSizeXUnit`` (default µm)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for element in root.iter():
        if element.tag.endswith("Pixels") and "PhysicalSizeX" in element.attrib:
            unit = element.attrib.get("PhysicalSizeXUnit", "µm")
            if unit not in _UM_PER_UNIT:
                return None
            return _positive(float(element.attrib["PhysicalSizeX"]) * _UM_PER_UNIT[unit])
    return None


def from_philips(description: str) -> float | None:
    """Philips TIFF XML: ``DICOM_PIXEL_SPACING`` is ``"row" "column"`` in mm."""
    match = _PHILIPS_SPACING.search(description)
    return _positive(float(match.group(2)) * _UM_PER_MM) if match else None


def from_tiff_resolution(page: tifffile.TiffPage) -> float | None:
    """``XResolution`` pixels per inch or per cm; ``ResolutionUnit`` none (1) carries no physical size."""
    tags = page.tags
    if "XResolution" not in tags:
        return None
    unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else _TIFF_UNIT_INCH
    num, den = tags["XResolution"].value
    if not num or not den:
        return None
    pixels_per_unit = num / den
    if unit == _TIFF_UNIT_INCH:
        return _positive(_UM_PER_INCH / pixels_per_unit)
    if unit == _TIFF_UNIT_CM:
        return _positive(_UM_PER_UNIT["cm"] / pixels_per_unit)
    return None


def from_openslide(properties: Mapping[str, str]) -> float | None:
    """OpenSlide's normalised ``openslide.mpp-x`` (DICOM, NDPI, MRXS, SCN, BIF, ...)."""
    value = properties.get("openslide.mpp-x")
    try:
        return _positive(float(value)) if value else None
    except ValueError:
        return None


def is_dicom(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(_DICOM_MAGIC_OFFSET)
        return fh.read(4) == b"DICM"


def from_dicom(path: Path) -> float | None:
    """``PixelSpacing`` (mm, row then column) from the shared functional groups or the top level."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    spacing = None
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and "PixelMeasuresSequence" in shared[0]:
        spacing = shared[0].PixelMeasuresSequence[0].get("PixelSpacing")
    spacing = spacing or ds.get("PixelSpacing")
    return _positive(float(spacing[1]) * _UM_PER_MM) if spacing else None


def from_tiff_file(tif: tifffile.TiffFile) -> tuple[float, str] | None:
    """Pixel size of a TIFF's first page from its description (Aperio, OME, Philips) or resolution tags."""
    page = tif.pages.first
    description = page.description or ""
    for source, value in (
        ("Aperio MPP", from_aperio(description)),
        ("OME PhysicalSizeX", from_ome(tif.ome_metadata) if tif.is_ome and tif.ome_metadata else None),
        ("Philips DICOM_PIXEL_SPACING", from_philips(description) if tif.is_philips else None),
        ("TIFF XResolution", from_tiff_resolution(page)),
    ):
        if value is not None:
            return value, source
    return None


def find_mpp(path: Path, properties: Mapping[str, str] | None = None) -> tuple[float, str] | None:
    """Level-0 µm/px of ``path`` and where it was found, or ``None`` when the file carries none."""
    if is_dicom(path):
        value = from_openslide(properties or {}) or from_dicom(path)
        return (value, "DICOM PixelSpacing") if value else None
    try:
        with tifffile.TiffFile(path) as tif:
            found = from_tiff_file(tif)
    except (tifffile.TiffFileError, ValueError, IndexError):
        found = None
    if found:
        return found
    value = from_openslide(properties or {})
    return (value, "openslide.mpp-x") if value else None
