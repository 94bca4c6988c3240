"""Stain vocabulary: stable ids, aliases, extensions, labels."""

from __future__ import annotations

import pytest

from stain.vocabulary import BUILTIN_MARKERS, BUILTIN_STAINS, StainLabel, StainVocabulary


def test_unknown_is_id_zero_and_builtin_ids_are_stable():
    v = StainVocabulary()
    assert v.stain_id("unknown") == 0 and v.marker_id("unknown") == 0
    # Frozen ids: changing these breaks every trained stain-token table.
    assert [v.stain_id(n) for n in ("H&E", "IHC", "PAS", "Masson trichrome")] == [1, 2, 3, 4]
    assert [v.marker_id(n) for n in ("DAB", "Ki67", "HER2", "ER", "PR", "CD3", "CD8", "CD20", "CD68",
                                     "PD-L1", "p53", "pan-CK")] == list(range(1, 13))


@pytest.mark.parametrize("alias", ["HE", "h&e", "H & E", "hematoxylin-eosin", "Haematoxylin and Eosin", " he "])
def test_he_aliases(alias):
    assert StainVocabulary().stain_id(alias) == 1


@pytest.mark.parametrize("alias,name", [("ki-67", "Ki67"), ("MIB-1", "Ki67"), ("her2/neu", "HER2"),
                                        ("PDL1", "PD-L1"), ("panCK", "pan-CK"), ("AE1/AE3", "pan-CK")])
def test_marker_aliases(alias, name):
    v = StainVocabulary()
    assert v.marker_name(v.marker_id(alias)) == name


def test_unknown_name_error_names_value():
    with pytest.raises(KeyError, match="Sirius"):
        StainVocabulary().stain_id("Sirius")


def test_extensions_append_after_builtins():
    v = StainVocabulary(extra_stains=[{"name": "Picrosirius red", "aliases": ["sirius"]}],
                        extra_markers=[{"name": "SOX10"}])
    assert v.stain_id("sirius") == len(BUILTIN_STAINS)
    assert v.marker_id("sox10") == len(BUILTIN_MARKERS)
    assert v.stain_kind(v.stain_id("sirius")) == "special"


def test_extension_alias_clash_is_an_error():
    with pytest.raises(ValueError, match="already names"):
        StainVocabulary(extra_markers=[{"name": "Ki-67 clone X", "aliases": ["ki67"]}])


def test_labels():
    v = StainVocabulary()
    assert v.label("H&E") == StainLabel(1, 0)
    assert v.label("IHC", "Ki67") == StainLabel(2, v.marker_id("Ki67"))
    assert v.label("", "HER2") == StainLabel(2, v.marker_id("HER2"))  # a marker implies IHC
    assert v.label(None) == StainLabel(0, 0)
    with pytest.raises(ValueError, match="non-IHC"):
        v.label("H&E", "Ki67")
    assert v.describe(v.label("ihc", "cd3")) == "IHC/CD3"
