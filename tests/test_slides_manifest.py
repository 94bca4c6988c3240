"""Manifest parsing: columns, path resolution, stain vocabulary, errors naming row and value."""

from __future__ import annotations

from pathlib import Path

import pytest

from foundation.slides.manifest import ManifestError, read_manifest
from stain.vocabulary import StainVocabulary


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cases" / "manifest.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_rows_resolve_paths_stains_and_defaults(tmp_path: Path) -> None:
    manifest = _write(tmp_path, "path,stain,marker,group,mpp,slide_id,diagnosis\n"
                                "slides/a.svs,HE,,p1,,,tumour\n"
                                "/abs/b.tif,ihc,ki-67,p2,0.25,B,\n"
                                "../c.ome.tif,,CD8,p2,,,\n"
                                "d.dcm,PAS,,,,,\n")
    rows = read_manifest(manifest)
    vocab = StainVocabulary()
    assert [r.path for r in rows] == [tmp_path / "cases" / "slides" / "a.svs", Path("/abs/b.tif"),
                                      tmp_path / "c.ome.tif", tmp_path / "cases" / "d.dcm"]
    assert [r.slide_id for r in rows] == ["slides/a", "B", "../c.ome", "d"]
    assert [r.stain for r in rows] == ["H&E", "IHC", "IHC", "PAS"]  # a marker alone implies IHC
    assert [r.stain_id for r in rows] == [vocab.stain_id(s) for s in ("H&E", "IHC", "IHC", "PAS")]
    assert [r.marker for r in rows] == ["unknown", "Ki67", "CD8", "unknown"]
    assert rows[1].marker_id == vocab.marker_id("Ki67")
    assert [r.mpp for r in rows] == [None, 0.25, None, None]
    assert [r.group for r in rows] == ["p1", "p2", "p2", ""]
    assert [r.line for r in rows] == [2, 3, 4, 5]


def test_root_overrides_the_manifest_folder(tmp_path: Path) -> None:
    manifest = _write(tmp_path, "path\nx.svs\n")
    assert read_manifest(manifest, root=tmp_path / "store")[0].path == tmp_path / "store" / "x.svs"


def test_extended_vocabulary_from_config(tmp_path: Path) -> None:
    manifest = _write(tmp_path, "path,stain,marker\nx.svs,IHC,SOX10\n")
    with pytest.raises(ManifestError, match="unknown IHC marker 'SOX10'"):
        read_manifest(manifest)
    vocab = StainVocabulary.from_config({"extra_markers": [{"name": "SOX10"}]})
    assert read_manifest(manifest, vocab)[0].marker == "SOX10"


@pytest.mark.parametrize(("text", "message"), [
    ("path,stain\na.svs,HE\nb.svs,Giemsa-ish\n", r"line 3: unknown stain 'Giemsa-ish'"),
    ("path,stain,marker\na.svs,IHC,KI-99\n", r"line 2: unknown IHC marker 'KI-99'"),
    ("path,stain,marker\na.svs,HE,Ki67\n", r"line 2: marker 'Ki67' given for non-IHC stain 'H&E'"),
    ("path,mpp\na.svs,0.5um\n", r"line 2: mpp '0.5um' is not a number"),
    ("path,mpp\na.svs,-1\n", r"line 2: mpp must be a positive number of µm/px, got '-1'"),
    ("path,slide_id\na.svs,s1\nb.svs,s1\n", r"line 3: slide_id 's1' already used on line 2"),
    ("path\na.svs\n./a.svs\n", r"line 3: path './a.svs' already listed on line 2"),
    ("path\na.svs\n,\n", r"line 3: empty path"),
    ("file,stain\na.svs,HE\n", r"no 'path' column"),
    ("path,stain\n", r"no slides listed"),
])
def test_errors_name_the_line_and_the_value(tmp_path: Path, text: str, message: str) -> None:
    manifest = _write(tmp_path, text)
    with pytest.raises(ManifestError, match=message) as err:
        read_manifest(manifest)
    assert str(manifest) in str(err.value)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "none.csv")
