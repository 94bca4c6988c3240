"""``foundation eval`` and ``foundation embed`` end to end on real tiles and slides with a tiny exported ViT."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from eval_support import HE_IHC_GROUPS, TINY, tiny_cfg
from PIL import Image

from foundation.cli import main
from foundation.config import to_dict
from foundation.eval.embed import extract, load_embeddings, loader
from foundation.eval.embed_cli import INDEX_LABELS
from foundation.eval.tiles import TileDataset, scan_tiles
from foundation.eval.weights import load_encoder
from foundation.export import export_backbone
from foundation.models.backbone import build_backbone
from foundation.slides.readers import open_slide
from stain.vocabulary import StainVocabulary

MEAN, STD = [0.6, 0.5, 0.7], [0.2, 0.2, 0.25]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    cfg = tiny_cfg()
    vocab = StainVocabulary.from_config(to_dict(cfg.stain))
    torch.manual_seed(3)
    backbone = build_backbone(to_dict(cfg.model), vocab.num_stains, vocab.num_markers).eval()
    return export_backbone(backbone, to_dict(cfg.model), vocab, tmp_path_factory.mktemp("export"), mean=MEAN, std=STD)


def test_eval_writes_json_and_markdown_for_encoder_and_baselines(export_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "report" / "he_ihc.json"
    rc = main(["eval", str(export_dir), "--tiles", str(data_dir / "tiles" / "stain_he_vs_ihc"), "--group-by",
               HE_IHC_GROUPS, "--protocol", "knn,linear", "--out", str(out), "eval.splits.seeds=2",
               "eval.linear.C=1.0", *TINY])
    assert rc == 0
    report = json.loads(out.read_text())
    table = out.with_suffix(".md").read_text()
    assert report["table"] == table and table in capsys.readouterr().out
    assert report["task"]["tiles_per_class"] == {"HE": 88, "IHC": 99}
    assert report["task"]["num_sources"] == 23 and report["task"]["group_by"] == HE_IHC_GROUPS
    names = [str(export_dir), "random init", "color histogram"]
    assert list(report["results"]) == names and list(report["sources"]) == names
    assert report["sources"][str(export_dir)]["mean"] == MEAN
    lines = table.strip().splitlines()
    assert lines[0] == "| encoder | protocol | balanced_accuracy | macro_f1 | auroc |" and len(lines) == 2 + 6
    for name in names:
        for protocol in ("knn", "linear"):
            result = report["results"][name][protocol]
            assert [r["seed"] for r in result["runs"]] == [0, 1]
            for metric in ("balanced_accuracy", "macro_f1", "auroc"):
                values = [r[metric] for r in result["runs"]]
                assert all(0.0 <= v <= 1.0 for v in values)
                assert result["summary"][metric]["mean"] == pytest.approx(np.mean(values))
                assert result["summary"][metric]["std"] == pytest.approx(np.std(values))
                mean, std = result["summary"][metric]["mean"], result["summary"][metric]["std"]
                assert f"{mean:.3f} ± {std:.3f}" in table
    assert report["results"]["color histogram"]["knn"]["summary"]["balanced_accuracy"]["mean"] > 0.9


def test_embed_a_class_folder(export_dir, data_dir, tmp_path):
    tiles_dir = data_dir / "tiles" / "kather2016_crc_texture"
    out = tmp_path / "kather.safetensors"
    assert main(["embed", str(export_dir), str(tiles_dir), "--out", str(out), "--pooling", "both",
                 "--stain", "H&E", *TINY]) == 0
    emb = load_embeddings(out)
    tiles = scan_tiles(tiles_dir, [".tif"])
    assert emb.features.shape == (24, 128) and emb.features.dtype == np.float32
    assert emb.paths == tiles.relative_names() and emb.labels.tolist() == tiles.labels.tolist()
    assert emb.class_names == list(tiles.class_names)
    assert emb.metadata["stain"] == "H&E" and emb.metadata["encoder"]["mean"] == MEAN
    encoder = load_encoder(str(export_dir), tiny_cfg(), stain="H&E")
    cpu = torch.device("cpu")
    want = extract({"e": encoder}, loader(TileDataset(tiles.paths, 32), 64, 0, cpu), "both", cpu)["e"]
    np.testing.assert_array_equal(emb.features, want)


def test_embed_sampled_tiles_of_an_indexed_slide_set(export_dir, wsi, tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,stain,marker,group,mpp,slide_id\n"
                        f"{wsi['svs_jpeg']},H&E,,p1,,cmu1\n{wsi['ihc_tiff']},IHC,Ki67,p2,0.5,roi1\n")
    assert main(["index", str(manifest), "--out", str(tmp_path / "index"), "--workers", "1"]) == 0
    out = tmp_path / "slides.npz"
    assert main(["embed", str(export_dir), str(tmp_path / "index"), "--out", str(out), "--slide-tiles", "6",
                 "--image-size", "48", *TINY]) == 0
    emb = load_embeddings(out)
    assert emb.features.shape == (6, 64) and emb.labels is None and emb.metadata["input_kind"] == "slides"
    assert emb.metadata["image_size"] == 48
    index_rows = emb.arrays["index_row"]
    assert len(set(index_rows.tolist())) == 6 and (np.diff(index_rows) > 0).all()
    assert emb.metadata["stain"] == INDEX_LABELS
    # the same tiles read independently, straight from the slides, each with its slide's label
    paths = {"cmu1": wsi["svs_jpeg"], "roi1": wsi["ihc_tiff"]}
    labelled = {"cmu1": load_encoder(str(export_dir), tiny_cfg(), stain="H&E"),
                "roi1": load_encoder(str(export_dir), tiny_cfg(), stain="IHC", marker="Ki67")}
    images, want = [], []
    for i in range(6):
        slide_id = str(emb.arrays["slide_id"][i])
        with open_slide(paths[slide_id], mpp=0.5 if slide_id == "roi1" else None) as slide:
            side = 224 * round(0.5 / slide.mpp)  # index.tile_size at 0.5 µm/px on level 0
            region = slide.read_region((int(emb.arrays["x"][i]), int(emb.arrays["y"][i])), 0, (side, side))
        resized = Image.fromarray(region).resize((48, 48), Image.Resampling.BICUBIC)
        images.append(torch.from_numpy(np.array(resized)).permute(2, 0, 1))
        want.append(labelled[slide_id].features(images[-1][None], "cls")[0].numpy())
        assert emb.paths[i].startswith(f"{slide_id}@")
        assert emb.arrays["group"][i] == {"cmu1": "p1", "roi1": "p2"}[slide_id]  # the manifest's group column
    assert set(emb.arrays["slide_id"].tolist()) == {"cmu1", "roi1"}  # both labels occur in the drawn tiles
    np.testing.assert_allclose(emb.features, np.stack(want), rtol=0, atol=1e-5)  # batch of 1 vs mixed batch
    # one label for all tiles when asked for: the export's own (unknown) here
    assert main(["embed", str(export_dir), str(tmp_path / "index"), "--out", str(tmp_path / "one.npz"),
                 "--slide-tiles", "6", "--image-size", "48", "--stain", "unknown", *TINY]) == 0
    encoder = load_encoder(str(export_dir), tiny_cfg())
    np.testing.assert_array_equal(load_embeddings(tmp_path / "one.npz").features,
                                  encoder.features(torch.stack(images), "cls").numpy())
    # a second run draws the same tiles and gives the same features
    assert main(["embed", str(export_dir), str(tmp_path / "index"), "--out", str(tmp_path / "again.npz"),
                 "--slide-tiles", "6", "--image-size", "48", *TINY]) == 0
    np.testing.assert_array_equal(load_embeddings(tmp_path / "again.npz").features, emb.features)


@pytest.mark.parametrize(("args", "message"), [
    (["embed", "random:", "{tiles}", "--out", "{tmp}/f.csv"], "must end in .npz or .safetensors"),
    (["embed", "random:", "{tmp}/none", "--out", "{tmp}/f.npz"], "none does not exist"),
    (["embed", "random:", "{tiles}", "--out", "{tmp}/f.npz", "--stain", "Giemza"], "unknown stain 'Giemza'"),
    (["embed", "random:", "{tiles}", "--out", "{tmp}/f.npz", "--image-size", "40"], "not a multiple of the patch"),
    (["eval", "random:", "--tiles", "{tiles}", "--out", "{tmp}/r.json", "--group-by", "(x)"], "does not match"),
    (["eval", "random:", "--tiles", "{tiles}", "--out", "{tmp}/r.json", "--protocol", "svm"], "protocols"),
    # checked before the weights are even looked at
    (["eval", "{tmp}/no_weights", "--tiles", "{tiles}", "--out", "{tmp}/r.json", "--protocol", "svm"], "protocols"),
    (["eval", "random:", "--tiles", "{tiles}", "--out", "{tmp}/r.json", "eval.splits.folds=4", "eval.splits.seeds=1"],
     "every class has fewer tiles than eval.splits.folds=4"),
    (["eval", "random:nope", "--tiles", "{tiles}", "--out", "{tmp}/r.json"], "unknown model config 'nope'"),
])
def test_bad_input_exits_2_naming_the_value(args, message, data_dir, tmp_path, caplog):
    tiles = data_dir / "tiles" / "kather2016_crc_texture"
    argv = [a.format(tiles=tiles, tmp=tmp_path) for a in args]
    with caplog.at_level(logging.ERROR):
        assert main([*argv, *TINY]) == 2
    assert message in caplog.text
