"""Embedding real tiles: shapes, pooling, determinism, file round trips, and every kind of WEIGHTS."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from eval_support import tiny_cfg
from PIL import Image

from foundation.config import save_config, to_dict
from foundation.eval.checkpoints import unpartition
from foundation.eval.embed import Embeddings, extract, load_embeddings, loader, save_embeddings
from foundation.eval.encoder import StainEncoder
from foundation.eval.tiles import TileDataset, load_tile, scan_tiles
from foundation.eval.weights import load_encoder
from foundation.export import export_backbone
from foundation.models.backbone import build_backbone
from foundation.objectives import build_objective
from stain.vocabulary import StainVocabulary

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def kather(data_dir):
    return scan_tiles(data_dir / "tiles" / "kather2016_crc_texture", [".tif"])


@pytest.fixture(scope="module")
def cfg():
    return tiny_cfg()


def images_of(tiles, size: int) -> torch.Tensor:
    return torch.stack([TileDataset(tiles.paths, size)[i] for i in range(len(tiles))])


def test_scan_reads_class_folders_and_rejects_ambiguous_layouts(kather, tmp_path):
    assert len(kather) == 24 and len(kather.class_names) == 8
    assert np.bincount(kather.labels).tolist() == [3] * 8
    assert kather.relative_names()[0].startswith("01_TUMOR/")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").symlink_to(kather.paths[0])
    (tmp_path / "top.png").symlink_to(kather.paths[1])
    with pytest.raises(ValueError, match="mixes tiles at its top level"):
        scan_tiles(tmp_path, [".png"])
    assert scan_tiles(tmp_path, [".png"], labelled=False).labels is None
    with pytest.raises(ValueError, match="no tiles in"):
        scan_tiles(tmp_path / "a", [".jpg"])


def test_tiles_are_resized_and_centre_cropped(data_dir):
    path = data_dir / "tiles" / "bracs_roi" / "PB_pathological_benign" / "1231_pathologicalbenign_23.png"
    tile = load_tile(path, 64)
    assert tile.shape == (64, 64, 3) and tile.dtype == np.uint8
    source = Image.open(path).convert("RGB")
    assert source.size == (691, 480)  # shorter side 480 -> 64: width 691 * 64 / 480 = 92.1 -> 92, 14 px cut left
    want = np.asarray(source.resize((92, 64), Image.Resampling.BICUBIC))[:, 14:78]
    np.testing.assert_array_equal(tile, want)


def test_random_encoder_features_have_the_right_shapes_and_pooling(kather, cfg):
    enc = load_encoder("random:", cfg)
    images = images_of(kather, 32)
    cls, patch = enc.tokens(images)
    assert cls.shape == (24, 64) and patch.shape == (24, 2, 2, 64)
    with torch.no_grad():
        ids = torch.zeros(24, dtype=torch.long)
        out = enc.model.forward_features(enc.normalise(images), ids, ids)
    torch.testing.assert_close(cls, out["cls"], rtol=0, atol=0)
    torch.testing.assert_close(enc.features(images, "mean_patch"), out["patch"].mean(1), rtol=1e-6, atol=1e-6)
    both = enc.features(images, "both")
    assert both.shape == (24, 128)
    torch.testing.assert_close(both[:, :64], cls, rtol=0, atol=0)


def test_embedding_is_deterministic_and_batch_independent(kather, cfg):
    enc = load_encoder("random:", cfg)
    data = TileDataset(kather.paths, 32)
    a = extract({"e": enc}, loader(data, 24, 0, CPU), "both", CPU)["e"]
    b = extract({"e": enc}, loader(data, 24, 0, CPU), "both", CPU)["e"]
    c = extract({"e": load_encoder("random:", cfg)}, loader(data, 5, 0, CPU), "both", CPU)["e"]
    assert a.dtype == np.float32 and a.shape == (24, 128)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)  # batch size may change the matmul blocking only


def test_stain_label_changes_the_features(kather, cfg):
    images = images_of(kather, 32)[:4]
    unknown = load_encoder("random:", cfg).features(images, "cls")
    he = load_encoder("random:", cfg, stain="H&E").features(images, "cls")
    assert not torch.allclose(unknown, he)
    with pytest.raises(KeyError, match="unknown stain 'Giemza'"):
        load_encoder("random:", cfg, stain="Giemza")


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_feature_files_round_trip(tmp_path, suffix):
    rng = np.random.default_rng(0)
    emb = Embeddings(rng.normal(size=(5, 3)).astype(np.float32), [f"c/{i}.png" for i in range(5)],
                     np.arange(5), ["a", "b", "c", "d", "e"],
                     {"x": np.arange(5, dtype=np.int64), "slide_id": np.array(list("vwxyz"))}, {"pooling": "cls"})
    back = load_embeddings(save_embeddings(tmp_path / f"f{suffix}", emb))
    np.testing.assert_array_equal(back.features, emb.features)
    np.testing.assert_array_equal(back.labels, emb.labels)
    np.testing.assert_array_equal(back.arrays["x"], emb.arrays["x"])
    assert back.arrays["slide_id"].tolist() == list("vwxyz")
    assert back.paths == emb.paths and back.class_names == emb.class_names and back.metadata == {"pooling": "cls"}
    with pytest.raises(ValueError, match=r"must end in one of"):
        save_embeddings(tmp_path / "f.pt", emb)


def test_export_encoder_matches_the_backbone_it_was_exported_from(kather, cfg, tmp_path):
    vocab = StainVocabulary.from_config(to_dict(cfg.stain))
    torch.manual_seed(5)
    backbone = build_backbone(to_dict(cfg.model), vocab.num_stains, vocab.num_markers).eval()
    mean, std = [0.7, 0.5, 0.6], [0.2, 0.25, 0.2]
    export_backbone(backbone, to_dict(cfg.model), vocab, tmp_path / "export", mean=mean, std=std)
    images = images_of(kather, 32)[:6]
    ki67 = vocab.label("IHC", "Ki67")
    direct = StainEncoder(backbone, "direct", mean, std, 32, to_dict(cfg.model), ki67.stain_id, ki67.marker_id)
    exported = load_encoder(str(tmp_path / "export"), cfg, stain="IHC", marker="Ki67")
    assert exported.mean == tuple(mean) and exported.std == tuple(std)
    for a, b in zip(direct.tokens(images), exported.tokens(images), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    twin = exported.random_twin(0)
    assert type(twin.model) is type(exported.model) and twin.embed_dim == exported.embed_dim
    assert not torch.allclose(twin.features(images, "cls"), exported.features(images, "cls"))


def fake_run(tmp_path, cfg, teacher_state=None, student_state=None, tag="step_00000010"):
    """A run folder in the trainer's checkpoint layout (foundation/train/checkpoint.py)."""
    run = tmp_path / "run"
    (run / "checkpoints" / tag).mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    (run / "checkpoints" / "latest").write_text(tag)
    if teacher_state is not None:
        for name, state in teacher_state.items():
            (run / "checkpoints" / tag / "teacher").mkdir(exist_ok=True)
            torch.save(state, run / "checkpoints" / tag / "teacher" / name)
    if student_state is not None:
        torch.save({"module": student_state}, run / "checkpoints" / tag / "mp_rank_00_model_states.pt")
    return run


