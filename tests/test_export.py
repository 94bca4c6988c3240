"""timm round trip: export, strict offline load, identical features; stain folding and refolding."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from foundation.export import (
    CONFIG_FILE,
    STAIN_TOKENS_FILE,
    VOCABULARY_FILE,
    WEIGHTS_FILE,
    export_backbone,
    load_exported,
    set_stain,
    timm_load_args,
)
from foundation.models.backbone import build_backbone
from stain.vocabulary import StainVocabulary
from tests.objective_support import IMG, LOCAL, one_thread, tiny_cfg  # noqa: F401

VOCAB = StainVocabulary()


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Any attempt to reach the Hugging Face Hub fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def trained_like(*overrides: str):
    """A backbone whose weights are all non-trivial (random, not timm's init) in eval mode."""
    cfg = tiny_cfg("ibot", *overrides)
    torch.manual_seed(0)
    model = build_backbone(cfg.model, VOCAB.num_stains, VOCAB.num_markers)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval(), cfg.model


def ids(value: int, n: int = 2) -> torch.Tensor:
    return torch.full((n,), value, dtype=torch.long)


def assert_same_features(ours, timm_model, x, stain_id, marker_id):
    mine = ours.forward_features(x, ids(stain_id, len(x)), ids(marker_id, len(x)))
    theirs = timm_model.forward_features(x)
    assert theirs.shape[1] == mine["tokens"].shape[1]
    assert torch.equal(theirs[:, 0], mine["cls"])
    assert torch.equal(theirs[:, timm_model.num_prefix_tokens:], mine["patch"])
    assert torch.equal(timm_model(x), mine["cls"])                           # timm's pooled output = our CLS


@pytest.mark.parametrize("mode", ["token", "add", "none"])
def test_round_trip_strict_and_identical(tmp_path, mode):
    ours, model_cfg = trained_like(f"model.stain_token.mode={mode}")
    out = export_backbone(ours, model_cfg, VOCAB, tmp_path, mean=[0.5] * 3, std=[0.25] * 3)
    assert {p.name for p in out.iterdir()} >= {WEIGHTS_FILE, CONFIG_FILE, VOCABULARY_FILE}
    assert (out / STAIN_TOKENS_FILE).exists() == (mode != "none")

    arch, kwargs = timm_load_args(out)                                       # the documented timm call
    model = timm.create_model(arch, pretrained=True, **kwargs).eval()
    strict = timm.create_model(arch, pretrained=False, **{k: v for k, v in kwargs.items()
                                                          if k != "pretrained_cfg_overlay"})
    result = strict.load_state_dict(load_file(str(out / WEIGHTS_FILE)), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert tuple(model.pretrained_cfg["mean"]) == (0.5, 0.5, 0.5)

    for side in (IMG, LOCAL):                                                # dynamic image size too
        x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(side))
        assert_same_features(ours, model, x, 0, 0)
    expected_regs = ours.num_reg_tokens + (1 if mode == "token" else 0)
    assert model.num_reg_tokens == expected_regs


def test_folded_label_and_refold(tmp_path):
    ours, model_cfg = trained_like()
    he, ki67 = VOCAB.stain_id("H&E"), VOCAB.marker_id("Ki67")
    out = export_backbone(ours, model_cfg, VOCAB, tmp_path, stain="IHC", marker="Ki67")
    model, info = load_exported(out)
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    assert_same_features(ours, model, x, VOCAB.stain_id("IHC"), ki67)
    assert info["mode"] == "token" and info["folded_label"] == "IHC/Ki67"
    assert info["vocabulary"]["stains"][he]["name"] == "H&E"
    assert torch.equal(info["tables"]["stain_table"], ours.stain_token.stain_table.weight)
    set_stain(model, info, he)
    assert_same_features(ours, model, x, he, 0)


def test_refold_add_mode(tmp_path):
    ours, model_cfg = trained_like("model.stain_token.mode=add")
    model, info = load_exported(export_backbone(ours, model_cfg, VOCAB, tmp_path))
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    set_stain(model, info, 2, 4)
    assert_same_features(ours, model, x, 2, 4)
    with pytest.raises(ValueError, match="outside the tables"):
        set_stain(model, info, 99)


def test_swiglu_and_local_dir(tmp_path):
    ours, model_cfg = trained_like("model.mlp=swiglu", "model.mlp_ratio=2.0")
    out = export_backbone(ours, model_cfg, VOCAB, tmp_path / "swiglu")
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["foundation"]["class_args"] == {"mlp_layer": "timm.layers.SwiGLUPacked"}
    model, _ = load_exported(out)
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    assert_same_features(ours, model, x, 0, 0)
    plain, plain_cfg = trained_like()
    local = timm.create_model(f"local-dir:{export_backbone(plain, plain_cfg, VOCAB, tmp_path / 'mlp')}",
                              pretrained=True).eval()
    assert_same_features(plain, local, x, 0, 0)


def test_export_errors(tmp_path):
    ours, model_cfg = trained_like()
    with pytest.raises(KeyError, match="unknown stain 'Papanicolaou'"):
        export_backbone(ours, model_cfg, VOCAB, tmp_path, stain="Papanicolaou")
    bigger = StainVocabulary(extra_stains=[{"name": "Papanicolaou"}])
    with pytest.raises(ValueError, match="vocabulary has 17 stains"):
        export_backbone(ours, model_cfg, bigger, tmp_path)
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        load_exported(tmp_path / "nothing")
    _, other_cfg = trained_like("model.depth=3")
    with pytest.raises(ValueError, match="do not fit timm"):
        export_backbone(ours, other_cfg, VOCAB, tmp_path)


def test_a_marker_alone_folds_ihc_and_a_marker_on_he_is_refused(tmp_path):
    ours, model_cfg = trained_like()
    _, info = load_exported(export_backbone(ours, model_cfg, VOCAB, tmp_path / "ki67", marker="Ki67"))
    assert info["folded_label"] == "IHC/Ki67"  # as in the manifest: a marker alone means IHC
    assert (info["folded_stain_id"], info["folded_marker_id"]) == (VOCAB.stain_id("IHC"), VOCAB.marker_id("Ki67"))
    with pytest.raises(ValueError, match="marker 'Ki67' given for non-IHC stain 'H&E'"):
        export_backbone(ours, model_cfg, VOCAB, tmp_path / "he", stain="HE", marker="Ki67")


def test_eval_encoder_keeps_the_folded_label_unless_another_is_asked_for(tmp_path):
    from foundation.eval.weights import load_encoder

    ours, model_cfg = trained_like()
    cfg = tiny_cfg("ibot")
    ki67 = export_backbone(ours, model_cfg, VOCAB, tmp_path / "ki67", stain="IHC", marker="Ki67")
    plain = export_backbone(ours, model_cfg, VOCAB, tmp_path / "plain")
    tiles = torch.randint(0, 256, (2, 3, IMG, IMG), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    kept = load_encoder(str(ki67), cfg)
    asked = load_encoder(str(plain), cfg, stain="IHC", marker="Ki67")
    unknown = load_encoder(str(ki67), cfg, stain="unknown")
    assert (kept.label, asked.label, unknown.label) == ("IHC/Ki67", "IHC/Ki67", "unknown")
    assert torch.equal(kept.features(tiles, "cls"), asked.features(tiles, "cls"))
    assert not torch.equal(kept.features(tiles, "cls"), unknown.features(tiles, "cls"))
    assert torch.equal(unknown.features(tiles, "cls"), load_encoder(str(plain), cfg).features(tiles, "cls"))
