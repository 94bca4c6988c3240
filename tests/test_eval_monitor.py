"""The in-training kNN monitor on real H&E/IHC tiles: the probe against a direct computation, collapse signals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from eval_support import HE_IHC_GROUPS, tiny_cfg
from sklearn.metrics import balanced_accuracy_score
from torch import nn

from foundation.config import ConfigError, to_dict
from foundation.eval.monitor import KnnMonitor
from foundation.models.backbone import build_backbone
from stain.vocabulary import StainVocabulary

PER_CLASS = 10


@pytest.fixture(scope="module")
def cfg(data_dir):
    return tiny_cfg(f"eval.monitor.tiles={data_dir / 'tiles' / 'stain_he_vs_ihc'}",
                    f"eval.monitor.max_tiles_per_class={PER_CLASS}", f"eval.monitor.group_by='{HE_IHC_GROUPS}'",
                    "data.crops.global_size=32", "eval.knn.k=5")


@pytest.fixture(scope="module")
def monitor(cfg):
    return KnnMonitor.from_config(cfg)


def backbone_of(cfg, seed: int = 0) -> nn.Module:
    vocab = StainVocabulary.from_config(to_dict(cfg.stain))
    torch.manual_seed(seed)
    return build_backbone(to_dict(cfg.model), vocab.num_stains, vocab.num_markers)


def test_monitor_is_off_without_tiles_and_caches_decoded_tiles(monitor):
    assert KnnMonitor.from_config(tiny_cfg()) is None
    assert len(monitor) == 2 * PER_CLASS
    assert monitor.images.dtype == torch.uint8 and monitor.images.shape == (2 * PER_CLASS, 3, 32, 32)
    assert np.bincount(monitor.labels).tolist() == [PER_CLASS, PER_CLASS]


def test_knn_accuracy_and_feature_std_match_a_direct_computation(cfg, monitor):
    backbone = backbone_of(cfg).train()
    got = monitor(backbone)
    assert backbone.training  # the caller's mode is restored
    backbone.eval()
    mean = torch.tensor(cfg.data.crops.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.crops.std).view(1, 3, 1, 1)
    x = (monitor.images.float() / 255 - mean) / std
    ids = torch.zeros(len(x), dtype=torch.long)
    with torch.no_grad():
        cls = backbone.forward_features(x, ids, ids)["cls"].double()
    z = cls / cls.norm(dim=1, keepdim=True)
    sim = (z @ z.T).numpy()
    preds = []
    for i in range(len(z)):  # DINOv2 vote among the 5 most similar tiles of other sources
        others = np.flatnonzero(monitor.groups != monitor.groups[i])
        top = others[np.argsort(-sim[i, others])[:5]]
        scores = np.bincount(monitor.labels[top], weights=np.exp(sim[i, top] / 0.07), minlength=2)
        preds.append(scores.argmax())
    assert got["knn_balanced_accuracy"] == pytest.approx(balanced_accuracy_score(monitor.labels, preds))
    assert got["feature_std"] == pytest.approx(z.numpy().std(axis=0, ddof=1).mean(), rel=1e-5)


def test_features_that_carry_nothing_score_chance_not_below():
    from foundation.eval.knn import KnnParams
    from foundation.eval.monitor import leave_one_source_out_knn

    labels = np.repeat(np.arange(8), 3)  # 8 classes of 3 tiles, each tile its own source
    proba = leave_one_source_out_knn(torch.ones(24, 16), labels, np.arange(24),
                                     KnnParams(k=20, voting="weighted", temperature=0.07, center=False))
    # k=20 of 23 candidates let the other classes' 3 tiles out-vote a tile's own class' 2: always wrong (0.0)
    assert balanced_accuracy_score(labels, proba.argmax(axis=1)) == pytest.approx(1 / 8)


def test_collapse_shows_in_feature_std_and_head_entropy(cfg, monitor):
    backbone = backbone_of(cfg)
    healthy = monitor(backbone)["feature_std"]
    with torch.no_grad():
        backbone.norm.weight.zero_()
        backbone.norm.bias.fill_(1.0)  # every token -> the same vector: a collapsed encoder
    collapsed = monitor(backbone)["feature_std"]
    assert collapsed == pytest.approx(0.0, abs=1e-6) and healthy > 1e-3  # a random init: small, not 0
    head = nn.Linear(backbone.embed_dim, 16)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    uniform = monitor(backbone, head, teacher_temp=0.04)
    assert uniform["head_entropy"] == pytest.approx(1.0) and uniform["head_marginal_entropy"] == pytest.approx(1.0)
    with torch.no_grad():
        head.bias[3] = 10.0  # one prototype wins every tile
    peaked = monitor(backbone, head, teacher_temp=0.04)
    assert peaked["head_entropy"] < 1e-6 and peaked["head_marginal_entropy"] < 1e-6
    with pytest.raises(ValueError, match="teacher_temp"):
        monitor(backbone, head)


def test_bad_monitor_config_is_named(data_dir, tmp_path):
    (tmp_path / "only_class").mkdir()
    (tmp_path / "only_class" / "a.tif").symlink_to(data_dir / "tiles" / "nct_crc_he" / "ADI" / "ADI-AAQEFMRI.tif")
    with pytest.raises(ConfigError, match="two class folders"):
        KnnMonitor.from_config(tiny_cfg(f"eval.monitor.tiles={tmp_path}"))
    with pytest.raises(ValueError, match="lies at the top level"):
        KnnMonitor.from_config(tiny_cfg(f"eval.monitor.tiles={tmp_path / 'only_class'}"))