def perturbed_objective(cfg, seed: int):
    torch.manual_seed(seed)
    objective = build_objective(cfg)
    teacher = objective.build_teacher()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p))  # a teacher that differs from the student and from any fresh init
    return objective, teacher


def test_checkpoint_teacher_is_loaded_by_default_and_student_on_request(kather, cfg, tmp_path):
    objective, teacher = perturbed_objective(cfg, seed=11)
    run = fake_run(tmp_path, cfg, {"full.pt": teacher.state_dict()}, objective.state_dict())
    images = images_of(kather, 32)[:4]
    ids = torch.zeros(4, dtype=torch.long)
    for path in (run, run / "checkpoints", run / "checkpoints" / "step_00000010"):
        enc = load_encoder(str(path), cfg)
        assert enc.name.startswith("teacher of")
        with torch.no_grad():
            want = objective.teacher_backbone(teacher).eval().forward_features(enc.normalise(images), ids, ids)
        torch.testing.assert_close(enc.tokens(images)[0], want["cls"], rtol=0, atol=0)
    student = load_encoder(str(run), cfg, student=True)
    for (name, got), want in zip(student.model.state_dict().items(), objective.backbone().state_dict().values(),
                                 strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)


def test_zero3_teacher_shards_are_reassembled(cfg, tmp_path):
    objective, teacher = perturbed_objective(cfg, seed=12)
    world = 3
    shards = [{} for _ in range(world)]
    for name, p in teacher.named_parameters():  # DeepSpeed's layout: pad to world * ceil(n / world), equal slices
        per = -(-p.numel() // world)
        flat = torch.cat([p.detach().flatten(), torch.zeros(per * world - p.numel())])
        for r in range(world):
            shards[r][f"shard.{name}"] = flat[r * per:(r + 1) * per].clone()
    for name, b in teacher.named_buffers():
        for r in range(world):
            shards[r][f"buffer.{name}"] = b.clone()
    run = fake_run(tmp_path, cfg, {f"rank_{r:05d}.pt": s for r, s in enumerate(shards)})
    enc = load_encoder(str(run), cfg)
    want = objective.teacher_backbone(teacher).state_dict()
    for name, got in enc.model.state_dict().items():
        torch.testing.assert_close(got, want[name], rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="slices of"):
        unpartition([torch.zeros(3), torch.zeros(2)], torch.Size([5]), "w")


def test_bad_weights_are_named(cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_encoder(str(tmp_path / "nowhere"), cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither an export folder"):
        load_encoder(str(tmp_path / "empty"), cfg)
    objective, _ = perturbed_objective(cfg, seed=13)
    run = fake_run(tmp_path, cfg, student_state=objective.state_dict())
    with pytest.raises(ValueError, match="no teacher/ folder"):
        load_encoder(str(run), cfg)
